//! Wire constants of the NBD protocol (magic numbers, option and command codes, flag
//! bits) and this server's own limits. Values follow the NBD project's `doc/proto.md`;
//! everything on the wire is big-endian.

use std::time::Duration;

// ---- Magic numbers ----

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second server magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---- Handshake flags (server, u16) and client flags (u32) ----

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Options ----

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// ---- Option reply types ----

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// ---- Info types (NBD_OPT_INFO / NBD_OPT_GO) ----

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Transmission flags (u16) ----

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Commands and command flags ----

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- Structured replies ----

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// ---- base:allocation ----

/// The only metadata context this server knows.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id this server gives `base:allocation` when a client selects it.
pub const META_BASE_ALLOCATION_ID: u32 = 1;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// ---- Sizes on the wire ----

/// Bytes of a transmission request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;

// ---- This server's limits ----

/// Longest option data accepted during the handshake; a longer option gets
/// `NBD_REP_ERR_TOO_BIG` and the connection is closed (its data is not read).
pub const OPTION_DATA_MAX_BYTES: u32 = 64 * 1024;
/// Longest string (export name, query) the protocol allows.
pub const STRING_MAX_BYTES: usize = 4096;
/// Longest error message sent in a structured error chunk or option error reply.
pub const ERROR_MESSAGE_MAX_BYTES: usize = 1024;
/// Time a client has to finish the handshake, so idle or garbage connections
/// do not pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a connection gets, once the server shuts down or the client disconnects,
/// to write the replies of requests still in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Preferred block size advertised (at least the minimum block size).
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Bounds applied to `ServerConfig::max_payload`.
pub const MAX_PAYLOAD_FLOOR_BYTES: u32 = 64 * 1024;
pub const MAX_PAYLOAD_CEILING_BYTES: u32 = 1 << 30;
/// A WRITE longer than the maximum payload but not longer than this is read and
/// discarded (the client gets EINVAL and the connection goes on); a longer one
/// closes the connection, since reading it would be a denial of service.
pub const WRITE_DISCARD_MAX_BYTES: u32 = 64 * 1024 * 1024;
/// Per-connection bound on payload bytes held by requests in flight (write data
/// read but not yet written to the device, read data not yet sent), at least
/// twice the maximum payload.
pub const IN_FLIGHT_BYTES_MIN: usize = 64 * 1024 * 1024;
/// Most extents sent in one BLOCK_STATUS reply (the protocol allows a prefix).
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 16 * 1024;
/// A structured READ reply reports a run of zero bytes as an `OFFSET_HOLE` chunk
/// only if the run is at least this long; shorter runs are sent as data.
pub const READ_HOLE_MIN_BYTES: u32 = 4096;
/// Zero runs of a structured READ reply are found in granules of this size (rounded
/// up to a multiple of the export's minimum block size), aligned to absolute export
/// offsets, so every chunk boundary is a multiple of the minimum block size.
pub const READ_HOLE_GRANULE_BYTES: u32 = 4096;
/// Most chunks in one structured READ reply; beyond it the smallest holes are sent
/// as data.
pub const READ_CHUNKS_MAX: usize = 64;
/// Socket read buffer of a connection.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Replies gathered into one vectored write.
pub const REPLY_BATCH_MAX: usize = 64;
/// Bytes gathered into one vectored write before it is sent.
pub const REPLY_BATCH_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Payloads up to this size are copied next to their header instead of getting
/// their own iovec.
pub const REPLY_INLINE_PAYLOAD_MAX_BYTES: usize = 4096;

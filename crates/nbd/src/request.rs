//! Transmission requests without I/O: decoding the 28-byte header and validating it
//! against the export, so that a device only ever sees well-formed commands.

use crate::consts::*;
use crate::device::NbdErrno;
use crate::option::BlockSizes;

/// A decoded request header (the payload of a WRITE follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*` code.
    pub command: u16,
    /// Opaque handle echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Length of the range (and of the payload, for WRITE).
    pub length: u32,
}

/// The header did not start with the request magic; the stream cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl RequestHeader {
    /// Decodes a header from its wire form.
    pub fn decode(buf: &[u8; REQUEST_HEADER_BYTES]) -> Result<Self, BadMagic> {
        let be32 = |at: usize| u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let be16 = |at: usize| u16::from_be_bytes([buf[at], buf[at + 1]]);
        let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
        let magic = be32(0);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Self {
            flags: be16(4),
            command: be16(6),
            cookie: be64(8),
            offset: be64(16),
            length: be32(24),
        })
    }

    /// Encodes a header (used by tests and test clients).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut buf = [0u8; REQUEST_HEADER_BYTES];
        buf[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        buf[4..6].copy_from_slice(&self.flags.to_be_bytes());
        buf[6..8].copy_from_slice(&self.command.to_be_bytes());
        buf[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        buf[16..24].copy_from_slice(&self.offset.to_be_bytes());
        buf[24..28].copy_from_slice(&self.length.to_be_bytes());
        buf
    }
}

/// What the reader must do with the bytes following a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Nothing follows (every command but WRITE).
    None,
    /// `n` bytes follow and fit the maximum payload: read them.
    Read(u32),
    /// `n` bytes follow, more than the maximum payload but cheap enough to skip:
    /// read and drop them, then reply EINVAL.
    Discard(u32),
    /// Too many bytes follow to skip: close the connection.
    Close,
}

/// Decides how to consume what follows a header.
pub fn payload_of(header: &RequestHeader, max_payload: u32) -> Payload {
    if header.command != CMD_WRITE {
        Payload::None
    } else if header.length <= max_payload {
        Payload::Read(header.length)
    } else if header.length <= WRITE_DISCARD_MAX_BYTES.max(max_payload) {
        Payload::Discard(header.length)
    } else {
        Payload::Close
    }
}

/// What the connection negotiated about its export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportParams {
    /// Export size in bytes.
    pub size: u64,
    /// Advertised block size constraints.
    pub block_sizes: BlockSizes,
    /// Export refuses writes.
    pub read_only: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected for this export.
    pub base_allocation: bool,
}

/// A validated command, ready for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`; `df` (only with structured replies): answer
    /// with a single `OFFSET_DATA` chunk.
    Read { offset: u64, len: u32, df: bool },
    /// Write the payload (`len` bytes) at `offset`.
    Write { offset: u64, len: u32, fua: bool },
    /// Soft disconnect.
    Disc,
    /// Make acknowledged writes durable.
    Flush,
    /// Discard a range.
    Trim { offset: u64, len: u32, fua: bool },
    /// Prefetch hint; validated and acknowledged without effect.
    Cache { offset: u64, len: u32 },
    /// Zero a range.
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
        fast_zero: bool,
    },
    /// Allocation status of a range.
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// Command flags each command accepts (FUA is valid on every command once
/// `NBD_FLAG_SEND_FUA` is advertised, which this server always does).
fn allowed_flags(command: u16, structured: bool) -> Option<u16> {
    Some(match command {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ => CMD_FLAG_FUA,
        CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_DISC => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return None,
    })
}

/// Checks a header against the export. Errors are the errno to reply with:
/// EINVAL for unknown commands or flags, misalignment, an over-long READ/WRITE, a
/// range past the end (READ, TRIM, CACHE, BLOCK_STATUS), BLOCK_STATUS without
/// `base:allocation` or of length 0; ENOSPC for WRITE and WRITE_ZEROES past the
/// end; EPERM for writes to a read-only export. DISC is accepted whatever it holds.
pub fn validate(header: &RequestHeader, params: &ExportParams) -> Result<Command, NbdErrno> {
    let allowed = allowed_flags(header.command, params.structured).ok_or(NbdErrno::Inval)?;
    if header.command == CMD_DISC {
        return Ok(Command::Disc);
    }
    if header.flags & !allowed != 0 {
        return Err(NbdErrno::Inval);
    }
    let (offset, len, flags) = (header.offset, header.length, header.flags);
    let fua = flags & CMD_FLAG_FUA != 0;
    if header.command == CMD_FLUSH {
        return if offset == 0 && len == 0 {
            Ok(Command::Flush)
        } else {
            Err(NbdErrno::Inval)
        };
    }
    let writes = matches!(header.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && params.read_only {
        return Err(NbdErrno::Perm);
    }
    if header.command == CMD_BLOCK_STATUS && (!params.base_allocation || len == 0) {
        return Err(NbdErrno::Inval);
    }
    if matches!(header.command, CMD_READ | CMD_WRITE) && len > params.block_sizes.maximum {
        return Err(NbdErrno::Inval);
    }
    let minimum = u64::from(params.block_sizes.minimum);
    if offset % minimum != 0 || u64::from(len) % minimum != 0 {
        return Err(NbdErrno::Inval);
    }
    let within = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= params.size);
    if !within {
        return Err(match header.command {
            CMD_WRITE | CMD_WRITE_ZEROES => NbdErrno::NoSpc,
            _ => NbdErrno::Inval,
        });
    }
    Ok(match header.command {
        CMD_READ => Command::Read {
            offset,
            len,
            df: flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            no_hole: flags & CMD_FLAG_NO_HOLE != 0,
            fua,
            fast_zero: flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            len,
            req_one: flags & CMD_FLAG_REQ_ONE != 0,
        },
        // allowed_flags() returned Some only for the commands matched above.
        _ => return Err(NbdErrno::Inval),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(min: u32) -> ExportParams {
        ExportParams {
            size: 1 << 20,
            block_sizes: BlockSizes::new(min, 1 << 16).unwrap(),
            read_only: false,
            structured: true,
            base_allocation: true,
        }
    }

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn header_round_trips_and_rejects_bad_magic() {
        let h = header(CMD_WRITE, CMD_FLAG_FUA, 0x0102_0304_0506_0708, 0x0a0b_0c0d);
        let wire = h.encode();
        assert_eq!(&wire[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&wire), Ok(h));
        let mut bad = wire;
        bad[0] ^= 1;
        assert_eq!(RequestHeader::decode(&bad), Err(BadMagic(0x2460_9513)));
    }

    #[test]
    fn validation_maps_errors_as_the_protocol_says() {
        let p = params(512);
        let v = |c, f, o, l| validate(&header(c, f, o, l), &p);
        assert_eq!(
            v(CMD_READ, 0, 0, 4096),
            Ok(Command::Read {
                offset: 0,
                len: 4096,
                df: false
            })
        );
        assert_eq!(
            v(CMD_READ, CMD_FLAG_DF | CMD_FLAG_FUA, 0, 4096),
            Ok(Command::Read {
                offset: 0,
                len: 4096,
                df: true
            })
        );
        assert_eq!(v(CMD_READ, 0, (1 << 20) - 512, 1024), Err(NbdErrno::Inval));
        assert_eq!(v(CMD_WRITE, 0, (1 << 20) - 512, 1024), Err(NbdErrno::NoSpc));
        assert_eq!(v(CMD_WRITE_ZEROES, 0, 1 << 20, 512), Err(NbdErrno::NoSpc));
        assert_eq!(v(CMD_TRIM, 0, u64::MAX - 511, 512), Err(NbdErrno::Inval));
        assert_eq!(v(CMD_WRITE, 0, u64::MAX - 511, 1024), Err(NbdErrno::NoSpc));
        assert_eq!(v(CMD_READ, 0, 1, 512), Err(NbdErrno::Inval));
        assert_eq!(v(CMD_READ, 0, 0, 100), Err(NbdErrno::Inval));
        assert_eq!(v(CMD_READ, 0, 0, (1 << 16) + 512), Err(NbdErrno::Inval));
        assert_eq!(v(99, 0, 0, 0), Err(NbdErrno::Inval));
        assert_eq!(v(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512), Err(NbdErrno::Inval));
        assert_eq!(v(CMD_READ, 1 << 9, 0, 512), Err(NbdErrno::Inval));
        assert_eq!(v(CMD_FLUSH, 0, 0, 0), Ok(Command::Flush));
        assert_eq!(v(CMD_FLUSH, 0, 512, 0), Err(NbdErrno::Inval));
        assert_eq!(v(CMD_DISC, 0xffff, 3, 3), Ok(Command::Disc));
        assert_eq!(
            v(CMD_READ, 0, 1 << 20, 0),
            Ok(Command::Read {
                offset: 1 << 20,
                len: 0,
                df: false
            })
        );
        assert_eq!(v(CMD_BLOCK_STATUS, 0, 0, 0), Err(NbdErrno::Inval));
        assert_eq!(
            v(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
                512,
                512
            ),
            Ok(Command::WriteZeroes {
                offset: 512,
                len: 512,
                no_hole: true,
                fua: true,
                fast_zero: true
            })
        );
        assert_eq!(
            v(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20),
            Ok(Command::BlockStatus {
                offset: 0,
                len: 1 << 20,
                req_one: true
            })
        );
    }

    #[test]
    fn validation_enforces_negotiation_and_read_only() {
        let mut p = params(1);
        p.read_only = true;
        for command in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(validate(&header(command, 0, 0, 1), &p), Err(NbdErrno::Perm));
        }
        assert!(validate(&header(CMD_READ, 0, 0, 1), &p).is_ok());
        assert!(validate(&header(CMD_FLUSH, 0, 0, 0), &p).is_ok());
        let mut p = params(1);
        p.structured = false;
        p.base_allocation = false;
        assert_eq!(
            validate(&header(CMD_READ, CMD_FLAG_DF, 0, 1), &p),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            validate(&header(CMD_BLOCK_STATUS, 0, 0, 1), &p),
            Err(NbdErrno::Inval)
        );
    }

    #[test]
    fn write_payload_disposition() {
        let h = |command, length| header(command, 0, 0, length);
        assert_eq!(payload_of(&h(CMD_READ, 1 << 30), 1 << 20), Payload::None);
        assert_eq!(
            payload_of(&h(CMD_WRITE, 1 << 20), 1 << 20),
            Payload::Read(1 << 20)
        );
        assert_eq!(
            payload_of(&h(CMD_WRITE, (1 << 20) + 1), 1 << 20),
            Payload::Discard((1 << 20) + 1)
        );
        assert_eq!(payload_of(&h(CMD_WRITE, u32::MAX), 1 << 20), Payload::Close);
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::array::uniform28(any::<u8>())) {
            if let Ok(h) = RequestHeader::decode(&bytes) {
                prop_assert_eq!(h.encode(), bytes);
            }
        }

        #[test]
        fn validated_ranges_are_inside_and_aligned(
            flags in any::<u16>(), command in 0u16..10, offset in any::<u64>(), length in any::<u32>(),
            size in any::<u64>(), min_shift in 0u32..17, read_only in any::<bool>(),
            structured in any::<bool>(), base_allocation in any::<bool>(), small in any::<bool>(),
        ) {
            // Half of the cases use small numbers so that valid requests occur.
            let (offset, length, size) = if small {
                (offset % 8192, length % 8192, size % 16384)
            } else {
                (offset, length, size)
            };
            let params = ExportParams {
                size,
                block_sizes: BlockSizes::new(1 << min_shift, 1 << 20).unwrap(),
                read_only, structured, base_allocation,
            };
            let h = RequestHeader { flags, command, cookie: 0, offset, length };
            let range = match validate(&h, &params) {
                Ok(Command::Read { offset, len, .. })
                | Ok(Command::Write { offset, len, .. })
                | Ok(Command::Trim { offset, len, .. })
                | Ok(Command::Cache { offset, len })
                | Ok(Command::WriteZeroes { offset, len, .. })
                | Ok(Command::BlockStatus { offset, len, .. }) => Some((offset, len)),
                _ => None,
            };
            if let Some((offset, len)) = range {
                prop_assert!(offset + u64::from(len) <= size);
                prop_assert_eq!(offset % (1u64 << min_shift), 0);
                prop_assert_eq!(u64::from(len) % (1u64 << min_shift), 0);
            }
        }
    }
}

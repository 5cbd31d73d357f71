//! The seams between the NBD server and what it serves: [`BlockDevice`] (one open
//! export) and [`ExportProvider`] (the catalogue of exports). The server knows
//! nothing else about the storage behind them.

use std::sync::Arc;

use async_trait::async_trait;

/// The error values NBD allows on the wire (`NBD_E*`), with their wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdErrno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Cannot allocate memory (avoid).
    NoMem = 12,
    /// Invalid argument (bad range, alignment, flags, unknown command).
    Inval = 22,
    /// No space left on device (write past the end).
    NoSpc = 28,
    /// Value too large (only for READ with DF).
    Overflow = 75,
    /// Operation not supported (only for WRITE_ZEROES with FAST_ZERO).
    NotSup = 95,
    /// Server is shutting down; the client must disconnect.
    Shutdown = 108,
}

impl NbdErrno {
    /// The value sent in a reply's error field.
    pub fn wire_value(self) -> u32 {
        self as u32
    }
}

/// An error from a [`BlockDevice`] operation: the errno sent to the client and a
/// message for humans (sent in structured error chunks, and logged).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{errno:?}: {message}")]
pub struct BlockError {
    /// What the client is told.
    pub errno: NbdErrno,
    /// Why, for humans.
    pub message: String,
}

impl BlockError {
    /// An error with the given errno and message.
    pub fn new(errno: NbdErrno, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }

    /// An `EIO` error.
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(NbdErrno::Io, message)
    }
}

/// One run of bytes with the same allocation state (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered; extents with length 0 are ignored.
    pub length: u64,
    /// Not allocated in the backing storage (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// One open export as the server sees it.
///
/// The server validates every request before calling the device: ranges lie within
/// `size()`, are aligned to `min_block_size()`, data lengths are within the
/// negotiated maximum payload, and writes never reach a device that says
/// `read_only()`. Zero-length requests are answered by the server without calling
/// the device. Many calls may run concurrently (requests of one connection are
/// executed concurrently and replied to out of order; several connections may
/// share one device); the NBD protocol gives no ordering between overlapping
/// requests in flight, so neither must the device.
///
/// # Durability contract (the NBD rules, see DESIGN.md §5)
///
/// - `write`, `trim` and `write_zeroes` return when their effect is visible to later
///   reads; with `fua == true` they return only once that effect is durable
///   (survives power loss).
/// - `flush` returns only once every write, trim and write_zeroes that *returned*
///   before `flush` was called is durable. The server calls `flush` for
///   `NBD_CMD_FLUSH` only; it never reorders a reply ahead of the device call it
///   answers, so "acknowledged to the client" implies "returned from the device".
/// - A failed flush or FUA write must return an error (EIO); it must never report
///   success for data that may be lost.
/// - If `can_multi_conn()` is true, a flush (or FUA) on any connection covers writes
///   acknowledged on every connection to the same export, and all connections see
///   the same data.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the export in bytes; constant while it is open.
    fn size(&self) -> u64;
    /// The export refuses writes (advertised as `NBD_FLAG_READ_ONLY`; the server
    /// answers write, trim and write_zeroes with EPERM without calling the device).
    fn read_only(&self) -> bool;
    /// True when all connections see the same data and a FLUSH on one covers all
    /// (advertised as `NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool;
    /// Advertised minimum block size (alignment of every offset and length): a power
    /// of two, at most 65536; 1 or 512 in practice. The server refuses to open an
    /// export with any other value.
    fn min_block_size(&self) -> u32 {
        1
    }
    /// Reads exactly `len` bytes at `offset` (`len > 0`). Returning another length
    /// is a device bug and is reported to the client as EIO.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BlockError>;
    /// Writes `data` (non-empty) at `offset`; durable on return when `fua`.
    async fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> Result<(), BlockError>;
    /// Makes every write that returned before this call durable.
    async fn flush(&self) -> Result<(), BlockError>;
    /// Discards a range (`len > 0`); it reads back as zeros afterwards in this
    /// project. Durable on return when `fua`.
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), BlockError>;
    /// Makes a range read as zeros (`len > 0`). With `no_hole` the range must stay
    /// allocated; with `fast_zero`, return `NotSup` at once (changing nothing) unless
    /// this is faster than writing zeros. Durable on return when `fua`.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
        fast_zero: bool,
    ) -> Result<(), BlockError>;
    /// Allocation state of a range (`len > 0`), as consecutive extents starting at
    /// `offset` and covering at least a prefix of the range (the server trims what
    /// lies beyond the range, drops empty extents, and reports an empty answer as
    /// one allocated, non-zero extent of the whole range).
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, BlockError>;
    /// The connection that opened this device is finished: called exactly once per
    /// successful [`ExportProvider::open`] (including the short-lived opens done for
    /// `NBD_OPT_INFO`), after every request of that connection has returned.
    async fn close(&self) {}
}

/// One entry of the export list (`NBD_OPT_LIST`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name a client passes to select the export.
    pub name: String,
    /// Free text for humans (may be empty).
    pub description: String,
}

/// Why an export could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// No export of that name (`NBD_REP_ERR_UNKNOWN`).
    Unknown,
    /// The export exists but may not be opened now; the message is sent to the
    /// client (`NBD_REP_ERR_POLICY`).
    Policy(String),
    /// Any other failure; the message is sent to the client (`NBD_REP_ERR_UNKNOWN`,
    /// "the requested export is not available").
    Other(String),
}

/// The catalogue of exports a server offers.
#[async_trait]
pub trait ExportProvider: Send + Sync + 'static {
    /// Every export, for `NBD_OPT_LIST`.
    async fn list(&self) -> Vec<ExportInfo>;

    /// Opens an export for one connection.
    ///
    /// Called for `NBD_OPT_GO` and `NBD_OPT_EXPORT_NAME` (the device then serves the
    /// connection), and for `NBD_OPT_INFO`, where the device is only asked for its
    /// size and flags and then closed again at once. Every successful open is paired
    /// with exactly one [`BlockDevice::close`]. NBD clients cannot say whether they
    /// intend to write, so this server always passes `read_only_ok = true`: the
    /// provider may hand out a read-only device (e.g. a snapshot) rather than fail.
    async fn open(&self, name: &str, read_only_ok: bool)
        -> Result<Arc<dyn BlockDevice>, OpenError>;

    /// Description of an export, sent when a client asks for `NBD_INFO_DESCRIPTION`.
    /// The default looks the name up in [`ExportProvider::list`].
    async fn description(&self, name: &str) -> Option<String> {
        self.list()
            .await
            .into_iter()
            .find(|export| export.name == name)
            .map(|export| export.description)
    }
}

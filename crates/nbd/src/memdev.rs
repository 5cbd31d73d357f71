//! A sparse in-memory [`BlockDevice`] and a catalogue of them ([`MemProvider`]), for
//! tests and demos. Data lives in 64 KiB chunks allocated on first write, so unwritten
//! ranges report as holes. Counters record what the server asked for (flushes, FUA
//! writes, opens and closes) so tests can check the server's side of the contracts;
//! optional per-request delays and injected errors exercise concurrency and failure
//! paths.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{BlockDevice, BlockError, ExportInfo, ExportProvider, Extent, OpenError};

/// Allocation granularity of the memory device.
pub const CHUNK_BYTES: u64 = 64 * 1024;

type DelayFn = dyn Fn(u64) -> Duration + Send + Sync;

/// Counts of calls made on a [`MemDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Successful opens through a [`MemProvider`].
    pub opens: u64,
    /// `close()` calls.
    pub closes: u64,
    /// `read()` calls.
    pub reads: u64,
    /// `write()` calls.
    pub writes: u64,
    /// Calls of write, trim or write_zeroes with `fua`.
    pub fua_writes: u64,
    /// `flush()` calls.
    pub flushes: u64,
    /// `trim()` calls.
    pub trims: u64,
    /// `write_zeroes()` calls.
    pub write_zeroes: u64,
    /// `block_status()` calls.
    pub block_status: u64,
}

#[derive(Default)]
struct Counters {
    opens: AtomicU64,
    closes: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    block_status: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A sparse in-memory block device.
pub struct MemDevice {
    size: u64,
    read_only: bool,
    min_block_size: u32,
    chunks: Mutex<HashMap<u64, Box<[u8]>>>,
    counters: Counters,
    delay: Option<Box<DelayFn>>,
    failure: Mutex<Option<BlockError>>,
}

impl MemDevice {
    /// A writable device of `size` bytes, all holes, with minimum block size 1.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            min_block_size: 1,
            chunks: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            delay: None,
            failure: Mutex::new(None),
        }
    }

    /// Makes the device read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Sets the advertised minimum block size.
    pub fn with_min_block_size(mut self, bytes: u32) -> Self {
        self.min_block_size = bytes;
        self
    }

    /// Delays every read and write by `delay(offset)` before it runs.
    pub fn with_delay(mut self, delay: impl Fn(u64) -> Duration + Send + Sync + 'static) -> Self {
        self.delay = Some(Box::new(delay));
        self
    }

    /// Makes every later operation (but `close`) fail with `error`, or work again
    /// with `None`.
    pub fn set_failure(&self, error: Option<BlockError>) {
        *lock(&self.failure) = error;
    }

    /// Counts of calls so far.
    pub fn stats(&self) -> MemStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MemStats {
            opens: get(&c.opens),
            closes: get(&c.closes),
            reads: get(&c.reads),
            writes: get(&c.writes),
            fua_writes: get(&c.fua_writes),
            flushes: get(&c.flushes),
            trims: get(&c.trims),
            write_zeroes: get(&c.write_zeroes),
            block_status: get(&c.block_status),
        }
    }

    /// Copies `len` bytes at `offset` (zeros for holes), without delays or counters.
    pub fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let chunks = lock(&self.chunks);
        for_each_piece(offset, len as u64, |index, within, at, n| {
            if let Some(chunk) = chunks.get(&index) {
                out[at..at + n].copy_from_slice(&chunk[within..within + n]);
            }
        });
        out
    }

    /// Number of allocated chunks.
    pub fn allocated_chunks(&self) -> usize {
        lock(&self.chunks).len()
    }

    async fn before(&self, offset: u64) -> Result<(), BlockError> {
        if let Some(delay) = &self.delay {
            tokio::time::sleep(delay(offset)).await;
        }
        match lock(&self.failure).clone() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Zeros a range; with `keep_allocated` chunks stay, else wholly covered
    /// chunks are freed.
    fn zero_range(&self, offset: u64, len: u32, keep_allocated: bool) {
        let mut chunks = lock(&self.chunks);
        for_each_piece(offset, u64::from(len), |index, within, _, n| {
            if !keep_allocated && n as u64 == CHUNK_BYTES {
                chunks.remove(&index);
            } else if keep_allocated {
                chunks.entry(index).or_insert_with(new_chunk)[within..within + n].fill(0);
            } else if let Some(chunk) = chunks.get_mut(&index) {
                chunk[within..within + n].fill(0);
            }
        });
    }
}

fn new_chunk() -> Box<[u8]> {
    vec![0u8; CHUNK_BYTES as usize].into_boxed_slice()
}

/// A poisoned lock only means another test thread panicked; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Calls `f(chunk index, offset within chunk, offset within range, length)` for each
/// chunk-sized piece of a range.
fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut done = 0u64;
    while done < len {
        let position = offset + done;
        let within = position % CHUNK_BYTES;
        let n = (CHUNK_BYTES - within).min(len - done);
        f(
            position / CHUNK_BYTES,
            within as usize,
            done as usize,
            n as usize,
        );
        done += n;
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn min_block_size(&self) -> u32 {
        self.min_block_size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BlockError> {
        bump(&self.counters.reads);
        self.before(offset).await?;
        Ok(self.snapshot(offset, len as usize))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        bump(&self.counters.writes);
        if fua {
            bump(&self.counters.fua_writes);
        }
        self.before(offset).await?;
        let mut chunks = lock(&self.chunks);
        for_each_piece(offset, data.len() as u64, |index, within, at, n| {
            chunks.entry(index).or_insert_with(new_chunk)[within..within + n]
                .copy_from_slice(&data[at..at + n]);
        });
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        bump(&self.counters.flushes);
        self.before(0).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), BlockError> {
        bump(&self.counters.trims);
        if fua {
            bump(&self.counters.fua_writes);
        }
        self.before(offset).await?;
        self.zero_range(offset, len, false);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
        _fast_zero: bool,
    ) -> Result<(), BlockError> {
        // Zeroing memory is always faster than writing zeros over the network.
        bump(&self.counters.write_zeroes);
        if fua {
            bump(&self.counters.fua_writes);
        }
        self.before(offset).await?;
        self.zero_range(offset, len, no_hole);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, BlockError> {
        bump(&self.counters.block_status);
        self.before(offset).await?;
        let chunks = lock(&self.chunks);
        let mut extents: Vec<Extent> = Vec::new();
        for_each_piece(offset, u64::from(len), |index, within, _, n| {
            let (hole, zero) = match chunks.get(&index) {
                None => (true, true),
                Some(chunk) => (false, chunk[within..within + n].iter().all(|&b| b == 0)),
            };
            match extents.last_mut() {
                Some(last) if last.hole == hole && last.zero == zero => last.length += n as u64,
                _ => extents.push(Extent {
                    length: n as u64,
                    hole,
                    zero,
                }),
            }
        });
        Ok(extents)
    }

    async fn close(&self) {
        bump(&self.counters.closes);
    }
}

enum Entry {
    Device {
        description: String,
        device: Arc<MemDevice>,
    },
    Refused(String),
}

/// A catalogue of named [`MemDevice`]s (and refused names, for policy errors).
#[derive(Default)]
pub struct MemProvider {
    exports: Mutex<BTreeMap<String, Entry>>,
}

impl MemProvider {
    /// An empty catalogue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an export and returns its device.
    pub fn add(&self, name: &str, description: &str, device: MemDevice) -> Arc<MemDevice> {
        let device = Arc::new(device);
        let entry = Entry::Device {
            description: description.into(),
            device: device.clone(),
        };
        lock(&self.exports).insert(name.into(), entry);
        device
    }

    /// Adds a name whose opening is refused by policy with `message`.
    pub fn add_refused(&self, name: &str, message: &str) {
        lock(&self.exports).insert(name.into(), Entry::Refused(message.into()));
    }
}

#[async_trait]
impl ExportProvider for MemProvider {
    async fn list(&self) -> Vec<ExportInfo> {
        lock(&self.exports)
            .iter()
            .filter_map(|(name, entry)| match entry {
                Entry::Device { description, .. } => Some(ExportInfo {
                    name: name.clone(),
                    description: description.clone(),
                }),
                Entry::Refused(_) => None,
            })
            .collect()
    }

    async fn open(
        &self,
        name: &str,
        _read_only_ok: bool,
    ) -> Result<Arc<dyn BlockDevice>, OpenError> {
        match lock(&self.exports).get(name) {
            None => Err(OpenError::Unknown),
            Some(Entry::Refused(message)) => Err(OpenError::Policy(message.clone())),
            Some(Entry::Device { device, .. }) => {
                bump(&device.counters.opens);
                Ok(device.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_device_reads_back_and_reports_holes() {
        let device = MemDevice::new(4 * CHUNK_BYTES);
        assert_eq!(device.read(100, 10).await.unwrap(), vec![0; 10]);
        device
            .write(CHUNK_BYTES - 2, Bytes::from_static(b"abcd"), false)
            .await
            .unwrap();
        assert_eq!(device.read(CHUNK_BYTES - 3, 6).await.unwrap(), b"\0abcd\0");
        assert_eq!(device.allocated_chunks(), 2);
        let status = device
            .block_status(0, (4 * CHUNK_BYTES) as u32)
            .await
            .unwrap();
        assert_eq!(
            status,
            vec![
                Extent {
                    length: 2 * CHUNK_BYTES,
                    hole: false,
                    zero: false
                },
                Extent {
                    length: 2 * CHUNK_BYTES,
                    hole: true,
                    zero: true
                },
            ]
        );
        device
            .trim(0, (2 * CHUNK_BYTES) as u32, false)
            .await
            .unwrap();
        assert_eq!(device.allocated_chunks(), 0);
        device
            .write_zeroes(0, 512, true, true, false)
            .await
            .unwrap();
        let status = device.block_status(0, 512).await.unwrap();
        assert_eq!(
            status,
            vec![Extent {
                length: 512,
                hole: false,
                zero: true
            }]
        );
        assert_eq!(device.stats().fua_writes, 1);
    }
}

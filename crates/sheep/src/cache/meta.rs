//! On-disk state of a VDI's cache, in its directory `cache/<vid>/`:
//!
//! - `meta`: a 4 KiB header (magic `SDCACHE1`, a JSON body: vid, object size, the VDI
//!   lock generation the cache was written under), then one record per object index at
//!   `4096 + index * record_len`: the valid, dirty and zero bitmaps, one bit per 4 KiB.
//!   Sparse: an all-zero record means "nothing cached".
//! - `obj-<index>`: the cached object data, `object_size` bytes, sparse.
//!
//! Records and data are written without fsync: they survive a crash of the process (the
//! page cache survives it), not a reboot. The cache root's `identity.json` records the
//! boot id it was last used under and whether a clean stop sealed it (fsynced
//! everything): an unsealed cache from another boot is never trusted.

use super::bitmap::{Bitmap, CACHE_BLOCK};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const META_MAGIC: &[u8; 8] = b"SDCACHE1";
const META_HEADER: u64 = 4096;

/// The JSON body of a cache's meta header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaHeader {
    pub vid: u32,
    pub object_size: u32,
    /// The VDI lock generation this cache's dirty data was written under.
    pub fence: u64,
}

/// State of one cached object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectState {
    pub valid: Bitmap,
    pub dirty: Bitmap,
    pub zero: Bitmap,
}

impl ObjectState {
    pub fn new(blocks: usize) -> ObjectState {
        ObjectState {
            valid: Bitmap::new(blocks),
            dirty: Bitmap::new(blocks),
            zero: Bitmap::new(blocks),
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.valid.any() && !self.dirty.any()
    }
}

/// Bytes of one object's record.
pub fn record_len(object_size: u32) -> u64 {
    3 * blocks_of(object_size).div_ceil(8) as u64
}

pub fn blocks_of(object_size: u32) -> usize {
    (object_size as u64 / CACHE_BLOCK) as usize
}

fn encode_record(s: &ObjectState) -> Vec<u8> {
    let mut out = s.valid.to_bytes();
    out.extend(s.dirty.to_bytes());
    out.extend(s.zero.to_bytes());
    out
}

fn decode_record(blocks: usize, b: &[u8]) -> ObjectState {
    let part = blocks.div_ceil(8);
    ObjectState {
        valid: Bitmap::from_bytes(blocks, &b[..part]),
        dirty: Bitmap::from_bytes(blocks, &b[part..2 * part]),
        zero: Bitmap::from_bytes(blocks, &b[2 * part..3 * part]),
    }
}

/// The meta file of one VDI's cache.
pub struct MetaFile {
    file: File,
    pub header: MetaHeader,
}

/// Why a cache directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cache i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cache meta {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MetaError + '_ {
    move |source| MetaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl MetaFile {
    /// Creates a fresh meta file (replacing any).
    pub fn create(dir: &Path, header: MetaHeader) -> Result<MetaFile, MetaError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join("meta");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let json = serde_json::to_vec(&header).map_err(|e| MetaError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut block = vec![0u8; META_HEADER as usize];
        block[..8].copy_from_slice(META_MAGIC);
        block[8..12].copy_from_slice(&(json.len() as u32).to_le_bytes());
        block[12..12 + json.len()].copy_from_slice(&json);
        file.write_all_at(&block, 0).map_err(io_err(&path))?;
        Ok(MetaFile { file, header })
    }

    /// Opens an existing meta file, checking its header.
    pub fn open(dir: &Path) -> Result<MetaFile, MetaError> {
        let path = dir.join("meta");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut block = vec![0u8; META_HEADER as usize];
        let corrupt = |reason: &str| MetaError::Corrupt {
            path: path.clone(),
            reason: reason.to_string(),
        };
        file.read_exact_at(&mut block, 0)
            .map_err(|_| corrupt("short header"))?;
        if &block[..8] != META_MAGIC {
            return Err(corrupt("bad magic"));
        }
        let len = u32::from_le_bytes([block[8], block[9], block[10], block[11]]) as usize;
        let json = block
            .get(12..12 + len)
            .ok_or_else(|| corrupt("bad header length"))?;
        let header: MetaHeader =
            serde_json::from_slice(json).map_err(|e| corrupt(&e.to_string()))?;
        if header.object_size == 0 || !(header.object_size as u64).is_multiple_of(CACHE_BLOCK) {
            return Err(corrupt("bad object size"));
        }
        Ok(MetaFile { file, header })
    }

    /// Records one object's state (no fsync).
    pub fn store(&self, index: u32, s: &ObjectState) -> io::Result<()> {
        let len = record_len(self.header.object_size);
        self.file
            .write_all_at(&encode_record(s), META_HEADER + index as u64 * len)
    }

    /// Every object with a non-empty record.
    pub fn load_all(&self) -> io::Result<Vec<(u32, ObjectState)>> {
        let len = record_len(self.header.object_size) as usize;
        let blocks = blocks_of(self.header.object_size);
        let size = self.file.metadata()?.len();
        let mut out = Vec::new();
        let mut buf = vec![0u8; len];
        let count = size.saturating_sub(META_HEADER) / len as u64;
        for index in 0..count {
            self.file
                .read_exact_at(&mut buf, META_HEADER + index * len as u64)?;
            if buf.iter().any(|b| *b != 0) {
                let s = decode_record(blocks, &buf);
                if !s.is_empty() {
                    out.push((index as u32, s));
                }
            }
        }
        Ok(out)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Updates the lock generation recorded in the header.
    pub fn set_fence(&mut self, dir: &Path, fence: u64) -> Result<(), MetaError> {
        let mut h = self.header.clone();
        h.fence = fence;
        let path = dir.join("meta");
        let json = serde_json::to_vec(&h).map_err(|e| MetaError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut block = vec![0u8; META_HEADER as usize];
        block[..8].copy_from_slice(META_MAGIC);
        block[8..12].copy_from_slice(&(json.len() as u32).to_le_bytes());
        block[12..12 + json.len()].copy_from_slice(&json);
        self.file.write_all_at(&block, 0).map_err(io_err(&path))?;
        self.header = h;
        Ok(())
    }
}

/// The cache root's identity: which cluster and node it belongs to, the boot it was
/// last used under, and whether a clean stop sealed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheIdentity {
    pub magic: String,
    pub cluster_uuid: uuid::Uuid,
    pub format_generation: u64,
    pub node_uuid: uuid::Uuid,
    pub boot_id: String,
    pub sealed: bool,
}

pub const CACHE_IDENTITY_MAGIC: &str = "sheepdog-cache-v1";

pub fn read_identity(root: &Path) -> Option<CacheIdentity> {
    let b = std::fs::read(root.join("identity.json")).ok()?;
    let id: CacheIdentity = serde_json::from_slice(&b).ok()?;
    (id.magic == CACHE_IDENTITY_MAGIC).then_some(id)
}

/// Writes the identity crash-safely (temp, fsync, rename, directory fsync).
pub fn write_identity(root: &Path, id: &CacheIdentity) -> io::Result<()> {
    let tmp = root.join("identity.json.tmp");
    let body = serde_json::to_vec_pretty(id).map_err(io::Error::other)?;
    {
        let f = File::create(&tmp)?;
        f.write_all_at(&body, 0)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, root.join("identity.json"))?;
    File::open(root)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_headers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("v");
        let m = MetaFile::create(
            &d,
            MetaHeader {
                vid: 7,
                object_size: 4 << 20,
                fence: 3,
            },
        )
        .unwrap();
        let mut s = ObjectState::new(1024);
        s.valid.set_range(0, 10, true);
        s.dirty.set_range(2, 4, true);
        s.zero.set(3, true);
        m.store(5, &s).unwrap();
        let m2 = MetaFile::open(&d).unwrap();
        assert_eq!(m2.header.fence, 3);
        assert_eq!(m2.load_all().unwrap(), vec![(5, s)]);
        std::fs::write(d.join("meta"), b"").unwrap();
        assert!(matches!(MetaFile::open(&d), Err(MetaError::Corrupt { .. })));
        std::fs::write(d.join("meta"), vec![7u8; 8192]).unwrap();
        assert!(matches!(MetaFile::open(&d), Err(MetaError::Corrupt { .. })));
    }
}

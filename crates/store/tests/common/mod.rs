//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use proto::Oid;
use std::path::{Path, PathBuf};
use store::{ObjectStore, Stamp, StoreConfig};

/// Data object size used by most tests: small, so whole-object checks are cheap.
pub const SMALL_OBJECT: u32 = 64 << 10;

/// Offset of the data area in a data object file of `SMALL_OBJECT` or 4 MiB (header
/// block + one block of crc table), per the format in the crate doc.
pub const DATA_OFFSET: u64 = 8192;

pub fn open(dir: &Path, object_size: u32, fault_injection: bool) -> ObjectStore {
    ObjectStore::open(StoreConfig {
        dir: dir.to_owned(),
        object_size,
        fault_injection,
    })
    .expect("open store")
}

pub fn object_path(dir: &Path, oid: Oid) -> PathBuf {
    dir.join("objects").join(format!("{:016x}", oid.raw()))
}

pub fn oid(index: u32) -> Oid {
    Oid::data(7, index)
}

pub fn stamp(generation: u64) -> Stamp {
    Stamp::new(1, generation)
}

/// Deterministic non-zero test bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

//! The inode object's layout: a VDI header, then the flat data table (DESIGN.md §2).
//!
//! The header occupies the first [`INODE_HEADER_SIZE`] bytes: an 8-byte magic, a u32
//! length, and a JSON document. Table entry `i` is a little-endian u32 at
//! `INODE_HEADER_SIZE + 4 * i` naming the vid that owns data object `i` (0 = never
//! written). Entries are updated in place with 4-byte writes, never by rewriting the inode.

use crate::error::FrameError;
use crate::oid::{Vid, DATA_TABLE_ENTRIES_MAX, INODE_HEADER_SIZE};
use serde::{Deserialize, Serialize};

const INODE_MAGIC: &[u8; 8] = b"SDINODE1";

/// Longest VDI name in bytes.
pub const VDI_NAME_MAX: usize = 255;

/// Sector size: VDI sizes are multiples of it.
pub const SECTOR_SIZE: u64 = 512;

/// A VDI's descriptive header, stored at the start of its inode object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiHeader {
    pub name: String,
    pub vid: Vid,
    pub size: u64,
    pub copies: u32,
    pub min_copies: u32,
    pub created_unix: u64,
    pub object_size: u32,
    /// Snapshot fields, reserved for snapshots and clones.
    pub snap_id: u32,
    pub parent_vid: Vid,
    pub snap_unix: u64,
    pub tag: String,
    /// Durability mode of the VDI's NBD export: "none", "writethrough" or "writeback".
    #[serde(default = "default_cache_mode")]
    pub cache_mode: String,
    /// In writeback mode, write through until the client's first FLUSH (as librbd
    /// does), protecting clients that never flush. On by default.
    #[serde(default = "default_true")]
    pub writethrough_until_flush: bool,
}

fn default_true() -> bool {
    true
}

fn default_cache_mode() -> String {
    CACHE_MODES[0].to_string()
}

/// The durability modes, default first (DESIGN.md §5).
pub const CACHE_MODES: [&str; 3] = ["none", "writethrough", "writeback"];

impl VdiHeader {
    /// Number of data objects the VDI spans.
    pub fn object_count(&self) -> u32 {
        object_count(self.size, self.object_size)
    }

    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let json = serde_json::to_vec(self).map_err(|e| FrameError::Body(e.to_string()))?;
        if json.len() + 12 > INODE_HEADER_SIZE as usize {
            return Err(FrameError::Body("inode header too large".into()));
        }
        let mut out = Vec::with_capacity(INODE_HEADER_SIZE as usize);
        out.extend_from_slice(INODE_MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.resize(INODE_HEADER_SIZE as usize, 0);
        Ok(out)
    }

    pub fn decode(b: &[u8]) -> Result<VdiHeader, FrameError> {
        if b.len() < 12 || &b[0..8] != INODE_MAGIC {
            return Err(FrameError::Body("not an inode header".into()));
        }
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        let json = b
            .get(12..12 + len)
            .ok_or_else(|| FrameError::Body("truncated inode header".into()))?;
        serde_json::from_slice(json).map_err(|e| FrameError::Body(e.to_string()))
    }
}

/// Number of objects of `object_size` bytes needed for `size` bytes.
pub fn object_count(size: u64, object_size: u32) -> u32 {
    size.div_ceil(object_size as u64) as u32
}

/// Largest VDI size for an object size: the flat table has 2^20 entries.
pub fn vdi_size_max(object_size: u32) -> u64 {
    DATA_TABLE_ENTRIES_MAX as u64 * object_size as u64
}

/// Offset of data table entry `index` inside the inode object.
pub fn table_entry_offset(index: u32) -> u64 {
    INODE_HEADER_SIZE + 4 * index as u64
}

/// Decodes `count` table entries from little-endian bytes.
pub fn decode_table(bytes: &[u8]) -> Vec<Vid> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Splits a byte range of a VDI into per-object pieces: (index, offset in object, length).
pub fn split_range(offset: u64, len: u64, object_size: u32) -> Vec<(u32, u64, u64)> {
    let osz = object_size as u64;
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let index = pos / osz;
        let in_obj = pos % osz;
        let n = (osz - in_obj).min(end - pos);
        out.push((index as u32, in_obj, n));
        pos += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> VdiHeader {
        VdiHeader {
            name: "v1".into(),
            vid: 7,
            size: 256 << 20,
            copies: 3,
            min_copies: 2,
            created_unix: 1,
            object_size: 4 << 20,
            snap_id: 0,
            parent_vid: 0,
            snap_unix: 0,
            tag: String::new(),
            cache_mode: "none".into(),
            writethrough_until_flush: true,
        }
    }

    #[test]
    fn header_round_trips_in_one_block() {
        let h = header();
        let b = h.encode().unwrap();
        assert_eq!(b.len() as u64, INODE_HEADER_SIZE);
        assert_eq!(VdiHeader::decode(&b).unwrap(), h);
        assert_eq!(h.object_count(), 64);
    }

    #[test]
    fn longest_name_fits() {
        let mut h = header();
        h.name = "\u{00e9}".repeat(VDI_NAME_MAX / 2);
        assert!(h.encode().is_ok());
    }

    #[test]
    fn garbage_header_is_an_error() {
        assert!(VdiHeader::decode(&[0u8; 4096]).is_err());
        let mut b = header().encode().unwrap();
        b[8] = 0xff;
        assert!(VdiHeader::decode(&b).is_err());
    }

    proptest! {
        #[test]
        fn split_covers_range_exactly(offset in 0u64..(1 << 40), len in 0u64..(64 << 20), shift in 12u32..24) {
            let osz = 1u32 << shift;
            let parts = split_range(offset, len, osz);
            let mut pos = offset;
            for (index, in_obj, n) in &parts {
                prop_assert_eq!(*index as u64 * osz as u64 + in_obj, pos);
                prop_assert!(*n > 0 && in_obj + n <= osz as u64);
                pos += n;
            }
            prop_assert_eq!(pos, offset + len);
        }

        #[test]
        fn table_round_trips(entries in proptest::collection::vec(any::<u32>(), 0..64)) {
            let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            prop_assert_eq!(decode_table(&bytes), entries);
        }
    }
}

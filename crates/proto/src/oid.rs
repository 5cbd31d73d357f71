//! Object ids: the 64-bit names of replicated objects (DESIGN.md §2).
//!
//! Bit 63 marks an inode object; bits 32..56 hold the VDI id; bits 0..32 hold the object
//! index within the VDI. Bits 56..63 are reserved for future object types and must be 0.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A VDI id: 24 bits, never reused within a cluster.
pub type Vid = u32;

/// Largest valid VDI id (24 bits). Vid 0 is reserved to mean "no owner" in data tables.
pub const VID_MAX: Vid = (1 << 24) - 1;

/// Number of entries in a VDI's flat data table: the most data objects a VDI can have.
pub const DATA_TABLE_ENTRIES_MAX: u32 = 1 << 20;

/// Bytes at the start of an inode object holding its header; the data table follows.
pub const INODE_HEADER_SIZE: u64 = 4096;

/// Size of an inode object: header plus a full flat data table of u32 entries.
pub const INODE_OBJECT_SIZE: u64 = INODE_HEADER_SIZE + 4 * DATA_TABLE_ENTRIES_MAX as u64;

const INODE_BIT: u64 = 1 << 63;
const RESERVED_MASK: u64 = 0x7f << 56;
const VID_SHIFT: u32 = 32;

/// An object id. Construct with [`Oid::data`], [`Oid::inode`] or validate with [`Oid::from_raw`].
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Oid(u64);

/// A raw 64-bit value that is not a valid object id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid object id {0:#018x}")]
pub struct InvalidOid(pub u64);

impl Oid {
    /// The data object `index` of VDI `vid`.
    pub fn data(vid: Vid, index: u32) -> Oid {
        debug_assert!(vid <= VID_MAX);
        Oid(((vid as u64) << VID_SHIFT) | index as u64)
    }

    /// The inode object of VDI `vid`.
    pub fn inode(vid: Vid) -> Oid {
        debug_assert!(vid <= VID_MAX);
        Oid(INODE_BIT | ((vid as u64) << VID_SHIFT))
    }

    /// Validates a raw id received from the network or read from disk.
    pub fn from_raw(raw: u64) -> Result<Oid, InvalidOid> {
        let oid = Oid(raw);
        let bad_reserved = raw & RESERVED_MASK != 0;
        let bad_inode_index = oid.is_inode() && oid.index() != 0;
        let bad_vid = oid.vid() == 0;
        if bad_reserved || bad_inode_index || bad_vid {
            return Err(InvalidOid(raw));
        }
        Ok(oid)
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn is_inode(self) -> bool {
        self.0 & INODE_BIT != 0
    }

    pub fn vid(self) -> Vid {
        ((self.0 >> VID_SHIFT) as u32) & VID_MAX
    }

    /// Object index within the VDI (0 for inode objects).
    pub fn index(self) -> u32 {
        self.0 as u32
    }

    /// The most bytes this object can hold, given the cluster's data object size.
    pub fn capacity(self, object_size: u32) -> u64 {
        if self.is_inode() {
            INODE_OBJECT_SIZE
        } else {
            object_size as u64
        }
    }
}

impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn data_oid_round_trips(vid in 1..=VID_MAX, index in any::<u32>()) {
            let oid = Oid::data(vid, index);
            prop_assert!(!oid.is_inode());
            prop_assert_eq!(oid.vid(), vid);
            prop_assert_eq!(oid.index(), index);
            prop_assert_eq!(Oid::from_raw(oid.raw()), Ok(oid));
        }

        #[test]
        fn inode_oid_round_trips(vid in 1..=VID_MAX) {
            let oid = Oid::inode(vid);
            prop_assert!(oid.is_inode());
            prop_assert_eq!(oid.vid(), vid);
            prop_assert_eq!(oid.index(), 0);
            prop_assert_eq!(Oid::from_raw(oid.raw()), Ok(oid));
        }

        #[test]
        fn data_and_inode_ids_never_collide(a in 1..=VID_MAX, b in 1..=VID_MAX, i in any::<u32>()) {
            prop_assert_ne!(Oid::data(a, i), Oid::inode(b));
        }

        #[test]
        fn reserved_bits_are_rejected(raw in any::<u64>(), bit in 56u32..63) {
            prop_assert!(Oid::from_raw(raw | (1 << bit)).is_err());
        }
    }

    #[test]
    fn vid_zero_and_inode_with_index_are_rejected() {
        assert!(Oid::from_raw(5).is_err());
        assert!(Oid::from_raw(Oid::inode(7).raw() | 3).is_err());
    }

    #[test]
    fn inode_object_holds_a_full_table() {
        assert_eq!(INODE_OBJECT_SIZE, 4096 + 4 * 1024 * 1024);
        assert_eq!(Oid::inode(1).capacity(4 << 20), INODE_OBJECT_SIZE);
        assert_eq!(Oid::data(1, 0).capacity(4 << 20), 4 << 20);
    }
}

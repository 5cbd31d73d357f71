//! The per-node object store (DESIGN.md §2 and §5): one sparse file per object, a crc32c
//! for every 4 KiB block checked on every read, atomic create-if-absent, quarantine of
//! stale or corrupt copies, and a test-only mode that simulates a power cut.
//!
//! The store is synchronous (blocking `std::fs` and `pread`/`pwrite`/`fdatasync`); the
//! daemon calls it from `spawn_blocking`. [`ObjectStore`] is `Send + Sync` and serialises
//! operations on one object with striped per-object locks.
//!
//! # Directory layout
//!
//! ```text
//! <dir>/lock                 held with flock(LOCK_EX) while a store is open
//! <dir>/identity.json        node and cluster identity (see [`identity`])
//! <dir>/objects/<oid>        one file per object, named by the oid in 16 lowercase hex digits
//! <dir>/tmp/                 temp files of creates in progress; emptied by `open`
//! <dir>/quarantine/          stale or corrupt copies, moved aside and never deleted:
//!                            `<oid>.<nanos>.<seq>.stale` while the object is marked stale,
//!                            renamed to `.kept` once the object is recreated or removed
//! <dir>/fault-removed/       fault-injection mode only: removals not yet durable
//! ```
//!
//! # Object file format (version 1)
//!
//! All integers little endian. `B` = 4096 bytes ([`BLOCK_SIZE`]); `n` = capacity / B
//! rounded up, where capacity is `oid.capacity(object_size)`.
//!
//! ```text
//! offset 0        header block (B bytes, 52 used, rest zero):
//!                   0  magic "SDOGOBJ\0"     8  format version u32 (1)
//!                  12  block size u32 (4096) 16  oid u64
//!                  24  capacity u64          32  stamp.epoch u32
//!                  36  reserved u32 (0)      40  stamp.generation u64
//!                  48  crc32c of bytes 0..48
//! offset B        crc table: n entries of u32, padded to a multiple of B.
//!                 entry i = crc32c(data block i) XOR crc32c(B zero bytes), so an
//!                 all-zero entry (a hole in the table) stands for an all-zero block:
//!                 never-written and punched blocks need no table write.
//! offset B + T    data: n blocks of B bytes (T = padded table length). The file is
//!                 created with its full length, sparse; unwritten blocks are holes.
//! ```
//!
//! A 4 MiB data object has its data at offset 8 KiB; an inode object (4 MiB + 4 KiB) at
//! 12 KiB. Header, table and data live in one file so one `fdatasync` covers them all.
//! A file whose header, length, oid or capacity does not match gives
//! [`StoreError::Corrupt`]; a block whose crc does not match gives
//! [`StoreError::Checksum`]. Neither ever panics.

mod dirs;
mod durability;
pub mod error;
mod fault;
mod format;
mod handles;
pub mod identity;
mod object_file;
mod quarantine;
mod store;
pub mod sys;

pub use error::StoreError;
pub use format::{Summed, BLOCK_SIZE};
pub use identity::{ClusterStamp, StoreIdentity};
pub use store::{ObjectStore, WRITE_NOW_MAX};

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::path::PathBuf;

/// How to open an [`ObjectStore`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The store's directory; created if absent.
    pub dir: PathBuf,
    /// The cluster's data object size in bytes (inode objects have their own size).
    pub object_size: u32,
    /// Test-only: keep unsynced changes apart so [`ObjectStore::power_cut`] can drop them.
    /// Real syncs are skipped in this mode. Never enable it in production.
    pub fault_injection: bool,
}

impl StoreConfig {
    /// A production configuration (fault injection off).
    pub fn new(dir: impl Into<PathBuf>, object_size: u32) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            object_size,
            fault_injection: false,
        }
    }
}

/// The version stamp of one replica of an object: the cluster epoch and the gateway's
/// write generation of the newest write applied to it.
///
/// Ordered by `generation` first, then `epoch`: the generation is the per-object write
/// counter the gateway assigns in write order, so it alone says which copy has seen more
/// writes; the epoch only breaks ties between copies at the same generation (a copy made
/// by recovery in a later epoch ranks above one of an earlier epoch). The derived order
/// (epoch first) would wrongly rank a copy that missed writes above a complete one just
/// because its last write landed after an epoch change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Cluster epoch of the newest write applied.
    pub epoch: u32,
    /// Gateway write generation of the newest write applied.
    pub generation: u64,
}

impl Stamp {
    /// A stamp from its parts.
    pub fn new(epoch: u32, generation: u64) -> Stamp {
        Stamp { epoch, generation }
    }
}

impl Ord for Stamp {
    fn cmp(&self, other: &Stamp) -> Ordering {
        (self.generation, self.epoch).cmp(&(other.generation, other.epoch))
    }
}

impl PartialOrd for Stamp {
    fn partial_cmp(&self, other: &Stamp) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_orders_by_generation_then_epoch() {
        assert!(Stamp::new(9, 1) < Stamp::new(1, 2));
        assert!(Stamp::new(1, 2) < Stamp::new(2, 2));
        assert_eq!(Stamp::new(3, 4).max(Stamp::new(5, 3)), Stamp::new(3, 4));
        assert_eq!(Stamp::default(), Stamp::new(0, 0));
    }
}

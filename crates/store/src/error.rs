//! Errors of the object store: what failed, on which object, and whether the copy on
//! this node can still be trusted.

use crate::identity::ClusterStamp;
use proto::Oid;
use std::io;
use std::path::PathBuf;

/// An object store error.
///
/// [`StoreError::Checksum`] and [`StoreError::Corrupt`] mean this node's copy is bad: the
/// caller serves the request from another replica, marks the object stale
/// ([`crate::ObjectStore::mark_stale`]) and recovers it. [`StoreError::SyncFailed`] and a
/// failed durable write mean data may be lost: the objects concerned must be marked stale,
/// never "fixed" by retrying the sync.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object is not on this node.
    #[error("object {0} not found")]
    NotFound(Oid),
    /// `create_and_write` found the object already present.
    #[error("object {0} already exists")]
    Exists(Oid),
    /// The object was marked stale (quarantined) and must be recovered before use.
    #[error("object {0} is stale on this node")]
    Stale(Oid),
    /// A 4 KiB block failed its crc32c check. `block` is the block index within the
    /// object (byte offset / 4096).
    #[error("checksum mismatch in object {oid} block {block}")]
    Checksum { oid: Oid, block: u64 },
    /// The byte range lies (partly) beyond the object's capacity.
    #[error("range {offset}+{len} is beyond the capacity of object {oid}")]
    OutOfRange { oid: Oid, offset: u64, len: u64 },
    /// The filesystem is full (ENOSPC or EDQUOT).
    #[error("no space left in the object store")]
    NoSpace,
    /// An I/O operation failed.
    #[error("{op} failed{}: {source}", oid.map(|o| format!(" on object {o}")).unwrap_or_default())]
    Io {
        op: &'static str,
        oid: Option<Oid>,
        #[source]
        source: io::Error,
    },
    /// A file of the store does not have the expected format (bad magic, truncated, wrong
    /// oid, unsupported version...). For an object file, treat like a checksum failure.
    #[error("corrupt file {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// The store belongs to another cluster (or another format of it).
    #[error("store belongs to cluster {} generation {}, not cluster {} generation {}",
        recorded.cluster_uuid, recorded.format_generation,
        requested.cluster_uuid, requested.format_generation)]
    IdentityMismatch {
        recorded: ClusterStamp,
        requested: ClusterStamp,
    },
    /// `sync_all` failed: writes to these objects since the previous sync may be lost.
    #[error("sync of the object store failed ({} objects concerned): {source}", oids.len())]
    SyncFailed {
        oids: Vec<Oid>,
        #[source]
        source: io::Error,
    },
    /// Another process (or another `ObjectStore` in this one) has the directory open.
    #[error("object store {} is in use by another process", dir.display())]
    Busy { dir: PathBuf },
    /// The configuration cannot be used.
    #[error("invalid store configuration: {0}")]
    InvalidConfig(String),
}

impl StoreError {
    /// The object the error is about, when there is one.
    pub fn oid(&self) -> Option<Oid> {
        match self {
            StoreError::NotFound(oid)
            | StoreError::Exists(oid)
            | StoreError::Stale(oid)
            | StoreError::Checksum { oid, .. }
            | StoreError::OutOfRange { oid, .. } => Some(*oid),
            StoreError::Io { oid, .. } => *oid,
            _ => None,
        }
    }

    /// True when this node's copy of the object is damaged (checksum or format): read
    /// another replica and repair this one.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            StoreError::Checksum { .. } | StoreError::Corrupt { .. }
        )
    }

    /// Maps an I/O error, turning ENOSPC/EDQUOT into [`StoreError::NoSpace`].
    pub(crate) fn io(op: &'static str, oid: Option<Oid>, source: io::Error) -> StoreError {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace,
            _ => StoreError::Io { op, oid, source },
        }
    }

    /// A closure for `map_err` that maps an I/O error on `oid`.
    pub(crate) fn on(op: &'static str, oid: Oid) -> impl FnOnce(io::Error) -> StoreError {
        move |source| StoreError::io(op, Some(oid), source)
    }

    /// A closure for `map_err` that maps an I/O error not tied to one object.
    pub(crate) fn at(op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
        move |source| StoreError::io(op, None, source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_maps_to_no_space() {
        let err = StoreError::io("pwrite", None, io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(err, StoreError::NoSpace));
        let err = StoreError::io("pwrite", None, io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(err, StoreError::Io { op: "pwrite", .. }));
    }

    #[test]
    fn messages_name_the_object() {
        let oid = Oid::data(1, 2);
        let msg = StoreError::Checksum { oid, block: 3 }.to_string();
        assert_eq!(msg, "checksum mismatch in object 0000000100000002 block 3");
        let io_err = StoreError::io("fdatasync", Some(oid), io::Error::other("boom"));
        assert!(io_err.to_string().contains("on object 0000000100000002"));
        assert_eq!(io_err.oid(), Some(oid));
    }
}

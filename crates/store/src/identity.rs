//! Persistent identity of a store (DESIGN.md §2): the node's UUID, created once, and the
//! cluster (UUID and format generation) the store belongs to, recorded at format time.
//!
//! Kept in `<dir>/identity.json`, written crash-safely (temp file, fsync, rename,
//! directory fsync) with a magic and version field:
//!
//! ```json
//! {"magic":"sheepdog-store-identity","version":1,
//!  "node_uuid":"…","cluster":{"cluster_uuid":"…","format_generation":1}}
//! ```

use crate::error::StoreError;
use crate::sys;
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use uuid::Uuid;

const IDENTITY_FILE: &str = "identity.json";
const IDENTITY_TEMP: &str = "identity.json.tmp";
const IDENTITY_MAGIC: &str = "sheepdog-store-identity";
const IDENTITY_VERSION: u32 = 1;

/// Largest identity file accepted (it is a few hundred bytes).
const IDENTITY_FILE_BYTES_MAX: u64 = 64 << 10;

/// Who this store is: its node and (once formatted) its cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreIdentity {
    /// The node's persistent UUID; placement hashes it, so it never changes.
    pub node_uuid: Uuid,
    /// The cluster this store belongs to; `None` until the cluster is formatted.
    pub cluster: Option<ClusterStamp>,
}

/// Names one format of one cluster.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterStamp {
    /// The cluster's UUID, chosen at `dog cluster format`.
    pub cluster_uuid: Uuid,
    /// Incremented each time the cluster is formatted again.
    pub format_generation: u64,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    magic: String,
    version: u32,
    node_uuid: Uuid,
    cluster: Option<ClusterStamp>,
}

/// Loads the identity in `dir`, or creates one with a new random node UUID (and no
/// cluster) on first use. `Corrupt` if the file exists but is not a valid identity.
pub fn load_or_create(dir: &Path) -> Result<StoreIdentity, StoreError> {
    // A temp file left by a crash mid-write is garbage: the rename never happened.
    let _ = fs::remove_file(dir.join(IDENTITY_TEMP));
    if let Some(identity) = load(dir)? {
        return Ok(identity);
    }
    let identity = StoreIdentity {
        node_uuid: Uuid::new_v4(),
        cluster: None,
    };
    store(dir, &identity)?;
    tracing::info!(node_uuid = %identity.node_uuid, dir = %dir.display(), "created node identity");
    Ok(identity)
}

/// Records that the store belongs to `stamp`'s cluster. Idempotent for the same stamp;
/// [`StoreError::IdentityMismatch`] if another cluster, or another format generation of
/// the same cluster, is already recorded (a store is never mixed into another cluster).
pub fn set_cluster(dir: &Path, stamp: ClusterStamp) -> Result<StoreIdentity, StoreError> {
    let mut identity = load_or_create(dir)?;
    match identity.cluster {
        Some(recorded) if recorded == stamp => Ok(identity),
        Some(recorded) => Err(StoreError::IdentityMismatch {
            recorded,
            requested: stamp,
        }),
        None => {
            identity.cluster = Some(stamp);
            store(dir, &identity)?;
            Ok(identity)
        }
    }
}

/// Loads the identity in `dir`; `Ok(None)` if there is none yet. Never creates one.
pub fn load(dir: &Path) -> Result<Option<StoreIdentity>, StoreError> {
    let path = dir.join(IDENTITY_FILE);
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.clone(),
        reason,
    };
    let bytes = match fs::File::open(&path) {
        Ok(file) => read_bounded(file).map_err(StoreError::at("read identity"))?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(StoreError::io("open identity", None, err)),
    };
    let Some(bytes) = bytes else {
        return Err(corrupt(format!(
            "larger than {IDENTITY_FILE_BYTES_MAX} bytes"
        )));
    };
    let file: IdentityFile = serde_json::from_slice(&bytes)
        .map_err(|err| corrupt(format!("not an identity file: {err}")))?;
    if file.magic != IDENTITY_MAGIC {
        return Err(corrupt(format!("bad magic {:?}", file.magic)));
    }
    if file.version != IDENTITY_VERSION {
        return Err(corrupt(format!(
            "unsupported identity version {}",
            file.version
        )));
    }
    Ok(Some(StoreIdentity {
        node_uuid: file.node_uuid,
        cluster: file.cluster,
    }))
}

/// Reads a whole file; `None` if it is larger than the bound.
fn read_bounded(file: fs::File) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.take(IDENTITY_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= IDENTITY_FILE_BYTES_MAX).then_some(bytes))
}

/// Replaces the identity file crash-safely.
fn store(dir: &Path, identity: &StoreIdentity) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(StoreError::at("create store directory"))?;
    let file = IdentityFile {
        magic: IDENTITY_MAGIC.to_owned(),
        version: IDENTITY_VERSION,
        node_uuid: identity.node_uuid,
        cluster: identity.cluster,
    };
    let mut bytes = serde_json::to_vec_pretty(&file)
        .map_err(|err| StoreError::io("encode identity", None, io::Error::other(err)))?;
    bytes.push(b'\n');
    let temp = TempFile(dir.join(IDENTITY_TEMP));
    let write_temp = || -> io::Result<()> {
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp.0)?;
        out.write_all(&bytes)?;
        out.sync_all()
    };
    write_temp().map_err(StoreError::at("write identity"))?;
    fs::rename(&temp.0, dir.join(IDENTITY_FILE)).map_err(StoreError::at("rename identity"))?;
    sys::fsync_dir(dir).map_err(StoreError::at("fsync store directory"))
}

/// Removes a temp file on drop (after a successful rename there is nothing to remove).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(generation: u64) -> ClusterStamp {
        ClusterStamp {
            cluster_uuid: Uuid::from_u128(42),
            format_generation: generation,
        }
    }

    #[test]
    fn node_uuid_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let first = load_or_create(dir.path()).unwrap();
        assert_eq!(first.cluster, None);
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
        assert!(!dir.path().join(IDENTITY_TEMP).exists());
    }

    #[test]
    fn set_cluster_records_once_and_refuses_another() {
        let dir = tempfile::tempdir().unwrap();
        let identity = set_cluster(dir.path(), stamp(1)).unwrap();
        assert_eq!(identity.cluster, Some(stamp(1)));
        assert_eq!(set_cluster(dir.path(), stamp(1)).unwrap(), identity);
        let err = set_cluster(dir.path(), stamp(2)).unwrap_err();
        assert!(
            matches!(err, StoreError::IdentityMismatch { recorded, .. } if recorded == stamp(1))
        );
        let other = ClusterStamp {
            cluster_uuid: Uuid::from_u128(7),
            format_generation: 1,
        };
        assert!(matches!(
            set_cluster(dir.path(), other),
            Err(StoreError::IdentityMismatch { .. })
        ));
        assert_eq!(load(dir.path()).unwrap(), Some(identity));
    }

    #[test]
    fn garbage_identity_is_corrupt_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        for content in [&b""[..], b"{not json", br#"{"magic":"x","version":1,"node_uuid":"00000000-0000-0000-0000-000000000001","cluster":null}"#] {
            fs::write(dir.path().join(IDENTITY_FILE), content).unwrap();
            assert!(matches!(load_or_create(dir.path()), Err(StoreError::Corrupt { .. })));
        }
        let future = br#"{"magic":"sheepdog-store-identity","version":9,"node_uuid":"00000000-0000-0000-0000-000000000001","cluster":null}"#;
        fs::write(dir.path().join(IDENTITY_FILE), future).unwrap();
        assert!(matches!(load(dir.path()), Err(StoreError::Corrupt { .. })));
    }
}

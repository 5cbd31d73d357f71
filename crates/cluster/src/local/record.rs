//! Record files of the `local` driver: JSON in an envelope with a magic, a format
//! version and the record's kind, written crash-safely (temp file, fsync, rename,
//! directory fsync) and checked when read back. A file that fails any check is
//! `Corrupt`, never a panic.

use crate::state::{LockTable, StaleTable, VdiRegistry};
use crate::{ClusterError, Membership};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// First field of every record file.
pub(crate) const MAGIC: &str = "sheepdog-rs/cluster-local";
/// Format version of the record files this code writes and reads.
pub(crate) const VERSION: u32 = 1;
/// Largest record file read; anything larger is corrupt.
pub(crate) const RECORD_BYTES_MAX: u64 = 64 << 20;

/// A value stored in a record file.
pub(crate) trait Record: Serialize + DeserializeOwned {
    /// Names the record in its envelope, so a file put in the wrong place is refused.
    const KIND: &'static str;
    /// The value's invariants, checked after every read.
    fn check(&self) -> Result<(), String>;
}

impl Record for Membership {
    const KIND: &'static str = "membership";
    fn check(&self) -> Result<(), String> {
        Membership::check(self)
    }
}

impl Record for VdiRegistry {
    const KIND: &'static str = "vdi-registry";
    fn check(&self) -> Result<(), String> {
        VdiRegistry::check(self)
    }
}

impl Record for LockTable {
    const KIND: &'static str = "vdi-locks";
    fn check(&self) -> Result<(), String> {
        LockTable::check(self)
    }
}

impl Record for StaleTable {
    const KIND: &'static str = "stale-replicas";
    fn check(&self) -> Result<(), String> {
        StaleTable::check(self)
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    magic: &'a str,
    version: u32,
    kind: &'a str,
    body: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    magic: String,
    version: u32,
    kind: String,
    body: serde_json::Value,
}

/// The bytes of a record file holding `value`.
pub(crate) fn encode<R: Record>(value: &R) -> Result<Vec<u8>, ClusterError> {
    let envelope = EnvelopeOut {
        magic: MAGIC,
        version: VERSION,
        kind: R::KIND,
        body: value,
    };
    let mut bytes = serde_json::to_vec_pretty(&envelope)
        .map_err(|e| ClusterError::io(format!("encode {} record", R::KIND), e.into()))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The value in a record file's bytes; `path` is only for the error.
pub(crate) fn decode<R: Record>(bytes: &[u8], path: &Path) -> Result<R, ClusterError> {
    let corrupt = |reason: String| ClusterError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let envelope: EnvelopeIn =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a record: {e}")))?;
    if envelope.magic != MAGIC {
        return Err(corrupt(format!("bad magic {:?}", envelope.magic)));
    }
    if envelope.version != VERSION {
        return Err(corrupt(format!("unsupported version {}", envelope.version)));
    }
    if envelope.kind != R::KIND {
        return Err(corrupt(format!(
            "a {:?} record, expected {:?}",
            envelope.kind,
            R::KIND
        )));
    }
    let value: R = serde_json::from_value(envelope.body)
        .map_err(|e| corrupt(format!("bad {} body: {e}", R::KIND)))?;
    value.check().map_err(corrupt)?;
    Ok(value)
}

/// Reads the record at `path`; `None` if there is no such file.
pub(crate) fn read<R: Record>(path: &Path) -> Result<Option<R>, ClusterError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ClusterError::io(format!("open {}", path.display()), e)),
    };
    let mut bytes = Vec::new();
    file.take(RECORD_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ClusterError::io(format!("read {}", path.display()), e))?;
    if bytes.len() as u64 > RECORD_BYTES_MAX {
        return Err(ClusterError::Corrupt {
            path: path.to_owned(),
            reason: format!("larger than {RECORD_BYTES_MAX} bytes"),
        });
    }
    decode(&bytes, path).map(Some)
}

/// Reads the record at `path`, which must exist.
pub(crate) fn read_required<R: Record>(path: &Path) -> Result<R, ClusterError> {
    read(path)?.ok_or_else(|| ClusterError::Corrupt {
        path: path.to_owned(),
        reason: "missing".into(),
    })
}

/// Replaces the record at `path` with `value`, durably: after a crash the file holds
/// either the old record or the new one, and once this returns it holds the new one.
pub(crate) fn write<R: Record>(path: &Path, value: &R) -> Result<(), ClusterError> {
    write_atomic(path, &encode(value)?)
}

/// Makes temp file names unique within the process; the pid makes them unique across.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes a temp file on an early return.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (dir, name.to_string_lossy()),
        _ => {
            return Err(ClusterError::io(
                format!("write {}", path.display()),
                io::ErrorKind::InvalidInput.into(),
            ))
        }
    };
    let counter = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!(".{name}.tmp.{}.{counter}", std::process::id()));
    let mut guard = TempGuard(Some(temp.clone()));
    let io_err = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |e| ClusterError::io(what, e)
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(io_err("create", &temp))?;
    file.write_all(bytes).map_err(io_err("write", &temp))?;
    file.sync_all().map_err(io_err("fsync", &temp))?;
    drop(file);
    fs::rename(&temp, path).map_err(io_err("rename to", path))?;
    guard.0 = None;
    sync_dir(dir)
}

/// Makes a directory's entries (a rename, a new file) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ClusterError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ClusterError::io(format!("fsync directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterConfig, ClusterStatus, NodeInfo};
    use uuid::Uuid;

    fn sample() -> Membership {
        Membership {
            epoch: 7,
            members: vec![NodeInfo {
                uuid: Uuid::from_u128(1),
                addr: "127.0.0.1:7000".into(),
                zone: 0,
                vnodes: 128,
                nbd_addr: Some("127.0.0.1:10809".into()),
            }],
            config: Some(ClusterConfig {
                cluster_uuid: Uuid::from_u128(99),
                format_generation: 1,
                copies: 3,
                object_size: 4 << 20,
                formatted_at_unix: 1_700_000_000,
            }),
            status: ClusterStatus::Running,
        }
    }

    fn corrupt_reason<R: Record + std::fmt::Debug>(bytes: &[u8]) -> String {
        match decode::<R>(bytes, Path::new("x")) {
            Err(ClusterError::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn record_round_trips() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(
            decode::<Membership>(&bytes, Path::new("x")).unwrap(),
            sample()
        );
    }

    #[test]
    fn truncated_record_is_corrupt() {
        let bytes = encode(&sample()).unwrap();
        corrupt_reason::<Membership>(&bytes[..bytes.len() / 2]);
        corrupt_reason::<Membership>(b"");
        corrupt_reason::<Membership>(&[0xff, 0x00, 0x13]);
    }

    #[test]
    fn wrong_magic_version_or_kind_is_corrupt() {
        let text = String::from_utf8(encode(&sample()).unwrap()).unwrap();
        let bad_magic = text.replace(MAGIC, "something-else");
        assert!(corrupt_reason::<Membership>(bad_magic.as_bytes()).contains("magic"));
        let bad_version = text.replace("\"version\": 1", "\"version\": 2");
        assert!(corrupt_reason::<Membership>(bad_version.as_bytes()).contains("version"));
        assert!(corrupt_reason::<VdiRegistry>(text.as_bytes()).contains("expected"));
    }

    #[test]
    fn membership_record_from_before_shutdown_existed_reads_as_running() {
        let text = String::from_utf8(encode(&sample()).unwrap()).unwrap();
        let status = "\"status\": {\n      \"state\": \"running\"\n    }";
        assert!(text.contains(status), "{text}");
        let old = text.replace(&format!(",\n    {status}"), "");
        assert!(!old.contains("status"), "{old}");
        let read = decode::<Membership>(old.as_bytes(), Path::new("x")).unwrap();
        assert_eq!(read, sample());
    }

    #[test]
    fn record_breaking_invariants_is_corrupt() {
        let mut unsorted = sample();
        let mut second = unsorted.members[0].clone();
        second.uuid = Uuid::from_u128(0);
        unsorted.members.push(second);
        let bytes = encode(&unsorted).unwrap();
        assert!(corrupt_reason::<Membership>(&bytes).contains("sorted"));
    }

    #[test]
    fn write_then_read_file_and_garbage_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("membership.json");
        assert_eq!(read::<Membership>(&path).unwrap(), None);
        write(&path, &sample()).unwrap();
        assert_eq!(read::<Membership>(&path).unwrap(), Some(sample()));
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        fs::write(&path, b"{\"magic\": \"sheepdog-rs/cluster-local\", \"vers").unwrap();
        assert!(matches!(
            read::<Membership>(&path),
            Err(ClusterError::Corrupt { .. })
        ));
    }
}

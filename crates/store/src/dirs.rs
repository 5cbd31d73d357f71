//! The store's directory layout (see the crate doc): paths, the directory lock, cleanup
//! of leftovers from an earlier run, and listing object files.

use crate::error::StoreError;
use crate::sys;
use proto::Oid;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The directories of one store.
pub(crate) struct StoreDirs {
    pub root: PathBuf,
    pub objects: PathBuf,
    pub tmp: PathBuf,
    pub quarantine: PathBuf,
    /// Fault-injection mode: removed files waiting for their removal to become durable.
    pub parked: PathBuf,
}

impl StoreDirs {
    /// Creates the layout under `root` (idempotent).
    pub fn create(root: PathBuf) -> Result<StoreDirs, StoreError> {
        let dirs = StoreDirs {
            objects: root.join("objects"),
            tmp: root.join("tmp"),
            quarantine: root.join("quarantine"),
            parked: root.join("fault-removed"),
            root,
        };
        for dir in [
            &dirs.root,
            &dirs.objects,
            &dirs.tmp,
            &dirs.quarantine,
            &dirs.parked,
        ] {
            fs::create_dir_all(dir).map_err(StoreError::at("create store directory"))?;
        }
        Ok(dirs)
    }

    /// Takes the store's exclusive lock, held as long as the returned file is open.
    pub fn lock(&self) -> Result<File, StoreError> {
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("lock"))
            .map_err(StoreError::at("open lock file"))?;
        match sys::try_lock_exclusive(&lock_file).map_err(StoreError::at("flock"))? {
            true => Ok(lock_file),
            false => Err(StoreError::Busy {
                dir: self.root.clone(),
            }),
        }
    }

    /// Deletes temp files of interrupted creates and parked files of a fault-mode run
    /// (a restart is not a power cut: those removals stand). Call with the lock held.
    pub fn clean_leftovers(&self) -> Result<(), StoreError> {
        empty_dir(&self.tmp).map_err(StoreError::at("clean temp files"))?;
        empty_dir(&self.parked).map_err(StoreError::at("clean parked files"))
    }

    pub fn object_path(&self, oid: Oid) -> PathBuf {
        self.objects.join(object_name(oid))
    }

    /// A unique temp path for creating `oid`.
    pub fn temp_path(&self, oid: Oid, seq: u64) -> PathBuf {
        let name = format!("{}.{}.{seq}.tmp", object_name(oid), std::process::id());
        self.tmp.join(name)
    }

    /// A unique path to park `oid`'s removed file at.
    pub fn parked_path(&self, oid: Oid, seq: u64) -> PathBuf {
        self.parked.join(format!("{}.{seq}", object_name(oid)))
    }

    /// Every object with a file, sorted; foreign names are skipped.
    pub fn list_objects(&self) -> Result<Vec<Oid>, StoreError> {
        let mut oids = Vec::new();
        for entry in fs::read_dir(&self.objects).map_err(StoreError::at("list objects"))? {
            let name = entry.map_err(StoreError::at("list objects"))?.file_name();
            match parse_object_name(&name) {
                Some(oid) => oids.push(oid),
                None => tracing::warn!(?name, "foreign file in objects directory"),
            }
        }
        oids.sort();
        Ok(oids)
    }

    /// Bytes allocated by object files (walks the directory).
    pub fn used_bytes(&self) -> u64 {
        let Ok(entries) = fs::read_dir(&self.objects) else {
            return 0;
        };
        entries
            .filter_map(|entry| entry.ok()?.metadata().ok())
            .map(|meta| meta.blocks() * 512)
            .sum()
    }
}

/// The file name of `oid`: 16 lowercase hex digits.
pub(crate) fn object_name(oid: Oid) -> String {
    format!("{:016x}", oid.raw())
}

/// Parses an object file name into a valid oid.
fn parse_object_name(name: &OsStr) -> Option<Oid> {
    let name = name.to_str()?;
    let hex = |b: u8| matches!(b, b'0'..=b'9' | b'a'..=b'f');
    if name.len() != 16 || !name.bytes().all(hex) {
        return None;
    }
    Oid::from_raw(u64::from_str_radix(name, 16).ok()?).ok()
}

/// Deletes everything in `dir`.
fn empty_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        tracing::info!(path = %path.display(), "removing leftover file");
        if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// A temp file deleted on drop unless disarmed, so an early return never leaves one.
pub(crate) struct TempPath {
    pub path: PathBuf,
    armed: bool,
}

impl TempPath {
    pub fn new(path: PathBuf) -> TempPath {
        TempPath { path, armed: true }
    }

    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_round_trip() {
        let oid = Oid::inode(0xabcdef);
        assert_eq!(parse_object_name(object_name(oid).as_ref()), Some(oid));
        assert_eq!(parse_object_name("0000000100000002.tmp".as_ref()), None);
        assert_eq!(parse_object_name("00000001000000AB".as_ref()), None);
        assert_eq!(
            parse_object_name("0000000000000005".as_ref()),
            None,
            "vid 0 is invalid"
        );
    }

    #[test]
    fn temp_path_is_removed_unless_disarmed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"").unwrap();
        fs::write(&b, b"").unwrap();
        drop(TempPath::new(a.clone()));
        TempPath::new(b.clone()).disarm();
        assert!(!a.exists() && b.exists());
    }
}

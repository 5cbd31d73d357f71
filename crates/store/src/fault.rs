//! Test-only simulation of power loss: an undo log of every change not yet durable.
//!
//! Changes go to the real files at once (so reads see them); before each one the store
//! records how to undo it: the pre-image of the bytes about to be overwritten or
//! punched, the creation of an object file, or the removal of one (the file is parked in
//! `fault-removed/`, not unlinked). A sync drops exactly what the real sync would have
//! made durable:
//!
//! - `fdatasync` of an object ([`FaultLog::file_synced`]): the pre-images recorded since
//!   the object's file was last created (its current contents);
//! - `fsync` of the objects directory ([`FaultLog::dir_synced`]): every create and
//!   remove, and with them the pre-images of files that are now durably gone;
//! - `syncfs` ([`FaultLog::all_synced`]): everything.
//!
//! [`FaultLog::power_cut`] applies what is left, newest first, which restores exactly the
//! durable state.
//!
//! One simplification: a created file's initial contents (written to the temp file
//! before the rename) count as durable as soon as its directory entry is, even without
//! an fdatasync. A real disk might instead lose or tear them; the store's crcs would
//! then report the damage. Changes made after the creation are tracked exactly.

use proto::Oid;
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How to undo one change to one object.
#[derive(Debug)]
enum Undo {
    /// Write these bytes back at this file offset.
    Restore { offset: u64, bytes: Vec<u8> },
    /// The object file was created: unlink it.
    Created,
    /// The object file was removed: move it back from where it is parked.
    Removed { parked: PathBuf },
}

impl Undo {
    fn is_dir_change(&self) -> bool {
        !matches!(self, Undo::Restore { .. })
    }
}

/// The undo log of a store in fault-injection mode, per object, oldest first.
#[derive(Debug, Default)]
pub(crate) struct FaultLog {
    objects: Mutex<HashMap<Oid, Vec<Undo>>>,
}

impl FaultLog {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<Oid, Vec<Undo>>) -> R) -> R {
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut objects)
    }

    fn push(&self, oid: Oid, undo: Undo) {
        self.with(|objects| objects.entry(oid).or_default().push(undo));
    }

    /// Records the pre-image of `bytes.len()` bytes at file offset `offset` of `oid`.
    pub fn record_restore(&self, oid: Oid, offset: u64, bytes: Vec<u8>) {
        self.push(oid, Undo::Restore { offset, bytes });
    }

    /// Records that `oid`'s file was created.
    pub fn record_created(&self, oid: Oid) {
        self.push(oid, Undo::Created);
    }

    /// Records that `oid`'s file was removed and parked at `parked`.
    pub fn record_removed(&self, oid: Oid, parked: PathBuf) {
        self.push(oid, Undo::Removed { parked });
    }

    /// `oid`'s file was fdatasync'ed: its current contents are durable.
    pub fn file_synced(&self, oid: Oid) {
        self.with(|objects| {
            if let Some(log) = objects.get_mut(&oid) {
                let keep = log
                    .iter()
                    .rposition(Undo::is_dir_change)
                    .map_or(0, |i| i + 1);
                log.truncate(keep);
                if log.is_empty() {
                    objects.remove(&oid);
                }
            }
        });
    }

    /// The objects directory was fsync'ed: every create and remove is durable.
    pub fn dir_synced(&self) {
        let committed: Vec<Undo> = self.with(|objects| {
            let mut committed = Vec::new();
            for log in objects.values_mut() {
                if let Some(last) = log.iter().rposition(Undo::is_dir_change) {
                    committed.extend(log.drain(..=last));
                }
            }
            objects.retain(|_, log| !log.is_empty());
            committed
        });
        discard(committed);
    }

    /// Everything is durable.
    pub fn all_synced(&self) {
        let all: Vec<Undo> = self.with(|objects| objects.drain().flat_map(|(_, l)| l).collect());
        discard(all);
    }

    /// Forgets the pending changes to `oid`'s current file, which was just moved out of
    /// the objects directory (quarantined): its contents are no longer served.
    pub fn forget(&self, oid: Oid) {
        let dropped = self.with(|objects| objects.remove(&oid).unwrap_or_default());
        discard(dropped);
    }

    /// Number of undo records pending (for tests and logs).
    pub fn pending(&self) -> usize {
        self.with(|objects| objects.values().map(Vec::len).sum())
    }

    /// Undoes every change that is not durable, newest first. The caller holds every
    /// object lock and drops its open file handles first.
    pub fn power_cut(&self, objects_dir: &Path) -> io::Result<()> {
        let objects: Vec<(Oid, Vec<Undo>)> = self.with(|objects| objects.drain().collect());
        let mut first_error = None;
        for (oid, log) in objects {
            let path = objects_dir.join(format!("{:016x}", oid.raw()));
            for undo in log.into_iter().rev() {
                if let Err(err) = apply(&path, undo) {
                    tracing::error!(%oid, error = %err, "power cut: cannot undo a change");
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn apply(path: &Path, undo: Undo) -> io::Result<()> {
    match undo {
        Undo::Restore { offset, bytes } => {
            let file = OpenOptions::new().write(true).open(path)?;
            file.write_all_at(&bytes, offset)
        }
        Undo::Created => fs::remove_file(path),
        Undo::Removed { parked } => fs::rename(parked, path),
    }
}

/// Drops committed undo records; a committed removal's parked file is really deleted.
fn discard(committed: Vec<Undo>) {
    for undo in committed {
        if let Undo::Removed { parked } = undo {
            if let Err(err) = fs::remove_file(&parked) {
                tracing::warn!(path = %parked.display(), error = %err, "cannot delete a parked file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(index: u32) -> Oid {
        Oid::data(1, index)
    }

    #[test]
    fn file_sync_keeps_pending_creation() {
        let log = FaultLog::default();
        log.record_created(oid(1));
        log.record_restore(oid(1), 0, vec![1]);
        log.file_synced(oid(1));
        assert_eq!(
            log.pending(),
            1,
            "the creation is not durable without a dir fsync"
        );
        log.dir_synced();
        assert_eq!(log.pending(), 0);
    }

    #[test]
    fn dir_sync_keeps_contents_written_after_the_last_create() {
        let log = FaultLog::default();
        log.record_restore(oid(1), 0, vec![1]);
        log.record_created(oid(2));
        log.record_restore(oid(2), 0, vec![2]);
        log.dir_synced();
        assert_eq!(log.pending(), 2);
        log.all_synced();
        assert_eq!(log.pending(), 0);
    }

    #[test]
    fn power_cut_restores_pre_images_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{:016x}", oid(1).raw()));
        fs::write(&path, b"abcd").unwrap();
        let log = FaultLog::default();
        log.record_restore(oid(1), 0, b"ab".to_vec());
        fs::write(&path, b"xycd").unwrap();
        log.record_restore(oid(1), 1, b"y".to_vec());
        fs::write(&path, b"xzcd").unwrap();
        log.power_cut(dir.path()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"abcd");
        assert_eq!(log.pending(), 0);
    }
}

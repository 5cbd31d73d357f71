//! Liveness of `local` nodes: a live node's handle holds an exclusive flock on
//! `nodes/<uuid>.alive` for as long as it lives. The kernel drops the lock when the
//! process dies, however it dies, so anyone who can take the lock knows the node is gone.
//!
//! The files are never removed: removing one while a restarting node opens it could
//! leave that node holding a lock on a file nobody else can find.

use super::flock;
use crate::ClusterError;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// How long `acquire` retries a held liveness lock. A prober holds it for microseconds;
/// a live process holds it for good.
const ACQUIRE_WAIT_MAX_MS: u64 = 2_000;

/// A node's liveness, held while this value lives.
#[derive(Debug)]
pub(crate) struct Liveness {
    uuid: Uuid,
    path: PathBuf,
    /// Holds the flock; closing it (drop) releases the liveness.
    file: File,
}

impl Liveness {
    /// Takes the liveness of node `uuid` from its file at `path`. Blocks the thread for
    /// up to [`ACQUIRE_WAIT_MAX_MS`]; `LivenessHeld` if another live handle has it.
    pub(crate) fn acquire(path: &Path, uuid: Uuid) -> Result<Liveness, ClusterError> {
        let io_err = |what: &str| {
            let what = format!("{what} liveness file {}", path.display());
            move |e| ClusterError::io(what, e)
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err("open"))?;
        let wait_max = Duration::from_millis(ACQUIRE_WAIT_MAX_MS);
        if !flock::lock_exclusive_within(&file, wait_max).map_err(io_err("lock"))? {
            return Err(ClusterError::LivenessHeld(uuid));
        }
        // The pid is for people (`dog local kill`, debugging); nothing reads it.
        file.set_len(0).map_err(io_err("truncate"))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err("write"))?;
        Ok(Liveness {
            uuid,
            path: path.to_owned(),
            file,
        })
    }

    /// The node this liveness belongs to.
    pub(crate) fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Whether the locked file is still the one at the path (not removed or replaced,
    /// in which case others would see the node as dead). A quick `fstat` and `stat`.
    pub(crate) fn still_held(&self) -> bool {
        match (self.file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(ours), Ok(at_path)) => (ours.dev(), ours.ino()) == (at_path.dev(), at_path.ino()),
            _ => false,
        }
    }
}

/// Whether the node whose liveness file is `path` is dead: nobody holds the lock, or
/// there is no file at all. Takes the lock for an instant if it is free.
pub(crate) fn is_dead(path: &Path) -> Result<bool, ClusterError> {
    let io_err = |what: &str| {
        let what = format!("{what} liveness file {}", path.display());
        move |e| ClusterError::io(what, e)
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(io_err("open")(e)),
    };
    if flock::try_lock_exclusive(&file).map_err(io_err("probe"))? {
        flock::unlock(&file).map_err(io_err("unlock"))?;
        return Ok(true);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_liveness_is_alive_and_dropped_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.alive");
        let uuid = Uuid::from_u128(5);
        assert!(is_dead(&path).unwrap(), "no file means dead");
        let live = Liveness::acquire(&path, uuid).unwrap();
        assert!(!is_dead(&path).unwrap());
        assert!(live.still_held());
        assert!(matches!(
            Liveness::acquire(&path, uuid),
            Err(ClusterError::LivenessHeld(u)) if u == uuid
        ));
        drop(live);
        assert!(is_dead(&path).unwrap());
        // A probe leaves the lock free for the restarted node.
        let again = Liveness::acquire(&path, uuid).unwrap();
        assert_eq!(again.uuid(), uuid);
    }

    #[test]
    fn removed_liveness_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.alive");
        let live = Liveness::acquire(&path, Uuid::from_u128(6)).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!live.still_held());
        std::fs::write(&path, b"impostor").unwrap();
        assert!(!live.still_held());
    }
}

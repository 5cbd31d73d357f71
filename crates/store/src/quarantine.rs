//! Quarantine of stale or corrupt copies, and the stale markers that go with it.
//!
//! Marking an object stale moves its file into `quarantine/` as
//! `<oid>.<nanos>.<seq>.stale` (or creates an empty marker of that name when there was
//! no file). Files are never deleted here. An object is stale while it has a `.stale`
//! marker and no file in `objects/`; recreating it (recovery) or removing it renames the
//! marker to `.kept`, which only keeps the old copy for inspection.

use proto::Oid;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const STALE_SUFFIX: &str = ".stale";
const KEPT_SUFFIX: &str = ".kept";

/// The stale objects of a store and their markers.
pub(crate) struct Quarantine {
    dir: PathBuf,
    marked: Mutex<HashMap<Oid, Vec<PathBuf>>>,
    seq: AtomicU64,
}

impl Quarantine {
    /// Loads the markers in `dir`. A marker whose object exists again in `objects_dir`
    /// (recreated before a crash let us rename the marker) is retired now.
    pub fn load(dir: &Path, objects_dir: &Path) -> io::Result<Quarantine> {
        let mut marked: HashMap<Oid, Vec<PathBuf>> = HashMap::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(oid) = stale_marker_oid(&path) else {
                continue;
            };
            if objects_dir.join(format!("{:016x}", oid.raw())).exists() {
                retire(&path);
            } else {
                marked.entry(oid).or_default().push(path);
            }
        }
        Ok(Quarantine {
            dir: dir.to_owned(),
            marked: Mutex::new(marked),
            seq: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Oid, Vec<PathBuf>>> {
        self.marked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh marker path for `oid`.
    pub fn marker_path(&self, oid: Oid) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{:016x}.{nanos}.{seq}{STALE_SUFFIX}", oid.raw()))
    }

    pub fn is_stale(&self, oid: Oid) -> bool {
        self.lock().contains_key(&oid)
    }

    pub fn insert(&self, oid: Oid, marker: PathBuf) {
        self.lock().entry(oid).or_default().push(marker);
    }

    /// Ends `oid`'s stale state (renaming its markers to `.kept`); true if it was stale.
    pub fn clear(&self, oid: Oid) -> bool {
        let markers = self.lock().remove(&oid);
        match markers {
            Some(markers) => {
                markers.iter().for_each(|path| retire(path));
                true
            }
            None => false,
        }
    }

    /// The stale objects, sorted.
    pub fn list(&self) -> Vec<Oid> {
        let mut oids: Vec<Oid> = self.lock().keys().copied().collect();
        oids.sort();
        oids
    }
}

/// The oid of a `.stale` marker path, if it is one.
fn stale_marker_oid(path: &Path) -> Option<Oid> {
    let name = path.file_name()?.to_str()?;
    if !name.ends_with(STALE_SUFFIX) {
        return None;
    }
    let hex = name.split('.').next()?;
    if hex.len() != 16 {
        return None;
    }
    Oid::from_raw(u64::from_str_radix(hex, 16).ok()?).ok()
}

/// Renames a `.stale` marker to `.kept`. A failure only leaves the object looking stale
/// after a restart (it is then recovered again), so it is logged, not returned.
fn retire(path: &Path) {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let kept = path.with_file_name(name.replace(STALE_SUFFIX, KEPT_SUFFIX));
    if let Err(err) = fs::rename(path, &kept) {
        tracing::warn!(path = %path.display(), error = %err, "cannot retire a stale marker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_survive_reload_and_clear_renames_them() {
        let root = tempfile::tempdir().unwrap();
        let (dir, objects) = (root.path().join("q"), root.path().join("o"));
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&objects).unwrap();
        let oid = Oid::data(3, 4);
        let quarantine = Quarantine::load(&dir, &objects).unwrap();
        let marker = quarantine.marker_path(oid);
        fs::write(&marker, b"").unwrap();
        fs::write(dir.join("junk.stale"), b"").unwrap();
        quarantine.insert(oid, marker);

        let reloaded = Quarantine::load(&dir, &objects).unwrap();
        assert_eq!(reloaded.list(), vec![oid]);
        assert!(reloaded.clear(oid));
        assert!(!reloaded.clear(oid));
        assert!(Quarantine::load(&dir, &objects).unwrap().list().is_empty());
    }
}

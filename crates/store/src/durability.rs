//! The bookkeeping behind the store's durability contract (see [`crate::ObjectStore`]):
//! which objects changed since the last sync, which creations and removals still need a
//! directory fsync, the sync counter, and in fault-injection mode the undo log that a
//! simulated power cut rolls back. Callers hold the object's exclusive lock.

use crate::error::StoreError;
use crate::fault::FaultLog;
use crate::object_file::ObjectFile;
use crate::sys;
use proto::Oid;
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLockWriteGuard};

/// Above this many changed objects, `sync_all` issues one `syncfs` instead of one
/// fdatasync per object.
pub(crate) const SYNC_FILES_MAX: usize = 32;

pub(crate) struct Durability {
    /// Objects changed without a sync since the last `sync_all`: named if it fails.
    dirty: Mutex<HashSet<Oid>>,
    /// Objects whose creation or removal awaits a directory fsync.
    dir_pending: Mutex<HashSet<Oid>>,
    syncs: AtomicU64,
    /// The open objects directory: fsync'ed for its entries, and the fd `syncfs` uses.
    objects_dir: File,
    /// Fault-injection mode: no real syncs, an undo log instead.
    fault: Option<FaultLog>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Durability {
    pub fn new(objects_dir: File, fault_injection: bool) -> Durability {
        Durability {
            dirty: Mutex::new(HashSet::new()),
            dir_pending: Mutex::new(HashSet::new()),
            syncs: AtomicU64::new(0),
            objects_dir,
            fault: fault_injection.then(FaultLog::default),
        }
    }

    /// Where overwrites record their pre-images (fault-injection mode only).
    pub fn undo_log(&self) -> Option<&FaultLog> {
        self.fault.as_ref()
    }

    /// Whether real syncs are issued (not in fault-injection mode).
    pub fn real_syncs(&self) -> bool {
        self.fault.is_none()
    }

    /// Completes a write or punch to `oid`'s `file`: records it as dirty, or makes it
    /// durable (fdatasync, then a directory fsync if the object's creation is pending).
    /// The object lock is released before a real fdatasync so readers do not wait on it.
    pub fn commit_change(
        &self,
        guard: RwLockWriteGuard<'_, ()>,
        oid: Oid,
        file: &ObjectFile,
        durable: bool,
    ) -> Result<(), StoreError> {
        if !durable {
            lock(&self.dirty).insert(oid);
            return Ok(());
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let creation_pending = lock(&self.dir_pending).contains(&oid);
        match &self.fault {
            Some(log) => log.file_synced(oid),
            None => {
                drop(guard);
                file.sync_data()?;
            }
        }
        if creation_pending {
            self.sync_dir(Some(oid))?;
        }
        Ok(())
    }

    /// Completes the creation of `oid` (its file was synced first if `durable`).
    pub fn commit_create(&self, oid: Oid, durable: bool) -> Result<(), StoreError> {
        if durable {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            return self.sync_dir(Some(oid));
        }
        lock(&self.dir_pending).insert(oid);
        lock(&self.dirty).insert(oid);
        if let Some(log) = &self.fault {
            log.record_created(oid);
        }
        Ok(())
    }

    /// Completes the removal of `oid`; in fault mode its file was parked at `parked`.
    pub fn commit_remove(
        &self,
        oid: Oid,
        parked: Option<PathBuf>,
        durable: bool,
    ) -> Result<(), StoreError> {
        lock(&self.dirty).remove(&oid);
        if let (Some(log), Some(parked)) = (&self.fault, parked) {
            log.record_removed(oid, parked);
        }
        if durable {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            return self.sync_dir(Some(oid));
        }
        lock(&self.dir_pending).insert(oid);
        Ok(())
    }

    /// Makes the move of `oid`'s file (or a marker) into `quarantine_dir` durable. The
    /// quarantined contents are never served again: their pending changes are forgotten.
    pub fn commit_quarantine(&self, oid: Oid, quarantine_dir: &Path) -> Result<(), StoreError> {
        lock(&self.dirty).remove(&oid);
        if self.real_syncs() {
            sys::fsync_dir(quarantine_dir).map_err(StoreError::on("fsync quarantine", oid))?;
        }
        self.sync_dir(Some(oid))?;
        if let Some(log) = &self.fault {
            log.forget(oid);
        }
        Ok(())
    }

    /// One fsync of the objects directory: every pending creation and removal is durable.
    fn sync_dir(&self, oid: Option<Oid>) -> Result<(), StoreError> {
        let taken = std::mem::take(&mut *lock(&self.dir_pending));
        if let Some(log) = &self.fault {
            log.dir_synced();
            return Ok(());
        }
        self.objects_dir.sync_all().map_err(|err| {
            lock(&self.dir_pending).extend(taken);
            StoreError::io("fsync objects directory", oid, err)
        })
    }

    /// Every change completed before the call is durable. A few changed objects are
    /// synced one by one (`sync_file`, an fdatasync each, then one directory fsync if a
    /// creation or removal is pending), so a FLUSH writes back only this store's changes
    /// and not every dirty page of a filesystem it may share with other stores or caches;
    /// more than [`SYNC_FILES_MAX`] take one `syncfs`.
    pub fn sync_all(
        &self,
        sync_file: impl Fn(Oid) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        let dir_pending = std::mem::take(&mut *lock(&self.dir_pending));
        if let Some(log) = &self.fault {
            log.all_synced();
            return Ok(());
        }
        let failed = |source: std::io::Error| {
            let mut oids: Vec<Oid> = dirty.union(&dir_pending).copied().collect();
            oids.sort();
            StoreError::SyncFailed { oids, source }
        };
        if dirty.len() > SYNC_FILES_MAX {
            return sys::syncfs(&self.objects_dir).map_err(failed);
        }
        for oid in &dirty {
            if let Err(e) = sync_file(*oid) {
                let source = match e {
                    StoreError::Io { source, .. } => source,
                    other => std::io::Error::other(other.to_string()),
                };
                return Err(failed(source));
            }
        }
        if !dir_pending.is_empty() {
            self.objects_dir.sync_all().map_err(failed)?;
        }
        Ok(())
    }

    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Rolls back every change not yet durable (fault mode; false otherwise). The caller
    /// holds every object lock and has dropped its open file handles.
    pub fn power_cut(&self, objects: &Path) -> bool {
        let Some(log) = &self.fault else {
            return false;
        };
        if let Err(err) = log.power_cut(objects) {
            tracing::error!(error = %err, "power cut simulation incomplete");
        }
        lock(&self.dirty).clear();
        lock(&self.dir_pending).clear();
        true
    }

    /// Changes a power cut would drop now (0 unless in fault mode).
    pub fn unsynced_changes(&self) -> usize {
        self.fault.as_ref().map_or(0, FaultLog::pending)
    }
}

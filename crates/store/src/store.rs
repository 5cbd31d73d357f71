//! [`ObjectStore`]: the per-node store of object replicas, its locking, syncing and
//! durability bookkeeping. The file format lives in `format.rs` and `object_file.rs`.

use crate::dirs::{StoreDirs, TempPath};
use crate::durability::Durability;
use crate::error::StoreError;
use crate::format::{Summed, BLOCK_SIZE};
use crate::handles::{HandleCache, LockStripes};
use crate::object_file::ObjectFile;
use crate::quarantine::Quarantine;
use crate::{sys, Stamp, StoreConfig};
use proto::Oid;
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Most object files kept open at once.
const OPEN_FILES_MAX: usize = 256;

/// The largest write [`ObjectStore::try_write_now`] does in place.
pub const WRITE_NOW_MAX: u64 = 64 * 1024;

/// The object store of one node: one directory, one sparse file per object.
///
/// Safe to share between threads (`Send + Sync`): calls on one object are serialised by
/// a striped per-object lock (reads share it), calls on different objects run in
/// parallel. Every call blocks on disk I/O; call it from `spawn_blocking`.
///
/// # To ensure correctness
///
/// When a call returns `Ok`:
/// - **Non-durable change** (`durable == false`): the change is in the page cache. Every
///   later read on this node sees it and it survives a crash of the process, but not a
///   power loss or kernel crash, until a sync covers it.
/// - **Durable `write` / `punch`**: this change and every earlier completed change to the
///   same object are on stable storage (`fdatasync` of the object's file, which holds its
///   header, crcs and data). If the object's creation was not yet durable, the objects
///   directory is fsync'ed too, so the object cannot vanish.
/// - **Durable `create_and_write` / `remove`**: the file's contents and the directory
///   entry (its creation or removal) are durable; the directory fsync also makes every
///   other pending creation and removal durable.
/// - **`sync_all`**: every change to any object that completed before the call
///   (creations and removals included) is durable (an fdatasync of each changed object
///   and a directory fsync, or one `syncfs` of the store's filesystem when many changed).
/// - **`mark_stale`** is always durable.
/// - A change that is not durable may, after a power loss, be lost or torn: a torn block
///   (data and crc not both on disk) then fails its checksum, and the stamp may be older.
///   Both are what read-repair and recovery handle.
/// - **A failed sync** (`Err` from a durable call or [`StoreError::SyncFailed`]) means
///   the changes concerned may be lost: mark those objects stale and recover them.
///   Retrying the sync until it "succeeds" hides the loss and is forbidden.
/// - The stored [`Stamp`] only grows: a write sets it to `max(stored, stamp)`, so a late
///   or replayed write never makes a copy look older than the newest write it applied.
///
/// [`ObjectStore::sync_count`] counts one sync per `sync_all` call and one per durable
/// `write`, `punch`, `create_and_write` or `remove` (the syncs a FLUSH is made of).
///
/// In fault-injection mode no real sync is issued; the store instead keeps an undo log of
/// every change not yet made durable (as the real syncs would have) and
/// [`ObjectStore::power_cut`] rolls it back.
pub struct ObjectStore {
    dirs: StoreDirs,
    object_size: u32,
    locks: LockStripes,
    handles: HandleCache,
    quarantine: Quarantine,
    durability: Durability,
    /// Makes temp and parked file names unique.
    seq: AtomicU64,
    /// Holds the directory's flock for as long as the store is open.
    _lock_file: File,
}

impl ObjectStore {
    /// Opens (creating if needed) the store in `cfg.dir`: creates the directory layout,
    /// takes the directory's lock ([`StoreError::Busy`] if another store holds it),
    /// deletes leftover temp files of interrupted creates, and loads the stale markers.
    pub fn open(cfg: StoreConfig) -> Result<ObjectStore, StoreError> {
        if cfg.object_size == 0 {
            return Err(StoreError::InvalidConfig("object size is 0".into()));
        }
        let dirs = StoreDirs::create(cfg.dir)?;
        let lock_file = dirs.lock()?;
        dirs.clean_leftovers()?;
        if !cfg.fault_injection {
            sys::fsync_dir(&dirs.root).map_err(StoreError::at("fsync store directory"))?;
        }
        let quarantine = Quarantine::load(&dirs.quarantine, &dirs.objects)
            .map_err(StoreError::at("load quarantine"))?;
        let objects_dir =
            File::open(&dirs.objects).map_err(StoreError::at("open objects directory"))?;
        Ok(ObjectStore {
            dirs,
            object_size: cfg.object_size,
            locks: LockStripes::new(),
            handles: HandleCache::new(OPEN_FILES_MAX),
            quarantine,
            durability: Durability::new(objects_dir, cfg.fault_injection),
            seq: AtomicU64::new(0),
            _lock_file: lock_file,
        })
    }

    /// The cluster's data object size this store was opened with.
    pub fn object_size(&self) -> u32 {
        self.object_size
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dirs.root
    }

    /// Reads `len` bytes at `offset`, checking the crc32c of every 4 KiB block touched.
    /// Unwritten ranges read as zeros. Errors: `NotFound`, `Stale`, `OutOfRange` (past
    /// `oid.capacity(object_size)`), `Checksum` (naming the block), `Corrupt`.
    pub fn read(&self, oid: Oid, offset: u64, len: u32) -> Result<Vec<u8>, StoreError> {
        self.check_range(oid, offset, len.into())?;
        let _guard = self.locks.read(oid);
        self.file(oid)?.read(offset, len.into())
    }

    /// Writes `data` at `offset` of an existing object (`NotFound` otherwise: never
    /// creates), updates the crcs of the blocks touched and raises the stored stamp to
    /// `max(stored, stamp)`. A partial edge block is read and checked first (`Checksum` if
    /// it was already bad). `durable`: see the type's doc.
    pub fn write<'a>(
        &self,
        oid: Oid,
        offset: u64,
        data: impl Into<Summed<'a>>,
        stamp: Stamp,
        durable: bool,
    ) -> Result<(), StoreError> {
        let data = data.into();
        self.check_range(oid, offset, data.data.len() as u64)?;
        let guard = self.locks.write(oid);
        let file = self.file(oid)?;
        self.apply_write(guard, oid, &file, offset, data, stamp, durable)
    }

    /// [`ObjectStore::write`], not durable, if it can be done without waiting: whole
    /// 4 KiB blocks (no edge block to read first), at most [`WRITE_NOW_MAX`] bytes, the
    /// object's file already open and its lock free. Then the data only lands in the page
    /// cache, so an async caller can apply it in place instead of paying a hand-off to a
    /// blocking thread. `None` when it would have to wait; nothing was done then, and the
    /// caller runs `write` on a blocking thread.
    pub fn try_write_now<'a>(
        &self,
        oid: Oid,
        offset: u64,
        data: impl Into<Summed<'a>>,
        stamp: Stamp,
    ) -> Option<Result<(), StoreError>> {
        let data = data.into();
        let len = data.data.len() as u64;
        if len > WRITE_NOW_MAX || offset % BLOCK_SIZE != 0 || len % BLOCK_SIZE != 0 {
            return None;
        }
        if let Err(e) = self.check_range(oid, offset, len) {
            return Some(Err(e));
        }
        let guard = self.locks.try_write(oid)?;
        let file = self.handles.get(oid)?;
        Some(self.apply_write(guard, oid, &file, offset, data, stamp, false))
    }

    /// The body of a write to `oid`'s open `file`, under its exclusive lock `guard`:
    /// data and crcs, the stamp raised, then recorded as dirty or made durable.
    #[allow(clippy::too_many_arguments)]
    fn apply_write(
        &self,
        guard: std::sync::RwLockWriteGuard<'_, ()>,
        oid: Oid,
        file: &ObjectFile,
        offset: u64,
        data: Summed<'_>,
        stamp: Stamp,
        durable: bool,
    ) -> Result<(), StoreError> {
        let undo = self.durability.undo_log();
        file.write(offset, data, undo)?;
        file.raise_stamp(stamp, undo)?;
        self.durability.commit_change(guard, oid, file, durable)
    }

    /// Creates `oid` with `data` at `offset` (zeros elsewhere) and the given stamp,
    /// atomically: the object appears whole or not at all. `Exists` if it is present.
    /// Recreating a stale object (recovery) ends its stale state.
    pub fn create_and_write<'a>(
        &self,
        oid: Oid,
        offset: u64,
        data: impl Into<Summed<'a>>,
        stamp: Stamp,
        durable: bool,
    ) -> Result<(), StoreError> {
        let data = data.into();
        self.check_range(oid, offset, data.data.len() as u64)?;
        let _guard = self.locks.write(oid);
        if self.file_exists(oid)? {
            return Err(StoreError::Exists(oid));
        }
        let temp = TempPath::new(self.dirs.temp_path(oid, self.next_seq()));
        let mut file = ObjectFile::create_new(&temp.path, oid, self.capacity(oid), stamp)
            .map_err(StoreError::on("create", oid))?;
        file.write(offset, data, None)?;
        if durable && self.durability.real_syncs() {
            file.sync_data()?;
        }
        let path = self.dirs.object_path(oid);
        sys::rename_noreplace(&temp.path, &path).map_err(|err| match err.kind() {
            io::ErrorKind::AlreadyExists => StoreError::Exists(oid),
            _ => StoreError::io("rename", Some(oid), err),
        })?;
        temp.disarm();
        file.set_path(path);
        self.quarantine.clear(oid);
        self.handles.insert(oid, Arc::new(file));
        self.durability.commit_create(oid, durable)
    }

    /// Makes `len` bytes at `offset` read as zeros (whole blocks are deallocated), updates
    /// the crcs and raises the stamp, as [`ObjectStore::write`] does.
    pub fn punch(
        &self,
        oid: Oid,
        offset: u64,
        len: u64,
        stamp: Stamp,
        durable: bool,
    ) -> Result<(), StoreError> {
        self.check_range(oid, offset, len)?;
        let guard = self.locks.write(oid);
        let file = self.file(oid)?;
        let undo = self.durability.undo_log();
        file.punch(offset, len, undo)?;
        file.raise_stamp(stamp, undo)?;
        self.durability.commit_change(guard, oid, &file, durable)
    }

    /// Deletes `oid`. Removing a stale object ends its stale state (its quarantined copy
    /// is kept). `NotFound` if the object is neither present nor stale.
    pub fn remove(&self, oid: Oid, durable: bool) -> Result<(), StoreError> {
        let _guard = self.locks.write(oid);
        if !self.file_exists(oid)? {
            return match self.quarantine.clear(oid) {
                true => Ok(()),
                false => Err(StoreError::NotFound(oid)),
            };
        }
        self.handles.remove(oid);
        let path = self.dirs.object_path(oid);
        let parked = if self.durability.real_syncs() {
            fs::remove_file(&path).map_err(StoreError::on("unlink", oid))?;
            None
        } else {
            // Parked, not unlinked, until the removal is durable: a power cut brings it back.
            let parked = self.dirs.parked_path(oid, self.next_seq());
            fs::rename(&path, &parked).map_err(StoreError::on("rename", oid))?;
            Some(parked)
        };
        self.durability.commit_remove(oid, parked, durable)
    }

    /// The stamp of the newest write applied to `oid`.
    pub fn stamp(&self, oid: Oid) -> Result<Stamp, StoreError> {
        let _guard = self.locks.read(oid);
        Ok(self.file(oid)?.stamp())
    }

    /// Whether this node has a (not stale) file for `oid`. A present but corrupt file
    /// counts: reading it then reports the corruption.
    pub fn contains(&self, oid: Oid) -> bool {
        let _guard = self.locks.read(oid);
        self.file_exists(oid).unwrap_or(false)
    }

    /// Every object with a file in the store, sorted. Stale objects are not listed (see
    /// [`ObjectStore::list_stale`]); files with foreign names are skipped.
    pub fn list(&self) -> Result<Vec<Oid>, StoreError> {
        self.dirs.list_objects()
    }

    /// Quarantines `oid`: its file (if any) is moved aside, never deleted, and the object
    /// reads as [`StoreError::Stale`] until it is recreated by `create_and_write`
    /// (recovery) or removed. With no file, a marker alone is recorded. Idempotent, and
    /// durable when it returns.
    pub fn mark_stale(&self, oid: Oid) -> Result<(), StoreError> {
        let _guard = self.locks.write(oid);
        let exists = self.file_exists(oid)?;
        if !exists && self.quarantine.is_stale(oid) {
            return Ok(());
        }
        self.handles.remove(oid);
        let marker = self.quarantine.marker_path(oid);
        if exists {
            fs::rename(self.dirs.object_path(oid), &marker)
                .map_err(StoreError::on("quarantine", oid))?;
        } else {
            File::create_new(&marker).map_err(StoreError::on("create stale marker", oid))?;
        }
        self.quarantine.insert(oid, marker);
        self.durability
            .commit_quarantine(oid, &self.dirs.quarantine)?;
        tracing::info!(%oid, had_file = exists, "object marked stale");
        Ok(())
    }

    /// Whether `oid` is marked stale on this node.
    pub fn is_stale(&self, oid: Oid) -> bool {
        self.quarantine.is_stale(oid)
    }

    /// The objects marked stale, sorted: they must be recovered (or removed).
    pub fn list_stale(&self) -> Vec<Oid> {
        self.quarantine.list()
    }

    /// Makes every change completed before this call durable (see the type's doc). On
    /// failure, [`StoreError::SyncFailed`] names the objects changed since the previous
    /// `sync_all`: their data may be lost.
    pub fn sync_all(&self) -> Result<(), StoreError> {
        self.durability.sync_all(|oid| self.sync_object(oid))
    }

    /// fdatasync of `oid`'s current file. A removed object needs none (its removal is
    /// made durable by the directory fsync that follows).
    fn sync_object(&self, oid: Oid) -> Result<(), StoreError> {
        if let Some(file) = self.handles.get(oid) {
            return file.sync_data();
        }
        match File::open(self.dirs.object_path(oid)) {
            Ok(file) => file.sync_data().map_err(StoreError::on("fdatasync", oid)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(StoreError::io("open", Some(oid), err)),
        }
    }

    /// Number of syncs performed: one per `sync_all` and one per durable change.
    pub fn sync_count(&self) -> u64 {
        self.durability.sync_count()
    }

    /// Fault-injection mode only (a logged no-op otherwise): simulates a power loss by
    /// dropping every write, punch, create and remove not yet made durable. Afterwards the
    /// store holds exactly its durable state. Waits for calls in progress.
    pub fn power_cut(&self) {
        let _all = self.locks.write_all();
        self.handles.clear();
        if !self.durability.power_cut(&self.dirs.objects) {
            tracing::warn!("power_cut ignored: fault injection is off");
        }
    }

    /// Fault-injection mode only: the number of changes a power cut would drop now (0 in
    /// normal mode). Lets tests check there is something to lose before cutting.
    pub fn unsynced_changes(&self) -> usize {
        self.durability.unsynced_changes()
    }

    /// Approximate bytes allocated by object files (walks the objects directory).
    pub fn used_bytes(&self) -> u64 {
        self.dirs.used_bytes()
    }

    fn capacity(&self, oid: Oid) -> u64 {
        oid.capacity(self.object_size)
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn check_range(&self, oid: Oid, offset: u64, len: u64) -> Result<(), StoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity(oid) => Ok(()),
            _ => Err(StoreError::OutOfRange { oid, offset, len }),
        }
    }

    /// The open file of `oid`. The caller holds `oid`'s lock.
    fn file(&self, oid: Oid) -> Result<Arc<ObjectFile>, StoreError> {
        if let Some(file) = self.handles.get(oid) {
            return Ok(file);
        }
        if self.quarantine.is_stale(oid) {
            return Err(StoreError::Stale(oid));
        }
        match ObjectFile::open(&self.dirs.object_path(oid), oid, self.capacity(oid))? {
            Some(file) => {
                let file = Arc::new(file);
                self.handles.insert(oid, Arc::clone(&file));
                Ok(file)
            }
            None => Err(StoreError::NotFound(oid)),
        }
    }

    /// Whether `oid` has a file. The caller holds `oid`'s lock.
    fn file_exists(&self, oid: Oid) -> Result<bool, StoreError> {
        if self.handles.contains(oid) {
            return Ok(true);
        }
        match fs::symlink_metadata(self.dirs.object_path(oid)) {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(StoreError::io("stat", Some(oid), err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ObjectStore>();
    }
}

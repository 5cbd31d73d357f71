//! Per-object locking (a fixed array of striped reader-writer locks) and a bounded LRU
//! cache of open object files, so the data path does not reopen a file on every call.

use crate::object_file::ObjectFile;
use proto::Oid;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Number of lock stripes. Two objects share a stripe with probability 1/1024; sharing
/// only serialises them, it is never incorrect.
const LOCK_STRIPES: usize = 1024;

/// Reads of an object share its stripe; every change to it holds the stripe exclusively.
pub(crate) struct LockStripes {
    stripes: Box<[RwLock<()>]>,
}

impl LockStripes {
    pub fn new() -> LockStripes {
        LockStripes {
            stripes: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }

    fn stripe(&self, oid: Oid) -> &RwLock<()> {
        // Fibonacci hashing: consecutive object indexes land on different stripes.
        let hash = oid.raw().wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.stripes[(hash >> 54) as usize % LOCK_STRIPES]
    }

    /// Shared lock on `oid`'s stripe. Poisoning is ignored: the lock guards no data.
    pub fn read(&self, oid: Oid) -> RwLockReadGuard<'_, ()> {
        self.stripe(oid).read().unwrap_or_else(|e| e.into_inner())
    }

    /// Exclusive lock on `oid`'s stripe.
    pub fn write(&self, oid: Oid) -> RwLockWriteGuard<'_, ()> {
        self.stripe(oid).write().unwrap_or_else(|e| e.into_inner())
    }

    /// Exclusive lock on `oid`'s stripe if it is free now; `None` if someone holds it.
    pub fn try_write(&self, oid: Oid) -> Option<RwLockWriteGuard<'_, ()>> {
        match self.stripe(oid).try_write() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Every stripe exclusively, in a fixed order (so two callers cannot deadlock).
    pub fn write_all(&self) -> Vec<RwLockWriteGuard<'_, ()>> {
        self.stripes
            .iter()
            .map(|s| s.write().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

/// Open object files, at most `capacity_max` of them, least recently used evicted first.
///
/// An entry is inserted and removed only under its object's stripe lock, so a cached
/// handle always refers to the file currently at the object's path.
pub(crate) struct HandleCache {
    inner: Mutex<CacheInner>,
    capacity_max: usize,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<Oid, (Arc<ObjectFile>, u64)>,
    clock: u64,
}

impl HandleCache {
    pub fn new(capacity_max: usize) -> HandleCache {
        assert!(capacity_max > 0);
        HandleCache {
            inner: Mutex::new(CacheInner::default()),
            capacity_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, oid: Oid) -> Option<Arc<ObjectFile>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        inner.entries.get_mut(&oid).map(|(file, used)| {
            *used = now;
            Arc::clone(file)
        })
    }

    pub fn contains(&self, oid: Oid) -> bool {
        self.lock().entries.contains_key(&oid)
    }

    pub fn insert(&self, oid: Oid, file: Arc<ObjectFile>) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if inner.entries.len() >= self.capacity_max && !inner.entries.contains_key(&oid) {
            let oldest = inner.entries.iter().min_by_key(|(_, (_, used))| *used);
            if let Some(oldest) = oldest.map(|(oid, _)| *oid) {
                inner.entries.remove(&oldest);
            }
        }
        inner.entries.insert(oid, (file, now));
        debug_assert!(inner.entries.len() <= self.capacity_max);
    }

    pub fn remove(&self, oid: Oid) {
        self.lock().entries.remove(&oid);
    }

    pub fn clear(&self) {
        self.lock().entries.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stamp;

    #[test]
    fn cache_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HandleCache::new(2);
        let open = |index: u32| {
            let oid = Oid::data(1, index);
            let path = dir.path().join(index.to_string());
            Arc::new(ObjectFile::create_new(&path, oid, 4096, Stamp::default()).unwrap())
        };
        let (a, b, c) = (Oid::data(1, 1), Oid::data(1, 2), Oid::data(1, 3));
        cache.insert(a, open(1));
        cache.insert(b, open(2));
        assert!(cache.get(a).is_some());
        cache.insert(c, open(3));
        assert_eq!(cache.len(), 2);
        assert!(cache.contains(a) && cache.contains(c) && !cache.contains(b));
    }

    #[test]
    fn stripes_spread_consecutive_objects() {
        let locks = LockStripes::new();
        let _a = locks.write(Oid::data(1, 0));
        // A different object on another stripe does not block.
        let distinct = (1..64).filter(|i| {
            let s1: *const _ = locks.stripe(Oid::data(1, 0));
            let s2: *const _ = locks.stripe(Oid::data(1, *i));
            s1 != s2
        });
        assert_eq!(distinct.count(), 63);
    }
}

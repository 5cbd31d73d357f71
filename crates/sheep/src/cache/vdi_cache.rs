//! The write-back cache of one VDI on this gateway (DESIGN.md §6). Writes land in local
//! files and are acknowledged; a pusher sends dirty blocks to the replicas as unstable
//! writes; FLUSH pushes what it covers, syncs each node that received pushes once, and
//! only then marks those blocks clean.

use super::bitmap::CACHE_BLOCK;
use super::meta::{blocks_of, MetaFile, ObjectState};
use super::object::{block_span, CachedObject, PushRun};
use super::CacheConfig;
use crate::gateway::{self, VdiState};
use crate::node::Node;
use futures::future::join_all;
use proto::inode::split_range;
use proto::msg::CacheInfo;
use proto::{ErrorCode, PeerError, Vid};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long pushed data may wait for a sync when the client does not flush.
const BACKGROUND_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// How long the pusher lets writes gather before it pushes, when not pressed.
const PUSH_GATHER: Duration = Duration::from_millis(2);
/// A flush covering at most this many objects pushes them as durable writes.
const DURABLE_PUSH_OBJECTS_MAX: usize = 4;
/// Writes smaller than this always go into the cache (see `goes_around`).
const WRITE_AROUND_MIN: u64 = 128 << 10;
/// Stripes (by object index) of the count of writes that went around the cache, which
/// a fill compares before and after it reads from the replicas.
const AROUND_STRIPES: usize = 64;
/// Pause between attempts while a flush or push waits for enough replicas.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

fn io_error(what: &str, e: std::io::Error) -> PeerError {
    PeerError::new(ErrorCode::Io, format!("cache {what}: {e}"))
}

/// The blocks a flush covers in one object: (block, write sequence when the flush began).
type Covered = (Arc<CachedObject>, Vec<(usize, u64)>);

/// Counters shown by `dog vdi cache info`.
#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    pushes: AtomicU64,
    pushed_bytes: AtomicU64,
    pushes_in_flight: AtomicU64,
    push_failures: AtomicU64,
    backpressure_waits: AtomicU64,
    written_around: AtomicU64,
    written_around_bytes: AtomicU64,
    evictions: AtomicU64,
    flushes: AtomicU64,
    last_flush_unix: AtomicU64,
}

pub struct VdiCache {
    pub vid: Vid,
    pub dir: PathBuf,
    object_size: u32,
    cfg: Arc<CacheConfig>,
    meta: Mutex<MetaFile>,
    objects: Mutex<HashMap<u32, Arc<CachedObject>>>,
    dirty_blocks: AtomicU64,
    /// Dirty blocks whose current content was pushed (in some epoch) but not yet synced:
    /// they wait only for a sync (or, after an epoch change, a push again).
    pushed_blocks: AtomicU64,
    valid_blocks: AtomicU64,
    tick: AtomicU64,
    stats: Stats,
    /// Wakes the pusher.
    push_wake: Notify,
    /// Signalled when dirty blocks become clean (backpressure waiters).
    room: Notify,
    flush_order: tokio::sync::Mutex<()>,
    /// Set after the client's first FLUSH: until then writes are written through.
    seen_flush: AtomicBool,
    pusher_running: AtomicBool,
    /// A background sync started by the pusher is running.
    syncing: AtomicBool,
    /// Writes that went around the cache, per stripe of object indices (see `fill`).
    around: [AtomicU64; AROUND_STRIPES],
    /// Recent sequential streams of large writes (see `goes_around`).
    streams: Mutex<Streams>,
}

/// Sequential streams being written, found by where large writes start.
#[derive(Default)]
struct Streams {
    /// (end of the stream, bytes written in it, last use), at most [`STREAMS_MAX`].
    slots: Vec<(u64, u64, u64)>,
    tick: u64,
}

/// Streams tracked at once per VDI (the least recently used one is replaced).
const STREAMS_MAX: usize = 8;
/// How far from a stream's end a write may start and still continue it: requests in
/// flight together may be served slightly out of order.
const STREAM_SLACK: u64 = 8 << 20;

impl Streams {
    /// Records a write; returns the bytes written so far by the stream it continues.
    fn note(&mut self, offset: u64, len: u64) -> u64 {
        self.tick += 1;
        let end = offset + len;
        let near = |e: u64| offset <= e.saturating_add(STREAM_SLACK) && offset + STREAM_SLACK >= e;
        if let Some(s) = self.slots.iter_mut().find(|s| near(s.0)) {
            s.0 = s.0.max(end);
            s.1 = s.1.saturating_add(len);
            s.2 = self.tick;
            return s.1;
        }
        let new = (end, len, self.tick);
        if self.slots.len() < STREAMS_MAX {
            self.slots.push(new);
        } else if let Some(lru) = self.slots.iter_mut().min_by_key(|s| s.2) {
            *lru = new;
        }
        len
    }
}

impl VdiCache {
    /// Opens (or creates) the cache of a VDI in `dir`. Objects whose data file is missing
    /// or of the wrong size are dropped (their content is not trusted, never pushed).
    pub fn open(
        cfg: Arc<CacheConfig>,
        dir: PathBuf,
        vid: Vid,
        object_size: u32,
        fence: u64,
    ) -> Result<VdiCache, PeerError> {
        let meta = match MetaFile::open(&dir) {
            Ok(m) if m.header.vid == vid && m.header.object_size == object_size => m,
            Ok(_) | Err(_) if !dir.join("meta").exists() => MetaFile::create(
                &dir,
                super::meta::MetaHeader {
                    vid,
                    object_size,
                    fence,
                },
            )
            .map_err(|e| PeerError::new(ErrorCode::Io, e.to_string()))?,
            other => {
                let why = match other {
                    Ok(_) => "belongs to another VDI or object size".to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(PeerError::new(
                    ErrorCode::Io,
                    format!("cache {} unusable: {why}", dir.display()),
                ));
            }
        };
        let blocks = blocks_of(object_size);
        let mut objects = HashMap::new();
        let (mut dirty, mut valid) = (0u64, 0u64);
        for (index, st) in meta.load_all().map_err(|e| io_error("load", e))? {
            let path = dir.join(format!("obj-{index:08x}"));
            let ok_len = std::fs::metadata(&path)
                .map(|m| m.len() == object_size as u64)
                .unwrap_or(false);
            if !ok_len || st.valid.len() != blocks {
                if st.dirty.any() {
                    tracing::error!(vid, index, path = %path.display(), "cache file missing or truncated: its unflushed data is lost and will not be pushed");
                }
                let _ = std::fs::remove_file(&path);
                let _ = meta.store(index, &ObjectState::new(blocks));
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_error("open", e))?;
            dirty += st.dirty.count() as u64;
            valid += st.valid.count() as u64;
            objects.insert(index, Arc::new(CachedObject::new(index, file, st, 0)));
        }
        if dirty > 0 {
            tracing::warn!(
                vid,
                dirty_bytes = dirty * CACHE_BLOCK,
                "cache holds unflushed data from before the restart; pushing it"
            );
        }
        Ok(VdiCache {
            vid,
            dir,
            object_size,
            cfg,
            meta: Mutex::new(meta),
            objects: Mutex::new(objects),
            dirty_blocks: AtomicU64::new(dirty),
            pushed_blocks: AtomicU64::new(0),
            valid_blocks: AtomicU64::new(valid),
            tick: AtomicU64::new(1),
            stats: Stats::default(),
            push_wake: Notify::new(),
            room: Notify::new(),
            flush_order: tokio::sync::Mutex::new(()),
            seen_flush: AtomicBool::new(false),
            pusher_running: AtomicBool::new(false),
            syncing: AtomicBool::new(false),
            around: std::array::from_fn(|_| AtomicU64::new(0)),
            streams: Mutex::new(Streams::default()),
        })
    }

    pub fn fence(&self) -> u64 {
        self.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .header
            .fence
    }

    /// Records the lock generation new dirty data is written under.
    pub fn set_fence(&self, fence: u64) -> Result<(), PeerError> {
        let mut m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        if m.header.fence != fence {
            m.set_fence(&self.dir, fence)
                .map_err(|e| PeerError::new(ErrorCode::Io, e.to_string()))?;
        }
        Ok(())
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_blocks.load(Ordering::Acquire) * CACHE_BLOCK
    }

    /// Dirty bytes not yet pushed: what a flush would still have to send.
    pub fn unpushed_bytes(&self) -> u64 {
        let dirty = self.dirty_blocks.load(Ordering::Acquire);
        let pushed = self.pushed_blocks.load(Ordering::Acquire);
        dirty.saturating_sub(pushed) * CACHE_BLOCK
    }

    /// The bound on all dirty data, pushed or not: the cache size (dirty data is never
    /// evicted). Pushed data only waits for a sync to turn clean, and the pusher starts
    /// one at half this bound, so it binds only when syncs fall behind.
    fn dirty_cap(&self) -> u64 {
        self.cfg.size.max(self.cfg.dirty_max)
    }

    pub fn has_dirty(&self) -> bool {
        self.dirty_blocks.load(Ordering::Acquire) > 0
    }

    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed)
    }

    fn object(&self, index: u32) -> Option<Arc<CachedObject>> {
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&index)
            .cloned()
    }

    fn object_or_create(&self, index: u32) -> Result<Arc<CachedObject>, PeerError> {
        let mut objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = objects.get(&index) {
            return Ok(o.clone());
        }
        let path = self.dir.join(format!("obj-{index:08x}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error("create", e))?;
        file.set_len(self.object_size as u64)
            .map_err(|e| io_error("size", e))?;
        let o = Arc::new(CachedObject::new(
            index,
            file,
            ObjectState::new(blocks_of(self.object_size)),
            self.next_tick(),
        ));
        objects.insert(index, o.clone());
        Ok(o)
    }

    fn persist(&self, o: &CachedObject, st: &ObjectState) -> Result<(), PeerError> {
        self.meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .store(o.index, st)
            .map_err(|e| io_error("meta", e))
    }

    /// A new writer session (the lock was taken anew): writethrough-until-first-flush
    /// starts over.
    pub fn new_session(&self) {
        self.seen_flush.store(false, Ordering::Release);
    }

    /// Whether writes are still written through (before the client's first flush).
    pub fn writes_through(&self, until_flush: bool) -> bool {
        until_flush && !self.seen_flush.load(Ordering::Acquire)
    }

    /// Whether `bytes` more dirty data would pass the unpushed limit or the dirty cap.
    fn over_limit(&self, bytes: u64) -> bool {
        self.unpushed_bytes() + bytes > self.cfg.dirty_max
            || self.dirty_bytes() + bytes > self.dirty_cap()
    }

    /// Whether a large write of whole blocks goes around the cache: when it continues a
    /// sequential stream already past the cutoff (the cache is for bursts and random
    /// writes; a long stream costs a replicated write either way, and through the cache
    /// also a copy in, a push and a copy out), or when dirty data is at its limit.
    fn goes_around(&self, offset: u64, len: u64) -> bool {
        if len < WRITE_AROUND_MIN
            || !offset.is_multiple_of(CACHE_BLOCK)
            || !len.is_multiple_of(CACHE_BLOCK)
        {
            return false;
        }
        let sequential = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(offset, len);
        let cutoff = self.cfg.sequential_cutoff;
        (cutoff > 0 && sequential >= cutoff) || self.over_limit(len)
    }

    /// Waits while unpushed data is at its limit, or all dirty data at its cap
    /// (backpressure), at most the flush timeout.
    async fn make_room(&self, bytes: u64) -> Result<(), PeerError> {
        let deadline = Instant::now() + self.cfg.flush_timeout;
        let mut waited = false;
        while self.over_limit(bytes) {
            if !waited {
                self.stats
                    .backpressure_waits
                    .fetch_add(1, Ordering::Relaxed);
                waited = true;
            }
            self.push_wake.notify_one();
            let now = Instant::now();
            if now >= deadline {
                return Err(PeerError::new(
                    ErrorCode::Io,
                    format!("cache of vid {:#x}: dirty data at its limit and not draining (replicas unreachable?)", self.vid),
                ));
            }
            let _ = tokio::time::timeout(
                (deadline - now).min(Duration::from_millis(100)),
                self.room.notified(),
            )
            .await;
        }
        Ok(())
    }

    /// Writes into the cache. `through`: also write durably to the replicas before
    /// returning, leaving the blocks clean (writethrough until the first flush). A large
    /// write of whole blocks in a long sequential stream, or while dirty data is at its
    /// limit, goes around the cache instead (see [`VdiCache::write_around`]).
    pub async fn write(
        &self,
        node: &Node,
        vdi: &VdiState,
        offset: u64,
        data: &bytes::Bytes,
        through: bool,
    ) -> Result<(), PeerError> {
        let len = data.len() as u64;
        if through {
            gateway::write(node, vdi, offset, data, true).await?;
        } else if self.goes_around(offset, len) {
            return self.write_around(node, vdi, offset, data).await;
        } else {
            self.make_room(len).await?;
        }
        self.store_local(offset, data, through)
    }

    /// Writes to the replicas directly, as in `none` mode, and drops the blocks from
    /// the cache: acknowledged once every replica applied it, made durable by the next
    /// FLUSH (which syncs every node that applied writes since the last one). A stream
    /// of large writes past the dirty limit then costs one replicated write, not a copy
    /// into the cache, a wait for the pusher, and a copy out again.
    ///
    /// Pushes of the cached objects in the range wait (their io lock, held shared here)
    /// until the blocks are dropped, so no older content is pushed over this write; a
    /// fill that read the replicas meanwhile sees the stripe count move and keeps nothing.
    async fn write_around(
        &self,
        node: &Node,
        vdi: &VdiState,
        offset: u64,
        data: &bytes::Bytes,
    ) -> Result<(), PeerError> {
        let pieces = split_range(offset, data.len() as u64, self.object_size);
        let cached: Vec<Arc<CachedObject>> =
            pieces.iter().filter_map(|p| self.object(p.0)).collect();
        let mut held = Vec::with_capacity(cached.len());
        for o in &cached {
            held.push(o.io.read().await);
        }
        let written = gateway::write(node, vdi, offset, data, false).await;
        // After a failure only clean copies go (the replicas may hold part of the
        // write); dirty blocks stay and their next push overwrites that part.
        let done = written.is_ok();
        for &(index, in_obj, n) in &pieces {
            self.around[index as usize % AROUND_STRIPES].fetch_add(1, Ordering::AcqRel);
            let Some(o) = self.object(index) else {
                continue;
            };
            let (s, e) = block_span(in_obj, n);
            let mut b = o.lock();
            let f = o.forget(&mut b, s, e, done);
            self.valid_blocks.fetch_sub(f.valid, Ordering::Relaxed);
            self.pushed_blocks.fetch_sub(f.pushed, Ordering::AcqRel);
            self.dirty_blocks.fetch_sub(f.dirty, Ordering::AcqRel);
            if f.valid > 0 || f.dirty > 0 {
                self.persist(&o, &b.st)?;
            }
        }
        drop(held);
        written?;
        self.stats.written_around.fetch_add(1, Ordering::Relaxed);
        self.stats
            .written_around_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.room.notify_waiters();
        Ok(())
    }

    /// Puts data into the cache files: dirty (to be pushed), or `clean` when the
    /// replicas already hold it.
    pub fn store_local(&self, offset: u64, data: &[u8], clean: bool) -> Result<(), PeerError> {
        let mut pos = 0usize;
        for (index, in_obj, n) in split_range(offset, data.len() as u64, self.object_size) {
            let o = self.object_or_create(index)?;
            let piece = &data[pos..pos + n as usize];
            pos += n as usize;
            let mut b = o.lock();
            let before = b.st.valid.count();
            let marked = o
                .write(&mut b, in_obj, piece, clean)
                .map_err(|e| io_error("write", e))?;
            self.valid_blocks
                .fetch_add((b.st.valid.count() - before) as u64, Ordering::Relaxed);
            // Counted under the object's lock, so a push completing meanwhile counts after.
            self.count_marked(marked);
            self.persist(&o, &b.st)?;
            drop(b);
            o.touch(self.next_tick());
        }
        if !clean {
            self.push_wake.notify_one();
        }
        self.evict();
        Ok(())
    }

    fn count_marked(&self, m: super::object::Marked) {
        self.dirty_blocks.fetch_add(m.newly_dirty, Ordering::AcqRel);
        self.pushed_blocks.fetch_sub(m.unpushed, Ordering::AcqRel);
    }

    /// Makes a range read as zeros: a "dirty, zero" state pushed as a punch.
    pub async fn zero(&self, offset: u64, len: u64) -> Result<(), PeerError> {
        self.make_room(len).await?;
        for (index, in_obj, n) in split_range(offset, len, self.object_size) {
            let o = self.object_or_create(index)?;
            let mut b = o.lock();
            let before = b.st.valid.count();
            let marked = o
                .zero(&mut b, in_obj, n)
                .map_err(|e| io_error("punch", e))?;
            self.valid_blocks
                .fetch_add((b.st.valid.count() - before) as u64, Ordering::Relaxed);
            self.count_marked(marked);
            self.persist(&o, &b.st)?;
            drop(b);
        }
        self.push_wake.notify_one();
        Ok(())
    }

    /// Reads through the cache, fetching what it lacks from the replicas and keeping it.
    pub async fn read(
        &self,
        node: &Node,
        vdi: &VdiState,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, PeerError> {
        let mut out = Vec::with_capacity(len as usize);
        for (index, in_obj, n) in split_range(offset, len, self.object_size) {
            let (s, e) = block_span(in_obj, n);
            let hit = self
                .object(index)
                .filter(|o| o.lock().st.valid.all_in(s, e));
            match hit {
                Some(o) => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    o.touch(self.next_tick());
                    out.extend(o.read(in_obj, n).map_err(|e| io_error("read", e))?);
                }
                None => {
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                    out.extend(self.read_miss(node, vdi, index, in_obj, n).await?);
                }
            }
        }
        self.evict();
        Ok(out)
    }

    /// A read of `[in_obj, in_obj + n)` of object `index` that the cache cannot serve
    /// whole: the blocks it spans are read from the replicas and the ones the cache
    /// lacks are kept (those it holds, dirty ones among them, are newer or the same).
    /// Only the blocks read are fetched: a 4 KiB miss costs a 4 KiB read, not an object.
    /// When a write went around the cache to this object meanwhile, the copy read may
    /// predate it: it then serves this read (which overlapped that write) where the
    /// cache has nothing, and none of it is kept.
    async fn read_miss(
        &self,
        node: &Node,
        vdi: &VdiState,
        index: u32,
        in_obj: u64,
        n: u64,
    ) -> Result<Vec<u8>, PeerError> {
        let (s, e) = block_span(in_obj, n);
        let span_at = s as u64 * CACHE_BLOCK;
        let around = &self.around[index as usize % AROUND_STRIPES];
        let before = around.load(Ordering::Acquire);
        let base = index as u64 * self.object_size as u64;
        let fetched =
            gateway::read(node, vdi, base + span_at, (e - s) as u64 * CACHE_BLOCK).await?;
        let o = self.object_or_create(index)?;
        let mut b = o.lock();
        if around.load(Ordering::Acquire) != before {
            let mut out = o.read(in_obj, n).map_err(|e| io_error("read", e))?;
            for i in (s..e).filter(|&i| !b.st.valid.get(i)) {
                // The part of block i inside the read, from the copy.
                let from = (i as u64 * CACHE_BLOCK).max(in_obj);
                let to = ((i as u64 + 1) * CACHE_BLOCK).min(in_obj + n);
                out[(from - in_obj) as usize..(to - in_obj) as usize]
                    .copy_from_slice(&fetched[(from - span_at) as usize..(to - span_at) as usize]);
            }
            return Ok(out);
        }
        let was = b.st.valid.count();
        o.fill(&mut b, s, &fetched)
            .map_err(|e| io_error("fill", e))?;
        self.valid_blocks
            .fetch_add((b.st.valid.count() - was) as u64, Ordering::Relaxed);
        self.persist(&o, &b.st)?;
        let out = o.read(in_obj, n).map_err(|e| io_error("read", e));
        drop(b);
        o.touch(self.next_tick());
        out
    }

    /// True when the cache holds dirty data in the object (BLOCK_STATUS must not call
    /// it a hole).
    pub fn has_dirty_data(&self, index: u32) -> bool {
        self.object(index).is_some_and(|o| {
            let b = o.lock();
            (0..b.st.dirty.len()).any(|i| b.st.dirty.get(i) && !b.st.zero.get(i))
        })
    }

    /// Evicts clean objects in LRU order while the cache is over its size.
    fn evict(&self) {
        let limit = self.cfg.size / CACHE_BLOCK;
        if self.valid_blocks.load(Ordering::Relaxed) <= limit {
            return;
        }
        let mut objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let mut order: Vec<(u64, u32)> = objects
            .values()
            .map(|o| (o.last_used.load(Ordering::Relaxed), o.index))
            .collect();
        order.sort_unstable();
        for (_, index) in order {
            if self.valid_blocks.load(Ordering::Relaxed) <= limit {
                break;
            }
            let Some(o) = objects.get(&index).cloned() else {
                continue;
            };
            // In use (a read, write, fill or push holds it): never evicted under it, or
            // that write would land in an unlinked file.
            if Arc::strong_count(&o) > 2 {
                continue;
            }
            let Ok(_io) = o.io.try_write() else {
                continue;
            };
            let b = o.lock();
            if b.st.dirty.any() {
                continue;
            }
            let n = b.st.valid.count() as u64;
            let _ = self
                .meta
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .store(index, &ObjectState::new(b.st.valid.len()));
            drop(b);
            let _ = std::fs::remove_file(self.dir.join(format!("obj-{index:08x}")));
            objects.remove(&index);
            self.valid_blocks.fetch_sub(n, Ordering::Relaxed);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Pushes one object's dirty blocks not yet pushed in the current epoch; `durable`:
    /// as durable writes (each replica syncs them before it replies).
    async fn push_object(
        &self,
        node: &Node,
        vdi: &VdiState,
        o: &CachedObject,
        durable: bool,
    ) -> Result<(), PeerError> {
        let _one = o.io.write().await;
        let epoch = node.view().epoch();
        let runs: Vec<PushRun> = {
            let b = o.lock();
            o.snapshot_for_push(&b, epoch)
                .map_err(|e| io_error("read for push", e))?
        };
        if runs.is_empty() {
            return Ok(());
        }
        let base = o.index as u64 * self.object_size as u64;
        self.stats.pushes_in_flight.fetch_add(1, Ordering::Relaxed);
        let result = async {
            for r in &runs {
                let off = base + r.start as u64 * CACHE_BLOCK;
                let len = (r.end - r.start) as u64 * CACHE_BLOCK;
                if r.zero {
                    gateway::zero_range(node, vdi, off, len, false, durable).await?;
                } else {
                    gateway::write(node, vdi, off, &r.data, durable).await?;
                }
                self.stats.pushed_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Ok::<(), PeerError>(())
        }
        .await;
        self.stats.pushes_in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.stats.push_failures.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        self.stats.pushes.fetch_add(1, Ordering::Relaxed);
        let mut b = o.lock();
        let mut newly_pushed = 0;
        for r in &runs {
            for (i, seq) in (r.start..r.end).zip(&r.seqs) {
                if b.seq[i] == *seq && b.set_pushed(i, epoch) {
                    newly_pushed += 1;
                }
            }
        }
        self.pushed_blocks.fetch_add(newly_pushed, Ordering::AcqRel);
        drop(b);
        // Pushed data no longer counts against the unpushed limit.
        self.room.notify_waiters();
        Ok(())
    }

    /// Objects with dirty blocks, oldest use first.
    fn dirty_objects(&self) -> Vec<Arc<CachedObject>> {
        self.objects_where(|b| b.st.dirty.any())
    }

    /// Objects with dirty blocks not pushed yet (in any epoch), oldest use first.
    fn unpushed_objects(&self) -> Vec<Arc<CachedObject>> {
        self.objects_where(|b| b.unpushed > 0)
    }

    fn objects_where(
        &self,
        pick: impl Fn(&super::object::Blocks) -> bool,
    ) -> Vec<Arc<CachedObject>> {
        let objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = objects
            .values()
            .filter(|o| pick(&o.lock()))
            .cloned()
            .collect();
        v.sort_by_key(|o| o.last_used.load(Ordering::Relaxed));
        v
    }

    /// Pushes every dirty object, `push_concurrency` at a time (`durable`: see
    /// [`VdiCache::push_object`]).
    async fn push_all(
        &self,
        node: &Node,
        vdi: &VdiState,
        objs: &[Arc<CachedObject>],
        durable: bool,
    ) -> Result<(), PeerError> {
        // A sliding window of pushes (not batches): one slow object does not hold up
        // the others.
        let window = tokio::sync::Semaphore::new(self.cfg.push_concurrency.max(1));
        let pushes = objs.iter().map(|o| {
            let window = &window;
            async move {
                let _slot = window.acquire().await;
                self.push_object(node, vdi, o, durable).await
            }
        });
        let mut first_err = None;
        for r in join_all(pushes).await {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// FLUSH: every write acknowledged before the call becomes durable on every live
    /// replica (at least min_copies), or the call fails with EIO after the flush timeout
    /// with the data still dirty. Writes arriving meanwhile go on and stay dirty.
    pub async fn flush(&self, node: &Node, vdi: &VdiState) -> Result<(), PeerError> {
        self.seen_flush.store(true, Ordering::Release);
        self.sync_dirty(node, vdi).await
    }

    /// Pushes and syncs every block dirty now, then marks them clean (the body of a
    /// FLUSH, also used by the pusher to return dirty space).
    async fn sync_dirty(&self, node: &Node, vdi: &VdiState) -> Result<(), PeerError> {
        let _ordered = self.flush_order.lock().await;
        let deadline = Instant::now() + self.cfg.flush_timeout;
        // What this flush covers: every dirty block now, with its write sequence.
        let covered: Vec<Covered> = self
            .dirty_objects()
            .into_iter()
            .map(|o| {
                let b = o.lock();
                let blocks = (0..b.st.dirty.len())
                    .filter(|&i| b.st.dirty.get(i))
                    .map(|i| (i, b.seq[i]))
                    .collect();
                drop(b);
                (o, blocks)
            })
            .collect();
        // A flush covering a few objects pushes them as durable writes: then, unless
        // earlier pushes left nodes unsynced, no sync round follows (one round trip to
        // the replicas instead of two). Many objects are cheaper with one sync per node.
        let durable = covered.len() <= DURABLE_PUSH_OBJECTS_MAX;
        loop {
            let objs: Vec<_> = covered.iter().map(|(o, _)| o.clone()).collect();
            let pushed = self.push_all(node, vdi, &objs, durable).await;
            let epoch = node.view().epoch();
            let synced = match pushed {
                Ok(()) => gateway::flush(node, vdi).await,
                Err(e) => Err(e),
            };
            match synced {
                Ok(()) if node.view().epoch() == epoch => {
                    self.mark_clean(&covered, epoch)?;
                    self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .last_flush_unix
                        .store(now_unix(), Ordering::Relaxed);
                    return Ok(());
                }
                // The epoch moved during the flush: pushed ranges are dirty again.
                Ok(()) => continue,
                Err(e) => {
                    // Anything pushed but not proven synced is pushed again next time.
                    self.unpush(&covered);
                    if Instant::now() >= deadline {
                        return Err(PeerError::new(
                            ErrorCode::Io,
                            format!(
                                "flush of vid {:#x} failed within {} s: {}",
                                self.vid,
                                self.cfg.flush_timeout.as_secs(),
                                e.message
                            ),
                        ));
                    }
                    tracing::warn!(vid = self.vid, error = %e, "flush waiting for replicas");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    let _ = node.refresh().await;
                }
            }
        }
    }

    fn unpush(&self, covered: &[Covered]) {
        let mut unpushed = 0;
        for (o, blocks) in covered {
            let mut b = o.lock();
            for (i, _) in blocks {
                if b.st.dirty.get(*i) && b.set_unpushed(*i) {
                    unpushed += 1;
                }
            }
        }
        self.pushed_blocks.fetch_sub(unpushed, Ordering::AcqRel);
    }

    /// Marks covered blocks clean where no newer write hit them and they were pushed in
    /// the epoch the sync happened in.
    fn mark_clean(&self, covered: &[Covered], epoch: u32) -> Result<(), PeerError> {
        let mut cleaned = 0u64;
        for (o, blocks) in covered {
            let mut b = o.lock();
            for &(i, seq) in blocks {
                if b.st.dirty.get(i) && b.seq[i] == seq && b.pushed_epoch[i] == epoch {
                    b.st.dirty.set(i, false);
                    b.st.zero.set(i, false);
                    b.pushed_epoch[i] = 0;
                    cleaned += 1;
                }
            }
            self.persist(o, &b.st)?;
        }
        // Every cleaned block was pushed (in `epoch`): it leaves both counts.
        self.pushed_blocks.fetch_sub(cleaned, Ordering::AcqRel);
        self.dirty_blocks.fetch_sub(cleaned, Ordering::AcqRel);
        self.room.notify_waiters();
        // Objects that just turned clean may now be evicted.
        self.evict();
        Ok(())
    }

    /// The background pusher: pushes dirty data as soon as possible and, when blocks
    /// wait only for a sync (or writers wait for room), syncs to make them clean. Never
    /// aborts on failure: it retries.
    pub fn spawn_pusher(self: &Arc<Self>, node: Arc<Node>, vdi: Arc<VdiState>) {
        if self.pusher_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let mut shutdown = node.shutdown_signal();
            let mut backoff = Duration::from_millis(50);
            let mut last_sync = Instant::now();
            let mut scanned_epoch = 0;
            loop {
                tokio::select! {
                    _ = cache.push_wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => break,
                }
                if cache.unpushed_bytes() * 4 < cache.cfg.dirty_max {
                    // Not pressed: gather writes for a moment. Neighbouring writes
                    // coalesce into one push, and a FLUSH right behind a write (fsync
                    // after each write) pushes it durably itself, with no sync round.
                    tokio::time::sleep(PUSH_GATHER).await;
                }
                if !cache.has_dirty() {
                    // Idle: clean objects beyond the size go now (eviction skips objects
                    // in use, so the ones a flush just cleaned may still be here).
                    cache.evict();
                    continue;
                }
                // Blocks pushed in an older epoch must go again: after an epoch change
                // every dirty object is looked at once, otherwise only those holding
                // unpushed blocks (pushed data waiting for a sync costs no scan).
                let epoch = node.view().epoch();
                let objs = if epoch != scanned_epoch {
                    cache.dirty_objects()
                } else {
                    cache.unpushed_objects()
                };
                let pushed = cache.push_all(&node, &vdi, &objs, false).await;
                drop(objs);
                match pushed {
                    Ok(()) => {
                        backoff = Duration::from_millis(50);
                        scanned_epoch = epoch;
                    }
                    Err(e) => {
                        tracing::warn!(vid = cache.vid, error = %e, "push failed; will retry");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
                // Pushed data turns clean with a sync. Let it wait for the client's FLUSH,
                // unless dirty data passes half its cap (so writers do not hit the cap) or
                // it has waited a few seconds; the sync runs beside the pusher, which
                // keeps pushing meanwhile.
                let pressed = cache.dirty_bytes() * 2 > cache.dirty_cap();
                let stale = last_sync.elapsed() > BACKGROUND_SYNC_INTERVAL;
                if cache.has_dirty()
                    && (pressed || stale)
                    && !cache.syncing.swap(true, Ordering::AcqRel)
                {
                    last_sync = Instant::now();
                    let (c, n, v) = (cache.clone(), node.clone(), vdi.clone());
                    tokio::spawn(async move {
                        if let Err(e) = c.sync_dirty(&n, &v).await {
                            tracing::warn!(vid = c.vid, error = %e, "background sync failed; will retry");
                        }
                        c.syncing.store(false, Ordering::Release);
                        c.push_wake.notify_one();
                    });
                }
            }
            cache.pusher_running.store(false, Ordering::Release);
        });
    }

    /// Indices of the objects holding dirty data.
    pub fn dirty_indices(&self) -> Vec<u32> {
        self.dirty_objects().iter().map(|o| o.index).collect()
    }

    /// Makes every cache file and the meta file durable (for a clean stop's seal).
    pub fn sync_files(&self) -> std::io::Result<()> {
        let objects: Vec<_> = self
            .objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for o in objects {
            o.sync()?;
        }
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).sync()
    }

    pub fn info(&self, name: &str) -> CacheInfo {
        let hits = self.stats.hits.load(Ordering::Relaxed);
        let misses = self.stats.misses.load(Ordering::Relaxed);
        let valid = self.valid_blocks.load(Ordering::Relaxed) * CACHE_BLOCK;
        let dirty = self.dirty_bytes();
        CacheInfo {
            name: name.to_string(),
            vid: self.vid,
            objects: self.objects.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
            clean_bytes: valid.saturating_sub(dirty),
            dirty_bytes: dirty,
            unpushed_bytes: self.unpushed_bytes().min(dirty),
            size_limit: self.cfg.size,
            dirty_limit: self.cfg.dirty_max,
            hits,
            misses,
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            pushes: self.stats.pushes.load(Ordering::Relaxed),
            pushed_bytes: self.stats.pushed_bytes.load(Ordering::Relaxed),
            pushes_in_flight: self.stats.pushes_in_flight.load(Ordering::Relaxed),
            push_failures: self.stats.push_failures.load(Ordering::Relaxed),
            backpressure_waits: self.stats.backpressure_waits.load(Ordering::Relaxed),
            written_around: self.stats.written_around.load(Ordering::Relaxed),
            written_around_bytes: self.stats.written_around_bytes.load(Ordering::Relaxed),
            evictions: self.stats.evictions.load(Ordering::Relaxed),
            flushes: self.stats.flushes.load(Ordering::Relaxed),
            last_flush_unix: match self.stats.last_flush_unix.load(Ordering::Relaxed) {
                0 => None,
                t => Some(t),
            },
            seen_flush: self.seen_flush.load(Ordering::Relaxed),
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &std::path::Path, dirty_max: u64, cutoff: u64) -> VdiCache {
        let cfg = CacheConfig {
            root: dir.to_path_buf(),
            size: 64 << 20,
            dirty_max,
            push_concurrency: 1,
            sequential_cutoff: cutoff,
            flush_timeout: Duration::from_secs(1),
        };
        VdiCache::open(Arc::new(cfg), dir.join("vdi"), 7, 4 << 20, 1).expect("cache opens")
    }

    #[test]
    fn only_large_whole_block_writes_of_long_streams_or_past_the_limit_go_around() {
        const M: u64 = 1 << 20;
        let dir = tempfile::tempdir().expect("temp dir");
        let c = cache(dir.path(), 4 * M, 8 * M);
        // Small or unaligned writes always go into the cache, however long the stream.
        assert!((0..64).all(|k| !c.goes_around(k * 64 * 1024, 64 * 1024)));
        assert!(!c.goes_around(100 * M + 512, M));
        // A stream of 1 MiB writes goes around once it has written the cutoff.
        let around: Vec<bool> = (0..12).map(|k| c.goes_around(200 * M + k * M, M)).collect();
        assert_eq!(around, [[false; 7].as_slice(), &[true; 5]].concat());
        // Large writes elsewhere (not a stream) stay in the cache while there is room...
        assert!(!c.goes_around(500 * M, M));
        // ...and go around once unpushed data is at its limit.
        c.store_local(0, &vec![1u8; 4 * M as usize], false)
            .expect("dirty data");
        assert!(c.goes_around(700 * M, M));
        assert!(
            !c.goes_around(900 * M, 64 * 1024),
            "a small write waits instead"
        );
        // Cutoff 0: streams never go around by themselves.
        let dir = tempfile::tempdir().expect("temp dir");
        let off = cache(dir.path(), 64 * M, 0);
        assert!((0..32).all(|k| !off.goes_around(k * M, M)));
    }

    #[test]
    fn streams_follow_sequential_writes_served_a_little_out_of_order() {
        let mut s = Streams::default();
        const M: u64 = 1 << 20;
        // 1 MiB writes in order, then two swapped (requests in flight together).
        assert_eq!(s.note(0, M), M);
        assert_eq!(s.note(M, M), 2 * M);
        assert_eq!(s.note(3 * M, M), 3 * M);
        assert_eq!(s.note(2 * M, M), 4 * M);
        assert_eq!(s.note(4 * M, M), 5 * M);
        // A write far away starts its own stream and leaves this one alone.
        assert_eq!(s.note(512 * M, M), M);
        assert_eq!(s.note(5 * M, M), 6 * M);
        // Writes jumping around (a random workload) never build up a long stream.
        let mut longest = 0;
        for k in 1..1000u64 {
            let at = (k * 7919 % 997) * 64 * M;
            longest = longest.max(s.note(at, M));
        }
        assert!(
            longest <= 2 * M,
            "random writes counted as a stream of {longest} bytes"
        );
        assert!(s.slots.len() <= STREAMS_MAX);
    }
}

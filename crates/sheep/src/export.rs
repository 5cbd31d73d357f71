//! Every VDI served over NBD: the export provider and the block device the gateway
//! implements for one VDI.
//!
//! Export `NAME` is read-write and takes the VDI's lock (one writer per VDI, DESIGN.md
//! §6.9): a VDI locked by another gateway is refused with ERR_POLICY naming the holder.
//! Export `NAME/ro` serves the VDI read-only without the lock. The lock is released when
//! the last connection to the VDI on this gateway closes, after a final flush.
//!
//! Durability modes (DESIGN.md §5): `none` acknowledges once every replica applied a
//! write and syncs on FLUSH; `writethrough` makes every write durable on every replica
//! before acknowledging it; `writeback` acknowledges once the write is in this gateway's
//! object cache (`cache/`), and FLUSH pushes and syncs. FUA writes are durable before the
//! reply in every mode. A gateway without a cache serves `writeback` VDIs as
//! `writethrough`.
//!
//! A cache's content is valid under the lock generation it records: it is used when
//! this gateway takes the lock at that generation or the next one (nobody else held the
//! lock in between); otherwise clean content is dropped and dirty content set aside,
//! never pushed (fencing).

use crate::cache::VdiCache;
use crate::gateway::{self, open_vdi, Refresh, VdiState};
use crate::node::Node;
use crate::vdi::lookup;
use async_trait::async_trait;
use nbd::{BlockDevice, BlockError, ExportInfo, ExportProvider, Extent, NbdErrno, OpenError};
use proto::{ErrorCode, PeerError, Vid};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Suffix of the read-only export of a VDI (VDI names cannot contain '/').
pub const READ_ONLY_SUFFIX: &str = "/ro";

/// Maps a gateway error onto the NBD errno the client sees.
fn to_block_error(e: PeerError) -> BlockError {
    let errno = match e.code {
        ErrorCode::NoSpace => NbdErrno::NoSpc,
        ErrorCode::InvalidRequest | ErrorCode::TooLarge => NbdErrno::Inval,
        ErrorCode::Fenced | ErrorCode::Locked => NbdErrno::Perm,
        ErrorCode::Unsupported => NbdErrno::NotSup,
        ErrorCode::ShuttingDown => NbdErrno::Shutdown,
        _ => NbdErrno::Io,
    };
    BlockError {
        errno,
        message: e.message,
    }
}

/// The VDIs this gateway serves read-write, with their connection counts.
#[derive(Default)]
pub struct OpenExports {
    writers: tokio::sync::Mutex<HashMap<Vid, WriterEntry>>,
}

impl OpenExports {
    /// Whether this gateway holds the VDI's lock for its clients.
    pub async fn holds(&self, vid: Vid) -> bool {
        self.writers.lock().await.contains_key(&vid)
    }

    /// Runs an admin write (`dog vdi write`) as a writer of the VDI: on the holder, with
    /// its cache (if any); otherwise the lock is taken for the write and released after,
    /// and a cache of an earlier session is dropped (the write goes around it).
    pub async fn with_writer<'a, F, Fut>(
        &self,
        node: &'a Node,
        vid: Vid,
        name: &str,
        f: F,
    ) -> Result<(), PeerError>
    where
        F: FnOnce(Option<Arc<VdiCache>>) -> Fut,
        Fut: std::future::Future<Output = Result<(), PeerError>> + 'a,
    {
        let writers = self.writers.lock().await;
        if writers.contains_key(&vid) {
            let cache = node.cache.get().and_then(|c| c.get(vid));
            drop(writers);
            return f(cache).await;
        }
        let lock = node
            .driver
            .lock_acquire(vid, node.uuid)
            .await
            .map_err(|e| match e {
                cluster::ClusterError::Locked { holder, .. } => PeerError::new(
                    ErrorCode::Locked,
                    format!("VDI '{name}' is locked by node {holder}"),
                ),
                other => crate::error::from_cluster(other),
            })?;
        if let Some(nc) = node.cache.get() {
            nc.drop_vdi(vid);
        }
        let vdi = crate::gateway::open_vdi(node, vid, Refresh::Cached).await?;
        vdi.set_fence(lock.generation);
        // Unlike an NBD writer, nothing is cached here: the written data is on the
        // replicas (durable when the write asked for it), so the lock goes at once.
        let result = f(None).await;
        vdi.set_fence(0);
        drop(writers);
        if let Err(e) = node
            .driver
            .lock_release(vid, node.uuid, lock.generation)
            .await
        {
            tracing::warn!(vid, error = %e, "releasing the VDI lock after an admin write failed");
        }
        result
    }
}

struct WriterEntry {
    connections: usize,
    generation: u64,
}

/// The NBD export catalogue of one node.
pub struct SheepExports {
    node: Weak<Node>,
}

impl SheepExports {
    pub fn new(node: &Arc<Node>) -> SheepExports {
        SheepExports {
            node: Arc::downgrade(node),
        }
    }

    fn node(&self) -> Result<Arc<Node>, OpenError> {
        self.node
            .upgrade()
            .ok_or_else(|| OpenError::Other("the server is shutting down".into()))
    }
}

#[async_trait]
impl ExportProvider for SheepExports {
    async fn list(&self) -> Vec<ExportInfo> {
        let Ok(node) = self.node() else {
            return Vec::new();
        };
        match node.driver.vdi_list().await {
            Ok(entries) => entries
                .into_iter()
                .map(|e| ExportInfo {
                    description: format!("Sheepdog VDI '{}' (vid {:#x})", e.name, e.vid),
                    name: e.name,
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list VDIs for NBD");
                Vec::new()
            }
        }
    }

    async fn open(
        &self,
        name: &str,
        _read_only_ok: bool,
    ) -> Result<Arc<dyn BlockDevice>, OpenError> {
        let node = self.node()?;
        let (vdi_name, read_only) = match name.strip_suffix(READ_ONLY_SUFFIX) {
            Some(base) => (base, true),
            None => (name, false),
        };
        let vid = match lookup(&node, vdi_name).await {
            Ok(v) => v,
            Err(e) if e.code == ErrorCode::NoSuchVdi => return Err(OpenError::Unknown),
            Err(e) => return Err(OpenError::Other(e.message)),
        };
        let vdi = open_vdi(&node, vid, Refresh::All)
            .await
            .map_err(|e| OpenError::Other(e.message))?;
        let fence = if read_only {
            0
        } else {
            acquire_writer(&node, vid, vdi_name).await?
        };
        if !read_only {
            vdi.set_fence(fence);
        }
        let h = vdi.header();
        let wants_cache = h.cache_mode == "writeback" && !read_only;
        let cache = if wants_cache {
            match open_cache(&node, vid, h.object_size, fence) {
                Ok(c) => c,
                Err(e) => {
                    release_writer(&node, &vdi, vid).await;
                    return Err(OpenError::Other(format!(
                        "cannot open the cache of '{vdi_name}': {}",
                        e.message
                    )));
                }
            }
        } else if read_only {
            // A read-only client of the gateway that holds the VDI's cache reads through
            // it (it has the newest data); other gateways read the replicas.
            node.cache.get().and_then(|c| c.get(vid))
        } else {
            None
        };
        if let (Some(c), false) = (&cache, read_only) {
            c.spawn_pusher(node.clone(), vdi.clone());
        } else if wants_cache {
            tracing::warn!(
                vdi = vdi_name,
                "writeback VDI on a gateway without a cache: serving it as writethrough"
            );
        }
        let writethrough = h.cache_mode == "writethrough" || (wants_cache && cache.is_none());
        tracing::info!(vdi = vdi_name, read_only, mode = %h.cache_mode, "NBD export opened");
        Ok(Arc::new(VdiDevice {
            node,
            vdi,
            vid,
            size: h.size,
            read_only,
            writethrough,
            cache,
            until_flush: h.writethrough_until_flush,
        }))
    }
}

/// Takes (or shares) the VDI's lock for a read-write connection.
async fn acquire_writer(node: &Arc<Node>, vid: Vid, name: &str) -> Result<u64, OpenError> {
    let mut writers = node.exports.writers.lock().await;
    if let Some(w) = writers.get_mut(&vid) {
        w.connections += 1;
        return Ok(w.generation);
    }
    match node.driver.lock_acquire(vid, node.uuid).await {
        Ok(lock) => {
            writers.insert(
                vid,
                WriterEntry {
                    connections: 1,
                    generation: lock.generation,
                },
            );
            if let Some(c) = node.cache.get().and_then(|c| c.get(vid)) {
                c.new_session();
            }
            Ok(lock.generation)
        }
        Err(cluster::ClusterError::Locked { holder, .. }) => {
            let addr = node
                .view()
                .member(holder)
                .map(|m| m.addr.clone())
                .unwrap_or_else(|| "unknown address".into());
            Err(OpenError::Policy(format!(
                "VDI '{name}' is locked by the gateway on node {holder} ({addr}); open export '{name}{READ_ONLY_SUFFIX}' for read-only access"
            )))
        }
        Err(e) => Err(OpenError::Other(format!("cannot lock VDI '{name}': {e}"))),
    }
}

/// Makes a VDI's data durable on the replicas: the cache (if any) is pushed and synced,
/// then every node that received unsynced writes is synced.
async fn flush_all(node: &Node, vdi: &VdiState, vid: Vid) -> Result<(), proto::PeerError> {
    if let Some(c) = node.cache.get().and_then(|c| c.get(vid)) {
        c.flush(node, vdi).await?;
    }
    gateway::flush(node, vdi).await
}

/// Drops one connection's share of the lock; the last one flushes and releases it.
/// When that flush fails, the lock is kept (nobody else may write until the data is
/// durable) and the flush retried in the background.
async fn release_writer(node: &Arc<Node>, vdi: &Arc<VdiState>, vid: Vid) {
    {
        let mut writers = node.exports.writers.lock().await;
        let Some(w) = writers.get_mut(&vid) else {
            return;
        };
        w.connections = w.connections.saturating_sub(1);
        if w.connections > 0 {
            return;
        }
    }
    if try_release(node, vdi, vid).await {
        return;
    }
    let (node, vdi) = (node.clone(), vdi.clone());
    tokio::spawn(async move {
        let mut stop = node.shutdown_signal();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                _ = stop.changed() => return,
            }
            if try_release(&node, &vdi, vid).await {
                return;
            }
        }
    });
}

/// Flushes and releases the lock if no connection uses the VDI. True when done (or moot).
async fn try_release(node: &Node, vdi: &VdiState, vid: Vid) -> bool {
    let mut writers = node.exports.writers.lock().await;
    let Some(w) = writers.get(&vid) else {
        return true;
    };
    if w.connections > 0 {
        return true;
    }
    let generation = w.generation;
    if let Err(e) = flush_all(node, vdi, vid).await {
        tracing::error!(vid, error = %e, "final flush failed; keeping the VDI lock and retrying");
        return false;
    }
    writers.remove(&vid);
    vdi.set_fence(0);
    if let Err(e) = node.driver.lock_release(vid, node.uuid, generation).await {
        tracing::warn!(vid, error = %e, "releasing the VDI lock failed");
    }
    true
}

/// Opens the VDI's cache for a writer holding lock `generation`, applying the fencing
/// rule of the module doc.
fn open_cache(
    node: &Node,
    vid: Vid,
    object_size: u32,
    generation: u64,
) -> Result<Option<Arc<VdiCache>>, proto::PeerError> {
    let Some(nc) = node.cache.get() else {
        return Ok(None);
    };
    let c = nc.open_vdi(vid, object_size, generation)?;
    let recorded = c.fence();
    if recorded != generation && recorded + 1 != generation {
        drop(c);
        if nc.get(vid).is_some_and(|c| c.has_dirty()) {
            tracing::error!(vid, recorded, generation, "lock was taken over since this cache was written: setting its unflushed data aside");
            nc.quarantine_vdi(vid, "fenced");
        } else {
            nc.drop_vdi(vid);
        }
        let c = nc.open_vdi(vid, object_size, generation)?;
        c.set_fence(generation)?;
        return Ok(Some(c));
    }
    c.set_fence(generation)?;
    Ok(Some(c))
}

/// After a restart: resumes the caches that hold unflushed data. Each needs the VDI's
/// lock at the generation it was written under (or the next, when nobody else took it);
/// otherwise it is set aside, never pushed. Resumed caches are pushed, flushed, and the
/// lock released once no client uses the VDI.
pub async fn resume_caches(node: &Arc<Node>) {
    let Some(nc) = node.cache.get() else {
        release_orphan_locks(node).await;
        return;
    };
    for vid in nc.on_disk() {
        let dir = nc.cfg.root.join(format!("{vid:06x}"));
        let (fence, dirty) = match crate::cache::meta::MetaFile::open(&dir) {
            Ok(m) => {
                let dirty = m
                    .load_all()
                    .map(|l| l.iter().any(|(_, s)| s.dirty.any()))
                    .unwrap_or(true);
                (m.header.fence, dirty)
            }
            Err(e) => {
                tracing::error!(vid, error = %e, "unreadable cache; setting it aside");
                nc.quarantine_vdi(vid, "unreadable");
                continue;
            }
        };
        if !dirty {
            continue;
        }
        let vdi = match open_vdi(node, vid, Refresh::All).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(vid, error = %e, "cache of a VDI that cannot be opened (deleted?); setting it aside");
                nc.quarantine_vdi(vid, "no-vdi");
                continue;
            }
        };
        let h = vdi.header();
        let lock = node.driver.lock_acquire(vid, node.uuid).await;
        let generation = match lock {
            Ok(l) if l.generation == fence || l.generation == fence + 1 => l.generation,
            Ok(l) => {
                tracing::error!(
                    vid,
                    fence,
                    generation = l.generation,
                    "VDI lock changed hands since the crash: cache set aside, not pushed"
                );
                nc.quarantine_vdi(vid, "fenced");
                let _ = node.driver.lock_release(vid, node.uuid, l.generation).await;
                continue;
            }
            Err(e) => {
                tracing::error!(vid, error = %e, "VDI lock held elsewhere since the crash: cache set aside, not pushed");
                nc.quarantine_vdi(vid, "fenced");
                continue;
            }
        };
        node.exports.writers.lock().await.insert(
            vid,
            WriterEntry {
                connections: 1,
                generation,
            },
        );
        vdi.set_fence(generation);
        let cache = match open_cache(node, vid, h.object_size, generation) {
            Ok(Some(c)) => c,
            _ => continue,
        };
        tracing::warn!(
            vid,
            dirty_bytes = cache.dirty_bytes(),
            "resuming the push of unflushed cache data after a restart"
        );
        // The crash may have cut a table-entry update short on some inode replicas.
        if let Err(e) = gateway::reassert_entries(node, &vdi, &cache.dirty_indices()).await {
            tracing::warn!(vid, error = %e, "could not re-assert table entries; the pushes will retry");
        }
        cache.spawn_pusher(node.clone(), vdi.clone());
        release_writer(node, &vdi, vid).await;
    }
    release_orphan_locks(node).await;
}

/// Releases locks this node held before it restarted for VDIs it no longer serves (its
/// cache had nothing to push, or was dropped after a reboot): nobody else could write
/// them otherwise.
async fn release_orphan_locks(node: &Node) {
    let Ok(locks) = node.driver.lock_list().await else {
        return;
    };
    for l in locks.into_iter().filter(|l| l.holder == node.uuid) {
        let writers = node.exports.writers.lock().await;
        if writers.contains_key(&l.vid) {
            continue;
        }
        match node
            .driver
            .lock_release(l.vid, node.uuid, l.generation)
            .await
        {
            Ok(()) => tracing::info!(
                vid = l.vid,
                generation = l.generation,
                "released a VDI lock held before the restart"
            ),
            Err(e) => {
                tracing::warn!(vid = l.vid, error = %e, "could not release a VDI lock held before the restart")
            }
        }
    }
}

/// One VDI as an NBD block device.
pub struct VdiDevice {
    node: Arc<Node>,
    vdi: Arc<VdiState>,
    vid: Vid,
    size: u64,
    read_only: bool,
    writethrough: bool,
    /// The write-back cache, in `writeback` mode on a gateway with a cache.
    cache: Option<Arc<VdiCache>>,
    /// Write through until the client's first FLUSH (writeback mode).
    until_flush: bool,
}

impl VdiDevice {
    async fn zero_range(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        if let Some(c) = &self.cache {
            if !c.writes_through(self.until_flush) {
                if no_hole {
                    let zeros = bytes::Bytes::from(vec![0u8; len as usize]);
                    c.write(&self.node, &self.vdi, offset, &zeros, false)
                        .await
                        .map_err(to_block_error)?;
                } else {
                    c.zero(offset, len as u64).await.map_err(to_block_error)?;
                }
                if fua {
                    return self.flush().await;
                }
                return Ok(());
            }
            // Writing through: the replicas are zeroed here; the cached copy follows,
            // clean (written to the replicas once, not again as zeros over the holes).
            let zeros = vec![0u8; len as usize];
            gateway::zero_range(&self.node, &self.vdi, offset, len as u64, no_hole, true)
                .await
                .map_err(to_block_error)?;
            return c.store_local(offset, &zeros, true).map_err(to_block_error);
        }
        let durable = fua || self.writethrough;
        gateway::zero_range(&self.node, &self.vdi, offset, len as u64, no_hole, durable)
            .await
            .map_err(to_block_error)
    }
}

#[async_trait]
impl BlockDevice for VdiDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // All connections to a VDI on this gateway share one VdiState and one cache, and
        // a flush on any of them covers what any of them wrote.
        true
    }

    fn min_block_size(&self) -> u32 {
        // The cache tracks 4 KiB blocks: clients align to them (qemu does so itself).
        if self.cache.is_some() {
            crate::cache::bitmap::CACHE_BLOCK as u32
        } else {
            1
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BlockError> {
        match &self.cache {
            Some(c) => c.read(&self.node, &self.vdi, offset, len as u64).await,
            None => gateway::read(&self.node, &self.vdi, offset, len as u64).await,
        }
        .map_err(to_block_error)
    }

    async fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> Result<(), BlockError> {
        if let Some(c) = &self.cache {
            let through = c.writes_through(self.until_flush);
            c.write(&self.node, &self.vdi, offset, &data, through)
                .await
                .map_err(to_block_error)?;
            if fua && !through {
                return self.flush().await;
            }
            return Ok(());
        }
        let durable = fua || self.writethrough;
        gateway::write(&self.node, &self.vdi, offset, &data, durable)
            .await
            .map_err(to_block_error)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        flush_all(&self.node, &self.vdi, self.vid)
            .await
            .map_err(to_block_error)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), BlockError> {
        self.zero_range(offset, len, false, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
        fast_zero: bool,
    ) -> Result<(), BlockError> {
        if fast_zero && no_hole {
            return Err(BlockError {
                errno: NbdErrno::NotSup,
                message: "zeroing without holes writes data; not fast".into(),
            });
        }
        self.zero_range(offset, len, no_hole, fua).await
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, BlockError> {
        let h = self.vdi.header();
        let mut out: Vec<Extent> = Vec::new();
        for (index, _, n) in proto::inode::split_range(offset, len as u64, h.object_size) {
            // Dirty data in the cache is data, whatever the table says.
            let allocated = match &self.cache {
                Some(c) if c.has_dirty_data(index) => true,
                _ => {
                    gateway::owner_of(&self.node, &self.vdi, index)
                        .await
                        .map_err(to_block_error)?
                        != 0
                }
            };
            match out.last_mut() {
                Some(e) if e.hole != allocated => e.length += n,
                _ => out.push(Extent {
                    length: n,
                    hole: !allocated,
                    zero: !allocated,
                }),
            }
        }
        Ok(out)
    }

    async fn close(&self) {
        if !self.read_only {
            release_writer(&self.node, &self.vdi, self.vid).await;
        }
    }
}

//! The gateway's write-back object cache (DESIGN.md §6): configuration, the cache root
//! with its identity and boot check, and the registry of per-VDI caches.
//!
//! The cache knows objects, not the coordinator: locks and fencing are handled by the
//! NBD export (`export.rs`), which tells the cache which lock generation it writes under.

pub mod bitmap;
pub mod meta;
pub mod object;
pub mod vdi_cache;

use meta::{read_identity, write_identity, CacheIdentity, CACHE_IDENTITY_MAGIC};
use proto::{ErrorCode, PeerError, Vid};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::identity::ClusterStamp;
use uuid::Uuid;
pub use vdi_cache::VdiCache;

/// Cache settings of a gateway.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub root: PathBuf,
    /// Bytes of cached data kept (clean objects beyond it are evicted, LRU).
    pub size: u64,
    /// Unpushed dirty bytes at which writes wait for pushes (backpressure). All dirty
    /// data, pushed or not, is bounded by `size`.
    pub dirty_max: u64,
    /// Objects pushed at once per VDI.
    pub push_concurrency: usize,
    /// Bytes of a sequential stream of large writes after which its writes go around
    /// the cache, straight to the replicas (0: never).
    pub sequential_cutoff: u64,
    /// How long a FLUSH (or a write under backpressure) waits for replicas before EIO.
    pub flush_timeout: Duration,
}

/// This boot's id, from the kernel or a file given for tests.
pub fn boot_id(file: Option<&Path>) -> String {
    let path = file
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/proc/sys/kernel/random/boot_id"));
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The caches of every VDI this gateway serves in writeback mode.
pub struct NodeCache {
    pub cfg: Arc<CacheConfig>,
    boot_id: String,
    node_uuid: Uuid,
    cluster: ClusterStamp,
    vdis: Mutex<HashMap<Vid, Arc<VdiCache>>>,
}

impl NodeCache {
    /// Opens the cache root. A root of another cluster or node is set aside; an unsealed
    /// root from another boot is dropped (its unflushed data may be torn or stale and is
    /// never pushed); a sealed one (clean stop) is trusted. The root is then unsealed for
    /// this boot.
    pub fn open(
        cfg: CacheConfig,
        boot_id: String,
        node_uuid: Uuid,
        cluster: ClusterStamp,
    ) -> Result<NodeCache, PeerError> {
        let io = |e: std::io::Error| {
            PeerError::new(
                ErrorCode::Io,
                format!("cache root {}: {e}", cfg.root.display()),
            )
        };
        std::fs::create_dir_all(&cfg.root).map_err(io)?;
        match read_identity(&cfg.root) {
            Some(id)
                if id.cluster_uuid != cluster.cluster_uuid
                    || id.format_generation != cluster.format_generation
                    || id.node_uuid != node_uuid =>
            {
                tracing::warn!("cache belongs to another cluster or node; setting it aside");
                set_aside_all(&cfg.root, "foreign");
            }
            Some(id) if id.boot_id != boot_id && !id.sealed => {
                tracing::warn!(old_boot = %id.boot_id, "host rebooted without a clean stop: dropping the cache's unflushed content");
                set_aside_all(&cfg.root, "after-reboot");
            }
            Some(id) if id.boot_id != boot_id => {
                tracing::info!("cache was sealed by a clean stop; trusting it after the reboot")
            }
            _ => {}
        }
        let id = CacheIdentity {
            magic: CACHE_IDENTITY_MAGIC.into(),
            cluster_uuid: cluster.cluster_uuid,
            format_generation: cluster.format_generation,
            node_uuid,
            boot_id: boot_id.clone(),
            sealed: false,
        };
        write_identity(&cfg.root, &id).map_err(io)?;
        Ok(NodeCache {
            cfg: Arc::new(cfg),
            boot_id,
            node_uuid,
            cluster,
            vdis: Mutex::new(HashMap::new()),
        })
    }

    fn vdi_dir(&self, vid: Vid) -> PathBuf {
        self.cfg.root.join(format!("{vid:06x}"))
    }

    /// VDIs with a cache directory on disk (to resume after a restart).
    pub fn on_disk(&self) -> Vec<Vid> {
        let Ok(rd) = std::fs::read_dir(&self.cfg.root) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name().to_str().and_then(|n| {
                    (n.len() == 6)
                        .then(|| u32::from_str_radix(n, 16).ok())
                        .flatten()
                })
            })
            .collect()
    }

    pub fn get(&self, vid: Vid) -> Option<Arc<VdiCache>> {
        self.vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vid)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<VdiCache>> {
        self.vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Opens the cache of a VDI (loading what a previous run left).
    pub fn open_vdi(
        &self,
        vid: Vid,
        object_size: u32,
        fence: u64,
    ) -> Result<Arc<VdiCache>, PeerError> {
        let mut vdis = self.vdis.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = vdis.get(&vid) {
            return Ok(c.clone());
        }
        let dir = self.vdi_dir(vid);
        let c = match VdiCache::open(self.cfg.clone(), dir.clone(), vid, object_size, fence) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(vid, error = %e, "cache unusable; setting it aside and starting empty");
                quarantine(&self.cfg.root, &dir, "unusable");
                VdiCache::open(self.cfg.clone(), dir, vid, object_size, fence)?
            }
        };
        let c = Arc::new(c);
        vdis.insert(vid, c.clone());
        Ok(c)
    }

    /// Sets a VDI's cache aside (never pushed): its lock was taken over, or it is purged.
    pub fn quarantine_vdi(&self, vid: Vid, why: &str) {
        self.vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vid);
        let dir = self.vdi_dir(vid);
        if dir.exists() {
            quarantine(&self.cfg.root, &dir, why);
        }
    }

    /// Drops a VDI's cache for good (after purge or delete).
    pub fn drop_vdi(&self, vid: Vid) {
        self.vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vid);
        let _ = std::fs::remove_dir_all(self.vdi_dir(vid));
    }

    /// Clean stop: every cache file made durable and the root sealed, so the cache is
    /// trusted after the reboot that usually follows.
    pub fn seal(&self) {
        for c in self.all() {
            if let Err(e) = c.sync_files() {
                tracing::error!(vid = c.vid, error = %e, "cannot sync cache; leaving it unsealed");
                return;
            }
        }
        let id = CacheIdentity {
            magic: CACHE_IDENTITY_MAGIC.into(),
            cluster_uuid: self.cluster.cluster_uuid,
            format_generation: self.cluster.format_generation,
            node_uuid: self.node_uuid,
            boot_id: self.boot_id.clone(),
            sealed: true,
        };
        match write_identity(&self.cfg.root, &id) {
            Ok(()) => tracing::info!("cache sealed"),
            Err(e) => tracing::error!(error = %e, "cannot seal cache"),
        }
    }
}

fn quarantine(root: &Path, dir: &Path, why: &str) {
    let q = root.join("quarantine");
    let _ = std::fs::create_dir_all(&q);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("cache");
    let to = q.join(format!("{name}.{why}.{stamp}"));
    if let Err(e) = std::fs::rename(dir, &to) {
        tracing::error!(from = %dir.display(), error = %e, "cannot set cache aside; removing it");
        let _ = std::fs::remove_dir_all(dir);
    } else {
        tracing::warn!(to = %to.display(), "cache set aside, not pushed");
    }
}

fn set_aside_all(root: &Path, why: &str) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.len() == 6 && e.path().is_dir() {
            quarantine(root, &e.path(), why);
        }
    }
}

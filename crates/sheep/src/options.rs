//! Command-line options of the sheep daemon.

use clap::Parser;
use std::path::PathBuf;

/// The Sheepdog storage daemon. One per node: it stores object replicas, serves as the
/// gateway for its clients, and follows the cluster's membership.
#[derive(Parser, Debug, Clone)]
#[command(name = "sheep", version)]
pub struct Options {
    /// Store directory: this node's objects, identity and epoch history.
    #[arg(long, short = 'd')]
    pub dir: PathBuf,

    /// Address the peer protocol listens on (other sheep and dog connect here).
    #[arg(long, short = 'l', default_value = "127.0.0.1:7000")]
    pub listen: String,

    /// Cluster driver: `local:DIR` (every node on this host shares DIR).
    /// Default: `local:` and the store directory's parent followed by `cluster`.
    #[arg(long, short = 'c')]
    pub cluster: Option<String>,

    /// Failure domain of this node (a host, a rack): replicas go to distinct zones.
    #[arg(long, short = 'z', default_value_t = 0)]
    pub zone: u32,

    /// Virtual nodes on the placement ring: this node's share of the data.
    #[arg(long, default_value_t = placement::DEFAULT_VNODES)]
    pub vnodes: u32,

    /// Serve clients only; hold no data.
    #[arg(long, short = 'g')]
    pub gateway_only: bool,

    /// Log filter, e.g. `info`, `debug`, `sheep=debug`.
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// Address to serve VDIs over NBD on (e.g. 127.0.0.1:10809). Off when absent.
    #[arg(long)]
    pub nbd: Option<String>,

    /// Recovery rate limit in bytes per second (e.g. 50M); 0 for none. Changeable at run
    /// time with `dog node recovery set-throttle`.
    #[arg(long, default_value = "0", value_parser = proto::size::parse_size)]
    pub recovery_max_rate: u64,

    /// Size of the write-back object cache (e.g. 1G). Off when absent or 0; VDIs in
    /// `writeback` mode are then served as `writethrough` by this gateway.
    #[arg(long, value_parser = proto::size::parse_size)]
    pub cache_size: Option<u64>,

    /// Directory of the object cache (default: `cache` in the store directory).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,

    /// Dirty bytes not yet pushed at which writes wait for pushes (default: three
    /// quarters of the cache). Pushed data waiting for a sync is bounded by the cache size.
    #[arg(long, value_parser = proto::size::parse_size)]
    pub cache_dirty_max: Option<u64>,

    /// Seconds a FLUSH waits for enough replicas before failing with EIO.
    #[arg(long, default_value_t = 30)]
    pub cache_flush_timeout: u64,

    /// Objects pushed at once per VDI.
    #[arg(long, default_value_t = 8)]
    pub cache_push_concurrency: usize,

    /// A sequential stream of large writes (128 KiB or more each) goes around the
    /// cache, straight to the replicas as in `none` mode, once it has written this much
    /// (0: never). The cache is for bursts and random writes; a long stream through it
    /// costs more than one written around it.
    #[arg(long, value_parser = proto::size::parse_size, default_value = "64M")]
    pub cache_sequential_cutoff: u64,

    /// TEST ONLY: read the boot id from this file instead of the kernel (simulates a reboot).
    #[arg(long, hide = true)]
    pub boot_id_file: Option<PathBuf>,

    /// TEST ONLY: keep unsynced writes apart so a simulated power cut drops them.
    #[arg(long, hide = true)]
    pub fault_injection: bool,
}

impl Options {
    /// The cluster driver directory for the `local` driver.
    pub fn local_cluster_dir(&self) -> Result<PathBuf, String> {
        match &self.cluster {
            Some(spec) => match spec.split_once(':') {
                Some(("local", dir)) if !dir.is_empty() => Ok(PathBuf::from(dir)),
                _ => Err(format!(
                    "unsupported cluster driver '{spec}': expected local:DIR"
                )),
            },
            None => {
                let parent = self
                    .dir
                    .parent()
                    .map(|p| p.to_path_buf())
                    .unwrap_or_else(|| PathBuf::from("."));
                Ok(parent.join("cluster"))
            }
        }
    }

    /// Placement weight: gateway-only nodes put nothing on the ring.
    pub fn effective_vnodes(&self) -> u32 {
        if self.gateway_only {
            0
        } else {
            self.vnodes
        }
    }
}

impl Options {
    /// The cache configuration, when the cache is on.
    pub fn cache_config(&self) -> Option<crate::cache::CacheConfig> {
        let size = self.cache_size.filter(|s| *s > 0)?;
        Some(crate::cache::CacheConfig {
            root: self
                .cache_dir
                .clone()
                .unwrap_or_else(|| self.dir.join("cache")),
            size,
            dirty_max: self.cache_dirty_max.unwrap_or(size / 4 * 3).max(4 << 20),
            push_concurrency: self.cache_push_concurrency.max(1),
            sequential_cutoff: self.cache_sequential_cutoff,
            flush_timeout: std::time::Duration::from_secs(self.cache_flush_timeout.max(1)),
        })
    }
}

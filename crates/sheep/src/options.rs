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

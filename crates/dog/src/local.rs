//! `dog local ...`: a whole cluster of sheep processes on this host.
//!
//! The cluster lives in one directory: `local.json` (the options it was started with),
//! `cluster/` (the local driver's shared state), and `nodeN/` per node (store, `sheep.pid`,
//! `sheep.log`). Nodes run in the background, detached from the terminal.

use crate::conn::Sheep;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use proto::msg::{
    ClusterInfoReply, FormatRequest, NodeInfoReply, VdiCreateRequest, VdiInfo, VdiNameRequest,
};
use proto::size::{human, parse_size};
use proto::Opcode;
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DEFAULT_DIR: &str = "/tmp/sheepdog-local";
/// How long `up` and `start` wait for nodes to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `down` waits for a node to leave before killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const DEMO_VDI: &str = "demo";

#[derive(Args, Clone)]
pub struct DirArg {
    /// Directory holding the local cluster.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
}

#[derive(Subcommand)]
pub enum LocalCmd {
    /// Start N sheep on this host, format the cluster and create a demo VDI.
    Up {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 3)]
        copies: u32,
        /// Peer port of node 0; node i listens on PORT+i.
        #[arg(long, default_value_t = 7000)]
        port: u16,
        /// NBD port of node 0; node i serves NBD on NBD_PORT+i.
        #[arg(long, default_value_t = 10809)]
        nbd_port: u16,
        /// Size of the demo VDI.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        demo_size: u64,
        /// Do not create the demo VDI.
        #[arg(long)]
        no_demo: bool,
        /// Do not format the cluster (implies --no-demo).
        #[arg(long)]
        no_format: bool,
        /// Object size given to `cluster format`.
        #[arg(long, default_value = "4M", value_parser = parse_size)]
        object_size: u64,
        /// TEST ONLY: start every sheep with a fault-injecting store.
        #[arg(long, hide = true)]
        fault_injection: bool,
        /// Write-back object cache of every node (0 turns it off). The demo VDI uses it.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        cache_size: u64,
        /// Extra option passed to every sheep (repeatable), e.g. --sheep-arg=--cache-flush-timeout=5.
        #[arg(long = "sheep-arg", allow_hyphen_values = true)]
        sheep_args: Vec<String>,
    },
    /// Stop every node of the local cluster cleanly.
    Down {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Kill node I with SIGKILL (a crash).
    Kill {
        #[command(flatten)]
        dir: DirArg,
        index: u32,
    },
    /// Start node I again with the options it had.
    Start {
        #[command(flatten)]
        dir: DirArg,
        index: u32,
    },
}

/// What `up` was given; `start` reuses it.
#[derive(Serialize, Deserialize)]
struct LocalConfig {
    nodes: u32,
    port: u16,
    nbd_port: u16,
    fault_injection: bool,
    #[serde(default)]
    cache_size: u64,
    #[serde(default)]
    sheep_args: Vec<String>,
}

impl LocalConfig {
    fn peer_addr(&self, i: u32) -> String {
        format!("127.0.0.1:{}", self.port as u32 + i)
    }

    fn nbd_addr(&self, i: u32) -> String {
        format!("127.0.0.1:{}", self.nbd_port as u32 + i)
    }
}

fn node_dir(dir: &Path, i: u32) -> PathBuf {
    dir.join(format!("node{i}"))
}

fn load_config(dir: &Path) -> Result<LocalConfig> {
    let p = dir.join("local.json");
    let b = std::fs::read(&p)
        .with_context(|| format!("no local cluster at {} (run `dog local up`)", dir.display()))?;
    serde_json::from_slice(&b).with_context(|| format!("bad {}", p.display()))
}

/// The sheep binary: next to this dog, else on PATH.
fn sheep_binary() -> PathBuf {
    if let Ok(me) = std::env::current_exe() {
        let candidate = me.with_file_name("sheep");
        if candidate.exists() {
            return candidate;
        }
    }
    PathBuf::from("sheep")
}

/// The pid of node i if its process is running.
fn running_pid(dir: &Path, i: u32) -> Option<i32> {
    let s = std::fs::read_to_string(node_dir(dir, i).join("sheep.pid")).ok()?;
    let pid: i32 = s.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie (state Z) has exited already.
    let zombie = stat
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('Z'));
    // Right after spawn the child may still be inside execve, with an empty cmdline.
    let is_sheep = cmdline.is_empty() || String::from_utf8_lossy(&cmdline).contains("sheep");
    (is_sheep && !zombie).then_some(pid)
}

fn spawn_node(dir: &Path, cfg: &LocalConfig, i: u32) -> Result<()> {
    if let Some(pid) = running_pid(dir, i) {
        bail!("node {i} is already running (pid {pid})");
    }
    let nd = node_dir(dir, i);
    std::fs::create_dir_all(&nd)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(nd.join("sheep.log"))?;
    let mut cmd = std::process::Command::new(sheep_binary());
    cmd.arg("--dir")
        .arg(&nd)
        .arg("--listen")
        .arg(cfg.peer_addr(i))
        .arg("--cluster")
        .arg(format!("local:{}", dir.join("cluster").display()))
        .arg("--zone")
        .arg(i.to_string())
        .arg("--nbd")
        .arg(cfg.nbd_addr(i));
    if cfg.fault_injection {
        cmd.arg("--fault-injection");
    }
    if cfg.cache_size > 0 {
        cmd.arg("--cache-size").arg(cfg.cache_size.to_string());
    }
    cmd.args(&cfg.sheep_args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", sheep_binary().display()))?;
    std::fs::write(nd.join("sheep.pid"), child.id().to_string())?;
    Ok(())
}

/// Waits until node i answers NodeInfo as a serving member.
async fn wait_serving(dir: &Path, cfg: &LocalConfig, i: u32) -> Result<NodeInfoReply> {
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = cfg.peer_addr(i);
    let idx = i;
    loop {
        let last = match Sheep::connect(&addr).await {
            Ok(s) => match s.json::<_, NodeInfoReply>(Opcode::NodeInfo, &()).await {
                Ok(n) if n.serving => return Ok(n),
                Ok(n) => {
                    // A cluster that was shut down waits for all its last members: the
                    // node is up, and says what the cluster is waiting for.
                    let info: Option<ClusterInfoReply> =
                        s.json(Opcode::ClusterInfo, &()).await.ok();
                    match info {
                        Some(i) if i.status.starts_with("shut down") => {
                            eprintln!("node {idx} is up; cluster {}", i.status);
                            return Ok(n);
                        }
                        _ => "not serving yet".to_string(),
                    }
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if running_pid(dir, i).is_none() {
            bail!(
                "node {i} exited; see {}",
                node_dir(dir, i).join("sheep.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "node {i} at {addr} did not come up within {} s: {last}",
                START_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(cmd: LocalCmd) -> Result<()> {
    match cmd {
        LocalCmd::Up {
            dir,
            nodes,
            copies,
            port,
            nbd_port,
            demo_size,
            no_demo,
            no_format,
            object_size,
            fault_injection,
            cache_size,
            sheep_args,
        } => {
            let no_demo = no_demo || no_format;
            let dir = dir.dir;
            if nodes == 0 {
                bail!("--nodes must be at least 1");
            }
            if copies as u64 > nodes as u64 {
                bail!("{copies} copies need at least {copies} nodes, but --nodes is {nodes}");
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let dir = dir.canonicalize()?;
            if let Ok(old) = load_config(&dir) {
                if let Some(i) = (0..old.nodes).find(|&i| running_pid(&dir, i).is_some()) {
                    bail!("a local cluster is already running in {} (node {i}); `dog local down --dir {}` first", dir.display(), dir.display());
                }
            }
            let cfg = LocalConfig {
                nodes,
                port,
                nbd_port,
                fault_injection,
                cache_size,
                sheep_args,
            };
            std::fs::write(dir.join("local.json"), serde_json::to_vec_pretty(&cfg)?)?;
            for i in 0..nodes {
                spawn_node(&dir, &cfg, i)?;
            }
            for i in 0..nodes {
                wait_serving(&dir, &cfg, i).await?;
            }
            let sheep = Sheep::connect(&cfg.peer_addr(0)).await?;
            let info: ClusterInfoReply = sheep.json(Opcode::ClusterInfo, &()).await?;
            if info.config.is_none() && !no_format {
                let object_size =
                    u32::try_from(object_size).map_err(|_| anyhow!("object size too large"))?;
                let _: ClusterInfoReply = sheep
                    .json(
                        Opcode::ClusterFormat,
                        &FormatRequest {
                            copies,
                            object_size,
                        },
                    )
                    .await?;
            }
            if !no_demo {
                let req = VdiCreateRequest {
                    name: DEMO_VDI.into(),
                    size: demo_size,
                    copies: None,
                    min_copies: None,
                    cache_mode: (cache_size > 0).then(|| "writeback".to_string()),
                };
                match sheep.json::<_, VdiInfo>(Opcode::VdiCreate, &req).await {
                    Ok(_) => {}
                    Err(e) if e.to_string().contains("exists") => {}
                    Err(e) => return Err(e),
                }
                let _: VdiInfo = sheep
                    .json(
                        Opcode::VdiInfo,
                        &VdiNameRequest {
                            name: DEMO_VDI.into(),
                        },
                    )
                    .await?;
            }
            if no_format {
                println!(
                    "local cluster up in {}: {nodes} node(s), not formatted (dog cluster format)",
                    dir.display()
                );
            } else {
                println!(
                    "local cluster up in {}: {nodes} node(s), {copies} copies",
                    dir.display()
                );
            }
            for i in 0..nodes {
                println!(
                    "  node {i}: dog -a {}   nbd {}",
                    cfg.peer_addr(i),
                    cfg.nbd_addr(i)
                );
            }
            if !no_demo {
                let url = format!("nbd://{}/{DEMO_VDI}", cfg.nbd_addr(0));
                let mode = if cache_size > 0 {
                    format!("writeback, {} cache per node", human(cache_size))
                } else {
                    "none".to_string()
                };
                println!(
                    "demo VDI '{DEMO_VDI}' ({}, cache {mode}): {url}",
                    human(demo_size)
                );
                println!(
                    "try:  qemu-io -f raw {url} -c 'write -P 0xab 0 4M' -c 'read -P 0xab 0 4M'"
                );
            }
            println!(
                "next: dog node list; dog vdi list; dog local down --dir {}",
                dir.display()
            );
        }
        LocalCmd::Down { dir } => {
            let dir = dir.dir;
            let cfg = load_config(&dir)?;
            let mut pids = Vec::new();
            for i in 0..cfg.nodes {
                if let Some(pid) = running_pid(&dir, i) {
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                    pids.push((i, pid));
                }
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            for (i, pid) in pids {
                while running_pid(&dir, i) == Some(pid) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if running_pid(&dir, i) == Some(pid) {
                    eprintln!("node {i} (pid {pid}) did not stop in time; killing it");
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            println!("local cluster in {} is down", dir.display());
        }
        LocalCmd::Kill { dir, index } => {
            let dir = dir.dir;
            let cfg = load_config(&dir)?;
            if index >= cfg.nodes {
                bail!(
                    "no node {index}: the local cluster has {} node(s)",
                    cfg.nodes
                );
            }
            let pid =
                running_pid(&dir, index).ok_or_else(|| anyhow!("node {index} is not running"))?;
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while running_pid(&dir, index).is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!("killed node {index} (pid {pid})");
        }
        LocalCmd::Start { dir, index } => {
            let dir = dir.dir;
            let mut cfg = load_config(&dir)?;
            if index > cfg.nodes {
                bail!(
                    "node indices are consecutive: the next new node is {}",
                    cfg.nodes
                );
            }
            if index == cfg.nodes {
                // A new node: it joins the running cluster at a new epoch.
                cfg.nodes += 1;
                std::fs::write(dir.join("local.json"), serde_json::to_vec_pretty(&cfg)?)?;
            }
            spawn_node(&dir, &cfg, index)?;
            let n = wait_serving(&dir, &cfg, index).await?;
            println!(
                "node {index} is back at {} (epoch {})",
                cfg.peer_addr(index),
                n.epoch
            );
        }
    }
    Ok(())
}

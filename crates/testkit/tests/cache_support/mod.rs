//! Helpers shared by the write-back cache tests (`cache.rs`, `cache_faults.rs`; issue 5):
//! a local cluster started with cache options (`dog local up --cache-size SIZE
//! --sheep-arg=...`, which `testkit::LocalCluster` cannot pass), cache and lock probes,
//! and NBD data helpers that keep a byte model of the VDI next to an open `nbdsh`.
//!
//! Everything drives the release binaries from the outside, like a user would.

#![allow(dead_code)]

use crate::common::nbd::{py_str, run, tool, Nbdsh, MIB, TOOL_TIMEOUT};
use rand::Rng;
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use testkit::{bin, describe, wait_until, DOG_TIMEOUT};

/// How long a membership change may take to show in `dog node list`.
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a gateway may take to push, flush and release a VDI's lock.
pub const UNLOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request the helpers send in one NBD command.
const CHUNK: usize = 4 * MIB;
/// Peer and NBD port bases are drawn from these ranges (below Linux's ephemeral ports,
/// never 7000 or 10809).
const PEER_PORT_RANGE: std::ops::Range<u16> = 20000..26000;
const NBD_PORT_RANGE: std::ops::Range<u16> = 26000..32000;
/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// How to start a [`CacheCluster`].
#[derive(Clone, Debug)]
pub struct CacheOpts {
    pub nodes: u32,
    pub copies: u32,
    /// `dog local up --cache-size`.
    pub cache_size: String,
    /// `--sheep-arg=...` values, passed to every sheep (and kept for `dog local start`).
    pub sheep_args: Vec<String>,
    /// Every sheep runs the fault-injecting store (simulated power cuts).
    pub fault_injection: bool,
}

impl Default for CacheOpts {
    /// Three nodes, three copies, a 256 MiB cache per node, no fault injection.
    fn default() -> CacheOpts {
        CacheOpts {
            nodes: 3,
            copies: 3,
            cache_size: "256M".into(),
            sheep_args: Vec::new(),
            fault_injection: false,
        }
    }
}

/// A local cluster of real `sheep` processes with the write-back cache on, in a fresh
/// temporary directory on free ports. Dropping it prints the log tails (when the test is
/// failing), stops every node and removes the directory (`SHEEPDOG_KEEP_DIR=1` keeps it).
pub struct CacheCluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    nodes: u32,
    peer_port: u16,
    nbd_port: u16,
}

impl CacheCluster {
    /// Starts the cluster with `dog local up` (formatted, no demo VDI). With
    /// `prepare`, a file is made in the cluster directory first (e.g. a boot-id file the
    /// sheep args name): `prepare(dir)` returns extra sheep args.
    pub fn up_with(opts: CacheOpts, prepare: impl FnOnce(&Path) -> Vec<String>) -> CacheCluster {
        let dir = tempfile::Builder::new()
            .prefix("sheepdog-cache-test-")
            .tempdir()
            .expect("creating a temp dir");
        let (peer_port, nbd_port) = free_port_ranges(opts.nodes);
        let cluster = CacheCluster {
            path: dir.path().to_owned(),
            dir: Some(dir),
            nodes: opts.nodes,
            peer_port,
            nbd_port,
        };
        let mut sheep_args = opts.sheep_args.clone();
        sheep_args.extend(prepare(&cluster.path));
        let mut args = vec![
            "--nodes".to_string(),
            opts.nodes.to_string(),
            "--copies".into(),
            opts.copies.to_string(),
            "--port".into(),
            peer_port.to_string(),
            "--nbd-port".into(),
            nbd_port.to_string(),
            "--cache-size".into(),
            opts.cache_size.clone(),
            "--no-demo".into(),
        ];
        if opts.fault_injection {
            args.push("--fault-injection".into());
        }
        for a in &sheep_args {
            args.push(format!("--sheep-arg={a}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cluster.local("up", &args);
        assert!(
            out.status.success(),
            "dog local up {args:?} failed\n{}",
            describe(&out)
        );
        eprintln!(
            "[cache] cluster of {} node(s) up in {} (peer port {peer_port}, nbd port {nbd_port}, cache {}, sheep args {sheep_args:?})",
            opts.nodes,
            cluster.path.display(),
            opts.cache_size
        );
        if opts.fault_injection {
            for i in 0..opts.nodes {
                let info = cluster.dog_json(i, &["node", "info"]);
                assert_eq!(
                    info["fault_injection"], true,
                    "node {i} is not in fault-injection mode: {info}"
                );
            }
        }
        cluster
    }

    /// Starts the cluster with `dog local up` (formatted, no demo VDI).
    pub fn up(opts: CacheOpts) -> CacheCluster {
        CacheCluster::up_with(opts, |_| Vec::new())
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn nodes(&self) -> u32 {
        self.nodes
    }

    /// Directory of node `i` (`store/`, `cache/`, `sheep.pid`, `sheep.log`).
    pub fn node_dir(&self, i: u32) -> PathBuf {
        self.path.join(format!("node{i}"))
    }

    /// Node `i`'s cache root (the sheep default: `cache` in its store directory).
    pub fn cache_root(&self, i: u32) -> PathBuf {
        self.node_dir(i).join("cache")
    }

    /// Node `i`'s cache directory of VDI `vid`.
    pub fn vdi_cache_dir(&self, i: u32, vid: u64) -> PathBuf {
        self.cache_root(i).join(format!("{vid:06x}"))
    }

    /// Names of the directories node `i` has set aside (`cache/quarantine/`).
    pub fn quarantined(&self, i: u32) -> Vec<String> {
        std::fs::read_dir(self.cache_root(i).join("quarantine"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn peer_addr(&self, i: u32) -> String {
        format!("127.0.0.1:{}", self.peer_port as u32 + i)
    }

    /// NBD URL of export `export` (`NAME` or `NAME/ro`) on node `i`.
    pub fn nbd_url(&self, i: u32, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port as u32 + i)
    }

    /// Node `i`'s log so far.
    pub fn node_log(&self, i: u32) -> String {
        std::fs::read(self.node_dir(i).join("sheep.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `dog local <sub> --dir <dir> <args>`.
    pub fn local(&self, sub: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("dog"));
        cmd.args(["local", sub, "--dir"]).arg(&self.path).args(args);
        run(cmd, DOG_TIMEOUT)
    }

    /// `dog -a <node i> <args>`.
    pub fn dog_at(&self, i: u32, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("dog"));
        cmd.arg("-a").arg(self.peer_addr(i)).args(args);
        run(cmd, DOG_TIMEOUT)
    }

    /// `dog -a <node i> <args>` with `input` on stdin (for `vdi write`).
    pub fn dog_at_stdin(&self, i: u32, args: &[&str], input: &[u8]) -> Output {
        let mut cmd = Command::new(bin("dog"));
        cmd.arg("-a").arg(self.peer_addr(i)).args(args);
        testkit::run_command(cmd, Some(input), DOG_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `dog -a <node i> <args>`, asserting success; its stdout.
    pub fn dog_ok(&self, i: u32, args: &[&str]) -> String {
        let out = self.dog_at(i, args);
        assert!(
            out.status.success(),
            "dog -a {} {} failed\n{}",
            self.peer_addr(i),
            args.join(" "),
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `dog -a <node i> <args> --json`, asserting success; the parsed output.
    pub fn dog_json(&self, i: u32, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.dog_ok(i, &all);
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "dog {} --json printed bad JSON ({e}):\n{text}",
                args.join(" ")
            )
        })
    }

    /// Creates a writeback VDI and switches writethrough-until-first-flush off, so its
    /// writes land in the gateway's cache from the first one. `extra`: more create args.
    pub fn create_writeback_vdi(&self, name: &str, size: &str, extra: &[&str]) -> u64 {
        let mut args = vec!["vdi", "create", name, size, "--cache", "writeback"];
        args.extend(extra);
        self.dog_ok(0, &args);
        self.dog_ok(0, &["vdi", "set", name, "writethrough-until-flush", "off"]);
        self.vid(name)
    }

    /// The vid of VDI `name` (`dog vdi list --json`).
    pub fn vid(&self, name: &str) -> u64 {
        let list = self.dog_json(0, &["vdi", "list"]);
        let vdis = list
            .as_array()
            .or_else(|| list["vdis"].as_array())
            .unwrap_or_else(|| panic!("dog vdi list --json: no list: {list}"));
        vdis.iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["vid"].as_u64())
            .unwrap_or_else(|| panic!("VDI {name} not in dog vdi list: {list}"))
    }

    /// The cache entry of VDI `name` from `dog -a <node i> vdi cache info NAME --json`
    /// (dog routes it to the lock holder), if that gateway caches it.
    pub fn cache_info(&self, i: u32, name: &str) -> Option<Value> {
        let info = self.dog_json(i, &["vdi", "cache", "info", name]);
        info["caches"]
            .as_array()
            .unwrap_or_else(|| panic!("cache info without caches: {info}"))
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }

    /// `cache_info`, asserting the gateway caches the VDI.
    pub fn cache_stats(&self, i: u32, name: &str) -> Value {
        self.cache_info(i, name).unwrap_or_else(|| {
            panic!(
                "no cache of VDI {name} on the gateway dog -a {} routes to",
                self.peer_addr(i)
            )
        })
    }

    /// Dirty bytes of VDI `name` in the cache of the gateway holding it.
    pub fn dirty_bytes(&self, i: u32, name: &str) -> u64 {
        let c = self.cache_stats(i, name);
        c["dirty_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("cache info without dirty_bytes: {c}"))
    }

    /// Asserts the gateway holding `name` has more than zero dirty bytes (the cache, not
    /// writethrough, holds the data); returns them.
    pub fn assert_dirty(&self, i: u32, name: &str, what: &str) -> u64 {
        let c = self.cache_stats(i, name);
        let dirty = c["dirty_bytes"].as_u64().unwrap_or(0);
        assert!(
            dirty > 0,
            "{what}: expected dirty data in the cache of {name}, got {c}"
        );
        eprintln!("[cache] {what}: {name} has {dirty} dirty bytes");
        dirty
    }

    /// Crashes node `i` with SIGKILL (`dog local kill`).
    pub fn kill(&self, i: u32) {
        let out = self.local("kill", &[&i.to_string()]);
        assert!(
            out.status.success(),
            "dog local kill {i} failed\n{}",
            describe(&out)
        );
    }

    /// Starts node `i` again (`dog local start`), asserting it comes up serving.
    pub fn start(&self, i: u32) {
        let started = Instant::now();
        let out = self.local("start", &[&i.to_string()]);
        assert!(
            out.status.success(),
            "dog local start {i} failed\n{}",
            describe(&out)
        );
        eprintln!(
            "[cache] node {i} restarted in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    /// Stops node `i` cleanly (SIGTERM: drain, push, seal, leave) and waits for it to exit.
    pub fn stop(&self, i: u32) {
        let pid = self
            .node_pid(i)
            .unwrap_or_else(|| panic!("node {i} is not running"));
        // SAFETY: kill(2) on a pid checked to be this cluster's sheep.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let gone = wait_until(Duration::from_secs(90), Duration::from_millis(50), || {
            self.node_pid(i).is_none()
        });
        assert!(gone, "node {i} did not exit within 90 s of SIGTERM");
    }

    /// Simulates a power cut of node `i` (`dog node power-cut`: unsynced store writes are
    /// dropped, the process dies) and waits for it to die.
    pub fn power_cut(&self, i: u32) {
        self.dog_ok(i, &["node", "power-cut"]);
        let died = wait_until(Duration::from_secs(15), Duration::from_millis(20), || {
            self.node_pid(i).is_none()
        });
        assert!(died, "node {i} still running after its power cut");
    }

    /// The pid of node `i` if that process is a live sheep of this cluster.
    pub fn node_pid(&self, i: u32) -> Option<i32> {
        let text = std::fs::read_to_string(self.node_dir(i).join("sheep.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'));
        let ours = cmdline.contains("sheep") && cmdline.contains(&*self.path.to_string_lossy());
        (ours && !zombie).then_some(pid)
    }

    /// Members `dog node list` shows when asked at node `i`, if it answers.
    pub fn member_count(&self, i: u32) -> Option<usize> {
        let out = self.dog_at(i, &["node", "list", "--json"]);
        let members: Value = serde_json::from_slice(&out.stdout).ok()?;
        out.status
            .success()
            .then(|| members.as_array().map(Vec::len))
            .flatten()
    }

    /// Waits until node `i` lists exactly `n` members, failing the test otherwise.
    pub fn wait_members(&self, i: u32, n: usize) {
        let ok = wait_until(MEMBERSHIP_TIMEOUT, Duration::from_millis(200), || {
            self.member_count(i) == Some(n)
        });
        assert!(
            ok,
            "node {i} does not list {n} members within {} s (it lists {:?})",
            MEMBERSHIP_TIMEOUT.as_secs(),
            self.member_count(i)
        );
    }

    /// The lock entry of VDI `name` (`dog vdi lock list --json`, asked at node `i`).
    pub fn lock_of(&self, i: u32, name: &str) -> Option<Value> {
        let list = self.dog_json(i, &["vdi", "lock", "list"]);
        let locks = list
            .as_array()
            .or_else(|| list["locks"].as_array())
            .cloned()
            .unwrap_or_default();
        locks.into_iter().find(|l| l["name"] == name)
    }

    /// Waits until VDI `name` is not locked (the writer disconnected, its gateway pushed,
    /// flushed and released it), failing the test otherwise.
    pub fn wait_unlocked(&self, i: u32, name: &str) {
        let ok = wait_until(UNLOCK_TIMEOUT, Duration::from_millis(200), || {
            self.lock_of(i, name).is_none()
        });
        assert!(
            ok,
            "VDI {name} is still locked after {} s: {:?}",
            UNLOCK_TIMEOUT.as_secs(),
            self.lock_of(i, name)
        );
    }

    /// Asserts node `i` runs and its log has no panic.
    pub fn assert_alive_without_panic(&self, i: u32) {
        assert!(self.node_pid(i).is_some(), "node {i} is no longer running");
        self.assert_no_panic(i);
    }

    /// Asserts node `i`'s log has no panic (it may be down).
    pub fn assert_no_panic(&self, i: u32) {
        let log = self.node_log(i);
        assert!(
            !log.contains("panicked"),
            "node {i} logged a panic:\n{}",
            tail(&log, LOG_TAIL_LINES)
        );
    }

    fn print_log_tails(&self) {
        for i in 0..self.nodes {
            eprintln!(
                "----- node {i} log tail ({}/sheep.log) -----",
                self.node_dir(i).display()
            );
            eprintln!("{}", tail(&self.node_log(i), LOG_TAIL_LINES));
        }
        eprintln!("----- end of node logs -----");
    }
}

impl Drop for CacheCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log_tails();
        }
        let mut cmd = Command::new(bin("dog"));
        cmd.args(["local", "down", "--dir"]).arg(&self.path);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(cmd, Duration::from_secs(120))
        }));
        for i in 0..self.nodes {
            if let Some(pid) = self.node_pid(i) {
                eprintln!("[cache] node {i} (pid {pid}) survived `dog local down`; killing it");
                // SAFETY: kill(2) on a pid checked to be this cluster's sheep.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::env::var_os("SHEEPDOG_KEEP_DIR").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("[cache] keeping {}", dir.keep().display());
            }
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether every port of `ports` can be bound on 127.0.0.1 right now.
fn all_bindable(mut ports: impl Iterator<Item = u16>) -> bool {
    ports.all(|p| p != 7000 && p != 10809 && TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// Random bases P (peer) and Q (NBD) with P..P+n and Q..Q+n all free.
fn free_port_ranges(n: u32) -> (u16, u16) {
    let n = u16::try_from(n).expect("node count fits in a port range");
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let peer = rng.gen_range(PEER_PORT_RANGE.start..PEER_PORT_RANGE.end - n);
        let nbd = rng.gen_range(NBD_PORT_RANGE.start..NBD_PORT_RANGE.end - n);
        if all_bindable((peer..peer + n).chain(nbd..nbd + n)) {
            return (peer, nbd);
        }
    }
    panic!("no free port ranges for {n} node(s)");
}

// ----- data over NBD -------------------------------------------------------------------

/// An open `nbdsh` connection with the model of what the VDI must hold and a scratch file
/// to stage written data (libnbd reads it from the file).
pub struct Writer {
    pub h: Nbdsh,
    pub model: Vec<u8>,
    scratch: PathBuf,
    _scratch_dir: tempfile::TempDir,
}

impl Writer {
    /// Connects to `url`; the model starts as `model` (zeros for a new VDI).
    pub fn connect(label: &str, url: &str, model: Vec<u8>) -> Writer {
        let dir = tempfile::tempdir().expect("scratch dir");
        Writer {
            h: Nbdsh::connect(label, url),
            model,
            scratch: dir.path().join("data"),
            _scratch_dir: dir,
        }
    }

    /// Writes `data` at `offset` (4 MiB requests, all in flight at once) and applies it to
    /// the model. Returns when every write is acknowledged.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        // The scratch file holds the data at the VDI offsets it goes to.
        let mut staged = vec![0u8; offset + data.len()];
        staged[offset..].copy_from_slice(data);
        std::fs::write(&self.scratch, &staged).expect("writing the scratch file");
        let reqs: Vec<[usize; 2]> = (offset..offset + data.len())
            .step_by(CHUNK)
            .map(|at| [at, CHUNK.min(offset + data.len() - at)])
            .collect();
        let reqs = serde_json::to_string(&reqs).expect("requests as JSON");
        let path = py_str(&self.scratch.to_string_lossy());
        self.h.ok(&format!("writes_in_flight({path}, {reqs})"));
        self.model[offset..offset + data.len()].copy_from_slice(data);
    }

    /// TRIMs `[offset, offset + len)` and zeroes it in the model.
    pub fn trim(&mut self, offset: usize, len: usize) {
        self.h.ok(&format!("h.trim({len}, {offset})"));
        self.model[offset..offset + len].fill(0);
    }

    /// Sends FLUSH, which must succeed.
    pub fn flush(&mut self) {
        self.h.flush();
    }

    /// Asserts the export holds exactly the model.
    pub fn assert_model(&mut self, what: &str) {
        let model = std::mem::take(&mut self.model);
        self.h.assert_content(&model, what);
        self.model = model;
    }
}

/// Asserts export `url` holds exactly `model` (read with a fresh nbdsh, closed after).
pub fn assert_export_holds(url: &str, model: &[u8], what: &str) {
    let mut h = Nbdsh::connect(what, url);
    h.assert_content(model, what);
    h.close();
}

/// `nbdinfo --map --json URL`: (offset, length, type) per extent; bit 0 of type is "hole",
/// bit 1 "zero".
pub fn nbdinfo_map(url: &str) -> Vec<(u64, u64, u64)> {
    let mut cmd = tool("nbdinfo");
    cmd.args(["--map", "--json", url]);
    let out = run(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "nbdinfo --map {url} failed\n{}",
        describe(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "nbdinfo --map --json printed bad JSON ({e})\n{}",
            describe(&out)
        )
    });
    v.as_array()
        .unwrap_or_else(|| panic!("nbdinfo --map --json: not a list: {v}"))
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("extent offset"),
                e["length"].as_u64().expect("extent length"),
                e["type"].as_u64().expect("extent type"),
            )
        })
        .collect()
}

/// Asserts no extent `nbdinfo --map` reports as a hole covers non-zero data of `model`
/// (dirty data must never look like a hole); returns the map.
pub fn assert_no_data_in_holes(url: &str, model: &[u8], what: &str) -> Vec<(u64, u64, u64)> {
    let map = nbdinfo_map(url);
    let mut covered = 0u64;
    for &(offset, length, kind) in &map {
        assert_eq!(offset, covered, "{what}: nbdinfo --map has a gap: {map:?}");
        covered += length;
        if kind & 1 == 0 {
            continue;
        }
        let (s, e) = (
            offset as usize,
            (offset + length).min(model.len() as u64) as usize,
        );
        if let Some(k) = model[s..e].iter().position(|b| *b != 0) {
            panic!(
                "{what}: nbdinfo --map reports [{offset}, {}) as a hole (type {kind}), but byte {} holds data; map: {map:?}",
                offset + length,
                s + k
            );
        }
    }
    assert_eq!(
        covered,
        model.len() as u64,
        "{what}: nbdinfo --map does not cover the VDI: {map:?}"
    );
    map
}

/// The map type of the extent containing `offset`.
pub fn map_type_at(map: &[(u64, u64, u64)], offset: u64) -> u64 {
    map.iter()
        .find(|(o, l, _)| *o <= offset && offset < o + l)
        .map(|e| e.2)
        .unwrap_or_else(|| panic!("no extent at {offset}: {map:?}"))
}

/// Bytes the data files (`obj-*`) in a VDI's cache directory occupy on disk (they are
/// sparse: allocated blocks, not lengths).
pub fn cache_data_bytes_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("obj-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

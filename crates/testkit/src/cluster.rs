//! [`LocalCluster`]: a cluster of real `sheep` processes started with `dog local up` in a
//! fresh temporary directory on free ports, and stopped (whatever happens) when dropped.

use crate::{bin, describe, run_command, wait_until, DOG_TIMEOUT};
use rand::Rng;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Ports used by a developer's own cluster; tests never take them.
const RESERVED_PORTS: [u16; 2] = [7000, 10809];
/// Peer port bases are drawn from here, NBD port bases from the range above it; both
/// stay below Linux's ephemeral range (32768..) where outgoing connections take ports.
const PEER_PORT_RANGE: std::ops::Range<u16> = 20000..26000;
const NBD_PORT_RANGE: std::ops::Range<u16> = 26000..32000;
const PORT_PICK_ATTEMPTS_MAX: usize = 200;
/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// How to start a [`LocalCluster`].
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// Number of sheep processes (node i listens on peer port P+i and NBD port Q+i).
    pub nodes: u32,
    /// Default copies given to `cluster format`.
    pub copies: u32,
    /// Start every sheep with the fault-injecting store (simulated power cuts).
    pub fault_injection: bool,
    /// Leave the cluster unformatted (no demo VDI either).
    pub no_format: bool,
    /// Create `dog local up`'s demo VDI.
    pub demo: bool,
}

impl Default for ClusterOpts {
    /// Three nodes, three copies, formatted, no demo VDI, no fault injection.
    fn default() -> ClusterOpts {
        ClusterOpts {
            nodes: 3,
            copies: 3,
            fault_injection: false,
            no_format: false,
            demo: false,
        }
    }
}

/// A cluster of real `sheep` processes started with `dog local up` in a fresh temporary
/// directory on free ports. Dropping it stops every node (`dog local down`, then SIGKILL
/// for stragglers) and removes the directory; if the test is failing, it first prints
/// the tail of every node's log. Set `SHEEPDOG_KEEP_DIR=1` to keep the directory.
pub struct LocalCluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    nodes: u32,
    peer_port: u16,
    nbd_port: u16,
}

impl LocalCluster {
    /// Starts a cluster and waits until `dog local up` says it is ready.
    pub fn up(opts: ClusterOpts) -> LocalCluster {
        let dir = tempfile::Builder::new()
            .prefix("sheepdog-test-")
            .tempdir()
            .expect("creating a temp dir");
        let (peer_port, nbd_port) = free_port_ranges(opts.nodes);
        let cluster = LocalCluster {
            path: dir.path().to_owned(),
            dir: Some(dir),
            nodes: opts.nodes,
            peer_port,
            nbd_port,
        };
        let (nodes, copies) = (opts.nodes.to_string(), opts.copies.to_string());
        let (port, nbd) = (peer_port.to_string(), nbd_port.to_string());
        let mut args = vec![
            "--nodes",
            &nodes,
            "--copies",
            &copies,
            "--port",
            &port,
            "--nbd-port",
            &nbd,
        ];
        if opts.fault_injection {
            args.push("--fault-injection");
        }
        if opts.no_format {
            args.push("--no-format");
        }
        if !opts.demo {
            args.push("--no-demo");
        }
        let out = cluster.local("up", &args);
        assert!(
            out.status.success(),
            "dog local up failed\n{}",
            describe(&out)
        );
        eprintln!(
            "[testkit] cluster of {} node(s) up in {} (peer port {peer_port}, nbd port {nbd_port})",
            opts.nodes,
            cluster.path.display()
        );
        cluster
    }

    /// The cluster's directory (`local.json`, `cluster/`, `node<i>/`).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// Number of nodes the cluster was started with.
    pub fn nodes(&self) -> u32 {
        self.nodes
    }

    /// Directory of node `i` (its `store/`, `sheep.pid`, `sheep.log`).
    pub fn node_dir(&self, i: u32) -> PathBuf {
        self.path.join(format!("node{i}"))
    }

    /// Peer address of node `i` (what `dog -a` takes).
    pub fn peer_addr(&self, i: u32) -> String {
        format!("127.0.0.1:{}", self.peer_port as u32 + i)
    }

    /// NBD URL of VDI `vdi` exported by node `i`.
    pub fn nbd_url(&self, i: u32, vdi: &str) -> String {
        format!("nbd://127.0.0.1:{}/{vdi}", self.nbd_port as u32 + i)
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
        run_command(cmd, None, DOG_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `dog -a <node 0> <args>`.
    pub fn dog(&self, args: &[&str]) -> Output {
        self.dog_at(0, args)
    }

    /// `dog -a <node i> <args>`.
    pub fn dog_at(&self, i: u32, args: &[&str]) -> Output {
        self.dog_at_stdin(i, args, None)
    }

    /// `dog -a <node i> <args>` with `input` on its stdin (for `vdi write`).
    pub fn dog_at_stdin(&self, i: u32, args: &[&str], input: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(bin("dog"));
        cmd.arg("-a").arg(self.peer_addr(i)).args(args);
        run_command(cmd, input, DOG_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `dog -a <node 0> <args>`, asserting success; its stdout.
    pub fn dog_ok(&self, args: &[&str]) -> String {
        self.dog_at_ok(0, args)
    }

    /// `dog -a <node i> <args>`, asserting success; its stdout.
    pub fn dog_at_ok(&self, i: u32, args: &[&str]) -> String {
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
    pub fn dog_json(&self, i: u32, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.dog_at_ok(i, &all);
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "dog {} --json printed bad JSON ({e}):\n{text}",
                args.join(" ")
            )
        })
    }

    /// Writes `data` into `vdi` at `offset` through node `i` (`dog vdi write`), asserting
    /// success; `durable` adds `--durable`.
    pub fn write_vdi(&self, i: u32, vdi: &str, offset: u64, data: &[u8], durable: bool) {
        let (off, len) = (offset.to_string(), data.len().to_string());
        let mut args = vec!["vdi", "write", vdi, &off, &len];
        if durable {
            args.push("--durable");
        }
        let out = self.dog_at_stdin(i, &args, Some(data));
        assert!(
            out.status.success(),
            "dog -a {} {} failed\n{}",
            self.peer_addr(i),
            args.join(" "),
            describe(&out)
        );
    }

    /// Reads `len` bytes of `vdi` at `offset` through node `i` (`dog vdi read`), asserting
    /// success and the length.
    pub fn read_vdi(&self, i: u32, vdi: &str, offset: u64, len: u64) -> Vec<u8> {
        let (off, n) = (offset.to_string(), len.to_string());
        let out = self.dog_at(i, &["vdi", "read", vdi, &off, &n]);
        assert!(
            out.status.success(),
            "dog -a {} vdi read {vdi} {off} {n} failed\n{}",
            self.peer_addr(i),
            describe(&out)
        );
        assert_eq!(
            out.stdout.len() as u64,
            len,
            "dog vdi read {vdi} {off} {n} returned a short read"
        );
        out.stdout
    }

    /// The number of members `dog node list` shows when asked at node `i`, if it answers.
    pub fn member_count(&self, i: u32) -> Option<usize> {
        let out = self.dog_at(i, &["node", "list", "--json"]);
        let members: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        out.status
            .success()
            .then(|| members.as_array().map(Vec::len))
            .flatten()
    }

    /// Waits until node `i` lists exactly `n` members; false after `timeout`.
    pub fn wait_members(&self, i: u32, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, Duration::from_millis(200), || {
            self.member_count(i) == Some(n)
        })
    }

    /// Waits until node `i` lists `n` members; fails the test after 30 s.
    pub fn assert_members(&self, i: u32, n: usize) {
        const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);
        assert!(
            self.wait_members(i, n, MEMBERSHIP_TIMEOUT),
            "node {i} does not list {n} members after {} s (it lists {:?})",
            MEMBERSHIP_TIMEOUT.as_secs(),
            self.member_count(i)
        );
    }

    /// `dog node recovery --wait` asked at node `i` (at most 110 s): blocks until every
    /// member has recovered at the current epoch; the final per-node progress report.
    pub fn wait_recovered(&self, i: u32) -> serde_json::Value {
        let report = self.dog_json(i, &["node", "recovery", "--wait", "--timeout", "110"]);
        assert_eq!(
            report["done"], true,
            "dog node recovery --wait returned before recovery was done: {report:#}"
        );
        report
    }

    /// `dog cluster check --json` at node `i` must exit 0 with no problem (`when` says
    /// at which point of the test); the number of objects checked.
    pub fn assert_check_clean(&self, i: u32, when: &str) -> u64 {
        let out = self.dog_at(i, &["cluster", "check", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "dog cluster check --json printed bad JSON ({e})\n{}",
                describe(&out)
            )
        });
        let problems = report["problems"].as_array().cloned().unwrap_or_default();
        assert!(
            out.status.success() && problems.is_empty(),
            "{when}: dog cluster check is not clean: {} problem(s)\n{:#}\n{}",
            problems.len(),
            report["problems"],
            describe(&out)
        );
        report["objects_checked"]
            .as_u64()
            .unwrap_or_else(|| panic!("check report has no objects_checked: {report}"))
    }

    /// Crashes node `i` (`dog local kill`, SIGKILL), asserting success.
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
        let out = self.local("start", &[&i.to_string()]);
        assert!(
            out.status.success(),
            "dog local start {i} failed (node {i}'s process running afterwards: {})\n{}",
            self.node_pid(i).is_some(),
            describe(&out)
        );
    }

    /// The pid in node `i`'s pid file, if that process is still a live sheep of this cluster.
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

    fn print_log_tails(&self) {
        for i in 0..self.nodes {
            let log = self.node_log(i);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "----- node {i} log tail ({}/sheep.log) -----",
                self.node_dir(i).display()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
        eprintln!("----- end of node logs -----");
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log_tails();
        }
        let mut cmd = Command::new(bin("dog"));
        cmd.args(["local", "down", "--dir"]).arg(&self.path);
        if let Err(e) = run_command(cmd, None, Duration::from_secs(60)) {
            eprintln!("[testkit] {e}");
        }
        for i in 0..self.nodes {
            if let Some(pid) = self.node_pid(i) {
                eprintln!("[testkit] node {i} (pid {pid}) survived `dog local down`; killing it");
                // SAFETY: kill(2) on a pid we checked is this cluster's sheep.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::env::var_os("SHEEPDOG_KEEP_DIR").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("[testkit] keeping {}", dir.keep().display());
            }
        }
    }
}

/// Whether every port of `ports` can be bound on 127.0.0.1 right now.
fn all_bindable(mut ports: impl Iterator<Item = u16>) -> bool {
    ports.all(|p| !RESERVED_PORTS.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// Random bases P (peer) and Q (NBD) with P..P+n and Q..Q+n all free.
fn free_port_ranges(n: u32) -> (u16, u16) {
    let n = u16::try_from(n).expect("node count fits in a port range");
    let mut rng = rand::thread_rng();
    for _ in 0..PORT_PICK_ATTEMPTS_MAX {
        let peer = rng.gen_range(PEER_PORT_RANGE.start..PEER_PORT_RANGE.end - n);
        let nbd = rng.gen_range(NBD_PORT_RANGE.start..NBD_PORT_RANGE.end - n);
        if all_bindable((peer..peer + n).chain(nbd..nbd + n)) {
            return (peer, nbd);
        }
    }
    panic!("no free port ranges for {n} node(s) after {PORT_PICK_ATTEMPTS_MAX} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_avoid_reserved_ports_and_are_free() {
        let (peer, nbd) = free_port_ranges(3);
        for p in (peer..peer + 3).chain(nbd..nbd + 3) {
            assert!(!RESERVED_PORTS.contains(&p));
            assert!(TcpListener::bind(("127.0.0.1", p)).is_ok());
        }
    }
}

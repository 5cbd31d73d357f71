//! Helpers for the NBD integration tests (issue 3): running real NBD clients (qemu-io,
//! qemu-img, nbdinfo, fio, nbdfuse) with a time limit, an interactive `nbdsh` session
//! driven line by line from Rust, a raw NBD client for protocol-violation tests, and
//! small cluster probes (sync counters, power cuts, VDI locks).
//!
//! Every external tool is looked up with [`testkit::require_tool`], so a missing tool
//! fails the test loudly instead of skipping it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use testkit::tool;
use testkit::{describe, sha256_of, wait_until, ClusterOpts, LocalCluster};

pub const KIB: usize = 1 << 10;
pub const MIB: usize = 1 << 20;
/// Object size `dog local up` formats the cluster with.
pub const OBJECT_SIZE: usize = 4 * MIB;
/// Largest READ/WRITE payload the server advertises (NBD.md: 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 * MIB as u32;
/// How long one run of a client tool may take before the test fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one nbdsh statement may take.
const NBDSH_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Socket timeout of the raw client: a server that stops answering fails the test.
const RAW_IO_TIMEOUT: Duration = Duration::from_secs(30);

// ----- running tools -------------------------------------------------------------------

/// Runs `cmd` to completion (stdin closed), killing it after `timeout`.
pub fn run(cmd: Command, timeout: Duration) -> Output {
    testkit::run_command(cmd, None, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd` and asserts it succeeded; `what` names it in the failure message.
pub fn run_ok(cmd: Command, what: &str) -> Output {
    let out = run(cmd, TOOL_TIMEOUT);
    assert!(out.status.success(), "{what} failed\n{}", describe(&out));
    out
}

/// `qemu-io -f raw URL -c C1 -c C2 ...` (add `-r` first with `read_only`).
pub fn qemu_io(url: &str, read_only: bool, commands: &[&str]) -> Output {
    let mut cmd = tool("qemu-io");
    if read_only {
        cmd.arg("-r");
    }
    cmd.args(["-f", "raw", url]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(cmd, TOOL_TIMEOUT)
}

/// Runs qemu-io and asserts every command passed: exit status 0 and no pattern mismatch.
pub fn qemu_io_ok(url: &str, read_only: bool, commands: &[&str]) -> String {
    let out = qemu_io(url, read_only, commands);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success()
            && !stdout.contains("verification failed")
            && !stdout.contains("failed:"),
        "qemu-io {url} {commands:?} failed\n{}",
        describe(&out)
    );
    stdout
}

// ----- cluster probes ------------------------------------------------------------------

/// A 3-node, 3-copy cluster; with `fault_injection` every sheep runs the fault-injecting
/// store (simulated power cuts), which this asserts.
pub fn cluster(fault_injection: bool) -> LocalCluster {
    let cluster = LocalCluster::up(ClusterOpts {
        fault_injection,
        ..ClusterOpts::default()
    });
    if fault_injection {
        for i in 0..cluster.nodes() {
            let info = cluster.dog_json(i, &["node", "info"]);
            assert_eq!(
                info["fault_injection"], true,
                "node {i} is not in fault-injection mode: {info}"
            );
        }
    }
    cluster
}

/// `dog vdi create NAME SIZE [--cache MODE] [--copies N]`.
pub fn create_vdi(
    cluster: &LocalCluster,
    name: &str,
    size: &str,
    cache: Option<&str>,
    copies: Option<u32>,
) {
    let copies = copies.map(|c| c.to_string());
    let mut args = vec!["vdi", "create", name, size];
    if let Some(mode) = cache {
        args.extend(["--cache", mode]);
    }
    if let Some(c) = &copies {
        args.extend(["--copies", c]);
    }
    cluster.dog_ok(&args);
}

/// `127.0.0.1:PORT` of node `i`'s NBD server.
pub fn nbd_addr(cluster: &LocalCluster, i: u32) -> String {
    let url = cluster.nbd_url(i, "x");
    url.trim_start_matches("nbd://")
        .trim_end_matches("/x")
        .to_string()
}

/// Node `i`'s store sync counter (`dog node info --json`: `sync_count`).
pub fn sync_count(cluster: &LocalCluster, i: u32) -> u64 {
    let info = cluster.dog_json(i, &["node", "info"]);
    info["sync_count"]
        .as_u64()
        .unwrap_or_else(|| panic!("node {i} info has no sync_count: {info}"))
}

/// Every node's sync counter, by node index.
pub fn sync_counts(cluster: &LocalCluster) -> Vec<u64> {
    (0..cluster.nodes())
        .map(|i| sync_count(cluster, i))
        .collect()
}

/// Per-node differences `after - before`.
pub fn deltas(before: &[u64], after: &[u64]) -> Vec<u64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            a.checked_sub(*b)
                .unwrap_or_else(|| panic!("sync_count went backwards: {before:?} -> {after:?}"))
        })
        .collect()
}

/// Node `i`'s uuid (`dog node info --json`).
pub fn node_uuid(cluster: &LocalCluster, i: u32) -> String {
    let info = cluster.dog_json(i, &["node", "info"]);
    info["uuid"]
        .as_str()
        .unwrap_or_else(|| panic!("node {i} info has no uuid: {info}"))
        .to_string()
}

/// The indices of the nodes holding object `index` of `vdi` (`dog vdi object --json`).
pub fn object_holders(cluster: &LocalCluster, vdi: &str, index: u32) -> Vec<u32> {
    let object = cluster.dog_json(0, &["vdi", "object", vdi, &index.to_string()]);
    let nodes = object["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("vdi object --json has no nodes: {object}"));
    let mut holders: Vec<u32> = nodes
        .iter()
        .map(|n| {
            let addr = n["addr"]
                .as_str()
                .unwrap_or_else(|| panic!("holder without addr: {object}"));
            (0..cluster.nodes())
                .find(|&i| cluster.peer_addr(i) == addr)
                .unwrap_or_else(|| panic!("holder {addr} is not a node of this cluster"))
        })
        .collect();
    holders.sort();
    holders
}

/// Simulates a power cut of node `i` (`dog node power-cut`) and waits for it to die.
pub fn power_cut(cluster: &LocalCluster, i: u32) {
    cluster.dog_at_ok(i, &["node", "power-cut"]);
    let died = wait_until(Duration::from_secs(15), Duration::from_millis(20), || {
        cluster.node_pid(i).is_none()
    });
    assert!(died, "node {i} still running after its power cut");
}

/// Power-cuts every node (in index order), restarts them all and waits for the full
/// membership.
pub fn power_cut_and_restart_all(cluster: &LocalCluster) {
    for i in 0..cluster.nodes() {
        power_cut(cluster, i);
    }
    for i in 0..cluster.nodes() {
        cluster.start(i);
    }
    let n = cluster.nodes() as usize;
    assert!(
        cluster.wait_members(0, n, Duration::from_secs(30)),
        "the restarted cluster does not list {n} nodes"
    );
}

/// The VDI locks (`dog vdi lock list --json`).
pub fn locks(cluster: &LocalCluster) -> Vec<serde_json::Value> {
    cluster
        .dog_json(0, &["vdi", "lock", "list"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The lock entry of `vdi`, if it is locked.
pub fn lock_of(cluster: &LocalCluster, vdi: &str) -> Option<serde_json::Value> {
    locks(cluster).into_iter().find(|l| l["name"] == vdi)
}

/// Waits until `vdi` is not locked; false after `timeout`.
pub fn wait_unlocked(cluster: &LocalCluster, vdi: &str, timeout: Duration) -> bool {
    wait_until(timeout, Duration::from_millis(100), || {
        lock_of(cluster, vdi).is_none()
    })
}

/// Asserts every node is still running and no log mentions a panic.
pub fn assert_all_nodes_alive_without_panic(cluster: &LocalCluster) {
    for i in 0..cluster.nodes() {
        assert!(
            cluster.node_pid(i).is_some(),
            "node {i} is no longer running"
        );
        let log = cluster.node_log(i);
        assert!(!log.contains("panicked"), "node {i} logged a panic:\n{log}");
    }
}

// ----- nbdsh session -------------------------------------------------------------------

/// The Python side of [`Nbdsh`]: runs each stdin line (an expression or a statement) in
/// nbdsh's namespace (where `h` is the libnbd handle) and prints one line per input:
/// `OK <json>`, `NBDERR <json {errno, message}>` or `PYERR <json repr>`.
const NBDSH_DRIVER: &str = r#"
import sys, json, hashlib

def sha(b):
    return hashlib.sha256(bytes(b)).hexdigest()

def load(path):
    with open(path, "rb") as f:
        return f.read()

def extents(offset, count):
    """base:allocation extents of [offset, offset+count) as [length, flags] pairs."""
    out = []
    def cb(ctx, off, entries, err):
        if ctx == "base:allocation":
            out.extend([list(p) for p in zip(entries[0::2], entries[1::2])])
        return 0
    h.block_status(count, offset, cb)
    return out

def wait_all(cookies):
    """Waits for every cookie; returns them in completion order (raises on a failed one)."""
    done, pending = [], set(cookies)
    while pending:
        c = h.aio_peek_command_completed()
        if c == 0:
            h.poll(-1)
            continue
        h.aio_command_completed(c)
        done.append(c)
        pending.discard(c)
    return done

def reads_in_flight(reqs):
    """Submits every [offset, length] read before waiting for any; returns the
    completion order (indices into reqs), the commands in flight after submission and
    the sha256 of each read."""
    bufs = [nbd.Buffer(n) for (_, n) in reqs]
    cookies = [h.aio_pread(b, o) for b, (o, _) in zip(bufs, reqs)]
    peak = h.aio_in_flight()
    done = wait_all(cookies)
    index = {c: i for i, c in enumerate(cookies)}
    return {"order": [index[c] for c in done], "peak": peak,
            "sha": [sha(b.to_bytearray()) for b in bufs]}

def writes_in_flight(path, reqs, flags=0):
    """Submits every [offset, length] write (data: the file's bytes at the same offset)
    before waiting for any; returns the completion order and the peak in flight."""
    data = load(path)
    bufs = [nbd.Buffer.from_bytearray(bytearray(data[o:o + n])) for (o, n) in reqs]
    cookies = [h.aio_pwrite(b, o, flags=flags) for b, (o, _) in zip(bufs, reqs)]
    peak = h.aio_in_flight()
    done = wait_all(cookies)
    index = {c: i for i, c in enumerate(cookies)}
    return {"order": [index[c] for c in done], "peak": peak}

def _default(o):
    if isinstance(o, (bytes, bytearray)):
        return {"len": len(o), "sha": sha(o)}
    return repr(o)

for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    try:
        try:
            code = compile(line, "<test>", "eval")
        except SyntaxError:
            code = compile(line, "<test>", "exec")
        out = "OK " + json.dumps(eval(code, globals()), default=_default)
    except nbd.Error as e:
        out = "NBDERR " + json.dumps({"errno": str(e.errno), "message": str(e.string)})
    except Exception as e:
        out = "PYERR " + json.dumps(repr(e))
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
"#;

/// What one nbdsh statement gave.
#[derive(Debug, Clone, PartialEq)]
pub enum NbdshReply {
    /// It succeeded; its value as JSON (bytes become `{"len", "sha"}`).
    Ok(serde_json::Value),
    /// libnbd raised `nbd.Error`: errno name (e.g. "EINVAL") and message.
    Nbd { errno: String, message: String },
    /// Any other Python exception (a test bug).
    Python(String),
}

/// An interactive `nbdsh` (python3-libnbd) process: statements are sent one per line
/// and answered one per line, so a test can interleave libnbd calls with cluster
/// commands (sync counters, power cuts) while one NBD connection stays open.
pub struct Nbdsh {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    label: String,
}

impl Nbdsh {
    /// Starts nbdsh without connecting.
    pub fn start(label: &str) -> Nbdsh {
        let mut cmd = tool("nbdsh");
        cmd.args(["-c", NBDSH_DRIVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nbdsh: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        Nbdsh {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            label: label.to_string(),
        }
    }

    /// Starts nbdsh and connects to `url` with `base:allocation` requested and strict
    /// mode off (so libnbd sends bad requests on to the server instead of refusing them
    /// itself).
    pub fn connect(label: &str, url: &str) -> Nbdsh {
        let mut session = Nbdsh::start(label);
        session.ok("h.add_meta_context('base:allocation')");
        session.ok(&format!("h.connect_uri({})", py_str(url)));
        session.ok("h.set_strict_mode(0)");
        session
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Runs one statement (a single line of Python).
    pub fn call(&mut self, statement: &str) -> NbdshReply {
        assert!(
            !statement.contains('\n'),
            "nbdsh statements are one line: {statement}"
        );
        let stdin = self.stdin.as_mut().expect("nbdsh session is closed");
        if let Err(e) = writeln!(stdin, "{statement}").and_then(|_| stdin.flush()) {
            panic!(
                "nbdsh [{}] is gone ({e}) before `{statement}`; stderr:\n{}",
                self.label,
                self.stderr_text()
            );
        }
        let line = match self.lines.recv_timeout(NBDSH_CALL_TIMEOUT) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "nbdsh [{}] did not answer `{statement}` within {} s; stderr:\n{}",
                self.label,
                NBDSH_CALL_TIMEOUT.as_secs(),
                self.stderr_text()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!(
                    "nbdsh [{}] exited during `{statement}`; stderr:\n{}",
                    self.label,
                    self.stderr_text()
                )
            }
        };
        let (kind, json) = line.split_once(' ').unwrap_or((line.as_str(), "null"));
        let value: serde_json::Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("nbdsh [{}] printed a bad line ({e}): {line}", self.label));
        match kind {
            "OK" => NbdshReply::Ok(value),
            "NBDERR" => NbdshReply::Nbd {
                errno: value["errno"].as_str().unwrap_or_default().to_string(),
                message: value["message"].as_str().unwrap_or_default().to_string(),
            },
            "PYERR" => NbdshReply::Python(value.as_str().unwrap_or_default().to_string()),
            _ => panic!("nbdsh [{}] printed an unexpected line: {line}", self.label),
        }
    }

    /// Runs a statement that must succeed; its value.
    pub fn ok(&mut self, statement: &str) -> serde_json::Value {
        match self.call(statement) {
            NbdshReply::Ok(value) => value,
            other => panic!("nbdsh [{}] `{statement}` failed: {other:?}", self.label),
        }
    }

    /// Runs a statement that must fail with libnbd error `errno` (e.g. "EINVAL");
    /// returns the message.
    pub fn fails_with(&mut self, statement: &str, errno: &str) -> String {
        match self.call(statement) {
            NbdshReply::Nbd {
                errno: got,
                message,
            } if got == errno => message,
            other => panic!(
                "nbdsh [{}] `{statement}`: expected {errno}, got {other:?}",
                self.label
            ),
        }
    }

    /// Writes `data` at `offset` (staged in `scratch`, a file path); `flags` are libnbd
    /// command flags (e.g. `nbd.CMD_FLAG_FUA`, or "0").
    pub fn pwrite(&mut self, scratch: &Path, data: &[u8], offset: u64, flags: &str) {
        std::fs::write(scratch, data)
            .unwrap_or_else(|e| panic!("writing {}: {e}", scratch.display()));
        let path = py_str(&scratch.to_string_lossy());
        self.ok(&format!("h.pwrite(load({path}), {offset}, {flags})"));
    }

    /// The sha256 (hex) of `len` bytes read at `offset`.
    pub fn read_sha(&mut self, offset: u64, len: usize) -> String {
        let v = self.ok(&format!("sha(h.pread({len}, {offset}))"));
        v.as_str()
            .unwrap_or_else(|| panic!("sha() returned {v}"))
            .to_string()
    }

    /// Asserts the export's first `model.len()` bytes equal `model`, comparing 4 MiB
    /// chunks (so a failure says where); `what` names the check.
    pub fn assert_content(&mut self, model: &[u8], what: &str) {
        let mut bad = Vec::new();
        for (k, chunk) in model.chunks(OBJECT_SIZE).enumerate() {
            let offset = (k * OBJECT_SIZE) as u64;
            if self.read_sha(offset, chunk.len()) != sha256_of(chunk) {
                bad.push(k);
            }
        }
        assert!(
            bad.is_empty(),
            "{what}: 4 MiB chunks {bad:?} differ from what was written"
        );
    }

    /// Sends NBD_CMD_FLUSH.
    pub fn flush(&mut self) {
        self.ok("h.flush()");
    }

    /// `base:allocation` extents of a range as (length, flags) pairs.
    pub fn extents(&mut self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let v = self.ok(&format!("extents({offset}, {len})"));
        v.as_array()
            .unwrap_or_else(|| panic!("extents() returned {v}"))
            .iter()
            .map(|p| {
                (
                    p[0].as_u64().expect("extent length"),
                    p[1].as_u64().expect("extent flags"),
                )
            })
            .collect()
    }

    /// Disconnects cleanly (NBD_CMD_DISC) and ends the process.
    pub fn close(mut self) {
        let _ = self.call("h.shutdown()");
        self.stdin.take();
        let done = wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        assert!(
            done,
            "nbdsh [{}] did not exit after its stdin closed",
            self.label
        );
    }
}

impl Drop for Nbdsh {
    fn drop(&mut self) {
        self.stdin.take();
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `s` as a Python string literal (JSON strings are valid Python literals).
pub fn py_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string encodes as JSON")
}

// ----- raw NBD client ------------------------------------------------------------------

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_GO: u32 = 7;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// One option reply of the handshake.
#[derive(Debug)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    /// The reply's data as text (the message of an error reply).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A hand-written NBD client over a plain TCP socket, able to send anything: the tool
/// for protocol violations no real client would commit.
pub struct RawNbd {
    pub stream: TcpStream,
}

impl RawNbd {
    /// Connects (nothing read or sent yet).
    pub fn connect(addr: &str) -> RawNbd {
        let stream = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("connecting to NBD server {addr}: {e}"));
        stream
            .set_read_timeout(Some(RAW_IO_TIMEOUT))
            .expect("setting a read timeout");
        stream
            .set_write_timeout(Some(RAW_IO_TIMEOUT))
            .expect("setting a write timeout");
        stream.set_nodelay(true).expect("setting TCP_NODELAY");
        RawNbd { stream }
    }

    /// Connects, reads the greeting and sends the client flags (fixed newstyle, no
    /// zeroes): ready for options.
    pub fn options(addr: &str) -> RawNbd {
        let mut c = RawNbd::connect(addr);
        c.read_greeting();
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    /// Connects and opens `export` with OPT_GO; panics if refused. Returns the client,
    /// the export size and the transmission flags.
    pub fn open(addr: &str, export: &str) -> (RawNbd, u64, u16) {
        let mut c = RawNbd::options(addr);
        match c.go(export) {
            Ok((size, flags)) => (c, size, flags),
            Err(reply) => panic!(
                "OPT_GO {export:?} refused: type {:#x}: {}",
                reply.reply_type,
                reply.text()
            ),
        }
    }

    /// Reads the server greeting, asserting its magic numbers; returns the handshake flags.
    pub fn read_greeting(&mut self) -> u16 {
        let mut greeting = [0u8; 18];
        self.read_exact(&mut greeting);
        assert_eq!(
            u64::from_be_bytes(greeting[0..8].try_into().unwrap()),
            NBDMAGIC,
            "bad NBDMAGIC"
        );
        assert_eq!(
            u64::from_be_bytes(greeting[8..16].try_into().unwrap()),
            IHAVEOPT,
            "bad IHAVEOPT"
        );
        u16::from_be_bytes([greeting[16], greeting[17]])
    }

    /// Sends bytes as they are; errors (the server closed) are ignored.
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Sends bytes, failing the test if they cannot be sent.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("sending {} bytes to the NBD server: {e}", bytes.len()));
    }

    fn read_exact(&mut self, buf: &mut [u8]) {
        self.stream
            .read_exact(buf)
            .unwrap_or_else(|e| panic!("reading {} bytes from the NBD server: {e}", buf.len()));
    }

    /// Sends option `option` with `data`.
    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut msg = IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.send(&msg);
    }

    /// Reads one option reply, asserting its magic.
    pub fn read_option_reply(&mut self) -> OptionReply {
        let mut head = [0u8; 20];
        self.read_exact(&mut head);
        assert_eq!(
            u64::from_be_bytes(head[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC,
            "bad option reply magic"
        );
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let reply_type = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        let mut data = vec![0u8; len];
        self.read_exact(&mut data);
        OptionReply {
            option,
            reply_type,
            data,
        }
    }

    /// OPT_GO `export` with no info requests: Ok((size, transmission flags)) after the
    /// ACK, or the error reply.
    pub fn go(&mut self, export: &str) -> Result<(u64, u16), OptionReply> {
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &data);
        let mut export_info = None;
        loop {
            let reply = self.read_option_reply();
            assert_eq!(reply.option, OPT_GO, "reply to another option: {reply:?}");
            match reply.reply_type {
                REP_INFO => {
                    let d = &reply.data;
                    if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == 0 {
                        let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([d[10], d[11]]);
                        export_info = Some((size, flags));
                    }
                }
                REP_ACK => return Ok(export_info.expect("OPT_GO acknowledged without INFO_EXPORT")),
                t if t & (1 << 31) != 0 => return Err(reply),
                t => panic!("unexpected reply type {t:#x} to OPT_GO"),
            }
        }
    }

    /// Sends a request header.
    pub fn request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        self.send(&request_header(flags, command, cookie, offset, length));
    }

    /// Reads a simple reply; `data_len` bytes follow a successful READ's reply. Returns
    /// (error, cookie, data).
    pub fn simple_reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut head = [0u8; 16];
        self.read_exact(&mut head);
        assert_eq!(
            u32::from_be_bytes(head[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC,
            "bad simple reply magic"
        );
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let mut data = Vec::new();
        if error == 0 && data_len > 0 {
            data = vec![0u8; data_len];
            self.read_exact(&mut data);
        }
        (error, cookie, data)
    }

    /// Sends a request without payload and reads its simple reply; returns the error.
    pub fn request_error(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> u32 {
        self.request(flags, command, cookie, offset, length);
        let (error, got, _) = self.simple_reply(0);
        assert_eq!(got, cookie, "reply to the wrong cookie");
        error
    }

    /// READ that must succeed; the data.
    pub fn read_ok(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len);
        let (error, got, data) = self.simple_reply(len as usize);
        assert_eq!((error, got), (0, cookie), "READ {len} at {offset} failed");
        data
    }

    /// WRITE that must succeed.
    pub fn write_ok(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, cookie, offset, data.len() as u32);
        self.send(data);
        let (error, got, _) = self.simple_reply(0);
        assert_eq!(
            (error, got),
            (0, cookie),
            "WRITE {} at {offset} failed",
            data.len()
        );
    }

    /// Whether the server closes the connection within `within` (anything it sends
    /// first is read and dropped).
    pub fn closed_by_server(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("setting a read timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }
}

/// The 28 bytes of a request header.
pub fn request_header(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&command.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&length.to_be_bytes());
    h
}

pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const OPT_INFO: u32 = 6;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const REP_SERVER: u32 = 2;
pub const REP_META_CONTEXT: u32 = 4;
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// One structured reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl RawNbd {
    /// Negotiates structured replies (OPT_STRUCTURED_REPLY must be acknowledged).
    pub fn structured_replies(&mut self) {
        self.send_option(OPT_STRUCTURED_REPLY, b"");
        let reply = self.read_option_reply();
        assert_eq!(
            (reply.option, reply.reply_type),
            (OPT_STRUCTURED_REPLY, REP_ACK),
            "OPT_STRUCTURED_REPLY not acknowledged: {}",
            reply.text()
        );
    }

    /// Reads one structured reply chunk, asserting its magic.
    pub fn read_chunk(&mut self) -> Chunk {
        let mut head = [0u8; 20];
        self.read_exact(&mut head);
        let magic = u32::from_be_bytes(head[0..4].try_into().unwrap());
        assert_eq!(
            magic, STRUCTURED_REPLY_MAGIC,
            "bad structured reply magic {magic:#x}"
        );
        let flags = u16::from_be_bytes([head[4], head[5]]);
        let kind = u16::from_be_bytes([head[6], head[7]]);
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        assert!(len <= 64 << 20, "structured chunk of {len} bytes");
        let mut payload = vec![0u8; len];
        self.read_exact(&mut payload);
        Chunk {
            flags,
            kind,
            cookie,
            payload,
        }
    }

    /// Reads chunks of one reply up to and including the one flagged DONE.
    pub fn read_structured_reply(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        loop {
            let chunk = self.read_chunk();
            assert_eq!(chunk.cookie, cookie, "chunk for another cookie: {chunk:?}");
            let done = chunk.flags & REPLY_FLAG_DONE != 0;
            chunks.push(chunk);
            if done {
                return chunks;
            }
        }
    }

    /// Reads option replies to `option` up to and including the ACK (or an error).
    pub fn read_option_replies(&mut self, option: u32) -> Vec<OptionReply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply();
            assert_eq!(reply.option, option, "reply to another option: {reply:?}");
            let last = reply.reply_type == REP_ACK || reply.reply_type & (1 << 31) != 0;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }
}

//! Membership changes and recovery (issue 4, "What it must show" items 1–3, 5 and 7) on
//! real local clusters: a crashed node's copies are re-replicated, a node that returns
//! is brought up to date and never serves its stale copies, a new node takes its share,
//! a whole-cluster shutdown and restart keeps every VDI, and the recovery throttle holds
//! according to the daemons' own counters. Data goes in and out over NBD (nbdcopy,
//! nbdsh) and is compared by sha256; `dog cluster check` must exit 0 after every heal.
//!
//! Item 4 (fio during a kill and restart) and item 6 (the random kill loop) are in
//! `recovery_faults.rs`.

use serde_json::Value;
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use testkit::{
    bin, describe, nbd_sha256, nbdsh, random_bytes, random_file, sha256_of, tool, wait_until,
    ClusterOpts, LocalCluster, Running,
};

const MIB: usize = 1 << 20;
/// Object size `dog local up` formats with.
const OBJECT_SIZE: u64 = 4 << 20;
/// The largest single recovery transfer: an inode object (4 KiB header + 4 MiB table).
const INODE_OBJECT_SIZE: u64 = 4096 + (4 << 20);
/// How long one run of an NBD client tool may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a directly started sheep may take to serve.
const SHEEP_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERMed sheep may take to leave before it is killed.
const SHEEP_STOP_TIMEOUT: Duration = Duration::from_secs(15);

// ----- running tools -------------------------------------------------------------------

/// Runs `cmd` to completion and asserts it succeeded; `what` names it on failure.
fn run_ok(cmd: Command, what: &str) -> Output {
    let out = Running::spawn(cmd).wait(TOOL_TIMEOUT);
    assert!(out.status.success(), "{what} failed\n{}", describe(&out));
    out
}

// ----- NBD clients ---------------------------------------------------------------------

/// Writes `data` at `offset` of the export at `url` (1 MiB NBD writes), then FLUSHes.
fn nbd_write(url: &str, offset: u64, data: &[u8]) {
    let file = tempfile::NamedTempFile::new().expect("temp file for nbdsh");
    std::fs::write(file.path(), data).expect("writing the nbdsh input file");
    let script = format!(
        "off = {offset}\n\
         with open({path:?}, 'rb') as f:\n\
         \x20   while True:\n\
         \x20       b = f.read(1 << 20)\n\
         \x20       if not b:\n\
         \x20           break\n\
         \x20       h.pwrite(b, off)\n\
         \x20       off += len(b)\n\
         h.flush()\n\
         print('wrote', off - {offset})\n",
        path = file.path().display().to_string()
    );
    let out = nbdsh(url, &script, "write");
    assert!(
        out.contains(&format!("wrote {}", data.len())),
        "nbdsh wrote less than {} bytes to {url}: {out}",
        data.len()
    );
}

/// Asserts that the whole of `expected` reads back at offset 0 of `url`.
fn assert_nbd_matches(url: &str, expected: &[u8], what: &str) {
    assert_eq!(
        nbd_sha256(url, 0, expected.len() as u64),
        sha256_of(expected),
        "{what}: {} bytes read through {url} differ from what was written",
        expected.len()
    );
}

/// Copies `file` into the export at `url` with nbdcopy, then flushes.
fn nbdcopy_into(file: &std::path::Path, url: &str) {
    let mut cmd = tool("nbdcopy");
    cmd.arg("--flush").arg(file).arg(url);
    run_ok(cmd, &format!("nbdcopy into {url}"));
}

// ----- cluster probes ------------------------------------------------------------------

/// The current epoch as node `i` sees it.
fn epoch(cluster: &LocalCluster, i: u32) -> u64 {
    let info = cluster.dog_json(i, &["cluster", "info"]);
    info["epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("cluster info has no epoch: {info}"))
}

/// Each member's recovery counters (`dog node recovery --json` at node `i`), by address.
fn recovery_counters(cluster: &LocalCluster, i: u32) -> HashMap<String, Value> {
    let report = cluster.dog_json(i, &["node", "recovery"]);
    report["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("dog node recovery --json has no nodes: {report}"))
        .iter()
        .map(|n| {
            let addr = n["addr"].as_str().expect("member addr").to_string();
            assert!(
                n["recovery"].is_object(),
                "member {addr} did not report its recovery: {report:#}"
            );
            (addr, n["recovery"].clone())
        })
        .collect()
}

/// Whether any member is still recovering (running, or not yet done at this epoch).
fn recovery_in_progress(cluster: &LocalCluster, i: u32) -> bool {
    let report = cluster.dog_json(i, &["node", "recovery"]);
    report["done"] != true
}

/// Objects in each node's store (`dog node info --json` of every node index in `nodes`).
fn objects_per_node(cluster: &LocalCluster, nodes: &[u32]) -> Vec<u64> {
    nodes
        .iter()
        .map(|&i| {
            let info = cluster.dog_json(i, &["node", "info"]);
            info["objects"]
                .as_u64()
                .unwrap_or_else(|| panic!("node {i} info has no objects: {info}"))
        })
        .collect()
}

/// `data` followed by zeros up to `size` bytes: the whole VDI as a reader sees it.
fn padded(data: &[u8], size: usize) -> Vec<u8> {
    let mut image = data.to_vec();
    image.resize(size, 0);
    image
}

// ----- sheep started by hand -----------------------------------------------------------

/// A sheep started directly (not by `dog local`), with the arguments `dog local` gives
/// node `index` plus `extra`: for a node index beyond the cluster's (a new node), or for
/// options `dog local start` does not pass (`--recovery-max-rate`). Its pid goes into
/// `node<index>/sheep.pid`. Dropping it stops it (SIGTERM, then SIGKILL) and, if the test
/// is failing, prints the tail of its log.
struct HandStartedSheep {
    child: Child,
    index: u32,
    log: PathBuf,
}

impl HandStartedSheep {
    /// Starts the sheep and waits until it serves as a member.
    fn start(cluster: &LocalCluster, index: u32, extra: &[&str]) -> HandStartedSheep {
        let dir = cluster.node_dir(index);
        std::fs::create_dir_all(&dir).expect("creating the node directory");
        let log_path = dir.join("sheep.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("opening the node log");
        let nbd_url = cluster.nbd_url(index, "x");
        let nbd_addr = nbd_url
            .trim_start_matches("nbd://")
            .trim_end_matches("/x")
            .to_string();
        let cluster_dir = cluster
            .dir()
            .canonicalize()
            .expect("canonical cluster dir")
            .join("cluster");
        let mut cmd = Command::new(bin("sheep"));
        cmd.arg("--dir")
            .arg(&dir)
            .args(["--listen", &cluster.peer_addr(index)])
            .arg("--cluster")
            .arg(format!("local:{}", cluster_dir.display()))
            .args(["--zone", &index.to_string(), "--nbd", &nbd_addr])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        std::fs::write(dir.join("sheep.pid"), child.id().to_string()).expect("writing sheep.pid");
        let mut sheep = HandStartedSheep {
            child,
            index,
            log: log_path,
        };
        let serving = wait_until(SHEEP_START_TIMEOUT, Duration::from_millis(100), || {
            assert!(
                matches!(sheep.child.try_wait(), Ok(None)),
                "sheep of node {index} exited at start; see {}",
                sheep.log.display()
            );
            let out = cluster.dog_at(index, &["node", "info", "--json"]);
            out.status.success()
                && serde_json::from_slice::<Value>(&out.stdout)
                    .is_ok_and(|info| info["serving"] == true)
        });
        assert!(
            serving,
            "sheep of node {index} does not serve after {} s",
            SHEEP_START_TIMEOUT.as_secs()
        );
        sheep
    }
}

impl Drop for HandStartedSheep {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "----- node {} log tail ({}) -----",
                self.index,
                self.log.display()
            );
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + SHEEP_STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----- the tests -----------------------------------------------------------------------

#[test]
fn killed_node_copies_are_rereplicated_to_the_three_live_nodes_and_256mib_read_back_intact() {
    // Item 1: 4 nodes, 3 copies, 256 MiB over NBD; kill a node; after recovery every object is on the 3 live nodes.
    let cluster = LocalCluster::up(ClusterOpts {
        nodes: 4,
        ..ClusterOpts::default()
    });
    let work = tempfile::tempdir().expect("temp dir");
    let size = 256 * MIB;

    eprintln!("phase: 256 MiB of random data written into v1 through node 0 with nbdcopy");
    cluster.dog_ok(&["vdi", "create", "v1", "256M"]);
    let image = work.path().join("v1.raw");
    let expected = random_file(&image, size, 1);
    nbdcopy_into(&image, &cluster.nbd_url(0, "v1"));
    assert_eq!(
        nbd_sha256(&cluster.nbd_url(0, "v1/ro"), 0, size as u64),
        expected,
        "256 MiB do not read back even before any failure"
    );
    let epoch_before = epoch(&cluster, 0);

    eprintln!("phase: node 2 is killed; the cluster must notice and move to a new epoch");
    cluster.kill(2);
    cluster.assert_members(0, 3);
    assert!(
        epoch(&cluster, 0) > epoch_before,
        "the crash did not start a new epoch"
    );

    eprintln!("phase: dog node recovery --wait, then every object must be on all 3 live nodes");
    cluster.wait_recovered(0);
    let checked = cluster.assert_check_clean(0, "after healing");
    let objects = (size as u64) / OBJECT_SIZE + 1;
    assert_eq!(
        checked, objects,
        "cluster check looked at {checked} objects, v1 has {objects} (data + inode)"
    );
    let held = objects_per_node(&cluster, &[0, 1, 3]);
    assert_eq!(
        held,
        vec![objects; 3],
        "with 3 copies on 3 live nodes each node must hold every one of the {objects} objects"
    );

    eprintln!("phase: the 256 MiB read back through two gateways must match their sha256");
    for gateway in [0, 3] {
        assert_eq!(
            nbd_sha256(&cluster.nbd_url(gateway, "v1/ro"), 0, size as u64),
            expected,
            "256 MiB read through node {gateway} after recovery differ"
        );
    }
}

#[test]
fn returning_node_is_brought_up_to_date_and_its_nbd_port_serves_the_newest_data() {
    // Item 2: a node killed before overwrites comes back with stale copies; its own NBD export must serve the new data.
    let cluster = LocalCluster::up(ClusterOpts {
        nodes: 4,
        ..ClusterOpts::default()
    });
    let size = 96 * MIB;
    cluster.dog_ok(&["vdi", "create", "v1", "96M"]);

    eprintln!("phase: 64 MiB written while all 4 nodes are up (node 3 gets its copies)");
    let old = random_bytes(64 * MIB, 21);
    nbd_write(&cluster.nbd_url(0, "v1"), 0, &old);
    let mut expected = padded(&old, size);

    eprintln!("phase: node 3 is killed; the others recover its copies");
    cluster.kill(3);
    cluster.assert_members(0, 3);
    cluster.wait_recovered(0);
    let epoch_away = epoch(&cluster, 0);

    eprintln!("phase: while node 3 is away: the first 32 MiB rewritten, 64 KiB changed in each later object, 32 MiB appended");
    let rewrite = random_bytes(32 * MIB, 22);
    nbd_write(&cluster.nbd_url(0, "v1"), 0, &rewrite);
    expected[..32 * MIB].copy_from_slice(&rewrite);
    for (n, object) in (8..16u64).enumerate() {
        let offset = object * OBJECT_SIZE + 512 * 1024;
        let patch = random_bytes(64 * 1024, 23 + n as u64);
        nbd_write(&cluster.nbd_url(1, "v1"), offset, &patch);
        expected[offset as usize..offset as usize + patch.len()].copy_from_slice(&patch);
    }
    let appended = random_bytes(32 * MIB, 40);
    nbd_write(&cluster.nbd_url(2, "v1"), 64 * MIB as u64, &appended);
    expected[64 * MIB..].copy_from_slice(&appended);
    assert_nbd_matches(
        &cluster.nbd_url(0, "v1/ro"),
        &expected,
        "while node 3 is away",
    );

    eprintln!("phase: node 3 comes back (dog local start); at once its own NBD port must serve the newest data");
    cluster.start(3);
    assert_nbd_matches(
        &cluster.nbd_url(3, "v1/ro"),
        &expected,
        "node 3 right after its return",
    );
    cluster.assert_members(0, 4);
    assert!(
        epoch(&cluster, 0) > epoch_away,
        "the rejoin did not start a new epoch"
    );

    eprintln!("phase: recovery brings node 3 up to date; cluster check exits 0; reads through node 3 still newest");
    cluster.wait_recovered(0);
    let checked = cluster.assert_check_clean(0, "after healing");
    assert_eq!(checked, 24 + 1, "v1 has 24 data objects and its inode");
    assert_nbd_matches(
        &cluster.nbd_url(3, "v1/ro"),
        &expected,
        "node 3 after recovery",
    );
    let unverified = &recovery_counters(&cluster, 0)[&cluster.peer_addr(3)]["unverified"];
    assert_eq!(
        unverified, 0,
        "node 3 still has copies it has not compared with the cluster"
    );
}

#[test]
fn returning_node_with_throttled_recovery_never_serves_its_stale_copies() {
    // Item 2, the hard case: node 3's recovery is held back, so reads through it meet its stale copies and must not return them.
    let cluster = LocalCluster::up(ClusterOpts {
        nodes: 4,
        ..ClusterOpts::default()
    });
    let size = 64 * MIB;
    cluster.dog_ok(&["vdi", "create", "v1", "64M"]);
    let old = random_bytes(size, 51);
    nbd_write(&cluster.nbd_url(0, "v1"), 0, &old);

    eprintln!("phase: node 3 is killed and every object of v1 rewritten while it is away");
    cluster.kill(3);
    cluster.assert_members(0, 3);
    cluster.wait_recovered(0);
    let new = random_bytes(size, 52);
    nbd_write(&cluster.nbd_url(0, "v1"), 0, &new);

    eprintln!("phase: node 3 restarted with --recovery-max-rate 1M, so most of its copies stay stale for a while");
    let node3 = HandStartedSheep::start(&cluster, 3, &["--recovery-max-rate", "1M"]);
    cluster.assert_members(0, 4);
    let before = recovery_counters(&cluster, 0)[&cluster.peer_addr(3)].clone();
    eprintln!("  node 3 recovery before the reads: {before}");

    eprintln!(
        "phase: reads through node 3's own NBD port during its recovery must return the new data"
    );
    assert_nbd_matches(
        &cluster.nbd_url(3, "v1/ro"),
        &new,
        "node 3 during throttled recovery",
    );
    // The reads met stale copies if recovery was still under way, or if they made node 3
    // recover copies on demand (reads of its stale copies do that, ahead of the
    // throttled background round, which then finds nothing left to fetch).
    let after = recovery_counters(&cluster, 0)[&cluster.peer_addr(3)].clone();
    let on_demand = |c: &Value| c["on_demand_bytes"].as_u64().unwrap_or(0);
    assert!(
        recovery_in_progress(&cluster, 0) || on_demand(&after) > on_demand(&before),
        "recovery finished before the reads and none was done on demand: the reads did not meet stale copies (throttle ineffective?)\nbefore: {before}\nafter: {after}"
    );

    eprintln!(
        "phase: throttle lifted at run time (set-throttle 0); recovery finishes; check clean"
    );
    cluster.dog_ok(&["node", "recovery", "set-throttle", "0"]);
    cluster.wait_recovered(0);
    cluster.assert_check_clean(0, "after healing");
    assert_nbd_matches(&cluster.nbd_url(3, "v1/ro"), &new, "node 3 after recovery");
    drop(node3);
}

#[test]
fn added_fifth_node_takes_its_share_of_objects_and_the_data_still_matches() {
    // Item 3: a fifth sheep joins a 4-node cluster; objects rebalance onto it; check clean; data identical.
    let cluster = LocalCluster::up(ClusterOpts {
        nodes: 4,
        ..ClusterOpts::default()
    });
    let size = 128 * MIB;
    let work = tempfile::tempdir().expect("temp dir");
    cluster.dog_ok(&["vdi", "create", "v1", "128M"]);
    let image = work.path().join("v1.raw");
    let expected = random_file(&image, size, 31);
    nbdcopy_into(&image, &cluster.nbd_url(0, "v1"));
    let epoch_before = epoch(&cluster, 0);

    eprintln!("phase: a fifth sheep is started against the same cluster directory; it must join at a new epoch");
    let node4 = HandStartedSheep::start(&cluster, 4, &[]);
    cluster.assert_members(0, 5);
    assert!(
        epoch(&cluster, 0) > epoch_before,
        "the join did not start a new epoch"
    );

    eprintln!("phase: after recovery the check passes and the new node holds about its share");
    cluster.wait_recovered(0);
    let checked = cluster.assert_check_clean(0, "after healing");
    let held = objects_per_node(&cluster, &[0, 1, 2, 3, 4]);
    let share = checked as f64 * 3.0 / 5.0;
    eprintln!("  {checked} objects, 3 copies; per node {held:?}; a fair share is {share:.1}");
    assert!(
        (held[4] as f64) >= share * 0.5 && (held[4] as f64) <= share * 1.6,
        "node 4 holds {} objects, far from its share {share:.1} (per node: {held:?})",
        held[4]
    );
    assert_eq!(
        held.iter().sum::<u64>(),
        checked * 3,
        "copies no longer owned must be removed once the owners hold them (per node: {held:?})"
    );

    eprintln!("phase: the 128 MiB read back through the new node and through node 0 match");
    for gateway in [4, 0] {
        assert_eq!(
            nbd_sha256(&cluster.nbd_url(gateway, "v1/ro"), 0, size as u64),
            expected,
            "128 MiB read through node {gateway} after the rebalance differ"
        );
    }
    drop(node4);
}

#[test]
fn dog_local_start_of_a_new_index_adds_a_node() {
    // Issue 4 "What to build": `dog local start` of a new index joins a new node at a new epoch.
    let cluster = LocalCluster::up(ClusterOpts::default());
    let epoch_before = epoch(&cluster, 0);
    let out = cluster.local("start", &["3"]);
    // Stop the new node whatever happens: `dog local down` only knows the first three.
    let pid = std::fs::read_to_string(cluster.node_dir(3).join("sheep.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    struct Stop(Option<i32>);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                // SAFETY: kill(2) on the pid `dog local start` recorded for node 3.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _stop = Stop(pid);
    assert!(
        out.status.success(),
        "dog local start 3 on a 3-node local cluster failed\n{}",
        describe(&out)
    );
    cluster.assert_members(0, 4);
    assert!(
        epoch(&cluster, 0) > epoch_before,
        "the join did not start a new epoch"
    );
}

#[test]
fn cluster_shutdown_and_restart_of_every_node_returns_every_vdi_identical() {
    // Item 5: dog cluster shutdown stops all nodes; restarted, the cluster waits for its last members, then serves identical VDIs.
    let cluster = LocalCluster::up(ClusterOpts::default());

    eprintln!("phase: three VDIs: one written over NBD, one with dog vdi write, one never written");
    cluster.dog_ok(&["vdi", "create", "a", "64M"]);
    cluster.dog_ok(&["vdi", "create", "b", "32M"]);
    cluster.dog_ok(&["vdi", "create", "c", "16M"]);
    let a = padded(&random_bytes(40 * MIB, 61), 64 * MIB);
    nbd_write(&cluster.nbd_url(0, "a"), 0, &a[..40 * MIB]);
    let mut b = vec![0u8; 32 * MIB];
    let b_data = random_bytes(12 * MIB + 4096, 62);
    cluster.write_vdi(1, "b", 3 * MIB as u64, &b_data, false);
    b[3 * MIB..3 * MIB + b_data.len()].copy_from_slice(&b_data);
    let c = vec![0u8; 16 * MIB];
    let vdis: [(&str, &[u8]); 3] = [("a", &a), ("b", &b), ("c", &c)];
    for (name, image) in vdis {
        assert_nbd_matches(
            &cluster.nbd_url(0, &format!("{name}/ro")),
            image,
            "before the shutdown",
        );
    }

    eprintln!("phase: dog cluster shutdown must stop every node");
    cluster.dog_ok(&["cluster", "shutdown"]);
    let stopped = wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        (0..3).all(|i| cluster.node_pid(i).is_none())
    });
    assert!(
        stopped,
        "nodes still running 60 s after dog cluster shutdown: {:?}",
        (0..3)
            .filter(|&i| cluster.node_pid(i).is_some())
            .collect::<Vec<_>>()
    );
    for i in 0..3 {
        assert!(
            !cluster.node_log(i).contains("panicked"),
            "node {i} panicked during the shutdown"
        );
    }

    eprintln!("phase: nodes restarted one by one; until the last is back the cluster says whom it waits for");
    for i in 0..2u32 {
        cluster.start(i);
        let info = cluster.dog_json(0, &["cluster", "info"]);
        let status = info["status"].as_str().unwrap_or_default().to_string();
        assert!(
            status.contains("waiting for"),
            "with {} of 3 nodes back the cluster must wait, but says {status:?}",
            i + 1
        );
        for missing in i + 1..3 {
            assert!(
                status.contains(&cluster.peer_addr(missing)),
                "status {status:?} does not name missing node {missing} ({})",
                cluster.peer_addr(missing)
            );
        }
        for back in 0..=i {
            assert!(
                !status.contains(&cluster.peer_addr(back)),
                "status {status:?} still waits for node {back}, which is back"
            );
        }
    }
    cluster.start(2);
    let running = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let info = cluster.dog_json(0, &["cluster", "info"]);
        info["status"] == "running" && info["members"].as_array().map(Vec::len) == Some(3)
    });
    assert!(
        running,
        "cluster not running with 3 members after every node is back: {}",
        cluster.dog_json(0, &["cluster", "info"])
    );

    eprintln!(
        "phase: back in service: every VDI reads back identical through every node; check clean"
    );
    cluster.wait_recovered(0);
    cluster.assert_check_clean(0, "after healing");
    for gateway in 0..3 {
        for (name, image) in vdis {
            assert_nbd_matches(
                &cluster.nbd_url(gateway, &format!("{name}/ro")),
                image,
                &format!("VDI {name} through node {gateway} after the restart"),
            );
        }
    }
    let more = random_bytes(MIB, 63);
    nbd_write(&cluster.nbd_url(1, "c"), 0, &more);
    assert_nbd_matches(
        &cluster.nbd_url(2, "c/ro"),
        &padded(&more, 16 * MIB),
        "a write after the restart",
    );
}

/// Margin for the peak one-second-window rate. The throttle paces the *starts* of whole
/// 4 MiB transfers, the counter counts them when they *land*, and a window opens at a
/// landing: if the object opening a window landed late (a slow fetch or fsync on a busy
/// machine), the window can hold two objects over as little as 2 s minus that delay.
/// 1.5 covers delays up to 0.67 s; bytes fetched outside the throttle show far above it.
const PEAK_MARGIN: f64 = 1.5;
/// Margin for the average rate (bytes over busy seconds) beyond the one-object burst the
/// throttle grants at the start of a round.
const AVERAGE_MARGIN: f64 = 1.05;

/// Asserts from a node's own counters that its recovery since `before` kept to `limit`
/// bytes per second; returns the bytes it recovered meanwhile.
fn assert_recovery_throttled(what: &str, before: Option<&Value>, after: &Value, limit: u64) -> u64 {
    let counter = |v: Option<&Value>, key: &str| -> f64 {
        v.map_or(0.0, |v| {
            v[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{what}: recovery counters lack {key}: {v}"))
        })
    };
    let bytes = counter(Some(after), "bytes_total") - counter(before, "bytes_total");
    let busy = counter(Some(after), "busy_secs_total") - counter(before, "busy_secs_total");
    let peak = counter(Some(after), "peak_rate_bps");
    let limit = limit as f64;
    eprintln!(
        "  {what}: {:.1} MiB in {busy:.2} busy s ({:.2} MiB/s), peak {:.2} MiB/s, limit {:.2} MiB/s",
        bytes / MIB as f64,
        if busy > 0.0 { bytes / busy / MIB as f64 } else { 0.0 },
        peak / MIB as f64,
        limit / MIB as f64
    );
    assert!(
        peak <= limit * PEAK_MARGIN,
        "{what}: peak recovery rate {peak} B/s exceeds the {limit} B/s throttle (margin {PEAK_MARGIN})\n{after:#}"
    );
    assert!(
        bytes <= limit * busy * AVERAGE_MARGIN + INODE_OBJECT_SIZE as f64,
        "{what}: {bytes} bytes recovered in {busy} busy seconds: faster than the {limit} B/s throttle allows\n{after:#}"
    );
    if bytes >= 3.0 * OBJECT_SIZE as f64 {
        assert!(
            peak > 0.0,
            "{what}: {bytes} bytes recovered over several seconds, yet no peak rate was recorded\n{after:#}"
        );
    }
    bytes as u64
}

#[test]
fn recovery_throttle_holds_by_the_daemons_counters_while_client_io_goes_on() {
    // Item 7: with a 4 MiB/s throttle (set at run time, and at start), each node's counters stay under it; clients keep working.
    let cluster = LocalCluster::up(ClusterOpts {
        nodes: 4,
        ..ClusterOpts::default()
    });
    let limit: u64 = 4 << 20;
    let size = 256 * MIB;
    cluster.dog_ok(&["vdi", "create", "v1", "256M"]);
    let mut expected = vec![0u8; size];

    eprintln!("phase: 128 MiB written to v1 while all 4 nodes are up");
    let first = random_bytes(128 * MIB, 71);
    nbd_write(&cluster.nbd_url(0, "v1"), 0, &first);
    expected[..first.len()].copy_from_slice(&first);
    // Small VDIs whose inodes change while node 3 is away: with four inodes, node 3 almost
    // surely holds a stale copy of one when it returns (each has 3 of the 4 nodes).
    let small_vdis = ["a", "b", "c"];
    let mut small_images = Vec::new();
    for (n, name) in small_vdis.iter().enumerate() {
        cluster.dog_ok(&["vdi", "create", name, "16M"]);
        let data = random_bytes(MIB, 80 + n as u64);
        nbd_write(&cluster.nbd_url(0, name), 0, &data);
        small_images.push(padded(&data, 16 * MIB));
    }

    eprintln!("phase: dog node recovery set-throttle 4M: every member must report it");
    cluster.dog_ok(&["node", "recovery", "set-throttle", "4M"]);
    let before = recovery_counters(&cluster, 0);
    assert_eq!(before.len(), 4, "recovery report of 4 members: {before:?}");
    for (addr, counters) in &before {
        assert_eq!(
            counters["throttle_bps"], limit,
            "{addr} does not report the throttle: {counters}"
        );
        assert_eq!(
            counters["bytes_total"], 0,
            "{addr} recovered data before any membership change: {counters}"
        );
    }

    eprintln!(
        "phase: node 3 is killed; nodes 0-2 re-replicate its copies (~96 MiB) under the throttle"
    );
    cluster.kill(3);
    cluster.assert_members(0, 3);
    let started = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        recovery_counters(&cluster, 0)
            .values()
            .any(|r| r["running"] == true && r["to_recover"].as_u64() > Some(0))
    });
    assert!(started, "no node started recovering node 3's copies");

    eprintln!("phase: client I/O through the gateways during recovery: a new VDI written and read back, v1 read back");
    cluster.dog_ok(&["vdi", "create", "scratch", "64M"]);
    let scratch = random_bytes(8 * MIB, 72);
    nbd_write(&cluster.nbd_url(0, "scratch"), 0, &scratch);
    assert_eq!(
        nbd_sha256(&cluster.nbd_url(1, "scratch/ro"), 0, scratch.len() as u64),
        sha256_of(&scratch),
        "a VDI written during recovery does not read back"
    );
    assert_eq!(
        nbd_sha256(&cluster.nbd_url(2, "v1/ro"), 0, 32 * MIB as u64),
        sha256_of(&expected[..32 * MIB]),
        "v1 read during recovery differs"
    );
    assert!(
        recovery_in_progress(&cluster, 0),
        "recovery had finished before the client I/O did: the I/O did not overlap it"
    );

    eprintln!("phase: recovery finishes; check clean and v1 intact");
    cluster.wait_recovered(0);
    // Counters first: the reads below could only add on-demand recovery to them.
    let after = recovery_counters(&cluster, 0);
    cluster.assert_check_clean(0, "after healing");
    assert_nbd_matches(
        &cluster.nbd_url(0, "v1/ro"),
        &expected,
        "v1 after the first recovery",
    );

    eprintln!("phase: each survivor's counters must show it kept to 4 MiB/s");
    let mut recovered = 0;
    for i in 0..3 {
        let addr = cluster.peer_addr(i);
        recovered += assert_recovery_throttled(
            &format!("node {i} (run-time throttle)"),
            before.get(&addr),
            &after[&addr],
            limit,
        );
    }
    assert!(
        recovered >= 24 * MIB as u64,
        "only {recovered} bytes were recovered: too little to judge the throttle"
    );

    eprintln!("phase: 48 MiB more written to v1 and 1 MiB to each small VDI while node 3 is away, for it to recover when it returns");
    let more = random_bytes(48 * MIB, 73);
    nbd_write(&cluster.nbd_url(1, "v1"), 128 * MIB as u64, &more);
    expected[128 * MIB..176 * MIB].copy_from_slice(&more);
    for (n, name) in small_vdis.iter().enumerate() {
        let data = random_bytes(MIB, 90 + n as u64);
        nbd_write(&cluster.nbd_url(1, name), 8 * MIB as u64, &data);
        small_images[n][8 * MIB..9 * MIB].copy_from_slice(&data);
    }

    eprintln!(
        "phase: node 3 restarted with sheep --recovery-max-rate 4M (the start-time throttle)"
    );
    let node3 = HandStartedSheep::start(&cluster, 3, &["--recovery-max-rate", "4M"]);
    cluster.assert_members(0, 4);
    let node3_addr = cluster.peer_addr(3);
    assert_eq!(
        recovery_counters(&cluster, 0)[&node3_addr]["throttle_bps"],
        limit,
        "node 3 does not report its --recovery-max-rate"
    );
    cluster.wait_recovered(0);
    let after = recovery_counters(&cluster, 0);

    eprintln!("phase: check clean; v1 and scratch read back through node 3");
    cluster.assert_check_clean(0, "after healing");
    assert_nbd_matches(&cluster.nbd_url(3, "v1/ro"), &expected, "v1 through node 3");
    assert_eq!(
        nbd_sha256(&cluster.nbd_url(3, "scratch/ro"), 0, scratch.len() as u64),
        sha256_of(&scratch),
        "scratch through node 3 differs"
    );
    for (name, image) in small_vdis.iter().zip(&small_images) {
        assert_nbd_matches(
            &cluster.nbd_url(3, &format!("{name}/ro")),
            image,
            &format!("{name} through node 3"),
        );
    }

    eprintln!(
        "phase: node 3's counters must show its recovery kept to its 4 MiB/s start-time limit"
    );
    let recovered = assert_recovery_throttled(
        "node 3 (start-time throttle)",
        None,
        &after[&node3_addr],
        limit,
    );
    assert!(
        recovered >= 24 * MIB as u64,
        "node 3 recovered only {recovered} bytes: too little to judge the throttle"
    );
    drop(node3);
}

//! The gateway's write-back cache under faults (issue 5, "What it must show" items 4, 5
//! and 6): FLUSH with replicas down, proved with the fault-injecting store and simulated
//! power cuts; fencing of a crashed gateway whose lock was taken over; and a simulated
//! host reboot (a fake boot-id file the test changes) that must drop unflushed cache
//! content instead of pushing it.
//!
//! Every VDI here is `writeback` with writethrough-until-first-flush switched off, and
//! each test checks that the cache holds dirty data before it injects a fault.

mod cache_support;
mod common;

use cache_support::*;
use common::nbd::{NbdshReply, MIB};
use std::time::{Duration, Instant};
use testkit::{random_bytes, wait_until};

/// `--cache-flush-timeout` of these clusters: how long a FLUSH waits for replicas.
const FLUSH_TIMEOUT_SECS: u64 = 5;

/// A 3-node, 3-copy cluster with the fault-injecting store, a 256 MiB cache per node and
/// a 5 s flush bound.
fn fault_cluster() -> CacheCluster {
    CacheCluster::up(CacheOpts {
        fault_injection: true,
        sheep_args: vec![format!("--cache-flush-timeout={FLUSH_TIMEOUT_SECS}")],
        ..CacheOpts::default()
    })
}

#[test]
fn flush_with_one_of_three_replicas_down_succeeds_and_survives_power_cut_of_the_live_nodes() {
    // Item 4a: FLUSH with 1 of 3 replicas killed succeeds (degraded, 2 >= min_copies), and a power cut of both live nodes loses none of it.
    let cluster = fault_cluster();
    cluster.create_writeback_vdi("a", "32M", &[]);

    eprintln!("phase: node 2 killed; nodes 0 and 1 see it gone");
    cluster.kill(2);
    cluster.wait_members(0, 2);
    cluster.wait_members(1, 2);

    eprintln!(
        "phase: 12 MiB through node 0 (objects 0-2, created now), dirty in its cache, then FLUSH"
    );
    let mut w = Writer::connect("writer", &cluster.nbd_url(0, "a"), vec![0; 32 * MIB]);
    w.write(0, &random_bytes(12 * MIB, 41));
    w.write(20 * MIB + 4096, &random_bytes(MIB, 42));
    cluster.assert_dirty(0, "a", "before the FLUSH");
    w.flush();
    assert_eq!(
        cluster.dirty_bytes(0, "a"),
        0,
        "dirty data after a successful FLUSH"
    );

    eprintln!(
        "phase: power cut of both live nodes (the connection still open), then every node restarts"
    );
    cluster.power_cut(1);
    cluster.power_cut(0);
    let model = std::mem::take(&mut w.model);
    drop(w);
    for i in 0..3 {
        cluster.start(i);
    }
    cluster.wait_members(0, 3);

    eprintln!("phase: the flushed data, through node 2 (down during the writes) and node 1");
    assert_export_holds(
        &cluster.nbd_url(2, "a/ro"),
        &model,
        "a through node 2 after the power cut",
    );
    assert_export_holds(
        &cluster.nbd_url(1, "a/ro"),
        &model,
        "a through node 1 after the power cut",
    );
    for i in 0..3 {
        cluster.assert_alive_without_panic(i);
    }
}

#[test]
fn flush_below_min_copies_fails_eio_after_the_bound_keeps_data_dirty_then_succeeds_durably() {
    // Item 4b: with 2 of 3 replicas down FLUSH fails with EIO after the 5 s bound, the data still dirty; once a node returns FLUSH succeeds and survives a power cut.
    let cluster = fault_cluster();
    cluster.create_writeback_vdi("b", "32M", &[]);
    let mut w = Writer::connect("writer", &cluster.nbd_url(0, "b"), vec![0; 32 * MIB]);

    eprintln!("phase: 8 MiB through node 0 and FLUSH with every node up");
    w.write(0, &random_bytes(8 * MIB, 51));
    w.flush();
    let flushes_before = cluster.cache_stats(0, "b")["flushes"].as_u64().unwrap_or(0);

    eprintln!("phase: nodes 1 and 2 killed; node 0 alone (1 live replica < min_copies 2)");
    cluster.kill(1);
    cluster.kill(2);
    cluster.wait_members(0, 1);

    eprintln!("phase: 8 MiB more (overwriting object 1, creating objects 3 and 4): acknowledged into the cache");
    w.write(4 * MIB, &random_bytes(4 * MIB, 52));
    w.write(12 * MIB, &random_bytes(6 * MIB, 53));
    let dirty = cluster.assert_dirty(0, "b", "before the failing FLUSH");
    assert!(
        dirty >= 10 * MIB as u64,
        "only {dirty} dirty bytes of 10 MiB written"
    );

    eprintln!(
        "phase: FLUSH must fail with EIO after the {FLUSH_TIMEOUT_SECS} s bound, never succeed"
    );
    let started = Instant::now();
    let reply = w.h.call("h.flush()");
    let took = started.elapsed();
    match &reply {
        NbdshReply::Nbd { errno, message } => assert_eq!(
            errno, "EIO",
            "FLUSH below min_copies failed with {errno} ({message}), expected EIO"
        ),
        other => panic!("FLUSH below min_copies did not fail: {other:?} after {took:?}"),
    }
    assert!(
        took >= Duration::from_secs(FLUSH_TIMEOUT_SECS) && took < Duration::from_secs(60),
        "FLUSH failed after {took:?}, expected the {FLUSH_TIMEOUT_SECS} s bound"
    );
    eprintln!("[cache] FLUSH failed after {took:?}: {reply:?}");
    let stats = cluster.cache_stats(0, "b");
    assert!(
        stats["dirty_bytes"].as_u64().unwrap_or(0) >= dirty,
        "dirty data dropped by the failed FLUSH: {dirty} before, now {stats}"
    );
    assert_eq!(
        stats["flushes"].as_u64().unwrap_or(0),
        flushes_before,
        "a failed FLUSH was counted as done: {stats}"
    );
    cluster.assert_alive_without_panic(0);

    eprintln!("phase: node 1 returns (2 live replicas): FLUSH succeeds, nothing dirty");
    cluster.start(1);
    cluster.wait_members(0, 2);
    w.flush();
    assert_eq!(
        cluster.dirty_bytes(0, "b"),
        0,
        "dirty data after a successful FLUSH"
    );

    eprintln!("phase: power cut of both live nodes (connection open), every node restarts: the data is durable");
    cluster.power_cut(1);
    cluster.power_cut(0);
    let model = std::mem::take(&mut w.model);
    drop(w);
    for i in 0..3 {
        cluster.start(i);
    }
    cluster.wait_members(0, 3);
    assert_export_holds(
        &cluster.nbd_url(2, "b/ro"),
        &model,
        "b through node 2 after the power cut",
    );
    assert_export_holds(
        &cluster.nbd_url(1, "b/ro"),
        &model,
        "b through node 1 after the power cut",
    );
    for i in 0..3 {
        cluster.assert_alive_without_panic(i);
    }
}

#[test]
fn crashed_gateway_whose_lock_was_taken_over_quarantines_its_cache_and_the_new_data_stands() {
    // Item 5: node 0 dies with dirty data, node 1 takes its lock over and overwrites the range; node 0 restarts and must set its cache aside, never push it.
    let cluster = CacheCluster::up(CacheOpts::default());
    let vid = cluster.create_writeback_vdi("f", "32M", &[]);
    let mut w = Writer::connect("old-gateway", &cluster.nbd_url(0, "f"), vec![0; 32 * MIB]);

    eprintln!("phase: 16 MiB base through node 0, FLUSH; then 8 MiB of OLD data over [0, 8M), not flushed");
    w.write(0, &random_bytes(16 * MIB, 61));
    w.flush();
    let base = w.model.clone();
    w.write(0, &random_bytes(8 * MIB, 62));
    cluster.assert_dirty(0, "f", "OLD data before the kill");
    let generation = cluster
        .lock_of(1, "f")
        .unwrap_or_else(|| panic!("f is not locked while node 0 writes it"))["generation"]
        .as_u64()
        .expect("lock generation");

    eprintln!("phase: kill -9 node 0 (connection open); node 1 sees it gone");
    cluster.kill(0);
    drop(w);
    cluster.wait_members(1, 2);

    eprintln!("phase: node 1 takes the lock over and writes NEW data over the same [0, 8M), FLUSH, disconnect");
    let mut w1 = Writer::connect("new-gateway", &cluster.nbd_url(1, "f"), base);
    let lock = cluster.lock_of(1, "f").expect("f locked by node 1");
    assert!(
        lock["generation"].as_u64().unwrap_or(0) > generation,
        "the take-over did not raise the lock generation (was {generation}): {lock}"
    );
    w1.write(0, &random_bytes(8 * MIB, 63));
    w1.flush();
    let model = w1.model.clone();
    w1.h.close();
    cluster.wait_unlocked(1, "f");

    eprintln!("phase: node 0 restarts: it must set its cache of f aside, not push it");
    let log_before = cluster.node_log(0).len();
    cluster.start(0);
    let quarantined = wait_until_some(Duration::from_secs(30), || {
        let q = cluster.quarantined(0);
        q.iter()
            .any(|n| n.starts_with(&format!("{vid:06x}.")))
            .then_some(q)
    });
    let log = cluster.node_log(0);
    let since = &log[log_before..];
    assert!(
        quarantined.is_some(),
        "node 0 did not set its cache of f (vid {vid:06x}) aside; quarantine: {:?}; log:\n{}",
        cluster.quarantined(0),
        tail(since, 40)
    );
    assert!(
        !since.contains("resuming the push"),
        "node 0 resumed pushing a fenced cache:\n{}",
        tail(since, 40)
    );
    cluster.wait_unlocked(1, "f");
    if let Some(c) = cluster.cache_info(0, "f") {
        assert_eq!(
            c["dirty_bytes"], 0,
            "node 0 still holds f's old dirty data: {c}"
        );
        assert_eq!(c["pushes"], 0, "node 0 pushed f after the restart: {c}");
    }

    eprintln!("phase: the NEW data stands, through node 2 and through node 0 itself");
    assert_export_holds(&cluster.nbd_url(2, "f/ro"), &model, "f through node 2");
    assert_export_holds(
        &cluster.nbd_url(0, "f"),
        &model,
        "f through the restarted node 0",
    );
    for i in 0..3 {
        cluster.assert_alive_without_panic(i);
    }
}

#[test]
fn simulated_reboot_drops_unflushed_cache_content_and_flushed_data_is_intact() {
    // Item 6: after a (simulated) host reboot the unsealed cache's unflushed writes are never pushed; what was flushed before is intact.
    let cluster = CacheCluster::up_with(
        CacheOpts {
            fault_injection: true,
            ..CacheOpts::default()
        },
        |dir| {
            let file = dir.join("boot_id");
            std::fs::write(&file, "boot-before\n").expect("writing the fake boot id");
            vec![format!("--boot-id-file={}", file.display())]
        },
    );
    let boot_file = cluster.dir().join("boot_id");
    cluster.create_writeback_vdi("r", "32M", &[]);
    let mut w = Writer::connect("writer", &cluster.nbd_url(0, "r"), vec![0; 32 * MIB]);

    eprintln!("phase: A = 12 MiB through node 0, FLUSH");
    w.write(0, &random_bytes(12 * MIB, 81));
    w.flush();
    let flushed = w.model.clone();

    eprintln!(
        "phase: nodes 1 and 2 killed, so nothing more can be pushed (1 replica < min_copies)"
    );
    cluster.kill(1);
    cluster.kill(2);
    cluster.wait_members(0, 1);

    eprintln!(
        "phase: B = 8 MiB over A and 4 MiB into fresh object 4, acknowledged into the cache only"
    );
    w.write(0, &random_bytes(8 * MIB, 82));
    w.write(16 * MIB, &random_bytes(4 * MIB, 83));
    let dirty = cluster.assert_dirty(0, "r", "B before the reboot");
    assert!(
        dirty >= 12 * MIB as u64,
        "only {dirty} dirty bytes of 12 MiB written"
    );

    eprintln!(
        "phase: 'reboot' of the host: power cut of node 0, a new boot id, every node restarted"
    );
    cluster.power_cut(0);
    drop(w);
    std::fs::write(&boot_file, "boot-after\n").expect("changing the fake boot id");
    let log_before = cluster.node_log(0).len();
    cluster.start(0);
    cluster.start(1);
    cluster.start(2);
    cluster.wait_members(0, 3);
    let log = cluster.node_log(0);
    let since = &log[log_before..];
    assert!(
        since.contains("rebooted"),
        "node 0 does not report the reboot when opening its cache:\n{}",
        tail(since, 40)
    );
    assert!(
        !since.contains("resuming the push"),
        "node 0 resumed pushing unflushed data from before the reboot:\n{}",
        tail(since, 40)
    );
    if let Some(c) = cluster.cache_info(0, "r") {
        assert_eq!(
            c["dirty_bytes"], 0,
            "node 0 kept B dirty after the reboot: {c}"
        );
    }

    eprintln!("phase: exactly A (B never pushed), through node 1 read-only");
    assert_export_holds(
        &cluster.nbd_url(1, "r/ro"),
        &flushed,
        "r through node 1 after the reboot",
    );

    eprintln!("phase: node 0 dropped its cache, so it keeps no lock for it: node 2 opens r read-write and reads A");
    // A lock left behind is recorded and broken, so the rest of the test still runs.
    let released = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        cluster.lock_of(1, "r").is_none()
    });
    let stale_lock = if released {
        None
    } else {
        cluster.lock_of(1, "r")
    };
    if let Some(lock) = &stale_lock {
        eprintln!("[cache] r still locked 15 s after the reboot: {lock:?}; breaking it");
        cluster.dog_ok(1, &["vdi", "lock", "unlock", "r", "--force"]);
    }
    assert_export_holds(
        &cluster.nbd_url(2, "r"),
        &flushed,
        "r through node 2 read-write after the reboot",
    );
    cluster.wait_unlocked(1, "r");

    eprintln!("phase: node 0 reopens r read-write: A, nothing of its dropped cache");
    assert_export_holds(
        &cluster.nbd_url(0, "r"),
        &flushed,
        "r through node 0 after the reboot",
    );
    for i in 0..3 {
        cluster.assert_alive_without_panic(i);
    }
    assert!(
        stale_lock.is_none(),
        "node 0 dropped its cache after the reboot but kept r's lock (no client, nothing to push), so other gateways could not write r: {stale_lock:?}"
    );
}

#[test]
fn a_long_sequential_stream_goes_around_the_cache_stays_coherent_and_a_flush_makes_it_durable() {
    // Writes of a sequential stream past --cache-sequential-cutoff go straight to the replicas; the cache blocks they replace (dirty ones too) are dropped, never pushed over them; FLUSH syncs every replica they reached, so a power cut of all nodes after it loses nothing.
    let cluster = CacheCluster::up(CacheOpts {
        fault_injection: true,
        sheep_args: vec![
            format!("--cache-flush-timeout={FLUSH_TIMEOUT_SECS}"),
            "--cache-sequential-cutoff=8M".into(),
        ],
        ..CacheOpts::default()
    });
    cluster.create_writeback_vdi("s", "48M", &[]);
    let mut w = Writer::connect("writer", &cluster.nbd_url(0, "s"), vec![0; 48 * MIB]);

    eprintln!("phase: 64 KiB writes (too small to go around) every 2 MiB, dirty in node 0's cache");
    for k in 0..24 {
        w.write(k * 2 * MIB + 8192, &random_bytes(64 * 1024, 100 + k as u64));
    }
    cluster.assert_dirty(0, "s", "before the stream");

    eprintln!("phase: a 40 MiB sequential stream over them (4 MiB requests, all in flight)");
    w.write(0, &random_bytes(40 * MIB, 90));
    let stats = cluster.cache_stats(0, "s");
    let around = stats["written_around_bytes"].as_u64().unwrap_or(0);
    assert!(
        around >= 16 * MIB as u64,
        "only {around} bytes of the stream went around the cache: {stats}"
    );

    eprintln!("phase: 64 KiB writes on top of blocks the stream wrote around; read back");
    w.write(20 * MIB + 4096, &random_bytes(64 * 1024, 91));
    w.write(44 * MIB, &random_bytes(64 * 1024, 92));
    w.assert_model("s through node 0 before the FLUSH");
    w.flush();
    assert_eq!(
        cluster.dirty_bytes(0, "s"),
        0,
        "dirty data after a successful FLUSH"
    );

    eprintln!("phase: power cut of every node (the connection still open), then all restart");
    for i in [2, 1, 0] {
        cluster.power_cut(i);
    }
    let model = std::mem::take(&mut w.model);
    drop(w);
    for i in 0..3 {
        cluster.start(i);
    }
    cluster.wait_members(0, 3);
    for i in [1, 2] {
        assert_export_holds(
            &cluster.nbd_url(i, "s/ro"),
            &model,
            &format!("s through node {i} after the power cut"),
        );
    }
    for i in 0..3 {
        cluster.assert_alive_without_panic(i);
    }
}

/// Calls `f` every 200 ms until it returns Some or `timeout` has passed.
fn wait_until_some<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

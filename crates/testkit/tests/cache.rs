//! The gateway's write-back object cache with real clients (issue 5, "What it must
//! show" items 1, 2, 3, 7 and 7b): fio verifying data through a cache smaller than its
//! working set, a `kill -9` of the gateway with unflushed data, a gateway lost for good
//! after a FLUSH, a cache file truncated to zero after a clean stop, and TRIM in the
//! cache with `nbdinfo --map`. Plus the one-writer rules around the cache: `dog vdi
//! read/write` of a VDI whose cache holds dirty data, and a gateway's clean cache after
//! someone else changed the VDI.
//!
//! Every VDI here is `writeback` with writethrough-until-first-flush switched off, and
//! each test checks that the cache holds dirty data before it crashes anything, so the
//! cache is exercised, not writethrough. The fault tests with replicas down, fencing and
//! reboots are in `cache_faults.rs`.

mod cache_support;
mod common;

use cache_support::*;
use common::nbd::{run, tool, MIB, OBJECT_SIZE, TOOL_TIMEOUT};
use serde_json::Value;
use std::path::Path;
use testkit::{describe, random_bytes, sha256_of};

/// Runs fio's nbd engine against `url`: 16 KiB random writes over the first 128 MiB,
/// iodepth 32, crc32c verification of everything written; with `verify_only`, only
/// reads and verifies what the same job wrote before. Returns the job's JSON report.
fn fio_randwrite_verify(url: &str, scratch: &Path, verify_only: bool) -> Value {
    let mut cmd = tool("fio");
    cmd.args([
        "--output-format=json",
        "--name=cache",
        "--ioengine=nbd",
        &format!("--uri={url}"),
        "--rw=randwrite",
        "--bs=16k",
        "--size=128M",
        "--iodepth=32",
        "--randseed=5",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_dump=0",
        "--verify_state_save=0",
    ]);
    if verify_only {
        cmd.arg("--verify_only");
    }
    // fio writes state files into its working directory: keep them out of the tree.
    cmd.current_dir(scratch);
    let out = run(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "fio (verify_only={verify_only}) failed (verify errors fail it)\n{}",
        describe(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json_at = stdout
        .find('{')
        .unwrap_or_else(|| panic!("fio printed no JSON\n{}", describe(&out)));
    let report: Value = serde_json::from_str(&stdout[json_at..]).expect("fio JSON report");
    let job = report["jobs"][0].clone();
    assert_eq!(job["error"], 0, "fio job reports error {}", job["error"]);
    job
}

#[test]
fn fio_randwrite_over_4x_the_cache_verifies_and_reads_back_identically_through_another_gateway() {
    // Item 1: 128 MiB of verified random writes through a 32 MiB cache (pushes, backpressure, evictions), then fio's verify_only through node 1.
    let cluster = CacheCluster::up(CacheOpts {
        cache_size: "32M".into(),
        ..CacheOpts::default()
    });
    let vid = cluster.create_writeback_vdi("f", "128M", &[]);
    let scratch = tempfile::tempdir().expect("temp dir for fio");

    eprintln!("phase: fio randwrite bs=16k over 128 MiB (4x node 0's 32 MiB cache), iodepth 32, verify=crc32c");
    let job = fio_randwrite_verify(&cluster.nbd_url(0, "f"), scratch.path(), false);
    eprintln!(
        "[cache] fio: write {} ms, verify {} ms",
        job["write"]["runtime"], job["read"]["runtime"]
    );
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(128 * MIB as u64),
        "fio did not write 128 MiB"
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(128 * MIB as u64),
        "fio did not verify (read back) 128 MiB"
    );

    eprintln!("phase: fio disconnected: node 0 pushes, flushes and releases the VDI");
    cluster.wait_unlocked(0, "f");
    let stats = cluster.cache_stats(0, "f");
    eprintln!("[cache] node 0 cache of f after fio: {stats}");
    for counter in ["pushes", "backpressure_waits", "evictions"] {
        assert!(
            stats[counter].as_u64().unwrap_or(0) > 0,
            "the cache shows no {counter}: {stats}"
        );
    }
    assert_eq!(
        stats["dirty_bytes"], 0,
        "dirty data left after the release: {stats}"
    );

    eprintln!("phase: fio verify_only through node 1 (another gateway, its own cache): every block as written");
    let job = fio_randwrite_verify(&cluster.nbd_url(1, "f"), scratch.path(), true);
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(128 * MIB as u64),
        "fio verify_only did not read back 128 MiB"
    );

    eprintln!("phase: node 0's cache within bounds: its byte counters match the objects it holds, and (idle, all clean) its data files use at most size + dirty limit");
    let number = |key: &str| stats[key].as_u64().unwrap_or(u64::MAX);
    let counted = number("clean_bytes").saturating_add(number("dirty_bytes"));
    let holdable = number("objects").saturating_mul(OBJECT_SIZE as u64);
    let on_disk = cache_data_bytes_on_disk(&cluster.vdi_cache_dir(0, vid));
    let bound = number("size_limit").saturating_add(number("dirty_limit"));
    eprintln!(
        "[cache] node 0 cache of f: counted {counted} B in {} objects (at most {holdable} B); {on_disk} B of data files on disk (bound {bound} B)",
        number("objects")
    );
    let mut wrong = Vec::new();
    if counted > holdable {
        wrong.push(format!(
            "cache info counts {counted} B clean+dirty, but {} cached objects of 4 MiB hold at most {holdable} B",
            number("objects")
        ));
    }
    if on_disk > bound {
        wrong.push(format!(
            "the idle, all-clean cache keeps {on_disk} B of data files, over its size + dirty limit ({bound} B)"
        ));
    }
    assert!(
        wrong.is_empty(),
        "node 0's cache of f out of bounds:\n{}\n{stats}",
        wrong.join("\n")
    );
    for i in 0..3 {
        cluster.assert_alive_without_panic(i);
    }
}

#[test]
fn kill_9_with_64mib_unflushed_loses_nothing_restarted_gateway_serves_and_pushes_it() {
    // Item 2: the gateway crashes (kill -9, same boot) holding 64 MiB never flushed; restarted, it serves the data and pushes it, and node 1 then reads it too.
    let cluster = CacheCluster::up(CacheOpts::default());
    cluster.create_writeback_vdi("d", "64M", &[]);
    let mut w = Writer::connect("writer", &cluster.nbd_url(0, "d"), vec![0; 64 * MIB]);

    eprintln!("phase: 64 MiB of random data through node 0, no FLUSH");
    w.write(0, &random_bytes(64 * MIB, 2));
    cluster.assert_dirty(0, "d", "before the kill");

    eprintln!("phase: kill -9 node 0 at once (the connection still open), then restart it");
    cluster.kill(0);
    let model = std::mem::take(&mut w.model);
    drop(w);
    let log_before = cluster.node_log(0).len();
    cluster.start(0);

    eprintln!(
        "phase: the restarted node 0 serves the 64 MiB (read-write export, through its cache)"
    );
    assert_export_holds(
        &cluster.nbd_url(0, "d"),
        &model,
        "d through the restarted node 0",
    );

    eprintln!("phase: node 0 pushes what it found, flushes and releases the VDI");
    cluster.wait_unlocked(1, "d");
    let log = cluster.node_log(0);
    assert!(
        log[log_before..].contains("unflushed"),
        "the restarted node 0 does not say it found unflushed cache data:\n{}",
        tail(&log[log_before..], 40)
    );
    assert_eq!(
        cluster.dirty_bytes(0, "d"),
        0,
        "node 0 still holds dirty data after releasing the VDI"
    );

    eprintln!(
        "phase: node 1 (read-write, its own cache) and node 2 (read-only) read the same 64 MiB"
    );
    assert_export_holds(&cluster.nbd_url(1, "d"), &model, "d through node 1");
    assert_export_holds(
        &cluster.nbd_url(2, "d/ro"),
        &model,
        "d through node 2 read-only",
    );
    for i in 0..3 {
        cluster.assert_alive_without_panic(i);
    }
}

#[test]
fn flushed_data_survives_losing_the_gateway_for_good_and_reads_back_through_other_nodes() {
    // Item 3: write, FLUSH, the gateway is killed and never restarted: the other nodes serve exactly the flushed data.
    let cluster = CacheCluster::up(CacheOpts::default());
    cluster.create_writeback_vdi("c", "32M", &[]);
    let mut w = Writer::connect("writer", &cluster.nbd_url(0, "c"), vec![0; 32 * MIB]);

    eprintln!("phase: 20 MiB of random data through node 0 (objects 0-4, the last one partly), then FLUSH");
    w.write(0, &random_bytes(16 * MIB, 3));
    w.write(16 * MIB + 4096, &random_bytes(4 * MIB - 8192, 4));
    cluster.assert_dirty(0, "c", "before the FLUSH");
    w.flush();
    let stats = cluster.cache_stats(0, "c");
    assert_eq!(stats["dirty_bytes"], 0, "dirty data after FLUSH: {stats}");
    assert!(
        stats["flushes"].as_u64().unwrap_or(0) >= 1,
        "no flush counted: {stats}"
    );

    eprintln!("phase: kill -9 node 0 for good (connection open); nodes 1 and 2 see it gone");
    cluster.kill(0);
    let model = std::mem::take(&mut w.model);
    drop(w);
    cluster.wait_members(1, 2);

    eprintln!("phase: node 1 read-only, then node 2 read-write (taking the dead gateway's lock over): the flushed data");
    assert_export_holds(
        &cluster.nbd_url(1, "c/ro"),
        &model,
        "c through node 1 read-only",
    );
    assert_export_holds(
        &cluster.nbd_url(2, "c"),
        &model,
        "c through node 2 read-write",
    );
    cluster.assert_alive_without_panic(1);
    cluster.assert_alive_without_panic(2);
}

#[test]
fn cache_file_truncated_to_zero_after_clean_stop_is_not_trusted_and_flushed_data_reads_back() {
    // Item 7: write, FLUSH, clean stop (sealed cache); a data file and a meta file truncated to zero: the gateway starts, serves and pushes no garbage.
    let cluster = CacheCluster::up(CacheOpts::default());
    let vid_a = cluster.create_writeback_vdi("a", "16M", &[]);
    let vid_b = cluster.create_writeback_vdi("b", "16M", &[]);

    eprintln!("phase: 12 MiB into a and 8 MiB into b through node 0, FLUSH each, disconnect");
    let mut wa = Writer::connect("a", &cluster.nbd_url(0, "a"), vec![0; 16 * MIB]);
    let mut wb = Writer::connect("b", &cluster.nbd_url(0, "b"), vec![0; 16 * MIB]);
    wa.write(0, &random_bytes(12 * MIB, 71));
    wb.write(4 * MIB, &random_bytes(8 * MIB, 72));
    cluster.assert_dirty(0, "a", "a before the FLUSH");
    cluster.assert_dirty(0, "b", "b before the FLUSH");
    wa.flush();
    wb.flush();
    let (model_a, model_b) = (wa.model.clone(), wb.model.clone());
    wa.h.close();
    wb.h.close();
    cluster.wait_unlocked(0, "a");
    cluster.wait_unlocked(0, "b");
    for name in ["a", "b"] {
        let stats = cluster.cache_stats(0, name);
        assert_eq!(
            stats["dirty_bytes"], 0,
            "{name}: dirty after FLUSH: {stats}"
        );
        assert!(
            stats["clean_bytes"].as_u64().unwrap_or(0) >= 8 * MIB as u64,
            "{name}: the cache kept no clean copy to truncate: {stats}"
        );
    }

    eprintln!("phase: clean stop of node 0 (SIGTERM): its cache is sealed");
    cluster.stop(0);
    let identity = std::fs::read_to_string(cluster.cache_root(0).join("identity.json"))
        .expect("node 0's cache identity");
    let identity: Value = serde_json::from_str(&identity).expect("identity.json is JSON");
    assert_eq!(
        identity["sealed"], true,
        "cache not sealed by SIGTERM: {identity}"
    );

    eprintln!("phase: truncate a's cached object 1 and b's meta file to zero bytes");
    let obj = cluster.vdi_cache_dir(0, vid_a).join("obj-00000001");
    let meta = cluster.vdi_cache_dir(0, vid_b).join("meta");
    for file in [&obj, &meta] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .unwrap_or_else(|e| panic!("opening {}: {e}", file.display()));
        f.set_len(0).expect("truncating a cache file");
    }

    eprintln!(
        "phase: node 0 starts and serves both VDIs read-write through its cache: the flushed data"
    );
    let log_before = cluster.node_log(0).len();
    cluster.start(0);
    cluster.assert_alive_without_panic(0);
    assert_export_holds(
        &cluster.nbd_url(0, "a"),
        &model_a,
        "a through node 0 after the truncation",
    );
    assert_export_holds(
        &cluster.nbd_url(0, "b"),
        &model_b,
        "b through node 0 after the truncation",
    );
    cluster.wait_unlocked(0, "a");
    cluster.wait_unlocked(0, "b");

    eprintln!(
        "phase: the replicas were not overwritten with garbage: node 1 reads the flushed data"
    );
    assert_export_holds(&cluster.nbd_url(1, "a/ro"), &model_a, "a through node 1");
    assert_export_holds(&cluster.nbd_url(1, "b/ro"), &model_b, "b through node 1");
    cluster.assert_alive_without_panic(0);
    let log = cluster.node_log(0);
    eprintln!(
        "[cache] node 0 log since the restart:\n{}",
        tail(&log[log_before..], 20)
    );
}

#[test]
fn trim_in_writeback_reads_as_zeros_through_another_gateway_and_dirty_data_never_maps_as_hole() {
    // Item 7b: dirty data (unpushable, a replica down) maps as data; TRIM then FLUSH, the gateway is lost for good: the range reads as zeros elsewhere.
    let cluster = CacheCluster::up(CacheOpts::default());
    // min_copies 3: with one node down nothing can be pushed, so data stays dirty.
    cluster.create_writeback_vdi("t", "32M", &["--min-copies", "3"]);
    let size = 32 * MIB;
    let mut w = Writer::connect("writer", &cluster.nbd_url(0, "t"), vec![0; size]);
    let map_url = cluster.nbd_url(0, "t/ro");

    eprintln!("phase: 16 MiB (objects 0-3) through node 0, FLUSH");
    w.write(0, &random_bytes(16 * MIB, 7));
    cluster.assert_dirty(0, "t", "before the first FLUSH");
    w.flush();
    assert_no_data_in_holes(&map_url, &w.model, "map after the first FLUSH");

    eprintln!("phase: node 2 killed: pushes cannot reach min_copies; new data into fresh object 5 stays dirty");
    cluster.kill(2);
    cluster.wait_members(0, 2);
    w.write(5 * OBJECT_SIZE + 64 * 1024, &random_bytes(2 * MIB, 8));
    cluster.assert_dirty(0, "t", "object 5 written with a replica down");
    let map = assert_no_data_in_holes(
        &map_url,
        &w.model,
        "map with object 5 dirty only in the cache",
    );
    assert_eq!(
        map_type_at(&map, 5 * OBJECT_SIZE as u64 + 64 * 1024) & 1,
        0,
        "object 5 (dirty in the cache) is mapped as a hole: {map:?}"
    );
    assert_eq!(
        map_type_at(&map, 4 * OBJECT_SIZE as u64) & 1,
        1,
        "object 4 (never written) is not a hole: {map:?}"
    );

    eprintln!("phase: node 2 back; TRIM 1 MiB inside object 1 and all of object 2; the ranges read as zeros at once");
    cluster.start(2);
    cluster.wait_members(0, 3);
    w.trim(OBJECT_SIZE + 64 * 1024, MIB);
    w.trim(2 * OBJECT_SIZE, OBJECT_SIZE);
    w.assert_model("t through node 0 after the TRIMs");
    cluster.assert_dirty(0, "t", "after the TRIMs");
    assert_no_data_in_holes(&map_url, &w.model, "map with TRIMs dirty in the cache");

    eprintln!("phase: FLUSH (every replica up again), then kill -9 node 0 for good");
    w.flush();
    assert_eq!(cluster.dirty_bytes(0, "t"), 0, "dirty data after FLUSH");
    assert_no_data_in_holes(&map_url, &w.model, "map after the second FLUSH");
    cluster.kill(0);
    let model = std::mem::take(&mut w.model);
    drop(w);
    cluster.wait_members(1, 2);

    eprintln!("phase: through node 1 the trimmed ranges are zeros and the rest as written");
    assert_export_holds(&cluster.nbd_url(1, "t/ro"), &model, "t through node 1");
    assert_no_data_in_holes(&cluster.nbd_url(1, "t/ro"), &model, "map through node 1");
    cluster.assert_alive_without_panic(1);
    cluster.assert_alive_without_panic(2);
}

#[test]
fn dog_vdi_read_and_write_of_a_vdi_with_dirty_cache_go_through_its_cache_or_are_refused() {
    // DESIGN §6.9: while a gateway caches a VDI, `dog vdi read/write` must go through that cache (or be refused), never bypass it.
    let cluster = CacheCluster::up(CacheOpts::default());
    cluster.create_writeback_vdi("v", "16M", &["--min-copies", "3"]);
    let mut w = Writer::connect("writer", &cluster.nbd_url(0, "v"), vec![0; 16 * MIB]);
    let old = random_bytes(4 * MIB, 11);
    w.write(0, &old);
    w.flush();
    // Every violation is collected, so one run reports all of them.
    let mut wrong = Vec::new();

    eprintln!("phase: node 2 killed so nothing can be pushed; NEW data into object 0 stays dirty in node 0's cache only");
    cluster.kill(2);
    cluster.wait_members(0, 2);
    let new = random_bytes(MIB, 12);
    w.write(0, &new);
    cluster.assert_dirty(0, "v", "NEW data written with a replica down");
    for i in [0, 1] {
        eprintln!("phase: dog -a node{i} vdi read v 0 1M: NEW (through the cache) or a refusal, never the replicas' older data");
        let out = cluster.dog_at(i, &["vdi", "read", "v", "0", "1M"]);
        if !out.status.success() {
            eprintln!("[cache] refused: {}", String::from_utf8_lossy(&out.stderr));
        } else if out.stdout != new {
            wrong.push(format!(
                "`dog -a node{i} vdi read v 0 1M` succeeded but returned {} instead of the NEW data dirty in node 0's cache",
                if out.stdout[..] == old[..MIB] { "the replicas' older data" } else { "other data" }
            ));
        }
    }

    eprintln!("phase: node 2 back: node 0 pushes NEW");
    cluster.start(2);
    cluster.wait_members(0, 3);

    eprintln!("phase: dog -a node1 vdi write v (not the holder): refused");
    let out = cluster.dog_at_stdin(1, &["vdi", "write", "v", "0", "1M"], &random_bytes(MIB, 13));
    if out.status.success() {
        wrong.push("`dog -a node1 vdi write v 0 1M` succeeded while node 0 holds v".into());
    }

    eprintln!("phase: dog -a node0 (the holder) vdi write v 0 1M with DOG data: refused, or seen by node 0's NBD client and, after FLUSH, by node 1");
    let from_dog = random_bytes(MIB, 14);
    let out = cluster.dog_at_stdin(0, &["vdi", "write", "v", "0", "1M"], &from_dog);
    if !out.status.success() {
        eprintln!("[cache] refused: {}", String::from_utf8_lossy(&out.stderr));
    } else {
        let name = |sha: &str| {
            if sha == sha256_of(&from_dog) {
                "the DOG data"
            } else if sha == sha256_of(&new) {
                "the NEW data cached before"
            } else {
                "other data"
            }
        };
        let through_cache = w.h.read_sha(0, MIB);
        w.flush();
        let mut reader = common::nbd::Nbdsh::connect("node1-ro", &cluster.nbd_url(1, "v/ro"));
        let replicas = reader.read_sha(0, MIB);
        reader.close();
        if through_cache != sha256_of(&from_dog) || replicas != through_cache {
            wrong.push(format!(
                "`dog -a node0 vdi write v 0 1M` succeeded, but node 0's NBD client then reads {} and, after its FLUSH, node 1 reads {} (the write bypassed the cache)",
                name(&through_cache),
                name(&replicas)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "dog vdi read/write bypass the write-back cache:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn clean_cache_of_an_earlier_session_is_not_served_after_another_writer_changed_the_vdi() {
    // The original's bug: a gateway reopening a VDI must not serve its clean cached copy when another gateway (NBD) or dog wrote the VDI in between.
    let cluster = CacheCluster::up(CacheOpts::default());
    cluster.create_writeback_vdi("s", "16M", &[]);

    eprintln!(
        "phase: node 0 writes X to object 0, flushes, disconnects: its cache keeps a clean copy"
    );
    let mut w = Writer::connect("node0-first", &cluster.nbd_url(0, "s"), vec![0; 16 * MIB]);
    w.write(0, &random_bytes(4 * MIB, 21));
    w.flush();
    w.assert_model("s through node 0 (cached)");
    let mut model = std::mem::take(&mut w.model);
    w.h.close();
    cluster.wait_unlocked(0, "s");

    eprintln!("phase: node 1 writes Y over the first MiB through NBD (it takes the lock), flushes, disconnects");
    let mut w1 = Writer::connect("node1", &cluster.nbd_url(1, "s"), model.clone());
    w1.write(0, &random_bytes(MIB, 22));
    w1.flush();
    model = std::mem::take(&mut w1.model);
    w1.h.close();
    cluster.wait_unlocked(1, "s");

    eprintln!("phase: node 0 reopens s: it must serve Y, not its cached X");
    assert_export_holds(
        &cluster.nbd_url(0, "s"),
        &model,
        "s through node 0 after node 1 wrote it",
    );
    cluster.wait_unlocked(0, "s");

    eprintln!("phase: dog -a node1 vdi write (no lock held) writes Z over the second MiB");
    let before_dog = model[MIB..2 * MIB].to_vec();
    let z = random_bytes(MIB, 23);
    let out = cluster.dog_at_stdin(1, &["vdi", "write", "s", "1M", "1M"], &z);
    assert!(
        out.status.success(),
        "dog vdi write of an unlocked VDI failed\n{}",
        describe(&out)
    );
    model[MIB..2 * MIB].copy_from_slice(&z);
    assert_export_holds(
        &cluster.nbd_url(2, "s/ro"),
        &model,
        "s through node 2 after dog wrote it",
    );

    eprintln!("phase: node 0 reopens s again: it must serve Z, not its cached copy");
    let mut h = common::nbd::Nbdsh::connect("node0-again", &cluster.nbd_url(0, "s"));
    let got = h.read_sha(MIB as u64, MIB);
    assert!(
        got == sha256_of(&z),
        "node 0 reopened s and serves {} for [1M, 2M) instead of what dog vdi write put there (lock {:?})",
        if got == sha256_of(&before_dog) { "its stale cached copy" } else { "other data" },
        cluster.lock_of(1, "s")
    );
    h.assert_content(&model, "s through node 0 after dog vdi write");
    h.close();
}

#[test]
fn a_cold_cache_fetches_only_the_blocks_read_and_merges_them_with_its_dirty_ones() {
    // DESIGN §6.6: a read miss fetches from a replica and keeps the copy. Only the blocks read are fetched (a 4 KiB miss costs 4 KiB, not a 4 MiB object), and a read spanning blocks the cache holds dirty and blocks it lacks returns both right.
    let cluster = CacheCluster::up(CacheOpts::default());
    cluster.create_writeback_vdi("c", "16M", &[]);

    eprintln!("phase: 16 MiB written and flushed through node 1, which then lets the VDI go");
    let mut w1 = Writer::connect("node1", &cluster.nbd_url(1, "c"), vec![0; 16 * MIB]);
    w1.write(0, &random_bytes(16 * MIB, 31));
    w1.flush();
    let model = std::mem::take(&mut w1.model);
    w1.h.close();
    cluster.wait_unlocked(1, "c");

    eprintln!("phase: node 0, its cache cold: 8 KiB dirty at 1 MiB + 4 KiB, then reads around it");
    let mut w = Writer::connect("node0", &cluster.nbd_url(0, "c"), model);
    w.write(MIB + 4096, &random_bytes(8192, 32));
    // 64 KiB over the two dirty blocks and 14 missing ones; 4 KiB in three other objects.
    let reads = [
        (MIB, 64 * 1024),
        (5 * MIB + 8192, 4096),
        (9 * MIB, 4096),
        (13 * MIB + 12288, 4096),
    ];
    for pass in ["miss", "hit"] {
        for (off, len) in reads {
            let got = w.h.read_sha(off as u64, len);
            assert_eq!(
                got,
                sha256_of(&w.model[off..off + len]),
                "read of {len} bytes at {off} through node 0 ({pass}) differs from what was written"
            );
        }
    }
    let stats = cluster.cache_stats(0, "c");
    let number = |k: &str| {
        stats[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing: {stats}"))
    };
    // Kept: the 14 fetched blocks of the 64 KiB read and three 4 KiB blocks (plus the two
    // dirty ones once a background sync cleans them).
    let clean = number("clean_bytes");
    assert!(
        (68 * 1024..=76 * 1024).contains(&clean),
        "76 KiB read through a cold cache left {clean} clean bytes in it (whole objects fetched?): {stats}"
    );
    assert_eq!(number("misses"), 4, "{stats}");
    assert!(number("hits") >= 4, "{stats}");

    eprintln!("phase: everything read back through node 0 and, after a FLUSH, through node 2");
    w.assert_model("c through node 0");
    w.flush();
    let model = std::mem::take(&mut w.model);
    w.h.close();
    assert_export_holds(&cluster.nbd_url(2, "c/ro"), &model, "c through node 2");
    for i in 0..3 {
        cluster.assert_alive_without_panic(i);
    }
}

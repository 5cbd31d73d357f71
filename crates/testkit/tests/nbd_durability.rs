//! Durability over NBD, proved with the fault-injecting store (issue 3, items 5b and 7):
//! a simulated power cut of every node keeps exactly what FLUSH, FUA, writethrough and a
//! client's final disconnect promised; the store sync counters show FLUSH syncing each
//! node that received writes exactly once (across multi-conn connections, trims and
//! zeroes included, and degraded); `dog vdi set cache` switches the mode of new
//! connections; and I/O goes on, degraded, with a node killed.
//!
//! The nbdsh connection stays open across each power cut, so the gateway's final flush
//! on disconnect cannot make unflushed data durable behind the test's back.

mod common;

use common::nbd::*;
use std::path::Path;
use std::time::Duration;
use testkit::{random_bytes, sha256_of};

/// Writes `data` at `offset` through `h` (flags: libnbd command flags) and into `model`.
fn write(h: &mut Nbdsh, scratch: &Path, model: &mut [u8], offset: usize, data: &[u8], flags: &str) {
    h.pwrite(scratch, data, offset as u64, flags);
    model[offset..offset + data.len()].copy_from_slice(data);
}

#[test]
fn none_mode_flush_syncs_each_written_node_once_and_flushed_data_survives_power_cut_of_every_node()
{
    // Item 5b, mode none: writes alone never sync; each FLUSH syncs every node that received writes exactly once (and no other); flushed data survives a power cut of every node.
    let cluster = cluster(true);
    create_vdi(&cluster, "d", "64M", None, None);
    create_vdi(&cluster, "d2", "16M", None, Some(2));
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let mut h = Nbdsh::connect("none", &cluster.nbd_url(0, "d"));
    let mut model = vec![0u8; 64 * MIB];

    eprintln!("phase: writes creating objects 0, 1 and 5 (3 copies: every node receives them) must not sync anything");
    let before = sync_counts(&cluster);
    write(&mut h, &scratch, &mut model, 0, &random_bytes(MIB, 1), "0");
    write(
        &mut h,
        &scratch,
        &mut model,
        4 * MIB + 512 * KIB,
        &random_bytes(MIB, 2),
        "0",
    );
    write(
        &mut h,
        &scratch,
        &mut model,
        20 * MIB,
        &random_bytes(3 * MIB, 3),
        "0",
    );
    let after_writes = sync_counts(&cluster);
    assert_eq!(
        deltas(&before, &after_writes),
        vec![0, 0, 0],
        "mode none synced on plain writes"
    );

    eprintln!("phase: FLUSH syncs each of the 3 nodes exactly once");
    h.flush();
    let after_flush = sync_counts(&cluster);
    assert_eq!(
        deltas(&after_writes, &after_flush),
        vec![1, 1, 1],
        "first FLUSH: syncs per node"
    );

    eprintln!("phase: a FLUSH with no write since the last one syncs nothing");
    h.flush();
    let after_empty = sync_counts(&cluster);
    assert_eq!(
        deltas(&after_flush, &after_empty),
        vec![0, 0, 0],
        "empty FLUSH: syncs per node"
    );

    eprintln!("phase: many writes (overwrites and a new object 7), then one FLUSH: still exactly one sync per node");
    for k in 0..16 {
        let at = (k * 256 + 17) * KIB;
        write(
            &mut h,
            &scratch,
            &mut model,
            at,
            &random_bytes(64 * KIB, 10 + k as u64),
            "0",
        );
    }
    write(
        &mut h,
        &scratch,
        &mut model,
        28 * MIB + 4096,
        &random_bytes(2 * MIB, 30),
        "0",
    );
    let before = sync_counts(&cluster);
    h.flush();
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![1, 1, 1],
        "second FLUSH: syncs per node"
    );

    eprintln!("phase: a 2-copy VDI: after overwrites inside one object, FLUSH syncs its 2 holders once and the third node not at all");
    let mut h2 = Nbdsh::connect("none-2copies", &cluster.nbd_url(0, "d2"));
    let mut model2 = vec![0u8; 16 * MIB];
    write(
        &mut h2,
        &scratch,
        &mut model2,
        0,
        &random_bytes(MIB, 40),
        "0",
    );
    h2.flush();
    let holders = object_holders(&cluster, "d2", 0);
    assert_eq!(
        holders.len(),
        2,
        "object 0 of a 2-copy VDI has holders {holders:?}"
    );
    let before = sync_counts(&cluster);
    for k in 0..5 {
        write(
            &mut h2,
            &scratch,
            &mut model2,
            k * 200 * KIB,
            &random_bytes(64 * KIB, 41 + k as u64),
            "0",
        );
    }
    h2.flush();
    let expected: Vec<u64> = (0..3).map(|i| u64::from(holders.contains(&i))).collect();
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        expected,
        "FLUSH after writes to object 0 held by nodes {holders:?}"
    );

    eprintln!("phase: unflushed writes after the last FLUSH: an overwrite in object 1 and a new object 9 (not in the model)");
    let unflushed_new = random_bytes(MIB, 50);
    h.pwrite(&scratch, &random_bytes(MIB, 51), 5 * MIB as u64, "0");
    h.pwrite(&scratch, &unflushed_new, 36 * MIB as u64, "0");
    assert_eq!(
        h.read_sha(36 * MIB as u64, MIB),
        sha256_of(&unflushed_new),
        "unflushed write not applied"
    );

    eprintln!("phase: power cut of every node (connections still open), then restart");
    power_cut_and_restart_all(&cluster);
    drop(h);
    drop(h2);

    eprintln!("phase: through node 1's read-only export, d is exactly the flushed data (the unflushed overwrite rolled back, the new object gone)");
    let mut reader = Nbdsh::connect("after-cut", &cluster.nbd_url(1, "d/ro"));
    reader.assert_content(&model, "d after the power cut");
    eprintln!("phase: d2 too, through node 2");
    let mut reader2 = Nbdsh::connect("after-cut-2", &cluster.nbd_url(2, "d2/ro"));
    reader2.assert_content(&model2, "d2 after the power cut");
    reader.close();
    reader2.close();

    eprintln!("phase: the restarted gateway on node 0 reopens d read-write and sees the same data");
    let mut h = Nbdsh::connect("reopen", &cluster.nbd_url(0, "d"));
    h.assert_content(&model, "d reopened read-write on node 0");
    h.close();
}

#[test]
fn fua_write_survives_power_cut_without_flush_and_syncs_every_replica() {
    // Item 5b: a FUA write is durable on every replica when acknowledged (one sync each, two when it creates the object); a plain write is not.
    let cluster = cluster(true);
    create_vdi(&cluster, "f", "64M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let mut h = Nbdsh::connect("fua", &cluster.nbd_url(0, "f"));
    let mut model = vec![0u8; 64 * MIB];

    eprintln!("phase: 4 MiB into object 0, flushed (the base the FUA write lands in)");
    write(
        &mut h,
        &scratch,
        &mut model,
        0,
        &random_bytes(4 * MIB, 1),
        "0",
    );
    h.flush();

    eprintln!("phase: FUA write inside existing object 0: one sync on each of the 3 replicas");
    let before = sync_counts(&cluster);
    write(
        &mut h,
        &scratch,
        &mut model,
        MIB,
        &random_bytes(64 * KIB, 2),
        "nbd.CMD_FLAG_FUA",
    );
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![1, 1, 1],
        "syncs for a FUA overwrite"
    );

    eprintln!("phase: FUA write creating object 2: two syncs per replica (the object, and the inode's table entry)");
    let before = sync_counts(&cluster);
    write(
        &mut h,
        &scratch,
        &mut model,
        8 * MIB + 4096,
        &random_bytes(64 * KIB, 3),
        "nbd.CMD_FLAG_FUA",
    );
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![2, 2, 2],
        "syncs for a FUA write creating an object"
    );

    eprintln!("phase: a plain write creating object 5 afterwards: no sync, and no FLUSH follows");
    let plain = random_bytes(64 * KIB, 4);
    let before = sync_counts(&cluster);
    h.pwrite(&scratch, &plain, 20 * MIB as u64, "0");
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![0, 0, 0],
        "syncs for a plain write in mode none"
    );

    eprintln!("phase: power cut of every node with the connection still open, then restart");
    power_cut_and_restart_all(&cluster);
    drop(h);

    eprintln!("phase: both FUA writes (and the flushed base) are there; the plain write is gone");
    let mut reader = Nbdsh::connect("after-cut", &cluster.nbd_url(1, "f/ro"));
    reader.assert_content(&model[..12 * MIB], "objects 0-2 after the power cut");
    let lost = reader.read_sha(20 * MIB as u64, 64 * KIB);
    assert_ne!(
        lost,
        sha256_of(&plain),
        "an unflushed plain write survived a power cut of every node: the fault mode drops nothing, so this test proves nothing"
    );
    assert_eq!(
        lost,
        sha256_of(&[0u8; 64 * KIB]),
        "the never-synced range reads neither as zeros nor as the new data"
    );
    reader.close();
}

#[test]
fn writethrough_every_acknowledged_write_survives_power_cut_and_flush_adds_no_sync() {
    // Item 5b, mode writethrough: every write is synced on every replica before its reply (exact counts); nothing is lost without a FLUSH.
    let cluster = cluster(true);
    create_vdi(&cluster, "w", "64M", Some("writethrough"), None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let mut h = Nbdsh::connect("writethrough", &cluster.nbd_url(0, "w"));
    let mut model = vec![0u8; 64 * MIB];

    eprintln!("phase: 8 writes creating objects 0-7 and 16 overwrites inside them, none with FUA, no FLUSH");
    let before = sync_counts(&cluster);
    let mut syncs_expected = 0u64;
    for k in 0..8usize {
        write(
            &mut h,
            &scratch,
            &mut model,
            k * OBJECT_SIZE + k * 4096,
            &random_bytes(64 * KIB, k as u64),
            "0",
        );
        syncs_expected += 2; // the object and the inode's table entry
    }
    for k in 0..16usize {
        let len = (4 * KIB) << (k % 7); // 4 KiB .. 256 KiB
        let at = (k % 8) * OBJECT_SIZE + (k * 61 * KIB) % (OBJECT_SIZE - len);
        write(
            &mut h,
            &scratch,
            &mut model,
            at,
            &random_bytes(len, 100 + k as u64),
            "0",
        );
        syncs_expected += 1;
    }
    eprintln!("phase: a partial TRIM inside object 3 is a durable write too");
    h.ok(&format!(
        "h.trim({}, {})",
        64 * KIB,
        3 * OBJECT_SIZE + 128 * KIB
    ));
    model[3 * OBJECT_SIZE + 128 * KIB..3 * OBJECT_SIZE + 192 * KIB].fill(0);
    syncs_expected += 1;
    let after_writes = sync_counts(&cluster);
    let expected = vec![syncs_expected; 3];
    assert_eq!(
        deltas(&before, &after_writes),
        expected,
        "syncs per node for writethrough writes"
    );

    eprintln!("phase: FLUSH in writethrough has nothing left to sync");
    h.flush();
    assert_eq!(
        deltas(&after_writes, &sync_counts(&cluster)),
        vec![0, 0, 0],
        "syncs for a FLUSH in writethrough"
    );

    eprintln!("phase: one more acknowledged write after the FLUSH, then a power cut of every node, connection open");
    write(
        &mut h,
        &scratch,
        &mut model,
        40 * MIB + 512,
        &random_bytes(300 * KIB, 200),
        "0",
    );
    power_cut_and_restart_all(&cluster);
    drop(h);

    eprintln!("phase: every acknowledged write is there, read through node 2");
    let mut reader = Nbdsh::connect("after-cut", &cluster.nbd_url(2, "w/ro"));
    reader.assert_content(&model, "w after the power cut");
    reader.close();
}

#[test]
fn vdi_set_cache_switches_the_durability_mode_of_new_connections() {
    // `dog vdi set NAME cache MODE` applies to connections opened afterwards: writethrough syncs each write, none does not.
    let cluster = cluster(false);
    create_vdi(&cluster, "s", "16M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let url = cluster.nbd_url(0, "s");
    let mode = |cluster: &testkit::LocalCluster| {
        let list = cluster.dog_json(0, &["vdi", "list"]);
        list.as_array()
            .expect("vdi list")
            .iter()
            .find(|v| v["name"] == "s")
            .expect("s listed")["cache_mode"]
            .clone()
    };
    assert_eq!(mode(&cluster), "none");

    eprintln!("phase: mode none (the default): create object 0, then an overwrite does not sync");
    let mut h = Nbdsh::connect("none", &url);
    h.pwrite(&scratch, &random_bytes(64 * KIB, 1), 0, "0");
    let before = sync_counts(&cluster);
    h.pwrite(&scratch, &random_bytes(64 * KIB, 2), 0, "0");
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![0, 0, 0],
        "mode none synced a write"
    );
    h.close();

    eprintln!("phase: dog vdi set s cache writethrough; a new connection's overwrite syncs each replica once");
    cluster.dog_ok(&["vdi", "set", "s", "cache", "writethrough"]);
    assert_eq!(mode(&cluster), "writethrough");
    let mut h = Nbdsh::connect("writethrough", &url);
    let before = sync_counts(&cluster);
    h.pwrite(&scratch, &random_bytes(64 * KIB, 3), 0, "0");
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![1, 1, 1],
        "writethrough overwrite syncs"
    );
    h.close();

    eprintln!("phase: back to none");
    cluster.dog_ok(&["vdi", "set", "s", "cache", "none"]);
    assert_eq!(mode(&cluster), "none");
    let mut h = Nbdsh::connect("none-again", &url);
    let before = sync_counts(&cluster);
    h.pwrite(&scratch, &random_bytes(64 * KIB, 4), 0, "0");
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![0, 0, 0],
        "mode none again synced a write"
    );
    h.close();

    eprintln!("phase: an unknown mode is refused");
    let out = cluster.dog(&["vdi", "set", "s", "cache", "sometimes"]);
    testkit::assert_fails_with(&out, &["sometimes"]);
}

#[test]
fn reads_and_writes_go_on_through_node0_with_node1_killed() {
    // Item 7: with node 1 killed, item 1's qemu-io read still passes through node 0 and writes go on (degraded, 2 of 3 replicas).
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "64M", None, None);
    let url = cluster.nbd_url(0, "v1");
    qemu_io_ok(&url, false, &["write -P 0xab 0 4M", "read -P 0xab 0 4M"]);

    eprintln!(
        "phase: kill node 1 (SIGKILL) and use node 0 at once, before the membership has settled"
    );
    cluster.kill(1);
    qemu_io_ok(&url, false, &["read -P 0xab 0 4M"]);

    eprintln!("phase: degraded writes: a new object, an overwrite, a flush, and reads of both");
    qemu_io_ok(
        &url,
        false,
        &[
            "write -P 0xcd 4M 4M",
            "write -P 0xef 1M 64k",
            "flush",
            "read -P 0xcd 4M 4M",
            "read -P 0xef 1M 64k",
            "read -P 0xab 0 1M",
        ],
    );

    eprintln!("phase: node 0 lists 2 members; the data reads the same through node 2");
    assert!(
        cluster.wait_members(0, 2, Duration::from_secs(30)),
        "node 0 does not list 2 members after the kill"
    );
    qemu_io_ok(
        &cluster.nbd_url(2, "v1/ro"),
        true,
        &[
            "read -P 0xab 0 1M",
            "read -P 0xef 1M 64k",
            "read -P 0xcd 4M 4M",
        ],
    );

    eprintln!("phase: writes keep going through node 0 after the membership change");
    qemu_io_ok(
        &url,
        false,
        &["write -P 0x42 12M 1M", "flush", "read -P 0x42 12M 1M"],
    );
}

#[test]
fn flush_on_one_connection_covers_writes_acknowledged_on_another() {
    // CAN_MULTI_CONN is advertised, so a FLUSH on connection B must make connection A's acknowledged writes durable.
    let cluster = cluster(true);
    create_vdi(&cluster, "m", "32M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let url = cluster.nbd_url(0, "m");
    let mut a = Nbdsh::connect("conn-a", &url);
    let mut b = Nbdsh::connect("conn-b", &url);
    assert_eq!(
        a.ok("h.can_multi_conn()"),
        true,
        "CAN_MULTI_CONN not advertised"
    );
    let mut model = vec![0u8; 32 * MIB];

    eprintln!("phase: connection A writes (a new object 0, a new object 5), connection B writes object 2; no flush yet");
    write(
        &mut a,
        &scratch,
        &mut model,
        0,
        &random_bytes(2 * MIB, 1),
        "0",
    );
    write(
        &mut a,
        &scratch,
        &mut model,
        20 * MIB + 999,
        &random_bytes(MIB, 2),
        "0",
    );
    write(
        &mut b,
        &scratch,
        &mut model,
        8 * MIB,
        &random_bytes(MIB, 3),
        "0",
    );

    eprintln!("phase: connection B flushes: each node syncs once, for both connections' writes");
    let before = sync_counts(&cluster);
    b.flush();
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![1, 1, 1],
        "syncs for B's FLUSH"
    );
    eprintln!("phase: connection A's FLUSH then has nothing left to sync");
    let before = sync_counts(&cluster);
    a.flush();
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![0, 0, 0],
        "syncs for A's FLUSH after B's"
    );

    eprintln!(
        "phase: power cut of every node with both connections open; A's writes survived B's flush"
    );
    power_cut_and_restart_all(&cluster);
    drop(a);
    drop(b);
    let mut reader = Nbdsh::connect("after-cut", &cluster.nbd_url(1, "m/ro"));
    reader.assert_content(&model, "m after the power cut");
    reader.close();
}

#[test]
fn last_client_leaving_without_flush_makes_its_writes_durable_before_the_lock_is_released() {
    // The VDI lock is released after a final flush, whether the client sends DISC or just vanishes.
    let cluster = cluster(true);
    create_vdi(&cluster, "a", "16M", None, None);
    create_vdi(&cluster, "b", "16M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let (data_a, data_b) = (random_bytes(2 * MIB, 1), random_bytes(2 * MIB, 2));

    eprintln!(
        "phase: client of a writes 2 MiB without flushing, then disconnects with NBD_CMD_DISC"
    );
    let mut a = Nbdsh::connect("disc", &cluster.nbd_url(0, "a"));
    a.pwrite(&scratch, &data_a, MIB as u64, "0");
    let before = sync_counts(&cluster);
    a.close();
    assert!(
        wait_unlocked(&cluster, "a", Duration::from_secs(15)),
        "a still locked: {:?}",
        locks(&cluster)
    );
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![1, 1, 1],
        "syncs of the final flush after DISC"
    );

    eprintln!(
        "phase: client of b writes 2 MiB without flushing, then its process is killed (no DISC)"
    );
    let mut b = Nbdsh::connect("vanish", &cluster.nbd_url(0, "b"));
    b.pwrite(&scratch, &data_b, MIB as u64, "0");
    let before = sync_counts(&cluster);
    drop(b);
    assert!(
        wait_unlocked(&cluster, "b", Duration::from_secs(15)),
        "b still locked: {:?}",
        locks(&cluster)
    );
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![1, 1, 1],
        "syncs of the final flush after a vanished client"
    );

    eprintln!("phase: power cut of every node: both clients' writes are there");
    power_cut_and_restart_all(&cluster);
    let mut reader = Nbdsh::connect("after-cut-a", &cluster.nbd_url(1, "a/ro"));
    assert_eq!(
        reader.read_sha(MIB as u64, 2 * MIB),
        sha256_of(&data_a),
        "a after the power cut"
    );
    reader.close();
    let mut reader = Nbdsh::connect("after-cut-b", &cluster.nbd_url(2, "b/ro"));
    assert_eq!(
        reader.read_sha(MIB as u64, 2 * MIB),
        sha256_of(&data_b),
        "b after the power cut"
    );
    reader.close();
}

#[test]
fn trims_and_write_zeroes_are_covered_by_flush_across_a_power_cut() {
    // TRIM and WRITE_ZEROES are writes: the FLUSH after them syncs each node once and their zeros survive a power cut.
    let cluster = cluster(true);
    create_vdi(&cluster, "t", "16M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let mut h = Nbdsh::connect("trim", &cluster.nbd_url(0, "t"));
    let mut model = vec![0u8; 16 * MIB];

    eprintln!("phase: 12 MiB of data over objects 0-2, flushed");
    write(
        &mut h,
        &scratch,
        &mut model,
        0,
        &random_bytes(12 * MIB, 1),
        "0",
    );
    h.flush();

    eprintln!("phase: partial TRIM in object 0, WRITE_ZEROES with NO_HOLE in object 1, partial WRITE_ZEROES in object 2; no FUA");
    let before = sync_counts(&cluster);
    h.ok(&format!("h.trim({}, {})", MIB, MIB));
    model[MIB..2 * MIB].fill(0);
    h.ok(&format!(
        "h.zero({}, {}, nbd.CMD_FLAG_NO_HOLE)",
        256 * KIB,
        4 * MIB + 64 * KIB
    ));
    model[4 * MIB + 64 * KIB..4 * MIB + 320 * KIB].fill(0);
    h.ok(&format!("h.zero({}, {})", 512 * KIB, 8 * MIB + 100 * KIB));
    model[8 * MIB + 100 * KIB..8 * MIB + 612 * KIB].fill(0);
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![0, 0, 0],
        "partial trims/zeroes synced in mode none"
    );

    eprintln!("phase: FLUSH syncs each node once");
    let before = sync_counts(&cluster);
    h.flush();
    assert_eq!(
        deltas(&before, &sync_counts(&cluster)),
        vec![1, 1, 1],
        "syncs for the FLUSH after trims and zeroes"
    );

    eprintln!("phase: power cut of every node with the connection open: the zeros are there");
    power_cut_and_restart_all(&cluster);
    drop(h);
    let mut reader = Nbdsh::connect("after-cut", &cluster.nbd_url(1, "t/ro"));
    reader.assert_content(&model, "t after the power cut");
    reader.close();
}

#[test]
fn degraded_flush_with_a_killed_replica_syncs_the_live_ones_and_their_data_survives_a_power_cut() {
    // With node 1 killed, a FLUSH waits for the new epoch, syncs nodes 0 and 2 once each, and what it covered survives their power cut.
    let cluster = cluster(true);
    create_vdi(&cluster, "g", "32M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let mut h = Nbdsh::connect("degraded", &cluster.nbd_url(0, "g"));
    let mut model = vec![0u8; 32 * MIB];

    eprintln!("phase: 8 MiB written and flushed with every node up");
    write(
        &mut h,
        &scratch,
        &mut model,
        0,
        &random_bytes(8 * MIB, 1),
        "0",
    );
    h.flush();

    eprintln!("phase: unflushed overwrite in object 1 and a new object 3, then node 1 is killed");
    write(
        &mut h,
        &scratch,
        &mut model,
        5 * MIB,
        &random_bytes(MIB, 2),
        "0",
    );
    write(
        &mut h,
        &scratch,
        &mut model,
        12 * MIB,
        &random_bytes(2 * MIB, 3),
        "0",
    );
    cluster.kill(1);

    eprintln!("phase: FLUSH with node 1 dead succeeds and syncs nodes 0 and 2 once each");
    let before = [sync_count(&cluster, 0), sync_count(&cluster, 2)];
    h.flush();
    let after = [sync_count(&cluster, 0), sync_count(&cluster, 2)];
    assert_eq!(
        deltas(&before, &after),
        vec![1, 1],
        "syncs of nodes 0 and 2 for the degraded FLUSH"
    );

    eprintln!(
        "phase: a FUA overwrite with node 1 dead syncs nodes 0 and 2 once each before its reply"
    );
    let before = [sync_count(&cluster, 0), sync_count(&cluster, 2)];
    write(
        &mut h,
        &scratch,
        &mut model,
        2 * MIB,
        &random_bytes(64 * KIB, 5),
        "nbd.CMD_FLAG_FUA",
    );
    let after = [sync_count(&cluster, 0), sync_count(&cluster, 2)];
    assert_eq!(
        deltas(&before, &after),
        vec![1, 1],
        "syncs of nodes 0 and 2 for a degraded FUA write"
    );

    eprintln!("phase: a degraded write and FLUSH after the membership change");
    write(
        &mut h,
        &scratch,
        &mut model,
        20 * MIB,
        &random_bytes(MIB, 4),
        "0",
    );
    h.flush();

    eprintln!("phase: power cut of nodes 0 and 2 (connection open), then every node restarts");
    power_cut(&cluster, 0);
    power_cut(&cluster, 2);
    drop(h);
    for i in 0..3 {
        cluster.start(i);
    }
    assert!(
        cluster.wait_members(0, 3, Duration::from_secs(30)),
        "the restarted cluster does not list 3 nodes"
    );

    eprintln!("phase: everything flushed is there, read through node 0 and through node 2");
    let mut reader = Nbdsh::connect("after-cut-0", &cluster.nbd_url(0, "g/ro"));
    reader.assert_content(&model, "g through node 0 after the power cut");
    reader.close();
    let mut reader = Nbdsh::connect("after-cut-2", &cluster.nbd_url(2, "g/ro"));
    reader.assert_content(&model, "g through node 2 after the power cut");
    reader.close();
}

#[test]
fn fua_write_into_an_object_created_by_an_unflushed_write_survives_a_power_cut() {
    // Item 5b / DESIGN.md 5: a FUA write is durable when acknowledged, including the object's creation and its table entry made by an earlier plain write.
    let cluster = cluster(true);
    create_vdi(&cluster, "f", "32M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let mut h = Nbdsh::connect("fua-after-create", &cluster.nbd_url(0, "f"));

    eprintln!("phase: a plain write creates object 5 (not durable: mode none, no FLUSH)");
    h.pwrite(&scratch, &random_bytes(4096, 1), 20 * MIB as u64, "0");
    eprintln!("phase: a FUA write into object 5 is acknowledged: it must be durable now");
    let fua = random_bytes(64 * KIB, 2);
    h.pwrite(&scratch, &fua, 21 * MIB as u64, "nbd.CMD_FLAG_FUA");

    eprintln!("phase: power cut of every node with the connection open, then restart");
    power_cut_and_restart_all(&cluster);
    drop(h);

    eprintln!("phase: the FUA write's data is there");
    let mut reader = Nbdsh::connect("after-cut", &cluster.nbd_url(1, "f/ro"));
    let back = reader.read_sha(21 * MIB as u64, fua.len());
    let zeros = sha256_of(&vec![0u8; fua.len()]);
    assert_eq!(
        back,
        sha256_of(&fua),
        "an acknowledged FUA write was lost by the power cut (reads as {})",
        if back == zeros {
            "zeros: the object's creation or table entry was never made durable"
        } else {
            "other data"
        }
    );
    reader.close();
}

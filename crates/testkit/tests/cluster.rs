//! A real three-node cluster driven with `dog`, as issue 2's "What it must show" items
//! 1–4 describe: membership, replicated round trips, degraded operation after crashes,
//! clear errors, and the VDI life cycle (resize, delete, recreate).

use std::collections::HashSet;
use std::time::{Duration, Instant};
use testkit::{assert_fails_with, random_bytes, sha256_of, unused_port, ClusterOpts, LocalCluster};

const MIB: usize = 1 << 20;

/// The names of the members `dog node list --json` shows at node `i`.
fn member_addrs(cluster: &LocalCluster, i: u32) -> Vec<String> {
    let members = cluster.dog_json(i, &["node", "list"]);
    let members = members.as_array().expect("node list --json is an array");
    members
        .iter()
        .map(|m| m["addr"].as_str().expect("member has an addr").to_string())
        .collect()
}

/// The vid of VDI `name` from `dog vdi list --json`, if it is listed.
fn listed_vid(cluster: &LocalCluster, name: &str) -> Option<u64> {
    let vdis = cluster.dog_json(0, &["vdi", "list"]);
    let vdis = vdis.as_array().expect("vdi list --json is an array");
    vdis.iter()
        .find(|v| v["name"] == name)
        .map(|v| v["vid"].as_u64().expect("vid is a number"))
}

#[test]
fn three_node_cluster_lists_three_nodes_and_round_trips_64mib() {
    // Items 1–3: three members, 64 MiB through `dog vdi write`/`read` intact, object 0 on three distinct nodes.
    let cluster = LocalCluster::up(ClusterOpts::default());

    eprintln!("phase: `dog node list` must show every node started by `dog local up`");
    let addrs = member_addrs(&cluster, 0);
    assert_eq!(addrs.len(), 3, "node list: {addrs:?}");
    for i in 0..3 {
        assert!(
            addrs.contains(&cluster.peer_addr(i)),
            "node {i} ({}) missing from {addrs:?}",
            cluster.peer_addr(i)
        );
    }

    eprintln!("phase: 64 MiB of random data written from stdin must read back bit for bit");
    cluster.dog_ok(&["vdi", "create", "v1", "256M"]);
    let data = random_bytes(64 * MIB, 1);
    let out = cluster.dog_at_stdin(0, &["vdi", "write", "v1"], Some(&data));
    assert!(
        out.status.success(),
        "dog vdi write v1 failed\n{}",
        testkit::describe(&out)
    );
    let back = cluster.dog(&["vdi", "read", "v1", "0", "64M"]);
    assert!(
        back.status.success(),
        "dog vdi read failed\n{}",
        testkit::describe(&back)
    );
    assert_eq!(back.stdout.len(), 64 * MIB, "short read");
    assert_eq!(
        sha256_of(&back.stdout),
        sha256_of(&data),
        "64 MiB read back differs from what was written"
    );
    eprintln!("phase: another node as gateway must read the same bytes (remote replicas, same data table)");
    let via_node2 = cluster.read_vdi(2, "v1", 0, 64 * MIB as u64);
    assert_eq!(
        sha256_of(&via_node2),
        sha256_of(&data),
        "64 MiB read through node 2 differs"
    );

    eprintln!("phase: with 3 copies, object 0 must be placed on 3 distinct nodes");
    let object = cluster.dog_json(0, &["vdi", "object", "v1", "0"]);
    let nodes = object["nodes"]
        .as_array()
        .expect("vdi object --json has nodes");
    let uuids: HashSet<&str> = nodes
        .iter()
        .map(|n| n["uuid"].as_str().expect("node uuid"))
        .collect();
    let node_addrs: HashSet<&str> = nodes
        .iter()
        .map(|n| n["addr"].as_str().expect("node addr"))
        .collect();
    assert_eq!(
        (nodes.len(), uuids.len(), node_addrs.len()),
        (3, 3, 3),
        "object 0: {object}"
    );
}

#[test]
fn killed_nodes_degrade_then_refuse_writes_below_min_copies() {
    // Item 4: 2 of 3 alive still reads and writes; 1 of 3 refuses writes clearly, still reads and answers.
    let cluster = LocalCluster::up(ClusterOpts::default());
    cluster.dog_ok(&["vdi", "create", "v1", "256M"]);
    let mut expected = random_bytes(64 * MIB, 2);
    cluster.write_vdi(0, "v1", 0, &expected, false);
    expected.resize(65 * MIB, 0);

    eprintln!("phase: a SIGKILLed node must leave the membership within 10 s");
    cluster.kill(1);
    let started = Instant::now();
    let left = cluster.wait_members(0, 2, Duration::from_secs(10));
    assert!(
        left,
        "node list still does not show 2 nodes 10 s after `dog local kill 1`: {:?}",
        member_addrs(&cluster, 0)
    );
    eprintln!("  membership shrank to 2 after {:?}", started.elapsed());

    eprintln!("phase: the data written with 3 replicas must read back from the 2 left");
    let back = cluster.read_vdi(0, "v1", 0, 64 * MIB as u64);
    assert_eq!(
        sha256_of(&back),
        sha256_of(&expected[..64 * MIB]),
        "64 MiB differ after losing one replica"
    );
    let via_node2 = cluster.read_vdi(2, "v1", 0, 64 * MIB as u64);
    assert_eq!(
        sha256_of(&via_node2),
        sha256_of(&expected[..64 * MIB]),
        "64 MiB read through node 2 differ after losing node 1"
    );

    eprintln!("phase: degraded writes (2 live replicas >= min_copies 2) must succeed: a fresh object and an overwrite");
    let fresh = random_bytes(MIB, 3);
    cluster.write_vdi(0, "v1", 64 * MIB as u64, &fresh, false);
    expected[64 * MIB..65 * MIB].copy_from_slice(&fresh);
    let overwrite = random_bytes(MIB, 4);
    cluster.write_vdi(0, "v1", 8 * MIB as u64, &overwrite, false);
    expected[8 * MIB..9 * MIB].copy_from_slice(&overwrite);
    let back = cluster.read_vdi(0, "v1", 0, 65 * MIB as u64);
    assert_eq!(
        sha256_of(&back),
        sha256_of(&expected),
        "degraded writes did not read back"
    );

    eprintln!(
        "phase: with 1 live replica (< min_copies 2) a write must be refused with the cause named"
    );
    cluster.kill(2);
    assert!(
        cluster.wait_members(0, 1, Duration::from_secs(10)),
        "node list does not show 1 node 10 s after `dog local kill 2`"
    );
    let refused = cluster.dog_at_stdin(
        0,
        &["vdi", "write", "v1", "0", "1M"],
        Some(&random_bytes(MIB, 5)),
    );
    let stderr = assert_fails_with(&refused, &["1 live replica", "2 are needed"]);
    eprintln!("  refused as expected: {}", stderr.trim());

    eprintln!("phase: reads must go on from the last replica, unchanged by the refused write");
    let back = cluster.read_vdi(0, "v1", 0, 65 * MIB as u64);
    assert_eq!(
        sha256_of(&back),
        sha256_of(&expected),
        "data changed or unreadable with 1 replica left"
    );

    eprintln!("phase: the last daemon must keep answering dog");
    let info = cluster.dog_json(0, &["node", "info"]);
    assert_eq!(info["addr"], cluster.peer_addr(0), "node info: {info}");
    assert!(
        listed_vid(&cluster, "v1").is_some(),
        "vdi list no longer shows v1"
    );
    assert!(cluster.node_pid(0).is_some(), "node 0 is no longer running");
}

#[test]
fn clear_errors_for_bad_vdi_requests() {
    // Item: clear errors for no such VDI, VDI exists, size too large / not sector-aligned, too few nodes.
    let cluster = LocalCluster::up(ClusterOpts::default());
    cluster.dog_ok(&["vdi", "create", "v1", "1G"]);

    eprintln!("phase: a missing VDI is named as missing, for read and for delete");
    assert_fails_with(
        &cluster.dog(&["vdi", "read", "nosuch", "0", "4K"]),
        &["no VDI", "nosuch"],
    );
    assert_fails_with(
        &cluster.dog(&["vdi", "delete", "nosuch"]),
        &["no VDI", "nosuch"],
    );

    eprintln!("phase: creating a name twice says it exists, and leaves the first VDI alone");
    let vid = listed_vid(&cluster, "v1");
    assert_fails_with(
        &cluster.dog(&["vdi", "create", "v1", "2G"]),
        &["v1", "exists"],
    );
    assert_eq!(
        listed_vid(&cluster, "v1"),
        vid,
        "the failed create changed v1"
    );

    eprintln!("phase: 5T is over the 4 TiB maximum of 4 MiB objects; the message names the limit");
    let out = cluster.dog(&["vdi", "create", "big", "5T"]);
    let stderr = assert_fails_with(&out, &["maximum"]);
    assert!(
        stderr.contains("4398046511104") || stderr.contains("4 TiB") || stderr.contains("4T"),
        "limit not named: {stderr}"
    );

    eprintln!("phase: sizes must be a multiple of the 512-byte sector");
    assert_fails_with(
        &cluster.dog(&["vdi", "create", "odd", "1000"]),
        &["multiple of 512"],
    );

    eprintln!("phase: 4 copies cannot be placed on 3 nodes");
    let stderr = assert_fails_with(
        &cluster.dog(&["vdi", "create", "four", "1G", "--copies", "4"]),
        &["4 copies", "3"],
    );
    assert!(
        stderr.contains("node"),
        "message does not mention nodes: {stderr}"
    );
    for name in ["big", "odd", "four"] {
        assert!(
            listed_vid(&cluster, name).is_none(),
            "refused VDI {name} is listed anyway"
        );
    }
}

#[test]
fn clear_error_when_cluster_is_not_formatted() {
    // Item: clear error for "cluster not formatted".
    let cluster = LocalCluster::up(ClusterOpts {
        no_format: true,
        ..ClusterOpts::default()
    });
    eprintln!("phase: creating a VDI on an unformatted cluster must say so and how to fix it");
    assert_fails_with(
        &cluster.dog(&["vdi", "create", "v1", "1G"]),
        &["not formatted"],
    );
    eprintln!("phase: node list still works before format");
    assert_eq!(member_addrs(&cluster, 0).len(), 3);
}

#[test]
fn clear_error_when_node_is_unreachable() {
    // Item: clear error for "node unreachable"; needs no cluster, only a port nobody listens on.
    let addr = format!("127.0.0.1:{}", unused_port());
    eprintln!("phase: dog against {addr} (nothing listens) must fail fast, naming the address");
    let started = Instant::now();
    let mut cmd = std::process::Command::new(testkit::bin("dog"));
    let out = cmd
        .args(["-a", &addr, "node", "list"])
        .output()
        .expect("running dog");
    assert_fails_with(&out, &["cannot reach", &addr]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?} to report an unreachable node",
        started.elapsed()
    );
}

#[test]
fn resize_grows_vdi_and_refuses_to_shrink_it() {
    // Item: `vdi resize` grows (old data kept, new range usable) and refuses to shrink.
    let cluster = LocalCluster::up(ClusterOpts::default());
    cluster.dog_ok(&["vdi", "create", "v1", "64M"]);
    let head = random_bytes(MIB, 6);
    cluster.write_vdi(0, "v1", 0, &head, false);

    eprintln!("phase: growing 64M -> 1G shows the new size and keeps the data");
    cluster.dog_ok(&["vdi", "resize", "v1", "1G"]);
    let v1 = cluster.dog_json(0, &["vdi", "list"]);
    let size = v1
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == "v1"))
        .map(|v| v["size"].clone());
    assert_eq!(size, Some(serde_json::json!(1u64 << 30)), "vdi list: {v1}");
    assert_eq!(
        cluster.read_vdi(0, "v1", 0, MIB as u64),
        head,
        "data changed by resize"
    );

    eprintln!("phase: the grown range is writable and readable (it was past the end before)");
    let tail = random_bytes(MIB, 7);
    let tail_at = (1u64 << 30) - MIB as u64;
    cluster.write_vdi(0, "v1", tail_at, &tail, false);
    assert_eq!(cluster.read_vdi(0, "v1", tail_at, MIB as u64), tail);

    eprintln!("phase: shrinking is refused and leaves the size alone");
    assert_fails_with(&cluster.dog(&["vdi", "resize", "v1", "64M"]), &["shrink"]);
    assert_eq!(
        cluster.read_vdi(0, "v1", tail_at, MIB as u64),
        tail,
        "data past the refused size is gone"
    );
}

#[test]
fn deleted_vdi_leaves_the_list_and_a_recreated_name_gets_a_new_larger_vid() {
    // Item: delete removes the VDI; vids are never reused, and the new VDI does not see the old data.
    let cluster = LocalCluster::up(ClusterOpts::default());
    cluster.dog_ok(&["vdi", "create", "d1", "64M"]);
    cluster.dog_ok(&["vdi", "create", "keep", "64M"]);
    cluster.write_vdi(0, "d1", 0, &random_bytes(MIB, 8), false);
    let old_vid = listed_vid(&cluster, "d1").expect("d1 is listed after create");

    eprintln!("phase: delete removes d1 from the list (and only d1)");
    cluster.dog_ok(&["vdi", "delete", "d1"]);
    assert_eq!(
        listed_vid(&cluster, "d1"),
        None,
        "d1 still listed after delete"
    );
    assert!(
        listed_vid(&cluster, "keep").is_some(),
        "delete of d1 removed another VDI"
    );
    assert_fails_with(&cluster.dog(&["vdi", "read", "d1", "0", "4K"]), &["no VDI"]);

    eprintln!("phase: the same name again gets a larger vid (retired vids are never reused) and starts as zeros");
    cluster.dog_ok(&["vdi", "create", "d1", "64M"]);
    let new_vid = listed_vid(&cluster, "d1").expect("d1 is listed after re-create");
    assert!(
        new_vid > old_vid,
        "recreated d1 got vid {new_vid:#x}, not larger than the deleted {old_vid:#x}"
    );
    assert_eq!(
        cluster.read_vdi(0, "d1", 0, MIB as u64),
        vec![0u8; MIB],
        "old data showed through a recreated VDI"
    );
}

#[test]
fn local_start_brings_killed_nodes_back_every_time() {
    // `dog local kill` / `dog local start` must be reliable: every restart reports success and rejoins.
    let cluster = LocalCluster::up(ClusterOpts::default());
    eprintln!("phase: kill nodes 1 and 2, restart them back to back (a busy cluster), 10 rounds");
    for round in 0..10 {
        cluster.kill(1);
        cluster.kill(2);
        assert!(
            cluster.wait_members(0, 1, Duration::from_secs(10)),
            "round {round}: nodes 1 and 2 did not leave"
        );
        for i in [1, 2] {
            let out = cluster.local("start", &[&i.to_string()]);
            let running = cluster.node_pid(i).is_some();
            assert!(
                out.status.success(),
                "round {round}: dog local start {i} failed (node {i} process running afterwards: {running})\n{}",
                testkit::describe(&out)
            );
        }
        assert!(
            cluster.wait_members(0, 3, Duration::from_secs(10)),
            "round {round}: nodes 1 and 2 did not rejoin"
        );
    }
}

#[test]
fn restarted_node_never_serves_writes_it_missed_while_down() {
    // A node back from a crash holds stale replicas: reads through it must give the new data or a clear error, never the old.
    let cluster = LocalCluster::up(ClusterOpts::default());
    cluster.dog_ok(&["vdi", "create", "v1", "64M"]);
    let old = random_bytes(8 * MIB, 40);
    cluster.write_vdi(0, "v1", 0, &old, false);

    eprintln!("phase: node 1 crashes; objects 0 and 1 are overwritten and object 2 created while it is down");
    cluster.kill(1);
    assert!(
        cluster.wait_members(0, 2, Duration::from_secs(10)),
        "node 1 did not leave"
    );
    let new = random_bytes(12 * MIB, 41);
    cluster.write_vdi(0, "v1", 0, &new, false);

    eprintln!(
        "phase: node 1 restarts and rejoins; as gateway it reads its own (stale) replica first"
    );
    cluster.start(1);
    assert!(
        cluster.wait_members(0, 3, Duration::from_secs(10)),
        "node 1 did not rejoin"
    );
    for via in [1, 0, 2] {
        let out = cluster.dog_at(via, &["vdi", "read", "v1", "0", "12M"]);
        if out.status.success() {
            assert_eq!(
                sha256_of(&out.stdout),
                sha256_of(&new),
                "read through node {via} after node 1 rejoined returned wrong or stale data"
            );
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            eprintln!(
                "  read through node {via} refused (allowed until recovery): {}",
                stderr.trim()
            );
            assert!(
                !stderr.contains("panicked") && !stderr.trim().is_empty(),
                "unclear failure\n{}",
                testkit::describe(&out)
            );
        }
    }
}

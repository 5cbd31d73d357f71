//! Recovery under client load (issue 4, "What it must show" items 4 and 6): fio with
//! crc32c verification keeps running through a gateway while another node is killed and
//! restarted, and a bounded random loop kills one non-gateway node at a time while an
//! NBD client writes, restarts it, waits for rejoin and recovery, and verifies every byte
//! (sha256 against an in-memory model) and `dog cluster check`.
//!
//! Items 1–3, 5 and 7 are in `recovery.rs`.

use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;
use std::process::Output;
use std::time::Duration;
use testkit::{
    describe, nbd_sha256, nbdsh, nbdsh_spawn, random_bytes, sha256_of, tool, wait_until,
    ClusterOpts, LocalCluster, Running,
};

const MIB: usize = 1 << 20;
const KIB: usize = 1 << 10;
/// How long one run of an NBD client tool may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

// ----- NBD clients ---------------------------------------------------------------------

/// A Python script for nbdsh writing `pieces` (offset, length) in order, their bytes
/// read one after the other from `path`, in 128 KiB requests with a short pause between
/// them (so the writes span a fault injected meanwhile), then FLUSH. It prints
/// "first request written" after the first request and "all pieces written" at the end.
fn write_pieces_script(path: &std::path::Path, pieces: &[(u64, usize)]) -> String {
    let list: Vec<String> = pieces.iter().map(|(o, n)| format!("({o}, {n})")).collect();
    format!(
        "import time\n\
         first = True\n\
         with open({path:?}, 'rb') as f:\n\
         \x20   for off, n in [{list}]:\n\
         \x20       done = 0\n\
         \x20       while done < n:\n\
         \x20           k = min(128 << 10, n - done)\n\
         \x20           h.pwrite(f.read(k), off + done)\n\
         \x20           done += k\n\
         \x20           if first:\n\
         \x20               print('first request written', flush=True)\n\
         \x20               first = False\n\
         \x20           time.sleep(0.02)\n\
         h.flush()\n\
         print('all pieces written', flush=True)\n",
        path = path.display().to_string(),
        list = list.join(", ")
    )
}

/// Writes `data` at `offset` of the export at `url`, then FLUSHes.
fn nbd_write(url: &str, offset: u64, data: &[u8]) {
    let file = tempfile::NamedTempFile::new().expect("temp file for nbdsh");
    std::fs::write(file.path(), data).expect("writing the nbdsh input file");
    let out = nbdsh(
        url,
        &write_pieces_script(file.path(), &[(offset, data.len())]),
        "write",
    );
    assert!(
        out.contains("all pieces written"),
        "nbdsh did not finish writing to {url}: {out}"
    );
}

// ----- cluster probes ------------------------------------------------------------------

/// Data objects VDI `name` owns (`dog vdi list --json`: allocated_objects).
fn allocated_objects(cluster: &LocalCluster, name: &str) -> u64 {
    let vdis = cluster.dog_json(0, &["vdi", "list"]);
    vdis.as_array()
        .and_then(|list| list.iter().find(|v| v["name"] == name))
        .and_then(|v| v["allocated_objects"].as_u64())
        .unwrap_or_else(|| panic!("vdi list has no allocated_objects for {name}: {vdis}"))
}

// ----- item 4: fio through a kill and a restart -----------------------------------------

/// fio arguments for random 4 KiB writes with crc32c verification over `size` of the
/// export at `url`, iodepth 16, paced to `rate` so the write phase spans the faults.
fn fio_args(url: &str, size: &str, rate: &str) -> Vec<String> {
    [
        "--output-format=json",
        "--name=recovery",
        "--ioengine=nbd",
        &format!("--uri={url}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        &format!("--size={size}"),
        &format!("--rate={rate}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_backlog=1024",
        "--verify_fatal=1",
        "--verify_dump=0",
        // No verify state file left in the working directory.
        "--verify_state_save=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// fio's JSON report from its stdout; asserts the run had no error.
fn fio_report(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: fio failed (an I/O or verify error fails it)\n{}",
        describe(out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json_at = stdout
        .find('{')
        .unwrap_or_else(|| panic!("{what}: fio printed no JSON\n{}", describe(out)));
    let report: Value = serde_json::from_str(&stdout[json_at..])
        .unwrap_or_else(|e| panic!("{what}: fio JSON report ({e})\n{}", describe(out)));
    let job = &report["jobs"][0];
    assert_eq!(
        job["error"], 0,
        "{what}: fio reports error {}",
        job["error"]
    );
    report
}

#[test]
fn fio_crc32c_verify_through_a_gateway_survives_a_node_kill_and_restart() {
    // Item 4: fio (nbd, randwrite, iodepth 16, verify=crc32c) on node 0 sees no error while node 2 is killed and restarted.
    let cluster = LocalCluster::up(ClusterOpts {
        nodes: 4,
        ..ClusterOpts::default()
    });
    let size = 96 * MIB as u64;
    cluster.dog_ok(&["vdi", "create", "f", "128M"]);

    eprintln!("phase: fio starts through node 0: randwrite 4k, iodepth 16, 96 MiB at 6 MiB/s, crc32c verify (backlog + final)");
    let mut cmd = tool("fio");
    cmd.args(fio_args(&cluster.nbd_url(0, "f"), "96M", "6m"));
    let mut fio = Running::spawn(cmd);
    let writing = wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
        allocated_objects(&cluster, "f") >= 4
    });
    assert!(writing, "fio did not get writes in within 60 s");
    assert!(fio.is_running(), "fio ended before any fault was injected");

    eprintln!("phase: node 2 is killed while fio writes; the survivors recover its copies");
    cluster.kill(2);
    cluster.assert_members(0, 3);
    cluster.wait_recovered(0);
    assert!(
        fio.is_running(),
        "fio ended before node 2 was restarted: pace it slower"
    );

    eprintln!("phase: node 2 restarted while fio still writes");
    cluster.start(2);
    cluster.assert_members(0, 4);
    assert!(
        fio.is_running(),
        "fio ended before node 2 had rejoined: pace it slower"
    );

    eprintln!("phase: fio finishes with zero verify errors and no I/O error");
    let out = fio.wait(TOOL_TIMEOUT);
    let report = fio_report(&out, "fio during the kill and restart");
    let job = &report["jobs"][0];
    assert_eq!(
        job["write"]["io_bytes"], size,
        "fio did not write all 96 MiB: {}",
        job["write"]
    );
    assert_eq!(
        job["read"]["io_bytes"], size,
        "fio did not read back (verify) all 96 MiB: {}",
        job["read"]
    );

    eprintln!("phase: recovery done, check clean, and a verify-only fio pass through node 3 finds every block intact");
    cluster.wait_recovered(0);
    cluster.assert_check_clean(0, "after fio");
    let mut cmd = tool("fio");
    cmd.args(fio_args(&cluster.nbd_url(3, "f"), "96M", "0"))
        .arg("--verify_only");
    let out = Running::spawn(cmd).wait(TOOL_TIMEOUT);
    let report = fio_report(&out, "fio verify-only pass through node 3");
    assert_eq!(
        report["jobs"][0]["read"]["io_bytes"], size,
        "the verify-only pass did not read all 96 MiB: {}",
        report["jobs"][0]["read"]
    );
}

// ----- item 6: the random kill loop -----------------------------------------------------

/// Rounds of the kill loop (the issue asks for at least 20).
const LOOP_ROUNDS: usize = 20;
/// Size of the loop's VDI: small, so that each round's full verification is quick.
const LOOP_VDI_SIZE: usize = 48 * MIB;
/// Environment variable that replays a loop with a given seed.
const LOOP_SEED_VAR: &str = "RECOVERY_LOOP_SEED";

/// Between 1 and 3 pieces of 4 KiB to 1 MiB at random 4 KiB-aligned offsets of the VDI.
fn random_pieces(rng: &mut impl Rng) -> Vec<(u64, usize)> {
    (0..rng.gen_range(1..=3))
        .map(|_| {
            let len = rng.gen_range(1..=256) * 4 * KIB;
            let offset = rng.gen_range(0..=(LOOP_VDI_SIZE - len) / (4 * KIB)) * 4 * KIB;
            (offset as u64, len)
        })
        .collect()
}

/// Applies `pieces` (their bytes concatenated in `data`) to the model image.
fn apply_pieces(model: &mut [u8], pieces: &[(u64, usize)], data: &[u8]) {
    let mut at = 0;
    for &(offset, len) in pieces {
        model[offset as usize..offset as usize + len].copy_from_slice(&data[at..at + len]);
        at += len;
    }
}

#[test]
fn twenty_rounds_of_killing_a_random_node_while_writing_lose_no_data() {
    // Item 6: each round kills a random non-gateway node mid-write, restarts it, waits for recovery; all data and the check stay clean.
    let seed = std::env::var(LOOP_SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().next_u64());
    eprintln!("kill loop seed = {seed} (replay with {LOOP_SEED_VAR}={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cluster = LocalCluster::up(ClusterOpts {
        nodes: 4,
        ..ClusterOpts::default()
    });
    let gateway = 0;
    let url = cluster.nbd_url(gateway, "v");
    cluster.dog_ok(&["vdi", "create", "v", &format!("{}M", LOOP_VDI_SIZE / MIB)]);

    eprintln!("phase: the whole VDI filled with random data so every object has replicas to lose");
    let mut model = random_bytes(LOOP_VDI_SIZE, rng.next_u64());
    nbd_write(&url, 0, &model);
    let work = tempfile::tempdir().expect("temp dir");

    for round in 0..LOOP_ROUNDS {
        let victim: u32 = rng.gen_range(1..cluster.nodes());
        let pieces = random_pieces(&mut rng);
        let bytes: usize = pieces.iter().map(|p| p.1).sum();
        eprintln!(
            "round {round}: kill node {victim} while writing {pieces:?} through node {gateway}"
        );
        let data = random_bytes(bytes, rng.next_u64());
        let input = work.path().join(format!("round{round}.bin"));
        std::fs::write(&input, &data).expect("writing the round's data");
        let writer = nbdsh_spawn(&url, &write_pieces_script(&input, &pieces));
        assert!(
            writer.wait_for_line("first request written", Duration::from_secs(60)),
            "round {round}: the writer did not get its first request through"
        );
        cluster.kill(victim);
        let out = writer.wait(TOOL_TIMEOUT);
        assert!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("all pieces written"),
            "round {round}: writes through node {gateway} failed while node {victim} died\n{}",
            describe(&out)
        );
        apply_pieces(&mut model, &pieces, &data);
        cluster.assert_members(gateway, 3);

        let away = random_pieces(&mut rng);
        eprintln!("round {round}: written while node {victim} is away: {away:?}");
        let away_data = random_bytes(away.iter().map(|p| p.1).sum(), rng.next_u64());
        let input = work.path().join(format!("round{round}-away.bin"));
        std::fs::write(&input, &away_data).expect("writing the round's data");
        let out = nbdsh(
            &url,
            &write_pieces_script(&input, &away),
            "write while away",
        );
        assert!(out.contains("all pieces written"), "round {round}: {out}");
        apply_pieces(&mut model, &away, &away_data);

        eprintln!("round {round}: node {victim} restarted; waiting for the rejoin and recovery");
        cluster.start(victim);
        cluster.assert_members(gateway, 4);
        cluster.wait_recovered(gateway);

        eprintln!("round {round}: verifying all data through node {gateway} and node {victim}, and the check");
        let want = sha256_of(&model);
        for reader in [gateway, victim] {
            assert_eq!(
                nbd_sha256(&cluster.nbd_url(reader, "v/ro"), 0, LOOP_VDI_SIZE as u64),
                want,
                "round {round} (seed {seed}): the VDI read through node {reader} differs from what was written"
            );
        }
        cluster.assert_check_clean(gateway, &format!("round {round} (seed {seed})"));
    }
}

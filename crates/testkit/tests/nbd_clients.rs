//! Real NBD clients against a 3-node cluster (issue 3, "What it must show" 1-5 and 5c):
//! qemu-io, nbdinfo, qemu-img convert/compare, fio with crc32c verification in both
//! durability modes, nbdsh (libnbd) edge cases with strict mode off, nbdcopy with
//! multi-conn, and the one-writer rule between gateways (refusal, read-only export,
//! take-over, forced unlock and fencing). A hand-written client checks what packaged
//! clients do not show: handshake replies (INFO, LIST, META_CONTEXT, ABORT) and the
//! chunks of structured READ replies.

mod common;

use common::nbd::*;
use std::collections::BTreeSet;
use std::time::Duration;
use testkit::{describe, random_bytes, random_file, sha256_of};

#[test]
fn qemu_io_pattern_written_through_node0_reads_back_through_every_node() {
    // Issue item 1: qemu-io writes 4 MiB of 0xab and reads it back through node 0, then through nodes 1 and 2.
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "64M", None, None);

    eprintln!("phase: qemu-io write -P 0xab 0 4M and read -P 0xab 0 4M through node 0");
    qemu_io_ok(
        &cluster.nbd_url(0, "v1"),
        false,
        &["write -P 0xab 0 4M", "read -P 0xab 0 4M"],
    );

    for i in 1..3 {
        eprintln!("phase: the same read through node {i}'s NBD port (another gateway, after node 0 released the VDI)");
        qemu_io_ok(&cluster.nbd_url(i, "v1"), false, &["read -P 0xab 0 4M"]);
    }

    eprintln!("phase: dog vdi read agrees byte for byte, and the range after it is still zeros");
    let back = cluster.read_vdi(0, "v1", 0, 8 * MIB as u64);
    assert!(
        back[..4 * MIB].iter().all(|&b| b == 0xab),
        "the 4 MiB written by qemu-io is not all 0xab"
    );
    assert!(
        back[4 * MIB..].iter().all(|&b| b == 0),
        "bytes after the written range are not zero"
    );
}

#[test]
fn nbdinfo_says_yes_to_flush_fua_trim_zero_multi_conn_lists_vdis_and_maps_holes() {
    // Issue item 2: every capability answers yes, --list lists exactly the VDIs, --map shows unwritten ranges as holes.
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "64M", None, None);
    create_vdi(&cluster, "v2", "16M", Some("writethrough"), None);
    let url = cluster.nbd_url(0, "v1");

    for cap in ["flush", "fua", "trim", "zero", "multi-conn"] {
        eprintln!("phase: nbdinfo --can {cap}");
        let mut cmd = tool("nbdinfo");
        cmd.args(["--can", cap, &url]);
        let out = run(cmd, TOOL_TIMEOUT);
        assert!(
            out.status.success(),
            "nbdinfo --can {cap} did not answer yes\n{}",
            describe(&out)
        );
    }

    eprintln!("phase: the read-write export is not read-only; the /ro export is");
    let mut cmd = tool("nbdinfo");
    cmd.args(["--is", "read-only", &url]);
    let out = run(cmd, TOOL_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(2),
        "export v1 claims to be read-only (exit 2 means no)\n{}",
        describe(&out)
    );
    let mut cmd = tool("nbdinfo");
    cmd.args(["--is", "read-only", &cluster.nbd_url(0, "v1/ro")]);
    let out = run(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "export v1/ro is not read-only\n{}",
        describe(&out)
    );

    eprintln!("phase: nbdinfo --list names exactly the two VDIs");
    let mut cmd = tool("nbdinfo");
    cmd.args([
        "--list",
        "--json",
        &format!("nbd://{}/", nbd_addr(&cluster, 0)),
    ]);
    let out = run_ok(cmd, "nbdinfo --list");
    let list: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("nbdinfo --list --json prints JSON");
    let names: BTreeSet<&str> = list["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| e["export-name"].as_str().expect("export-name"))
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["v1", "v2"]),
        "nbdinfo --list: {list}"
    );

    eprintln!("phase: write 4 KiB at 0 and 64 KiB at 20M, then nbdinfo --map must show data objects and holes");
    qemu_io_ok(
        &url,
        false,
        &["write -P 0x11 0 4k", "write -P 0x22 20M 64k"],
    );
    let mut cmd = tool("nbdinfo");
    cmd.args(["--map", "--json", &url]);
    let out = run_ok(cmd, "nbdinfo --map");
    let map: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("nbdinfo --map --json prints JSON");
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    let m = MIB as u64;
    // type 0: data; type 3: hole,zero. Allocation is per 4 MiB object.
    let expected = vec![
        (0, 4 * m, 0),
        (4 * m, 16 * m, 3),
        (20 * m, 4 * m, 0),
        (24 * m, 40 * m, 3),
    ];
    assert_eq!(extents, expected, "nbdinfo --map: {map}");
}

#[test]
fn qemu_img_convert_of_200mib_random_image_compares_identical_over_nbd() {
    // Issue item 3: a 200 MiB random raw image converted into a VDI compares identical, through two gateways.
    let cluster = cluster(false);
    create_vdi(&cluster, "img", "200M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.raw");
    random_file(&image, 200 * MIB, 3);
    let image = image.to_string_lossy().into_owned();
    let url = cluster.nbd_url(0, "img");

    eprintln!("phase: qemu-img convert -n of the 200 MiB image into the VDI through node 0");
    let mut cmd = tool("qemu-img");
    cmd.args(["convert", "-n", "-f", "raw", "-O", "raw", &image, &url]);
    run_ok(cmd, "qemu-img convert");

    for (i, export) in [(0, "img"), (1, "img/ro")] {
        eprintln!("phase: qemu-img compare of the image against export {export} of node {i}");
        let mut cmd = tool("qemu-img");
        cmd.args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &image,
            &cluster.nbd_url(i, export),
        ]);
        let out = run_ok(cmd, "qemu-img compare");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("identical"),
            "qemu-img compare did not say identical\n{}",
            describe(&out)
        );
    }

    eprintln!("phase: control: one changed sector must make qemu-img compare report a mismatch");
    qemu_io_ok(&url, false, &["write -P 0x5a 100M 512"]);
    let mut cmd = tool("qemu-img");
    cmd.args(["compare", "-f", "raw", "-F", "raw", &image, &url]);
    let out = run(cmd, TOOL_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare missed a changed sector\n{}",
        describe(&out)
    );
}

/// Runs fio's nbd engine with two jobs (4 KiB and 64 KiB random writes, 128 MiB each,
/// iodepth 32, crc32c verification) against a 256 MiB VDI in `mode`; returns the
/// per-node sync count increase.
fn fio_random_writes_verify(mode: &str) -> Vec<u64> {
    let cluster = cluster(false);
    create_vdi(&cluster, "f", "256M", Some(mode), None);
    let url = cluster.nbd_url(0, "f");
    let before = sync_counts(&cluster);
    // fio writes state files into its working directory: keep them out of the source tree.
    let scratch = tempfile::tempdir().expect("temp dir for fio");

    eprintln!("phase: fio randwrite bs=4k on [0, 128M) and bs=64k on [128M, 256M), iodepth 32, verify=crc32c, mode {mode}");
    let mut cmd = tool("fio");
    cmd.args([
        "--output-format=json",
        "--ioengine=nbd",
        &format!("--uri={url}"),
        "--rw=randwrite",
        "--iodepth=32",
        "--size=128M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_dump=0",
        "--verify_state_save=0",
        "--name=bs4k",
        "--bs=4k",
        "--offset=0",
        "--name=bs64k",
        "--bs=64k",
        "--offset=128M",
    ]);
    cmd.current_dir(scratch.path());
    let out = run(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "fio failed (verify errors fail it)\n{}",
        describe(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json_at = stdout
        .find('{')
        .unwrap_or_else(|| panic!("fio printed no JSON\n{}", describe(&out)));
    let report: serde_json::Value =
        serde_json::from_str(&stdout[json_at..]).expect("fio JSON report");
    let jobs = report["jobs"].as_array().expect("fio jobs");
    assert_eq!(jobs.len(), 2, "fio ran {} jobs", jobs.len());
    for job in jobs {
        let name = job["jobname"].as_str().unwrap_or("?");
        assert_eq!(
            job["error"], 0,
            "fio job {name} reports error {}",
            job["error"]
        );
        assert_eq!(
            job["write"]["io_bytes"],
            128 * MIB as u64,
            "fio job {name} did not write 128 MiB"
        );
        assert_eq!(
            job["read"]["io_bytes"],
            128 * MIB as u64,
            "fio job {name} did not verify (read back) 128 MiB"
        );
    }
    let delta = deltas(&before, &sync_counts(&cluster));
    eprintln!("  sync_count increase per node in mode {mode}: {delta:?}");
    delta
}

#[test]
fn fio_random_4k_and_64k_writes_verify_crc32c_in_none_mode() {
    // Issue item 4, mode none: zero verify errors; writes are not synced one by one (only flushes sync).
    let delta = fio_random_writes_verify("none");
    for (i, d) in delta.iter().enumerate() {
        assert!(
            *d <= 8,
            "node {i} synced {d} times in mode none: writes are being synced one by one"
        );
    }
}

#[test]
fn fio_random_4k_and_64k_writes_verify_crc32c_in_writethrough_mode() {
    // Issue item 4, mode writethrough: zero verify errors, and every write was synced on every replica.
    let delta = fio_random_writes_verify("writethrough");
    let writes = (128 * MIB / (4 * KIB) + 128 * MIB / (64 * KIB)) as u64;
    for (i, d) in delta.iter().enumerate() {
        assert!(
            *d >= writes,
            "node {i} synced {d} times for {writes} writethrough writes"
        );
    }
}

#[test]
fn nbdsh_out_of_range_zero_length_and_unaligned_requests_get_the_right_answers() {
    // Issue item 5: past-the-end requests get EINVAL/ENOSPC, zero-length ones succeed, unaligned ones work (minimum block 1).
    let cluster = cluster(false);
    create_vdi(&cluster, "e", "16M", None, None);
    let mut h = Nbdsh::connect("edge", &cluster.nbd_url(0, "e"));
    let size: u64 = 16 * MIB as u64;
    assert_eq!(h.ok("h.get_size()"), size, "export size");

    eprintln!("phase: reads past or across the end, or whose end overflows u64: EINVAL");
    h.fails_with(&format!("h.pread(4096, {size})"), "EINVAL");
    h.fails_with(&format!("h.pread(8192, {})", size - 4096), "EINVAL");
    h.fails_with(&format!("h.pread(1, {size})"), "EINVAL");
    h.fails_with(&format!("h.pread(4096, {})", u64::MAX - 1024), "EINVAL");

    eprintln!("phase: writes and write-zeroes past the end: ENOSPC; trims past the end: EINVAL");
    h.fails_with(&format!("h.pwrite(b'x' * 4096, {size})"), "ENOSPC");
    h.fails_with(&format!("h.pwrite(b'x' * 8192, {})", size - 4096), "ENOSPC");
    h.fails_with(&format!("h.zero(4096, {size})"), "ENOSPC");
    h.fails_with(&format!("h.trim(4096, {size})"), "EINVAL");
    h.fails_with(&format!("h.trim(8192, {})", size - 4096), "EINVAL");

    eprintln!("phase: the refused straddling write must not have written its in-range half");
    let last = h.ok(&format!("h.pread(4096, {})", size - 4096));
    assert_eq!(
        last["sha"],
        sha256_of(&[0u8; 4096]),
        "a refused write past the end changed the last block"
    );

    eprintln!(
        "phase: zero-length READ, WRITE, TRIM, WRITE_ZEROES succeed, at 0 and at the very end"
    );
    for at in [0, size] {
        assert_eq!(h.ok(&format!("h.pread(0, {at})"))["len"], 0);
        h.ok(&format!("h.pwrite(b'', {at})"));
        h.ok(&format!("h.trim(0, {at})"));
        h.ok(&format!("h.zero(0, {at})"));
    }
    eprintln!(
        "phase: zero-length BLOCK_STATUS is refused (a reply must describe a non-empty extent)"
    );
    h.fails_with("extents(0, 0)", "EINVAL");

    eprintln!("phase: the server advertises minimum block size 1, so unaligned requests are served exactly");
    assert_eq!(h.ok("h.get_block_size(nbd.SIZE_MINIMUM)"), 1);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let straddle_at = OBJECT_SIZE as u64 - 3;
    let straddle = random_bytes(7, 51);
    h.pwrite(&scratch, &straddle, straddle_at, "0");
    let odd = random_bytes(4097, 52);
    h.pwrite(&scratch, &odd, 1, "0");
    assert_eq!(
        h.read_sha(straddle_at, 7),
        sha256_of(&straddle),
        "7 bytes across the object boundary"
    );
    assert_eq!(
        h.read_sha(1, 4097),
        sha256_of(&odd),
        "4097 bytes at offset 1"
    );
    let mut around = vec![0u8; 4099];
    around[1..4098].copy_from_slice(&odd);
    assert_eq!(
        h.read_sha(0, 4099),
        sha256_of(&around),
        "bytes around an unaligned write were disturbed"
    );

    eprintln!("phase: the connection survived every refused request and still flushes");
    h.flush();
    h.close();
}

#[test]
fn nbdsh_unknown_export_is_refused_as_unknown() {
    // Issue item 5: a name that is no VDI gets ERR_UNKNOWN (libnbd: ENOENT), with and without /ro, and EXPORT_NAME closes.
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "16M", None, None);
    let addr = nbd_addr(&cluster, 0);

    for name in ["nope", "nope/ro", "v1/rw", "V1"] {
        eprintln!("phase: nbdsh connect to export {name:?}: ENOENT");
        let mut h = Nbdsh::start("unknown");
        h.fails_with(
            &format!("h.connect_uri({})", py_str(&format!("nbd://{addr}/{name}"))),
            "ENOENT",
        );

        eprintln!("phase: raw OPT_GO {name:?}: NBD_REP_ERR_UNKNOWN, and the handshake goes on");
        let mut raw = RawNbd::options(&addr);
        let reply = raw
            .go(name)
            .expect_err("OPT_GO of an unknown export succeeded");
        assert_eq!(
            reply.reply_type,
            REP_ERR_UNKNOWN,
            "OPT_GO {name:?}: {reply:?} ({})",
            reply.text()
        );
        raw.go("v1").expect("OPT_GO of v1 after a refused one");
    }

    eprintln!("phase: NBD_OPT_EXPORT_NAME of an unknown export: the server closes the connection");
    let mut raw = RawNbd::options(&addr);
    raw.send_option(OPT_EXPORT_NAME, b"nope");
    assert!(
        raw.closed_by_server(Duration::from_secs(10)),
        "EXPORT_NAME of an unknown export left the connection open"
    );

    eprintln!("phase: the real export still opens with nbdsh");
    let mut h = Nbdsh::connect("known", &cluster.nbd_url(0, "v1"));
    assert_eq!(h.ok("h.get_size()"), 16 * MIB as u64);
    h.close();
}

#[test]
fn nbdsh_trim_and_write_zeroes_read_back_zeros_and_show_in_block_status() {
    // Issue item 5: TRIM then read gives zeros and frees whole objects; WRITE_ZEROES with NO_HOLE keeps them allocated; FUA variants work.
    let cluster = cluster(false);
    create_vdi(&cluster, "z", "32M", None, None);
    let mut h = Nbdsh::connect("zero", &cluster.nbd_url(0, "z"));
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let (m, o) = (MIB as u64, OBJECT_SIZE as u64);
    const HOLE: u64 = 3; // base:allocation HOLE | ZERO

    eprintln!("phase: 16 MiB of random data over objects 0-3, with FUA, then a flush");
    let mut model = vec![0u8; 32 * MIB];
    let data = random_bytes(16 * MIB, 60);
    h.pwrite(&scratch, &data, 0, "nbd.CMD_FLAG_FUA");
    model[..16 * MIB].copy_from_slice(&data);
    h.flush();
    assert_eq!(
        h.extents(0, 32 * m),
        vec![(16 * m, 0), (16 * m, HOLE)],
        "allocation after writing 16 MiB"
    );

    eprintln!("phase: TRIM of all of object 1: reads as zeros and becomes a hole");
    h.ok(&format!("h.trim({o}, {o})"));
    model[OBJECT_SIZE..2 * OBJECT_SIZE].fill(0);
    assert_eq!(
        h.read_sha(o, OBJECT_SIZE),
        sha256_of(&model[OBJECT_SIZE..2 * OBJECT_SIZE])
    );
    assert_eq!(
        h.extents(o, o),
        vec![(o, HOLE)],
        "a wholly trimmed object is not a hole"
    );

    eprintln!("phase: TRIM (with FUA) of 1 MiB inside object 2: zeros there, neighbours intact, object still allocated");
    h.ok(&format!("h.trim({m}, {}, nbd.CMD_FLAG_FUA)", 9 * m));
    model[9 * MIB..10 * MIB].fill(0);
    assert_eq!(
        h.read_sha(2 * o, OBJECT_SIZE),
        sha256_of(&model[2 * OBJECT_SIZE..3 * OBJECT_SIZE])
    );
    assert_eq!(
        h.extents(2 * o, o),
        vec![(o, 0)],
        "a partly trimmed object must stay allocated"
    );

    eprintln!("phase: WRITE_ZEROES with NO_HOLE of all of object 0: zeros, but stays allocated");
    h.ok(&format!("h.zero({o}, 0, nbd.CMD_FLAG_NO_HOLE)"));
    model[..OBJECT_SIZE].fill(0);
    assert_eq!(h.read_sha(0, OBJECT_SIZE), sha256_of(&model[..OBJECT_SIZE]));
    assert_eq!(
        h.extents(0, o),
        vec![(o, 0)],
        "WRITE_ZEROES with NO_HOLE punched a hole"
    );

    eprintln!("phase: WRITE_ZEROES (FUA, may punch) of all of object 3: zeros, and a hole");
    h.ok(&format!("h.zero({o}, {}, nbd.CMD_FLAG_FUA)", 3 * o));
    model[3 * OBJECT_SIZE..4 * OBJECT_SIZE].fill(0);
    assert_eq!(
        h.read_sha(3 * o, OBJECT_SIZE),
        sha256_of(&model[3 * OBJECT_SIZE..4 * OBJECT_SIZE])
    );
    assert_eq!(h.extents(3 * o, o), vec![(o, HOLE)]);

    eprintln!("phase: WRITE_ZEROES of a partial range inside object 2 (no NO_HOLE), and FAST_ZERO with NO_HOLE is refused");
    h.ok(&format!("h.zero({}, {})", 64 * KIB, 8 * m + 12345));
    model[8 * MIB + 12345..8 * MIB + 12345 + 64 * KIB].fill(0);
    h.fails_with(
        "h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)",
        "ENOTSUP",
    );

    eprintln!("phase: the whole VDI equals the model, through this connection and through node 1 after a flush");
    h.flush();
    let expected = sha256_of(&model);
    assert_eq!(
        h.read_sha(0, 32 * MIB),
        expected,
        "VDI content differs from the model"
    );
    assert_eq!(
        h.extents(0, 32 * m),
        vec![(o, 0), (o, HOLE), (o, 0), (5 * o, HOLE)],
        "allocation after the trims and zeroes"
    );
    let mut other = Nbdsh::connect("zero-ro", &cluster.nbd_url(1, "z/ro"));
    assert_eq!(
        other.read_sha(0, 32 * MIB),
        expected,
        "node 1 serves different content"
    );
    other.close();
    h.close();

    eprintln!("phase: dog vdi list counts 2 allocated objects (objects 0 and 2)");
    let list = cluster.dog_json(0, &["vdi", "list"]);
    let z = list
        .as_array()
        .expect("vdi list")
        .iter()
        .find(|v| v["name"] == "z")
        .expect("VDI z listed")
        .clone();
    assert_eq!(z["allocated_objects"], 2, "vdi list: {z}");
}

#[test]
fn nbdsh_many_requests_in_flight_complete_out_of_order_with_correct_data() {
    // Issue item 5: 64 writes then 64 reads in flight on one connection; a slow 32 MiB request is overtaken by small ones; all data exact.
    let cluster = cluster(false);
    create_vdi(&cluster, "q", "64M", None, None);
    let mut h = Nbdsh::connect("inflight", &cluster.nbd_url(0, "q"));
    let dir = tempfile::tempdir().expect("temp dir");
    let image_path = dir.path().join("image");
    let image = random_bytes(40 * MIB, 70);
    std::fs::write(&image_path, &image).expect("staging the image");
    let image_py = py_str(&image_path.to_string_lossy());

    // Request 0 is one maximum-size 32 MiB request; requests 1..64 are 64 KiB each in [32M, 36M).
    let mut requests = vec![(0u64, MAX_PAYLOAD as usize)];
    requests.extend((0..63).map(|k| ((32 * MIB + k * 64 * KIB) as u64, 64 * KIB)));
    let reqs_py = format!(
        "{:?}",
        requests
            .iter()
            .map(|&(o, n)| [o, n as u64])
            .collect::<Vec<_>>()
    );

    eprintln!("phase: 64 writes submitted before any is awaited (the first is 32 MiB)");
    let w = h.ok(&format!("writes_in_flight({image_py}, {reqs_py})"));
    eprintln!("  write completion order: {}", w["order"]);
    assert_eq!(w["peak"], 64, "not all writes were in flight at once");
    assert_ne!(
        w["order"][0], 0,
        "the 32 MiB write completed first: replies look serialised"
    );
    h.flush();

    eprintln!("phase: 64 reads submitted before any is awaited (the first is 32 MiB)");
    let r = h.ok(&format!("reads_in_flight({reqs_py})"));
    eprintln!("  read completion order: {}", r["order"]);
    assert_eq!(r["peak"], 64, "not all reads were in flight at once");
    assert_ne!(
        r["order"][0], 0,
        "the 32 MiB read completed first: replies look serialised"
    );
    for (k, &(offset, len)) in requests.iter().enumerate() {
        let expected = sha256_of(&image[offset as usize..offset as usize + len]);
        assert_eq!(
            r["sha"][k], expected,
            "read {k} ({len} bytes at {offset}) returned wrong data"
        );
    }
    let order: BTreeSet<u64> = r["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(order.len(), 64, "some replies were lost or duplicated");
    h.close();
}

#[test]
fn second_gateway_is_refused_as_writer_naming_the_holder_and_serves_read_only() {
    // Issue item 5c: while node 0 serves v1 read-write, node 1 refuses a writer (ERR_POLICY naming node 0) but serves v1/ro.
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "64M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let holder_uuid = node_uuid(&cluster, 0);

    eprintln!("phase: a writer on node 0 writes 4 MiB and flushes, keeping its connection open");
    let mut writer = Nbdsh::connect("writer", &cluster.nbd_url(0, "v1"));
    let first = random_bytes(4 * MIB, 80);
    writer.pwrite(&scratch, &first, 0, "0");
    writer.flush();
    let lock = lock_of(&cluster, "v1").expect("v1 is not locked while node 0 serves it read-write");
    assert_eq!(lock["holder"], holder_uuid.as_str(), "lock holder: {lock}");

    eprintln!("phase: raw OPT_GO v1 on node 1: NBD_REP_ERR_POLICY with a message naming node 0");
    let mut raw = RawNbd::options(&nbd_addr(&cluster, 1));
    let reply = raw
        .go("v1")
        .expect_err("a second gateway accepted a writer");
    let message = reply.text();
    assert_eq!(
        reply.reply_type, REP_ERR_POLICY,
        "OPT_GO v1 on node 1: {reply:?} ({message})"
    );
    assert!(
        message.contains(&holder_uuid) && message.contains(&cluster.peer_addr(0)),
        "the refusal does not name the holder ({holder_uuid}, {}): {message}",
        cluster.peer_addr(0)
    );
    drop(raw);

    eprintln!("phase: qemu-io read-write through node 1 is refused with that message");
    let out = qemu_io(&cluster.nbd_url(1, "v1"), false, &["write -P 0xee 0 4k"]);
    assert!(
        !out.status.success(),
        "qemu-io wrote through a second gateway\n{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "qemu-io does not show why\n{}",
        describe(&out)
    );

    eprintln!("phase: node 1 serves v1/ro: read-only flag, the writer's data, EPERM for writes, trims and zeroes");
    let mut reader = Nbdsh::connect("reader", &cluster.nbd_url(1, "v1/ro"));
    assert_eq!(reader.ok("h.is_read_only()"), true);
    assert_eq!(reader.read_sha(0, 4 * MIB), sha256_of(&first));
    reader.fails_with("h.pwrite(b'x' * 4096, 0)", "EPERM");
    reader.fails_with("h.trim(4096, 0)", "EPERM");
    reader.fails_with("h.zero(4096, 0)", "EPERM");
    reader.flush();
    qemu_io_ok(&cluster.nbd_url(1, "v1/ro"), true, &["read -P 0 4M 4M"]);

    eprintln!("phase: the writer overwrites and fills a new object; the read-only export sees both after the flush");
    let second = random_bytes(MIB, 81);
    writer.pwrite(&scratch, &second, MIB as u64, "0");
    let third = random_bytes(MIB, 82);
    writer.pwrite(&scratch, &third, 9 * MIB as u64, "0");
    writer.flush();
    assert_eq!(
        reader.read_sha(MIB as u64, MIB),
        sha256_of(&second),
        "read-only export serves stale data"
    );
    assert_eq!(
        reader.read_sha(9 * MIB as u64, MIB),
        sha256_of(&third),
        "read-only export misses a new object"
    );
    assert_eq!(reader.read_sha(0, 4 * MIB), writer.read_sha(0, 4 * MIB));
    assert!(
        lock_of(&cluster, "v1").is_some(),
        "a read-only export released the writer's lock"
    );

    eprintln!("phase: the writer disconnects: the lock is released, and node 1 may now write");
    writer.close();
    assert!(
        wait_unlocked(&cluster, "v1", Duration::from_secs(15)),
        "lock not released: {:?}",
        locks(&cluster)
    );
    qemu_io_ok(
        &cluster.nbd_url(1, "v1"),
        false,
        &["write -P 0x77 0 64k", "read -P 0x77 0 64k"],
    );
    reader.close();
}

#[test]
fn lock_is_taken_over_by_another_gateway_once_the_holder_node_is_gone() {
    // Item 5c (DESIGN.md 6.9): when the writer's node dies and leaves the membership, another gateway may take the lock (next generation).
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "16M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");

    eprintln!("phase: a writer on node 0 writes and flushes 1 MiB");
    let mut writer = Nbdsh::connect("writer", &cluster.nbd_url(0, "v1"));
    let data = random_bytes(MIB, 90);
    writer.pwrite(&scratch, &data, 0, "0");
    writer.flush();
    let before = lock_of(&cluster, "v1").expect("v1 locked by node 0");

    eprintln!("phase: node 0 is killed; once node 1 sees 2 members, its read-write export opens");
    cluster.kill(0);
    drop(writer);
    assert!(
        cluster.wait_members(1, 2, Duration::from_secs(30)),
        "node 1 does not list 2 members"
    );
    let mut taker = Nbdsh::connect("taker", &cluster.nbd_url(1, "v1"));
    assert_eq!(
        taker.read_sha(0, MIB),
        sha256_of(&data),
        "the flushed data of the dead writer"
    );
    let more = random_bytes(MIB, 91);
    taker.pwrite(&scratch, &more, 2 * MIB as u64, "0");
    taker.flush();
    let after = cluster.dog_json(1, &["vdi", "lock", "list"]);
    let lock = after
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == "v1"))
        .cloned()
        .expect("v1 locked by node 1");
    assert_eq!(
        lock["holder"],
        node_uuid(&cluster, 1).as_str(),
        "lock after take-over: {lock}"
    );
    assert!(
        lock["generation"].as_u64() > before["generation"].as_u64(),
        "take-over did not increase the generation: {before} -> {lock}"
    );
    taker.close();
}

#[test]
fn forced_unlock_fences_the_old_writer_and_lets_another_gateway_write() {
    // `dog vdi lock unlock --force` breaks a live holder's lock; once another gateway has written, the old writer's writes get EPERM.
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "16M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");

    eprintln!("phase: a writer on node 0 writes and flushes");
    let mut old = Nbdsh::connect("old-writer", &cluster.nbd_url(0, "v1"));
    old.pwrite(&scratch, &random_bytes(64 * KIB, 95), 0, "0");
    old.flush();

    eprintln!("phase: unlock without --force is refused while the holder is alive");
    let out = cluster.dog(&["vdi", "lock", "unlock", "v1"]);
    testkit::assert_fails_with(&out, &["force"]);
    assert!(
        lock_of(&cluster, "v1").is_some(),
        "a refused unlock released the lock"
    );

    eprintln!("phase: unlock --force; node 1 then writes 0x99 through its read-write export");
    cluster.dog_ok(&["vdi", "lock", "unlock", "v1", "--force"]);
    assert!(
        lock_of(&cluster, "v1").is_none(),
        "lock still listed after unlock --force"
    );
    qemu_io_ok(
        &cluster.nbd_url(1, "v1"),
        false,
        &["write -P 0x99 0 64k", "read -P 0x99 0 64k"],
    );

    eprintln!(
        "phase: the old writer's next write carries the old generation: EPERM, and nothing lands"
    );
    old.fails_with("h.pwrite(b'\\x01' * 4096, 0)", "EPERM");
    qemu_io_ok(&cluster.nbd_url(2, "v1/ro"), true, &["read -P 0x99 0 64k"]);
    drop(old);
}

#[test]
fn vdi_resize_and_delete_are_seen_by_new_nbd_connections() {
    // A grown VDI is exported at its new size to new connections; a deleted one is no longer an export.
    let cluster = cluster(false);
    create_vdi(&cluster, "r", "16M", None, None);
    let url = cluster.nbd_url(0, "r");
    let size_of = |url: &str| {
        let mut cmd = tool("nbdinfo");
        cmd.args(["--size", url]);
        let out = run_ok(cmd, "nbdinfo --size");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(size_of(&url), (16 * MIB).to_string());
    qemu_io_ok(&url, false, &["write -P 0x61 0 64k"]);

    eprintln!(
        "phase: dog vdi resize r 32M; a new connection sees 32 MiB and can write past the old end"
    );
    cluster.dog_ok(&["vdi", "resize", "r", "32M"]);
    assert_eq!(size_of(&url), (32 * MIB).to_string());
    qemu_io_ok(
        &url,
        false,
        &[
            "write -P 0x62 20M 64k",
            "read -P 0x62 20M 64k",
            "read -P 0x61 0 64k",
        ],
    );

    eprintln!("phase: dog vdi delete r once the last client is gone (lock released); the export is gone (ERR_UNKNOWN)");
    // The gateway closes a connection's device (final flush, lock release) just after
    // the client sees the socket close, so a delete issued at once may still find it open.
    assert!(
        wait_unlocked(&cluster, "r", Duration::from_secs(15)),
        "r still locked: {:?}",
        locks(&cluster)
    );
    cluster.dog_ok(&["vdi", "delete", "r"]);
    let mut raw = RawNbd::options(&nbd_addr(&cluster, 0));
    let reply = raw.go("r").expect_err("a deleted VDI is still exported");
    assert_eq!(
        reply.reply_type,
        REP_ERR_UNKNOWN,
        "OPT_GO of a deleted VDI: {}",
        reply.text()
    );
}

// Protocol details no packaged client shows directly, checked with a hand-written client.

#[test]
fn structured_read_of_a_partly_unallocated_range_reports_the_hole_as_offset_hole() {
    // Issue 3: structured replies carry OFFSET_HOLE for unallocated ranges, and errors as ERROR chunks with a message.
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "16M", None, None);
    qemu_io_ok(&cluster.nbd_url(0, "v1"), false, &["write -P 0xab 0 4M"]);
    let mut raw = RawNbd::options(&nbd_addr(&cluster, 0));
    raw.structured_replies();
    raw.go("v1").expect("OPT_GO v1");

    eprintln!("phase: READ of [0, 8M): object 0 written, object 1 never written");
    raw.request(0, CMD_READ, 1, 0, 8 * MIB as u32);
    let chunks = raw.read_structured_reply(1);
    let mut image = vec![0x55u8; 8 * MIB];
    let mut covered = vec![false; 8 * MIB];
    let mut holes = Vec::new();
    for chunk in &chunks {
        let p = &chunk.payload;
        let (at, len) = match chunk.kind {
            REPLY_TYPE_OFFSET_DATA => {
                let at = u64::from_be_bytes(p[0..8].try_into().unwrap()) as usize;
                image[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                (at, p.len() - 8)
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let at = u64::from_be_bytes(p[0..8].try_into().unwrap()) as usize;
                let len = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                image[at..at + len].fill(0);
                holes.push((at, len));
                (at, len)
            }
            REPLY_TYPE_NONE => continue,
            other => panic!("unexpected chunk type {other} in a READ reply: {chunk:?}"),
        };
        assert!(
            covered[at..at + len].iter().all(|c| !c),
            "chunks overlap at {at}"
        );
        covered[at..at + len].fill(true);
    }
    assert!(
        covered.iter().all(|&c| c),
        "the chunks do not cover the whole READ"
    );
    assert!(
        image[..4 * MIB].iter().all(|&b| b == 0xab),
        "written object read wrong"
    );
    assert!(
        image[4 * MIB..].iter().all(|&b| b == 0),
        "unwritten object read as non-zero"
    );
    let kinds: Vec<u16> = chunks.iter().map(|c| c.kind).collect();
    assert!(
        holes.contains(&(4 * MIB, 4 * MIB)),
        "no OFFSET_HOLE chunk for the unallocated object [4M, 8M); chunk types sent: {kinds:?}"
    );

    eprintln!("phase: READ past the end: a single ERROR chunk (DONE) with EINVAL and a message");
    raw.request(0, CMD_READ, 2, 16 * MIB as u64, 4096);
    let chunks = raw.read_structured_reply(2);
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    let chunk = &chunks[0];
    assert_eq!(chunk.kind, REPLY_TYPE_ERROR, "{chunk:?}");
    let errno = u32::from_be_bytes(chunk.payload[0..4].try_into().unwrap());
    let message_len = u16::from_be_bytes([chunk.payload[4], chunk.payload[5]]) as usize;
    let message = String::from_utf8_lossy(&chunk.payload[6..6 + message_len]).into_owned();
    assert_eq!(errno, EINVAL, "error chunk errno (message {message:?})");
    assert!(!message.is_empty(), "error chunk without a message");
}

#[test]
fn handshake_info_list_meta_context_and_abort_answer_as_the_protocol_says() {
    // Issue 3 handshake: INFO (export, name, description, block size), LIST of VDIs, LIST_META_CONTEXT base:allocation, ABORT.
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "16M", None, None);
    create_vdi(&cluster, "v2", "8M", None, None);
    let addr = nbd_addr(&cluster, 0);
    let mut raw = RawNbd::options(&addr);

    eprintln!("phase: OPT_INFO v1 asking for NAME, DESCRIPTION and BLOCK_SIZE");
    let mut data = 2u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"v1");
    data.extend_from_slice(&3u16.to_be_bytes());
    for info in [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE] {
        data.extend_from_slice(&info.to_be_bytes());
    }
    raw.send_option(OPT_INFO, &data);
    let replies = raw.read_option_replies(OPT_INFO);
    assert_eq!(
        replies.last().map(|r| r.reply_type),
        Some(REP_ACK),
        "OPT_INFO v1: {replies:?}"
    );
    let infos: std::collections::BTreeMap<u16, Vec<u8>> = replies
        .iter()
        .filter(|r| r.reply_type == REP_INFO)
        .map(|r| {
            (
                u16::from_be_bytes([r.data[0], r.data[1]]),
                r.data[2..].to_vec(),
            )
        })
        .collect();
    let export = infos.get(&INFO_EXPORT).expect("INFO_EXPORT");
    assert_eq!(
        u64::from_be_bytes(export[0..8].try_into().unwrap()),
        16 * MIB as u64
    );
    let flags = u16::from_be_bytes([export[8], export[9]]);
    for (bit, name) in [
        (0, "HAS_FLAGS"),
        (2, "SEND_FLUSH"),
        (3, "SEND_FUA"),
        (5, "SEND_TRIM"),
        (6, "SEND_WRITE_ZEROES"),
        (8, "CAN_MULTI_CONN"),
    ] {
        assert_ne!(
            flags & (1 << bit),
            0,
            "transmission flags {flags:#x} lack {name}"
        );
    }
    assert_eq!(flags & FLAG_READ_ONLY, 0, "v1 advertised read-only");
    assert_eq!(
        infos
            .get(&INFO_NAME)
            .map(|n| String::from_utf8_lossy(n).into_owned()),
        Some("v1".to_string())
    );
    let description =
        String::from_utf8_lossy(infos.get(&INFO_DESCRIPTION).expect("INFO_DESCRIPTION"))
            .into_owned();
    assert!(description.contains("v1"), "description {description:?}");
    let sizes = infos.get(&INFO_BLOCK_SIZE).expect("INFO_BLOCK_SIZE");
    let size_at = |k: usize| u32::from_be_bytes(sizes[4 * k..4 * k + 4].try_into().unwrap());
    assert_eq!(
        (size_at(0), size_at(1), size_at(2)),
        (1, 4096, MAX_PAYLOAD),
        "block sizes (minimum, preferred, maximum)"
    );

    eprintln!("phase: OPT_INFO of an unknown export: ERR_UNKNOWN");
    let mut data = 4u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"nope");
    data.extend_from_slice(&0u16.to_be_bytes());
    raw.send_option(OPT_INFO, &data);
    let replies = raw.read_option_replies(OPT_INFO);
    assert_eq!(
        replies.last().map(|r| r.reply_type),
        Some(REP_ERR_UNKNOWN),
        "OPT_INFO nope: {replies:?}"
    );

    eprintln!("phase: OPT_LIST names the VDIs");
    raw.send_option(OPT_LIST, b"");
    let replies = raw.read_option_replies(OPT_LIST);
    assert_eq!(replies.last().map(|r| r.reply_type), Some(REP_ACK));
    let names: BTreeSet<String> = replies
        .iter()
        .filter(|r| r.reply_type == REP_SERVER)
        .map(|r| {
            let len = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
            String::from_utf8_lossy(&r.data[4..4 + len]).into_owned()
        })
        .collect();
    assert_eq!(names, BTreeSet::from(["v1".to_string(), "v2".to_string()]));

    eprintln!("phase: after OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT v1 'base:' offers base:allocation");
    raw.structured_replies();
    let mut data = 2u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"v1");
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&5u32.to_be_bytes());
    data.extend_from_slice(b"base:");
    raw.send_option(OPT_LIST_META_CONTEXT, &data);
    let replies = raw.read_option_replies(OPT_LIST_META_CONTEXT);
    assert_eq!(
        replies.last().map(|r| r.reply_type),
        Some(REP_ACK),
        "{replies:?}"
    );
    let contexts: Vec<String> = replies
        .iter()
        .filter(|r| r.reply_type == REP_META_CONTEXT)
        .map(|r| String::from_utf8_lossy(&r.data[4..]).into_owned())
        .collect();
    assert_eq!(contexts, vec!["base:allocation".to_string()]);

    eprintln!("phase: OPT_ABORT is acknowledged, then the server closes");
    raw.send_option(OPT_ABORT, b"");
    let reply = raw.read_option_reply();
    assert_eq!((reply.option, reply.reply_type), (OPT_ABORT, REP_ACK));
    assert!(
        raw.closed_by_server(Duration::from_secs(10)),
        "OPT_ABORT left the connection open"
    );
}

/// A cluster started by the test itself with plain `dog local up` (to see what it
/// prints); `dog local down` when dropped.
struct OwnCluster {
    dir: tempfile::TempDir,
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let mut cmd = std::process::Command::new(testkit::bin("dog"));
        cmd.args(["local", "down", "--dir"]).arg(self.dir.path());
        let _ = run(cmd, Duration::from_secs(60));
    }
}

/// Bases P and Q with P..P+3 and Q..Q+3 free on 127.0.0.1.
fn free_port_bases() -> (u16, u16) {
    use rand::Rng;
    let free =
        |base: u16| (base..base + 3).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let (peer, nbd) = (rng.gen_range(20000..25990), rng.gen_range(26000..31990));
        if free(peer) && free(nbd) {
            return (peer, nbd);
        }
    }
    panic!("no free port ranges");
}

#[test]
fn dog_local_up_prints_a_working_nbd_url_and_qemu_io_command_for_its_demo_vdi() {
    // Issue 3: `dog local up` prints the demo VDI's NBD URL and a qemu-io command that writes and reads it; both work as printed.
    let dir = tempfile::Builder::new()
        .prefix("sheepdog-test-demo-")
        .tempdir()
        .expect("temp dir");
    let (peer, nbd) = free_port_bases();
    let mut cmd = std::process::Command::new(testkit::bin("dog"));
    cmd.args(["local", "up", "--dir"]).arg(dir.path()).args([
        "--port",
        &peer.to_string(),
        "--nbd-port",
        &nbd.to_string(),
        "--demo-size",
        "64M",
    ]);
    let cluster = OwnCluster { dir };
    eprintln!("phase: dog local up with a 64 MiB demo VDI");
    let out = run_ok(cmd, "dog local up");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}");

    eprintln!("phase: the printed NBD URL serves a 64 MiB export");
    let url = stdout
        .split_whitespace()
        .find(|w| w.starts_with("nbd://") && w.ends_with("/demo"))
        .unwrap_or_else(|| panic!("dog local up printed no NBD URL of the demo VDI:\n{stdout}"));
    assert_eq!(url, format!("nbd://127.0.0.1:{nbd}/demo"));
    let mut size = tool("nbdinfo");
    size.args(["--size", url]);
    let out = run_ok(size, "nbdinfo --size");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (64 * MIB).to_string()
    );

    eprintln!("phase: the printed qemu-io command runs as printed and passes");
    let line = stdout
        .lines()
        .find(|l| l.contains("qemu-io"))
        .unwrap_or_else(|| panic!("dog local up printed no qemu-io command:\n{stdout}"));
    let command = line[line.find("qemu-io").unwrap()..].trim();
    assert!(
        command.contains(url) && command.contains("write") && command.contains("read"),
        "command: {command}"
    );
    tool("qemu-io");
    let mut sh = tool("sh");
    sh.args(["-c", command]);
    let out = run_ok(sh, "the printed qemu-io command");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("wrote") && printed.contains("read") && !printed.contains("failed"),
        "{printed}"
    );
    drop(cluster);
}

#[test]
fn nbdcopy_multi_conn_round_trip_of_a_sparse_image_is_exact() {
    // nbdcopy (4 connections, many requests in flight, zero detection) copies a sparse image in and out byte for byte.
    let cluster = cluster(false);
    create_vdi(&cluster, "c", "96M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let image_path = dir.path().join("in.raw");

    eprintln!(
        "phase: a 96 MiB image: random data with whole zero objects and zero runs inside objects"
    );
    let mut image = random_bytes(96 * MIB, 7);
    for object in [2usize, 3, 9, 17] {
        image[object * OBJECT_SIZE..(object + 1) * OBJECT_SIZE].fill(0);
    }
    image[MIB..MIB + 300 * KIB].fill(0);
    image[40 * MIB + 4096..41 * MIB].fill(0);
    std::fs::write(&image_path, &image).expect("writing the image");

    eprintln!("phase: nbdcopy image -> node 0 (multi-conn)");
    let mut copy_in = tool("nbdcopy");
    copy_in
        .args(["--flush", "-C", "4", "-R", "32"])
        .arg(&image_path)
        .arg(cluster.nbd_url(0, "c"));
    run_ok(copy_in, "nbdcopy in");

    eprintln!("phase: nbdcopy node 1's read-only export -> file: identical");
    let out_path = dir.path().join("out.raw");
    let mut copy_out = tool("nbdcopy");
    copy_out
        .args(["-C", "4", "-R", "32"])
        .arg(cluster.nbd_url(1, "c/ro"))
        .arg(&out_path);
    run_ok(copy_out, "nbdcopy out");
    let back = std::fs::read(&out_path).expect("reading the copy");
    assert_eq!(back.len(), image.len(), "copied size");
    assert_eq!(
        sha256_of(&back),
        sha256_of(&image),
        "nbdcopy round trip differs"
    );

    eprintln!("phase: the all-zero objects are holes in the export");
    let mut map = tool("nbdinfo");
    map.args(["--map", "--json", &cluster.nbd_url(0, "c")]);
    let out = run_ok(map, "nbdinfo --map");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("map JSON");
    for object in [2u64, 3, 9, 17] {
        let at = object * OBJECT_SIZE as u64;
        let extent = map
            .as_array()
            .expect("map array")
            .iter()
            .find(|e| {
                let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                o <= at && at < o + l
            })
            .expect("an extent covers the object");
        assert_eq!(
            extent["type"], 3,
            "all-zero object {object} is not a hole: {extent}"
        );
    }
}

#[test]
fn read_only_export_on_another_gateway_reads_zeros_after_the_writer_trims_a_whole_object() {
    // Issue 3: trimmed ranges read as zeros, also through a read-only export on another gateway that had read the object before.
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "16M", None, None);
    let dir = tempfile::tempdir().expect("temp dir");
    let scratch = dir.path().join("data");
    let o = OBJECT_SIZE as u64;

    eprintln!("phase: the writer on node 0 fills objects 0 and 1; the reader on node 1 (v1/ro) reads object 1");
    let mut writer = Nbdsh::connect("writer", &cluster.nbd_url(0, "v1"));
    let data = random_bytes(2 * OBJECT_SIZE, 97);
    writer.pwrite(&scratch, &data, 0, "0");
    writer.flush();
    let mut reader = Nbdsh::connect("reader", &cluster.nbd_url(1, "v1/ro"));
    assert_eq!(
        reader.read_sha(o, OBJECT_SIZE),
        sha256_of(&data[OBJECT_SIZE..])
    );

    eprintln!("phase: the writer trims all of object 1 (freed: table entry cleared, object removed) and flushes");
    writer.ok(&format!("h.trim({o}, {o})"));
    writer.flush();
    assert_eq!(
        writer.read_sha(o, OBJECT_SIZE),
        sha256_of(&vec![0u8; OBJECT_SIZE]),
        "the writer's own view"
    );

    eprintln!("phase: the reader must now read zeros there (not an error, not the old data)");
    let zeros = sha256_of(&vec![0u8; OBJECT_SIZE]);
    match reader.call(&format!("sha(h.pread({OBJECT_SIZE}, {o}))")) {
        NbdshReply::Ok(v) => assert_eq!(
            v,
            zeros.as_str(),
            "the read-only export serves the trimmed object's old data"
        ),
        other => panic!(
            "reading a trimmed object through the read-only export on node 1 failed: {other:?}"
        ),
    }
    assert_eq!(
        reader.read_sha(0, OBJECT_SIZE),
        sha256_of(&data[..OBJECT_SIZE]),
        "object 0 is untouched"
    );
    reader.close();
    writer.close();
}

//! Hostile and broken NBD clients (issue 3, item 8): random bytes, bad magic, unknown
//! commands and flags, oversized lengths, truncated requests and clients that vanish
//! mid-request. Each gets the right NBD error or a closed connection, and in the same
//! run a well-behaved client (an nbdsh connection opened before the attack, and a fresh
//! qemu-io after it) keeps being served, no node crashes and no VDI lock leaks.

mod common;

use common::nbd::*;
use std::time::Duration;
use testkit::{random_bytes, sha256_of, LocalCluster};

/// How long the server may take to close a connection it must close.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);
/// Unknown command code.
const CMD_UNKNOWN: u16 = 42;
/// Command flag bits no command accepts.
const FLAG_UNKNOWN: u16 = 0x8000;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// A well-behaved client that was connected before the attacks, with what it wrote.
struct GoodClient {
    session: Nbdsh,
    data: Vec<u8>,
}

impl GoodClient {
    /// Connects to v1 on node 0 and writes 1 MiB at 0.
    fn connect(cluster: &LocalCluster, scratch: &std::path::Path) -> GoodClient {
        let mut session = Nbdsh::connect("well-behaved", &cluster.nbd_url(0, "v1"));
        let data = random_bytes(MIB, 1);
        session.pwrite(scratch, &data, 0, "0");
        session.flush();
        GoodClient { session, data }
    }

    /// Asserts the cluster still serves: this open connection reads its data back and
    /// flushes, a fresh qemu-io writes and reads a pattern, every node is alive.
    fn assert_still_served(&mut self, cluster: &LocalCluster, after: &str) {
        eprintln!("  check after {after}: the open connection and a fresh qemu-io are served");
        assert_eq!(
            self.session.read_sha(0, MIB),
            sha256_of(&self.data),
            "open connection, after {after}"
        );
        self.session.flush();
        qemu_io_ok(
            &cluster.nbd_url(0, "v1"),
            false,
            &["write -P 0x5c 32M 64k", "read -P 0x5c 32M 64k"],
        );
        assert_all_nodes_alive_without_panic(cluster);
    }
}

fn setup() -> (LocalCluster, tempfile::TempDir) {
    let cluster = cluster(false);
    create_vdi(&cluster, "v1", "64M", None, None);
    (cluster, tempfile::tempdir().expect("temp dir"))
}

#[test]
fn garbage_bytes_in_every_phase_close_only_that_connection() {
    // Random bytes instead of client flags, options or requests: that connection is closed; the server serves everyone else.
    let (cluster, dir) = setup();
    let addr = nbd_addr(&cluster, 0);
    let mut good = GoodClient::connect(&cluster, &dir.path().join("data"));

    eprintln!("phase: 64 KiB of random bytes sent before even reading the greeting");
    let mut raw = RawNbd::connect(&addr);
    raw.send_lossy(&random_bytes(64 * KIB, 2));
    assert!(
        raw.closed_by_server(CLOSE_WITHIN),
        "garbage instead of client flags left the connection open"
    );
    good.assert_still_served(&cluster, "garbage at connect");

    eprintln!("phase: client flags with unknown bits set (0xdeadbeef)");
    let mut raw = RawNbd::connect(&addr);
    raw.read_greeting();
    raw.send_lossy(&0xdead_beef_u32.to_be_bytes());
    assert!(
        raw.closed_by_server(CLOSE_WITHIN),
        "unknown client flags left the connection open"
    );

    eprintln!("phase: random bytes where an option (IHAVEOPT) is expected");
    let mut raw = RawNbd::options(&addr);
    raw.send_lossy(&random_bytes(4 * KIB, 3));
    assert!(
        raw.closed_by_server(CLOSE_WITHIN),
        "garbage options left the connection open"
    );
    good.assert_still_served(&cluster, "garbage options");

    eprintln!("phase: random bytes where a request is expected (transmission phase)");
    let (mut raw, _, _) = RawNbd::open(&addr, "v1");
    raw.send_lossy(&random_bytes(4 * KIB, 4));
    assert!(
        raw.closed_by_server(CLOSE_WITHIN),
        "garbage requests left the connection open"
    );
    good.assert_still_served(&cluster, "garbage requests");

    eprintln!("phase: 32 connections at once spraying 256 KiB of random bytes each");
    let sprayers: Vec<_> = (0..32u64)
        .map(|k| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut raw = RawNbd::connect(&addr);
                raw.send_lossy(&random_bytes(256 * KIB, 100 + k));
                raw.closed_by_server(CLOSE_WITHIN)
            })
        })
        .collect();
    for (k, sprayer) in sprayers.into_iter().enumerate() {
        assert!(
            sprayer.join().expect("sprayer thread"),
            "sprayer {k}'s connection was left open"
        );
    }
    good.assert_still_served(&cluster, "32 garbage sprayers");
    good.session.close();
}

#[test]
fn bad_magic_unknown_commands_and_bad_flags_get_einval_or_a_close() {
    // Unknown command, unknown or misplaced flags, FLUSH with a range, reads past the end: EINVAL and the connection goes on; bad magic: closed.
    let (cluster, dir) = setup();
    let addr = nbd_addr(&cluster, 0);
    let mut good = GoodClient::connect(&cluster, &dir.path().join("data"));
    let (mut raw, size, _) = RawNbd::open(&addr, "v1");
    assert_eq!(size, 64 * MIB as u64);

    eprintln!("phase: unknown command {CMD_UNKNOWN}: EINVAL");
    assert_eq!(raw.request_error(0, CMD_UNKNOWN, 1, 0, 4096), EINVAL);
    eprintln!(
        "phase: READ with an unknown flag bit, and with NO_HOLE (a WRITE_ZEROES flag): EINVAL"
    );
    assert_eq!(
        raw.request_error(FLAG_UNKNOWN, CMD_READ, 2, 0, 4096),
        EINVAL
    );
    assert_eq!(
        raw.request_error(CMD_FLAG_NO_HOLE, CMD_READ, 3, 0, 4096),
        EINVAL
    );
    eprintln!("phase: FLUSH with a non-zero offset and length: EINVAL");
    assert_eq!(raw.request_error(0, CMD_FLUSH, 4, 4096, 4096), EINVAL);
    eprintln!("phase: READ past the end: EINVAL; WRITE past the end (payload sent): ENOSPC");
    assert_eq!(raw.request_error(0, CMD_READ, 5, size, 4096), EINVAL);
    raw.request(0, CMD_WRITE, 6, size - 2048, 4096);
    raw.send(&random_bytes(4096, 5));
    assert_eq!(raw.simple_reply(0).0, ENOSPC, "WRITE across the end");

    eprintln!("phase: the same connection still reads the good client's data (the refused payload was skipped)");
    assert_eq!(
        sha256_of(&raw.read_ok(7, 0, MIB as u32)),
        sha256_of(&good.data)
    );
    let tail = raw.read_ok(8, size - 4096, 4096);
    assert!(
        tail.iter().all(|&b| b == 0),
        "a refused WRITE past the end wrote its in-range part"
    );

    eprintln!("phase: a request with a bad magic: the server closes the connection");
    let mut bad = request_header(0, CMD_READ, 9, 0, 4096);
    bad[0..4].copy_from_slice(&0x1234_5678_u32.to_be_bytes());
    raw.send_lossy(&bad);
    assert!(
        raw.closed_by_server(CLOSE_WITHIN),
        "a bad request magic left the connection open"
    );
    good.assert_still_served(&cluster, "bad magic");

    eprintln!("phase: a write to a read-only export: EPERM");
    let (mut ro, _, flags) = RawNbd::open(&addr, "v1/ro");
    assert_ne!(flags & FLAG_READ_ONLY, 0, "v1/ro is not flagged read-only");
    ro.request(0, CMD_WRITE, 10, 0, 4096);
    ro.send(&random_bytes(4096, 6));
    assert_eq!(ro.simple_reply(0).0, EPERM, "WRITE to a read-only export");
    assert_eq!(
        sha256_of(&ro.read_ok(11, 0, MIB as u32)),
        sha256_of(&good.data)
    );
    drop(ro);
    good.session.close();
}

#[test]
fn oversized_lengths_are_refused_or_closed_and_the_server_keeps_serving() {
    // READ/WRITE over the 32 MiB maximum payload: EINVAL (payload skipped); a 4 GiB WRITE: closed; oversized option: ERR_TOO_BIG.
    let (cluster, dir) = setup();
    let addr = nbd_addr(&cluster, 0);
    let mut good = GoodClient::connect(&cluster, &dir.path().join("data"));
    let (mut raw, _, _) = RawNbd::open(&addr, "v1");

    eprintln!("phase: READ of maximum payload + 1 bytes: EINVAL, connection goes on");
    assert_eq!(
        raw.request_error(0, CMD_READ, 1, 0, MAX_PAYLOAD + 1),
        EINVAL
    );
    eprintln!("phase: WRITE of maximum payload + 4 KiB with its payload: EINVAL, payload skipped, nothing written");
    let len = MAX_PAYLOAD + 4096;
    raw.request(0, CMD_WRITE, 2, 16 * MIB as u64, len);
    raw.send(&vec![0xee; len as usize]);
    let (error, cookie, _) = raw.simple_reply(0);
    assert_eq!((error, cookie), (EINVAL, 2), "oversized WRITE");
    let back = raw.read_ok(3, 16 * MIB as u64, MIB as u32);
    assert!(
        back.iter().all(|&b| b == 0),
        "an oversized WRITE that was refused wrote data"
    );

    eprintln!("phase: READ of exactly the maximum payload works");
    let data = raw.read_ok(4, 0, MAX_PAYLOAD);
    assert_eq!(sha256_of(&data[..MIB]), sha256_of(&good.data));

    eprintln!(
        "phase: WRITE announcing 4 GiB - 1: the server closes the connection rather than read it"
    );
    raw.request(0, CMD_WRITE, 5, 0, u32::MAX);
    raw.send_lossy(&random_bytes(64 * KIB, 7));
    assert!(
        raw.closed_by_server(CLOSE_WITHIN),
        "a 4 GiB WRITE left the connection open"
    );
    good.assert_still_served(&cluster, "oversized requests");

    eprintln!("phase: an unknown option gets ERR_UNSUP and the handshake goes on");
    let mut raw = RawNbd::options(&addr);
    raw.send_option(99, b"");
    let reply = raw.read_option_reply();
    assert_eq!(
        (reply.option, reply.reply_type),
        (99, REP_ERR_UNSUP),
        "unknown option: {}",
        reply.text()
    );
    raw.go("v1").expect("OPT_GO after an unknown option");
    drop(raw);

    eprintln!("phase: an option announcing 1 MiB of data: ERR_TOO_BIG, then closed");
    let mut raw = RawNbd::options(&addr);
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&(MIB as u32).to_be_bytes());
    raw.send(&header);
    let reply = raw.read_option_reply();
    assert_eq!(
        reply.reply_type,
        REP_ERR_TOO_BIG,
        "1 MiB option: {}",
        reply.text()
    );
    assert!(
        raw.closed_by_server(CLOSE_WITHIN),
        "an oversized option left the connection open"
    );
    good.assert_still_served(&cluster, "oversized option");
    good.session.close();
}

#[test]
fn truncated_requests_and_clients_vanishing_mid_request_leave_no_trace() {
    // Half a header, half a WRITE payload, many READs abandoned in flight, silent connections: nothing written, nothing leaked, lock released.
    let (cluster, dir) = setup();
    let addr = nbd_addr(&cluster, 0);
    let mut good = GoodClient::connect(&cluster, &dir.path().join("data"));

    eprintln!("phase: 40 connections that never say anything are held open meanwhile");
    let silent: Vec<RawNbd> = (0..40).map(|_| RawNbd::connect(&addr)).collect();

    eprintln!("phase: a client that leaves after the greeting, and one after half an option");
    let mut raw = RawNbd::connect(&addr);
    raw.read_greeting();
    drop(raw);
    let mut raw = RawNbd::options(&addr);
    raw.send(&IHAVEOPT.to_be_bytes()[..6]);
    drop(raw);

    eprintln!("phase: a client that sends 10 bytes of a request header and leaves");
    let (mut raw, _, _) = RawNbd::open(&addr, "v1");
    raw.send(&request_header(0, CMD_READ, 1, 0, 4096)[..10]);
    drop(raw);

    eprintln!(
        "phase: a client that sends a 1 MiB WRITE header and 100 KiB of its payload, then leaves"
    );
    let (mut raw, _, _) = RawNbd::open(&addr, "v1");
    raw.request(0, CMD_WRITE, 2, 8 * MIB as u64, MIB as u32);
    raw.send(&vec![0xaa; 100 * KIB]);
    drop(raw);

    eprintln!("phase: a client that leaves with 16 READs of 4 MiB in flight, unread");
    let (mut raw, _, _) = RawNbd::open(&addr, "v1");
    for k in 0..16u64 {
        raw.request(
            0,
            CMD_READ,
            10 + k,
            (k % 8) * OBJECT_SIZE as u64,
            OBJECT_SIZE as u32,
        );
    }
    drop(raw);

    eprintln!("phase: a client that leaves right after a WRITE, before its reply");
    let (mut raw, _, _) = RawNbd::open(&addr, "v1");
    let written = random_bytes(64 * KIB, 9);
    raw.request(0, CMD_WRITE, 30, 20 * MIB as u64, written.len() as u32);
    raw.send(&written);
    drop(raw);

    good.assert_still_served(&cluster, "truncated requests and vanished clients");
    eprintln!(
        "phase: the truncated WRITE wrote nothing; the complete one is all there or not at all"
    );
    assert_eq!(
        good.session.read_sha(8 * MIB as u64, MIB),
        sha256_of(&vec![0u8; MIB]),
        "a truncated WRITE wrote data"
    );
    let complete = good.session.read_sha(20 * MIB as u64, written.len());
    assert!(
        complete == sha256_of(&written) || complete == sha256_of(&vec![0u8; written.len()]),
        "a WRITE whose client vanished was applied partially"
    );

    eprintln!("phase: the silent connections close; the good client leaves; the VDI lock must be released (no connection leaked)");
    drop(silent);
    good.session.close();
    assert!(
        wait_unlocked(&cluster, "v1", Duration::from_secs(20)),
        "v1 still locked after every client left: {:?}",
        locks(&cluster)
    );
    assert_all_nodes_alive_without_panic(&cluster);
    qemu_io_ok(&cluster.nbd_url(1, "v1"), false, &["read -P 0x5c 32M 64k"]);
}

//! The server driven by real NBD clients (qemu-io, nbdinfo, nbdsh/libnbd, nbdcopy,
//! fio) over TCP. A missing client fails the test; nothing is skipped.

mod common;

use bytes::Bytes;
use common::{run_ok, run_tool, TestServer};
use nbd::BlockDevice;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_back_patterns() {
    // Plain data path with qemu's client: write, FUA write, zero, discard, read back.
    let server = TestServer::start().await;
    let uri = server.uri("disk");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -f -P 0xcd 1M 64k",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "discard 128k 64k",
            "-c",
            "read -P 0 128k 64k",
            "-c",
            "aio_write -P 0x11 4M 256k",
            "-c",
            "aio_write -P 0x22 5M 256k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x11 4M 256k",
            "-c",
            "read -P 0x22 5M 256k",
            "-c",
            "flush",
        ],
    )
    .await;
    assert!(!out.contains("fail"), "qemu-io reported a failure:\n{out}");
    let disk = &server.exports.disk;
    assert_eq!(disk.snapshot(0, 64 << 10), vec![0xab; 64 << 10]);
    assert_eq!(disk.snapshot(64 << 10, 128 << 10), vec![0; 128 << 10]);
    assert_eq!(disk.snapshot(192 << 10, 1024), vec![0xab; 1024]);
    assert_eq!(disk.snapshot(1 << 20, 64 << 10), vec![0xcd; 64 << 10]);
    assert!(
        disk.stats().fua_writes >= 1,
        "the FUA write reached the device with fua set"
    );
    assert!(disk.stats().flushes >= 1, "FLUSH reached the device");
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_sees_read_only_export_and_unknown_export_fails() {
    // qemu refuses to write a read-only export and cannot open an unknown one.
    let server = TestServer::start().await;
    let out = run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            &server.uri("ro"),
            "-c",
            "read -P 0x5a 0 1M",
        ],
    )
    .await;
    assert!(!out.contains("fail"), "{out}");
    let write = run_tool(
        "qemu-io",
        &["-f", "raw", &server.uri("ro"), "-c", "write 0 4k"],
    )
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&write.stdout),
        String::from_utf8_lossy(&write.stderr)
    );
    assert!(
        !write.status.success() || text.contains("ermission") || text.contains("read-only"),
        "{text}"
    );
    let unknown = run_tool(
        "qemu-io",
        &["-f", "raw", &server.uri("nosuch"), "-c", "read 0 4k"],
    )
    .await;
    assert!(
        !unknown.status.success(),
        "opening an unknown export must fail"
    );
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_answers_capabilities() {
    // LIST with descriptions, INFO details, and the transmission flags as nbdinfo reads them.
    let server = TestServer::start().await;
    let base = format!("nbd://127.0.0.1:{}", server.addr.port());
    let list = run_ok("nbdinfo", &["--list", &base]).await;
    for expected in [
        "export=\"disk\"",
        "test disk",
        "export=\"aligned\"",
        "block_size_minimum: 512",
        "export=\"ro\"",
    ] {
        assert!(
            list.contains(expected),
            "{expected:?} missing from:\n{list}"
        );
    }
    assert!(
        !list.contains("refused"),
        "refused exports are not listed:\n{list}"
    );
    for can in [
        "flush",
        "fua",
        "trim",
        "zero",
        "multi-conn",
        "fast-zero",
        "df",
        "cache",
    ] {
        let status = run_tool("nbdinfo", &["--can", can, &server.uri("disk")])
            .await
            .status;
        assert_eq!(status.code(), Some(0), "nbdinfo --can {can}");
    }
    for cannot in ["trim", "zero"] {
        let status = run_tool("nbdinfo", &["--can", cannot, &server.uri("ro")])
            .await
            .status;
        assert_eq!(
            status.code(),
            Some(2),
            "read-only export: nbdinfo --can {cannot}"
        );
    }
    let status = run_tool("nbdinfo", &["--is", "read-only", &server.uri("ro")])
        .await
        .status;
    assert_eq!(status.code(), Some(0), "nbdinfo --is read-only");
    let size = run_ok("nbdinfo", &["--size", &server.uri("aligned")]).await;
    assert_eq!(size.trim(), (16u64 << 20).to_string());
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_reports_holes_for_unwritten_ranges() {
    // BLOCK_STATUS through libnbd: written chunks are data, the rest holes reading as zero.
    let server = TestServer::start().await;
    let disk = &server.exports.disk;
    disk.write(0, Bytes::from(vec![1u8; 1 << 20]), false)
        .await
        .unwrap();
    disk.write(8 << 20, Bytes::from(vec![2u8; 128 << 10]), false)
        .await
        .unwrap();
    let map = run_ok("nbdinfo", &["--map", &server.uri("disk")]).await;
    let rows: Vec<Vec<String>> = map
        .lines()
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect();
    let expected = [
        ["0", "1048576", "0", "data"],
        ["1048576", "7340032", "3", "hole,zero"],
        ["8388608", "131072", "0", "data"],
        ["8519680", "58589184", "3", "hole,zero"],
    ];
    assert_eq!(rows.len(), expected.len(), "map:\n{map}");
    for (row, want) in rows.iter().zip(expected) {
        assert_eq!(row, &want.map(String::from).to_vec(), "map:\n{map}");
    }
    server.assert_devices_closed().await;
}

/// libnbd (through nbdsh) in non-strict mode, so that it sends what a careless or
/// hostile client would.
const NBDSH_SCRIPT: &str = r#"
import errno, nbd

def expect_error(what, code, fn):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == code, "%s: got %s, want %s" % (what, e, errno.errorcode[code])
    else:
        raise AssertionError("%s: no error" % what)

def connect(export, strict=False):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.add_meta_context("base:allocation")
    h.connect_uri(BASE + "/" + export)
    return h

def status(h, count, offset):
    found = []
    h.block_status(count, offset, lambda ctx, off, entries, err: found.extend(entries) or 0)
    return found

h = connect("disk")
size = h.get_size()
assert h.can_meta_context("base:allocation")

# Past the end: EINVAL for read, trim and block status, ENOSPC for writes.
expect_error("read past end", errno.EINVAL, lambda: h.pread(4096, size - 512))
expect_error("write past end", errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size - 512))
expect_error("zero past end", errno.ENOSPC, lambda: h.zero(4096, size - 512))
expect_error("trim past end", errno.EINVAL, lambda: h.trim(4096, size - 512))
expect_error("status past end", errno.EINVAL, lambda: status(h, 4096, size))
expect_error("read at huge offset", errno.EINVAL, lambda: h.pread(512, 2**64 - 256))

# Zero-length requests succeed without effect.
assert h.pread(0, 0) == b""
h.pwrite(b"", 4096)
h.trim(0, 4096)
h.zero(0, 4096)
h.cache(0, 4096)

# TRIM then read: zeros.
h.pwrite(b"\xaa" * 65536, 1 << 20)
h.trim(65536, 1 << 20)
assert h.pread(65536, 1 << 20) == bytes(65536)

# WRITE_ZEROES with NO_HOLE stays allocated and reads zero; without it a hole appears.
h.pwrite(b"\xbb" * 131072, 2 << 20)
h.zero(65536, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, (2 << 20) + 65536)
assert h.pread(131072, 2 << 20) == bytes(131072)
assert status(h, 131072, 2 << 20) == [65536, nbd.STATE_ZERO, 65536, nbd.STATE_HOLE | nbd.STATE_ZERO], status(h, 131072, 2 << 20)
assert status(h, 131072, 2 << 20)[:2] == [65536, nbd.STATE_ZERO]
one = []
h.block_status(1 << 20, 0, lambda ctx, off, entries, err: one.extend(entries) or 0, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 2, one

# FUA write, fast zero, flush.
h.pwrite(b"\xcc" * 4096, 3 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 3 << 20) == b"\xcc" * 4096
h.zero(4096, 3 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.flush()

# Unknown command flags and a DF read.
expect_error("read with NO_HOLE", errno.EINVAL, lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
assert h.pread(65536, 3 << 20, nbd.CMD_FLAG_DF) == bytes(65536)
h.shutdown()

# Minimum block size 512: misaligned offsets and lengths are refused.
h = connect("aligned")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
expect_error("misaligned read offset", errno.EINVAL, lambda: h.pread(512, 1))
expect_error("misaligned read length", errno.EINVAL, lambda: h.pread(100, 0))
expect_error("misaligned write", errno.EINVAL, lambda: h.pwrite(b"y" * 100, 512))
expect_error("misaligned trim", errno.EINVAL, lambda: h.trim(512, 256))
h.pwrite(b"y" * 512, 512)
assert h.pread(512, 512) == b"y" * 512
h.shutdown()

# Read-only export: writes get EPERM.
h = connect("ro")
assert h.is_read_only()
expect_error("write to read-only", errno.EPERM, lambda: h.pwrite(b"z" * 512, 0))
expect_error("trim on read-only", errno.EPERM, lambda: h.trim(512, 0))
assert h.pread(512, 0) == b"\x5a" * 512
h.shutdown()

# Unknown and refused exports fail at GO.
for export in ["nosuch", "refused"]:
    try:
        connect(export)
    except nbd.Error as e:
        pass
    else:
        raise AssertionError("connecting to %s succeeded" % export)

# 64 concurrent reads complete out of order (the slow export answers low offsets last).
h = connect("slow", strict=True)
h.pwrite(bytes(range(256)) * 1024, 0)
order, buffers = [], []
for i in range(64):
    buf = nbd.Buffer(4096)
    h.aio_pread(buf, i * 4096, completion=lambda err, i=i: order.append(i) or 1)
    buffers.append(buf)
while len(order) < 64:
    h.poll(-1)
assert sorted(order) == list(range(64)), order
assert order != sorted(order), "replies came back in request order: %s" % order
for i, buf in enumerate(buffers):
    assert buf.to_bytearray() == bytes(range(256)) * 16, "data of read %d" % i
h.shutdown()
print("nbdsh script done")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_script_covers_edge_cases_and_out_of_order_replies() {
    // Edge cases a careless client can send, and concurrency seen from libnbd.
    let server = TestServer::start().await;
    let script = format!(
        "BASE = 'nbd://127.0.0.1:{}'\n{NBDSH_SCRIPT}",
        server.addr.port()
    );
    let out = run_ok("nbdsh", &["-n", "-c", &script]).await;
    assert!(out.contains("nbdsh script done"), "{out}");
    let disk = server.exports.disk.stats();
    assert!(
        disk.fua_writes >= 1,
        "FUA write reached the device with fua set: {disk:?}"
    );
    assert!(disk.flushes >= 1, "{disk:?}");
    assert_eq!(
        server.exports.ro.stats().writes,
        1,
        "only the fill write reached the read-only export"
    );
    server.assert_devices_closed().await;
}

/// A structured READ of a partly written range, through libnbd: `pread` reassembles
/// the chunks; `pread_structured` shows the unwritten part arriving as OFFSET_HOLE.
const NBDSH_HOLES_SCRIPT: &str = r#"
import nbd

def chunks_of(h, count, offset, flags=0):
    seen = []
    def chunk(subbuf, off, status, error):
        seen.append((off, len(subbuf), status))
        return 0
    data = h.pread_structured(count, offset, chunk, flags)
    return data, sorted(seen)

h = nbd.NBD()
h.connect_uri(BASE + "/disk")
assert h.get_structured_replies_negotiated()
assert h.can_df()

# [0, 64K) and [192K, 256K) written, [64K, 192K) never written.
h.pwrite(b"\x11" * 65536, 0)
h.pwrite(b"\x22" * 65536, 196608)
expected = b"\x11" * 65536 + bytes(131072) + b"\x22" * 65536
assert h.pread(262144, 0) == expected

data, seen = chunks_of(h, 262144, 0)
assert data == expected
assert seen == [
    (0, 65536, nbd.READ_DATA),
    (65536, 131072, nbd.READ_HOLE),
    (196608, 65536, nbd.READ_DATA),
], seen

# A read entirely inside the unwritten range: one hole.
data, seen = chunks_of(h, 65536, 98304)
assert data == bytes(65536)
assert seen == [(98304, 65536, nbd.READ_HOLE)], seen

# DF: a single data chunk, zeros included.
data, seen = chunks_of(h, 262144, 0, nbd.CMD_FLAG_DF)
assert data == expected
assert seen == [(0, 262144, nbd.READ_DATA)], seen

# Short zero runs stay data; zeros written as data still read back as a hole.
h.pwrite(b"\x33" * 512 + bytes(2048) + b"\x33" * 512, 1 << 20)
data, seen = chunks_of(h, 3072, 1 << 20)
assert data == b"\x33" * 512 + bytes(2048) + b"\x33" * 512
assert seen == [(1 << 20, 3072, nbd.READ_DATA)], seen
h.shutdown()

# Minimum block 512: a read not aligned to 4 KiB still gets a hole, and every
# chunk boundary is a multiple of 512.
h = nbd.NBD()
h.connect_uri(BASE + "/aligned")
h.pwrite(b"\x44" * 512, 512)
data, seen = chunks_of(h, 16384, 512)
assert data == b"\x44" * 512 + bytes(15872)
assert [s for (_, _, s) in seen] == [nbd.READ_DATA, nbd.READ_HOLE], seen
assert seen[0] == (512, 3584, nbd.READ_DATA), seen
assert seen[1] == (4096, 12800, nbd.READ_HOLE), seen
h.shutdown()
print("nbdsh holes script done")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_structured_read_reports_unwritten_ranges_as_holes() {
    // OFFSET_HOLE chunks seen from libnbd, and the bytes it reassembles from them.
    let server = TestServer::start().await;
    let script = format!(
        "BASE = 'nbd://127.0.0.1:{}'\n{NBDSH_HOLES_SCRIPT}",
        server.addr.port()
    );
    let out = run_ok("nbdsh", &["-n", "-c", &script]).await;
    assert!(out.contains("nbdsh holes script done"), "{out}");
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_and_fio_verify_data_through_many_requests() {
    // Bulk copy (multi-conn, many requests in flight) and fio's own verification.
    let server = TestServer::start().await;
    let pattern: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    server
        .exports
        .aligned
        .write(0, Bytes::from(pattern.clone()), false)
        .await
        .unwrap();
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            &server.uri("aligned"),
            &server.uri("disk"),
        ],
    )
    .await;
    assert_eq!(server.exports.disk.snapshot(0, 8 << 20), pattern);
    assert_eq!(
        server.exports.disk.snapshot(8 << 20, 8 << 20),
        vec![0; 8 << 20]
    );

    let uri_option = format!("--uri={}", server.uri("disk"));
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri_option,
            "--rw=randwrite",
            "--bs=16k",
            "--size=16m",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    )
    .await;
    assert!(!out.contains("verify: bad"), "{out}");
    server.assert_devices_closed().await;
}

//! Protocol abuse on raw TCP sockets: garbage, bad magic, oversize lengths,
//! truncated requests, limits. After each, the server must still serve a real client
//! (qemu-io) and must not leak an open device.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{run_ok, RawClient, TestServer};
use nbd::consts::*;
use nbd::{BlockDevice, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A well-behaved client still gets served.
async fn assert_still_serves(server: &TestServer) {
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &server.uri("disk"),
            "-c",
            "write -P 0x77 32M 64k",
            "-c",
            "read -P 0x77 32M 64k",
        ],
    )
    .await;
    assert!(!out.contains("fail"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_bad_magic_during_handshake_close_the_connection() {
    // Random bytes instead of client flags, then bad option magic, then a bad option length.
    let server = TestServer::start().await;

    let mut client = RawClient::connect(server.addr).await;
    client.send(&[0xde; 300]).await;
    client.expect_closed().await;

    let mut client = RawClient::connect(server.addr).await;
    client.greet().await;
    client.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await;
    client.expect_closed().await;

    let mut client = RawClient::connect(server.addr).await;
    client.greet().await;
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    client.send(&header).await;
    let reply = client.option_reply().await;
    assert_eq!(reply.reply_type, REP_ERR_TOO_BIG);
    client.expect_closed().await;

    assert_still_serves(&server).await;
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_get_the_replies_the_protocol_asks_for() {
    // Unknown options and STARTTLS get ERR_UNSUP; malformed GO gets ERR_INVALID;
    // unknown export ERR_UNKNOWN; refused export ERR_POLICY with its message;
    // BLOCK_STATUS contexts need structured replies first.
    let server = TestServer::start().await;
    let mut client = RawClient::connect(server.addr).await;
    client.greet().await;
    for option in [OPT_STARTTLS, 4, 11, 0xdead] {
        client.send_option(option, b"ignored data").await;
        let reply = client.option_reply().await;
        assert_eq!((reply.option, reply.reply_type), (option, REP_ERR_UNSUP));
    }
    client.send_option(OPT_GO, &[0, 0, 0, 9, b'd']).await;
    assert_eq!(client.option_reply().await.reply_type, REP_ERR_INVALID);
    client.send_option(OPT_LIST, b"x").await;
    assert_eq!(client.option_reply().await.reply_type, REP_ERR_INVALID);
    client.send_option(OPT_INFO, b"\0\0\0\x06nosuch\0\0").await;
    assert_eq!(client.option_reply().await.reply_type, REP_ERR_UNKNOWN);
    client.send_option(OPT_GO, b"\0\0\0\x07refused\0\0").await;
    let reply = client.option_reply().await;
    assert_eq!(reply.reply_type, REP_ERR_POLICY);
    assert_eq!(reply.data, b"export under maintenance");
    let meta = b"\0\0\0\x04disk\0\0\0\x01\0\0\0\x0fbase:allocation";
    client.send_option(OPT_SET_META_CONTEXT, meta).await;
    assert_eq!(client.option_reply().await.reply_type, REP_ERR_INVALID);
    client.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(client.option_reply().await.reply_type, REP_ACK);
    client.send_option(OPT_SET_META_CONTEXT, meta).await;
    let reply = client.option_reply().await;
    assert_eq!(reply.reply_type, REP_META_CONTEXT);
    assert_eq!(&reply.data[4..], b"base:allocation");
    assert_eq!(client.option_reply().await.reply_type, REP_ACK);
    client
        .send_option(OPT_INFO, b"\0\0\0\x04disk\0\x01\0\x01")
        .await;
    let mut infos = Vec::new();
    loop {
        let reply = client.option_reply().await;
        if reply.reply_type == REP_ACK {
            break;
        }
        assert_eq!(reply.reply_type, REP_INFO);
        infos.push(u16::from_be_bytes([reply.data[0], reply.data[1]]));
    }
    infos.sort_unstable();
    assert_eq!(infos, vec![INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE]);
    client.send_option(OPT_ABORT, &[]).await;
    assert_eq!(client.option_reply().await.reply_type, REP_ACK);
    client.expect_closed().await;
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_with_unknown_export_closes() {
    // NBD_OPT_EXPORT_NAME cannot return an error: the server must hang up.
    let server = TestServer::start().await;
    let mut client = RawClient::connect(server.addr).await;
    client.greet().await;
    client.send_option(OPT_EXPORT_NAME, b"nosuch").await;
    client.expect_closed().await;

    let mut client = RawClient::connect(server.addr).await;
    client.greet().await;
    client.send_option(OPT_EXPORT_NAME, b"disk").await;
    let mut reply = [0u8; 10];
    tokio::io::AsyncReadExt::read_exact(&mut client.stream, &mut reply)
        .await
        .unwrap();
    assert_eq!(
        u64::from_be_bytes(reply[0..8].try_into().unwrap()),
        64 << 20
    );
    client.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(client.simple_reply().await, (0, 1));
    drop(client);
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_and_unknown_commands() {
    // Unknown command -> EINVAL (simple and structured); bad magic closes.
    let server = TestServer::start().await;
    let mut client = RawClient::connect(server.addr).await;
    client.go("disk", false).await;
    client.request(42, 0, 7, 0, 0, &[]).await;
    assert_eq!(client.simple_reply().await, (22, 7));
    client
        .request(CMD_READ, 0, 8, (64 << 20) - 10, 20, &[])
        .await;
    assert_eq!(client.simple_reply().await, (22, 8));
    client.send(&[0x55; 28]).await;
    client.expect_closed().await;

    let mut client = RawClient::connect(server.addr).await;
    client.go("disk", true).await;
    client
        .request(CMD_READ, 0, 9, (64 << 20) - 10, 20, &[])
        .await;
    let (magic, flags, chunk_type, cookie, payload) = client.any_reply().await;
    assert_eq!(
        (magic, flags, chunk_type, cookie),
        (
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            u32::from(REPLY_TYPE_ERROR),
            9
        )
    );
    assert_eq!(&payload[0..4], &22u32.to_be_bytes());
    client.request(CMD_BLOCK_STATUS, 0, 10, 0, 4096, &[]).await;
    let (_, _, error, cookie, payload) = client.any_reply().await;
    let errno = if payload.len() >= 4 {
        u32::from_be_bytes(payload[0..4].try_into().unwrap())
    } else {
        error
    };
    assert_eq!(
        (errno, cookie),
        (22, 10),
        "BLOCK_STATUS without a selected context"
    );
    client.request(CMD_DISC, 0, 11, 0, 0, &[]).await;
    client.expect_closed().await;

    assert_still_serves(&server).await;
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_writes_are_discarded_or_close_the_connection() {
    // A WRITE above the maximum payload gets EINVAL with its payload skipped; an
    // absurd one closes the connection.
    let server = TestServer::start_with(ServerConfig {
        max_payload: 64 << 10,
        ..ServerConfig::default()
    })
    .await;
    let mut client = RawClient::connect(server.addr).await;
    client.go("disk", false).await;
    client
        .request(CMD_WRITE, 0, 1, 0, 128 << 10, &vec![0xee; 128 << 10])
        .await;
    assert_eq!(client.simple_reply().await, (22, 1));
    client.request(CMD_READ, 0, 2, 0, 128 << 10, &[]).await;
    assert_eq!(
        client.simple_reply().await,
        (22, 2),
        "READ above the maximum payload"
    );
    client.request(CMD_WRITE, 0, 3, 0, 4, b"abcd").await;
    assert_eq!(
        client.simple_reply().await,
        (0, 3),
        "stream still in sync after the skipped payload"
    );
    assert_eq!(server.exports.disk.snapshot(0, 5), b"abcd\0");
    client
        .request(CMD_WRITE, 0, 4, 0, 0xffff_ff00, &[1, 2, 3])
        .await;
    client.expect_closed().await;
    assert_still_serves(&server).await;
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_requests_do_not_leak_devices() {
    // Clients vanishing mid-header, mid-payload and with requests in flight.
    let server = TestServer::start().await;
    let mut client = RawClient::connect(server.addr).await;
    client.go("disk", true).await;
    client.send(&REQUEST_MAGIC.to_be_bytes()).await;
    drop(client);

    let mut client = RawClient::connect(server.addr).await;
    client.go("disk", false).await;
    client
        .request(CMD_WRITE, 0, 1, 0, 1 << 20, &[7; 1000])
        .await;
    drop(client);

    let mut client = RawClient::connect(server.addr).await;
    client.go("slow", true).await;
    for cookie in 0..16 {
        client.request(CMD_READ, 0, cookie, 0, 4096, &[]).await;
    }
    client.stream.shutdown().await.unwrap();
    drop(client);

    let mut client = RawClient::connect(server.addr).await;
    client.greet().await;
    client.send(&IHAVEOPT.to_be_bytes()[..5]).await;
    drop(client);

    server.assert_devices_closed().await;
    assert_eq!(
        server.exports.disk.snapshot(0, 1000),
        vec![0; 1000],
        "a truncated write never reaches the device"
    );
    assert_still_serves(&server).await;
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_waits_for_requests_in_flight() {
    // DISC right after slow requests: every reply still arrives, then the close.
    let server = TestServer::start().await;
    let mut client = RawClient::connect(server.addr).await;
    client.go("slow", true).await;
    client
        .request(CMD_WRITE, CMD_FLAG_FUA, 1, 0, 4096, &[9; 4096])
        .await;
    client.request(CMD_READ, 0, 2, 4096, 4096, &[]).await;
    client.request(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    client.request(CMD_DISC, 0, 4, 0, 0, &[]).await;
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let (magic, flags, error_or_type, cookie, _) = client.any_reply().await;
        if magic == SIMPLE_REPLY_MAGIC {
            assert_eq!(error_or_type, 0);
        } else {
            // The 4 KiB read of a never-written block is one hole chunk.
            assert_eq!(error_or_type, u32::from(REPLY_TYPE_OFFSET_HOLE));
            assert_eq!(flags, REPLY_FLAG_DONE);
        }
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, vec![1, 2, 3]);
    client.expect_closed().await;
    assert_eq!(server.exports.slow.snapshot(0, 4096), vec![9; 4096]);
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_read_splits_into_data_and_hole_chunks() {
    // On the wire: data, hole, data in order, only the last chunk DONE; with DF,
    // one OFFSET_DATA chunk; simple replies carry the bytes as before.
    let server = TestServer::start().await;
    let disk = &server.exports.disk;
    disk.write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    disk.write(12288, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    let mut client = RawClient::connect(server.addr).await;
    client.go("disk", true).await;
    client.request(CMD_READ, 0, 1, 0, 16384, &[]).await;
    let mut chunks = Vec::new();
    for _ in 0..3 {
        let (magic, flags, chunk_type, cookie, payload) = client.any_reply().await;
        assert_eq!((magic, cookie), (STRUCTURED_REPLY_MAGIC, 1));
        chunks.push((flags, chunk_type as u16, payload));
    }
    let expected_data = |at: u64, fill: u8| [&at.to_be_bytes()[..], &[fill; 4096]].concat();
    assert_eq!(chunks[0], (0, REPLY_TYPE_OFFSET_DATA, expected_data(0, 1)));
    assert_eq!(
        chunks[1],
        (
            0,
            REPLY_TYPE_OFFSET_HOLE,
            [&4096u64.to_be_bytes()[..], &8192u32.to_be_bytes()].concat()
        )
    );
    assert_eq!(
        chunks[2],
        (
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            expected_data(12288, 2)
        )
    );
    client
        .request(CMD_READ, CMD_FLAG_DF, 2, 0, 16384, &[])
        .await;
    let (_, flags, chunk_type, cookie, payload) = client.any_reply().await;
    assert_eq!(
        (flags, chunk_type, cookie),
        (REPLY_FLAG_DONE, u32::from(REPLY_TYPE_OFFSET_DATA), 2)
    );
    assert_eq!(payload.len(), 8 + 16384);
    assert_eq!(&payload[8 + 4096..8 + 12288], &[0u8; 8192][..]);
    client.request(CMD_DISC, 0, 3, 0, 0, &[]).await;
    client.expect_closed().await;

    let mut client = RawClient::connect(server.addr).await;
    client.go("disk", false).await;
    client.request(CMD_READ, 0, 4, 0, 16384, &[]).await;
    assert_eq!(client.simple_reply().await, (0, 4));
    let mut data = vec![0u8; 16384];
    client.stream.read_exact(&mut data).await.unwrap();
    assert_eq!(data, disk.snapshot(0, 16384));
    client.request(CMD_DISC, 0, 5, 0, 0, &[]).await;
    client.expect_closed().await;
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed() {
    // max_connections = 2: a third connection is closed at once; freed slots are reused.
    let server = TestServer::start_with(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    })
    .await;
    let mut first = RawClient::connect(server.addr).await;
    first.go("disk", false).await;
    let mut second = RawClient::connect(server.addr).await;
    second.greet().await;
    let mut third = RawClient::connect(server.addr).await;
    third.expect_closed().await;
    first.request(CMD_DISC, 0, 1, 0, 0, &[]).await;
    first.expect_closed().await;
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let output = common::run_tool(
            "qemu-io",
            &["-f", "raw", &server.uri("disk"), "-c", "read 0 4k"],
        )
        .await;
        if output.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.assert_devices_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_and_closes_devices() {
    // serve() returns on shutdown after answering requests in flight.
    let server = TestServer::start().await;
    let mut idle = RawClient::connect(server.addr).await;
    idle.greet().await;
    let mut busy = RawClient::connect(server.addr).await;
    busy.go("slow", false).await;
    busy.request(CMD_READ, 0, 5, 0, 4096, &[]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let reader = tokio::spawn(async move {
        let reply = busy.simple_reply().await;
        busy.expect_closed().await;
        reply
    });
    let exports = server.stop().await;
    assert_eq!(reader.await.unwrap(), (0, 5));
    idle.expect_closed().await;
    for device in exports.all() {
        let stats = device.stats();
        assert_eq!(stats.opens, stats.closes, "{stats:?}");
    }
}

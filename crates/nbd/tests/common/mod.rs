//! Shared helpers of the integration tests: a server on 127.0.0.1:0 over memory
//! exports, a runner for real client tools that fails loudly when one is missing,
//! and a minimal raw NBD client for protocol-level abuse.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nbd::consts::*;
use nbd::memdev::{MemDevice, MemProvider};
use nbd::request::RequestHeader;
use nbd::{serve, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The exports every test server offers.
pub struct Exports {
    /// 64 MiB, writable, minimum block 1.
    pub disk: Arc<MemDevice>,
    /// 16 MiB, minimum block 512.
    pub aligned: Arc<MemDevice>,
    /// 1 MiB, read-only, filled with 0x5a.
    pub ro: Arc<MemDevice>,
    /// 1 MiB; requests at offset `o` wait `(64 - o/4096) * 3` ms.
    pub slow: Arc<MemDevice>,
}

impl Exports {
    pub fn all(&self) -> [&Arc<MemDevice>; 4] {
        [&self.disk, &self.aligned, &self.ro, &self.slow]
    }
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub exports: Exports,
    pub provider: Arc<MemProvider>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig) -> Self {
        let provider = Arc::new(MemProvider::new());
        let disk = provider.add("disk", "test disk", MemDevice::new(64 << 20));
        let aligned = provider.add(
            "aligned",
            "512-byte blocks",
            MemDevice::new(16 << 20).with_min_block_size(512),
        );
        let ro_device = MemDevice::new(1 << 20);
        nbd::BlockDevice::write(
            &ro_device,
            0,
            bytes::Bytes::from(vec![0x5a; 1 << 20]),
            false,
        )
        .await
        .expect("fill read-only export");
        let ro = provider.add("ro", "read-only", ro_device.read_only());
        let slow = provider.add(
            "slow",
            "slow at low offsets",
            MemDevice::new(1 << 20).with_delay(|offset| {
                Duration::from_millis(64u64.saturating_sub(offset / 4096) * 3)
            }),
        );
        provider.add_refused("refused", "export under maintenance");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(serve(listener, provider.clone(), config, shutdown));
        TestServer {
            addr,
            exports: Exports {
                disk,
                aligned,
                ro,
                slow,
            },
            provider,
            stop,
            task,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.addr.port(), export)
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(self) -> Exports {
        self.stop.send(true).expect("server still running");
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task")
            .expect("serve result");
        self.exports
    }

    /// Waits until every open of every export has been closed (no leaked device).
    pub async fn assert_devices_closed(&self) {
        for device in self.exports.all() {
            wait_until("every open device closed", || {
                let stats = device.stats();
                stats.opens == stats.closes
            })
            .await;
        }
    }
}

/// Polls `condition` for up to 5 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Runs a client tool with /usr/bin first in PATH. A missing tool fails the test:
/// these tests exist to prove interoperability with real clients.
pub async fn run_tool(program: &str, args: &[&str]) -> Output {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("PATH", path)
        .env("LIBNBD_DEBUG", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "required client tool {program:?} cannot run ({e}); install it with \
                 `apt-get install -y qemu-utils libnbd-bin python3-libnbd fio`"
            )
        });
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 60 s"))
        .expect("wait for tool")
}

/// Runs a tool and fails the test unless it exits 0; returns its stdout.
pub async fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run_tool(program, args).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
}

/// A bare NBD client that can say anything.
pub struct RawClient {
    pub stream: TcpStream,
}

/// One option reply.
#[derive(Debug)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawClient { stream }
    }

    /// Reads the greeting and answers with fixed newstyle + no zeroes.
    pub async fn greet(&mut self) {
        let mut greeting = [0u8; 18];
        self.stream
            .read_exact(&mut greeting)
            .await
            .expect("greeting");
        assert_eq!(&greeting[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([greeting[16], greeting[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        self.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await;
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut message = IHAVEOPT.to_be_bytes().to_vec();
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&(data.len() as u32).to_be_bytes());
        message.extend_from_slice(data);
        self.send(&message).await;
    }

    pub async fn option_reply(&mut self) -> OptionReply {
        let mut header = [0u8; 20];
        self.stream
            .read_exact(&mut header)
            .await
            .expect("option reply header");
        assert_eq!(&header[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let reply_type = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let length = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0u8; length as usize];
        self.stream
            .read_exact(&mut data)
            .await
            .expect("option reply data");
        OptionReply {
            option,
            reply_type,
            data,
        }
    }

    /// Greets, optionally negotiates structured replies, then GO; returns
    /// (size, transmission flags).
    pub async fn go(&mut self, export: &str, structured: bool) -> (u64, u16) {
        self.greet().await;
        if structured {
            self.send_option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.option_reply().await.reply_type, REP_ACK);
        }
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &data).await;
        let mut export_info = None;
        loop {
            let reply = self.option_reply().await;
            match reply.reply_type {
                REP_INFO if reply.data[0..2] == INFO_EXPORT.to_be_bytes() => {
                    let size = u64::from_be_bytes(reply.data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes(reply.data[10..12].try_into().unwrap());
                    export_info = Some((size, flags));
                }
                REP_INFO => {}
                REP_ACK => return export_info.expect("INFO_EXPORT before ACK"),
                other => panic!(
                    "GO failed with reply type {other:#x}: {:?}",
                    String::from_utf8_lossy(&reply.data)
                ),
            }
        }
    }

    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut message = header.encode().to_vec();
        message.extend_from_slice(payload);
        self.send(&message).await;
    }

    /// Reads a simple reply header: (error, cookie).
    pub async fn simple_reply(&mut self) -> (u32, u64) {
        let mut header = [0u8; 16];
        self.stream
            .read_exact(&mut header)
            .await
            .expect("simple reply");
        assert_eq!(
            &header[0..4],
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "simple reply magic"
        );
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        (error, cookie)
    }

    /// Reads one reply of either kind: (magic, flags-or-0, type-or-error, cookie, payload).
    pub async fn any_reply(&mut self) -> (u32, u16, u32, u64, Vec<u8>) {
        let mut magic = [0u8; 4];
        self.stream
            .read_exact(&mut magic)
            .await
            .expect("reply magic");
        let magic = u32::from_be_bytes(magic);
        if magic == SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; 12];
            self.stream
                .read_exact(&mut rest)
                .await
                .expect("simple reply");
            let error = u32::from_be_bytes(rest[0..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
            return (magic, 0, error, cookie, Vec::new());
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
        let mut rest = [0u8; 16];
        self.stream
            .read_exact(&mut rest)
            .await
            .expect("chunk header");
        let flags = u16::from_be_bytes(rest[0..2].try_into().unwrap());
        let chunk_type = u16::from_be_bytes(rest[2..4].try_into().unwrap());
        let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
        let length = u32::from_be_bytes(rest[12..16].try_into().unwrap());
        let mut payload = vec![0u8; length as usize];
        self.stream
            .read_exact(&mut payload)
            .await
            .expect("chunk payload");
        (magic, flags, u32::from(chunk_type), cookie, payload)
    }

    /// Asserts that the server closes the connection within 5 s (after any bytes it
    /// still sends).
    pub async fn expect_closed(&mut self) {
        let mut sink = vec![0u8; 64 * 1024];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "server did not close the connection");
    }
}

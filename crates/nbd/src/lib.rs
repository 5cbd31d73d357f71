//! An NBD (Network Block Device) server library. It serves any [`BlockDevice`]
//! handed out by an [`ExportProvider`] and knows nothing about what stores the data.
//!
//! Protocol support (see the NBD project's `doc/proto.md`):
//! - Handshake: fixed newstyle only, `NO_ZEROES`; options `GO`, `INFO` (replies
//!   `INFO_EXPORT`, `NAME`, `DESCRIPTION`, `BLOCK_SIZE`), `EXPORT_NAME`, `LIST`, `ABORT`,
//!   `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` (`base:allocation`
//!   only); everything else (STARTTLS included) gets `ERR_UNSUP`. Option data longer
//!   than 64 KiB gets `ERR_TOO_BIG` and the connection is closed. The whole handshake
//!   must finish within 30 s.
//! - Transmission: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (`NO_HOLE`, `FAST_ZERO`),
//!   BLOCK_STATUS (`REQ_ONE`), CACHE (validated, no effect), DISC, and `FUA` on every
//!   command. Structured replies when negotiated, simple replies otherwise. A
//!   structured READ reply reports all-zero runs of at least 4 KiB, on 4 KiB
//!   boundaries (or the export's minimum block size if larger), as `OFFSET_HOLE`
//!   chunks and the rest as `OFFSET_DATA` chunks, in order, the last flagged DONE,
//!   at most 64 chunks (smaller holes are then sent as data; see
//!   [`reply::read_chunks`]); with `DF` it is one `OFFSET_DATA` chunk. Errors are an
//!   `ERROR` chunk with a message. Requests run concurrently, replies go out in
//!   completion order.
//! - Validation before the device is called: see [`request::validate`]. A WRITE whose
//!   payload exceeds the maximum payload is read and dropped (EINVAL) up to 64 MiB;
//!   beyond that the connection is closed. Zero-length READ/WRITE/TRIM/WRITE_ZEROES/
//!   CACHE succeed without reaching the device; a zero-length BLOCK_STATUS gets EINVAL
//!   (its reply must describe at least one non-empty extent). A bad request magic
//!   closes the connection.
//!
//! Limits: [`ServerConfig`] bounds connections, requests in flight per connection and
//! the payload size; payload bytes held in flight per connection are bounded too.

pub mod consts;
pub mod device;
mod handshake;
pub mod memdev;
pub mod option;
pub mod reply;
pub mod request;
mod transmission;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

pub use device::{
    BlockDevice, BlockError, ExportInfo, ExportProvider, Extent, NbdErrno, OpenError,
};

use consts::*;

/// Limits of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload (advertised as the maximum block size). Clamped to
    /// 64 KiB..=1 GiB and rounded down to a multiple of each export's minimum block
    /// size. Default 32 MiB.
    pub max_payload: u32,
    /// Requests of one connection executing or waiting to be replied to at once;
    /// the connection stops reading while the limit is reached. Default 64.
    pub max_in_flight_per_conn: usize,
    /// Connections served at once; more are accepted and closed at once.
    /// Default 128.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_payload: 32 * 1024 * 1024,
            max_in_flight_per_conn: 64,
            max_connections: 128,
        }
    }
}

/// Per-connection limits derived from a [`ServerConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_payload: u32,
    pub max_in_flight: usize,
    pub in_flight_bytes: usize,
    pub handshake_timeout: Duration,
}

impl Limits {
    fn new(config: &ServerConfig) -> Self {
        let max_payload = config
            .max_payload
            .clamp(MAX_PAYLOAD_FLOOR_BYTES, MAX_PAYLOAD_CEILING_BYTES);
        Self {
            max_payload,
            max_in_flight: config.max_in_flight_per_conn.max(1),
            in_flight_bytes: IN_FLIGHT_BYTES_MIN.max(2 * max_payload as usize),
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// Resolves once the shutdown flag is true (never, if its sender is gone).
pub(crate) async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Serves NBD on `listener` until `shutdown` becomes true.
///
/// Each connection is served on its own task (TCP_NODELAY set). On shutdown the
/// server stops accepting, connections stop reading requests, finish those in flight
/// and write their replies; connections still busy after 30 s are dropped (their
/// devices are then not closed). Returns
/// once every connection is gone; accept errors (e.g. out of file descriptors) are
/// logged and retried, never returned.
pub async fn serve(
    listener: TcpListener,
    provider: Arc<dyn ExportProvider>,
    cfg: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let limits = Limits::new(&cfg);
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let mut connections: JoinSet<()> = JoinSet::new();
    info!(address = ?listener.local_addr().ok(), "NBD server listening");
    loop {
        while let Some(finished) = connections.try_join_next() {
            log_connection_end(finished);
        }
        let accepted = tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "connection limit reached; closing new connection");
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "TCP_NODELAY not set");
        }
        let (read_half, write_half) = stream.into_split();
        let provider = provider.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("nbd", %peer);
        connections.spawn(
            async move {
                let _slot = slot;
                serve_connection(read_half, write_half, provider, limits, shutdown).await;
            }
            .instrument(span),
        );
    }
    info!(connections = connections.len(), "NBD server shutting down");
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(finished) = connections.join_next().await {
            log_connection_end(finished);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            "connections still busy at shutdown; dropping them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

fn log_connection_end(finished: Result<(), tokio::task::JoinError>) {
    if let Err(e) = finished {
        warn!(error = %e, "connection task failed");
    }
}

/// Runs one connection: handshake, then transmission if the client got that far.
pub(crate) async fn serve_connection<R, W>(
    read_half: R,
    mut write_half: W,
    provider: Arc<dyn ExportProvider>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read_half);
    let handshake = handshake::Handshake {
        reader: &mut reader,
        writer: &mut write_half,
        provider: provider.as_ref(),
        max_payload: limits.max_payload,
        shutdown: shutdown.clone(),
        deadline: Instant::now() + limits.handshake_timeout,
    };
    match handshake.run().await {
        Ok(Some(negotiated)) => {
            transmission::run(reader, write_half, negotiated, limits, shutdown).await
        }
        Ok(None) => debug!("client left during the handshake"),
        Err(e) => debug!(error = %e, "handshake failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memdev::{MemDevice, MemProvider};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(handshake_timeout: Duration) -> Limits {
        Limits {
            handshake_timeout,
            ..Limits::new(&ServerConfig::default())
        }
    }

    #[tokio::test]
    async fn silent_client_is_dropped_at_the_handshake_deadline() {
        // A client that greets nothing must not hold a connection forever.
        let (client, server) = tokio::io::duplex(4096);
        let (read_half, write_half) = tokio::io::split(server);
        let provider = Arc::new(MemProvider::new());
        let (_stop, shutdown) = watch::channel(false);
        let started = Instant::now();
        let connection = serve_connection(
            read_half,
            write_half,
            provider,
            limits(Duration::from_millis(200)),
            shutdown,
        );
        tokio::time::timeout(Duration::from_secs(5), connection)
            .await
            .expect("connection ends");
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(client);
    }

    #[tokio::test]
    async fn connection_over_any_stream_serves_a_read() {
        // The connection code is generic over the stream; drive it through a duplex.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (read_half, write_half) = tokio::io::split(server);
        let provider = Arc::new(MemProvider::new());
        let device = provider.add("d", "", MemDevice::new(1 << 20));
        let (_stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(serve_connection(
            read_half,
            write_half,
            provider,
            limits(HANDSHAKE_TIMEOUT),
            shutdown,
        ));
        let mut greeting = [0u8; 18];
        client.read_exact(&mut greeting).await.unwrap();
        client
            .write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
            .await
            .unwrap();
        let mut option = IHAVEOPT.to_be_bytes().to_vec();
        option.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        option.extend_from_slice(&1u32.to_be_bytes());
        option.push(b'd');
        client.write_all(&option).await.unwrap();
        let mut export = [0u8; 8 + 2 + 124];
        client.read_exact(&mut export).await.unwrap();
        assert_eq!(
            u64::from_be_bytes(export[0..8].try_into().unwrap()),
            1 << 20
        );
        let read = request::RequestHeader {
            flags: 0,
            command: CMD_READ,
            cookie: 3,
            offset: 0,
            length: 8,
        };
        client.write_all(&read.encode()).await.unwrap();
        let mut reply = [0u8; 16 + 8];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[4..16], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
        drop(client);
        task.await.unwrap();
        assert_eq!(device.stats().closes, 1);
    }
}

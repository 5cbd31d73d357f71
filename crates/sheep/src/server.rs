//! The peer protocol server: accepts connections, checks the hello, and runs requests
//! concurrently (bounded per connection), replying out of order.

use crate::dispatch::{dispatch, Outcome};
use crate::node::{check_peer_hello, node_hello, Node};
use client::{read_frame, read_frame_summed, write_frame, FrameReadError, Payload};
use proto::msg::{self, Hello};
use proto::{ErrorCode, Header, Opcode, PeerError};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

/// Requests one connection may have in flight.
const CONN_IN_FLIGHT_MAX: usize = 128;
/// KiB of request payload one connection's running requests may hold.
const CONN_PAYLOAD_KIB_MAX: usize = 64 << 10;
/// Time a new connection has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog.
const CONNECTIONS_MAX: usize = 1024;

/// Accepts connections until shutdown.
pub async fn serve(node: Arc<Node>, listener: TcpListener) {
    let mut shutdown = node.shutdown_signal();
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(node, stream).await {
                        tracing::debug!(%peer, error = %e, "peer connection ended");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(node: Arc<Node>, stream: TcpStream) -> Result<(), FrameReadError> {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut wr = BufWriter::with_capacity(256 << 10, wr);

    let (h, body) = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut rd)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let verdict = if Opcode::try_from(h.opcode) != Ok(Opcode::Hello) {
        Err("the first frame must be a hello".to_string())
    } else {
        msg::decode::<Hello>(&body)
            .map_err(|e| e.to_string())
            .and_then(|peer| check_peer_hello(&peer, node.cluster_stamp()))
    };
    match verdict {
        Ok(()) => {
            let ours = node_hello(node.uuid, node.cluster_stamp());
            write_frame(&mut wr, h.reply(0), &msg::encode(&ours)).await?;
            wr.flush().await?;
        }
        Err(reason) => {
            let reply = h.reply(ErrorCode::ClusterMismatch as u32);
            write_frame(&mut wr, reply, reason.as_bytes()).await?;
            wr.flush().await?;
            return Ok(());
        }
    }

    let (tx, mut rx) = mpsc::channel::<(Header, Vec<u8>)>(CONN_IN_FLIGHT_MAX);
    let writer = tokio::spawn(async move {
        while let Some((h, p)) = rx.recv().await {
            if write_frame(&mut wr, h, &p).await.is_err() {
                return;
            }
            if rx.is_empty() && wr.flush().await.is_err() {
                return;
            }
        }
    });
    let slots = Arc::new(Semaphore::new(CONN_IN_FLIGHT_MAX));
    let payload_budget = Arc::new(Semaphore::new(CONN_PAYLOAD_KIB_MAX));
    let result = loop {
        let (header, payload) = match read_frame_summed(&mut rd).await {
            Ok(f) => f,
            Err(FrameReadError::Closed) => break Ok(()),
            // A frame we cannot decode means we lost the stream's framing: close.
            Err(e) => break Err(e),
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break Ok(());
        };
        // Bytes of payload held by requests of this connection are bounded too: the
        // reader stops until running requests release theirs.
        let kib = (header.payload_len as usize)
            .div_ceil(1024)
            .clamp(1, CONN_PAYLOAD_KIB_MAX) as u32;
        let Ok(bytes_permit) = payload_budget.clone().acquire_many_owned(kib).await else {
            break Ok(());
        };
        let node = node.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = run_request(&node, header, payload).await;
            let _ = tx.send(reply).await;
            drop(permit);
            drop(bytes_permit);
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}

/// Runs one request and builds its reply frame. Every reply carries our epoch (or, for
/// stamp replies, the stamp's). Also used for requests a node sends to itself.
pub async fn run_request(node: &Node, header: Header, payload: Payload) -> (Header, Vec<u8>) {
    let outcome = match Opcode::try_from(header.opcode) {
        Ok(op) => dispatch(node, op, &header, payload).await,
        Err(e) => Err(PeerError::new(ErrorCode::InvalidRequest, e.to_string())),
    };
    let epoch = node.view().epoch();
    match outcome {
        Ok(Outcome {
            payload,
            generation,
            epoch: stamp_epoch,
        }) => {
            let mut h = header.reply(0);
            h.generation = generation;
            h.epoch = stamp_epoch.unwrap_or(epoch);
            (h, payload)
        }
        Err(e) => {
            let mut h = header.reply(e.code as u32);
            h.epoch = epoch;
            (h, e.message.into_bytes())
        }
    }
}

//! The transmission phase of one connection. A reader loop decodes and validates
//! requests and spawns one task per request (at most `max_in_flight` at once, and a
//! bounded number of payload bytes); each task calls the device and hands its reply
//! to a single writer task, which batches replies into vectored writes. Replies go
//! out in completion order. On DISC, EOF, a protocol error or server shutdown the
//! reader stops, in-flight requests finish and their replies are written, and the
//! device is closed once.

use std::io;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::consts::*;
use crate::device::{BlockDevice, BlockError};
use crate::handshake::Negotiated;
use crate::reply::{
    block_status_descriptors, read_chunks, write_all_vectored, Reply, ReplyBatch, ReplyBody,
};
use crate::request::{payload_of, validate, Command, ExportParams, Payload, RequestHeader};
use crate::{wait_shutdown, Limits};

/// A reply on its way to the writer, holding the request's in-flight permits until
/// it has been written.
struct Outgoing {
    reply: Reply,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Why the reader stopped.
enum End {
    Disconnect,
    Shutdown,
    ClientGone,
    WriterGone,
    Protocol(String),
    Io(io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Disconnect => write!(f, "client disconnected (DISC)"),
            End::Shutdown => write!(f, "server shutting down"),
            End::ClientGone => write!(f, "client closed the connection"),
            End::WriterGone => write!(f, "replies can no longer be sent"),
            End::Protocol(what) => write!(f, "protocol error: {what}"),
            End::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        use io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
        if matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe) {
            End::ClientGone
        } else {
            End::Io(e)
        }
    }
}

/// Serves requests until the connection ends, then closes the device.
pub(crate) async fn run<R, W>(
    mut reader: R,
    writer: W,
    negotiated: Negotiated,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Negotiated {
        device,
        export_name,
        params,
    } = negotiated;
    debug!(export = %export_name, size = params.size, structured = params.structured, "transmission");
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer_task = tokio::spawn(write_replies(writer, rx, params.structured));
    let requests = Arc::new(Semaphore::new(limits.max_in_flight));
    let payload_bytes = Arc::new(Semaphore::new(limits.in_flight_bytes));
    let mut tasks: JoinSet<()> = JoinSet::new();

    let end = loop {
        while let Some(finished) = tasks.try_join_next() {
            log_join(finished);
        }
        if tx.is_closed() {
            break End::WriterGone;
        }
        let mut wire = [0u8; REQUEST_HEADER_BYTES];
        let read = tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => break End::Shutdown,
            read = reader.read_exact(&mut wire) => read,
        };
        if let Err(e) = read {
            break End::from(e);
        }
        let header = match RequestHeader::decode(&wire) {
            Ok(header) => header,
            Err(e) => break End::Protocol(e.to_string()),
        };
        let payload = payload_of(&header, params.block_sizes.maximum);
        if payload == Payload::Close {
            break End::Protocol(format!("WRITE of {} bytes", header.length));
        }
        let command = validate(&header, &params);
        if command == Ok(Command::Disc) {
            break End::Disconnect;
        }
        let data_bytes = match command {
            Ok(Command::Read { len, .. }) | Ok(Command::Write { len, .. }) => len,
            _ => 0,
        };
        // Both semaphores live as long as this function and are never closed.
        let (Ok(request_permit), Ok(bytes_permit)) = (
            requests.clone().acquire_owned().await,
            payload_bytes.clone().acquire_many_owned(data_bytes).await,
        ) else {
            break End::Protocol("in-flight limits closed".into());
        };
        let permits = (request_permit, bytes_permit);
        let is_read = header.command == CMD_READ;
        let command = match command {
            Ok(command) => command,
            Err(errno) => {
                if let Payload::Read(n) | Payload::Discard(n) = payload {
                    if let Err(e) = discard(&mut reader, n).await {
                        break End::from(e);
                    }
                }
                let message = format!(
                    "request refused: command {}, flags {:#x}, offset {}, length {}",
                    header.command, header.flags, header.offset, header.length
                );
                let body = ReplyBody::Error { errno, message };
                let reply = Reply {
                    cookie: header.cookie,
                    is_read,
                    body,
                };
                let _ = tx.send(Outgoing { reply, permits });
                continue;
            }
        };
        let data = match payload {
            Payload::Read(n) => match read_payload(&mut reader, n).await {
                Ok(data) => data,
                Err(e) => break End::from(e),
            },
            _ => Bytes::new(),
        };
        let device = device.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let body = execute(device.as_ref(), command, data, &params).await;
            let reply = Reply {
                cookie: header.cookie,
                is_read,
                body,
            };
            // The writer is gone only if the client is; the reply has no reader then.
            let _ = tx.send(Outgoing { reply, permits });
        });
    };
    match &end {
        End::Disconnect | End::ClientGone | End::Shutdown => debug!(%end, "transmission ends"),
        End::WriterGone | End::Protocol(_) | End::Io(_) => warn!(%end, "transmission ends"),
    }
    drop(reader);
    // The device is closed only after every request that reached it has returned.
    while let Some(finished) = tasks.join_next().await {
        log_join(finished);
    }
    drop(tx);
    let mut writer_task = writer_task;
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut writer_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => debug!(error = %e, "reply writer failed"),
        Ok(Err(e)) => warn!(error = %e, "reply writer panicked"),
        Err(_) => {
            // The client stopped reading its replies: give up on them.
            warn!("replies not written within the drain timeout");
            writer_task.abort();
        }
    }
    device.close().await;
}

fn log_join(finished: Result<(), tokio::task::JoinError>) {
    if let Err(e) = finished {
        warn!(error = %e, "request task failed");
    }
}

/// Reads a WRITE payload without zero-filling it first.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> io::Result<Bytes> {
    let len = len as usize;
    let mut data = BytesMut::with_capacity(len);
    while data.len() < len {
        let want = len - data.len();
        if reader.read_buf(&mut (&mut data).limit(want)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data.freeze())
}

/// Skips the payload of a WRITE that is answered with an error.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> io::Result<()> {
    let skipped = tokio::io::copy(&mut reader.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if skipped < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Runs a validated command on the device. Zero-length commands succeed without
/// reaching it. With structured replies, READ data is split into data and hole
/// chunks here, on the request's task rather than the connection's writer.
async fn execute(
    device: &dyn BlockDevice,
    command: Command,
    data: Bytes,
    params: &ExportParams,
) -> ReplyBody {
    let result = match command {
        Command::Read { offset, len: 0, .. } => {
            return ReplyBody::Data {
                offset,
                data: Vec::new(),
                chunks: Vec::new(),
            }
        }
        Command::Read { offset, len, df } => match device.read(offset, len).await {
            Ok(data) if data.len() == len as usize => {
                let chunks = if params.structured && !df {
                    read_chunks(&data, offset, params.block_sizes.minimum, READ_CHUNKS_MAX)
                } else {
                    Vec::new()
                };
                return ReplyBody::Data {
                    offset,
                    data,
                    chunks,
                };
            }
            Ok(data) => Err(BlockError::io(format!(
                "device read {} bytes of {len}",
                data.len()
            ))),
            Err(e) => Err(e),
        },
        Command::Write { len: 0, .. } => Ok(()),
        Command::Write { offset, fua, .. } => device.write(offset, data, fua).await,
        Command::Flush => device.flush().await,
        Command::Trim { len: 0, .. } | Command::WriteZeroes { len: 0, .. } => Ok(()),
        Command::Trim { offset, len, fua } => device.trim(offset, len, fua).await,
        Command::WriteZeroes {
            offset,
            len,
            no_hole,
            fua,
            fast_zero,
        } => {
            device
                .write_zeroes(offset, len, no_hole, fua, fast_zero)
                .await
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => match device.block_status(offset, len).await {
            Ok(extents) => {
                return ReplyBody::BlockStatus(block_status_descriptors(&extents, len, req_one))
            }
            Err(e) => Err(e),
        },
        Command::Cache { .. } | Command::Disc => Ok(()),
    };
    match result {
        Ok(()) => ReplyBody::Done,
        Err(e) => {
            debug!(?command, error = %e, "device error");
            ReplyBody::Error {
                errno: e.errno,
                message: e.message,
            }
        }
    }
}

/// The single writer of a connection: batches whatever replies are ready into one
/// vectored write, releasing their permits once written.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    structured: bool,
) -> io::Result<()> {
    let mut batch = ReplyBatch::default();
    let mut held = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(Outgoing { reply, permits }) = next.take() {
            batch.push(reply, structured);
            held.push(permits);
            if batch.replies() < REPLY_BATCH_MAX && batch.bytes() < REPLY_BATCH_MAX_BYTES {
                next = rx.try_recv().ok();
            }
        }
        write_all_vectored(&mut writer, &batch.slices()).await?;
        writer.flush().await?;
        batch.clear();
        // Written: the requests no longer count as in flight.
        held.clear();
    }
    let _ = writer.shutdown().await;
    Ok(())
}

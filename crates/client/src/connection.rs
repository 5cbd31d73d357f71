//! One pipelined peer connection: a writer task, a reader task, and a table of pending
//! requests. Requests in flight are bounded by a semaphore.

use crate::framing::{read_frame, write_frame, write_payload_frame};
use crate::payload::Payload;
use crate::ClientError;
use proto::msg::{self, Hello};
use proto::{Header, Opcode, PeerError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Requests in flight on one connection.
const IN_FLIGHT_MAX: usize = 256;
/// Frames queued for the writer task (each up to an object: this bounds the memory a
/// connection holds in queued payloads).
const WRITE_QUEUE_MAX: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A successful reply: its header and payload.
pub type Reply = (Header, Vec<u8>);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, ClientError>>>>>;

/// A connection on which calls are pipelined.
pub struct Connection {
    addr: String,
    writer: mpsc::Sender<(Header, Payload)>,
    pending: Pending,
    next_id: AtomicU64,
    slots: Semaphore,
    alive: Arc<AtomicBool>,
    peer: Hello,
}

impl Connection {
    /// Connects, exchanges hellos and checks the peer's with `accept`.
    pub async fn connect(
        addr: &str,
        hello: &Hello,
        accept: impl Fn(&Hello) -> Result<(), String>,
    ) -> Result<Connection, ClientError> {
        let connect = TcpStream::connect(addr);
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(ClientError::Connect {
                    addr: addr.to_string(),
                    source,
                })
            }
            Err(_) => {
                return Err(ClientError::Timeout {
                    addr: addr.to_string(),
                    secs: CONNECT_TIMEOUT.as_secs(),
                })
            }
        };
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let io_err = |source: std::io::Error| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let hs = async {
            write_frame(
                &mut wr,
                Header::request(Opcode::Hello, 0, 0),
                &msg::encode(hello),
            )
            .await
            .map_err(io_err)?;
            wr.flush().await.map_err(io_err)?;
            read_frame(&mut rd)
                .await
                .map_err(|e| ClientError::Handshake {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })
        };
        let (h, body) = tokio::time::timeout(CONNECT_TIMEOUT, hs)
            .await
            .map_err(|_| ClientError::Timeout {
                addr: addr.to_string(),
                secs: CONNECT_TIMEOUT.as_secs(),
            })??;
        if h.status != 0 {
            return Err(ClientError::Handshake {
                addr: addr.to_string(),
                reason: PeerError::from_reply(h.status, &body).message,
            });
        }
        let peer: Hello = msg::decode(&body).map_err(|e| ClientError::Handshake {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        accept(&peer).map_err(|reason| ClientError::Handshake {
            addr: addr.to_string(),
            reason,
        })?;

        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let alive = Arc::new(AtomicBool::new(true));
        let (tx, mut rx) = mpsc::channel::<(Header, Payload)>(WRITE_QUEUE_MAX);
        let alive_w = alive.clone();
        tokio::spawn(async move {
            while let Some((h, p)) = rx.recv().await {
                if write_payload_frame(&mut wr, h, &p).await.is_err() {
                    break;
                }
                // Flush only when nothing else is queued, so bursts share a syscall.
                if rx.is_empty() && wr.flush().await.is_err() {
                    break;
                }
            }
            alive_w.store(false, Ordering::Release);
        });
        let pending_r = pending.clone();
        let alive_r = alive.clone();
        let addr_r = addr.to_string();
        tokio::spawn(async move {
            loop {
                match read_frame(&mut rd).await {
                    Ok((h, p)) => {
                        let waiter = lock(&pending_r).remove(&h.request_id);
                        if let Some(w) = waiter {
                            let result = if h.status == 0 {
                                Ok((h, p))
                            } else {
                                Err(ClientError::Peer(PeerError::from_reply(h.status, &p)))
                            };
                            let _ = w.send(result);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(addr = %addr_r, error = %e, "peer connection closed");
                        break;
                    }
                }
            }
            alive_r.store(false, Ordering::Release);
            let waiters: Vec<_> = lock(&pending_r).drain().collect();
            for (_, w) in waiters {
                let _ = w.send(Err(ClientError::Disconnected {
                    addr: addr_r.clone(),
                }));
            }
        });
        Ok(Connection {
            addr: addr.to_string(),
            writer: tx,
            pending,
            next_id: AtomicU64::new(1),
            slots: Semaphore::new(IN_FLIGHT_MAX),
            alive,
            peer,
        })
    }

    /// The peer's hello.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Sends a request and waits for its reply, at most `timeout`. An error status in the
    /// reply is returned as [`ClientError::Peer`].
    pub async fn call(
        &self,
        mut header: Header,
        payload: impl Into<Payload>,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let payload: Payload = payload.into();
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| self.disconnected())?;
        if !self.is_alive() {
            return Err(self.disconnected());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        header.request_id = id;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if self.writer.send((header, payload)).await.is_err() {
            lock(&self.pending).remove(&id);
            return Err(self.disconnected());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.disconnected()),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(ClientError::Timeout {
                    addr: self.addr.clone(),
                    secs: timeout.as_secs(),
                })
            }
        }
    }

    fn disconnected(&self) -> ClientError {
        ClientError::Disconnected {
            addr: self.addr.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned table only means another task panicked while holding it; the map is
    // still consistent (single inserts and removes).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

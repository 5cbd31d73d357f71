//! The peer-protocol client used by sheep (node to node) and by dog.
//!
//! A [`Connection`] is one TCP connection, opened with a hello exchange, on which many
//! requests are in flight at once (bounded) and replies arrive in any order, matched by
//! request id. A [`Pool`] keeps one connection per peer address and reopens it on failure.

mod connection;
mod framing;
mod payload;
mod pool;

pub use connection::{Connection, Reply};
pub use framing::{
    read_frame, read_frame_summed, write_frame, write_payload_frame, FrameReadError,
};
pub use payload::Payload;
pub use pool::Pool;

use proto::{ErrorCode, FrameError, PeerError};

/// Why a call did not get a successful reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection to {addr} lost")]
    Disconnected { addr: String },
    #[error("no reply from {addr} within {secs} s")]
    Timeout { addr: String, secs: u64 },
    #[error("handshake with {addr} refused: {reason}")]
    Handshake { addr: String, reason: String },
    #[error("bad frame from {addr}: {source}")]
    Frame { addr: String, source: FrameError },
    /// The peer answered with an error status.
    #[error("{0}")]
    Peer(PeerError),
}

impl ClientError {
    /// The error code if the peer answered, or `Unreachable` when it could not be asked.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Peer(e) => e.code,
            ClientError::Frame { .. } => ErrorCode::Io,
            _ => ErrorCode::Unreachable,
        }
    }

    /// True when the peer never answered (dead, unreachable, or the connection broke).
    pub fn is_unreachable(&self) -> bool {
        self.code() == ErrorCode::Unreachable
    }

    /// This error as a [`PeerError`] (for passing on to our own clients).
    pub fn to_peer_error(&self) -> PeerError {
        match self {
            ClientError::Peer(e) => e.clone(),
            other => PeerError::new(other.code(), other.to_string()),
        }
    }
}

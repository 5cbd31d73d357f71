//! Protocol errors: frame decoding failures and the status codes carried in replies.

use serde::{Deserialize, Serialize};

/// A frame that cannot be accepted. The receiver answers with an error or closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("unknown frame flags {0:#x}")]
    UnknownFlags(u32),
    #[error("payload of {0} bytes exceeds the maximum")]
    PayloadTooLarge(u32),
    #[error("payload length {got} does not match header {expected}")]
    PayloadLength { expected: u32, got: usize },
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("malformed message body: {0}")]
    Body(String),
}

/// Reply status codes. 0 is success; everything else names what went wrong, and the
/// reply payload carries a human-readable message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u32)]
pub enum ErrorCode {
    Io = 1,
    /// The object is not in this node's store.
    NotFound = 2,
    /// Create of an object that already exists.
    Exists = 3,
    /// The receiver is at another epoch; the reply's `epoch` field names it.
    StaleEpoch = 4,
    InvalidRequest = 5,
    NoSuchVdi = 6,
    VdiExists = 7,
    NotFormatted = 8,
    AlreadyFormatted = 9,
    /// Fewer live replicas than `min_copies`.
    NoQuorum = 10,
    Checksum = 11,
    /// A write carrying an old lock generation.
    Fenced = 12,
    /// This node lost its membership and serves nothing until it rejoins.
    NotServing = 13,
    /// This node's replica is stale (quarantined).
    Stale = 14,
    TooLarge = 15,
    TooFewNodes = 16,
    ClusterMismatch = 17,
    Unsupported = 18,
    NoSpace = 19,
    ShuttingDown = 20,
    Internal = 21,
    Locked = 22,
    /// The object's replicas do not hold it yet (recovery has not brought it here).
    NotRecovered = 23,
    Unreachable = 24,
}

impl ErrorCode {
    pub fn from_u32(v: u32) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => Io,
            2 => NotFound,
            3 => Exists,
            4 => StaleEpoch,
            5 => InvalidRequest,
            6 => NoSuchVdi,
            7 => VdiExists,
            8 => NotFormatted,
            9 => AlreadyFormatted,
            10 => NoQuorum,
            11 => Checksum,
            12 => Fenced,
            13 => NotServing,
            14 => Stale,
            15 => TooLarge,
            16 => TooFewNodes,
            17 => ClusterMismatch,
            18 => Unsupported,
            19 => NoSpace,
            20 => ShuttingDown,
            21 => Internal,
            22 => Locked,
            23 => NotRecovered,
            24 => Unreachable,
            _ => return None,
        })
    }
}

/// An error reply: a code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PeerError {
    pub code: ErrorCode,
    pub message: String,
}

impl PeerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> PeerError {
        PeerError {
            code,
            message: message.into(),
        }
    }

    /// Rebuilds an error from a reply status and payload; unknown codes become `Internal`.
    pub fn from_reply(status: u32, payload: &[u8]) -> PeerError {
        let code = ErrorCode::from_u32(status).unwrap_or(ErrorCode::Internal);
        PeerError {
            code,
            message: String::from_utf8_lossy(payload).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for v in 0..100 {
            if let Some(c) = ErrorCode::from_u32(v) {
                assert_eq!(c as u32, v);
            }
        }
        assert_eq!(ErrorCode::from_u32(0), None);
        assert_eq!(PeerError::from_reply(9999, b"x").code, ErrorCode::Internal);
    }
}

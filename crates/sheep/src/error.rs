//! Mapping of the daemon's component errors onto protocol error replies.

use proto::{ErrorCode, PeerError};

/// Converts a store error into the reply a peer receives.
pub fn from_store(e: store::StoreError) -> PeerError {
    use store::StoreError as S;
    let code = match &e {
        S::NotFound(_) => ErrorCode::NotFound,
        S::Exists(_) => ErrorCode::Exists,
        S::Stale(_) => ErrorCode::Stale,
        S::Checksum { .. } | S::Corrupt { .. } => ErrorCode::Checksum,
        S::OutOfRange { .. } => ErrorCode::InvalidRequest,
        S::NoSpace => ErrorCode::NoSpace,
        _ => ErrorCode::Io,
    };
    PeerError::new(code, e.to_string())
}

/// Converts a cluster driver error into the reply a client receives.
pub fn from_cluster(e: cluster::ClusterError) -> PeerError {
    use cluster::ClusterError as C;
    let code = match &e {
        C::NotFormatted => ErrorCode::NotFormatted,
        C::AlreadyFormatted => ErrorCode::AlreadyFormatted,
        C::VdiExists(_) => ErrorCode::VdiExists,
        C::NoSuchVdi(_) => ErrorCode::NoSuchVdi,
        C::Locked { .. } => ErrorCode::Locked,
        C::Stopped { .. } => ErrorCode::ShuttingDown,
        C::NotStopped | C::NoneReturned => ErrorCode::InvalidRequest,
        _ => ErrorCode::Io,
    };
    PeerError::new(code, e.to_string())
}

/// Shorthand for an invalid-request error.
pub fn invalid(msg: impl Into<String>) -> PeerError {
    PeerError::new(ErrorCode::InvalidRequest, msg)
}

/// Shorthand for an internal error.
pub fn internal(msg: impl Into<String>) -> PeerError {
    PeerError::new(ErrorCode::Internal, msg)
}

//! Errors of cluster drivers: what went wrong and where, with retryable failures kept
//! apart from answers (`VdiExists`, `Locked`) and from fatal ones (`Corrupt`).

use proto::Vid;
use std::path::PathBuf;
use uuid::Uuid;

/// Everything a [`crate::ClusterDriver`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The operation needs a formatted cluster.
    #[error("cluster is not formatted")]
    NotFormatted,
    /// `format` on a cluster that already has a config.
    #[error("cluster is already formatted")]
    AlreadyFormatted,
    /// A config that cannot be used (zero copies, object size not a power of two...).
    #[error("invalid cluster config: {0}")]
    InvalidConfig(String),
    /// `vdi_create` with a name that is taken.
    #[error("vdi {0:?} already exists")]
    VdiExists(String),
    /// No VDI by that name (or it maps to another vid than the one given).
    #[error("no vdi {0:?} (with that vid)")]
    NoSuchVdi(String),
    /// A VDI name that is empty or too long.
    #[error("invalid vdi name {name:?}: {reason}")]
    InvalidVdiName { name: String, reason: &'static str },
    /// Every 24-bit vid has been handed out once; vids are never reused.
    #[error("all vdi ids are used")]
    VidsExhausted,
    /// The VDI's lock is held by another live member.
    #[error("vdi {vid:#x} is locked by node {holder}")]
    Locked { vid: Vid, holder: Uuid },
    /// The caller no longer holds the lock it names (taken over, broken, or released).
    #[error("lock of vdi {vid:#x} is no longer held with that generation")]
    LockLost { vid: Vid },
    /// A compare-and-swap found another epoch than the caller expected.
    #[error("membership changed: expected epoch {expected_epoch}, now {current_epoch}")]
    Conflict {
        expected_epoch: u32,
        current_epoch: u32,
    },
    /// The cluster is shut down: nothing is served or changed until the nodes of its
    /// last running epoch are back (`missing` are the ones still awaited).
    #[error(
        "cluster is shut down; waiting for {} node(s) of epoch {last_epoch} to return: {}",
        .missing.len(),
        uuid_list(.missing)
    )]
    Stopped { last_epoch: u32, missing: Vec<Uuid> },
    /// `force_start` on a cluster that is running.
    #[error("cluster is running, not shut down")]
    NotStopped,
    /// `force_start` before any node has returned: the cluster would have no members.
    #[error("no live node has returned since the shutdown; start at least one first")]
    NoneReturned,
    /// The node is not a member of the current membership.
    #[error("node {0} is not a cluster member")]
    NotMember(Uuid),
    /// Another live process holds this node's liveness: the same node uuid runs twice.
    #[error("liveness of node {0} is held by another process (is it running twice?)")]
    LivenessHeld(Uuid),
    /// This handle already joined as another node; one handle is one node.
    #[error("this handle already joined as node {joined}, cannot join as {requested}")]
    AlreadyJoinedAs { joined: Uuid, requested: Uuid },
    /// A bound of the shared state was reached.
    #[error("too many {what} (at most {max})")]
    LimitReached { what: &'static str, max: u64 },
    /// The shared state's lock could not be taken in time (another process holds it).
    #[error("timed out after {waited_ms} ms waiting for lock {path}")]
    LockTimeout { path: PathBuf, waited_ms: u64 },
    /// An I/O error; `what` names the operation and the path.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A record of the shared state that cannot be trusted. Fatal: needs an operator.
    #[error("corrupt cluster record {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// `a, b, c` for an error message.
fn uuid_list(uuids: &[Uuid]) -> String {
    let texts: Vec<String> = uuids.iter().map(Uuid::to_string).collect();
    texts.join(", ")
}

impl ClusterError {
    /// Wraps an I/O error with the operation and path it came from.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> ClusterError {
        ClusterError::Io {
            what: what.into(),
            source,
        }
    }

    /// Whether trying the same call again later may succeed without anyone intervening.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClusterError::Conflict { .. }
                | ClusterError::LockTimeout { .. }
                | ClusterError::Locked { .. }
                | ClusterError::LivenessHeld(_)
                | ClusterError::Io { .. }
        )
    }
}

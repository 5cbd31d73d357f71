//! Cluster drivers (DESIGN.md §4): the coordinator behind one narrow trait.
//!
//! A driver does three things and nothing else:
//! 1. liveness of nodes (a lock file, a lease), so a crash is noticed and a node that
//!    lost its liveness can fence itself;
//! 2. one small strongly consistent record `{epoch, members, config, status}`, changed
//!    only by compare-and-swap (every change is a new epoch) and watched by every node,
//!    with the record of every past epoch kept; the status says whether the cluster
//!    runs or was shut down and waits for the members of its last epoch to return;
//! 3. small metadata with compare-and-swap: the VDI registry (name -> vid), VDI locks
//!    with a fencing generation (DESIGN.md §6 point 9) and the stale-replica registry.
//!
//! Drivers: [`local::LocalDriver`] (all nodes on one host, state in a shared directory).
//! The rules every driver applies live in [`state`]; [`conformance`] is the test suite
//! every driver must pass.

pub mod conformance;
pub mod error;
pub mod local;
pub mod state;

pub use error::ClusterError;
pub use local::{LocalDriver, LocalOptions};
pub use proto::{Oid, Vid};
pub use uuid::Uuid;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A node as the cluster knows it. Placement hashes `uuid`, never `addr`, so a node may
/// change address between runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's persistent identity.
    pub uuid: Uuid,
    /// Peer protocol address, `host:port`.
    pub addr: String,
    /// Failure domain: placement puts at most one replica of an object in a zone.
    pub zone: u32,
    /// Virtual nodes on the placement ring; 0 makes the node gateway-only.
    pub vnodes: u32,
    /// Where the node serves NBD, if it does.
    pub nbd_addr: Option<String>,
}

/// What `dog cluster format` fixes for the life of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Identity written into every store and cache and checked in every handshake.
    pub cluster_uuid: Uuid,
    /// Bumped by every re-format, so stores from an older format are refused.
    pub format_generation: u64,
    /// Default number of replicas of an object.
    pub copies: u32,
    /// Size of a data object in bytes (a power of two).
    pub object_size: u32,
    /// When the cluster was formatted, seconds since the Unix epoch.
    pub formatted_at_unix: u64,
}

/// The cluster's one strongly consistent record. Every change makes a new epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Membership {
    /// Increases by one with every change; 0 is the empty, never-changed cluster.
    pub epoch: u32,
    /// The members, sorted by uuid, each uuid at most once: the nodes that serve I/O and
    /// that placement uses. Always empty while the status is `Stopped`.
    pub members: Vec<NodeInfo>,
    /// `None` until the cluster is formatted.
    pub config: Option<ClusterConfig>,
    /// Running, or shut down and waiting for the last epoch's members to return. Absent
    /// in records written before shutdown existed, which are `Running`.
    #[serde(default)]
    pub status: ClusterStatus,
}

/// Whether the cluster serves I/O, or was shut down as a whole and waits for the
/// members of its last running epoch before it starts again (DESIGN.md §4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ClusterStatus {
    /// Normal service: `Membership::members` serve I/O.
    #[default]
    Running,
    /// Shut down by [`ClusterDriver::shutdown_cluster`]; nobody serves I/O. Restarted
    /// nodes wait in `returned`; once every node of `last_members` is there (and alive),
    /// the cluster runs again with all of `returned` as members, at one new epoch.
    Stopped {
        /// The last epoch at which the cluster was running.
        last_epoch: u32,
        /// The members at `last_epoch`, sorted by uuid: the nodes the restart waits for.
        last_members: Vec<NodeInfo>,
        /// The nodes that joined since the shutdown and still hold their liveness,
        /// sorted by uuid, with the addresses they joined with. May include nodes that
        /// are not in `last_members`; they become members at the start too.
        returned: Vec<NodeInfo>,
    },
}

/// One entry of the VDI registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiEntry {
    /// The VDI's name (UTF-8, 1 to 255 bytes).
    pub name: String,
    /// Its id; never reused, even after the VDI is deleted.
    pub vid: Vid,
}

/// A held VDI lock: one writer per VDI (DESIGN.md §6 point 9).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiLock {
    /// The locked VDI.
    pub vid: Vid,
    /// Uuid of the node (gateway) holding the lock.
    pub holder: Uuid,
    /// Fencing token: larger with every take-over, never repeated for a vid. Every write
    /// and push carries it; replicas refuse an older one.
    pub generation: u64,
}

/// The coordinator seen by one node. One handle is one node: a handle that joined holds
/// that node's liveness until it leaves or is dropped (dropping without `leave` is a
/// crash, as far as the other nodes can tell).
///
/// # To ensure correctness
/// - Every method that changes state returns only once the change is durable in the
///   shared state (for `local`: the record files are fsynced and renamed, the directory
///   fsynced) and visible to every other handle.
/// - Membership changes are totally ordered: each returns a membership whose epoch is
///   exactly one more than the one it replaced, and no two changes share an epoch.
/// - A node must stop serving I/O as soon as [`ClusterDriver::still_alive`] is false, and
///   may serve again only after a new [`ClusterDriver::join`] (a new epoch).
/// - A node serves I/O only while the status is [`ClusterStatus::Running`] and it is in
///   `members` (while `Stopped`, `members` is empty, so placement has no nodes anyway).
/// - After [`ClusterDriver::shutdown_cluster`] the status stays `Stopped` until every node
///   of the last running epoch has joined again and still holds its liveness (or an
///   admin calls [`ClusterDriver::force_start`]); nodes exiting while `Stopped` never
///   change what the restart waits for.
/// - Lock generations for a vid never repeat, whatever happens to the lock.
#[async_trait]
pub trait ClusterDriver: Send + Sync + 'static {
    /// Takes this node's liveness and adds the node to the members (replacing an entry
    /// with the same uuid) at a new epoch. Every (re)join is a new epoch.
    ///
    /// While the cluster is `Stopped` the node is added to `returned` instead, and nodes
    /// of `returned` whose liveness is gone are dropped from it in the same change. If
    /// then no node of `last_members` is missing, the same new epoch is `Running` with
    /// all of `returned` as members. [`Membership::missing`] says what is still awaited.
    async fn join(&self, node: NodeInfo) -> Result<Membership, ClusterError>;

    /// Removes node `uuid` at a new epoch. If it is this handle's own node, its liveness
    /// is dropped afterwards (graceful stop); another node removed this way fences itself.
    /// While `Stopped`, removes it from `returned` (never from `last_members`);
    /// `NotMember` (and no new epoch) if it is not there, as for a node stopping after
    /// the shutdown.
    async fn leave(&self, uuid: Uuid) -> Result<Membership, ClusterError>;

    /// The current membership, read from the shared state.
    async fn membership(&self) -> Result<Membership, ClusterError>;

    /// The membership recorded for a past (or the current) epoch, if any.
    async fn membership_at(&self, epoch: u32) -> Result<Option<Membership>, ClusterError>;

    /// Removes every member whose liveness is gone (crashed) at ONE new epoch; returns
    /// the new membership if anything changed. While `Stopped`, drops the dead nodes of
    /// `returned` instead, so the cluster does not start without them.
    async fn reap_dead(&self) -> Result<Option<Membership>, ClusterError>;

    /// Whether this handle still holds its own liveness and the cluster still counts its
    /// node as present (as last seen by this handle): a member while `Running`, in
    /// `returned` while `Stopped`. False before `join` and after `leave`. Being alive
    /// is not enough to serve I/O: the status must be `Running` too.
    async fn still_alive(&self) -> bool;

    /// Watch of the membership: the value is always the newest membership this handle
    /// has seen, and the epoch never goes back. The driver follows the shared state in
    /// the background (and reaps dead members while doing so), so a crash shows up here
    /// within a few seconds. A watch keeps only the latest value: a receiver that is slow
    /// may skip epochs; [`ClusterDriver::membership_at`] has them all.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<Membership>;

    /// Formats the cluster: stores `config` only if there is none yet (compare-and-swap),
    /// at a new epoch. `AlreadyFormatted` otherwise.
    async fn format(&self, config: ClusterConfig) -> Result<Membership, ClusterError>;

    /// Replaces the config of a formatted cluster wholesale (re-format after a shutdown),
    /// at a new epoch, only if the current epoch is still `expected_epoch` (`Conflict`
    /// otherwise). The VDI registry, locks, stale registry and status are left as they
    /// are.
    async fn set_config(
        &self,
        expected_epoch: u32,
        config: ClusterConfig,
    ) -> Result<Membership, ClusterError>;

    /// Shuts the whole cluster down (compare-and-swap from `Running`): members whose
    /// liveness is already gone are reaped first (their own epoch, as `reap_dead`), so
    /// the restart does not wait for a node that crashed before; then, at one new
    /// epoch, the status becomes `Stopped` with the current members as `last_members`
    /// and `members` empty. Every node must then stop serving I/O and may exit; exits
    /// change nothing (the callers should not `leave`).
    ///
    /// `NotFormatted` on a cluster that was never formatted (it holds no data, so nodes
    /// simply leave); `Stopped` if it is already stopped.
    async fn shutdown_cluster(&self) -> Result<Membership, ClusterError>;

    /// Admin escape hatch for a member that is gone for good: moves a `Stopped` cluster
    /// to `Running` at one new epoch with the nodes of `returned` that are still alive
    /// as members, whoever is missing. `NotStopped` on a running cluster; `NoneReturned`
    /// if no live node has returned.
    async fn force_start(&self) -> Result<Membership, ClusterError>;

    /// Registers a new VDI and returns its fresh vid. `VdiExists` if the name is taken,
    /// `NotFormatted` before format, `Stopped` while the cluster is shut down.
    async fn vdi_create(&self, name: &str) -> Result<Vid, ClusterError>;

    /// The vid registered for `name`, if any.
    async fn vdi_lookup(&self, name: &str) -> Result<Option<Vid>, ClusterError>;

    /// Every registered VDI, sorted by name.
    async fn vdi_list(&self) -> Result<Vec<VdiEntry>, ClusterError>;

    /// Unregisters `name` if it still maps to `vid` (compare-and-swap); `NoSuchVdi`
    /// otherwise, `Stopped` while the cluster is shut down. The vid stays retired.
    async fn vdi_delete(&self, name: &str, vid: Vid) -> Result<(), ClusterError>;

    /// Takes the lock of `vid` for `holder`, which must be a member:
    /// free -> taken with the last generation + 1 (the first is 1);
    /// held by `holder` -> returned as is (reentrant);
    /// held by another member -> `Locked`;
    /// held by a node that is no longer a member -> taken over (generation + 1).
    /// `Stopped` while the cluster is shut down (locks are kept as they are until it
    /// runs again).
    async fn lock_acquire(&self, vid: Vid, holder: Uuid) -> Result<VdiLock, ClusterError>;

    /// Releases the lock if `holder` and `generation` still match; `LockLost` otherwise.
    async fn lock_release(
        &self,
        vid: Vid,
        holder: Uuid,
        generation: u64,
    ) -> Result<(), ClusterError>;

    /// Frees the lock whoever holds it (admin `--force`); the next acquire gets the next
    /// generation. Breaking a free lock is a no-op.
    async fn lock_break(&self, vid: Vid) -> Result<(), ClusterError>;

    /// The lock of `vid`, if held.
    async fn lock_get(&self, vid: Vid) -> Result<Option<VdiLock>, ClusterError>;

    /// Every held lock, sorted by vid.
    async fn lock_list(&self) -> Result<Vec<VdiLock>, ClusterError>;

    /// Records that `node`'s replica of `oid` missed a write the others applied, so it
    /// must be recovered and never read. Idempotent.
    async fn mark_stale(&self, oid: Oid, node: Uuid) -> Result<(), ClusterError>;

    /// The objects marked stale on `node`, sorted.
    async fn stale_for(&self, node: Uuid) -> Result<Vec<Oid>, ClusterError>;

    /// Forgets that `node`'s replica of `oid` is stale (it was recovered). Idempotent.
    async fn clear_stale(&self, oid: Oid, node: Uuid) -> Result<(), ClusterError>;
}

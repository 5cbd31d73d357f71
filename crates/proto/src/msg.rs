//! JSON message bodies of the control ops (handshake, node, cluster and VDI ops).
//! The data path (object reads and writes) carries raw bytes instead.

use crate::error::FrameError;
use crate::oid::Vid;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Feature bits a peer may announce in its hello; none are defined yet.
pub const FEATURES_NONE: u64 = 0;

/// Who opens a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Another sheep: must belong to the same cluster.
    Node,
    /// dog or another admin client: not a member, may talk to an unformatted node.
    Client,
}

/// Which cluster (and which format of it) a store or a peer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterId {
    pub cluster_uuid: Uuid,
    pub format_generation: u64,
}

/// The first message on every connection, sent by both sides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub proto_version: u16,
    pub role: Role,
    pub node_uuid: Option<Uuid>,
    pub cluster: Option<ClusterId>,
    pub features: u64,
    /// Reserved for a cluster secret; must be `None` in this version.
    pub auth: Option<String>,
}

/// A member as shown to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub uuid: Uuid,
    pub addr: String,
    pub zone: u32,
    pub vnodes: u32,
    pub nbd_addr: Option<String>,
}

/// Reply to NodeInfo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfoReply {
    pub uuid: Uuid,
    pub addr: String,
    pub zone: u32,
    pub vnodes: u32,
    pub epoch: u32,
    /// False while the node is fenced (not a member of the current epoch).
    pub serving: bool,
    pub objects: u64,
    pub used_bytes: u64,
    /// Sync operations performed by this node's store (for durability tests).
    pub sync_count: u64,
    pub fault_injection: bool,
    pub nbd_addr: Option<String>,
    pub version: String,
}

/// The cluster's format parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfigInfo {
    pub cluster_uuid: Uuid,
    pub format_generation: u64,
    pub copies: u32,
    pub object_size: u32,
    pub formatted_at_unix: u64,
}

/// Reply to ClusterInfo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfoReply {
    /// "waiting for format" or "running".
    pub status: String,
    pub epoch: u32,
    pub members: Vec<MemberInfo>,
    pub config: Option<ClusterConfigInfo>,
}

/// Body of ClusterFormat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatRequest {
    pub copies: u32,
    pub object_size: u32,
}

/// Body of VdiCreate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiCreateRequest {
    pub name: String,
    pub size: u64,
    pub copies: Option<u32>,
    pub min_copies: Option<u32>,
    /// Durability mode of its NBD export; the default is "none".
    #[serde(default)]
    pub cache_mode: Option<String>,
}

/// Body of VdiDelete and VdiInfo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiNameRequest {
    pub name: String,
}

/// Body of VdiResize.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiResizeRequest {
    pub name: String,
    pub size: u64,
}

/// Body of VdiObject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiObjectRequest {
    pub name: String,
    pub index: u32,
}

/// A VDI as shown to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiInfo {
    pub name: String,
    pub vid: Vid,
    pub size: u64,
    pub copies: u32,
    pub min_copies: u32,
    pub created_unix: u64,
    pub object_size: u32,
    /// Data objects this VDI owns (written at least once).
    pub allocated_objects: u64,
    pub cache_mode: String,
    /// In writeback mode: writes are written through until the client's first FLUSH.
    #[serde(default)]
    pub writethrough_until_flush: bool,
}

/// Body of VdiSet: change one setting of a VDI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiSetRequest {
    pub name: String,
    pub key: String,
    pub value: String,
}

/// A VDI lock as shown to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiLockInfo {
    pub name: String,
    pub vid: Vid,
    pub holder: Uuid,
    pub holder_addr: Option<String>,
    pub generation: u64,
}

/// Reply to VdiLockList.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiLockListReply {
    pub locks: Vec<VdiLockInfo>,
}

/// Body of VdiUnlock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiUnlockRequest {
    pub name: String,
    pub force: bool,
}

/// Reply to VdiList.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiListReply {
    pub vdis: Vec<VdiInfo>,
}

/// Reply to VdiObject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiObjectReply {
    pub oid: String,
    pub index: u32,
    /// The vid owning this index in the data table; 0 if never written.
    pub owner_vid: Vid,
    /// The replica set placement gives at the current epoch, in order.
    pub nodes: Vec<MemberInfo>,
}

/// Body of RecoveryThrottle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleRequest {
    /// Bytes per second; 0 removes the limit.
    pub bytes_per_sec: u64,
}

/// Body of ClusterCheck.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub repair: bool,
}

/// One problem `cluster check` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckProblem {
    pub vdi: String,
    pub oid: String,
    /// The replica's node, when the problem is one replica's.
    pub node: Option<String>,
    pub problem: String,
    pub repaired: bool,
}

/// Reply to ClusterCheck.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReply {
    pub objects_checked: u64,
    pub problems: Vec<CheckProblem>,
    pub repaired: u64,
}

/// Progress of this node's recovery, as `dog node recovery` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RecoveryInfo {
    pub epoch: u32,
    pub running: bool,
    pub to_recover: u64,
    pub recovered: u64,
    pub failed: u64,
    /// Bytes recovered this round.
    pub bytes: u64,
    /// Bytes recovered by background rounds since the daemon started.
    pub bytes_total: u64,
    /// Bytes recovered on demand for client requests (not throttled) since start.
    #[serde(default)]
    pub on_demand_bytes: u64,
    /// Seconds spent in recovery rounds since the daemon started.
    pub busy_secs_total: f64,
    /// Average rate of this round (bytes per second).
    pub rate_bps: u64,
    /// Highest rate of any completed one-second window since start (bytes per second).
    pub peak_rate_bps: u64,
    pub throttle_bps: u64,
    pub pending_handoff: u64,
    pub unverified: u64,
    /// The epoch the last round finished at, if any.
    pub done_epoch: Option<u32>,
}

/// One VDI's write-back cache on a gateway (`dog vdi cache info`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheInfo {
    pub name: String,
    pub vid: Vid,
    pub objects: u64,
    pub clean_bytes: u64,
    /// Dirty data, pushed or not: not yet durable on the replicas.
    pub dirty_bytes: u64,
    /// The part of `dirty_bytes` not yet pushed (what `dirty_limit` bounds); the rest
    /// waits only for a sync.
    #[serde(default)]
    pub unpushed_bytes: u64,
    pub size_limit: u64,
    pub dirty_limit: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: f64,
    pub pushes: u64,
    pub pushed_bytes: u64,
    pub pushes_in_flight: u64,
    pub push_failures: u64,
    pub backpressure_waits: u64,
    /// Writes that went around the cache to the replicas (dirty data at its limit).
    #[serde(default)]
    pub written_around: u64,
    #[serde(default)]
    pub written_around_bytes: u64,
    pub evictions: u64,
    pub flushes: u64,
    pub last_flush_unix: Option<u64>,
    /// The client has sent a FLUSH (writethrough-until-first-flush is over).
    pub seen_flush: bool,
}

/// Reply to VdiCacheInfo.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheInfoReply {
    pub node: String,
    pub caches: Vec<CacheInfo>,
}

/// Body of VdiCacheInfo (all VDIs when `name` is None), VdiCacheFlush and VdiCachePurge.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRequest {
    pub name: Option<String>,
}

/// Encodes a message body.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(msg).unwrap_or_default()
}

/// Decodes a message body received from the network.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn create_request_round_trips(name in ".{0,64}", size in any::<u64>(), copies in proptest::option::of(1u32..8)) {
            let m = VdiCreateRequest { name, size, copies, min_copies: None, cache_mode: None };
            prop_assert_eq!(decode::<VdiCreateRequest>(&encode(&m)), Ok(m));
        }

        #[test]
        fn garbage_bodies_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Hello>(&bytes);
            let _ = decode::<VdiInfo>(&bytes);
        }
    }

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            proto_version: 1,
            role: Role::Node,
            node_uuid: Some(Uuid::new_v4()),
            cluster: Some(ClusterId {
                cluster_uuid: Uuid::new_v4(),
                format_generation: 3,
            }),
            features: FEATURES_NONE,
            auth: None,
        };
        assert_eq!(decode::<Hello>(&encode(&h)), Ok(h));
    }
}

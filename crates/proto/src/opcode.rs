//! Operation codes of the peer protocol.

use crate::error::FrameError;

/// What a request asks for. Object ops go node to node; the rest come from dog (or any
/// client) and are served by whichever sheep receives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Opcode {
    /// First frame on every connection: versions, identities, features (JSON body).
    Hello = 1,
    /// Read `length` bytes at `offset` of object `oid` from this node's store.
    ReadObj = 10,
    /// Write the payload at `offset` of an existing object; `generation` orders it.
    WriteObj = 11,
    /// Create the object (if absent) and write the payload into it.
    CreateAndWrite = 12,
    /// Remove the object from this node's store.
    RemoveObj = 13,
    /// Make every completed write on this node durable.
    SyncAll = 14,
    /// The version stamp of this node's replica (reply: `epoch`, `generation`).
    ObjStamp = 15,
    /// Quarantine this node's replica: it missed a write the other replicas applied.
    MarkStale = 16,
    /// Zero `length` bytes at `offset` (punch a hole).
    PunchObj = 17,
    /// Every object this node holds, with its version stamp (binary list).
    ListObjs = 18,
    /// Stamp and crc32c of the whole object content (reply: `generation`, `epoch`, and
    /// the crc in `offset`), read with checksums verified.
    ObjChecksum = 19,
    /// Make this node's copy of `oid` current now (recover it if missing or stale).
    RecoverObj = 20,
    /// This node's info (JSON reply).
    NodeInfo = 30,
    /// The cluster's membership, epoch and config (JSON reply).
    ClusterInfo = 31,
    /// Format the cluster (JSON body).
    ClusterFormat = 32,
    /// Stop every node cleanly.
    ClusterShutdown = 33,
    /// Stop this node cleanly (sent by the node that received ClusterShutdown).
    NodeShutdown = 34,
    /// Test-only: simulate a power cut of this node (fault-injection stores only).
    DebugPowerCut = 35,
    /// Stop serving NBD: finish, flush and close every connection (releasing VDI
    /// locks); the node stays a member. First step of a cluster shutdown.
    NodeDrain = 36,
    /// Start a shut-down cluster with the nodes that returned, without waiting for the
    /// missing ones.
    ClusterForceStart = 37,
    VdiCreate = 40,
    VdiDelete = 41,
    VdiList = 42,
    VdiResize = 43,
    /// Read VDI data through this node as gateway (`oid` = the VDI's inode oid).
    VdiRead = 44,
    /// Write VDI data through this node as gateway (`oid` = the VDI's inode oid).
    VdiWrite = 45,
    /// Where object `index` of a VDI lives.
    VdiObject = 46,
    /// One VDI's info, by name (JSON body and reply).
    VdiInfo = 47,
    /// Change a VDI setting (JSON body).
    VdiSet = 48,
    /// List VDI locks.
    VdiLockList = 49,
    /// Release a VDI lock (JSON body; `force` breaks a live holder's lock).
    VdiUnlock = 50,
    /// This node's recovery progress (JSON reply).
    RecoveryInfo = 60,
    /// Set this node's recovery rate limit (JSON body).
    RecoveryThrottle = 61,
    /// Verify every object of every VDI (JSON body and reply).
    ClusterCheck = 62,
    /// This gateway's write-back caches (JSON).
    VdiCacheInfo = 70,
    /// Push and sync a VDI's cache now.
    VdiCacheFlush = 71,
    /// Flush, then drop a VDI's cache.
    VdiCachePurge = 72,
}

impl TryFrom<u16> for Opcode {
    type Error = FrameError;

    fn try_from(v: u16) -> Result<Opcode, FrameError> {
        use Opcode::*;
        Ok(match v {
            1 => Hello,
            10 => ReadObj,
            11 => WriteObj,
            12 => CreateAndWrite,
            13 => RemoveObj,
            14 => SyncAll,
            15 => ObjStamp,
            16 => MarkStale,
            17 => PunchObj,
            18 => ListObjs,
            19 => ObjChecksum,
            20 => RecoverObj,
            30 => NodeInfo,
            31 => ClusterInfo,
            32 => ClusterFormat,
            33 => ClusterShutdown,
            34 => NodeShutdown,
            35 => DebugPowerCut,
            36 => NodeDrain,
            37 => ClusterForceStart,
            40 => VdiCreate,
            41 => VdiDelete,
            42 => VdiList,
            43 => VdiResize,
            44 => VdiRead,
            45 => VdiWrite,
            46 => VdiObject,
            47 => VdiInfo,
            48 => VdiSet,
            49 => VdiLockList,
            50 => VdiUnlock,
            60 => RecoveryInfo,
            61 => RecoveryThrottle,
            62 => ClusterCheck,
            70 => VdiCacheInfo,
            71 => VdiCacheFlush,
            72 => VdiCachePurge,
            other => return Err(FrameError::UnknownOpcode(other)),
        })
    }
}

impl Opcode {
    /// Object ops between nodes: the receiver must agree on the epoch.
    pub fn needs_epoch_match(self) -> bool {
        matches!(
            self,
            Opcode::ReadObj
                | Opcode::WriteObj
                | Opcode::CreateAndWrite
                | Opcode::RemoveObj
                | Opcode::ObjStamp
                | Opcode::MarkStale
                | Opcode::PunchObj
                | Opcode::ListObjs
                | Opcode::ObjChecksum
                | Opcode::RecoverObj
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_others_are_refused() {
        let mut known = 0;
        for v in 0..=u16::MAX {
            if let Ok(op) = Opcode::try_from(v) {
                assert_eq!(op as u16, v);
                known += 1;
            }
        }
        assert_eq!(known, 37);
    }
}

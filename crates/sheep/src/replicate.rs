//! Sending one object operation to its replica set: the write path (all live replicas,
//! at least `min_copies`, stale marking of replicas that missed it, epoch retries) and
//! the read path (one replica, local first, falling back and repairing bad copies).

use crate::node::Node;
use client::ClientError;
use cluster::NodeInfo;
use futures::future::join_all;
use proto::frame::{FLAG_DURABLE, FLAG_RECOVERY};
use proto::{ErrorCode, Header, Oid, Opcode, PeerError};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Timeout of one object request to a replica.
pub const OBJECT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a write waits for the membership to settle when too few replicas answer
/// (a node just died and the cluster has not noticed yet).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between attempts while waiting for a new epoch.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Attempts after which an operation gives up even if epochs keep changing.
const ATTEMPTS_MAX: usize = 50;

/// The kind of replicated write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// Write into an existing object.
    Write,
    /// Create the object if absent, then write (an existing object is just written).
    Create,
    /// Zero a range.
    Punch,
    /// Remove the object.
    Remove,
}

impl WriteKind {
    fn opcode(self) -> Opcode {
        match self {
            WriteKind::Write => Opcode::WriteObj,
            WriteKind::Create => Opcode::CreateAndWrite,
            WriteKind::Punch => Opcode::PunchObj,
            WriteKind::Remove => Opcode::RemoveObj,
        }
    }
}

fn object_header(op: Opcode, epoch: u32, oid: Oid, offset: u64, length: u32) -> Header {
    let mut h = Header::request(op, 0, epoch);
    h.oid = oid.raw();
    h.offset = offset;
    h.length = length;
    h
}

fn epoch_moved(e: &ClientError) -> bool {
    matches!(e.code(), ErrorCode::StaleEpoch | ErrorCode::NotServing)
}

/// Applies a write to every live replica of `oid` at the current epoch. Succeeds when all
/// applied it, or at least `min_copies` did and every one that did not is marked stale.
/// Returns the nodes that applied it (for the flush that must later sync them).
pub async fn replicate(
    node: &Node,
    kind: WriteKind,
    oid: Oid,
    offset: u64,
    data: &[u8],
    policy: Policy,
) -> Result<Vec<Uuid>, PeerError> {
    replicate_bytes(
        node,
        kind,
        oid,
        offset,
        bytes::Bytes::copy_from_slice(data),
        policy,
    )
    .await
}

/// [`replicate`] of data already in a shared buffer: the requests to every replica
/// share it, with no copy.
pub async fn replicate_bytes(
    node: &Node,
    kind: WriteKind,
    oid: Oid,
    offset: u64,
    data: bytes::Bytes,
    policy: Policy,
) -> Result<Vec<Uuid>, PeerError> {
    let len = data.len() as u64;
    replicate_len(node, kind, oid, offset, data, len, policy).await
}

/// How a write is replicated.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Replicas wanted.
    pub copies: usize,
    /// Fewest replicas that must apply the write.
    pub min_copies: usize,
    /// Every replica makes the write durable before answering.
    pub durable: bool,
    /// The VDI lock generation of the writer (0: unlocked writer, checked at the gateway).
    pub fence: u64,
}

impl Policy {
    pub fn with_durable(self, durable: bool) -> Policy {
        Policy { durable, ..self }
    }

    pub fn with_min_copies(self, min_copies: usize) -> Policy {
        Policy { min_copies, ..self }
    }
}

/// [`replicate`] with an explicit operation length (for punches, which carry no data).
pub async fn replicate_len(
    node: &Node,
    kind: WriteKind,
    oid: Oid,
    offset: u64,
    payload: bytes::Bytes,
    len: u64,
    policy: Policy,
) -> Result<Vec<Uuid>, PeerError> {
    let Policy {
        copies,
        min_copies,
        durable,
        fence,
    } = policy;
    // Checksummed once for every replica's frame (and the local store's block tags).
    let payload = client::Payload::summed(payload);
    let started = Instant::now();
    let mut last_err = None;
    for _ in 0..ATTEMPTS_MAX {
        let view = node.view();
        if !view.serving {
            node.refresh().await?;
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        }
        let targets = view.replicas(oid, copies);
        if targets.len() < min_copies {
            return Err(no_quorum(oid, targets.len(), min_copies));
        }
        let generation = node.next_generation();
        let mut h = object_header(kind.opcode(), view.epoch(), oid, offset, len as u32);
        h.generation = generation;
        h.fence = fence;
        if durable {
            h.flags |= FLAG_DURABLE;
        }
        let calls = targets
            .iter()
            .map(|t| send_write(node, t, kind, h, payload.clone()));
        let results = join_all(calls).await;

        if results.iter().any(|r| r.as_ref().is_err_and(epoch_moved)) {
            node.refresh().await?;
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        }
        let mut failed: Vec<(&NodeInfo, ClientError)> = Vec::new();
        let mut ok = Vec::new();
        for (t, r) in targets.iter().zip(results) {
            match r {
                Ok(()) => ok.push(t.uuid),
                Err(e) => failed.push((t, e)),
            }
        }
        let applied = ok.len();
        if failed.is_empty() {
            return Ok(ok);
        }
        if applied >= min_copies {
            for (t, e) in &failed {
                tracing::warn!(%oid, node = %t.uuid, error = %e, "replica missed a write; marking it stale");
                mark_stale(node, t, oid, view.epoch()).await?;
            }
            return Ok(ok);
        }
        let any_unreachable = failed.iter().any(|(_, e)| e.is_unreachable());
        let (_, first) = &failed[0];
        last_err = Some(first.to_peer_error());
        if any_unreachable && started.elapsed() < SETTLE_TIMEOUT {
            // A replica is gone but the cluster has not moved to a new epoch yet: wait for it.
            tokio::time::sleep(RETRY_PAUSE).await;
            node.refresh().await?;
            continue;
        }
        if any_unreachable {
            return Err(no_quorum(oid, applied, min_copies));
        }
        return Err(first.to_peer_error());
    }
    Err(last_err.unwrap_or_else(|| {
        PeerError::new(
            ErrorCode::Io,
            format!("object {oid}: too many epoch changes"),
        )
    }))
}

async fn send_write(
    node: &Node,
    to: &NodeInfo,
    kind: WriteKind,
    h: Header,
    payload: client::Payload,
) -> Result<(), ClientError> {
    match node.call(to, h, payload.clone(), OBJECT_CALL_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(ClientError::Peer(e)) if kind == WriteKind::Create && e.code == ErrorCode::Exists => {
            // Created already (by an earlier attempt or another gateway): write into it.
            let mut w = h;
            w.opcode = Opcode::WriteObj as u16;
            node.call(to, w, payload, OBJECT_CALL_TIMEOUT)
                .await
                .map(|_| ())
        }
        Err(ClientError::Peer(e)) if kind == WriteKind::Remove && e.code == ErrorCode::NotFound => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn no_quorum(oid: Oid, have: usize, need: usize) -> PeerError {
    PeerError::new(
        ErrorCode::NoQuorum,
        format!(
            "write refused: object {oid} has {have} live replica{} but {need} are needed (min_copies)",
            if have == 1 { "" } else { "s" }
        ),
    )
}

/// Marks `to`'s replica of `oid` stale: on the node itself if it answers, else in the
/// cluster's stale registry (which the node consults when it rejoins). Fails only if
/// neither worked, in which case the write must not be acknowledged.
async fn mark_stale(node: &Node, to: &NodeInfo, oid: Oid, epoch: u32) -> Result<(), PeerError> {
    let h = object_header(Opcode::MarkStale, epoch, oid, 0, 0);
    let direct = node.call(to, h, Vec::new(), Duration::from_secs(2)).await;
    let registry = node.driver.mark_stale(oid, to.uuid).await;
    match (direct, registry) {
        (_, Ok(())) | (Ok(_), _) => Ok(()),
        (Err(_), Err(e)) => Err(PeerError::new(
            ErrorCode::Io,
            format!(
                "object {oid}: replica on {} missed a write and cannot be marked stale: {e}",
                to.addr
            ),
        )),
    }
}

/// Reads a range of `oid` from one replica: this node first, then the others in
/// placement order. A replica whose copy fails its checksum is repaired from the good
/// copy after the read succeeds.
pub async fn read_object_replicas(
    node: &Node,
    oid: Oid,
    offset: u64,
    len: u32,
    copies: usize,
) -> Result<Vec<u8>, PeerError> {
    read_object_replicas_flagged(node, oid, offset, len, copies, 0).await
}

/// [`read_object_replicas`] with extra request flags (`FLAG_RECOVERY` for reads made
/// by recovery itself, which never trigger recovery in turn).
pub async fn read_object_replicas_flagged(
    node: &Node,
    oid: Oid,
    offset: u64,
    len: u32,
    copies: usize,
    flags: u32,
) -> Result<Vec<u8>, PeerError> {
    for _ in 0..ATTEMPTS_MAX {
        let view = node.view();
        if !view.serving {
            node.refresh().await?;
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        }
        let mut targets = view.replicas(oid, copies);
        if let Some(i) = targets.iter().position(|t| t.uuid == node.uuid) {
            let me = targets.remove(i);
            targets.insert(0, me);
        }
        let mut h = object_header(Opcode::ReadObj, view.epoch(), oid, offset, len);
        h.flags |= flags;
        let mut bad = Vec::new();
        let mut errors = Vec::new();
        let mut codes = Vec::new();
        let mut moved = false;
        for t in &targets {
            match node.call(t, h, Vec::new(), OBJECT_CALL_TIMEOUT).await {
                Ok((_, data)) if data.len() == len as usize => {
                    for b in &bad {
                        repair(node, b, t, oid, view.epoch()).await;
                    }
                    return Ok(data);
                }
                Ok((_, data)) => {
                    codes.push(ErrorCode::Io);
                    errors.push(format!("{}: short read of {} bytes", t.addr, data.len()));
                }
                Err(e) if epoch_moved(&e) => {
                    moved = true;
                    break;
                }
                Err(e) => {
                    codes.push(e.code());
                    if e.code() == ErrorCode::Checksum {
                        bad.push(t.clone());
                    }
                    errors.push(format!("{}: {e}", t.addr));
                }
            }
        }
        if moved {
            node.refresh().await?;
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        }
        let all_absent = !codes.is_empty() && codes.iter().all(|c| *c == ErrorCode::NotFound);
        if targets.is_empty() {
            return Err(PeerError::new(
                ErrorCode::NoQuorum,
                format!("object {oid}: no live replica"),
            ));
        }
        // The owners cannot serve it (not recovered yet, or all failed): read the newest
        // copy in the cluster, wherever it is, as recovery would.
        if !(all_absent && oid.is_inode()) {
            if let Some(data) = read_newest_anywhere(node, oid, offset, len, view.epoch()).await {
                return Ok(data);
            }
        }
        let code = if all_absent {
            ErrorCode::NotFound
        } else {
            ErrorCode::NotRecovered
        };
        return Err(PeerError::new(
            code,
            format!(
                "object {oid}: no replica could serve the read ({})",
                errors.join("; ")
            ),
        ));
    }
    Err(PeerError::new(
        ErrorCode::Io,
        format!("object {oid}: too many epoch changes"),
    ))
}

/// Read-repair: copies the whole object from `good` over `bad`'s corrupt copy, with the
/// good copy's stamp. Best effort; a failure leaves the copy to recovery.
async fn repair(node: &Node, bad: &NodeInfo, good: &NodeInfo, oid: Oid, epoch: u32) {
    let result: Result<(), ClientError> = async {
        let stamp = node
            .call(
                good,
                object_header(Opcode::ObjStamp, epoch, oid, 0, 0),
                Vec::new(),
                OBJECT_CALL_TIMEOUT,
            )
            .await?
            .0;
        let Some(size) = node.store().map(|s| oid.capacity(s.object_size())) else {
            return Ok(());
        };
        let mut h = object_header(Opcode::ReadObj, epoch, oid, 0, size as u32);
        h.flags |= FLAG_RECOVERY;
        let (_, data) = node.call(good, h, Vec::new(), OBJECT_CALL_TIMEOUT).await?;
        let mut w = object_header(Opcode::WriteObj, epoch, oid, 0, data.len() as u32);
        w.generation = stamp.generation;
        w.flags |= FLAG_DURABLE;
        node.call(bad, w, data, OBJECT_CALL_TIMEOUT).await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            tracing::warn!(%oid, node = %bad.uuid, "repaired a replica that failed its checksum")
        }
        Err(e) => tracing::error!(%oid, node = %bad.uuid, error = %e, "read-repair failed"),
    }
}

/// Reads a range from a member holding the newest copy of `oid` (by version stamp, among
/// every member), with a recovery read, which serves copies not yet verified: the newest
/// copy is current by definition.
async fn read_newest_anywhere(
    node: &Node,
    oid: Oid,
    offset: u64,
    len: u32,
    epoch: u32,
) -> Option<Vec<u8>> {
    let members = node.view().membership.members.clone();
    let stamps = join_all(members.iter().map(|m| {
        node.call(
            m,
            object_header(Opcode::ObjStamp, epoch, oid, 0, 0),
            Vec::new(),
            OBJECT_CALL_TIMEOUT,
        )
    }))
    .await;
    let found: Vec<((u64, u32), &NodeInfo)> = members
        .iter()
        .zip(stamps)
        .filter_map(|(m, r)| r.ok().map(|(h, _)| ((h.generation, h.epoch), m)))
        .collect();
    let newest = found.iter().map(|(s, _)| *s).max()?;
    for (_, m) in found.iter().filter(|(s, _)| *s == newest) {
        let mut h = object_header(Opcode::ReadObj, epoch, oid, offset, len);
        h.flags |= FLAG_RECOVERY;
        if let Ok((_, data)) = node.call(m, h, Vec::new(), OBJECT_CALL_TIMEOUT).await {
            if data.len() == len as usize {
                return Some(data);
            }
        }
    }
    None
}

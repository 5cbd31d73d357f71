//! The gateway: VDI data I/O through the data table, replicated to every live replica.
//!
//! Writes to one object are ordered here: a striped per-object lock is held from the
//! write's generation being assigned until every replica answered, so replicas see an
//! object's writes in generation order and creation happens once. A write is
//! acknowledged when every live replica of the current epoch applied it, and never with
//! fewer than `min_copies`; a replica that failed a write the others applied is marked
//! stale before the acknowledgement.

use crate::node::Node;
use crate::replicate::{
    read_object_replicas, read_object_replicas_flagged, replicate, replicate_bytes, replicate_len,
    Policy, WriteKind,
};
use futures::future::join_all;
use proto::inode::{decode_table, split_range, table_entry_offset, VdiHeader};
use proto::oid::INODE_HEADER_SIZE;
use proto::{ErrorCode, Oid, PeerError, Vid};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use uuid::Uuid;

/// How long a flush waits for a dead node to leave the membership.
const FLUSH_SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Object pieces of one request processed at once.
const PIECES_IN_FLIGHT_MAX: usize = 16;

/// A VDI as the gateway caches it: its header and data table.
pub struct VdiState {
    header: RwLock<VdiHeader>,
    table: RwLock<Vec<Vid>>,
    /// Writes to overlapping ranges of an object go to its replicas in order.
    ranges: crate::ranges::RangeLocks,
    /// Nodes that applied unsynced writes of this VDI since the last flush began.
    unsynced: Mutex<HashSet<Uuid>>,
    /// Orders flushes: one does not return while an earlier one's syncs still run.
    flush_order: tokio::sync::Mutex<()>,
    /// Table entries written but not yet durable (until the next flush).
    unsynced_entries: Mutex<HashSet<u32>>,
    /// VDI lock generation carried by writes (fencing token); 0 when unlocked.
    fence: AtomicU64,
}

impl VdiState {
    pub fn header(&self) -> VdiHeader {
        self.header
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn entry(&self, index: u32) -> Vid {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        t.get(index as usize).copied().unwrap_or(0)
    }

    fn set_entry(&self, index: u32, vid: Vid) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        if t.len() <= index as usize {
            t.resize(index as usize + 1, 0);
        }
        t[index as usize] = vid;
    }

    /// The replication policy of this VDI's writes.
    pub fn policy(&self, durable: bool) -> Policy {
        let h = self.header.read().unwrap_or_else(|p| p.into_inner());
        Policy {
            copies: h.copies as usize,
            min_copies: h.min_copies as usize,
            durable,
            fence: self.fence.load(Ordering::Acquire),
        }
    }

    /// Sets the lock generation this gateway's writes carry (0 when it holds no lock).
    pub fn set_fence(&self, fence: u64) {
        self.fence.store(fence, Ordering::Release);
    }

    fn entry_unsynced(&self, index: u32) -> bool {
        self.unsynced_entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&index)
    }

    fn note_entry(&self, index: u32, durable: bool) {
        let mut e = self
            .unsynced_entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if durable {
            e.remove(&index);
        } else {
            e.insert(index);
        }
    }

    /// Records the nodes of an unsynced write for the next flush.
    fn note_unsynced(&self, durable: bool, nodes: Vec<Uuid>) {
        if !durable {
            self.unsynced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(nodes);
        }
    }

    /// Indices of the data objects this VDI owns.
    pub fn owned_indices(&self) -> Vec<u32> {
        let vid = self.header.read().unwrap_or_else(|p| p.into_inner()).vid;
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        t.iter()
            .enumerate()
            .filter(|(_, &e)| e == vid)
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Number of data objects this VDI owns.
    pub fn allocated(&self) -> u64 {
        let vid = self.header.read().unwrap_or_else(|p| p.into_inner()).vid;
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        t.iter().filter(|&&e| e == vid).count() as u64
    }
}

/// The gateway's cache of open VDIs.
#[derive(Default)]
pub struct Gateway {
    vdis: Mutex<HashMap<Vid, Arc<VdiState>>>,
}

impl Gateway {
    fn get(&self, vid: Vid) -> Option<Arc<VdiState>> {
        self.vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vid)
            .cloned()
    }

    /// Drops a VDI from the cache (after delete, or to force a reload).
    pub fn forget(&self, vid: Vid) {
        self.vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vid);
    }
}

/// How much of a cached VDI to reload from its inode when opening it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Use the cache as it is (entries marked unwritten are still re-checked on read).
    Cached,
    /// Reload the header (size and settings may have been changed through another node).
    Header,
    /// Reload header and data table (for listings and deletes that count objects).
    All,
}

/// Opens a VDI, from the gateway's cache where it is there.
pub async fn open_vdi(node: &Node, vid: Vid, refresh: Refresh) -> Result<Arc<VdiState>, PeerError> {
    if let Some(v) = node.gateway.get(vid) {
        if refresh != Refresh::Cached {
            let h = load_header(node, vid).await?;
            if refresh == Refresh::All {
                let table = load_table(node, vid, h.object_count()).await?;
                *v.table.write().unwrap_or_else(|p| p.into_inner()) = table;
            }
            *v.header.write().unwrap_or_else(|p| p.into_inner()) = h;
        }
        return Ok(v);
    }
    let header = load_header(node, vid).await?;
    let table = load_table(node, vid, header.object_count()).await?;
    let state = Arc::new(VdiState {
        header: RwLock::new(header),
        table: RwLock::new(table),
        ranges: crate::ranges::RangeLocks::default(),
        unsynced: Mutex::new(HashSet::new()),
        flush_order: tokio::sync::Mutex::new(()),
        unsynced_entries: Mutex::new(HashSet::new()),
        fence: AtomicU64::new(0),
    });
    let mut vdis = node.gateway.vdis.lock().unwrap_or_else(|p| p.into_inner());
    Ok(vdis.entry(vid).or_insert(state).clone())
}

/// Reads the first `count` entries of a VDI's data table.
async fn load_table(node: &Node, vid: Vid, count: u32) -> Result<Vec<Vid>, PeerError> {
    let bytes = read_inode(node, vid, INODE_HEADER_SIZE, 4 * count).await?;
    Ok(decode_table(&bytes))
}

/// Reads a VDI's header from its inode object.
pub async fn load_header(node: &Node, vid: Vid) -> Result<VdiHeader, PeerError> {
    load_header_flagged(node, vid, 0).await
}

/// A header read for recovery: it never triggers (unthrottled) on-demand recovery of the
/// inode. The fields recovery needs (copies) never change after creation.
pub async fn load_header_for_recovery(node: &Node, vid: Vid) -> Result<VdiHeader, PeerError> {
    load_header_flagged(node, vid, proto::frame::FLAG_RECOVERY).await
}

async fn load_header_flagged(node: &Node, vid: Vid, flags: u32) -> Result<VdiHeader, PeerError> {
    let copies = node.view().data_nodes().max(1);
    let b = read_object_replicas_flagged(
        node,
        Oid::inode(vid),
        0,
        INODE_HEADER_SIZE as u32,
        copies,
        flags,
    )
    .await
    .map_err(|e| {
        if e.code == ErrorCode::NotFound {
            PeerError::new(
                ErrorCode::NoSuchVdi,
                format!("vid {vid} has no inode object"),
            )
        } else {
            e
        }
    })?;
    VdiHeader::decode(&b)
        .map_err(|e| PeerError::new(ErrorCode::Io, format!("inode of vid {vid}: {e}")))
}

/// Reads from a VDI's inode object. The inode's replica count is only known once its
/// header is read, so every data node is tried in placement order (a prefix of that
/// order is the inode's replica set).
async fn read_inode(node: &Node, vid: Vid, offset: u64, len: u32) -> Result<Vec<u8>, PeerError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let copies = node.view().data_nodes().max(1);
    read_object_replicas(node, Oid::inode(vid), offset, len, copies)
        .await
        .map_err(|e| {
            if e.code == ErrorCode::NotFound {
                PeerError::new(
                    ErrorCode::NoSuchVdi,
                    format!("vid {vid} has no inode object"),
                )
            } else {
                e
            }
        })
}

/// Reads `len` bytes of a VDI at `offset` (checked against its size by the caller).
pub async fn read(
    node: &Node,
    vdi: &VdiState,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, PeerError> {
    let h = vdi.header();
    let pieces = split_range(offset, len, h.object_size);
    let mut out = vec![0u8; len as usize];
    let mut pos = 0usize;
    let mut jobs = Vec::with_capacity(pieces.len());
    for (index, in_obj, n) in pieces {
        jobs.push((pos, index, in_obj, n));
        pos += n as usize;
    }
    for chunk in jobs.chunks(PIECES_IN_FLIGHT_MAX) {
        let reads = chunk
            .iter()
            .map(|&(_, index, in_obj, n)| read_object(node, vdi, &h, index, in_obj, n as u32));
        let results = join_all(reads).await;
        for (&(at, _, _, n), r) in chunk.iter().zip(results) {
            let data = r?;
            out[at..at + n as usize].copy_from_slice(&data);
        }
    }
    Ok(out)
}

async fn read_object(
    node: &Node,
    vdi: &VdiState,
    h: &VdiHeader,
    index: u32,
    offset: u64,
    len: u32,
) -> Result<Vec<u8>, PeerError> {
    let mut owner = vdi.entry(index);
    if owner == 0 {
        // Another gateway may have written it since we loaded the table.
        owner = refresh_entry(node, vdi, h, index).await?;
    }
    if owner == 0 {
        return Ok(vec![0u8; len as usize]);
    }
    let read = read_object_replicas(
        node,
        Oid::data(owner, index),
        offset,
        len,
        h.copies as usize,
    )
    .await;
    match read {
        // No copy anywhere: another gateway may have freed it (whole-object TRIM)
        // since we cached the entry. The inode says.
        Err(e) if e.code == ErrorCode::NotFound => {
            vdi.set_entry(index, 0);
            if refresh_entry(node, vdi, h, index).await? == 0 {
                return Ok(vec![0u8; len as usize]);
            }
            Err(e)
        }
        other => other,
    }
}

async fn refresh_entry(
    node: &Node,
    vdi: &VdiState,
    h: &VdiHeader,
    index: u32,
) -> Result<Vid, PeerError> {
    let b = read_inode(node, h.vid, table_entry_offset(index), 4).await?;
    let owner = decode_table(&b).first().copied().unwrap_or(0);
    if owner != 0 {
        vdi.set_entry(index, owner);
    }
    Ok(owner)
}

/// Writes `data` at `offset` of a VDI (checked against its size by the caller).
/// `durable`: every replica makes it durable before the reply.
pub async fn write(
    node: &Node,
    vdi: &VdiState,
    offset: u64,
    data: &bytes::Bytes,
    durable: bool,
) -> Result<(), PeerError> {
    let h = vdi.header();
    let pieces = split_range(offset, data.len() as u64, h.object_size);
    let mut jobs = Vec::with_capacity(pieces.len());
    let mut pos = 0usize;
    for (index, in_obj, n) in pieces {
        jobs.push((index, in_obj, data.slice(pos..pos + n as usize)));
        pos += n as usize;
    }
    for chunk in jobs.chunks(PIECES_IN_FLIGHT_MAX) {
        let writes = chunk.iter().map(|(index, in_obj, d)| {
            write_object(node, vdi, &h, *index, *in_obj, d.clone(), durable)
        });
        for r in join_all(writes).await {
            r?;
        }
    }
    Ok(())
}

async fn write_object(
    node: &Node,
    vdi: &VdiState,
    h: &VdiHeader,
    index: u32,
    offset: u64,
    data: bytes::Bytes,
    durable: bool,
) -> Result<(), PeerError> {
    let _ordered = vdi
        .ranges
        .lock(index, offset, offset + data.len() as u64)
        .await;
    let oid = Oid::data(h.vid, index);
    let policy = vdi.policy(durable);
    let owner = vdi.entry(index);
    if owner == h.vid {
        let nodes = replicate_bytes(node, WriteKind::Write, oid, offset, data, policy).await?;
        vdi.note_unsynced(durable, nodes);
        if durable && vdi.entry_unsynced(index) {
            // The object was created by a write not yet flushed: a durable write must
            // make the table entry pointing at it durable too.
            set_table_entry(node, vdi, h, index, h.vid, true).await?;
        }
        return Ok(());
    }
    if owner != 0 {
        return Err(PeerError::new(
            ErrorCode::Unsupported,
            format!("object {index} of vid {} belongs to vid {owner}: copy-on-write is not supported yet", h.vid),
        ));
    }
    let nodes = replicate_bytes(node, WriteKind::Create, oid, offset, data, policy).await?;
    vdi.note_unsynced(durable, nodes);
    set_table_entry(node, vdi, h, index, h.vid, durable).await
}

/// Points table entry `index` at `owner` on the inode's replicas, then in the cache.
async fn set_table_entry(
    node: &Node,
    vdi: &VdiState,
    h: &VdiHeader,
    index: u32,
    owner: Vid,
    durable: bool,
) -> Result<(), PeerError> {
    let entry = owner.to_le_bytes();
    let nodes = replicate(
        node,
        WriteKind::Write,
        Oid::inode(h.vid),
        table_entry_offset(index),
        &entry,
        vdi.policy(durable),
    )
    .await?;
    vdi.note_unsynced(durable, nodes);
    vdi.set_entry(index, owner);
    vdi.note_entry(index, durable);
    Ok(())
}

/// Makes a range read as zeros. Whole objects are freed (unless `no_hole`): the object
/// is zeroed, its table entry cleared, then it is removed, so a crash between steps
/// never lets old data reappear. Partial ranges are punched; `no_hole` writes zeros.
pub async fn zero_range(
    node: &Node,
    vdi: &VdiState,
    offset: u64,
    len: u64,
    no_hole: bool,
    durable: bool,
) -> Result<(), PeerError> {
    let h = vdi.header();
    for (index, in_obj, n) in split_range(offset, len, h.object_size) {
        if no_hole {
            let zeros = bytes::Bytes::from(vec![0u8; n as usize]);
            write_object(node, vdi, &h, index, in_obj, zeros, durable).await?;
            continue;
        }
        let _ordered = vdi.ranges.lock(index, in_obj, in_obj + n).await;
        let owner = vdi.entry(index);
        if owner == 0 {
            continue;
        }
        if owner != h.vid {
            return Err(PeerError::new(
                ErrorCode::Unsupported,
                "trimming a shared (snapshot) object is not supported yet",
            ));
        }
        let oid = Oid::data(h.vid, index);
        let whole = in_obj == 0 && n == h.object_size as u64;
        let nodes = replicate_len(
            node,
            WriteKind::Punch,
            oid,
            in_obj,
            bytes::Bytes::new(),
            n,
            vdi.policy(durable || whole),
        )
        .await?;
        vdi.note_unsynced(durable || whole, nodes);
        if whole {
            set_table_entry(node, vdi, &h, index, 0, true).await?;
            let nodes = replicate(
                node,
                WriteKind::Remove,
                oid,
                0,
                &[],
                vdi.policy(true).with_min_copies(1),
            )
            .await?;
            vdi.note_unsynced(true, nodes);
        }
    }
    Ok(())
}

/// Allocation of a range from the data table: (length, allocated) runs in order.
pub async fn allocation(
    node: &Node,
    vdi: &VdiState,
    offset: u64,
    len: u64,
) -> Result<Vec<(u64, bool)>, PeerError> {
    let h = vdi.header();
    let pieces = split_range(offset, len, h.object_size);
    if let (Some(first), Some(last)) = (pieces.first(), pieces.last()) {
        // One inode read refreshes every entry of the range that looks unwritten (another
        // gateway may have written since we loaded the table).
        if (first.0..=last.0).any(|i| vdi.entry(i) == 0) {
            refresh_entries(node, vdi, h.vid, first.0, last.0 - first.0 + 1).await?;
        }
    }
    let mut runs: Vec<(u64, bool)> = Vec::new();
    for (index, _, n) in pieces {
        let allocated = vdi.entry(index) != 0;
        match runs.last_mut() {
            Some((l, a)) if *a == allocated => *l += n,
            _ => runs.push((n, allocated)),
        }
    }
    Ok(runs)
}

/// FLUSH: makes every write this gateway acknowledged for the VDI before the call
/// durable, by syncing each node that applied one of them exactly once. Flushes are
/// ordered. A node that left the cluster is skipped once the new epoch is installed
/// (its replicas are no longer part of the VDI's live copies); a failed sync on a live
/// node fails the flush (EIO) and the node stays due for the next one.
pub async fn flush(node: &Node, vdi: &VdiState) -> Result<(), PeerError> {
    let _ordered = vdi.flush_order.lock().await;
    let due: Vec<Uuid> =
        std::mem::take(&mut *vdi.unsynced.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect();
    let entries: Vec<u32> = vdi
        .unsynced_entries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect();
    let results = join_all(due.iter().map(|u| sync_node(node, *u))).await;
    let mut unreached = Vec::new();
    let mut first_err = None;
    for (u, r) in due.iter().zip(results) {
        match r {
            Ok(()) => {}
            Err(e) => {
                // A node that never answered stays due. A node whose sync failed is not
                // retried: its store has quarantined what it could not make durable,
                // and a later "successful" sync must not hide that loss.
                if e.code == ErrorCode::Unreachable {
                    unreached.push(*u);
                }
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        vdi.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(unreached);
        return Err(e);
    }
    // The entries written before this flush are durable now (their nodes were synced).
    let mut unsynced = vdi
        .unsynced_entries
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for i in entries {
        unsynced.remove(&i);
    }
    Ok(())
}

/// Syncs one node, waiting (bounded) for a new epoch if it does not answer.
async fn sync_node(node: &Node, uuid: Uuid) -> Result<(), PeerError> {
    let deadline = std::time::Instant::now() + FLUSH_SETTLE_TIMEOUT;
    loop {
        let view = node.view();
        let Some(member) = view.member(uuid).cloned() else {
            tracing::warn!(node = %uuid, "flush: node left the cluster; its replicas are no longer live");
            return Ok(());
        };
        let h = proto::Header::request(proto::Opcode::SyncAll, 0, view.epoch());
        match node
            .call(
                &member,
                h,
                Vec::new(),
                crate::replicate::OBJECT_CALL_TIMEOUT,
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.is_unreachable() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                node.refresh().await?;
            }
            Err(e) if e.is_unreachable() => {
                return Err(PeerError::new(
                    ErrorCode::Unreachable,
                    format!(
                        "flush: node {} ({}) does not answer: {e}",
                        uuid, member.addr
                    ),
                ));
            }
            Err(e) => {
                return Err(PeerError::new(
                    ErrorCode::Io,
                    format!("flush: sync of node {} ({}) failed: {e}", uuid, member.addr),
                ));
            }
        }
    }
}

/// Writes again, to every inode replica, the table entries of objects this VDI owns
/// among `indices`. After a gateway crashed in the middle of creating an object, some
/// inode replicas may lack the entry the others have; a resumed cache re-asserts the
/// entries of what it pushes.
pub async fn reassert_entries(
    node: &Node,
    vdi: &VdiState,
    indices: &[u32],
) -> Result<(), PeerError> {
    let h = vdi.header();
    for &index in indices {
        if vdi.entry(index) == h.vid {
            set_table_entry(node, vdi, &h, index, h.vid, false).await?;
        }
    }
    Ok(())
}

/// Reloads `count` table entries from `first` in one inode read.
async fn refresh_entries(
    node: &Node,
    vdi: &VdiState,
    vid: Vid,
    first: u32,
    count: u32,
) -> Result<(), PeerError> {
    let b = read_inode(node, vid, table_entry_offset(first), 4 * count).await?;
    for (i, owner) in decode_table(&b).into_iter().enumerate() {
        vdi.set_entry(first + i as u32, owner);
    }
    Ok(())
}

/// The owner of a table entry, refreshed from the inode when the cache says "never written".
pub async fn owner_of(node: &Node, vdi: &VdiState, index: u32) -> Result<Vid, PeerError> {
    let owner = vdi.entry(index);
    if owner != 0 {
        return Ok(owner);
    }
    refresh_entry(node, vdi, &vdi.header(), index).await
}

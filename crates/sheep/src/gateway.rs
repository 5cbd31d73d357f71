//! The gateway: VDI data I/O through the data table, replicated to every live replica.
//!
//! Writes to one object are ordered here: a striped per-object lock is held from the
//! write's generation being assigned until every replica answered, so replicas see an
//! object's writes in generation order and creation happens once. A write is
//! acknowledged when every live replica of the current epoch applied it, and never with
//! fewer than `min_copies`; a replica that failed a write the others applied is marked
//! stale before the acknowledgement.

use crate::node::Node;
use futures::future::join_all;
use crate::replicate::{read_object_replicas, replicate, WriteKind};
use proto::inode::{decode_table, split_range, table_entry_offset, VdiHeader};
use proto::oid::INODE_HEADER_SIZE;
use proto::{ErrorCode, Oid, PeerError, Vid};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// Stripes of per-object write locks per VDI.
const WRITE_STRIPES: usize = 256;
/// Object pieces of one request processed at once.
const PIECES_IN_FLIGHT_MAX: usize = 16;

/// A VDI as the gateway caches it: its header and data table.
pub struct VdiState {
    header: RwLock<VdiHeader>,
    table: RwLock<Vec<Vid>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl VdiState {
    pub fn header(&self) -> VdiHeader {
        self.header.read().unwrap_or_else(|p| p.into_inner()).clone()
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
        self.vdis.lock().unwrap_or_else(|p| p.into_inner()).get(&vid).cloned()
    }

    /// Drops a VDI from the cache (after delete, or to force a reload).
    pub fn forget(&self, vid: Vid) {
        self.vdis.lock().unwrap_or_else(|p| p.into_inner()).remove(&vid);
    }
}

/// Opens a VDI: from the cache, reloading its header when `refresh_header` is set (so a
/// resize made through another node is seen).
pub async fn open_vdi(node: &Node, vid: Vid, refresh_header: bool) -> Result<Arc<VdiState>, PeerError> {
    if let Some(v) = node.gateway.get(vid) {
        if refresh_header {
            let h = load_header(node, vid).await?;
            *v.header.write().unwrap_or_else(|p| p.into_inner()) = h;
        }
        return Ok(v);
    }
    let header = load_header(node, vid).await?;
    let count = header.object_count();
    let table_bytes = read_inode(node, vid, INODE_HEADER_SIZE, 4 * count).await?;
    let state = Arc::new(VdiState {
        header: RwLock::new(header),
        table: RwLock::new(decode_table(&table_bytes)),
        stripes: (0..WRITE_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
    });
    let mut vdis = node.gateway.vdis.lock().unwrap_or_else(|p| p.into_inner());
    Ok(vdis.entry(vid).or_insert(state).clone())
}

/// Reads a VDI's header from its inode object.
pub async fn load_header(node: &Node, vid: Vid) -> Result<VdiHeader, PeerError> {
    let b = read_inode(node, vid, 0, INODE_HEADER_SIZE as u32).await?;
    VdiHeader::decode(&b).map_err(|e| PeerError::new(ErrorCode::Io, format!("inode of vid {vid}: {e}")))
}

/// Reads from a VDI's inode object. The inode's replica count is only known once its
/// header is read, so every data node is tried in placement order (a prefix of that
/// order is the inode's replica set).
async fn read_inode(node: &Node, vid: Vid, offset: u64, len: u32) -> Result<Vec<u8>, PeerError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let copies = node.view().data_nodes().max(1);
    read_object_replicas(node, Oid::inode(vid), offset, len, copies).await.map_err(|e| {
        if e.code == ErrorCode::NotFound {
            PeerError::new(ErrorCode::NoSuchVdi, format!("vid {vid} has no inode object"))
        } else {
            e
        }
    })
}

/// Reads `len` bytes of a VDI at `offset` (checked against its size by the caller).
pub async fn read(node: &Node, vdi: &VdiState, offset: u64, len: u64) -> Result<Vec<u8>, PeerError> {
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
        let reads = chunk.iter().map(|&(_, index, in_obj, n)| read_object(node, vdi, &h, index, in_obj, n as u32));
        let results = join_all(reads).await;
        for (&(at, _, _, n), r) in chunk.iter().zip(results) {
            let data = r?;
            out[at..at + n as usize].copy_from_slice(&data);
        }
    }
    Ok(out)
}

async fn read_object(node: &Node, vdi: &VdiState, h: &VdiHeader, index: u32, offset: u64, len: u32) -> Result<Vec<u8>, PeerError> {
    let mut owner = vdi.entry(index);
    if owner == 0 {
        // Another gateway may have written it since we loaded the table.
        owner = refresh_entry(node, vdi, h, index).await?;
    }
    if owner == 0 {
        return Ok(vec![0u8; len as usize]);
    }
    read_object_replicas(node, Oid::data(owner, index), offset, len, h.copies as usize).await
}

async fn refresh_entry(node: &Node, vdi: &VdiState, h: &VdiHeader, index: u32) -> Result<Vid, PeerError> {
    let b = read_inode(node, h.vid, table_entry_offset(index), 4).await?;
    let owner = decode_table(&b).first().copied().unwrap_or(0);
    if owner != 0 {
        vdi.set_entry(index, owner);
    }
    Ok(owner)
}

/// Writes `data` at `offset` of a VDI (checked against its size by the caller).
/// `durable`: every replica makes it durable before the reply.
pub async fn write(node: &Node, vdi: &VdiState, offset: u64, data: &[u8], durable: bool) -> Result<(), PeerError> {
    let h = vdi.header();
    let pieces = split_range(offset, data.len() as u64, h.object_size);
    let mut jobs = Vec::with_capacity(pieces.len());
    let mut pos = 0usize;
    for (index, in_obj, n) in pieces {
        jobs.push((index, in_obj, &data[pos..pos + n as usize]));
        pos += n as usize;
    }
    for chunk in jobs.chunks(PIECES_IN_FLIGHT_MAX) {
        let writes = chunk.iter().map(|&(index, in_obj, d)| write_object(node, vdi, &h, index, in_obj, d, durable));
        for r in join_all(writes).await {
            r?;
        }
    }
    Ok(())
}

async fn write_object(node: &Node, vdi: &VdiState, h: &VdiHeader, index: u32, offset: u64, data: &[u8], durable: bool) -> Result<(), PeerError> {
    let _ordered = vdi.stripes[index as usize % WRITE_STRIPES].lock().await;
    let oid = Oid::data(h.vid, index);
    let (copies, min) = (h.copies as usize, h.min_copies as usize);
    let owner = vdi.entry(index);
    if owner == h.vid {
        return replicate(node, WriteKind::Write, oid, offset, data, copies, min, durable).await;
    }
    if owner != 0 {
        return Err(PeerError::new(
            ErrorCode::Unsupported,
            format!("object {index} of vid {} belongs to vid {owner}: copy-on-write is not supported yet", h.vid),
        ));
    }
    replicate(node, WriteKind::Create, oid, offset, data, copies, min, durable).await?;
    let entry = h.vid.to_le_bytes();
    replicate(node, WriteKind::Write, Oid::inode(h.vid), table_entry_offset(index), &entry, copies, min, durable).await?;
    vdi.set_entry(index, h.vid);
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

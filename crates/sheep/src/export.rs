//! Every VDI served over NBD: the export provider and the block device the gateway
//! implements for one VDI.
//!
//! Export `NAME` is read-write and takes the VDI's lock (one writer per VDI, DESIGN.md
//! §6.9): a VDI locked by another gateway is refused with ERR_POLICY naming the holder.
//! Export `NAME/ro` serves the VDI read-only without the lock. The lock is released when
//! the last connection to the VDI on this gateway closes, after a final flush.
//!
//! Durability modes (DESIGN.md §5): `none` acknowledges once every replica applied a
//! write and syncs on FLUSH; `writethrough` makes every write durable on every replica
//! before acknowledging it. FUA writes are durable before the reply in every mode.

use crate::gateway::{self, open_vdi, Refresh, VdiState};
use crate::node::Node;
use crate::vdi::lookup;
use async_trait::async_trait;
use nbd::{BlockDevice, BlockError, ExportInfo, ExportProvider, Extent, NbdErrno, OpenError};
use proto::{ErrorCode, PeerError, Vid};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Suffix of the read-only export of a VDI (VDI names cannot contain '/').
pub const READ_ONLY_SUFFIX: &str = "/ro";

/// Maps a gateway error onto the NBD errno the client sees.
fn to_block_error(e: PeerError) -> BlockError {
    let errno = match e.code {
        ErrorCode::NoSpace => NbdErrno::NoSpc,
        ErrorCode::InvalidRequest | ErrorCode::TooLarge => NbdErrno::Inval,
        ErrorCode::Fenced | ErrorCode::Locked => NbdErrno::Perm,
        ErrorCode::Unsupported => NbdErrno::NotSup,
        ErrorCode::ShuttingDown => NbdErrno::Shutdown,
        _ => NbdErrno::Io,
    };
    BlockError {
        errno,
        message: e.message,
    }
}

/// The VDIs this gateway serves read-write, with their connection counts.
#[derive(Default)]
pub struct OpenExports {
    writers: tokio::sync::Mutex<HashMap<Vid, WriterEntry>>,
}

struct WriterEntry {
    connections: usize,
    generation: u64,
}

/// The NBD export catalogue of one node.
pub struct SheepExports {
    node: Weak<Node>,
}

impl SheepExports {
    pub fn new(node: &Arc<Node>) -> SheepExports {
        SheepExports {
            node: Arc::downgrade(node),
        }
    }

    fn node(&self) -> Result<Arc<Node>, OpenError> {
        self.node
            .upgrade()
            .ok_or_else(|| OpenError::Other("the server is shutting down".into()))
    }
}

#[async_trait]
impl ExportProvider for SheepExports {
    async fn list(&self) -> Vec<ExportInfo> {
        let Ok(node) = self.node() else {
            return Vec::new();
        };
        match node.driver.vdi_list().await {
            Ok(entries) => entries
                .into_iter()
                .map(|e| ExportInfo {
                    description: format!("Sheepdog VDI '{}' (vid {:#x})", e.name, e.vid),
                    name: e.name,
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list VDIs for NBD");
                Vec::new()
            }
        }
    }

    async fn open(
        &self,
        name: &str,
        _read_only_ok: bool,
    ) -> Result<Arc<dyn BlockDevice>, OpenError> {
        let node = self.node()?;
        let (vdi_name, read_only) = match name.strip_suffix(READ_ONLY_SUFFIX) {
            Some(base) => (base, true),
            None => (name, false),
        };
        let vid = match lookup(&node, vdi_name).await {
            Ok(v) => v,
            Err(e) if e.code == ErrorCode::NoSuchVdi => return Err(OpenError::Unknown),
            Err(e) => return Err(OpenError::Other(e.message)),
        };
        let vdi = open_vdi(&node, vid, Refresh::All)
            .await
            .map_err(|e| OpenError::Other(e.message))?;
        let fence = if read_only {
            0
        } else {
            acquire_writer(&node, vid, vdi_name).await?
        };
        if !read_only {
            vdi.set_fence(fence);
        }
        let h = vdi.header();
        let writethrough = h.cache_mode == "writethrough";
        tracing::info!(vdi = vdi_name, read_only, mode = %h.cache_mode, "NBD export opened");
        Ok(Arc::new(VdiDevice {
            node,
            vdi,
            vid,
            size: h.size,
            read_only,
            writethrough,
        }))
    }
}

/// Takes (or shares) the VDI's lock for a read-write connection.
async fn acquire_writer(node: &Arc<Node>, vid: Vid, name: &str) -> Result<u64, OpenError> {
    let mut writers = node.exports.writers.lock().await;
    if let Some(w) = writers.get_mut(&vid) {
        w.connections += 1;
        return Ok(w.generation);
    }
    match node.driver.lock_acquire(vid, node.uuid).await {
        Ok(lock) => {
            writers.insert(
                vid,
                WriterEntry {
                    connections: 1,
                    generation: lock.generation,
                },
            );
            Ok(lock.generation)
        }
        Err(cluster::ClusterError::Locked { holder, .. }) => {
            let addr = node
                .view()
                .member(holder)
                .map(|m| m.addr.clone())
                .unwrap_or_else(|| "unknown address".into());
            Err(OpenError::Policy(format!(
                "VDI '{name}' is locked by the gateway on node {holder} ({addr}); open export '{name}{READ_ONLY_SUFFIX}' for read-only access"
            )))
        }
        Err(e) => Err(OpenError::Other(format!("cannot lock VDI '{name}': {e}"))),
    }
}

/// Drops one connection's share of the lock; the last one flushes and releases it.
async fn release_writer(node: &Node, vdi: &VdiState, vid: Vid) {
    let mut writers = node.exports.writers.lock().await;
    let Some(w) = writers.get_mut(&vid) else {
        return;
    };
    w.connections -= 1;
    if w.connections > 0 {
        return;
    }
    let generation = w.generation;
    if let Err(e) = gateway::flush(node, vdi).await {
        // Keep the lock: the data is not durable, and no one else may write until it is.
        tracing::error!(vid, error = %e, "final flush failed; keeping the VDI lock");
        return;
    }
    writers.remove(&vid);
    vdi.set_fence(0);
    if let Err(e) = node.driver.lock_release(vid, node.uuid, generation).await {
        tracing::warn!(vid, error = %e, "releasing the VDI lock failed");
    }
}

/// One VDI as an NBD block device.
pub struct VdiDevice {
    node: Arc<Node>,
    vdi: Arc<VdiState>,
    vid: Vid,
    size: u64,
    read_only: bool,
    writethrough: bool,
}

#[async_trait]
impl BlockDevice for VdiDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // All connections to a VDI on this gateway share one VdiState, and a flush on
        // any of them syncs every node any of them wrote to.
        true
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BlockError> {
        gateway::read(&self.node, &self.vdi, offset, len as u64)
            .await
            .map_err(to_block_error)
    }

    async fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> Result<(), BlockError> {
        let durable = fua || self.writethrough;
        gateway::write(&self.node, &self.vdi, offset, &data, durable)
            .await
            .map_err(to_block_error)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        gateway::flush(&self.node, &self.vdi)
            .await
            .map_err(to_block_error)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), BlockError> {
        let durable = fua || self.writethrough;
        gateway::zero_range(&self.node, &self.vdi, offset, len as u64, false, durable)
            .await
            .map_err(to_block_error)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
        fast_zero: bool,
    ) -> Result<(), BlockError> {
        if fast_zero && no_hole {
            return Err(BlockError {
                errno: NbdErrno::NotSup,
                message: "zeroing without holes writes data; not fast".into(),
            });
        }
        let durable = fua || self.writethrough;
        gateway::zero_range(&self.node, &self.vdi, offset, len as u64, no_hole, durable)
            .await
            .map_err(to_block_error)
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, BlockError> {
        let runs = gateway::allocation(&self.node, &self.vdi, offset, len as u64)
            .await
            .map_err(to_block_error)?;
        Ok(runs
            .into_iter()
            .map(|(length, allocated)| Extent {
                length,
                hole: !allocated,
                zero: !allocated,
            })
            .collect())
    }

    async fn close(&self) {
        if !self.read_only {
            release_writer(&self.node, &self.vdi, self.vid).await;
        }
    }
}

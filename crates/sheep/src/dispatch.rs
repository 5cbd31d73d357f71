//! Routes a request to its handler: object ops on this node's store, admin and VDI ops,
//! and VDI data I/O through this node as the gateway.

use crate::error::{from_store, invalid};
use crate::node::Node;
use crate::{admin, recovery, vdi};
use proto::frame::{FLAG_DURABLE, FLAG_RECOVERY};
use proto::msg;
use proto::{ErrorCode, Header, Oid, Opcode, PeerError};
use store::Stamp;

/// A successful reply's content.
#[derive(Default)]
pub struct Outcome {
    pub payload: Vec<u8>,
    /// Version stamp generation, for ObjStamp and reads.
    pub generation: u64,
    /// Version stamp epoch when the reply carries a stamp; else the node's epoch is sent.
    pub epoch: Option<u32>,
}

impl Outcome {
    pub fn data(payload: Vec<u8>) -> Outcome {
        Outcome {
            payload,
            ..Outcome::default()
        }
    }

    pub fn json<T: serde::Serialize>(m: &T) -> Outcome {
        Outcome::data(msg::encode(m))
    }
}

pub async fn dispatch(
    node: &Node,
    op: Opcode,
    h: &Header,
    payload: client::Payload,
) -> Result<Outcome, PeerError> {
    if op.needs_epoch_match() {
        check_epoch(node, h).await?;
        return object_op(node, op, h, payload).await;
    }
    match op {
        Opcode::Hello => Err(invalid("hello may only be the first frame")),
        Opcode::SyncAll => sync_all(node).await,
        Opcode::NodeInfo => admin::node_info(node).await,
        Opcode::ClusterInfo => admin::cluster_info(node).await,
        Opcode::ClusterFormat => admin::format(node, &payload).await,
        Opcode::ClusterShutdown => admin::cluster_shutdown(node).await,
        Opcode::NodeShutdown => {
            node.request_shutdown();
            Ok(Outcome::default())
        }
        Opcode::DebugPowerCut => admin::power_cut(node).await,
        Opcode::NodeDrain => {
            node.drain_nbd().await;
            Ok(Outcome::default())
        }
        Opcode::ClusterForceStart => admin::force_start(node).await,
        Opcode::VdiCreate => vdi::create(node, &payload).await,
        Opcode::VdiDelete => vdi::delete(node, &payload).await,
        Opcode::VdiList => vdi::list(node).await,
        Opcode::VdiInfo => vdi::info(node, &payload).await,
        Opcode::VdiResize => vdi::resize(node, &payload).await,
        Opcode::VdiObject => vdi::object(node, &payload).await,
        Opcode::VdiSet => vdi::set(node, &payload).await,
        Opcode::VdiLockList => vdi::lock_list(node).await,
        Opcode::VdiUnlock => vdi::unlock(node, &payload).await,
        Opcode::ClusterCheck => crate::check::check(node, &payload).await,
        Opcode::VdiCacheInfo => crate::vdi::cache_info(node, &payload).await,
        Opcode::VdiCacheFlush => crate::vdi::cache_flush(node, &payload, false).await,
        Opcode::VdiCachePurge => crate::vdi::cache_flush(node, &payload, true).await,
        Opcode::RecoveryInfo => Ok(Outcome::json(&node.recovery.info())),
        Opcode::RecoveryThrottle => {
            let req: msg::ThrottleRequest =
                msg::decode(&payload).map_err(|e| invalid(e.to_string()))?;
            node.recovery.throttle.set_rate(req.bytes_per_sec);
            tracing::info!(bytes_per_sec = req.bytes_per_sec, "recovery throttle set");
            Ok(Outcome::json(&node.recovery.info()))
        }
        Opcode::VdiRead => vdi::read(node, h).await,
        Opcode::VdiWrite => vdi::write(node, h, payload.into_data()).await,
        _ => Err(invalid(format!("opcode {op:?} is not served here"))),
    }
}

/// Makes every completed write durable. When the sync fails, data may be lost: every
/// object changed since the last sync is marked stale here (recovered, never served),
/// and the error is returned; the sync is never retried into a false success.
async fn sync_all(node: &Node) -> Result<Outcome, PeerError> {
    let store = node.store_or_err()?;
    let s2 = store.clone();
    match tokio::task::spawn_blocking(move || s2.sync_all()).await {
        Ok(Ok(())) => Ok(Outcome::default()),
        Ok(Err(store::StoreError::SyncFailed { oids, source })) => {
            tracing::error!(objects = oids.len(), error = %source, "sync failed; marking changed objects stale");
            let count = oids.len();
            let _ = blocking(move || {
                for oid in oids {
                    store.mark_stale(oid)?;
                }
                Ok(())
            })
            .await;
            Err(PeerError::new(
                ErrorCode::Io,
                format!("sync failed ({source}); {count} object(s) marked stale"),
            ))
        }
        Ok(Err(e)) => Err(from_store(e)),
        Err(e) => Err(PeerError::new(
            ErrorCode::Internal,
            format!("store task failed: {e}"),
        )),
    }
}

/// Object ops are served only by a member at the sender's epoch. A sender ahead of us
/// makes us refresh first; a sender behind gets `StaleEpoch` with our epoch.
async fn check_epoch(node: &Node, h: &Header) -> Result<(), PeerError> {
    let mut view = node.view();
    if h.epoch > view.epoch() || !view.serving {
        view = node.refresh().await?;
    }
    if !view.serving {
        return Err(PeerError::new(
            ErrorCode::NotServing,
            "this node is not a member of the current epoch; it serves nothing until it rejoins",
        ));
    }
    if h.epoch != view.epoch() {
        return Err(PeerError::new(
            ErrorCode::StaleEpoch,
            format!(
                "request at epoch {}, this node is at epoch {}",
                h.epoch,
                view.epoch()
            ),
        ));
    }
    Ok(())
}

async fn object_op(
    node: &Node,
    op: Opcode,
    h: &Header,
    payload: client::Payload,
) -> Result<Outcome, PeerError> {
    let store = node.store_or_err()?;
    let oid = Oid::from_raw(h.oid).map_err(|e| invalid(e.to_string()))?;
    let stamp = Stamp {
        epoch: h.epoch,
        generation: h.generation,
    };
    let durable = h.has_flag(FLAG_DURABLE);
    let (offset, length) = (h.offset, h.length);
    if matches!(
        op,
        Opcode::WriteObj | Opcode::CreateAndWrite | Opcode::PunchObj | Opcode::RemoveObj
    ) {
        node.check_fence(oid.vid(), h.fence)?;
    }
    let recovery_read = h.has_flag(FLAG_RECOVERY);
    match op {
        // A client read of a copy not yet compared with the cluster's: compare first.
        Opcode::ReadObj if !recovery_read && node.recovery.is_unverified(oid) => {
            recovery::ensure_current(node, oid).await?
        }
        // Writes reach only owners: a missing or unverified copy is recovered first.
        Opcode::WriteObj | Opcode::PunchObj
            if node.recovery.is_unverified(oid) || !store.contains(oid) =>
        {
            recovery::ensure_current(node, oid).await?
        }
        _ => {}
    }
    // Writes share the object's recovery stripe, so a recovered copy is never installed
    // over them (recovery holds it exclusively while it replaces a copy).
    let _shared = match op {
        Opcode::WriteObj | Opcode::CreateAndWrite | Opcode::PunchObj | Opcode::RemoveObj => {
            Some(node.recovery.stripe(oid).read().await)
        }
        _ => None,
    };
    match op {
        Opcode::ReadObj => {
            let data = blocking(move || store.read(oid, offset, length)).await?;
            Ok(Outcome::data(data))
        }
        Opcode::WriteObj => {
            // A small page-cache write is applied in place: a hand-off to a blocking
            // thread and back costs more than the write itself.
            if !durable {
                if let Some(done) = store.try_write_now(oid, offset, summed(&payload), stamp) {
                    done.map_err(from_store)?;
                    return Ok(Outcome::default());
                }
            }
            blocking(move || store.write(oid, offset, summed(&payload), stamp, durable)).await?;
            Ok(Outcome::default())
        }
        Opcode::CreateAndWrite => {
            blocking(move || store.create_and_write(oid, offset, summed(&payload), stamp, durable))
                .await?;
            Ok(Outcome::default())
        }
        Opcode::PunchObj => {
            blocking(move || store.punch(oid, offset, length as u64, stamp, durable)).await?;
            Ok(Outcome::default())
        }
        Opcode::RemoveObj => {
            blocking(move || store.remove(oid, durable)).await?;
            Ok(Outcome::default())
        }
        Opcode::MarkStale => {
            blocking(move || store.mark_stale(oid)).await?;
            Ok(Outcome::default())
        }
        Opcode::ListObjs => Ok(Outcome::data(recovery::encode_list(
            &recovery::local_list(node).await?,
        ))),
        Opcode::RecoverObj => {
            recovery::ensure_current(node, oid).await?;
            Ok(Outcome::default())
        }
        Opcode::ObjChecksum => {
            let size = oid.capacity(store.object_size());
            let (data, s) =
                blocking(move || Ok((store.read(oid, 0, size as u32)?, store.stamp(oid)?))).await?;
            Ok(Outcome {
                payload: crc32c::crc32c(&data).to_le_bytes().to_vec(),
                generation: s.generation,
                epoch: Some(s.epoch),
            })
        }
        Opcode::ObjStamp => {
            let s = blocking(move || store.stamp(oid)).await?;
            Ok(Outcome {
                payload: Vec::new(),
                generation: s.generation,
                epoch: Some(s.epoch),
            })
        }
        _ => Err(invalid(format!("{op:?} is not an object op"))),
    }
}

/// A payload for the store, with the block crcs its frame was checked through (or
/// sealed with): they become the block tags without another pass over the data.
fn summed(p: &client::Payload) -> store::Summed<'_> {
    store::Summed {
        data: p,
        block_crcs: p.block_crcs(),
    }
}

/// Runs a store call on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, store::StoreError> + Send + 'static,
) -> Result<T, PeerError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(from_store),
        Err(e) => Err(PeerError::new(
            ErrorCode::Internal,
            format!("store task failed: {e}"),
        )),
    }
}

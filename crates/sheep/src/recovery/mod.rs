//! Recovery (DESIGN.md §7): after every epoch change each node pulls the objects it now
//! owns from the nodes holding the newest copy, replaces stale copies, drops copies of
//! deleted VDIs, and removes copies it no longer owns once their owners hold them.
//!
//! A local copy is *unverified* from the moment the node (re)starts until recovery (or
//! an on-demand check) has compared its version stamp with every member's: unverified
//! copies are never served to clients, so a node that comes back with old copies never
//! serves them as current. An object a client touches is recovered (or verified) first.
//! Recovered objects are created atomically and durably before they count.

pub mod plan;
pub mod throttle;

use crate::dispatch::blocking;
use crate::gateway::load_header_for_recovery;
use crate::node::Node;
use crate::replicate::OBJECT_CALL_TIMEOUT;
use client::ClientError;
use futures::future::join_all;
use plan::{plan, Fetch, PlanInput};
use proto::frame::FLAG_RECOVERY;
pub use proto::msg::RecoveryInfo;
use proto::{ErrorCode, Header, Oid, Opcode, PeerError, Vid};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::Stamp;
use throttle::Throttle;
use tokio::sync::Notify;

/// Stripes of per-object recovery locks.
const RECOVERY_STRIPES: usize = 256;
/// Pause after an epoch change before a round starts, so bursts of changes coalesce.
const SETTLE_DELAY: Duration = Duration::from_millis(300);
/// How often a node with copies still to hand off tries again.
const HANDOFF_RETRY: Duration = Duration::from_secs(3);
/// Bytes per entry of an object list: oid u64, epoch u32, generation u64.
const LIST_ENTRY_LEN: usize = 20;

/// Recovery state shared by the background task and on-demand recovery.
pub struct Recovery {
    info: Mutex<RecoveryInfo>,
    pub throttle: Throttle,
    unverified: Mutex<HashSet<Oid>>,
    /// Per-object exclusion: replica writes hold a stripe shared, recovery's replacement
    /// of a copy holds it exclusively, so a recovered copy never overwrites a write.
    stripes: Vec<tokio::sync::RwLock<()>>,
    wake: Notify,
    window: Mutex<(Instant, u64)>,
}

impl Recovery {
    pub fn new(throttle_bps: u64) -> Recovery {
        Recovery {
            info: Mutex::new(RecoveryInfo::default()),
            throttle: Throttle::new(throttle_bps),
            unverified: Mutex::new(HashSet::new()),
            stripes: (0..RECOVERY_STRIPES)
                .map(|_| tokio::sync::RwLock::new(()))
                .collect(),
            wake: Notify::new(),
            window: Mutex::new((Instant::now(), 0)),
        }
    }

    pub fn info(&self) -> RecoveryInfo {
        let mut i = self.info.lock().unwrap_or_else(|p| p.into_inner()).clone();
        i.throttle_bps = self.throttle.rate();
        i.unverified = self
            .unverified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64;
        i
    }

    /// Marks every copy in the store as unverified (at start, and after a rejoin).
    pub fn distrust(&self, oids: impl IntoIterator<Item = Oid>) {
        self.unverified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(oids);
    }

    pub fn is_unverified(&self, oid: Oid) -> bool {
        self.unverified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&oid)
    }

    fn verified(&self, oid: Oid) {
        self.unverified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&oid);
    }

    /// Starts a round soon (after an epoch change).
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    fn update(&self, f: impl FnOnce(&mut RecoveryInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn count_bytes(&self, n: u64) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            let secs = now.duration_since(w.0).as_secs_f64();
            let rate = (w.1 as f64 / secs) as u64;
            self.update(|i| i.peak_rate_bps = i.peak_rate_bps.max(rate));
            *w = (now, 0);
        }
        w.1 += n;
        self.update(|i| {
            i.bytes += n;
            i.bytes_total += n;
        });
    }

    /// The exclusion stripe of `oid` (see the field's doc).
    pub fn stripe(&self, oid: Oid) -> &tokio::sync::RwLock<()> {
        &self.stripes[(oid.raw() % RECOVERY_STRIPES as u64) as usize]
    }
}

/// Encodes an object list for ListObjs.
pub fn encode_list(list: &[(Oid, Stamp)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len() * LIST_ENTRY_LEN);
    for (oid, s) in list {
        out.extend_from_slice(&oid.raw().to_le_bytes());
        out.extend_from_slice(&s.epoch.to_le_bytes());
        out.extend_from_slice(&s.generation.to_le_bytes());
    }
    out
}

/// Decodes an object list received from a peer.
pub fn decode_list(b: &[u8]) -> Result<Vec<(Oid, Stamp)>, PeerError> {
    if !b.len().is_multiple_of(LIST_ENTRY_LEN) {
        return Err(PeerError::new(
            ErrorCode::InvalidRequest,
            "object list of a bad length",
        ));
    }
    b.chunks_exact(LIST_ENTRY_LEN)
        .map(|c| {
            let raw = u64::from_le_bytes(c[0..8].try_into().unwrap_or_default());
            let epoch = u32::from_le_bytes(c[8..12].try_into().unwrap_or_default());
            let generation = u64::from_le_bytes(c[12..20].try_into().unwrap_or_default());
            let oid = Oid::from_raw(raw)
                .map_err(|e| PeerError::new(ErrorCode::InvalidRequest, e.to_string()))?;
            Ok((oid, Stamp::new(epoch, generation)))
        })
        .collect()
}

/// This node's objects with their stamps.
pub async fn local_list(node: &Node) -> Result<Vec<(Oid, Stamp)>, PeerError> {
    let store = node.store_or_err()?;
    blocking(move || {
        let mut out = Vec::new();
        for oid in store.list()? {
            match store.stamp(oid) {
                Ok(s) => out.push((oid, s)),
                Err(e) if e.is_corruption() => {
                    // A copy we cannot read the stamp of is quarantined, never listed.
                    tracing::error!(%oid, error = %e, "corrupt object; quarantining");
                    store.mark_stale(oid)?;
                }
                Err(store::StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    })
    .await
}

fn obj_header(op: Opcode, epoch: u32, oid: Oid, len: u32) -> Header {
    let mut h = Header::request(op, 0, epoch);
    h.oid = oid.raw();
    h.length = len;
    h
}

/// Runs recovery rounds until shutdown: one after every epoch change, and again while
/// copies remain to be handed off.
pub fn spawn(node: Arc<Node>) {
    tokio::spawn(async move {
        let mut shutdown = node.shutdown_signal();
        let mut membership = node.driver.subscribe();
        let mut pending = false;
        loop {
            let retry = tokio::time::sleep(if pending {
                HANDOFF_RETRY
            } else {
                Duration::from_secs(3600)
            });
            tokio::select! {
                _ = node.recovery.wake.notified() => {}
                c = membership.changed() => if c.is_err() { break },
                _ = retry => {}
                _ = shutdown.changed() => break,
            }
            tokio::time::sleep(SETTLE_DELAY).await;
            match run_round(&node).await {
                Ok(left) => pending = left > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "recovery round did not finish; retrying");
                    pending = true;
                }
            }
        }
    });
}

/// One round at the current epoch. Returns the number of copies still to hand off.
async fn run_round(node: &Node) -> Result<u64, PeerError> {
    let view = node.view();
    if !view.serving || node.store().is_none() || view.membership.config.is_none() {
        return Ok(0);
    }
    let epoch = view.epoch();
    let started = Instant::now();
    // What every member holds.
    let lists = join_all(view.membership.members.iter().map(|m| async move {
        if m.uuid == node.uuid {
            return (m.uuid, local_list(node).await);
        }
        let h = obj_header(Opcode::ListObjs, epoch, Oid::inode(1), 0);
        let r = node.call(m, h, Vec::new(), OBJECT_CALL_TIMEOUT).await;
        (
            m.uuid,
            r.map_err(|e| e.to_peer_error())
                .and_then(|(_, b)| decode_list(&b)),
        )
    }))
    .await;
    let mut holdings = HashMap::new();
    for (uuid, r) in lists {
        holdings.insert(uuid, r?);
    }
    // The registry is read after the lists: every listed object's VDI was registered
    // before the object was written, so a vid missing now was deleted (never reused).
    let entries = node
        .driver
        .vdi_list()
        .await
        .map_err(crate::error::from_cluster)?;
    let live: HashSet<Vid> = entries.iter().map(|e| e.vid).collect();
    let mut copies: HashMap<Vid, usize> = HashMap::new();
    for e in &entries {
        if let Ok(h) = load_header_for_recovery(node, e.vid).await {
            copies.insert(e.vid, h.copies as usize);
        }
    }
    // Objects of vids the registry has but whose header we could not read are left alone.
    let known: HashMap<Vid, usize> = copies;
    let mut holdings_known = holdings.clone();
    for list in holdings_known.values_mut() {
        list.retain(|(oid, _)| known.contains_key(&oid.vid()) || !live.contains(&oid.vid()));
    }
    let p = plan(&PlanInput {
        me: node.uuid,
        ring: &view.ring,
        copies: &known,
        holdings: &holdings_known,
    });
    node.recovery.update(|i| {
        i.epoch = epoch;
        i.running = true;
        i.to_recover = p.fetch.len() as u64;
        i.recovered = 0;
        i.failed = 0;
        i.bytes = 0;
    });
    for oid in &p.current {
        node.recovery.verified(*oid);
    }
    tracing::info!(
        epoch,
        fetch = p.fetch.len(),
        handoff = p.handoff.len(),
        deleted = p.deleted.len(),
        "recovery round"
    );
    let round = async {
        for f in &p.fetch {
            if node.view().epoch() != epoch {
                return Err(PeerError::new(
                    ErrorCode::StaleEpoch,
                    "epoch changed during recovery; restarting",
                ));
            }
            match fetch_object(node, f, epoch).await {
                Ok(()) => node.recovery.update(|i| i.recovered += 1),
                Err(e) => {
                    tracing::warn!(oid = %f.oid, error = %e, "could not recover object");
                    node.recovery.update(|i| i.failed += 1);
                }
            }
        }
        Ok(())
    };
    let result = round.await;
    let busy = started.elapsed().as_secs_f64();
    node.recovery.update(|i| {
        i.running = false;
        i.busy_secs_total += busy;
        i.rate_bps = if busy > 0.0 {
            (i.bytes as f64 / busy) as u64
        } else {
            0
        };
        if result.is_ok() && i.failed == 0 {
            i.done_epoch = Some(epoch);
        }
    });
    result?;
    let store = node.store_or_err()?;
    for oid in p.deleted {
        let s = store.clone();
        if let Err(e) = blocking(move || s.remove(oid, true)).await {
            tracing::warn!(%oid, error = %e, "could not drop copy of a deleted VDI");
        }
        node.recovery.verified(oid);
    }
    let mut left = 0;
    for oid in p.handoff {
        if handed_off(node, oid, &known, epoch).await {
            let _guard = node.recovery.stripe(oid).write().await;
            let s = store.clone();
            if blocking(move || s.remove(oid, true)).await.is_ok() {
                node.recovery.verified(oid);
                continue;
            }
        }
        left += 1;
    }
    node.recovery.update(|i| i.pending_handoff = left);
    let failed = node.recovery.info().failed;
    if failed > 0 {
        return Err(PeerError::new(
            ErrorCode::NotRecovered,
            format!("{failed} object(s) could not be recovered"),
        ));
    }
    Ok(left)
}

/// True when every owner of `oid` at this epoch holds a copy at least as new as ours.
async fn handed_off(node: &Node, oid: Oid, copies: &HashMap<Vid, usize>, epoch: u32) -> bool {
    let Some(&want) = copies.get(&oid.vid()) else {
        return false;
    };
    let Some(store) = node.store() else {
        return false;
    };
    let Ok(ours) = blocking(move || store.stamp(oid)).await else {
        return false;
    };
    let view = node.view();
    let owners = view.replicas(oid, want);
    if owners.len() < want || owners.iter().any(|o| o.uuid == node.uuid) {
        return false;
    }
    let stamps = join_all(owners.iter().map(|o| {
        node.call(
            o,
            obj_header(Opcode::ObjStamp, epoch, oid, 0),
            Vec::new(),
            OBJECT_CALL_TIMEOUT,
        )
    }))
    .await;
    stamps.into_iter().all(|r| match r {
        Ok((h, _)) => Stamp::new(h.epoch, h.generation) >= ours,
        Err(_) => false,
    })
}

/// Pulls the newest copy of one object into this node's store (durably). Replica writes
/// to the object wait meanwhile, and apply after the copy is installed; a local copy that
/// became current since the plan was made is kept.
async fn fetch_object(node: &Node, f: &Fetch, epoch: u32) -> Result<(), PeerError> {
    let store = node.store_or_err()?;
    let size = f.oid.capacity(store.object_size());
    node.recovery.throttle.acquire(size).await;
    let _exclusive = node.recovery.stripe(f.oid).write().await;
    let s2 = store.clone();
    let oid = f.oid;
    if let Ok(ours) = blocking(move || s2.stamp(oid)).await {
        if ours >= f.stamp {
            node.recovery.verified(f.oid);
            return Ok(());
        }
    }
    let view = node.view();
    let mut last = PeerError::new(
        ErrorCode::NotRecovered,
        format!("object {}: no source", f.oid),
    );
    for src in &f.sources {
        let Some(m) = view.member(*src) else { continue };
        let mut h = obj_header(Opcode::ReadObj, epoch, f.oid, size as u32);
        h.flags |= FLAG_RECOVERY;
        match node.call(m, h, Vec::new(), OBJECT_CALL_TIMEOUT).await {
            Ok((_, data)) if data.len() as u64 == size => {
                install(node, f.oid, data, f.stamp).await?;
                node.recovery.count_bytes(size);
                return Ok(());
            }
            Ok(_) => {
                last = PeerError::new(
                    ErrorCode::Io,
                    format!("object {}: short recovery read", f.oid),
                )
            }
            Err(e) => last = e.to_peer_error(),
        }
    }
    Err(last)
}

/// Replaces (or creates) the local copy with `data`: any old copy is quarantined, the new
/// one created atomically and durably. Only then is it served.
async fn install(node: &Node, oid: Oid, data: Vec<u8>, stamp: Stamp) -> Result<(), PeerError> {
    let store = node.store_or_err()?;
    blocking(move || {
        if store.contains(oid) {
            store.mark_stale(oid)?;
        }
        store.create_and_write(oid, 0, &data, stamp, true)
    })
    .await?;
    node.recovery.verified(oid);
    Ok(())
}

/// On-demand recovery for a client request: makes sure the local copy of `oid` is the
/// newest in the cluster, fetching it first if it is missing or older. Returns
/// `NotFound` if no member has the object.
pub async fn ensure_current(node: &Node, oid: Oid) -> Result<(), PeerError> {
    let store = node.store_or_err()?;
    if !node.recovery.is_unverified(oid) && store.contains(oid) {
        return Ok(());
    }
    let _exclusive = node.recovery.stripe(oid).write().await;
    if !node.recovery.is_unverified(oid) && store.contains(oid) {
        return Ok(());
    }
    let view = node.view();
    let epoch = view.epoch();
    let s2 = store.clone();
    let ours = blocking(move || s2.stamp(oid)).await.ok();
    let others: Vec<_> = view
        .membership
        .members
        .iter()
        .filter(|m| m.uuid != node.uuid)
        .cloned()
        .collect();
    let stamps = join_all(others.iter().map(|m| {
        node.call(
            m,
            obj_header(Opcode::ObjStamp, epoch, oid, 0),
            Vec::new(),
            OBJECT_CALL_TIMEOUT,
        )
    }))
    .await;
    let mut newest: Option<(Stamp, &cluster::NodeInfo)> = None;
    for (m, r) in others.iter().zip(stamps) {
        match r {
            Ok((h, _)) => {
                let s = Stamp::new(h.epoch, h.generation);
                if newest.is_none_or(|(n, _)| s > n) {
                    newest = Some((s, m));
                }
            }
            Err(ClientError::Peer(e))
                if e.code == ErrorCode::NotFound || e.code == ErrorCode::Stale => {}
            Err(e) => {
                // A member we cannot ask might hold a newer copy: do not guess.
                return Err(PeerError::new(
                    ErrorCode::NotRecovered,
                    format!("object {oid}: cannot compare with {}: {e}", m.addr),
                ));
            }
        }
    }
    match (ours, newest) {
        (Some(o), Some((n, _))) if o >= n => {
            node.recovery.verified(oid);
            Ok(())
        }
        (Some(_), None) => {
            node.recovery.verified(oid);
            Ok(())
        }
        (_, Some((n, src))) => {
            let size = oid.capacity(store.object_size());
            let mut h = obj_header(Opcode::ReadObj, epoch, oid, size as u32);
            h.flags |= FLAG_RECOVERY;
            let (_, data) = node
                .call(src, h, Vec::new(), OBJECT_CALL_TIMEOUT)
                .await
                .map_err(|e| e.to_peer_error())?;
            if data.len() as u64 != size {
                return Err(PeerError::new(
                    ErrorCode::Io,
                    format!("object {oid}: short recovery read"),
                ));
            }
            install(node, oid, data, n).await?;
            // On-demand recovery serves a client and is not throttled; it is counted
            // apart from the throttled background rate.
            node.recovery.update(|i| i.on_demand_bytes += size);
            tracing::info!(%oid, "recovered on demand");
            Ok(())
        }
        (None, None) => Err(PeerError::new(
            ErrorCode::NotFound,
            format!("object {oid} is on no member"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_lists_round_trip_and_reject_garbage() {
        let list = vec![
            (Oid::data(3, 9), Stamp::new(2, 77)),
            (Oid::inode(3), Stamp::new(1, 1)),
        ];
        assert_eq!(decode_list(&encode_list(&list)).unwrap(), list);
        assert!(decode_list(&[0u8; 19]).is_err());
        assert!(decode_list(&[0u8; 20]).is_err(), "vid 0 is not a valid oid");
    }
}

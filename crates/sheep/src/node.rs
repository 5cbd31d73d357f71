//! A node's shared state: identity, store, cluster view (membership, ring, epoch) and the
//! peer connection pool, plus the task that follows membership changes.

use crate::error::{from_cluster, internal};
use crate::gateway::Gateway;
use crate::options::Options;
use client::{ClientError, Pool, Reply};
use cluster::{ClusterDriver, Membership, NodeInfo};
use placement::{PlacementNode, Ring};
use proto::msg::{ClusterId, Hello, Role, FEATURES_NONE};
use proto::{ErrorCode, Header, Oid, PeerError};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use store::identity::{self, ClusterStamp};
use store::{ObjectStore, StoreConfig};
use tokio::sync::watch;
use uuid::Uuid;

/// How often the follower checks this node's own liveness.
const LIVENESS_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// The cluster as this node currently sees it. Replaced whole on every epoch change.
pub struct View {
    pub membership: Membership,
    pub ring: Ring,
    /// False while this node is not a member of the current epoch (self-fenced).
    pub serving: bool,
}

impl View {
    fn new(membership: Membership, me: Uuid) -> View {
        let nodes: Vec<PlacementNode> = membership
            .members
            .iter()
            .map(|m| PlacementNode {
                uuid: m.uuid,
                zone: m.zone,
                vnodes: m.vnodes,
            })
            .collect();
        let serving = membership.members.iter().any(|m| m.uuid == me);
        View {
            ring: Ring::new(&nodes),
            membership,
            serving,
        }
    }

    pub fn epoch(&self) -> u32 {
        self.membership.epoch
    }

    pub fn member(&self, uuid: Uuid) -> Option<&NodeInfo> {
        self.membership.members.iter().find(|m| m.uuid == uuid)
    }

    /// The replica set of `oid` at this epoch, in placement order.
    pub fn replicas(&self, oid: Oid, copies: usize) -> Vec<NodeInfo> {
        self.ring
            .replicas(oid.raw(), copies)
            .into_iter()
            .filter_map(|u| self.member(u).cloned())
            .collect()
    }

    /// Number of members that hold data.
    pub fn data_nodes(&self) -> usize {
        self.ring.data_nodes()
    }
}

/// Everything a node's tasks share.
pub struct Node {
    pub opts: Options,
    pub uuid: Uuid,
    pub driver: Arc<dyn ClusterDriver>,
    pub pool: Pool,
    pub gateway: Gateway,
    pub exports: crate::export::OpenExports,
    pub recovery: crate::recovery::Recovery,
    /// The write-back object cache, when configured (opened with the store).
    pub cache: std::sync::OnceLock<crate::cache::NodeCache>,
    store: RwLock<Option<Arc<ObjectStore>>>,
    /// Serialises opening the store (the follower and request handlers may race to it).
    store_opening: tokio::sync::Mutex<()>,
    /// The cluster this node belongs to once formatted; checked in every handshake.
    cluster: Arc<RwLock<Option<ClusterStamp>>>,
    view: RwLock<Arc<View>>,
    generations: crate::ordering::GenerationClock,
    /// Highest VDI lock generation seen in writes, per vid (fencing tokens).
    fences: crate::ordering::FenceTable,
    shutdown: watch::Sender<bool>,
    /// Stops the NBD server (drain) without stopping the node.
    nbd_stop: watch::Sender<bool>,
    /// The NBD server task, awaited by a drain.
    pub nbd_task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<std::io::Result<()>>>>,
    /// Set when the cluster was shut down: the node exits without leaving, so the
    /// cluster's last members stay recorded for the restart.
    pub stopped_with_cluster: std::sync::atomic::AtomicBool,
}

impl Node {
    pub fn new(
        opts: Options,
        uuid: Uuid,
        driver: Arc<dyn ClusterDriver>,
        cluster: Option<ClusterStamp>,
    ) -> Arc<Node> {
        let shared = Arc::new(RwLock::new(cluster));
        let expected = shared.clone();
        let accept = Arc::new(move |peer: &Hello| {
            let ours = *expected.read().unwrap_or_else(|p| p.into_inner());
            check_peer_hello(peer, ours)
        });
        let pool = Pool::new(node_hello(uuid, cluster), accept);
        let (shutdown, _) = watch::channel(false);
        let (nbd_stop, _) = watch::channel(false);
        let recovery = crate::recovery::Recovery::new(opts.recovery_max_rate);
        Arc::new(Node {
            opts,
            uuid,
            driver,
            pool,
            gateway: Gateway::default(),
            exports: Default::default(),
            recovery,
            cache: std::sync::OnceLock::new(),
            store: RwLock::new(None),
            store_opening: tokio::sync::Mutex::new(()),
            cluster: shared,
            view: RwLock::new(Arc::new(View::new(Membership::default(), uuid))),
            generations: Default::default(),
            fences: Default::default(),
            shutdown,
            nbd_stop,
            nbd_task: tokio::sync::Mutex::new(None),
            stopped_with_cluster: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// This node's entry in the membership.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            uuid: self.uuid,
            addr: self.opts.listen.clone(),
            zone: self.opts.zone,
            vnodes: self.opts.effective_vnodes(),
            nbd_addr: self.opts.nbd.clone(),
        }
    }

    /// The cluster identity this node belongs to, once formatted.
    pub fn cluster_stamp(&self) -> Option<ClusterStamp> {
        *self.cluster.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn store(&self) -> Option<Arc<ObjectStore>> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The store, or the error a peer gets while this node has none (not formatted).
    pub fn store_or_err(&self) -> Result<Arc<ObjectStore>, PeerError> {
        self.store().ok_or_else(|| {
            PeerError::new(
                ErrorCode::NotFormatted,
                "this node's store is not open: cluster not formatted",
            )
        })
    }

    /// A write generation: unique and increasing on this gateway (microseconds since the
    /// epoch, bumped past the last one handed out).
    pub fn next_generation(&self) -> u64 {
        self.generations.next()
    }

    /// Refuses a write carrying an older VDI lock generation than one already seen:
    /// its gateway lost the lock. Writes without a token (0) were checked by their gateway.
    pub fn check_fence(&self, vid: proto::Vid, fence: u64) -> Result<(), PeerError> {
        self.fences.check(vid, fence)
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// The NBD server's stop signal: set by a drain or by shutdown.
    pub fn nbd_stop_signal(&self) -> watch::Receiver<bool> {
        self.nbd_stop.subscribe()
    }

    /// Stops serving NBD: connections finish, flush and release their VDI locks.
    pub async fn drain_nbd(&self) {
        let _ = self.nbd_stop.send(true);
        let task = self.nbd_task.lock().await.take();
        if let Some(handle) = task {
            if tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .is_err()
            {
                tracing::warn!("NBD connections did not finish in time");
            }
        }
    }

    pub fn request_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Re-reads the membership from the cluster driver and applies it.
    pub async fn refresh(&self) -> Result<Arc<View>, PeerError> {
        let m = self.driver.membership().await.map_err(from_cluster)?;
        self.apply(m).await
    }

    /// Installs a membership if it is newer than the current view (or the same epoch
    /// with other content, as after format), opening the store once the cluster is formatted.
    pub async fn apply(&self, m: Membership) -> Result<Arc<View>, PeerError> {
        let current = self.view();
        if m.epoch < current.epoch() || (m == current.membership) {
            return Ok(current);
        }
        if let Some(cfg) = &m.config {
            self.open_store(cfg).await?;
        }
        self.record_epoch(&m).await;
        let view = Arc::new(View::new(m, self.uuid));
        {
            let mut slot = self.view.write().unwrap_or_else(|p| p.into_inner());
            if slot.epoch() > view.epoch() {
                return Ok(slot.clone());
            }
            *slot = view.clone();
        }
        tracing::info!(
            epoch = view.epoch(),
            members = view.membership.members.len(),
            serving = view.serving,
            "membership changed"
        );
        Ok(view)
    }

    /// Keeps the membership of every epoch this node saw in `epochs/` of its directory.
    async fn record_epoch(&self, m: &Membership) {
        let dir = self.opts.dir.join("epochs");
        let path = dir.join(format!("{:08}.json", m.epoch));
        let body = serde_json::to_vec_pretty(m).unwrap_or_default();
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            if !path.exists() {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, body)?;
                std::fs::rename(&tmp, &path)?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                epoch = m.epoch,
                error = %e,
                "could not record the epoch's membership locally"
            ),
            // The process is exiting (the blocking pool is shut down): nothing to record.
            Err(e) if e.is_cancelled() => {
                tracing::debug!(epoch = m.epoch, "exiting; epoch not recorded locally")
            }
            Err(e) => tracing::warn!(
                epoch = m.epoch,
                error = %e,
                "could not record the epoch's membership locally"
            ),
        }
    }

    async fn open_store(&self, cfg: &cluster::ClusterConfig) -> Result<(), PeerError> {
        let _one_at_a_time = self.store_opening.lock().await;
        if self.store().is_some() {
            return Ok(());
        }
        let stamp = ClusterStamp {
            cluster_uuid: cfg.cluster_uuid,
            format_generation: cfg.format_generation,
        };
        let dir = self.opts.dir.clone();
        let store_cfg = StoreConfig {
            dir: dir.join("store"),
            object_size: cfg.object_size,
            fault_injection: self.opts.fault_injection,
        };
        let opened = tokio::task::spawn_blocking(move || {
            identity::set_cluster(&dir, stamp)?;
            let store = ObjectStore::open(store_cfg)?;
            let present = store.list()?;
            Ok::<_, store::StoreError>((store, present))
        })
        .await
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| PeerError::new(ErrorCode::ClusterMismatch, e.to_string()))?;
        let (opened, present) = opened;
        // Copies from before this start are not served until compared with the cluster's.
        self.recovery.distrust(present);
        {
            let mut slot = self.store.write().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(Arc::new(opened));
            }
        }
        *self.cluster.write().unwrap_or_else(|p| p.into_inner()) = Some(stamp);
        if let Some(cfg) = self.opts.cache_config() {
            let boot = crate::cache::boot_id(self.opts.boot_id_file.as_deref());
            let uuid = self.uuid;
            let opened = tokio::task::spawn_blocking(move || {
                crate::cache::NodeCache::open(cfg, boot, uuid, stamp)
            })
            .await
            .map_err(|e| internal(e.to_string()))??;
            let _ = self.cache.set(opened);
        }
        self.pool
            .set_hello(node_hello(self.uuid, Some(stamp)))
            .await;
        Ok(())
    }

    /// One request to a member, returning its reply or why there was none.
    pub async fn call(
        &self,
        to: &NodeInfo,
        header: Header,
        payload: impl Into<client::Payload>,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let payload: client::Payload = payload.into();
        if to.uuid == self.uuid {
            return self.call_local(header, payload).await;
        }
        self.pool.call(&to.addr, header, payload, timeout).await
    }

    /// A request to this node itself, served in-process: the same handler and reply as
    /// over the network, without the loopback round trip.
    fn call_local(
        &self,
        header: Header,
        payload: client::Payload,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, ClientError>> + Send + '_>>
    {
        Box::pin(async move {
            let (h, body) = crate::server::run_request(self, header, payload).await;
            if h.status == 0 {
                Ok((h, body))
            } else {
                Err(ClientError::Peer(PeerError::from_reply(h.status, &body)))
            }
        })
    }

    /// Follows membership changes and this node's own liveness until shutdown.
    pub fn spawn_follower(self: &Arc<Self>) {
        let node = self.clone();
        tokio::spawn(async move {
            let mut rx = node.driver.subscribe();
            let mut shutdown = node.shutdown_signal();
            let mut tick = tokio::time::interval(LIVENESS_CHECK_INTERVAL);
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() { break; }
                        let m = rx.borrow_and_update().clone();
                        if let Err(e) = node.apply(m).await {
                            tracing::error!(error = %e, "cannot apply membership");
                        }
                    }
                    _ = tick.tick() => node.check_liveness().await,
                    _ = shutdown.changed() => break,
                }
            }
        });
    }

    /// Self-fencing: a node that lost its liveness or its membership stops serving and
    /// rejoins, which is always a new epoch.
    async fn check_liveness(&self) {
        if *self.shutdown.borrow() {
            return;
        }
        let view = self.view();
        if let cluster::ClusterStatus::Stopped { last_epoch, .. } = &view.membership.status {
            if view.membership.is_present(self.uuid) {
                let missing: Vec<String> = view
                    .membership
                    .missing()
                    .iter()
                    .map(|m| format!("{} ({})", m.uuid, m.addr))
                    .collect();
                tracing::debug!(
                    last_epoch,
                    ?missing,
                    "cluster shut down; waiting for the members of its last epoch"
                );
            } else {
                tracing::info!("the cluster was shut down: stopping");
                self.stopped_with_cluster.store(true, Ordering::Release);
                self.request_shutdown();
            }
            return;
        }
        let alive = self.driver.still_alive().await;
        let member = self.view().serving;
        if alive && member {
            self.apply_stale_registry().await;
            return;
        }
        self.mark_not_serving();
        tracing::warn!(alive, member, "lost membership; rejoining");
        if let Some(store) = self.store() {
            if let Ok(Ok(present)) = tokio::task::spawn_blocking(move || store.list()).await {
                self.recovery.distrust(present);
            }
        }
        match self.driver.join(self.info()).await {
            Ok(m) => {
                if let Err(e) = self.apply(m).await {
                    tracing::error!(error = %e, "cannot apply membership after rejoin");
                }
            }
            Err(e) => tracing::error!(error = %e, "rejoin failed"),
        }
    }

    /// Quarantines the copies a gateway recorded as stale for this node (it missed a write
    /// the other replicas applied while this node could not be told directly), so they are
    /// recovered, never served.
    async fn apply_stale_registry(&self) {
        let Ok(oids) = self.driver.stale_for(self.uuid).await else {
            return;
        };
        let Some(store) = self.store() else {
            return;
        };
        if oids.is_empty() {
            return;
        }
        for oid in oids {
            let s = store.clone();
            let marked = tokio::task::spawn_blocking(move || s.mark_stale(oid)).await;
            if matches!(marked, Ok(Ok(()))) {
                tracing::warn!(%oid, "a gateway marked this copy stale (it missed a write): quarantined");
                if let Err(e) = self.driver.clear_stale(oid, self.uuid).await {
                    tracing::warn!(%oid, error = %e, "could not clear the stale mark");
                }
            }
        }
        self.recovery.kick();
    }

    fn mark_not_serving(&self) {
        let mut slot = self.view.write().unwrap_or_else(|p| p.into_inner());
        if slot.serving {
            let m = slot.membership.clone();
            let mut v = View::new(m, self.uuid);
            v.serving = false;
            *slot = Arc::new(v);
        }
    }
}

/// The hello a node sends to peers.
pub fn node_hello(uuid: Uuid, cluster: Option<ClusterStamp>) -> Hello {
    Hello {
        proto_version: proto::frame::PROTO_VERSION,
        role: Role::Node,
        node_uuid: Some(uuid),
        cluster: cluster.map(|c| ClusterId {
            cluster_uuid: c.cluster_uuid,
            format_generation: c.format_generation,
        }),
        features: FEATURES_NONE,
        auth: None,
    }
}

/// Accepts a peer only if it is not from another cluster or another format generation.
pub fn check_peer_hello(peer: &Hello, ours: Option<ClusterStamp>) -> Result<(), String> {
    if peer.auth.is_some() {
        return Err("authentication is not supported by this version".into());
    }
    match (peer.cluster, ours) {
        (Some(theirs), Some(ours))
            if theirs.cluster_uuid != ours.cluster_uuid
                || theirs.format_generation != ours.format_generation =>
        {
            Err(format!(
                "peer belongs to cluster {} (format {}), we to {} (format {})",
                theirs.cluster_uuid,
                theirs.format_generation,
                ours.cluster_uuid,
                ours.format_generation
            ))
        }
        _ => Ok(()),
    }
}

//! The `local` cluster driver: every node on one host, the shared state in one
//! directory (see `store` for its layout). Changes are made under an exclusive flock of
//! the directory's lock file; liveness is a flock each live node's handle holds on its
//! own file (see `liveness`). Nothing to install: the embedded default.
//!
//! File I/O runs on tokio's blocking threads; every call touches a few small files.

mod flock;
mod follower;
mod liveness;
mod record;
mod store;

use crate::{ClusterConfig, ClusterDriver, ClusterError, Membership, NodeInfo, VdiEntry, VdiLock};
use async_trait::async_trait;
use liveness::Liveness;
use proto::{Oid, Vid};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use store::Store;
use tokio::sync::{watch, Mutex};
use uuid::Uuid;

/// Tuning of a [`LocalDriver`].
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// How often the follower reads the shared membership (and probes liveness).
    pub poll_interval_ms: u64,
    /// Whether the follower removes dead members itself. Off, only explicit
    /// [`ClusterDriver::reap_dead`] calls do.
    pub reap_in_follower: bool,
}

impl Default for LocalOptions {
    fn default() -> LocalOptions {
        LocalOptions {
            poll_interval_ms: 300,
            reap_in_follower: true,
        }
    }
}

/// A handle on a `local` cluster: one node's view of the shared directory.
///
/// Dropping the handle without [`ClusterDriver::leave`] releases the node's liveness as
/// a crash would; other nodes then remove it at a new epoch. Two handles in one process
/// behave like two processes (flocks belong to open files, not to processes).
pub struct LocalDriver {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    options: LocalOptions,
    /// This handle's node liveness, once joined. The async mutex also orders this
    /// handle's joins and leaves.
    liveness: Mutex<Option<Liveness>>,
    watch: watch::Sender<Membership>,
    follower_started: AtomicBool,
}

impl Inner {
    /// Publishes `membership` on the watch if it is newer than what it holds.
    fn publish(&self, membership: &Membership) {
        self.watch.send_if_modified(|seen| {
            let newer = membership.epoch > seen.epoch;
            if newer {
                *seen = membership.clone();
            }
            newer
        });
    }
}

impl LocalDriver {
    /// Opens the cluster whose shared directory is `dir`, creating it if needed, with
    /// default options. Blocks briefly on file I/O.
    pub fn open(dir: &Path) -> Result<LocalDriver, ClusterError> {
        LocalDriver::open_with(dir, LocalOptions::default())
    }

    /// Opens the cluster at `dir` with `options`.
    pub fn open_with(dir: &Path, options: LocalOptions) -> Result<LocalDriver, ClusterError> {
        let (store, membership) = Store::open(dir)?;
        let (watch, _) = watch::channel(membership);
        let inner = Inner {
            store: Arc::new(store),
            options,
            liveness: Mutex::new(None),
            watch,
            follower_started: AtomicBool::new(false),
        };
        Ok(LocalDriver {
            inner: Arc::new(inner),
        })
    }

    /// The shared directory.
    pub fn dir(&self) -> &Path {
        &self.inner.store.root
    }

    /// Runs `op` on the store on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Store) -> Result<T, ClusterError> + Send + 'static,
    ) -> Result<T, ClusterError> {
        run_blocking(self.inner.store.clone(), op).await
    }

    /// Runs a membership change and publishes its result.
    async fn change(
        &self,
        op: impl FnOnce(&Store) -> Result<Membership, ClusterError> + Send + 'static,
    ) -> Result<Membership, ClusterError> {
        let membership = self.blocking(op).await?;
        self.inner.publish(&membership);
        Ok(membership)
    }
}

/// Runs `op` on `store` on a blocking thread, so file I/O never stalls the runtime.
pub(crate) async fn run_blocking<T: Send + 'static>(
    store: Arc<Store>,
    op: impl FnOnce(&Store) -> Result<T, ClusterError> + Send + 'static,
) -> Result<T, ClusterError> {
    match tokio::task::spawn_blocking(move || op(&store)).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ClusterError::io("blocking task", std::io::Error::other(e))),
    }
}

#[async_trait]
impl ClusterDriver for LocalDriver {
    async fn join(&self, node: NodeInfo) -> Result<Membership, ClusterError> {
        let mut held = self.inner.liveness.lock().await;
        match held.as_ref() {
            Some(live) if live.uuid() != node.uuid => {
                return Err(ClusterError::AlreadyJoinedAs {
                    joined: live.uuid(),
                    requested: node.uuid,
                })
            }
            Some(live) if live.still_held() => {}
            _ => {
                let (uuid, path) = (node.uuid, self.inner.store.node_path(node.uuid));
                let acquire = move |_: &Store| Liveness::acquire(&path, uuid);
                *held = Some(self.blocking(acquire).await?);
            }
        }
        self.change(move |store| store.join(node)).await
    }

    async fn leave(&self, uuid: Uuid) -> Result<Membership, ClusterError> {
        let mut held = self.inner.liveness.lock().await;
        let result = self.change(move |store| store.leave(uuid)).await;
        let ours = held.as_ref().is_some_and(|live| live.uuid() == uuid);
        // Drop our liveness only once we are out of the membership (or never were in),
        // so no one sees a dead member in between.
        if ours && matches!(result, Ok(_) | Err(ClusterError::NotMember(_))) {
            *held = None;
        }
        result
    }

    async fn membership(&self) -> Result<Membership, ClusterError> {
        let membership = self.blocking(|store| store.membership()).await?;
        self.inner.publish(&membership);
        Ok(membership)
    }

    async fn membership_at(&self, epoch: u32) -> Result<Option<Membership>, ClusterError> {
        self.blocking(move |store| store.membership_at(epoch)).await
    }

    async fn reap_dead(&self) -> Result<Option<Membership>, ClusterError> {
        let reaped = self.blocking(|store| store.reap_dead()).await?;
        if let Some(membership) = &reaped {
            self.inner.publish(membership);
        }
        Ok(reaped)
    }

    async fn still_alive(&self) -> bool {
        let held = self.inner.liveness.lock().await;
        held.as_ref().is_some_and(|live| {
            live.still_held() && self.inner.watch.borrow().is_present(live.uuid())
        })
    }

    fn subscribe(&self) -> watch::Receiver<Membership> {
        let receiver = self.inner.watch.subscribe();
        if !self.inner.follower_started.swap(true, Ordering::SeqCst) {
            if let Err(e) = follower::start(&self.inner) {
                self.inner.follower_started.store(false, Ordering::SeqCst);
                tracing::warn!("membership watch will not follow other nodes: {e}");
            }
        }
        receiver
    }

    async fn format(&self, config: ClusterConfig) -> Result<Membership, ClusterError> {
        self.change(move |store| store.format(config)).await
    }

    async fn set_config(
        &self,
        expected_epoch: u32,
        config: ClusterConfig,
    ) -> Result<Membership, ClusterError> {
        self.change(move |store| store.set_config(expected_epoch, config))
            .await
    }

    async fn shutdown_cluster(&self) -> Result<Membership, ClusterError> {
        self.change(|store| store.shutdown_cluster()).await
    }

    async fn force_start(&self) -> Result<Membership, ClusterError> {
        self.change(|store| store.force_start()).await
    }

    async fn vdi_create(&self, name: &str) -> Result<Vid, ClusterError> {
        let name = name.to_owned();
        self.blocking(move |store| store.vdi_create(&name)).await
    }

    async fn vdi_lookup(&self, name: &str) -> Result<Option<Vid>, ClusterError> {
        let name = name.to_owned();
        self.blocking(move |store| store.vdi_lookup(&name)).await
    }

    async fn vdi_list(&self) -> Result<Vec<VdiEntry>, ClusterError> {
        self.blocking(|store| store.vdi_list()).await
    }

    async fn vdi_delete(&self, name: &str, vid: Vid) -> Result<(), ClusterError> {
        let name = name.to_owned();
        self.blocking(move |store| store.vdi_delete(&name, vid))
            .await
    }

    async fn lock_acquire(&self, vid: Vid, holder: Uuid) -> Result<VdiLock, ClusterError> {
        self.blocking(move |store| store.lock_acquire(vid, holder))
            .await
    }

    async fn lock_release(
        &self,
        vid: Vid,
        holder: Uuid,
        generation: u64,
    ) -> Result<(), ClusterError> {
        self.blocking(move |store| store.lock_release(vid, holder, generation))
            .await
    }

    async fn lock_break(&self, vid: Vid) -> Result<(), ClusterError> {
        self.blocking(move |store| store.lock_break(vid)).await
    }

    async fn lock_get(&self, vid: Vid) -> Result<Option<VdiLock>, ClusterError> {
        self.blocking(move |store| Ok(store.lock_table()?.get(vid)))
            .await
    }

    async fn lock_list(&self) -> Result<Vec<VdiLock>, ClusterError> {
        self.blocking(|store| Ok(store.lock_table()?.list())).await
    }

    async fn mark_stale(&self, oid: Oid, node: Uuid) -> Result<(), ClusterError> {
        self.blocking(move |store| store.mark_stale(oid, node))
            .await
    }

    async fn stale_for(&self, node: Uuid) -> Result<Vec<Oid>, ClusterError> {
        self.blocking(move |store| store.stale_for(node)).await
    }

    async fn clear_stale(&self, oid: Oid, node: Uuid) -> Result<(), ClusterError> {
        self.blocking(move |store| store.clear_stale(oid, node))
            .await
    }
}

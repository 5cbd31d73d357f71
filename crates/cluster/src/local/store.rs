//! The shared directory of the `local` driver and every operation on it, synchronous
//! (callers run them on blocking threads).
//!
//! Layout of the directory:
//! - `lock`: flocked exclusively around every change (read, check, write);
//! - `membership.json`: the current `{epoch, members, config, status}`;
//! - `epochs/<epoch>.json`: the membership of every epoch from 1 on (epoch 0 is always
//!   the empty cluster);
//! - `vdis.json`, `locks.json`, `stale.json`: VDI registry, VDI locks, stale replicas;
//! - `nodes/<uuid>.alive`: liveness files (see `liveness`).
//!
//! Every record is replaced by an atomic rename, so reads need no lock: a reader sees a
//! whole old record or a whole new one.

use super::flock;
use super::liveness;
use super::record::{self, Record};
use crate::state::{LockTable, StaleTable, VdiRegistry};
use crate::{ClusterConfig, ClusterError, Membership, NodeInfo, VdiEntry, VdiLock};
use proto::{Oid, Vid};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// Longest wait for the directory's lock; every holder only reads and writes a few
/// small files, so waiting longer means a holder is stuck.
const GLOBAL_LOCK_WAIT_MAX_MS: u64 = 30_000;

/// The paths of one shared directory.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) root: PathBuf,
    lock: PathBuf,
    membership: PathBuf,
    epochs: PathBuf,
    vdis: PathBuf,
    locks: PathBuf,
    stale: PathBuf,
    nodes: PathBuf,
}

/// Proof that the directory's lock is held: only a `Txn` writes records.
pub(crate) struct Txn<'a> {
    store: &'a Store,
}

impl Store {
    /// Opens the shared directory at `root`, creating the layout and the records of an
    /// empty cluster on first use. Returns the current membership.
    pub(crate) fn open(root: &Path) -> Result<(Store, Membership), ClusterError> {
        let store = Store {
            root: root.to_owned(),
            lock: root.join("lock"),
            membership: root.join("membership.json"),
            epochs: root.join("epochs"),
            vdis: root.join("vdis.json"),
            locks: root.join("locks.json"),
            stale: root.join("stale.json"),
            nodes: root.join("nodes"),
        };
        for dir in [&store.root, &store.epochs, &store.nodes] {
            fs::create_dir_all(dir)
                .map_err(|e| ClusterError::io(format!("create {}", dir.display()), e))?;
        }
        if let Some(membership) = record::read::<Membership>(&store.membership)? {
            return Ok((store, membership));
        }
        let membership = store.locked(|txn| txn.initialize())?;
        Ok((store, membership))
    }

    /// The liveness file of node `uuid`.
    pub(crate) fn node_path(&self, uuid: Uuid) -> PathBuf {
        self.nodes.join(format!("{uuid}.alive"))
    }

    fn epoch_path(&self, epoch: u32) -> PathBuf {
        self.epochs.join(format!("{epoch:010}.json"))
    }

    /// Runs `f` holding the directory's lock.
    fn locked<T>(
        &self,
        f: impl FnOnce(&Txn) -> Result<T, ClusterError>,
    ) -> Result<T, ClusterError> {
        let path = &self.lock;
        let io_err = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |e| ClusterError::io(what, e)
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err("open"))?;
        let wait_max = Duration::from_millis(GLOBAL_LOCK_WAIT_MAX_MS);
        if !flock::lock_exclusive_within(&file, wait_max).map_err(io_err("lock"))? {
            return Err(ClusterError::LockTimeout {
                path: path.clone(),
                waited_ms: GLOBAL_LOCK_WAIT_MAX_MS,
            });
        }
        let result = f(&Txn { store: self });
        drop(file); // closing releases the lock
        result
    }

    /// Changes the membership under the lock: `change` gets the current one and returns
    /// the next, or `None` for no change.
    fn maybe_change_membership(
        &self,
        change: impl FnOnce(&Membership) -> Result<Option<Membership>, ClusterError>,
    ) -> Result<Option<Membership>, ClusterError> {
        self.locked(|txn| {
            let current: Membership = txn.read(&self.membership)?;
            let Some(next) = change(&current)? else {
                return Ok(None);
            };
            txn.commit_membership(&current, &next)?;
            Ok(Some(next))
        })
    }

    /// Like `maybe_change_membership`, for changes that always make a new epoch.
    fn change_membership(
        &self,
        change: impl FnOnce(&Membership) -> Result<Membership, ClusterError>,
    ) -> Result<Membership, ClusterError> {
        self.locked(|txn| {
            let current: Membership = txn.read(&self.membership)?;
            let next = change(&current)?;
            txn.commit_membership(&current, &next)?;
            Ok(next)
        })
    }

    /// Reads a record `R` at `path`, changes it under the lock with `change` (which also
    /// sees the membership) and writes it back.
    fn update<R: Record, T>(
        &self,
        path: &Path,
        change: impl FnOnce(&mut R, &Membership) -> Result<T, ClusterError>,
    ) -> Result<T, ClusterError> {
        self.locked(|txn| {
            let membership: Membership = txn.read(&self.membership)?;
            let mut value: R = txn.read(path)?;
            let result = change(&mut value, &membership)?;
            value.check().map_err(|reason| ClusterError::Corrupt {
                path: path.to_owned(),
                reason: format!("about to write an invalid record: {reason}"),
            })?;
            txn.write(path, &value)?;
            Ok(result)
        })
    }

    pub(crate) fn membership(&self) -> Result<Membership, ClusterError> {
        record::read_required(&self.membership)
    }

    pub(crate) fn membership_at(&self, epoch: u32) -> Result<Option<Membership>, ClusterError> {
        let current = self.membership()?;
        if epoch > current.epoch {
            return Ok(None);
        }
        if epoch == current.epoch {
            return Ok(Some(current));
        }
        if epoch == 0 {
            return Ok(Some(Membership::default()));
        }
        let path = self.epoch_path(epoch);
        let past: Option<Membership> = record::read(&path)?;
        if let Some(past) = &past {
            if past.epoch != epoch {
                let reason = format!("holds epoch {}", past.epoch);
                return Err(ClusterError::Corrupt { path, reason });
            }
        }
        Ok(past)
    }

    /// Adds `node` (whose liveness the caller holds). While stopped, the returned
    /// nodes are probed under the lock, so the join that completes the restart never
    /// starts the cluster with a node that died meanwhile.
    pub(crate) fn join(&self, node: NodeInfo) -> Result<Membership, ClusterError> {
        self.change_membership(|m| {
            let dead = if m.is_running() {
                Vec::new()
            } else {
                self.dead_present(m)?
            };
            let next = m.with_member(node, &dead)?;
            log_restart_progress(m, &next);
            Ok(next)
        })
    }

    pub(crate) fn leave(&self, uuid: Uuid) -> Result<Membership, ClusterError> {
        let next = self.maybe_change_membership(|m| m.without_members(&[uuid]))?;
        next.ok_or(ClusterError::NotMember(uuid))
    }

    pub(crate) fn format(&self, config: ClusterConfig) -> Result<Membership, ClusterError> {
        self.change_membership(|m| m.formatted(config))
    }

    pub(crate) fn set_config(
        &self,
        expected_epoch: u32,
        config: ClusterConfig,
    ) -> Result<Membership, ClusterError> {
        self.change_membership(|m| m.reconfigured(expected_epoch, config))
    }

    /// The present nodes of `membership` (members, or returned nodes while stopped)
    /// whose liveness is gone.
    fn dead_present(&self, membership: &Membership) -> Result<Vec<Uuid>, ClusterError> {
        let mut dead = Vec::new();
        for node in membership.present() {
            if liveness::is_dead(&self.node_path(node.uuid))? {
                dead.push(node.uuid);
            }
        }
        Ok(dead)
    }

    /// Removes every dead present node at one new epoch. Probes without the lock
    /// first, so a healthy cluster costs one record read and one probe per member.
    pub(crate) fn reap_dead(&self) -> Result<Option<Membership>, ClusterError> {
        if self.dead_present(&self.membership()?)?.is_empty() {
            return Ok(None);
        }
        self.maybe_change_membership(|m| {
            let dead = self.dead_present(m)?;
            if !dead.is_empty() {
                let running = m.is_running();
                tracing::info!(epoch = m.epoch + 1, ?dead, running, "removing dead nodes");
            }
            m.without_members(&dead)
        })
    }

    /// Reaps dead members, then stops the cluster (two changes, each under the lock).
    pub(crate) fn shutdown_cluster(&self) -> Result<Membership, ClusterError> {
        // Refuse (unformatted, already stopped) before reaping anything.
        self.membership()?.shut_down()?;
        self.reap_dead()?;
        self.change_membership(|m| {
            let next = m.shut_down()?;
            let waiting: Vec<Uuid> = next.missing().iter().map(|n| n.uuid).collect();
            tracing::info!(epoch = next.epoch, ?waiting, "cluster shut down");
            Ok(next)
        })
    }

    /// Starts a stopped cluster with its live returned nodes.
    pub(crate) fn force_start(&self) -> Result<Membership, ClusterError> {
        self.change_membership(|m| {
            let dead = if m.is_running() {
                Vec::new()
            } else {
                self.dead_present(m)?
            };
            let next = m.force_started(&dead)?;
            let missing: Vec<Uuid> = m.missing().iter().map(|n| n.uuid).collect();
            tracing::warn!(epoch = next.epoch, ?missing, "cluster started by force");
            Ok(next)
        })
    }

    pub(crate) fn vdi_create(&self, name: &str) -> Result<Vid, ClusterError> {
        self.update(&self.vdis, |registry: &mut VdiRegistry, membership| {
            if membership.config.is_none() {
                return Err(ClusterError::NotFormatted);
            }
            membership.check_running()?;
            registry.create(name)
        })
    }

    pub(crate) fn vdi_lookup(&self, name: &str) -> Result<Option<Vid>, ClusterError> {
        Ok(record::read_required::<VdiRegistry>(&self.vdis)?.lookup(name))
    }

    pub(crate) fn vdi_list(&self) -> Result<Vec<VdiEntry>, ClusterError> {
        Ok(record::read_required::<VdiRegistry>(&self.vdis)?.list())
    }

    pub(crate) fn vdi_delete(&self, name: &str, vid: Vid) -> Result<(), ClusterError> {
        self.update(&self.vdis, |registry: &mut VdiRegistry, membership| {
            membership.check_running()?;
            registry.delete(name, vid)
        })
    }

    pub(crate) fn lock_acquire(&self, vid: Vid, holder: Uuid) -> Result<VdiLock, ClusterError> {
        self.update(&self.locks, |locks: &mut LockTable, membership| {
            locks.acquire(vid, holder, membership)
        })
    }

    pub(crate) fn lock_release(
        &self,
        vid: Vid,
        holder: Uuid,
        generation: u64,
    ) -> Result<(), ClusterError> {
        self.update(&self.locks, |locks: &mut LockTable, _| {
            locks.release(vid, holder, generation)
        })
    }

    pub(crate) fn lock_break(&self, vid: Vid) -> Result<(), ClusterError> {
        self.update(&self.locks, |locks: &mut LockTable, _| {
            locks.break_lock(vid);
            Ok(())
        })
    }

    pub(crate) fn lock_table(&self) -> Result<LockTable, ClusterError> {
        record::read_required(&self.locks)
    }

    pub(crate) fn mark_stale(&self, oid: Oid, node: Uuid) -> Result<(), ClusterError> {
        self.update(&self.stale, |stale: &mut StaleTable, _| {
            stale.mark(oid, node)
        })
    }

    pub(crate) fn stale_for(&self, node: Uuid) -> Result<Vec<Oid>, ClusterError> {
        Ok(record::read_required::<StaleTable>(&self.stale)?.for_node(node))
    }

    pub(crate) fn clear_stale(&self, oid: Oid, node: Uuid) -> Result<(), ClusterError> {
        self.update(&self.stale, |stale: &mut StaleTable, _| {
            stale.clear(oid, node);
            Ok(())
        })
    }
}

/// Logs a join while stopped: who is still awaited, or that the cluster runs again.
fn log_restart_progress(current: &Membership, next: &Membership) {
    if current.is_running() {
        return;
    }
    if next.is_running() {
        let members = next.members.len();
        tracing::info!(
            epoch = next.epoch,
            members,
            "every node is back: cluster runs again"
        );
    } else {
        let waiting: Vec<Uuid> = next.missing().iter().map(|n| n.uuid).collect();
        tracing::info!(
            epoch = next.epoch,
            ?waiting,
            "cluster stopped, waiting for nodes"
        );
    }
}

impl Txn<'_> {
    fn read<R: Record>(&self, path: &Path) -> Result<R, ClusterError> {
        record::read_required(path)
    }

    fn write<R: Record>(&self, path: &Path, value: &R) -> Result<(), ClusterError> {
        record::write(path, value)
    }

    /// Replaces membership `current` with `next`, one epoch later.
    fn commit_membership(
        &self,
        current: &Membership,
        next: &Membership,
    ) -> Result<(), ClusterError> {
        assert_eq!(
            next.epoch,
            current.epoch + 1,
            "a change is exactly one epoch"
        );
        // History first: a crash in between leaves a history file for an epoch that is
        // not current yet, which the next change overwrites.
        self.write(&self.store.epoch_path(next.epoch), next)?;
        self.write(&self.store.membership, next)
    }

    /// Writes the records of an empty cluster, unless another process just did. The
    /// membership goes last: its presence means the directory is initialized. Without
    /// it, any history means records were lost, and vids or epochs could repeat.
    fn initialize(&self) -> Result<Membership, ClusterError> {
        let store = self.store;
        if let Some(membership) = record::read::<Membership>(&store.membership)? {
            return Ok(membership);
        }
        let history = fs::read_dir(&store.epochs)
            .map_err(|e| ClusterError::io(format!("list {}", store.epochs.display()), e))?;
        if history.filter_map(Result::ok).next().is_some() {
            return Err(ClusterError::Corrupt {
                path: store.membership.clone(),
                reason: "missing while epoch history exists".into(),
            });
        }
        self.write(&store.vdis, &VdiRegistry::default())?;
        self.write(&store.locks, &LockTable::default())?;
        self.write(&store.stale, &StaleTable::default())?;
        let empty = Membership::default();
        self.write(&store.membership, &empty)?;
        tracing::info!(dir = %store.root.display(), "initialized local cluster directory");
        Ok(empty)
    }
}

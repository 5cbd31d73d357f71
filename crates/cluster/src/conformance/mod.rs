//! The conformance suite every [`ClusterDriver`] must pass (STYLE.md: one suite per
//! trait). It is compiled into the library, not only under `cfg(test)`, so each driver's
//! tests call it: implement [`TestCluster`] for a fresh, empty cluster of the driver and
//! call [`run_all`]. Each case gets its own cluster, so cases run concurrently and a
//! failure names its case.
//!
//! Set `CLUSTER_CONFORMANCE_CASES=name,name` to run only some cases.

mod membership;
mod metadata;
mod restart;

use crate::{ClusterConfig, ClusterDriver, Membership, NodeInfo};
use async_trait::async_trait;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use uuid::Uuid;

/// One fresh, empty cluster of a driver, for one case of the suite.
#[async_trait]
pub trait TestCluster: Send + Sync + 'static {
    /// The driver under test.
    type Driver: ClusterDriver;

    /// A new handle on this cluster: a new node's view, independent of earlier handles
    /// (dropping it without `leave` must look like a crash to the others).
    async fn handle(&self) -> Self::Driver;

    /// The longest a crashed node may stay a member before a follower or `reap_dead`
    /// removes it (the lease time for drivers with leases).
    fn crash_detect_max(&self) -> Duration {
        Duration::from_secs(10)
    }
}

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type CaseFn<C> = fn(C) -> CaseFuture;

macro_rules! cases {
    ($($module:ident :: $case:ident),* $(,)?) => {
        vec![$((stringify!($case), (|c| Box::pin($module::$case(c)) as CaseFuture) as CaseFn<C>)),*]
    };
}

/// Every case of the suite, by name.
pub fn cases<C: TestCluster>() -> Vec<(&'static str, CaseFn<C>)> {
    cases![
        membership::join_bumps_epoch_and_lists_node,
        membership::two_nodes_join_sorted_by_uuid,
        membership::rejoin_replaces_entry_at_new_epoch,
        membership::leave_removes_at_new_epoch_and_drops_liveness,
        membership::crash_is_reaped_at_new_epoch,
        membership::watch_sees_join_and_crash,
        membership::concurrent_joins_get_distinct_epochs,
        membership::removed_node_fences_itself,
        membership::format_happens_once,
        membership::set_config_is_compare_and_swap,
        membership::epoch_history_is_kept,
        metadata::vdi_create_lookup_list_delete,
        metadata::vids_are_never_reused,
        metadata::concurrent_vdi_creates_of_one_name_one_wins,
        metadata::lock_is_reentrant_and_exclusive,
        metadata::lock_release_checks_holder_and_generation,
        metadata::lock_break_and_takeover_bump_generation,
        metadata::concurrent_lock_acquires_one_wins,
        metadata::stale_registry_marks_lists_and_clears,
        restart::shutdown_stops_and_records_last_members,
        restart::restart_waits_for_last_members_then_runs_at_one_epoch,
        restart::returned_node_dying_is_dropped_and_awaited,
        restart::force_start_runs_without_missing_members,
        restart::shutdown_of_unformatted_cluster_is_refused,
        restart::registry_and_locks_survive_shutdown_and_restart,
        restart::concurrent_returns_start_the_cluster_once,
    ]
}

/// Runs every case, each on a cluster from `new_cluster`, concurrently; panics naming
/// the cases that failed.
pub async fn run_all<F, Fut, C>(new_cluster: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = C>,
    C: TestCluster,
{
    let only = std::env::var("CLUSTER_CONFORMANCE_CASES").ok();
    let selected = |name: &str| match only.as_deref() {
        Some(list) => list.split(',').any(|n| n == name),
        None => true,
    };
    let mut running = Vec::new();
    for (name, case) in cases::<C>() {
        if selected(name) {
            let cluster = new_cluster().await;
            running.push((name, tokio::spawn(case(cluster))));
        }
    }
    assert!(!running.is_empty(), "no conformance case selected");
    let mut failed = Vec::new();
    for (name, task) in running {
        match task.await {
            Ok(()) => eprintln!("conformance case {name}: ok"),
            Err(e) => {
                eprintln!("conformance case {name}: FAILED: {e}");
                failed.push(name);
            }
        }
    }
    assert!(failed.is_empty(), "failed conformance cases: {failed:?}");
}

/// A node description for node number `n` of a test.
fn node(uuid: Uuid, n: u16) -> NodeInfo {
    NodeInfo {
        uuid,
        addr: format!("127.0.0.1:{}", 7000 + n),
        zone: n.into(),
        vnodes: 128,
        nbd_addr: Some(format!("127.0.0.1:{}", 10809 + n)),
    }
}

/// A valid cluster config.
fn config(format_generation: u64) -> ClusterConfig {
    ClusterConfig {
        cluster_uuid: Uuid::new_v4(),
        format_generation,
        copies: 3,
        object_size: 4 << 20,
        formatted_at_unix: 1_700_000_000,
    }
}

/// A handle of `cluster` that has joined as a fresh node, and its uuid.
async fn joined<C: TestCluster>(cluster: &C, n: u16) -> (C::Driver, Uuid) {
    let handle = cluster.handle().await;
    let uuid = Uuid::new_v4();
    handle.join(node(uuid, n)).await.expect("join");
    (handle, uuid)
}

/// The uuids of the members, in order.
fn uuids(membership: &Membership) -> Vec<Uuid> {
    membership.members.iter().map(|m| m.uuid).collect()
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `bound`.
async fn wait_for<T, Fut>(bound: Duration, what: &str, mut check: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {bound:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

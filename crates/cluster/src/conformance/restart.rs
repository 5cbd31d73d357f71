//! Conformance cases for whole-cluster shutdown and restart: the shutdown records the
//! last epoch's members, nodes exiting afterwards change nothing, and the cluster runs
//! again once every one of them is back, or when an admin forces it.

use super::{config, joined, node, uuids, wait_for, TestCluster};
use crate::{ClusterDriver, ClusterError, ClusterStatus, Membership, NodeInfo};
use proto::Oid;
use uuid::Uuid;

/// A formatted cluster with `count` joined nodes: their handles and uuids, sorted by
/// uuid, and the membership after the last join.
async fn running<C: TestCluster>(
    cluster: &C,
    count: u16,
) -> (Vec<C::Driver>, Vec<Uuid>, Membership) {
    let first = cluster.handle().await;
    first.format(config(1)).await.expect("format");
    let mut nodes = Vec::new();
    for n in 0..count {
        nodes.push(joined(cluster, n).await);
    }
    nodes.sort_by_key(|(_, uuid)| *uuid);
    let membership = first.membership().await.unwrap();
    let (handles, uuids) = nodes.into_iter().unzip();
    (handles, uuids, membership)
}

/// A restarted node `uuid` (a new handle) that joined, with a new address (`n`). Waits
/// until the old process's liveness is released.
async fn rejoin<C: TestCluster>(cluster: &C, uuid: Uuid, n: u16) -> (C::Driver, Membership) {
    let handle = cluster.handle().await;
    let info = node(uuid, n);
    let joined = wait_for(cluster.crash_detect_max(), "rejoin after exit", || async {
        handle.join(info.clone()).await.ok()
    })
    .await;
    (handle, joined)
}

fn missing(membership: &Membership) -> Vec<Uuid> {
    uuids_of(&membership.missing())
}

fn uuids_of(nodes: &[NodeInfo]) -> Vec<Uuid> {
    nodes.iter().map(|n| n.uuid).collect()
}

/// The stopped status of `membership`: its last running epoch and last members.
fn stopped(membership: &Membership) -> (u32, Vec<NodeInfo>, Vec<NodeInfo>) {
    match &membership.status {
        ClusterStatus::Stopped {
            last_epoch,
            last_members,
            returned,
        } => (*last_epoch, last_members.clone(), returned.clone()),
        ClusterStatus::Running => {
            panic!("expected a stopped cluster at epoch {}", membership.epoch)
        }
    }
}

/// Shutdown is one new epoch with no members that remembers the running ones; nobody
/// is alive (present) and nothing can be locked or created until the restart.
pub(super) async fn shutdown_stops_and_records_last_members<C: TestCluster>(cluster: C) {
    let (handles, members, before) = running(&cluster, 3).await;
    let watcher = cluster.handle().await;
    let watch = watcher.subscribe();
    let down = handles[0].shutdown_cluster().await.unwrap();
    assert_eq!(down.epoch, before.epoch + 1);
    assert!(down.members.is_empty() && !down.is_running());
    assert_eq!(down.config, before.config);
    let (last_epoch, last_members, returned) = stopped(&down);
    assert_eq!((last_epoch, &last_members), (before.epoch, &before.members));
    assert!(returned.is_empty());
    assert_eq!(missing(&down), members, "waits for every member");
    assert_eq!(watcher.membership().await.unwrap(), down);
    wait_for(
        cluster.crash_detect_max(),
        "watch shows the shutdown",
        || {
            let seen = watch.borrow().clone();
            async move { (seen.epoch == down.epoch).then_some(()) }
        },
    )
    .await;
    for handle in &handles {
        handle.membership().await.unwrap();
        assert!(
            !handle.still_alive().await,
            "nobody is present after a shutdown"
        );
    }

    let again = handles[1].shutdown_cluster().await;
    assert!(
        matches!(&again, Err(ClusterError::Stopped { last_epoch, missing })
            if *last_epoch == before.epoch && *missing == members),
        "{again:?}"
    );
    let vid = handles[0].vdi_lookup("none").await.unwrap();
    assert_eq!(vid, None, "reads of the registry still work");
    let create = handles[0].vdi_create("disk").await;
    assert!(
        matches!(create, Err(ClusterError::Stopped { .. })),
        "{create:?}"
    );
    let lock = handles[0].lock_acquire(1, members[0]).await;
    assert!(
        matches!(lock, Err(ClusterError::Stopped { .. })),
        "{lock:?}"
    );
    assert_eq!(
        handles[2].membership().await.unwrap(),
        down,
        "refusals change nothing"
    );
}

/// The cluster runs again once every member of the last epoch is back: each return is
/// an epoch that says who is still missing, nodes exiting after the shutdown spend no
/// epoch, and the last return starts the cluster with the addresses nodes came back with.
pub(super) async fn restart_waits_for_last_members_then_runs_at_one_epoch<C: TestCluster>(
    cluster: C,
) {
    let (mut handles, members, _) = running(&cluster, 3).await;
    let watcher = cluster.handle().await;
    let watch = watcher.subscribe();
    let down = handles[0].shutdown_cluster().await.unwrap();
    // Node 0 leaves as an old daemon would; it was not present, so nothing changes.
    let leave = handles[0].leave(members[0]).await;
    assert!(
        matches!(leave, Err(ClusterError::NotMember(_))),
        "{leave:?}"
    );
    handles.clear(); // the others exit without a word

    let (first, one) = rejoin(&cluster, members[0], 10).await;
    assert_eq!(one.epoch, down.epoch + 1, "exits spent no epoch");
    assert!(!one.is_running() && one.members.is_empty());
    assert_eq!(uuids_of(&stopped(&one).2), vec![members[0]]);
    assert_eq!(missing(&one), members[1..].to_vec());
    assert!(first.still_alive().await, "a returned node is present");

    let (_second, two) = rejoin(&cluster, members[1], 11).await;
    assert_eq!(two.epoch, down.epoch + 2);
    let last_entry = stopped(&down).1[2].clone();
    assert_eq!(two.missing(), vec![last_entry], "names the missing node");
    wait_for(
        cluster.crash_detect_max(),
        "watch shows the progress",
        || {
            let seen = watch.borrow().clone();
            async move { (seen.epoch >= two.epoch && !seen.is_running()).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        watcher.reap_dead().await.unwrap(),
        None,
        "nobody present is dead"
    );

    let (_third, three) = rejoin(&cluster, members[2], 12).await;
    assert_eq!(
        three.epoch,
        down.epoch + 3,
        "the last return starts at its own epoch"
    );
    assert!(three.is_running() && three.missing().is_empty());
    let expected = vec![
        node(members[0], 10),
        node(members[1], 11),
        node(members[2], 12),
    ];
    assert_eq!(three.members, expected);
    assert!(first.still_alive().await);
    assert_eq!(first.membership_at(down.epoch).await.unwrap(), Some(down));
    assert_eq!(first.membership_at(three.epoch).await.unwrap(), Some(three));
}

/// A returned node that dies before the restart completes is dropped from the
/// returned nodes, and the cluster waits for it again.
pub(super) async fn returned_node_dying_is_dropped_and_awaited<C: TestCluster>(cluster: C) {
    let (handles, members, _) = running(&cluster, 3).await;
    let down = handles[0].shutdown_cluster().await.unwrap();
    drop(handles);
    let (first, _) = rejoin(&cluster, members[0], 10).await;
    let (second, _) = rejoin(&cluster, members[1], 11).await;
    drop(second); // crashes while the cluster is stopped
    let reaped = wait_for(
        cluster.crash_detect_max(),
        "dead returned node dropped",
        || async {
            first.reap_dead().await.unwrap();
            let now = first.membership().await.unwrap();
            (!now.is_present(members[1])).then_some(now)
        },
    )
    .await;
    assert!(!reaped.is_running());
    assert_eq!(missing(&reaped), members[1..].to_vec());
    assert_eq!(
        stopped(&reaped).1,
        stopped(&down).1,
        "last members are kept"
    );

    let (_third, three) = rejoin(&cluster, members[2], 12).await;
    assert!(!three.is_running(), "must not start without the dead node");
    assert_eq!(missing(&three), vec![members[1]]);
    let (_back, started) = rejoin(&cluster, members[1], 13).await;
    assert!(started.is_running());
    assert_eq!(uuids(&started), members);
}

/// `force_start` runs a stopped cluster with the nodes that returned, for a member that
/// is gone for good; it refuses a running cluster and one nobody returned to.
pub(super) async fn force_start_runs_without_missing_members<C: TestCluster>(cluster: C) {
    let (handles, members, _) = running(&cluster, 3).await;
    let refused = handles[0].force_start().await;
    assert!(
        matches!(refused, Err(ClusterError::NotStopped)),
        "{refused:?}"
    );
    let down = handles[0].shutdown_cluster().await.unwrap();
    let empty = handles[0].force_start().await;
    assert!(
        matches!(empty, Err(ClusterError::NoneReturned)),
        "{empty:?}"
    );
    drop(handles);
    let (first, _) = rejoin(&cluster, members[0], 10).await;
    let (_second, two) = rejoin(&cluster, members[1], 11).await;
    let forced = first.force_start().await.unwrap();
    assert_eq!(forced.epoch, two.epoch + 1);
    assert!(forced.is_running());
    assert_eq!(uuids(&forced), members[..2].to_vec());
    assert!(forced.epoch > down.epoch && first.still_alive().await);
    let again = first.force_start().await;
    assert!(matches!(again, Err(ClusterError::NotStopped)), "{again:?}");
    // The missing node comes back later as an ordinary join.
    let (_third, three) = rejoin(&cluster, members[2], 12).await;
    assert_eq!((three.epoch, uuids(&three)), (forced.epoch + 1, members));
}

/// Shutdown needs a formatted cluster: an unformatted one holds no data and its nodes
/// just leave.
pub(super) async fn shutdown_of_unformatted_cluster_is_refused<C: TestCluster>(cluster: C) {
    let (handle, _) = joined(&cluster, 1).await;
    let before = handle.membership().await.unwrap();
    let refused = handle.shutdown_cluster().await;
    assert!(
        matches!(refused, Err(ClusterError::NotFormatted)),
        "{refused:?}"
    );
    assert_eq!(handle.membership().await.unwrap(), before);
    assert!(handle.still_alive().await);
}

/// The VDI registry, the locks with their generations and the stale registry are the
/// same after a shutdown and restart; a lock held at the shutdown is still held.
pub(super) async fn registry_and_locks_survive_shutdown_and_restart<C: TestCluster>(cluster: C) {
    let (handles, members, _) = running(&cluster, 2).await;
    let disk = handles[0].vdi_create("disk").await.unwrap();
    handles[0].vdi_create("other").await.unwrap();
    let lock = handles[0].lock_acquire(disk, members[0]).await.unwrap();
    let oid = Oid::data(disk, 3);
    handles[0].mark_stale(oid, members[1]).await.unwrap();
    let vdis = handles[0].vdi_list().await.unwrap();
    let locks = handles[0].lock_list().await.unwrap();

    handles[0].shutdown_cluster().await.unwrap();
    let delete = handles[1].vdi_delete("other", disk + 1).await;
    assert!(
        matches!(delete, Err(ClusterError::Stopped { .. })),
        "{delete:?}"
    );
    assert_eq!(handles[1].vdi_list().await.unwrap(), vdis);
    assert_eq!(handles[1].lock_list().await.unwrap(), locks);
    drop(handles);
    let (first, _) = rejoin(&cluster, members[0], 10).await;
    let (second, started) = rejoin(&cluster, members[1], 11).await;
    assert!(started.is_running());

    assert_eq!(second.vdi_list().await.unwrap(), vdis);
    assert_eq!(second.lock_list().await.unwrap(), locks);
    assert_eq!(second.stale_for(members[1]).await.unwrap(), vec![oid]);
    let taken = second.lock_acquire(disk, members[1]).await;
    assert!(
        matches!(taken, Err(ClusterError::Locked { holder, .. }) if holder == members[0]),
        "{taken:?}"
    );
    assert_eq!(first.lock_acquire(disk, members[0]).await.unwrap(), lock);
    second.vdi_create("after").await.unwrap();
}

/// Nodes returning all at once get distinct epochs, and exactly the last one starts
/// the cluster.
pub(super) async fn concurrent_returns_start_the_cluster_once<C: TestCluster>(cluster: C) {
    const NODES: u16 = 4;
    let (handles, members, _) = running(&cluster, NODES).await;
    let down = handles[0].shutdown_cluster().await.unwrap();
    drop(handles);
    let mut tasks = Vec::new();
    for (n, &uuid) in (0..).zip(&members) {
        let restarted = cluster.handle().await;
        let bound = cluster.crash_detect_max();
        tasks.push(tokio::spawn(async move {
            let info = node(uuid, n);
            let m = wait_for(bound, "concurrent rejoin", || async {
                restarted.join(info.clone()).await.ok()
            })
            .await;
            (restarted, m)
        }));
    }
    let mut returned = Vec::new();
    for task in tasks {
        returned.push(task.await.unwrap());
    }
    returned.sort_by_key(|(_, m)| m.epoch);
    let epochs: Vec<u32> = returned.iter().map(|(_, m)| m.epoch).collect();
    let expected: Vec<u32> = (down.epoch + 1..=down.epoch + u32::from(NODES)).collect();
    assert_eq!(epochs, expected, "each return its own epoch");
    let running_at: Vec<bool> = returned.iter().map(|(_, m)| m.is_running()).collect();
    assert_eq!(running_at, [false, false, false, true]);
    let last = &returned[returned.len() - 1].1;
    assert_eq!(uuids(last), members);
}

//! Conformance cases for membership: joins, leaves, crashes, the watch, self-fencing,
//! format and the epoch history.

use super::{config, joined, node, uuids, wait_for, TestCluster};
use crate::{ClusterDriver, ClusterError};
use uuid::Uuid;

/// A join makes exactly one new epoch that lists the node, as every handle sees.
pub(super) async fn join_bumps_epoch_and_lists_node<C: TestCluster>(cluster: C) {
    let handle = cluster.handle().await;
    let before = handle.membership().await.unwrap();
    assert!(
        before.members.is_empty() && before.config.is_none(),
        "fresh cluster"
    );
    assert!(!handle.still_alive().await, "not alive before joining");
    let info = node(Uuid::new_v4(), 1);
    let after = handle.join(info.clone()).await.unwrap();
    assert_eq!(after.epoch, before.epoch + 1);
    assert_eq!(after.members, vec![info]);
    assert!(handle.still_alive().await);
    let other = cluster.handle().await;
    assert_eq!(other.membership().await.unwrap(), after);
}

/// Two nodes join at consecutive epochs; members are kept sorted by uuid.
pub(super) async fn two_nodes_join_sorted_by_uuid<C: TestCluster>(cluster: C) {
    let (a, a_uuid) = joined(&cluster, 1).await;
    let first = a.membership().await.unwrap();
    let (b, b_uuid) = joined(&cluster, 2).await;
    let second = b.membership().await.unwrap();
    assert_eq!(second.epoch, first.epoch + 1);
    let mut expected = vec![a_uuid, b_uuid];
    expected.sort();
    assert_eq!(uuids(&second), expected);
    assert_eq!(a.membership().await.unwrap(), second);
}

/// Every rejoin is a new epoch that replaces the node's entry, also after a crash; one
/// handle cannot join as two nodes.
pub(super) async fn rejoin_replaces_entry_at_new_epoch<C: TestCluster>(cluster: C) {
    let (handle, uuid) = joined(&cluster, 1).await;
    let first = handle.membership().await.unwrap();
    let moved = node(uuid, 9);
    let second = handle.join(moved.clone()).await.unwrap();
    assert_eq!(second.epoch, first.epoch + 1);
    assert_eq!(second.members, vec![moved]);
    let other_node = node(Uuid::new_v4(), 2);
    assert!(
        handle.join(other_node).await.is_err(),
        "one handle is one node"
    );

    // A restarted process (a new handle) rejoins with the same uuid after a crash.
    drop(handle);
    let restarted = cluster.handle().await;
    let back = node(uuid, 3);
    let third = wait_for(cluster.crash_detect_max(), "rejoin after crash", || async {
        restarted.join(back.clone()).await.ok()
    })
    .await;
    assert!(third.epoch > second.epoch);
    assert_eq!(third.members, vec![back]);
    assert!(restarted.still_alive().await);
}

/// A leave removes the node at one new epoch and drops its liveness; nothing is dead.
pub(super) async fn leave_removes_at_new_epoch_and_drops_liveness<C: TestCluster>(cluster: C) {
    let (a, a_uuid) = joined(&cluster, 1).await;
    let (b, b_uuid) = joined(&cluster, 2).await;
    let before = b.membership().await.unwrap();
    let after = a.leave(a_uuid).await.unwrap();
    assert_eq!(after.epoch, before.epoch + 1);
    assert_eq!(uuids(&after), vec![b_uuid]);
    assert!(!a.still_alive().await, "a node that left is not alive");
    assert!(b.still_alive().await);
    assert!(matches!(a.leave(a_uuid).await, Err(ClusterError::NotMember(u)) if u == a_uuid));
    assert_eq!(
        b.reap_dead().await.unwrap(),
        None,
        "a clean leave leaves no one dead"
    );
    assert_eq!(b.membership().await.unwrap(), after);
}

/// Crashed nodes (handles dropped without leave) are removed by `reap_dead` at a new
/// epoch, one epoch per reap however many died.
pub(super) async fn crash_is_reaped_at_new_epoch<C: TestCluster>(cluster: C) {
    let (survivor, survivor_uuid) = joined(&cluster, 1).await;
    let (b, _) = joined(&cluster, 2).await;
    let (c, _) = joined(&cluster, 3).await;
    let before = survivor.membership().await.unwrap();
    assert_eq!(before.members.len(), 3);
    drop(b);
    drop(c);
    let after = wait_for(
        cluster.crash_detect_max(),
        "crashed nodes reaped",
        || async {
            survivor.reap_dead().await.unwrap();
            let now = survivor.membership().await.unwrap();
            (uuids(&now) == vec![survivor_uuid]).then_some(now)
        },
    )
    .await;
    let spent = after.epoch - before.epoch;
    assert!((1..=2).contains(&spent), "two crashes took {spent} epochs");
    assert_eq!(survivor.reap_dead().await.unwrap(), None);
    assert!(survivor.still_alive().await);
}

/// A handle's watch follows joins made by others and notices a crash by itself.
pub(super) async fn watch_sees_join_and_crash<C: TestCluster>(cluster: C) {
    let watcher = cluster.handle().await;
    let watch = watcher.subscribe();
    let (a, a_uuid) = joined(&cluster, 1).await;
    let bound = cluster.crash_detect_max();
    let join_epoch = wait_for(bound, "watch shows the join", || {
        let seen = watch.borrow().clone();
        async move { seen.contains(a_uuid).then_some(seen.epoch) }
    })
    .await;
    drop(a);
    wait_for(bound, "watch shows the crash", || {
        let seen = watch.borrow().clone();
        async move { (!seen.contains(a_uuid) && seen.epoch > join_epoch).then_some(()) }
    })
    .await;
}

/// Concurrent joins from many nodes all succeed at distinct epochs (compare-and-swap).
pub(super) async fn concurrent_joins_get_distinct_epochs<C: TestCluster>(cluster: C) {
    const NODES: u16 = 8;
    let base = cluster.handle().await.membership().await.unwrap().epoch;
    let mut tasks = Vec::new();
    for n in 0..NODES {
        let handle = cluster.handle().await;
        tasks.push(tokio::spawn(async move {
            let uuid = Uuid::new_v4();
            let epoch = handle.join(node(uuid, n)).await.unwrap().epoch;
            (handle, uuid, epoch)
        }));
    }
    let mut joined = Vec::new();
    for task in tasks {
        joined.push(task.await.unwrap());
    }
    let mut epochs: Vec<u32> = joined.iter().map(|(_, _, epoch)| *epoch).collect();
    epochs.sort();
    let expected: Vec<u32> = (base + 1..=base + u32::from(NODES)).collect();
    assert_eq!(epochs, expected, "each join its own epoch");
    let mut expected_members: Vec<Uuid> = joined.iter().map(|(_, uuid, _)| *uuid).collect();
    expected_members.sort();
    let last = joined[0].0.membership().await.unwrap();
    assert_eq!(last.epoch, base + u32::from(NODES));
    assert_eq!(uuids(&last), expected_members);
}

/// A node removed from the membership by another fences itself, and serves again only
/// after rejoining.
pub(super) async fn removed_node_fences_itself<C: TestCluster>(cluster: C) {
    let (a, a_uuid) = joined(&cluster, 1).await;
    let (b, _) = joined(&cluster, 2).await;
    let _watch = a.subscribe();
    b.leave(a_uuid).await.unwrap();
    wait_for(
        cluster.crash_detect_max(),
        "removed node fences itself",
        || async { (!a.still_alive().await).then_some(()) },
    )
    .await;
    a.join(node(a_uuid, 1)).await.unwrap();
    assert!(a.still_alive().await, "alive again after rejoining");
}

/// Format stores the config once, at a new epoch; a second format is refused.
pub(super) async fn format_happens_once<C: TestCluster>(cluster: C) {
    let handle = cluster.handle().await;
    let before = handle.membership().await.unwrap();
    assert!(matches!(
        handle.vdi_create("early").await,
        Err(ClusterError::NotFormatted)
    ));
    let mut bad = config(1);
    bad.copies = 0;
    let refused = handle.format(bad).await;
    assert!(
        matches!(refused, Err(ClusterError::InvalidConfig(_))),
        "{refused:?}"
    );
    let first = config(1);
    let formatted = handle.format(first.clone()).await.unwrap();
    assert_eq!(formatted.epoch, before.epoch + 1);
    assert_eq!(formatted.config, Some(first.clone()));
    let other = cluster.handle().await;
    let again = other.format(config(2)).await;
    assert!(
        matches!(again, Err(ClusterError::AlreadyFormatted)),
        "{again:?}"
    );
    assert_eq!(other.membership().await.unwrap().config, Some(first));
}

/// `set_config` replaces the config only at the expected epoch.
pub(super) async fn set_config_is_compare_and_swap<C: TestCluster>(cluster: C) {
    let handle = cluster.handle().await;
    let epoch = handle.membership().await.unwrap().epoch;
    let early = handle.set_config(epoch, config(1)).await;
    assert!(
        matches!(early, Err(ClusterError::NotFormatted)),
        "{early:?}"
    );
    let formatted = handle.format(config(1)).await.unwrap();
    let stale = handle.set_config(formatted.epoch - 1, config(2)).await;
    assert!(
        matches!(stale, Err(ClusterError::Conflict { expected_epoch, current_epoch })
            if expected_epoch == formatted.epoch - 1 && current_epoch == formatted.epoch),
        "{stale:?}"
    );
    let second = config(2);
    let changed = handle
        .set_config(formatted.epoch, second.clone())
        .await
        .unwrap();
    assert_eq!(changed.epoch, formatted.epoch + 1);
    assert_eq!(changed.config, Some(second));
}

/// The membership of every past epoch can be read back.
pub(super) async fn epoch_history_is_kept<C: TestCluster>(cluster: C) {
    let (a, a_uuid) = joined(&cluster, 1).await;
    let first = a.membership().await.unwrap();
    let (b, b_uuid) = joined(&cluster, 2).await;
    let second = b.membership().await.unwrap();
    let third = a.leave(a_uuid).await.unwrap();
    assert_eq!(uuids(&third), vec![b_uuid]);
    for past in [&first, &second, &third] {
        assert_eq!(
            b.membership_at(past.epoch).await.unwrap().as_ref(),
            Some(past)
        );
    }
    assert_eq!(b.membership_at(third.epoch + 1).await.unwrap(), None);
    assert!(first.contains(a_uuid) && !first.contains(b_uuid));
}

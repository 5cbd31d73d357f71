//! Conformance cases for the small metadata: the VDI registry, VDI locks with their
//! fencing generation, and the stale-replica registry.

use super::{config, joined, wait_for, TestCluster};
use crate::{ClusterDriver, ClusterError, VdiEntry};
use proto::oid::VID_MAX;
use proto::Oid;
use uuid::Uuid;

/// A handle on a formatted cluster.
async fn formatted<C: TestCluster>(cluster: &C) -> C::Driver {
    let handle = cluster.handle().await;
    handle.format(config(1)).await.unwrap();
    handle
}

/// Create, lookup, list and delete keep name -> vid, with compare-and-swap deletes.
pub(super) async fn vdi_create_lookup_list_delete<C: TestCluster>(cluster: C) {
    let handle = formatted(&cluster).await;
    let beta = handle.vdi_create("beta").await.unwrap();
    let alpha = handle.vdi_create("alpha").await.unwrap();
    assert!(alpha != beta && alpha != 0 && beta != 0 && alpha <= VID_MAX);
    let other = cluster.handle().await;
    assert_eq!(other.vdi_lookup("alpha").await.unwrap(), Some(alpha));
    assert_eq!(other.vdi_lookup("gamma").await.unwrap(), None);
    let entry = |name: &str, vid| VdiEntry {
        name: name.into(),
        vid,
    };
    let listed = other.vdi_list().await.unwrap();
    assert_eq!(listed, vec![entry("alpha", alpha), entry("beta", beta)]);
    let taken = other.vdi_create("alpha").await;
    assert!(
        matches!(taken, Err(ClusterError::VdiExists(ref n)) if n == "alpha"),
        "{taken:?}"
    );

    let wrong_vid = other.vdi_delete("alpha", beta).await;
    assert!(
        matches!(wrong_vid, Err(ClusterError::NoSuchVdi(_))),
        "{wrong_vid:?}"
    );
    other.vdi_delete("alpha", alpha).await.unwrap();
    assert_eq!(handle.vdi_lookup("alpha").await.unwrap(), None);
    assert_eq!(handle.vdi_list().await.unwrap(), vec![entry("beta", beta)]);
    let gone = handle.vdi_delete("alpha", alpha).await;
    assert!(matches!(gone, Err(ClusterError::NoSuchVdi(_))), "{gone:?}");

    for bad in [String::new(), "x".repeat(256)] {
        let refused = handle.vdi_create(&bad).await;
        assert!(
            matches!(refused, Err(ClusterError::InvalidVdiName { .. })),
            "{refused:?}"
        );
    }
    handle.vdi_create(&"x".repeat(255)).await.unwrap();
}

/// A deleted VDI's vid stays retired: recreating the name gets a larger vid.
pub(super) async fn vids_are_never_reused<C: TestCluster>(cluster: C) {
    let handle = formatted(&cluster).await;
    let first = handle.vdi_create("disk").await.unwrap();
    handle.vdi_delete("disk", first).await.unwrap();
    let second = handle.vdi_create("disk").await.unwrap();
    assert!(second > first, "vid {second} after deleted {first}");
    let third = handle.vdi_create("other").await.unwrap();
    assert!(third > second);
}

/// Concurrent creates: of one name exactly one wins; of distinct names all get
/// distinct vids.
pub(super) async fn concurrent_vdi_creates_of_one_name_one_wins<C: TestCluster>(cluster: C) {
    const TASKS: usize = 6;
    formatted(&cluster).await;
    let mut tasks = Vec::new();
    for n in 0..TASKS {
        let handle = cluster.handle().await;
        tasks.push(tokio::spawn(async move {
            let same = handle.vdi_create("same").await;
            let own = handle.vdi_create(&format!("own-{n}")).await.unwrap();
            (same, own)
        }));
    }
    let mut winners = Vec::new();
    let mut vids = Vec::new();
    for task in tasks {
        let (same, own) = task.await.unwrap();
        match same {
            Ok(vid) => winners.push(vid),
            Err(ClusterError::VdiExists(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
        vids.push(own);
    }
    assert_eq!(winners.len(), 1, "exactly one create of one name wins");
    vids.extend(&winners);
    vids.sort();
    vids.dedup();
    assert_eq!(vids.len(), TASKS + 1, "every vid distinct");
}

/// Acquire: the first generation is 1, reentrant for the holder, `Locked` for another
/// member, `NotMember` for a stranger.
pub(super) async fn lock_is_reentrant_and_exclusive<C: TestCluster>(cluster: C) {
    let (a, a_uuid) = joined(&cluster, 1).await;
    let (b, b_uuid) = joined(&cluster, 2).await;
    let vid = 42;
    assert_eq!(a.lock_get(vid).await.unwrap(), None);
    let lock = a.lock_acquire(vid, a_uuid).await.unwrap();
    assert_eq!((lock.vid, lock.holder, lock.generation), (vid, a_uuid, 1));
    assert_eq!(
        a.lock_acquire(vid, a_uuid).await.unwrap(),
        lock,
        "reentrant"
    );
    let refused = b.lock_acquire(vid, b_uuid).await;
    assert!(
        matches!(refused, Err(ClusterError::Locked { vid: v, holder }) if v == vid && holder == a_uuid),
        "{refused:?}"
    );
    let stranger = Uuid::new_v4();
    let refused = b.lock_acquire(7, stranger).await;
    assert!(
        matches!(refused, Err(ClusterError::NotMember(u)) if u == stranger),
        "{refused:?}"
    );
    let other = b.lock_acquire(7, b_uuid).await.unwrap();
    assert_eq!(b.lock_get(vid).await.unwrap(), Some(lock.clone()));
    assert_eq!(b.lock_list().await.unwrap(), vec![other, lock]);
}

/// Release needs the right holder and generation; the next acquire is a new generation.
pub(super) async fn lock_release_checks_holder_and_generation<C: TestCluster>(cluster: C) {
    let (a, a_uuid) = joined(&cluster, 1).await;
    let (_b, b_uuid) = joined(&cluster, 2).await;
    let vid = 5;
    let lock = a.lock_acquire(vid, a_uuid).await.unwrap();
    for (holder, generation) in [(a_uuid, lock.generation + 1), (b_uuid, lock.generation)] {
        let lost = a.lock_release(vid, holder, generation).await;
        assert!(
            matches!(lost, Err(ClusterError::LockLost { vid: v }) if v == vid),
            "{lost:?}"
        );
    }
    a.lock_release(vid, a_uuid, lock.generation).await.unwrap();
    assert_eq!(a.lock_get(vid).await.unwrap(), None);
    let again = a.lock_release(vid, a_uuid, lock.generation).await;
    assert!(
        matches!(again, Err(ClusterError::LockLost { .. })),
        "{again:?}"
    );
    let next = a.lock_acquire(vid, a_uuid).await.unwrap();
    assert_eq!(next.generation, lock.generation + 1);
}

/// Break, take-over from a node that left and take-over from a crashed node each give
/// a new generation; the old holder's release then fails.
pub(super) async fn lock_break_and_takeover_bump_generation<C: TestCluster>(cluster: C) {
    let (a, a_uuid) = joined(&cluster, 1).await;
    let (b, b_uuid) = joined(&cluster, 2).await;
    let (c, c_uuid) = joined(&cluster, 3).await;
    let vid = 9;
    let first = a.lock_acquire(vid, a_uuid).await.unwrap();
    b.lock_break(vid).await.unwrap();
    b.lock_break(vid).await.unwrap();
    assert_eq!(b.lock_get(vid).await.unwrap(), None, "broken");
    let lost = a.lock_release(vid, a_uuid, first.generation).await;
    assert!(
        matches!(lost, Err(ClusterError::LockLost { .. })),
        "{lost:?}"
    );
    let second = b.lock_acquire(vid, b_uuid).await.unwrap();
    assert_eq!(second.generation, first.generation + 1);

    // The holder left: its lock is taken over.
    b.leave(b_uuid).await.unwrap();
    let third = a.lock_acquire(vid, a_uuid).await.unwrap();
    assert_eq!(
        (third.holder, third.generation),
        (a_uuid, second.generation + 1)
    );

    // The holder crashed: its lock is taken over once it is no longer a member.
    drop(a);
    let fourth = wait_for(
        cluster.crash_detect_max(),
        "take-over after crash",
        || async {
            c.reap_dead().await.unwrap();
            match c.lock_acquire(vid, c_uuid).await {
                Ok(lock) => Some(lock),
                Err(ClusterError::Locked { .. }) => None,
                Err(e) => panic!("unexpected error {e}"),
            }
        },
    )
    .await;
    assert_eq!(
        (fourth.holder, fourth.generation),
        (c_uuid, third.generation + 1)
    );
}

/// Concurrent acquires of one lock by many members: exactly one wins.
pub(super) async fn concurrent_lock_acquires_one_wins<C: TestCluster>(cluster: C) {
    const NODES: u16 = 6;
    let vid = 11;
    let mut tasks = Vec::new();
    for n in 0..NODES {
        let (handle, uuid) = joined(&cluster, n).await;
        tasks.push(tokio::spawn(async move {
            let result = handle.lock_acquire(vid, uuid).await;
            (handle, uuid, result)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let winners: Vec<Uuid> = results
        .iter()
        .filter_map(|(_, uuid, result)| result.is_ok().then_some(*uuid))
        .collect();
    assert_eq!(winners.len(), 1, "one winner");
    for (_, _, result) in &results {
        match result {
            Ok(lock) => assert_eq!(lock.generation, 1),
            Err(ClusterError::Locked { holder, .. }) => assert_eq!(*holder, winners[0]),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

/// Stale marks are per (object, node), idempotent, listed sorted, and cleared.
pub(super) async fn stale_registry_marks_lists_and_clears<C: TestCluster>(cluster: C) {
    let handle = cluster.handle().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (inode, data0, data1) = (Oid::inode(5), Oid::data(5, 0), Oid::data(5, 1));
    for (oid, node) in [(inode, a), (data1, a), (data0, a), (data1, b), (data1, a)] {
        handle.mark_stale(oid, node).await.unwrap();
    }
    let mut expected = vec![inode, data0, data1];
    expected.sort();
    let other = cluster.handle().await;
    assert_eq!(other.stale_for(a).await.unwrap(), expected);
    assert_eq!(other.stale_for(b).await.unwrap(), vec![data1]);
    other.clear_stale(data1, a).await.unwrap();
    other.clear_stale(data1, a).await.unwrap();
    expected.retain(|&oid| oid != data1);
    assert_eq!(handle.stale_for(a).await.unwrap(), expected);
    assert_eq!(handle.stale_for(b).await.unwrap(), vec![data1]);
    assert!(handle.stale_for(Uuid::new_v4()).await.unwrap().is_empty());
}

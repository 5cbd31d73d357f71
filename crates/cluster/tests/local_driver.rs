//! Behaviour of the `local` driver beyond the conformance suite: exact epochs of reaps,
//! a node uuid running twice, damaged shared directories, a real `kill -9`, and the
//! exact liveness checks of a shutdown and restart.

use cluster::{ClusterConfig, ClusterDriver, ClusterError, LocalDriver, LocalOptions, NodeInfo};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

/// Set in the child process of the `kill -9` tests.
const CHILD_DIR_ENV: &str = "CLUSTER_TEST_CHILD_DIR";

fn node(uuid: Uuid) -> NodeInfo {
    NodeInfo {
        uuid,
        addr: "127.0.0.1:7000".into(),
        zone: 0,
        vnodes: 128,
        nbd_addr: None,
    }
}

async fn joined(dir: &Path) -> (LocalDriver, Uuid) {
    let handle = LocalDriver::open(dir).unwrap();
    let uuid = Uuid::new_v4();
    handle.join(node(uuid)).await.unwrap();
    (handle, uuid)
}

fn config() -> ClusterConfig {
    ClusterConfig {
        cluster_uuid: Uuid::new_v4(),
        format_generation: 1,
        copies: 2,
        object_size: 4 << 20,
        formatted_at_unix: 0,
    }
}

/// Starts the child process of the `kill -9` tests on cluster `dir` and returns it once
/// it has joined, with its node uuid.
async fn spawn_child_node(dir: &Path) -> (std::process::Child, Uuid) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_node_joins_and_waits", "--nocapture"])
        .env(CHILD_DIR_ENV, dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child_uuid = tokio::task::spawn_blocking(move || {
        let lines = BufReader::new(stdout).lines().map_while(Result::ok);
        let uuid_of = |line: String| line.strip_prefix("joined ").map(str::to_owned);
        lines.filter_map(uuid_of).next()
    })
    .await
    .unwrap()
    .expect("child joined");
    (child, child_uuid.trim().parse().unwrap())
}

fn is_corrupt<T: std::fmt::Debug>(result: Result<T, ClusterError>) -> bool {
    matches!(result, Err(ClusterError::Corrupt { .. }))
}

/// Two crashes found by one reap are removed at exactly one new epoch.
#[tokio::test]
async fn two_crashes_are_reaped_at_exactly_one_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (survivor, survivor_uuid) = joined(dir.path()).await;
    let (b, _) = joined(dir.path()).await;
    let (c, _) = joined(dir.path()).await;
    let before = survivor.membership().await.unwrap();
    drop((b, c));
    let after = survivor.reap_dead().await.unwrap().expect("someone reaped");
    assert_eq!(after.epoch, before.epoch + 1);
    assert_eq!(after.members, vec![node(survivor_uuid)]);
    assert_eq!(
        survivor.membership_at(after.epoch).await.unwrap(),
        Some(after)
    );
}

/// A node uuid whose liveness is held by a live handle cannot join a second time.
#[tokio::test]
async fn same_node_uuid_running_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_first, uuid) = joined(dir.path()).await;
    let second = LocalDriver::open(dir.path()).unwrap();
    let refused = second.join(node(uuid)).await;
    assert!(
        matches!(refused, Err(ClusterError::LivenessHeld(u)) if u == uuid),
        "{refused:?}"
    );
    assert!(!second.still_alive().await);
}

/// Damaged record files give `Corrupt` errors, not panics, from open and from calls.
#[tokio::test]
async fn corrupt_records_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (handle, _) = joined(dir.path()).await;
    std::fs::write(dir.path().join("vdis.json"), b"{\"magic\": 17}").unwrap();
    assert!(is_corrupt(handle.vdi_list().await));
    assert!(is_corrupt(handle.vdi_create("x").await));
    std::fs::write(dir.path().join("membership.json"), b"\0\0\0garbage").unwrap();
    assert!(is_corrupt(handle.membership().await));
    assert!(is_corrupt(handle.reap_dead().await));
    assert!(is_corrupt(LocalDriver::open(dir.path()).map(|_| ())));
}

/// A lost membership record is refused when history exists: epochs and vids could
/// otherwise start over.
#[tokio::test]
async fn lost_membership_record_with_history_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (handle, _) = joined(dir.path()).await;
    drop(handle);
    std::fs::remove_file(dir.path().join("membership.json")).unwrap();
    assert!(is_corrupt(LocalDriver::open(dir.path()).map(|_| ())));
}

/// With reaping off in the follower, the watch keeps a crashed member until an
/// explicit `reap_dead`.
#[tokio::test]
async fn follower_without_reaping_leaves_crashed_members_to_reap_dead() {
    let dir = tempfile::tempdir().unwrap();
    let options = LocalOptions {
        poll_interval_ms: 50,
        reap_in_follower: false,
    };
    let watcher = LocalDriver::open_with(dir.path(), options).unwrap();
    let watch = watcher.subscribe();
    let (crashed, crashed_uuid) = joined(dir.path()).await;
    drop(crashed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        watch.borrow().contains(crashed_uuid),
        "not reaped by the follower"
    );
    let reaped = watcher.reap_dead().await.unwrap().expect("reaped");
    assert!(!reaped.contains(crashed_uuid));
    assert_eq!(*watch.borrow(), reaped);
}

/// A node process killed with SIGKILL disappears from another node's watch within
/// a few seconds.
#[tokio::test]
async fn kill_9_of_a_real_process_is_noticed_by_the_watch() {
    if std::env::var_os(CHILD_DIR_ENV).is_some() {
        return; // In the child, this test is not the one to run.
    }
    let dir = tempfile::tempdir().unwrap();
    let watcher = LocalDriver::open(dir.path()).unwrap();
    let watch = watcher.subscribe();
    let (mut child, child_uuid) = spawn_child_node(dir.path()).await;
    assert!(watcher.membership().await.unwrap().contains(child_uuid));

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let noticed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut watch = watch.clone();
        while watch.borrow_and_update().contains(child_uuid) {
            watch.changed().await.unwrap();
        }
    })
    .await;
    assert!(noticed.is_ok(), "crash not noticed within 5 s");
}

/// A returned node killed with SIGKILL while the cluster is stopped is dropped from the
/// returned nodes by another node's follower, and the cluster stays stopped.
#[tokio::test]
async fn kill_9_of_a_returned_node_drops_it_from_returned() {
    if std::env::var_os(CHILD_DIR_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (member, member_uuid) = joined(dir.path()).await;
    member.format(config()).await.unwrap();
    member.shutdown_cluster().await.unwrap();
    drop(member);
    let watcher = LocalDriver::open(dir.path()).unwrap();
    let watch = watcher.subscribe();
    // The child is a new node: it waits among the returned nodes.
    let (mut child, child_uuid) = spawn_child_node(dir.path()).await;
    let returned = watcher.membership().await.unwrap();
    assert!(returned.is_present(child_uuid) && !returned.is_running());

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let dropped = tokio::time::timeout(Duration::from_secs(5), async {
        let mut watch = watch.clone();
        while watch.borrow_and_update().is_present(child_uuid) {
            watch.changed().await.unwrap();
        }
        let seen = watch.borrow().clone();
        seen
    })
    .await
    .expect("dead returned node not dropped within 5 s");
    assert_eq!(dropped.epoch, returned.epoch + 1);
    assert!(!dropped.is_running());
    assert_eq!(dropped.missing()[0].uuid, member_uuid);
}

/// The return that would complete the restart probes the returned nodes under the
/// lock: one that died a moment before (not reaped yet) keeps the cluster stopped.
#[tokio::test]
async fn last_return_does_not_start_with_a_node_that_just_died() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_uuid) = joined(dir.path()).await;
    let (b, b_uuid) = joined(dir.path()).await;
    a.format(config()).await.unwrap();
    let down = a.shutdown_cluster().await.unwrap();
    drop((a, b));
    let a_again = LocalDriver::open(dir.path()).unwrap();
    a_again.join(node(a_uuid)).await.unwrap();
    drop(a_again); // dies; no follower or reap has run
    let b_again = LocalDriver::open(dir.path()).unwrap();
    let after = b_again.join(node(b_uuid)).await.unwrap();
    assert_eq!(
        after.epoch,
        down.epoch + 2,
        "dropped in the same epoch as the join"
    );
    assert!(!after.is_running());
    assert!(!after.is_present(a_uuid) && after.is_present(b_uuid));
    assert_eq!(after.missing(), vec![node(a_uuid)]);
}

/// A member that crashed before the shutdown (not reaped yet) is reaped by the
/// shutdown, so the restart does not wait for it.
#[tokio::test]
async fn shutdown_reaps_crashed_members_first() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_uuid) = joined(dir.path()).await;
    let (crashed, _) = joined(dir.path()).await;
    a.format(config()).await.unwrap();
    let before = a.membership().await.unwrap();
    drop(crashed);
    let down = a.shutdown_cluster().await.unwrap();
    assert_eq!(down.epoch, before.epoch + 2, "one reap, then the shutdown");
    assert_eq!(down.missing(), vec![node(a_uuid)]);
    drop(a);
    let back = LocalDriver::open(dir.path()).unwrap();
    let started = back.join(node(a_uuid)).await.unwrap();
    assert!(started.is_running());
    assert_eq!(started.members, vec![node(a_uuid)]);
}

/// The child process of the `kill -9` tests: joins the cluster, says so, and waits to
/// be killed. Does nothing in a normal test run.
#[tokio::test]
async fn child_node_joins_and_waits() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let (_handle, uuid) = joined(Path::new(&dir)).await;
    println!("joined {uuid}");
    tokio::time::sleep(Duration::from_secs(60)).await;
}

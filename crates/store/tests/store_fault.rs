//! Fault-injection mode: `power_cut` keeps exactly what the syncs made durable.

mod common;

use common::*;
use store::StoreError;

#[test]
fn durable_write_survives_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, b"base", stamp(1), true)
        .unwrap();
    store.write(oid(1), 0, b"DURA", stamp(2), true).unwrap();
    assert_eq!(store.unsynced_changes(), 0);
    store.power_cut();
    assert_eq!(store.read(oid(1), 0, 4).unwrap(), b"DURA");
    assert_eq!(store.stamp(oid(1)).unwrap(), stamp(2));
}

#[test]
fn non_durable_write_is_gone_after_power_cut() {
    // Reads see the write before the cut; after it, the durable bytes and stamp are back.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, &pattern(10_000, 1), stamp(1), true)
        .unwrap();
    store
        .write(oid(1), 3000, &pattern(5000, 2), stamp(2), false)
        .unwrap();
    store.punch(oid(1), 0, 9000, stamp(3), false).unwrap();
    assert!(store.unsynced_changes() > 0);
    assert_eq!(store.read(oid(1), 0, 9000).unwrap(), vec![0u8; 9000]);
    store.power_cut();
    assert_eq!(store.read(oid(1), 0, 10_000).unwrap(), pattern(10_000, 1));
    assert_eq!(store.stamp(oid(1)).unwrap(), stamp(1));
}

#[test]
fn durable_write_makes_earlier_writes_to_the_object_durable() {
    // fdatasync covers every earlier write to the same file, not just the last one.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, &[], stamp(1), true)
        .unwrap();
    store
        .create_and_write(oid(2), 0, b"other", stamp(1), true)
        .unwrap();
    store.write(oid(1), 0, b"early", stamp(2), false).unwrap();
    store.write(oid(2), 0, b"OTHER", stamp(2), false).unwrap();
    store.write(oid(1), 8000, b"late", stamp(3), true).unwrap();
    store.power_cut();
    assert_eq!(store.read(oid(1), 0, 5).unwrap(), b"early");
    assert_eq!(store.read(oid(1), 8000, 4).unwrap(), b"late");
    assert_eq!(
        store.read(oid(2), 0, 5).unwrap(),
        b"other",
        "another object's write is not synced"
    );
}

#[test]
fn sync_all_then_power_cut_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, b"one", stamp(1), false)
        .unwrap();
    store
        .create_and_write(oid(2), 0, b"two", stamp(1), true)
        .unwrap();
    store.write(oid(2), 1, b"WO", stamp(2), false).unwrap();
    store
        .create_and_write(oid(3), 0, b"three", stamp(1), true)
        .unwrap();
    store.remove(oid(3), false).unwrap();
    store.sync_all().unwrap();
    assert_eq!(store.unsynced_changes(), 0);
    store.power_cut();
    assert_eq!(store.read(oid(1), 0, 3).unwrap(), b"one");
    assert_eq!(store.read(oid(2), 0, 3).unwrap(), b"tWO");
    assert!(!store.contains(oid(3)));
    assert_eq!(store.list().unwrap(), vec![oid(1), oid(2)]);
}

#[test]
fn create_without_sync_is_gone_after_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, b"volatile", stamp(1), false)
        .unwrap();
    store.write(oid(1), 0, b"V", stamp(2), false).unwrap();
    assert!(store.contains(oid(1)));
    store.power_cut();
    assert!(!store.contains(oid(1)));
    assert!(matches!(
        store.read(oid(1), 0, 1),
        Err(StoreError::NotFound(_))
    ));
    store
        .create_and_write(oid(1), 0, b"again", stamp(3), true)
        .unwrap();
    assert_eq!(store.read(oid(1), 0, 5).unwrap(), b"again");
}

#[test]
fn durable_write_to_an_unsynced_create_makes_the_object_durable() {
    // The FUA write after a non-durable create must not leave a file that vanishes.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, b"created", stamp(1), false)
        .unwrap();
    store.write(oid(1), 0, b"C", stamp(2), true).unwrap();
    store.power_cut();
    assert_eq!(store.read(oid(1), 0, 7).unwrap(), b"Created");
}

#[test]
fn removal_without_sync_is_undone_by_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, b"keep", stamp(1), true)
        .unwrap();
    store
        .create_and_write(oid(2), 0, b"gone", stamp(1), true)
        .unwrap();
    store.remove(oid(2), true).unwrap();
    store.remove(oid(1), false).unwrap();
    assert!(!store.contains(oid(1)));
    store.power_cut();
    assert_eq!(store.read(oid(1), 0, 4).unwrap(), b"keep");
    assert!(!store.contains(oid(2)));

    // A directory fsync for another object's durable remove commits this removal too.
    store
        .create_and_write(oid(3), 0, b"3", stamp(1), true)
        .unwrap();
    store.remove(oid(1), false).unwrap();
    store.remove(oid(3), true).unwrap();
    store.power_cut();
    assert!(!store.contains(oid(1)) && !store.contains(oid(3)));
}

#[test]
fn remove_and_recreate_without_sync_restore_the_old_object() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, b"old!", stamp(1), true)
        .unwrap();
    store.write(oid(1), 0, b"O", stamp(2), false).unwrap();
    store.remove(oid(1), false).unwrap();
    store
        .create_and_write(oid(1), 0, b"new!", stamp(5), false)
        .unwrap();
    store.write(oid(1), 0, b"N", stamp(6), true).unwrap();
    assert_eq!(store.read(oid(1), 0, 4).unwrap(), b"New!");
    store.power_cut();
    // The durable fsync of the directory made the remove and re-create durable too.
    assert_eq!(store.read(oid(1), 0, 4).unwrap(), b"New!");

    store.remove(oid(1), false).unwrap();
    store
        .create_and_write(oid(1), 0, b"temp", stamp(7), false)
        .unwrap();
    store.power_cut();
    assert_eq!(store.read(oid(1), 0, 4).unwrap(), b"New!");
    assert_eq!(store.stamp(oid(1)).unwrap(), stamp(6));
}

#[test]
fn mark_stale_is_durable_across_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, b"bad", stamp(1), false)
        .unwrap();
    store.write(oid(1), 0, b"B", stamp(2), false).unwrap();
    store.mark_stale(oid(1)).unwrap();
    store.power_cut();
    assert!(matches!(
        store.read(oid(1), 0, 1),
        Err(StoreError::Stale(_))
    ));
    assert_eq!(store.list_stale(), vec![oid(1)]);
}

#[test]
fn sync_count_counts_syncs_in_fault_mode() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, b"a", stamp(1), false)
        .unwrap();
    store.write(oid(1), 0, b"b", stamp(2), false).unwrap();
    assert_eq!(store.sync_count(), 0);
    store.write(oid(1), 0, b"c", stamp(3), true).unwrap();
    store.sync_all().unwrap();
    store.sync_all().unwrap();
    assert_eq!(store.sync_count(), 3);
}

#[test]
fn power_cut_is_a_no_op_without_fault_injection() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, b"x", stamp(1), false)
        .unwrap();
    store.power_cut();
    assert_eq!(store.read(oid(1), 0, 1).unwrap(), b"x");
    assert_eq!(store.unsynced_changes(), 0);
}

#[test]
fn reopening_after_a_process_crash_keeps_unsynced_writes() {
    // A process crash (not a power cut) loses nothing: the page cache survives it.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, true);
    store
        .create_and_write(oid(1), 0, b"x", stamp(1), true)
        .unwrap();
    store.remove(oid(1), false).unwrap();
    store
        .create_and_write(oid(2), 0, b"y", stamp(1), false)
        .unwrap();
    drop(store);
    let store = open(dir.path(), SMALL_OBJECT, true);
    assert!(!store.contains(oid(1)));
    assert_eq!(store.read(oid(2), 0, 1).unwrap(), b"y");
    assert!(std::fs::read_dir(dir.path().join("fault-removed"))
        .unwrap()
        .next()
        .is_none());
}

//! The object store's API contract on a healthy disk: reads, writes, creates, punches,
//! removes, stamps, stale marking, listing, reopening and concurrency.

mod common;

use common::*;
use proto::Oid;
use std::fs;
use std::sync::Arc;
use store::{ObjectStore, Stamp, StoreConfig, StoreError};

#[test]
fn unwritten_range_reads_as_zeros() {
    // A fresh object is sparse: everything outside the created range is zero.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 5000, &pattern(10, 1), stamp(1), false)
        .unwrap();
    assert_eq!(store.read(oid(1), 0, 5000).unwrap(), vec![0u8; 5000]);
    assert_eq!(
        store.read(oid(1), 20_000, 30_000).unwrap(),
        vec![0u8; 30_000]
    );
    assert_eq!(store.read(oid(1), 5000, 10).unwrap(), pattern(10, 1));
    assert_eq!(store.read(oid(1), 7, 0).unwrap(), Vec::<u8>::new());
}

#[test]
fn partial_block_writes_at_odd_offsets_keep_neighbours() {
    // Read-modify-write of edge blocks must keep the bytes around the written range.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    let full = pattern(SMALL_OBJECT as usize, 3);
    store
        .create_and_write(oid(1), 0, &full, stamp(1), false)
        .unwrap();
    let mut model = full.clone();
    for (offset, len) in [
        (1usize, 1usize),
        (4095, 2),
        (4097, 8190),
        (12_345, 20_000),
        (65_535, 1),
    ] {
        let data = pattern(len, offset as u8);
        store
            .write(oid(1), offset as u64, &data, stamp(2), false)
            .unwrap();
        model[offset..offset + len].copy_from_slice(&data);
    }
    assert_eq!(store.read(oid(1), 0, SMALL_OBJECT).unwrap(), model);
    assert_eq!(store.read(oid(1), 4094, 3).unwrap(), model[4094..4097]);
}

#[test]
fn create_twice_gives_exists() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, b"first", stamp(1), true)
        .unwrap();
    let err = store
        .create_and_write(oid(1), 0, b"second", stamp(2), true)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Exists(o) if o == oid(1)),
        "{err:?}"
    );
    assert_eq!(store.read(oid(1), 0, 5).unwrap(), b"first");
    assert_eq!(store.stamp(oid(1)).unwrap(), stamp(1));
    assert!(
        fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "temp file left"
    );
}

#[test]
fn absent_object_is_not_found_and_never_created_by_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    fn not_found<T>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::NotFound(o)) if o == oid(9))
    }
    assert!(not_found(store.write(oid(9), 0, b"x", stamp(1), true)));
    assert!(not_found(store.punch(oid(9), 0, 10, stamp(1), true)));
    assert!(not_found(store.read(oid(9), 0, 1)));
    assert!(not_found(store.stamp(oid(9))));
    assert!(not_found(store.remove(oid(9), true)));
    assert!(!store.contains(oid(9)));
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn ranges_past_capacity_are_out_of_range() {
    // Data objects hold object_size bytes, inode objects 4 MiB + 4 KiB.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    let cap = u64::from(SMALL_OBJECT);
    fn out<T>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::OutOfRange { .. }))
    }
    assert!(out(store.create_and_write(
        oid(1),
        cap - 1,
        b"ab",
        stamp(1),
        false
    )));
    store
        .create_and_write(oid(1), cap - 2, b"ab", stamp(1), false)
        .unwrap();
    assert!(out(store.read(oid(1), cap, 1)));
    assert!(out(store.read(oid(1), u64::MAX, 2)));
    assert!(out(store.write(oid(1), cap - 1, b"ab", stamp(2), false)));
    assert!(out(store.punch(oid(1), 1, cap, stamp(2), false)));
    assert!(out(store.punch(oid(1), u64::MAX, 2, stamp(2), false)));

    let inode = Oid::inode(7);
    let inode_cap = proto::oid::INODE_OBJECT_SIZE;
    store
        .create_and_write(inode, inode_cap - 4, &[1, 2, 3, 4], stamp(1), false)
        .unwrap();
    assert_eq!(store.read(inode, inode_cap - 4, 4).unwrap(), [1, 2, 3, 4]);
    assert!(out(store.read(inode, inode_cap - 4, 5)));
}

#[test]
fn punch_reads_zeros_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    let full = pattern(SMALL_OBJECT as usize, 5);
    store
        .create_and_write(oid(1), 0, &full, stamp(1), true)
        .unwrap();
    store.punch(oid(1), 100, 30_000, stamp(2), true).unwrap();
    let got = store.read(oid(1), 0, SMALL_OBJECT).unwrap();
    assert_eq!(got[..100], full[..100]);
    assert!(got[100..30_100].iter().all(|b| *b == 0));
    assert_eq!(got[30_100..], full[30_100..]);
    store
        .punch(oid(1), 0, u64::from(SMALL_OBJECT), stamp(3), true)
        .unwrap();
    assert_eq!(
        store.read(oid(1), 0, SMALL_OBJECT).unwrap(),
        vec![0u8; SMALL_OBJECT as usize]
    );
    assert_eq!(store.stamp(oid(1)).unwrap(), stamp(3));
}

#[test]
fn stamp_is_the_maximum_of_writes() {
    // A late write with an older stamp does not lower the stored stamp.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, b"a", Stamp::new(2, 5), false)
        .unwrap();
    store
        .write(oid(1), 0, b"b", Stamp::new(3, 4), false)
        .unwrap();
    assert_eq!(store.stamp(oid(1)).unwrap(), Stamp::new(2, 5));
    store.punch(oid(1), 0, 1, Stamp::new(1, 9), false).unwrap();
    assert_eq!(store.stamp(oid(1)).unwrap(), Stamp::new(1, 9));
    drop(store);
    let store = open(dir.path(), SMALL_OBJECT, false);
    assert_eq!(store.stamp(oid(1)).unwrap(), Stamp::new(1, 9));
}

#[test]
fn remove_list_and_contains() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    for index in [3, 1, 2] {
        store
            .create_and_write(oid(index), 0, b"x", stamp(1), false)
            .unwrap();
    }
    store
        .create_and_write(Oid::inode(7), 0, b"i", stamp(1), false)
        .unwrap();
    fs::write(dir.path().join("objects").join("not-an-object"), b"").unwrap();
    assert_eq!(
        store.list().unwrap(),
        vec![oid(1), oid(2), oid(3), Oid::inode(7)]
    );
    store.remove(oid(2), true).unwrap();
    assert!(!store.contains(oid(2)) && store.contains(oid(1)));
    assert!(matches!(
        store.read(oid(2), 0, 1),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.list().unwrap(), vec![oid(1), oid(3), Oid::inode(7)]);
    store
        .create_and_write(oid(2), 0, b"again", stamp(5), false)
        .unwrap();
    assert_eq!(store.read(oid(2), 0, 5).unwrap(), b"again");
    assert!(store.used_bytes() > 0);
}

#[test]
fn mark_stale_quarantines_until_recreated() {
    // A stale copy is moved aside (kept), reads say Stale, and recovery recreates it.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, b"old", stamp(1), true)
        .unwrap();
    store.mark_stale(oid(1)).unwrap();
    store.mark_stale(oid(1)).unwrap();
    assert!(matches!(
        store.read(oid(1), 0, 3),
        Err(StoreError::Stale(_))
    ));
    assert!(matches!(
        store.write(oid(1), 0, b"x", stamp(2), false),
        Err(StoreError::Stale(_))
    ));
    assert!(!store.contains(oid(1)));
    assert!(store.list().unwrap().is_empty());
    assert_eq!(store.list_stale(), vec![oid(1)]);
    assert_eq!(
        fs::read_dir(dir.path().join("quarantine")).unwrap().count(),
        1
    );

    drop(store);
    let store = open(dir.path(), SMALL_OBJECT, false);
    assert!(
        store.is_stale(oid(1)),
        "stale marker must survive a restart"
    );
    store
        .create_and_write(oid(1), 0, b"new", stamp(3), true)
        .unwrap();
    assert!(!store.is_stale(oid(1)));
    assert_eq!(store.read(oid(1), 0, 3).unwrap(), b"new");
    drop(store);
    let store = open(dir.path(), SMALL_OBJECT, false);
    assert_eq!(store.read(oid(1), 0, 3).unwrap(), b"new");
    assert_eq!(
        fs::read_dir(dir.path().join("quarantine")).unwrap().count(),
        1,
        "old copy kept"
    );
}

#[test]
fn mark_stale_of_absent_object_records_a_marker_removed_by_remove() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store.mark_stale(oid(4)).unwrap();
    assert!(matches!(
        store.read(oid(4), 0, 1),
        Err(StoreError::Stale(_))
    ));
    store.remove(oid(4), true).unwrap();
    assert!(matches!(
        store.read(oid(4), 0, 1),
        Err(StoreError::NotFound(_))
    ));
    drop(store);
    let store = open(dir.path(), SMALL_OBJECT, false);
    assert!(store.list_stale().is_empty());
}

#[test]
fn reopen_keeps_data_and_cleans_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 100, &pattern(9000, 2), stamp(1), true)
        .unwrap();
    drop(store);
    let leftover = dir.path().join("tmp").join("0000000700000001.1.1.tmp");
    fs::write(&leftover, b"half-created").unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    assert!(!leftover.exists());
    assert_eq!(store.read(oid(1), 100, 9000).unwrap(), pattern(9000, 2));
}

#[test]
fn second_open_of_the_same_directory_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    let again = ObjectStore::open(StoreConfig::new(dir.path(), SMALL_OBJECT));
    assert!(matches!(again, Err(StoreError::Busy { .. })));
    drop(store);
    ObjectStore::open(StoreConfig::new(dir.path(), SMALL_OBJECT)).unwrap();
    assert!(matches!(
        ObjectStore::open(StoreConfig::new(dir.path(), 0)),
        Err(StoreError::InvalidConfig(_))
    ));
}

#[test]
fn concurrent_writes_to_one_object_keep_crcs_consistent() {
    // Threads write interleaved blocks (and sub-block pieces) of one object while
    // others read; every read must pass its checksums and the end state is exact.
    let dir = tempfile::tempdir().unwrap();
    let object_size = 1 << 20;
    let store = Arc::new(open(dir.path(), object_size, false));
    store
        .create_and_write(oid(1), 0, &[], stamp(0), false)
        .unwrap();
    let threads = 4u64;
    let blocks = u64::from(object_size) / 4096;
    let writers: Vec<_> = (0..threads)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for block in (t..blocks).step_by(threads as usize) {
                    let fill = vec![block as u8 | 1; 4096];
                    // Two halves at odd offsets: both are read-modify-writes.
                    store
                        .write(oid(1), block * 4096, &fill[..1001], stamp(block), false)
                        .unwrap();
                    store
                        .write(
                            oid(1),
                            block * 4096 + 1001,
                            &fill[1001..],
                            stamp(block),
                            block % 2 == 0,
                        )
                        .unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            for i in 0..200u64 {
                store
                    .read(
                        oid(1),
                        (i * 7919) % (u64::from(object_size) - 10_000),
                        10_000,
                    )
                    .unwrap();
            }
        })
    };
    for handle in writers {
        handle.join().unwrap();
    }
    reader.join().unwrap();
    let all = store.read(oid(1), 0, object_size).unwrap();
    for (block, data) in all.chunks(4096).enumerate() {
        assert!(data.iter().all(|b| *b == block as u8 | 1), "block {block}");
    }
    assert_eq!(store.stamp(oid(1)).unwrap(), stamp(blocks - 1));
}

#[test]
fn concurrent_creates_of_one_object_let_exactly_one_win() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), SMALL_OBJECT, false));
    let results: Vec<_> = (0..8u8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.create_and_write(oid(1), 0, &[t], stamp(1), false))
        })
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(()) | Err(StoreError::Exists(_)))));
}

#[test]
fn durable_calls_are_counted_as_syncs() {
    // sync_count: one per sync_all and one per durable change; none for the rest.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, b"a", stamp(1), false)
        .unwrap();
    store.write(oid(1), 0, b"b", stamp(2), false).unwrap();
    assert_eq!(store.sync_count(), 0);
    store.write(oid(1), 0, b"c", stamp(3), true).unwrap();
    store
        .create_and_write(oid(2), 0, b"d", stamp(1), true)
        .unwrap();
    store.punch(oid(2), 0, 1, stamp(2), true).unwrap();
    store.remove(oid(2), true).unwrap();
    assert_eq!(store.sync_count(), 4);
    store.sync_all().unwrap();
    assert_eq!(store.sync_count(), 5);
    assert_eq!(store.read(oid(1), 0, 1).unwrap(), b"c");
}

#[test]
fn try_write_now_applies_only_writes_that_cannot_wait() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    let full = pattern(SMALL_OBJECT as usize, 5);
    store
        .create_and_write(oid(1), 0, &full, stamp(1), false)
        .unwrap();
    let mut model = full.clone();

    // Whole blocks of an open object: done in place, crcs and stamp updated.
    let data = pattern(8192, 9);
    let done = store.try_write_now(oid(1), 4096, &data, stamp(5));
    assert!(matches!(done, Some(Ok(()))), "{done:?}");
    model[4096..4096 + 8192].copy_from_slice(&data);
    assert_eq!(store.read(oid(1), 0, SMALL_OBJECT).unwrap(), model);
    assert_eq!(store.stamp(oid(1)).unwrap(), stamp(5));

    // An edge block to read first, or too much data: left to `write`, nothing done.
    assert!(store
        .try_write_now(oid(1), 100, &pattern(4096, 1), stamp(6))
        .is_none());
    assert!(store
        .try_write_now(oid(1), 0, &pattern(4000, 1), stamp(6))
        .is_none());
    let big = pattern(store::WRITE_NOW_MAX as usize + 4096, 2);
    let big_dir = tempfile::tempdir().unwrap();
    let store_big = open(big_dir.path(), 4 << 20, false);
    store_big
        .create_and_write(oid(1), 0, &[1u8; 4096], stamp(1), false)
        .unwrap();
    assert!(store_big.try_write_now(oid(1), 0, &big, stamp(2)).is_none());
    assert_eq!(store.read(oid(1), 0, SMALL_OBJECT).unwrap(), model);
    assert_eq!(store.stamp(oid(1)).unwrap(), stamp(5));

    // Out of range is an error, as from `write`.
    assert!(matches!(
        store.try_write_now(oid(1), SMALL_OBJECT as u64, &pattern(4096, 1), stamp(7)),
        Some(Err(StoreError::OutOfRange { .. }))
    ));

    // A file not open yet (fresh store instance) would need an open: left to `write`.
    drop(store);
    let store = open(dir.path(), SMALL_OBJECT, false);
    assert!(store
        .try_write_now(oid(1), 0, &pattern(4096, 3), stamp(8))
        .is_none());
    assert!(store
        .try_write_now(oid(9), 0, &pattern(4096, 3), stamp(8))
        .is_none());
    assert_eq!(store.read(oid(1), 0, SMALL_OBJECT).unwrap(), model);
}

#[test]
fn sync_all_with_few_or_many_changed_objects() {
    // Few changes are synced object by object (plus the directory for a creation or a
    // removal), many by one syncfs; both succeed and leave the data readable, also
    // when a changed object's file is gone by the time of the sync.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    for i in 0..3 {
        store
            .create_and_write(oid(i), 0, &pattern(4096, i as u8), stamp(1), true)
            .unwrap();
    }
    let before = store.sync_count();
    store
        .write(oid(0), 4096, &pattern(4096, 7), stamp(2), false)
        .unwrap();
    store
        .create_and_write(oid(10), 0, &pattern(4096, 10), stamp(2), false)
        .unwrap();
    store.remove(oid(2), false).unwrap();
    store.sync_all().unwrap();
    assert_eq!(store.sync_count(), before + 1);

    for i in 100..150 {
        store
            .create_and_write(oid(i), 0, &pattern(4096, i as u8), stamp(3), false)
            .unwrap();
    }
    store.sync_all().unwrap();
    assert_eq!(store.sync_count(), before + 2);

    store
        .write(oid(1), 0, &pattern(4096, 11), stamp(4), false)
        .unwrap();
    fs::remove_file(object_path(dir.path(), oid(1))).unwrap();
    store.sync_all().unwrap();

    drop(store);
    let store = open(dir.path(), SMALL_OBJECT, false);
    assert_eq!(store.read(oid(0), 4096, 4096).unwrap(), pattern(4096, 7));
    assert_eq!(store.read(oid(10), 0, 4096).unwrap(), pattern(4096, 10));
    assert_eq!(store.read(oid(120), 0, 4096).unwrap(), pattern(4096, 120));
    assert!(matches!(
        store.read(oid(2), 0, 1),
        Err(StoreError::NotFound(_))
    ));
}

fn summed<'a>(data: &'a [u8], crcs: &'a [u32]) -> store::Summed<'a> {
    store::Summed {
        data,
        block_crcs: Some(crcs),
    }
}

#[test]
fn block_crcs_from_the_caller_become_the_tags() {
    // A replica that checked a frame through its block crcs hands them over: the stored
    // tags must be exactly what the store computes itself, so reads (after a reopen,
    // from disk) verify. Crcs that do not line up with the object's blocks are ignored.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    let first = pattern(16 << 10, 4);
    let first_crcs = proto::sums::block_crcs(&first).unwrap();
    let second = pattern(8192, 6);
    let second_crcs = proto::sums::block_crcs(&second).unwrap();
    store
        .create_and_write(oid(1), 8192, summed(&first, &first_crcs), stamp(1), false)
        .unwrap();
    store
        .write(oid(1), 0, summed(&second, &second_crcs), stamp(2), false)
        .unwrap();
    assert!(matches!(
        store.try_write_now(oid(1), 24 << 10, summed(&second, &second_crcs), stamp(3)),
        Some(Ok(()))
    ));
    // Not block-aligned: the crcs do not describe the object's blocks and are not used.
    store
        .write(oid(1), 100, summed(&second, &second_crcs), stamp(4), false)
        .unwrap();
    let mut model = vec![0u8; 40 << 10];
    model[8192..8192 + first.len()].copy_from_slice(&first);
    model[..8192].copy_from_slice(&second);
    model[24 << 10..(24 << 10) + 8192].copy_from_slice(&second);
    model[100..100 + 8192].copy_from_slice(&second);
    drop(store);
    let store = open(dir.path(), SMALL_OBJECT, false);
    assert_eq!(store.read(oid(1), 0, 40 << 10).unwrap(), model);
}

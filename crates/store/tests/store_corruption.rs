//! Bad disk content gives typed errors, never a panic or wrong data: flipped bits fail
//! their checksum, broken files are Corrupt.

mod common;

use common::*;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use store::StoreError;

fn flip_byte(path: &Path, at: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x04], at).unwrap();
}

#[test]
fn flipped_bit_in_data_fails_the_checksum_of_its_block() {
    // Flip one bit of block 3 on disk (behind the store's back, handle still cached).
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4 << 20, false);
    store
        .create_and_write(oid(1), 0, &pattern(64 << 10, 9), stamp(1), true)
        .unwrap();
    assert!(store.read(oid(1), 0, 64 << 10).is_ok());
    flip_byte(
        &object_path(dir.path(), oid(1)),
        DATA_OFFSET + 3 * 4096 + 17,
    );

    let err = store.read(oid(1), 0, 64 << 10).unwrap_err();
    assert!(
        matches!(err, StoreError::Checksum { block: 3, .. }),
        "{err:?}"
    );
    assert!(err.is_corruption());
    assert!(
        store.read(oid(1), 4 * 4096, 4096).is_ok(),
        "other blocks still read"
    );
    let err = store.read(oid(1), 3 * 4096 + 100, 1).unwrap_err();
    assert!(matches!(err, StoreError::Checksum { block: 3, .. }));
    // A partial write must not launder the bad block under a new crc.
    let err = store
        .write(oid(1), 3 * 4096 + 5, b"x", stamp(2), false)
        .unwrap_err();
    assert!(matches!(err, StoreError::Checksum { block: 3, .. }));
    // A whole-block write replaces it.
    store
        .write(oid(1), 3 * 4096, &[1u8; 4096], stamp(2), false)
        .unwrap();
    assert_eq!(store.read(oid(1), 3 * 4096, 4096).unwrap(), vec![1u8; 4096]);
}

#[test]
fn flipped_bit_in_a_never_written_block_is_detected() {
    // Holes have crc entries too (the zero-block crc), so junk appearing there is caught.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, b"x", stamp(1), true)
        .unwrap();
    flip_byte(&object_path(dir.path(), oid(1)), DATA_OFFSET + 10 * 4096);
    assert!(matches!(
        store.read(oid(1), 10 * 4096, 1),
        Err(StoreError::Checksum { block: 10, .. })
    ));
}

#[test]
fn flipped_bit_in_the_crc_table_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, &pattern(8192, 1), stamp(1), true)
        .unwrap();
    flip_byte(&object_path(dir.path(), oid(1)), 4096 + 4);
    assert!(matches!(
        store.read(oid(1), 0, 8192),
        Err(StoreError::Checksum { block: 1, .. })
    ));
}

/// Opens a fresh store over a damaged object file and checks every call on the object
/// reports Corrupt (and that the store still works for other objects).
fn assert_corrupt_after(damage: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, &pattern(8192, 1), stamp(1), true)
        .unwrap();
    store
        .create_and_write(oid(2), 0, b"fine", stamp(1), true)
        .unwrap();
    drop(store);
    damage(&object_path(dir.path(), oid(1)));
    let store = open(dir.path(), SMALL_OBJECT, false);
    fn corrupt<T>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::Corrupt { .. }))
    }
    assert!(corrupt(store.read(oid(1), 0, 10)));
    assert!(corrupt(store.write(oid(1), 0, b"x", stamp(2), true)));
    assert!(corrupt(store.stamp(oid(1))));
    assert!(matches!(
        store.create_and_write(oid(1), 0, b"x", stamp(2), true),
        Err(StoreError::Exists(_))
    ));
    assert_eq!(store.read(oid(2), 0, 4).unwrap(), b"fine");
    // The caller's remedy: quarantine and recover.
    store.mark_stale(oid(1)).unwrap();
    store
        .create_and_write(oid(1), 0, b"recovered", stamp(3), true)
        .unwrap();
    assert_eq!(store.read(oid(1), 0, 9).unwrap(), b"recovered");
}

#[test]
fn zero_length_object_file_is_corrupt() {
    assert_corrupt_after(|path| fs::write(path, b"").unwrap());
}

#[test]
fn truncated_object_file_is_corrupt() {
    assert_corrupt_after(|path| {
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(6000)
            .unwrap()
    });
}

#[test]
fn object_file_cut_inside_its_header_is_corrupt() {
    assert_corrupt_after(|path| {
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(20)
            .unwrap()
    });
}

#[test]
fn garbage_object_file_is_corrupt() {
    assert_corrupt_after(|path| fs::write(path, pattern(100_000, 7)).unwrap());
}

#[test]
fn damaged_header_is_corrupt() {
    assert_corrupt_after(|path| flip_byte(path, 41));
}

#[test]
fn object_file_of_another_oid_is_corrupt() {
    // A file renamed to the wrong name must not be served as that object.
    assert_corrupt_after(|path| {
        let other = path.with_file_name(format!("{:016x}", oid(2).raw()));
        fs::copy(other, path).unwrap();
    });
}

#[test]
fn object_written_with_another_object_size_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, b"x", stamp(1), true)
        .unwrap();
    drop(store);
    let store = open(dir.path(), SMALL_OBJECT * 2, false);
    assert!(matches!(
        store.read(oid(1), 0, 1),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn file_truncated_while_cached_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SMALL_OBJECT, false);
    store
        .create_and_write(oid(1), 0, b"x", stamp(1), true)
        .unwrap();
    let path = object_path(dir.path(), oid(1));
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(9000)
        .unwrap();
    assert!(matches!(
        store.read(oid(1), 0, 8192),
        Err(StoreError::Corrupt { .. })
    ));
}

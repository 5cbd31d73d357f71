//! Property tests: random sequences of creates, writes, punches, removes, syncs and
//! power cuts on a few objects, compared with an in-memory model of both the current
//! and the durable contents of each object.

mod common;

use common::*;
use proptest::prelude::*;
use store::{ObjectStore, StoreError};

const OBJECT_SIZE: u32 = 8 * 4096;
const OBJECTS: u32 = 2;

#[derive(Clone, Debug)]
enum Op {
    Create {
        object: u32,
        offset: u64,
        len: usize,
        durable: bool,
    },
    Write {
        object: u32,
        offset: u64,
        len: usize,
        durable: bool,
    },
    Punch {
        object: u32,
        offset: u64,
        len: u64,
        durable: bool,
    },
    Read {
        object: u32,
        offset: u64,
        len: u32,
    },
    Remove {
        object: u32,
        durable: bool,
    },
    SyncAll,
    PowerCut,
}

/// Offsets biased to block edges, where the read-modify-write logic has its cases.
fn offset() -> impl Strategy<Value = u64> {
    let size = u64::from(OBJECT_SIZE);
    prop_oneof![
        0..size,
        (0..8u64, -2i64..=2).prop_map(move |(block, delta)| (block * 4096)
            .saturating_add_signed(delta)
            .min(size - 1)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let object = 0..OBJECTS;
    let len = 0usize..3 * 4096;
    prop_oneof![
        1 => (object.clone(), offset(), len.clone(), any::<bool>())
            .prop_map(|(object, offset, len, durable)| Op::Create { object, offset, len, durable }),
        4 => (object.clone(), offset(), len.clone(), any::<bool>())
            .prop_map(|(object, offset, len, durable)| Op::Write { object, offset, len, durable }),
        2 => (object.clone(), offset(), 0u64..5 * 4096, any::<bool>())
            .prop_map(|(object, offset, len, durable)| Op::Punch { object, offset, len, durable }),
        3 => (object.clone(), offset(), 0u32..3 * 4096)
            .prop_map(|(object, offset, len)| Op::Read { object, offset, len }),
        1 => (object, any::<bool>()).prop_map(|(object, durable)| Op::Remove { object, durable }),
        1 => Just(Op::SyncAll),
        1 => Just(Op::PowerCut),
    ]
}

/// What the store should hold, per object: its current bytes (`None`: absent), the
/// state a power cut would leave, the contents of its current file as of that file's
/// last sync (or creation), and whether its creation or removal awaits a directory fsync.
#[derive(Clone, Default)]
struct Object {
    current: Option<Vec<u8>>,
    durable: Option<Vec<u8>>,
    file_synced: Vec<u8>,
    dir_pending: bool,
}

struct Model {
    objects: Vec<Object>,
}

impl Model {
    fn new() -> Model {
        Model {
            objects: vec![Object::default(); OBJECTS as usize],
        }
    }

    /// An fsync of the objects directory: every pending creation and removal becomes
    /// durable, with the contents its file had at its last sync.
    fn dir_synced(&mut self) {
        for object in self.objects.iter_mut().filter(|o| o.dir_pending) {
            object.durable = object.current.as_ref().map(|_| object.file_synced.clone());
            object.dir_pending = false;
        }
    }

    /// A durable write or punch: fdatasync of the file, then a directory fsync if the
    /// object's creation was pending.
    fn file_synced(&mut self, slot: usize) {
        let object = &mut self.objects[slot];
        object.file_synced = object.current.clone().unwrap_or_default();
        if object.dir_pending {
            self.dir_synced();
        } else {
            object.durable = object.current.clone();
        }
    }

    fn all_synced(&mut self) {
        for object in &mut self.objects {
            object.durable = object.current.clone();
            object.file_synced = object.current.clone().unwrap_or_default();
            object.dir_pending = false;
        }
    }

    fn power_cut(&mut self) {
        for object in &mut self.objects {
            object.current = object.durable.clone();
            object.file_synced = object.durable.clone().unwrap_or_default();
            object.dir_pending = false;
        }
    }
}

fn out_of_range<T>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::OutOfRange { .. }))
}

fn fits(offset: u64, len: u64) -> bool {
    offset + len <= u64::from(OBJECT_SIZE)
}

fn run(ops: Vec<Op>, fault_injection: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OBJECT_SIZE, fault_injection);
    let mut model = Model::new();
    for (step, op) in ops.into_iter().enumerate() {
        apply(&store, &mut model, step, op, fault_injection)?;
    }
    // Everything the model says is current must read back, checksums included.
    for object in 0..OBJECTS {
        let got = store.read(oid(object), 0, OBJECT_SIZE).ok();
        prop_assert_eq!(got, model.objects[object as usize].current.clone());
    }
    Ok(())
}

fn apply(
    store: &ObjectStore,
    model: &mut Model,
    step: usize,
    op: Op,
    fault: bool,
) -> Result<(), TestCaseError> {
    let generation = step as u64 + 1;
    match op {
        Op::Create {
            object,
            offset,
            len,
            durable,
        } => {
            let data = pattern(len, step as u8);
            let result =
                store.create_and_write(oid(object), offset, &data, stamp(generation), durable);
            let slot = object as usize;
            if !fits(offset, len as u64) {
                prop_assert!(out_of_range(&result), "{:?}", result);
            } else if model.objects[slot].current.is_some() {
                prop_assert!(matches!(result, Err(StoreError::Exists(_))), "{:?}", result);
            } else {
                prop_assert!(result.is_ok(), "{:?}", result);
                let mut bytes = vec![0u8; OBJECT_SIZE as usize];
                bytes[offset as usize..offset as usize + len].copy_from_slice(&data);
                let object = &mut model.objects[slot];
                object.current = Some(bytes.clone());
                object.file_synced = bytes;
                object.dir_pending = true;
                if durable {
                    model.dir_synced();
                }
            }
        }
        Op::Write {
            object,
            offset,
            len,
            durable,
        } => {
            let data = pattern(len, step as u8);
            let result = store.write(oid(object), offset, &data, stamp(generation), durable);
            change(
                model,
                object,
                offset,
                len as u64,
                durable,
                result,
                |bytes| bytes[offset as usize..offset as usize + len].copy_from_slice(&data),
            )?;
        }
        Op::Punch {
            object,
            offset,
            len,
            durable,
        } => {
            let result = store.punch(oid(object), offset, len, stamp(generation), durable);
            change(model, object, offset, len, durable, result, |bytes| {
                bytes[offset as usize..(offset + len) as usize].fill(0)
            })?;
        }
        Op::Read {
            object,
            offset,
            len,
        } => {
            let result = store.read(oid(object), offset, len);
            match &model.objects[object as usize].current {
                _ if !fits(offset, len.into()) => {
                    prop_assert!(out_of_range(&result), "{:?}", result)
                }
                None => prop_assert!(
                    matches!(result, Err(StoreError::NotFound(_))),
                    "{:?}",
                    result
                ),
                Some(bytes) => {
                    prop_assert_eq!(
                        result.unwrap(),
                        bytes[offset as usize..(offset + u64::from(len)) as usize].to_vec()
                    )
                }
            }
        }
        Op::Remove { object, durable } => {
            let result = store.remove(oid(object), durable);
            let object = &mut model.objects[object as usize];
            if object.current.take().is_none() {
                prop_assert!(
                    matches!(result, Err(StoreError::NotFound(_))),
                    "{:?}",
                    result
                );
            } else {
                prop_assert!(result.is_ok());
                object.dir_pending = true;
                if durable {
                    model.dir_synced();
                }
            }
        }
        Op::SyncAll => {
            store.sync_all().unwrap();
            model.all_synced();
        }
        Op::PowerCut => {
            store.power_cut();
            if fault {
                model.power_cut();
            }
        }
    }
    Ok(())
}

/// Checks a write or punch result against the model and applies it there.
fn change(
    model: &mut Model,
    object: u32,
    offset: u64,
    len: u64,
    durable: bool,
    result: Result<(), StoreError>,
    edit: impl FnOnce(&mut Vec<u8>),
) -> Result<(), TestCaseError> {
    let slot = object as usize;
    if !fits(offset, len) {
        prop_assert!(out_of_range(&result), "{:?}", result);
        return Ok(());
    }
    let Some(bytes) = model.objects[slot].current.as_mut() else {
        prop_assert!(
            matches!(result, Err(StoreError::NotFound(_))),
            "{:?}",
            result
        );
        return Ok(());
    };
    prop_assert!(result.is_ok(), "{:?}", result);
    edit(bytes);
    if durable {
        model.file_synced(slot);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, false)?;
    }

    #[test]
    fn store_matches_model_across_power_cuts(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, true)?;
    }
}

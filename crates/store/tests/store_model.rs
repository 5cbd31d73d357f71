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
    Create { object: u32, offset: u64, len: usize, durable: bool },
    Write { object: u32, offset: u64, len: usize, durable: bool },
    Punch { object: u32, offset: u64, len: u64, durable: bool },
    Read { object: u32, offset: u64, len: u32 },
    Remove { object: u32, durable: bool },
    SyncAll,
    PowerCut,
}

/// Offsets biased to block edges, where the read-modify-write logic has its cases.
fn offset() -> impl Strategy<Value = u64> {
    let size = u64::from(OBJECT_SIZE);
    prop_oneof![
        0..size,
        (0..8u64, -2i64..=2).prop_map(move |(block, delta)| (block * 4096).saturating_add_signed(delta).min(size - 1)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let object = 0..OBJECTS;
    let len = 0usize..3 * 4096;
    prop_oneof![
        (object.clone(), offset(), len.clone(), any::<bool>())
            .prop_map(|(object, offset, len, durable)| Op::Create { object, offset, len, durable }),
        4 => (object.clone(), offset(), len.clone(), any::<bool>())
            .prop_map(|(object, offset, len, durable)| Op::Write { object, offset, len, durable }),
        2 => (object.clone(), offset(), 0u64..5 * 4096, any::<bool>())
            .prop_map(|(object, offset, len, durable)| Op::Punch { object, offset, len, durable }),
        3 => (object.clone(), offset(), 0u32..3 * 4096)
            .prop_map(|(object, offset, len)| Op::Read { object, offset, len }),
        (object, any::<bool>()).prop_map(|(object, durable)| Op::Remove { object, durable }),
        Just(Op::SyncAll),
        Just(Op::PowerCut),
    ]
}

/// What the store should hold: each object's current bytes, and the bytes a power cut
/// would leave (`None`: absent).
#[derive(Clone, Default)]
struct Model {
    current: Vec<Option<Vec<u8>>>,
    durable: Vec<Option<Vec<u8>>>,
}

impl Model {
    fn new() -> Model {
        Model {
            current: vec![None; OBJECTS as usize],
            durable: vec![None; OBJECTS as usize],
        }
    }

    /// A durable change to `object` makes its contents durable, and (through the
    /// directory fsync it implies for a pending create) its existence.
    fn make_durable(&mut self, object: usize) {
        self.durable[object] = self.current[object].clone();
    }
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
        prop_assert_eq!(got, model.current[object as usize].clone());
    }
    Ok(())
}

fn apply(store: &ObjectStore, model: &mut Model, step: usize, op: Op, fault: bool) -> Result<(), TestCaseError> {
    let generation = step as u64 + 1;
    match op {
        Op::Create { object, offset, len, durable } => {
            let data = pattern(len, step as u8);
            let result = store.create_and_write(oid(object), offset, &data, stamp(generation), durable);
            let slot = object as usize;
            if !fits(offset, len as u64) {
                prop_assert!(matches!(result, Err(StoreError::OutOfRange { .. })));
            } else if model.current[slot].is_some() {
                prop_assert!(matches!(result, Err(StoreError::Exists(_))));
            } else {
                prop_assert!(result.is_ok(), "{:?}", result);
                let mut bytes = vec![0u8; OBJECT_SIZE as usize];
                bytes[offset as usize..offset as usize + len].copy_from_slice(&data);
                model.current[slot] = Some(bytes);
                if durable {
                    // The directory fsync also commits other objects' creates and removes.
                    for other in 0..OBJECTS as usize {
                        if model.current[other].is_none() != model.durable[other].is_none() {
                            model.durable[other] = model.current[other].clone();
                        }
                    }
                    model.make_durable(slot);
                }
            }
        }
        Op::Write { object, offset, len, durable } => {
            let data = pattern(len, step as u8);
            let result = store.write(oid(object), offset, &data, stamp(generation), durable);
            change(model, object, offset, len as u64, durable, result, |bytes| {
                bytes[offset as usize..offset as usize + len].copy_from_slice(&data)
            })?;
        }
        Op::Punch { object, offset, len, durable } => {
            let result = store.punch(oid(object), offset, len, stamp(generation), durable);
            change(model, object, offset, len, durable, result, |bytes| {
                bytes[offset as usize..(offset + len) as usize].fill(0)
            })?;
        }
        Op::Read { object, offset, len } => {
            let result = store.read(oid(object), offset, len);
            match &model.current[object as usize] {
                _ if !fits(offset, len.into()) => prop_assert!(matches!(result, Err(StoreError::OutOfRange { .. }))),
                None => prop_assert!(matches!(result, Err(StoreError::NotFound(_)))),
                Some(bytes) => {
                    prop_assert_eq!(result.unwrap(), bytes[offset as usize..(offset + u64::from(len)) as usize].to_vec())
                }
            }
        }
        Op::Remove { object, durable } => {
            let result = store.remove(oid(object), durable);
            let slot = object as usize;
            if model.current[slot].take().is_none() {
                prop_assert!(matches!(result, Err(StoreError::NotFound(_))));
            } else {
                prop_assert!(result.is_ok());
                if durable {
                    for other in 0..OBJECTS as usize {
                        if model.current[other].is_none() != model.durable[other].is_none() {
                            model.durable[other] = model.current[other].clone();
                        }
                    }
                }
            }
        }
        Op::SyncAll => {
            store.sync_all().unwrap();
            model.durable = model.current.clone();
        }
        Op::PowerCut => {
            store.power_cut();
            if fault {
                model.current = model.durable.clone();
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
        prop_assert!(matches!(result, Err(StoreError::OutOfRange { .. })));
        return Ok(());
    }
    let Some(bytes) = model.current[slot].as_mut() else {
        prop_assert!(matches!(result, Err(StoreError::NotFound(_))));
        return Ok(());
    };
    prop_assert!(result.is_ok(), "{:?}", result);
    edit(bytes);
    if durable {
        // fdatasync makes the file's contents durable; if its creation was pending, the
        // directory fsync that follows also commits every pending create and remove.
        let creation_pending = model.durable[slot].is_none();
        model.make_durable(slot);
        if creation_pending {
            for other in 0..OBJECTS as usize {
                if model.current[other].is_none() != model.durable[other].is_none() {
                    model.durable[other] = model.current[other].clone();
                }
            }
        }
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

//! The cluster's shared state and the rules for changing it, with no I/O: membership
//! transitions including shutdown and restart (in `membership`), the VDI registry, VDI
//! locks and the stale-replica registry. A driver stores these values however it likes
//! and changes them only through these functions, so every driver follows the same
//! rules. Each type has a `check` of its invariants, run on every value read back from
//! storage.

mod membership;

use crate::{ClusterError, Membership, VdiEntry, VdiLock};
use proto::oid::VID_MAX;
use proto::{Oid, Vid};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// Most members a cluster can have.
pub const MEMBERS_MAX: usize = 1024;
/// Longest VDI name, in bytes.
pub const VDI_NAME_BYTES_MAX: usize = 255;
/// Most (object, node) pairs the stale registry holds at once.
pub const STALE_ENTRIES_MAX: usize = 100_000;
/// Most VDI lock slots (held or not) kept; one per vid ever locked.
pub const LOCK_SLOTS_MAX: usize = 1 << 20;

fn limit(what: &'static str, max: usize) -> ClusterError {
    ClusterError::LimitReached {
        what,
        max: max as u64,
    }
}

/// The VDI registry: name -> vid, with a counter so that vids are never reused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiRegistry {
    /// The vid the next created VDI gets. Every vid below it has been handed out once.
    pub next_vid: Vid,
    /// The live VDIs.
    pub vdis: BTreeMap<String, Vid>,
}

impl Default for VdiRegistry {
    fn default() -> VdiRegistry {
        // Vid 0 means "no owner" in data tables, so the first VDI gets 1.
        VdiRegistry {
            next_vid: 1,
            vdis: BTreeMap::new(),
        }
    }
}

impl VdiRegistry {
    /// Registers `name` with a fresh vid.
    pub fn create(&mut self, name: &str) -> Result<Vid, ClusterError> {
        check_vdi_name(name)?;
        if self.vdis.contains_key(name) {
            return Err(ClusterError::VdiExists(name.to_owned()));
        }
        if self.next_vid > VID_MAX {
            return Err(ClusterError::VidsExhausted);
        }
        let vid = self.next_vid;
        self.next_vid += 1;
        self.vdis.insert(name.to_owned(), vid);
        Ok(vid)
    }

    /// The vid of `name`, if registered.
    pub fn lookup(&self, name: &str) -> Option<Vid> {
        self.vdis.get(name).copied()
    }

    /// Every VDI, sorted by name.
    pub fn list(&self) -> Vec<VdiEntry> {
        let entry = |(name, &vid): (&String, &Vid)| VdiEntry {
            name: name.clone(),
            vid,
        };
        self.vdis.iter().map(entry).collect()
    }

    /// Unregisters `name` if it maps to `vid`.
    pub fn delete(&mut self, name: &str, vid: Vid) -> Result<(), ClusterError> {
        if self.lookup(name) != Some(vid) {
            return Err(ClusterError::NoSuchVdi(name.to_owned()));
        }
        self.vdis.remove(name);
        Ok(())
    }

    /// Invariants: every vid was handed out (0 < vid < next_vid) and appears once.
    pub fn check(&self) -> Result<(), String> {
        if self.next_vid == 0 || self.next_vid > VID_MAX + 1 {
            return Err(format!("next vid {} out of range", self.next_vid));
        }
        let mut seen = BTreeSet::new();
        for (name, &vid) in &self.vdis {
            if vid == 0 || vid >= self.next_vid || !seen.insert(vid) {
                return Err(format!("vdi {name:?} has bad or repeated vid {vid}"));
            }
        }
        Ok(())
    }
}

fn check_vdi_name(name: &str) -> Result<(), ClusterError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > VDI_NAME_BYTES_MAX {
        "longer than 255 bytes"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(ClusterError::InvalidVdiName {
        name: name.to_owned(),
        reason,
    })
}

/// The lock of one vid. The slot outlives the lock so the generation never repeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSlot {
    /// The node holding the lock, `None` when free.
    pub holder: Option<Uuid>,
    /// The generation of the current or, when free, the last holder.
    pub generation: u64,
}

/// Every VDI lock ever taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockTable {
    /// One slot per vid ever locked.
    pub slots: BTreeMap<Vid, LockSlot>,
}

impl LockTable {
    /// Takes the lock of `vid` for `holder` following [`crate::ClusterDriver::lock_acquire`].
    pub fn acquire(
        &mut self,
        vid: Vid,
        holder: Uuid,
        membership: &Membership,
    ) -> Result<VdiLock, ClusterError> {
        membership.check_running()?;
        if !membership.contains(holder) {
            return Err(ClusterError::NotMember(holder));
        }
        if !self.slots.contains_key(&vid) && self.slots.len() >= LOCK_SLOTS_MAX {
            return Err(limit("vdi lock slots", LOCK_SLOTS_MAX));
        }
        let slot = self.slots.entry(vid).or_insert(LockSlot {
            holder: None,
            generation: 0,
        });
        match slot.holder {
            Some(current) if current == holder => {}
            Some(current) if membership.contains(current) => {
                return Err(ClusterError::Locked {
                    vid,
                    holder: current,
                })
            }
            // Free, or its holder is no longer a member: take it with a new token.
            _ => {
                slot.holder = Some(holder);
                slot.generation += 1;
            }
        }
        Ok(VdiLock {
            vid,
            holder,
            generation: slot.generation,
        })
    }

    /// Frees the lock if `holder` holds it at `generation`.
    pub fn release(&mut self, vid: Vid, holder: Uuid, generation: u64) -> Result<(), ClusterError> {
        match self.slots.get_mut(&vid) {
            Some(slot) if slot.holder == Some(holder) && slot.generation == generation => {
                slot.holder = None;
                Ok(())
            }
            _ => Err(ClusterError::LockLost { vid }),
        }
    }

    /// Frees the lock whoever holds it; the generation is kept so the next one is new.
    pub fn break_lock(&mut self, vid: Vid) {
        if let Some(slot) = self.slots.get_mut(&vid) {
            slot.holder = None;
        }
    }

    /// The lock of `vid`, if held.
    pub fn get(&self, vid: Vid) -> Option<VdiLock> {
        let slot = self.slots.get(&vid)?;
        slot.holder.map(|holder| VdiLock {
            vid,
            holder,
            generation: slot.generation,
        })
    }

    /// Every held lock, sorted by vid.
    pub fn list(&self) -> Vec<VdiLock> {
        self.slots.keys().filter_map(|&vid| self.get(vid)).collect()
    }

    /// Invariants: a held lock has a generation of at least 1.
    pub fn check(&self) -> Result<(), String> {
        for (vid, slot) in &self.slots {
            if slot.holder.is_some() && slot.generation == 0 {
                return Err(format!("lock of vid {vid} held at generation 0"));
            }
        }
        Ok(())
    }
}

/// Replicas that missed a write the others applied: (object, node) pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleTable {
    /// The stale replicas, ordered by object then node.
    pub entries: BTreeSet<(Oid, Uuid)>,
}

impl StaleTable {
    /// Marks `node`'s replica of `oid` stale. Idempotent.
    pub fn mark(&mut self, oid: Oid, node: Uuid) -> Result<(), ClusterError> {
        if self.entries.len() >= STALE_ENTRIES_MAX && !self.entries.contains(&(oid, node)) {
            return Err(limit("stale replicas", STALE_ENTRIES_MAX));
        }
        self.entries.insert((oid, node));
        Ok(())
    }

    /// The stale objects of `node`, sorted.
    pub fn for_node(&self, node: Uuid) -> Vec<Oid> {
        let of_node = |&(oid, n): &(Oid, Uuid)| (n == node).then_some(oid);
        self.entries.iter().filter_map(of_node).collect()
    }

    /// Forgets that `node`'s replica of `oid` is stale. Idempotent.
    pub fn clear(&mut self, oid: Oid, node: Uuid) {
        self.entries.remove(&(oid, node));
    }

    /// Invariants: every oid is a valid object id, and the table is within its bound.
    pub fn check(&self) -> Result<(), String> {
        if self.entries.len() > STALE_ENTRIES_MAX {
            return Err(format!("{} stale entries", self.entries.len()));
        }
        for (oid, _) in &self.entries {
            Oid::from_raw(oid.raw()).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeInfo;

    fn node(n: u128) -> NodeInfo {
        NodeInfo {
            uuid: Uuid::from_u128(n),
            addr: format!("127.0.0.1:{}", 7000 + n),
            zone: n as u32,
            vnodes: 128,
            nbd_addr: None,
        }
    }

    #[test]
    fn vids_are_never_reused_and_zero_is_never_given() {
        let mut registry = VdiRegistry::default();
        let first = registry.create("a").unwrap();
        assert_eq!(first, 1);
        registry.delete("a", first).unwrap();
        assert!(registry.create("a").unwrap() > first);
        registry.check().unwrap();
    }

    #[test]
    fn vids_run_out_at_24_bits() {
        let mut registry = VdiRegistry {
            next_vid: VID_MAX,
            vdis: BTreeMap::new(),
        };
        assert_eq!(registry.create("last").unwrap(), VID_MAX);
        assert!(matches!(
            registry.create("more"),
            Err(ClusterError::VidsExhausted)
        ));
    }

    #[test]
    fn lock_generation_survives_release_and_break() {
        let m = Membership::default().with_member(node(1), &[]).unwrap();
        let holder = Uuid::from_u128(1);
        let mut locks = LockTable::default();
        let first = locks.acquire(7, holder, &m).unwrap();
        locks.release(7, holder, first.generation).unwrap();
        let second = locks.acquire(7, holder, &m).unwrap();
        locks.break_lock(7);
        let third = locks.acquire(7, holder, &m).unwrap();
        assert_eq!(
            (first.generation, second.generation, third.generation),
            (1, 2, 3)
        );
    }

    #[test]
    fn stale_check_rejects_invalid_oid() {
        let table: StaleTable =
            serde_json::from_str(r#"{"entries":[[1,"00000000-0000-0000-0000-000000000001"]]}"#)
                .unwrap();
        assert!(table.check().is_err());
    }
}

//! Recovery planning: a pure function from "who holds what" to "what this node must do"
//! (DESIGN.md §7). No I/O; the executor in `mod.rs` carries the plan out.

use placement::Ring;
use proto::{Oid, Vid};
use std::collections::{BTreeMap, HashMap, HashSet};
use store::Stamp;
use uuid::Uuid;

/// One copy of an object somewhere in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    pub node: Uuid,
    pub stamp: Stamp,
}

/// An object this node must fetch: it should hold it and has none, or an older copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetch {
    pub oid: Oid,
    /// Nodes holding the newest copy, in the order to try them.
    pub sources: Vec<Uuid>,
    pub stamp: Stamp,
    /// This node holds an older copy, which must be quarantined before replacing it.
    pub replaces_stale: bool,
}

/// What one node has to do at an epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub fetch: Vec<Fetch>,
    /// Local copies that are the newest anywhere: safe to serve.
    pub current: Vec<Oid>,
    /// Local copies this node does not own at this epoch: removed once the owners hold
    /// them (checked by the executor, never assumed here).
    pub handoff: Vec<Oid>,
    /// Local copies of deleted VDIs (tombstoned): removed.
    pub deleted: Vec<Oid>,
}

/// Inputs of [`plan`].
pub struct PlanInput<'a> {
    pub me: Uuid,
    pub ring: &'a Ring,
    /// Replica count of every live VDI; an object of a vid not here is of a deleted VDI.
    pub copies: &'a HashMap<Vid, usize>,
    /// What every reachable member holds, this node included.
    pub holdings: &'a HashMap<Uuid, Vec<(Oid, Stamp)>>,
}

/// Works out this node's recovery at the current epoch.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    // Every copy of every object, by oid (ordered, so the plan is deterministic).
    let mut copies_of: BTreeMap<Oid, Vec<Copy>> = BTreeMap::new();
    for (node, list) in input.holdings {
        for &(oid, stamp) in list {
            copies_of
                .entry(oid)
                .or_default()
                .push(Copy { node: *node, stamp });
        }
    }
    let mine: HashMap<Oid, Stamp> = input
        .holdings
        .get(&input.me)
        .map(|l| l.iter().copied().collect())
        .unwrap_or_default();
    let mut out = Plan::default();
    for (oid, copies) in &copies_of {
        let Some(&want) = input.copies.get(&oid.vid()) else {
            if mine.contains_key(oid) {
                out.deleted.push(*oid);
            }
            continue;
        };
        let owners = input.ring.replicas(oid.raw(), want);
        let newest = copies.iter().map(|c| c.stamp).max().unwrap_or_default();
        let owned = owners.contains(&input.me);
        match mine.get(oid) {
            // Stamps decide, even for copies this node trusts: a gateway that died in the
            // middle of a write leaves replicas that differ by that write, and only the
            // stamps show it. (A copy merely one in-flight write behind is fetched too; the
            // fetch re-checks the stamp under the object's lock and is then harmless.)
            Some(&s) if s >= newest => {
                out.current.push(*oid);
                if !owned {
                    out.handoff.push(*oid);
                }
            }
            local => {
                if owned {
                    let mut sources: Vec<Uuid> = copies
                        .iter()
                        .filter(|c| c.stamp == newest && c.node != input.me)
                        .map(|c| c.node)
                        .collect();
                    // Prefer sources that are owners (they stay), then by uuid for determinism.
                    let owner_set: HashSet<Uuid> = owners.iter().copied().collect();
                    sources.sort_by_key(|u| (!owner_set.contains(u), *u));
                    out.fetch.push(Fetch {
                        oid: *oid,
                        sources,
                        stamp: newest,
                        replaces_stale: local.is_some(),
                    });
                } else if local.is_some() {
                    // An old copy we do not own: drop it once the owners hold the newest.
                    out.handoff.push(*oid);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::PlacementNode;

    fn node(i: u8) -> Uuid {
        Uuid::from_bytes([i; 16])
    }

    fn ring(n: u8) -> Ring {
        let nodes: Vec<PlacementNode> = (1..=n)
            .map(|i| PlacementNode::new(node(i), i as u32))
            .collect();
        Ring::new(&nodes)
    }

    fn st(g: u64) -> Stamp {
        Stamp::new(1, g)
    }

    #[test]
    fn missing_owned_object_is_fetched_from_the_newest_copy() {
        let r = ring(4);
        let oid = Oid::data(1, 0);
        let owners = r.replicas(oid.raw(), 3);
        let newcomer = (1..=4).map(node).find(|u| owners.contains(u)).unwrap();
        let others: Vec<Uuid> = owners.iter().copied().filter(|u| *u != newcomer).collect();
        let mut holdings = HashMap::new();
        holdings.insert(newcomer, vec![]);
        holdings.insert(others[0], vec![(oid, st(5))]);
        holdings.insert(others[1], vec![(oid, st(7))]);
        let copies = HashMap::from([(1, 3)]);
        let p = plan(&PlanInput {
            me: newcomer,
            ring: &r,
            copies: &copies,
            holdings: &holdings,
        });
        assert_eq!(p.fetch.len(), 1);
        assert_eq!(
            p.fetch[0].sources,
            vec![others[1]],
            "only the newest copy is a source"
        );
        assert_eq!(p.fetch[0].stamp, st(7));
        assert!(!p.fetch[0].replaces_stale);
    }

    #[test]
    fn stale_local_copy_is_replaced_never_served() {
        let r = ring(3);
        let oid = Oid::data(1, 3);
        let mut holdings = HashMap::new();
        holdings.insert(node(1), vec![(oid, st(1))]);
        holdings.insert(node(2), vec![(oid, st(9))]);
        holdings.insert(node(3), vec![(oid, st(9))]);
        let copies = HashMap::from([(1, 3)]);
        let p = plan(&PlanInput {
            me: node(1),
            ring: &r,
            copies: &copies,
            holdings: &holdings,
        });
        assert!(p.current.is_empty());
        assert_eq!(p.fetch.len(), 1);
        assert!(p.fetch[0].replaces_stale);
        let p2 = plan(&PlanInput {
            me: node(2),
            ring: &r,
            copies: &copies,
            holdings: &holdings,
        });
        assert_eq!(p2.current, vec![oid]);
        assert!(p2.fetch.is_empty());
    }

    #[test]
    fn unowned_copies_are_handed_off_and_deleted_vdis_dropped() {
        let r = ring(4);
        let copies = HashMap::from([(1, 1)]);
        // Find an object node 1 does not own with one copy.
        let oid = (0..100)
            .map(|i| Oid::data(1, i))
            .find(|o| r.replicas(o.raw(), 1)[0] != node(1))
            .unwrap();
        let gone = Oid::data(2, 0);
        let mut holdings = HashMap::new();
        holdings.insert(node(1), vec![(oid, st(3)), (gone, st(3))]);
        let p = plan(&PlanInput {
            me: node(1),
            ring: &r,
            copies: &copies,
            holdings: &holdings,
        });
        assert_eq!(p.handoff, vec![oid]);
        assert_eq!(p.deleted, vec![gone]);
        assert!(p.fetch.is_empty());
    }

    #[test]
    fn plan_is_deterministic_and_sources_prefer_owners() {
        let r = ring(5);
        let oid = Oid::data(4, 4);
        let owners = r.replicas(oid.raw(), 2);
        let me = owners[0];
        let holdings: HashMap<Uuid, Vec<(Oid, Stamp)>> = (1..=5)
            .map(node)
            .filter(|u| *u != me)
            .map(|u| (u, vec![(oid, st(2))]))
            .collect();
        let copies = HashMap::from([(4, 2)]);
        let a = plan(&PlanInput {
            me,
            ring: &r,
            copies: &copies,
            holdings: &holdings,
        });
        let b = plan(&PlanInput {
            me,
            ring: &r,
            copies: &copies,
            holdings: &holdings,
        });
        assert_eq!(a, b);
        assert_eq!(
            a.fetch[0].sources[0], owners[1],
            "the other owner is tried first"
        );
    }
}

//! The consistent-hash ring built from one epoch's member list.
//!
//! Layout: data nodes sorted by UUID, and every virtual-node point in one vec sorted
//! by `(hash, node)`. Ties between points of different nodes (a 64-bit collision) are
//! broken by UUID order, so the ring depends only on the member *set*.
//!
//! Cost bounds, with `P` points on the ring (sum of vnodes) and `c` copies:
//! - [`Ring::new`]: O(P log P) time, 16·P bytes.
//! - [`Ring::replicas`]: O(log P) to find the start, then a clockwise walk with an
//!   O(c) membership check per point. With N equal nodes in N zones the walk visits
//!   `Σ_{k<c} N/(N−k)` points on average (coupon collector: 4.3 for c = 3, N = 4;
//!   3.5 for N = 8). The worst case, when some zone holds a tiny share of the points,
//!   is one full turn per pass, two passes at most: O(P·c).

use std::collections::BTreeMap;
use std::fmt;

use crate::hash::{oid_point, vnode_point};
use crate::{PlacementNode, Uuid, VNODES_MAX};

/// One virtual node: a position on the ring and the index of its data node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Point {
    hash: u64,
    node: u32,
}

/// The placement ring for one epoch. Build it once per membership change with
/// [`Ring::new`] and share it; lookups take `&self`.
#[derive(Clone, PartialEq, Eq)]
pub struct Ring {
    /// Data nodes (vnodes > 0), sorted by UUID, one entry per UUID.
    nodes: Vec<PlacementNode>,
    /// All virtual nodes, sorted by `(hash, node)`.
    points: Vec<Point>,
    /// Number of distinct zones among `nodes`.
    zone_count: usize,
}

impl Ring {
    /// Builds the ring from a member list.
    ///
    /// Deterministic: the same set of nodes in any order gives the same ring.
    /// Gateway-only nodes (`vnodes == 0`) are left out. `vnodes` above [`VNODES_MAX`]
    /// is clamped. A UUID listed more than once is a caller bug; the entry that sorts
    /// first by `(zone, vnodes)` is kept so the result still does not depend on order.
    pub fn new(nodes: &[PlacementNode]) -> Ring {
        let mut data: Vec<PlacementNode> = nodes
            .iter()
            .filter(|node| node.holds_data())
            .map(|node| PlacementNode {
                vnodes: node.vnodes.min(VNODES_MAX),
                ..node.clone()
            })
            .collect();
        data.sort_by_key(|node| (node.uuid, node.zone, node.vnodes));
        data.dedup_by_key(|node| node.uuid);
        assert!(u32::try_from(data.len()).is_ok(), "too many nodes");

        let total: usize = data.iter().map(|node| node.vnodes as usize).sum();
        let mut points = Vec::with_capacity(total);
        for (index, node) in data.iter().enumerate() {
            for vnode in 0..node.vnodes {
                points.push(Point {
                    hash: vnode_point(&node.uuid, vnode),
                    node: index as u32,
                });
            }
        }
        points.sort_unstable();

        let mut zones: Vec<u32> = data.iter().map(|node| node.zone).collect();
        zones.sort_unstable();
        zones.dedup();

        Ring {
            zone_count: zones.len(),
            nodes: data,
            points,
        }
    }

    /// The ordered list of nodes that hold object `oid` with `copies` replicas.
    ///
    /// Walks clockwise from the object's hash. Pass one takes a node only if its zone
    /// is not taken yet, until it has `min(copies, zones)` nodes: replicas are in
    /// distinct zones whenever there are at least `copies` zones. If there are fewer
    /// zones than copies, pass two walks again from the same start and fills up with
    /// nodes not yet chosen, in clockwise order. The first entry is the primary.
    ///
    /// Never returns a node twice and never a gateway-only node. Returns exactly
    /// `min(copies, data_nodes())` nodes; an empty ring gives an empty list.
    pub fn replicas(&self, oid: u64, copies: usize) -> Vec<Uuid> {
        let object_hash = oid_point(oid);
        let start = self
            .points
            .partition_point(|point| point.hash < object_hash);
        self.walk_from(start, copies)
            .into_iter()
            .map(|index| self.nodes[index as usize].uuid)
            .collect()
    }

    /// The primary (first replica) of `oid`, or `None` on an empty ring.
    pub fn primary(&self, oid: u64) -> Option<Uuid> {
        self.replicas(oid, 1).pop()
    }

    /// Number of nodes that hold data (gateway-only nodes and duplicates excluded).
    pub fn data_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Number of distinct zones among the data nodes.
    pub fn zones(&self) -> usize {
        self.zone_count
    }

    /// Number of virtual-node points on the ring.
    pub fn points(&self) -> usize {
        self.points.len()
    }

    /// The data nodes, sorted by UUID.
    pub fn nodes(&self) -> &[PlacementNode] {
        &self.nodes
    }

    /// Each data node's exact share of objects with `copies` replicas: the fraction of
    /// uniformly hashed oids for which it is among [`Ring::replicas`]. Computed from
    /// the arcs between points, not by sampling; shares sum to
    /// `min(copies, data_nodes())`. `shares(1)` is the primary share. O(P·walk).
    pub fn shares(&self, copies: usize) -> BTreeMap<Uuid, f64> {
        const FULL_TURN: u128 = 1 << 64;
        let Some(last) = self.points.last() else {
            return BTreeMap::new();
        };
        // Objects on the arc (previous point, point i] all start their walk at i. Arcs
        // add up exactly in u128, so a node on every walk gets exactly 1.0.
        let mut covered: BTreeMap<Uuid, u128> = BTreeMap::new();
        let mut previous = last.hash;
        for (start, point) in self.points.iter().enumerate() {
            let arc = match self.points.len() {
                1 => FULL_TURN,
                _ => u128::from(point.hash.wrapping_sub(previous)),
            };
            previous = point.hash;
            for index in self.walk_from(start, copies) {
                *covered.entry(self.nodes[index as usize].uuid).or_default() += arc;
            }
        }
        covered
            .into_iter()
            .map(|(uuid, arcs)| (uuid, arcs as f64 / FULL_TURN as f64))
            .collect()
    }

    /// The replica walk (see [`Ring::replicas`]) from point index `start`, as node
    /// indices. `start == points.len()` wraps to the first point.
    fn walk_from(&self, start: usize, copies: usize) -> Vec<u32> {
        let want = copies.min(self.nodes.len());
        let mut chosen: Vec<u32> = Vec::with_capacity(want);
        if want == 0 {
            return chosen;
        }
        let distinct_zone_slots = want.min(self.zone_count);
        let mut used_zones: Vec<u32> = Vec::with_capacity(distinct_zone_slots);
        for point in self.clockwise_from(start) {
            if chosen.len() == distinct_zone_slots {
                break;
            }
            let zone = self.nodes[point.node as usize].zone;
            if !used_zones.contains(&zone) {
                used_zones.push(zone);
                chosen.push(point.node);
            }
        }
        for point in self.clockwise_from(start) {
            if chosen.len() == want {
                break;
            }
            if !chosen.contains(&point.node) {
                chosen.push(point.node);
            }
        }
        assert_eq!(chosen.len(), want, "a full turn visits every data node");
        chosen
    }

    /// Points clockwise from index `start` (wrapping), one full turn.
    fn clockwise_from(&self, start: usize) -> impl Iterator<Item = &Point> {
        self.points[start..].iter().chain(&self.points[..start])
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Ring")
            .field("data_nodes", &self.nodes.len())
            .field("zones", &self.zone_count)
            .field("points", &self.points.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_VNODES;

    fn node(id: u128, zone: u32, vnodes: u32) -> PlacementNode {
        PlacementNode {
            uuid: Uuid::from_u128(id),
            zone,
            vnodes,
        }
    }

    // No data nodes (or no copies asked for) means no replicas, not a panic.
    #[test]
    fn empty_ring_and_zero_copies_return_nothing() {
        assert!(Ring::new(&[]).replicas(42, 3).is_empty());
        assert!(Ring::new(&[node(1, 0, 0), node(2, 1, 0)])
            .replicas(42, 3)
            .is_empty());
        assert!(Ring::new(&[node(1, 0, 8)]).replicas(42, 0).is_empty());
        assert!(Ring::new(&[]).shares(3).is_empty());
        assert_eq!(Ring::new(&[]).primary(42), None);
    }

    // Gateway-only nodes are not counted and never chosen.
    #[test]
    fn gateway_only_nodes_are_left_out() {
        let ring = Ring::new(&[node(1, 0, 0), node(2, 1, 4), node(3, 2, 0)]);
        assert_eq!(ring.data_nodes(), 1);
        assert_eq!(ring.zones(), 1);
        assert_eq!(ring.points(), 4);
        for oid in 0..100 {
            assert_eq!(ring.replicas(oid, 3), vec![Uuid::from_u128(2)]);
        }
    }

    // A UUID listed twice counts once, whichever entry comes first in the input.
    #[test]
    fn duplicate_uuid_is_kept_once_regardless_of_order() {
        let a = Ring::new(&[node(1, 5, 16), node(1, 2, 16), node(2, 3, 16)]);
        let b = Ring::new(&[node(2, 3, 16), node(1, 2, 16), node(1, 5, 16)]);
        assert_eq!(a, b);
        assert_eq!(a.data_nodes(), 2);
        assert_eq!(a.nodes()[0].zone, 2);
    }

    // Absurd weights are clamped so the ring stays bounded in memory.
    #[test]
    fn vnodes_are_clamped_to_the_limit() {
        let ring = Ring::new(&[node(1, 0, u32::MAX)]);
        assert_eq!(ring.points(), VNODES_MAX as usize);
    }

    // Two zones, four nodes, three copies: the first two replicas cover both zones,
    // the third is the next distinct node clockwise.
    #[test]
    fn fewer_zones_than_copies_fills_with_distinct_nodes() {
        let nodes = [
            node(1, 0, 32),
            node(2, 0, 32),
            node(3, 1, 32),
            node(4, 1, 32),
        ];
        let ring = Ring::new(&nodes);
        let zone_of = |uuid: &Uuid| nodes.iter().find(|n| n.uuid == *uuid).unwrap().zone;
        for oid in 0..1000 {
            let replicas = ring.replicas(oid, 3);
            assert_eq!(replicas.len(), 3);
            assert_ne!(zone_of(&replicas[0]), zone_of(&replicas[1]));
            assert!(replicas[2] != replicas[0] && replicas[2] != replicas[1]);
        }
        assert_eq!(ring.replicas(7, 10).len(), 4, "capped at the data nodes");
    }

    // A one-point ring owns the whole turn; shares sum to min(copies, nodes).
    #[test]
    fn shares_cover_the_whole_ring() {
        let single = Ring::new(&[node(9, 0, 1)]);
        assert_eq!(single.shares(1)[&Uuid::from_u128(9)], 1.0);
        let nodes: Vec<_> = (1..=5).map(|i| node(i, i as u32, DEFAULT_VNODES)).collect();
        let ring = Ring::new(&nodes);
        for copies in 1..=6 {
            let total: f64 = ring.shares(copies).values().sum();
            assert!(
                (total - copies.min(5) as f64).abs() < 1e-9,
                "{copies}: {total}"
            );
        }
    }

    // An object whose hash is past the last point wraps to the first point.
    #[test]
    fn lookup_wraps_around_the_end_of_the_ring() {
        let ring = Ring::new(&[node(1, 0, 3), node(2, 1, 3)]);
        let first = ring.nodes[ring.points[0].node as usize].uuid;
        let past_end = ring.walk_from(ring.points.len(), 1);
        assert_eq!(ring.nodes[past_end[0] as usize].uuid, first);
    }
}

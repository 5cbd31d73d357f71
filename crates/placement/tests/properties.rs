//! Property tests for placement: determinism, distinctness, zones, balance and
//! minimal movement, through the public API only.
//!
//! Balance bounds. With random UUIDs a node's virtual nodes sit at random points, so
//! its primary share of the ring is exactly Beta(V, (N-1)·V) for V vnodes per node:
//! relative standard deviation ≈ 1/√V = 8.8% at V = 128. The *worst* node of a
//! cluster deviates more. Measured over 100,000 random rings for each N in 3..=8
//! (`cargo run --release -p placement --example balance_report -- 100000`):
//!
//! | worst node's deviation from the mean  | p99    | p99.9  | max    |
//! |---------------------------------------|--------|--------|--------|
//! | primary share (1 copy)                | 21–27% | 26–33% | 48%    |
//! | replica-set membership, 2 copies      | 15–19% | 18–23% | 30%    |
//! | replica-set membership, 3 copies      | 13–16% | 16–19% | 25%    |
//!
//! So ±25% does *not* hold for every ring at 128 vnodes: about 2% of 8-node rings
//! have a node outside ±25% on primaries. The asserted bounds are the ones a random
//! ring essentially never breaks, so the test is not flaky: primary within ±50% (exact
//! Beta tail: P(some node outside) ≤ 2.6e-7 per ring at N = 8), membership with 2 or
//! more copies within ±35% (half again the largest value measured in 600k rings).
//! For a tighter bound give nodes more vnodes: the deviation scales with 1/√V.
//!
//! Movement bound. Adding node X changes an object's replica set if and only if X is
//! in the new set (tested per object below), so the moved fraction *is* X's
//! membership share: `min(c, N+1)/(N+1)` on average, times the balance bound above
//! (×1.5 for 1 copy, ×1.35 for 2+ copies). Measured ratio to the mean for 3 copies:
//! 0.77–1.28 over 600k rings. Removing a node is the same pair of rings read backwards.

use std::collections::{BTreeMap, BTreeSet};

use placement::hash::mix64;
use placement::{PlacementNode, Ring, Uuid, DEFAULT_VNODES};
use proptest::prelude::*;

/// Largest allowed relative deviation of a node's share from the mean.
fn balance_bound(copies: usize) -> f64 {
    if copies == 1 {
        0.50
    } else {
        0.35
    }
}

/// `count` well-spread pseudo-random oids derived from `seed` (splitmix64 stream).
fn random_oids(seed: u64, count: u64) -> impl Iterator<Item = u64> {
    (0..count).map(move |k| mix64(seed.wrapping_add(k.wrapping_mul(0x9e37_79b9_7f4a_7c15))))
}

/// Whether a sampled frequency agrees with an exact probability within 5 sigma.
fn agrees_with_exact(count: u64, samples: u64, exact: f64) -> bool {
    let exact = exact.clamp(0.0, 1.0);
    let sigma = (exact * (1.0 - exact) / samples as f64).sqrt();
    (count as f64 / samples as f64 - exact).abs() <= 5.0 * sigma + 1e-9
}

/// Data nodes with distinct UUIDs, one zone each, default vnodes.
fn one_zone_per_node(ids: &BTreeSet<u128>) -> Vec<PlacementNode> {
    ids.iter()
        .enumerate()
        .map(|(zone, &id)| PlacementNode::new(Uuid::from_u128(id), zone as u32))
        .collect()
}

/// Any member list: distinct UUIDs, zones 0..4, vnodes 0..48 (0 = gateway-only).
fn any_members(
    count: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = Vec<PlacementNode>> {
    prop::collection::btree_map(any::<u128>(), (0u32..4, 0u32..48), count).prop_map(|map| {
        map.into_iter()
            .map(|(id, (zone, vnodes))| PlacementNode {
                uuid: Uuid::from_u128(id),
                zone,
                vnodes,
            })
            .collect()
    })
}

fn zones_of(nodes: &[PlacementNode]) -> BTreeMap<Uuid, u32> {
    nodes.iter().map(|node| (node.uuid, node.zone)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    // The same member set in any order gives the same ring and the same placement.
    #[test]
    fn placement_is_independent_of_member_order(
        (members, shuffled) in any_members(0..=10)
            .prop_flat_map(|m| (Just(m.clone()), Just(m).prop_shuffle())),
        seed in any::<u64>(),
    ) {
        let ring = Ring::new(&members);
        let other = Ring::new(&shuffled);
        prop_assert_eq!(&ring, &other);
        for oid in random_oids(seed, 200) {
            for copies in 1..=4 {
                prop_assert_eq!(ring.replicas(oid, copies), other.replicas(oid, copies));
            }
        }
    }

    // Replicas are distinct data nodes, exactly min(copies, data nodes) of them;
    // gateway-only nodes are never chosen.
    #[test]
    fn replicas_are_distinct_data_nodes(
        members in any_members(0..=10),
        seed in any::<u64>(),
        copies in 0usize..=6,
    ) {
        let ring = Ring::new(&members);
        let data: BTreeSet<Uuid> =
            members.iter().filter(|n| n.vnodes > 0).map(|n| n.uuid).collect();
        prop_assert_eq!(ring.data_nodes(), data.len());
        for oid in random_oids(seed, 200) {
            let replicas = ring.replicas(oid, copies);
            prop_assert_eq!(replicas.len(), copies.min(data.len()));
            let distinct: BTreeSet<Uuid> = replicas.iter().copied().collect();
            prop_assert_eq!(distinct.len(), replicas.len(), "a node twice");
            prop_assert!(distinct.is_subset(&data), "a gateway or stranger chosen");
            if copies > 0 {
                prop_assert_eq!(ring.primary(oid), replicas.first().copied());
            }
        }
    }

    // With at least `copies` zones every replica is in a different zone; with fewer,
    // the leading replicas cover every zone once before any zone repeats.
    #[test]
    fn replicas_spread_over_zones(
        members in any_members(1..=10),
        seed in any::<u64>(),
        copies in 1usize..=5,
    ) {
        let ring = Ring::new(&members);
        let zone = zones_of(&members);
        for oid in random_oids(seed, 200) {
            let replicas = ring.replicas(oid, copies);
            let distinct_prefix = copies.min(ring.zones()).min(replicas.len());
            let zones: BTreeSet<u32> =
                replicas[..distinct_prefix].iter().map(|u| zone[u]).collect();
            prop_assert_eq!(zones.len(), distinct_prefix);
            if copies <= ring.zones() {
                prop_assert_eq!(distinct_prefix, replicas.len());
            }
        }
    }

    // Adding node X (or, read backwards, removing it) only moves objects to (from) X:
    // a changed primary is X, no other node gains (loses) an object, at most one node
    // per object is displaced, and a replica set changes exactly when X is in it.
    #[test]
    fn adding_a_node_only_moves_objects_to_it(
        members in any_members(1..=9),
        zone in 0u32..5,
        vnodes in 1u32..48,
        added_id in any::<u128>(),
        seed in any::<u64>(),
        copies in 1usize..=4,
    ) {
        prop_assume!(members.iter().all(|n| n.uuid.as_u128() != added_id));
        let added = PlacementNode { uuid: Uuid::from_u128(added_id), zone, vnodes };
        let before = Ring::new(&members);
        let after = Ring::new(&[members.clone(), vec![added.clone()]].concat());
        for oid in random_oids(seed, 500) {
            let old = before.replicas(oid, copies);
            let new = after.replicas(oid, copies);
            if old.first() != new.first() {
                prop_assert_eq!(new.first(), Some(&added.uuid), "primary moved elsewhere");
            }
            let old_set: BTreeSet<Uuid> = old.iter().copied().collect();
            let new_set: BTreeSet<Uuid> = new.iter().copied().collect();
            let gained: Vec<_> = new_set.difference(&old_set).collect();
            let lost: Vec<_> = old_set.difference(&new_set).collect();
            prop_assert!(gained.iter().all(|u| **u == added.uuid), "gained: {gained:?}");
            prop_assert!(lost.len() <= 1, "lost: {lost:?}");
            prop_assert_eq!(old_set != new_set, new_set.contains(&added.uuid));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    // With 3..=8 nodes of 128 vnodes, each node's share of primaries and of replica
    // sets over 100k random oids is within the bounds justified in the module docs,
    // and the sampled shares agree with the exact arc-based shares.
    #[test]
    fn load_is_balanced_across_nodes(
        ids in prop::collection::btree_set(any::<u128>(), 3..=8),
        seed in any::<u64>(),
    ) {
        const SAMPLES: u64 = 100_000;
        const COPIES: usize = 3;
        let nodes = one_zone_per_node(&ids);
        let ring = Ring::new(&nodes);
        let n = nodes.len() as f64;
        let mut primary: BTreeMap<Uuid, u64> = BTreeMap::new();
        let mut member: BTreeMap<Uuid, u64> = BTreeMap::new();
        for oid in random_oids(seed, SAMPLES) {
            let replicas = ring.replicas(oid, COPIES);
            *primary.entry(replicas[0]).or_default() += 1;
            for uuid in replicas {
                *member.entry(uuid).or_default() += 1;
            }
        }
        for (copies, counts) in [(1, &primary), (COPIES, &member)] {
            let exact = ring.shares(copies);
            let mean = copies as f64 / n;
            for node in &nodes {
                let count = counts.get(&node.uuid).copied().unwrap_or(0);
                let share = count as f64 / SAMPLES as f64;
                let deviation = share / mean - 1.0;
                prop_assert!(
                    deviation.abs() <= balance_bound(copies),
                    "copies {copies}: share {share:.4} vs mean {mean:.4}"
                );
                prop_assert!(agrees_with_exact(count, SAMPLES, exact[&node.uuid]));
            }
        }
        let mean = 2.0 / n;
        for share in ring.shares(2).values() {
            prop_assert!((share / mean - 1.0).abs() <= balance_bound(2));
        }
    }

    // Adding one node to 2..=8 moves about min(c, N+1)/(N+1) of the replica sets:
    // exactly the new node's membership share, which is within the balance bound.
    #[test]
    fn adding_a_node_moves_about_one_nth(
        ids in prop::collection::btree_set(any::<u128>(), 3..=9),
        seed in any::<u64>(),
        copies in 1usize..=3,
    ) {
        const SAMPLES: u64 = 20_000;
        let nodes = one_zone_per_node(&ids);
        let (added, members) = nodes.split_last().unwrap();
        let before = Ring::new(members);
        let after = Ring::new(&nodes);
        let moved = random_oids(seed, SAMPLES)
            .filter(|&oid| {
                let mut old = before.replicas(oid, copies);
                let mut new = after.replicas(oid, copies);
                old.sort();
                new.sort();
                old != new
            })
            .count() as u64;
        let exact = after.shares(copies)[&added.uuid];
        let expected = copies.min(nodes.len()) as f64 / nodes.len() as f64;
        prop_assert!(exact <= expected * (1.0 + balance_bound(copies)), "{exact} vs {expected}");
        prop_assert!(agrees_with_exact(moved, SAMPLES, exact), "moved {moved}, exact {exact}");
    }
}

// Data oids of one VDI (vid << 32 | index, consecutive indices) spread like random
// oids: the hash leaves no trace of their structure.
#[test]
fn consecutive_data_oids_spread_like_random_ones() {
    const SAMPLES: u64 = 100_000;
    let ids: BTreeSet<u128> = (1..=5u128).map(|i| i * 0x1234_5678_9abc_def1).collect();
    let ring = Ring::new(&one_zone_per_node(&ids));
    let exact = ring.shares(1);
    let vid: u64 = 0x00ab_cdef;
    let mut counts: BTreeMap<Uuid, u64> = BTreeMap::new();
    for index in 0..SAMPLES {
        *counts
            .entry(ring.primary(vid << 32 | index).unwrap())
            .or_default() += 1;
    }
    for (uuid, count) in counts {
        assert!(
            agrees_with_exact(count, SAMPLES, exact[&uuid]),
            "{uuid}: {count}"
        );
    }
}

// Weights work: a node with twice the vnodes gets about twice the primaries.
#[test]
fn vnodes_act_as_weights() {
    let mut nodes = one_zone_per_node(&(1..=4u128).map(|i| i << 100 | i).collect());
    nodes[0].vnodes = 2 * DEFAULT_VNODES;
    let shares = Ring::new(&nodes).shares(1);
    let heavy = shares[&nodes[0].uuid];
    let light_mean = (1.0 - heavy) / 3.0;
    assert!(
        (heavy / light_mean - 2.0).abs() < 0.5,
        "{heavy} vs {light_mean}"
    );
}

//! Measures how balanced 128-vnode rings are, to back the bounds stated in
//! `tests/properties.rs`. For each cluster size N in 3..=8 it builds `rings` random
//! rings (one zone per node) and prints percentiles of the worst node's relative
//! deviation from the mean share (exact, from arcs) for 1, 2 and 3 copies, and of the
//! share of 3-copy replica sets an added (N+1)-th node takes, relative to 3/(N+1):
//! the fraction of objects that move.
//!
//! `cargo run --release -p placement --example balance_report -- 100000`

use placement::hash::mix64;
use placement::{PlacementNode, Ring, Uuid};

fn worst_deviation(ring: &Ring, copies: usize) -> f64 {
    let mean = copies.min(ring.data_nodes()) as f64 / ring.data_nodes() as f64;
    ring.shares(copies)
        .values()
        .map(|share| (share / mean - 1.0).abs())
        .fold(0.0, f64::max)
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * fraction) as usize]
}

fn main() {
    let rings: u64 = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(1000);
    for n in 3..=8u64 {
        let mut columns: [Vec<f64>; 4] = Default::default();
        for trial in 0..rings {
            let seed = mix64(trial * 1000 + n);
            let nodes: Vec<PlacementNode> = (0..=n)
                .map(|i| {
                    let id = (mix64(seed ^ i) as u128) << 64 | mix64(seed.wrapping_add(i)) as u128;
                    PlacementNode::new(Uuid::from_u128(id), i as u32)
                })
                .collect();
            let ring = Ring::new(&nodes[..n as usize]);
            for copies in 1..=3 {
                columns[copies - 1].push(worst_deviation(&ring, copies));
            }
            let added = Ring::new(&nodes).shares(3)[&nodes[n as usize].uuid];
            columns[3].push(added / (3.0 / (n + 1) as f64));
        }
        print!("N={n}");
        for (name, column) in ["1 copy", "2 copies", "3 copies", "moved/mean"]
            .iter()
            .zip(&mut columns)
        {
            column.sort_by(f64::total_cmp);
            print!(
                " | {name}: p50 {:.3} p99 {:.3} p99.9 {:.3} min {:.3} max {:.3}",
                percentile(column, 0.5),
                percentile(column, 0.99),
                percentile(column, 0.999),
                column[0],
                percentile(column, 1.0),
            );
        }
        println!();
    }
}

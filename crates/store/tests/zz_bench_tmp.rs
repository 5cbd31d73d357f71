mod common;
use common::*;
use std::time::Instant;
#[test]
fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4 << 20, false);
    for i in 0..16 { store.create_and_write(oid(i), 0, &[], stamp(0), false).unwrap(); }
    let data = pattern(4096, 1);
    let n = 100_000u64;
    let t = Instant::now();
    for g in 0..n { let o = (g * 7919) % 16; let off = ((g * 104729) % 1024) * 4096; store.write(oid(o as u32), off, &data, stamp(g + 1), false).unwrap(); }
    println!("4k aligned writes: {:.1} us/op", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    let t = Instant::now();
    for g in 0..n { let o = (g * 7919) % 16; let off = ((g * 104729) % 1024) * 4096 + 1000; store.write(oid(o as u32), off, &data[..4], stamp(n + g + 1), false).unwrap(); }
    println!("4-byte rmw writes: {:.1} us/op", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    let t = Instant::now();
    for g in 0..n { let o = (g * 7919) % 16; let off = ((g * 104729) % 1024) * 4096; store.read(oid(o as u32), off, 4096).unwrap(); }
    println!("4k reads: {:.1} us/op", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    let t = Instant::now();
    for i in 0..16 { store.write(oid(i), 0, &pattern(4 << 20, 3), stamp(1 << 40), false).unwrap(); }
    println!("4M writes: {:.2} ms/op", t.elapsed().as_secs_f64() * 1e3 / 16.0);
    let t = Instant::now();
    for _ in 0..4 { for i in 0..16 { store.read(oid(i), 0, 4 << 20).unwrap(); } }
    println!("4M reads: {:.2} ms/op", t.elapsed().as_secs_f64() * 1e3 / 64.0);
    let t = Instant::now();
    for g in 0..200 { store.write(oid(0), (g % 1024) * 4096, &data, stamp((1 << 41) + g), true).unwrap(); }
    println!("4k durable writes: {:.1} us/op", t.elapsed().as_secs_f64() * 1e6 / 200.0);
}

//! Serves in-memory exports over NBD, for trying clients by hand:
//! `cargo run -p nbd --example memserve -- 127.0.0.1:10809` then
//! `qemu-io -f raw nbd://127.0.0.1:10809/disk` or `nbdinfo --list nbd://127.0.0.1:10809`.
//! Exports: `disk` (64 MiB), `aligned` (16 MiB, 512-byte blocks), `ro` (1 MiB,
//! read-only) and `slow` (1 MiB, reads slower at lower offsets).

use std::sync::Arc;
use std::time::Duration;

use nbd::memdev::{MemDevice, MemProvider};
use nbd::{serve, ServerConfig};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:10809".into());
    let provider = Arc::new(MemProvider::new());
    provider.add("disk", "64 MiB scratch disk", MemDevice::new(64 << 20));
    provider.add(
        "aligned",
        "16 MiB, 512-byte blocks",
        MemDevice::new(16 << 20).with_min_block_size(512),
    );
    provider.add("ro", "read-only", MemDevice::new(1 << 20).read_only());
    let slow = MemDevice::new(1 << 20)
        .with_delay(|offset| Duration::from_millis(64u64.saturating_sub(offset / 4096) * 3));
    provider.add("slow", "slower at low offsets", slow);
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("serving on {}", listener.local_addr()?);
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    serve(listener, provider, ServerConfig::default(), shutdown).await
}

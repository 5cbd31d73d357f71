//! The sheep daemon as a library: the binary in `main.rs` parses options and calls [`run`].

pub mod admin;
pub mod cache;
pub mod check;
pub mod dispatch;
pub mod error;
pub mod export;
pub mod gateway;
pub mod node;
pub mod options;
pub mod ordering;
pub mod ranges;
pub mod recovery;
pub mod replicate;
pub mod server;
pub mod vdi;

use anyhow::Context;
use cluster::ClusterDriver;
use node::Node;
use options::Options;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Runs a node until SIGTERM/SIGINT or a shutdown request, then leaves the cluster cleanly.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating store directory {}", opts.dir.display()))?;
    let ident = store::identity::load_or_create(&opts.dir).context("reading node identity")?;
    let cluster_dir = opts.local_cluster_dir().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&cluster_dir)
        .with_context(|| format!("creating cluster directory {}", cluster_dir.display()))?;
    let driver: Arc<dyn ClusterDriver> =
        Arc::new(cluster::LocalDriver::open(&cluster_dir).context("opening local cluster driver")?);
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;

    let node = Node::new(opts.clone(), ident.node_uuid, driver.clone(), ident.cluster);
    // A store from another cluster is refused before we join anything.
    let current = driver
        .membership()
        .await
        .context("reading cluster membership")?;
    if let (Some(cfg), Some(mine)) = (&current.config, ident.cluster) {
        if cfg.cluster_uuid != mine.cluster_uuid || cfg.format_generation != mine.format_generation
        {
            anyhow::bail!(
                "store {} belongs to cluster {} (format {}), but the cluster at {} is {} (format {})",
                opts.dir.display(),
                mine.cluster_uuid,
                mine.format_generation,
                cluster_dir.display(),
                cfg.cluster_uuid,
                cfg.format_generation
            );
        }
    }
    let m = driver
        .join(node.info())
        .await
        .context("joining the cluster")?;
    node.apply(m).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(uuid = %node.uuid, listen = %opts.listen, epoch = node.view().epoch(), "sheep joined the cluster");
    node.spawn_follower();
    recovery::spawn(node.clone());
    node.recovery.kick();

    let server = tokio::spawn(server::serve(node.clone(), listener));
    // After a crash: push what the cache holds unflushed (needs the peer server up,
    // since this node is usually one of the replicas).
    let resumer = node.clone();
    tokio::spawn(async move { export::resume_caches(&resumer).await });
    if let Some(addr) = &opts.nbd {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("NBD listening on {addr}"))?;
        let provider = Arc::new(export::SheepExports::new(&node));
        let stop = node.nbd_stop_signal();
        tracing::info!(%addr, "serving VDIs over NBD");
        let task = tokio::spawn(nbd::serve(l, provider, nbd::ServerConfig::default(), stop));
        *node.nbd_task.lock().await = Some(task);
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stop = node.shutdown_signal();
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: leaving the cluster"),
        _ = int.recv() => tracing::info!("SIGINT: leaving the cluster"),
        _ = stop.changed() => tracing::info!("shutdown requested: leaving the cluster"),
    }
    node.request_shutdown();
    // Let NBD connections finish: their close flushes and releases VDI locks.
    node.drain_nbd().await;
    if let Some(cache) = node.cache.get() {
        // What could not be pushed stays dirty, made durable locally and sealed, so it is
        // trusted (and pushed) after the reboot that usually follows.
        cache.seal();
    }
    if let Some(store) = node.store() {
        let _ = tokio::task::spawn_blocking(move || store.sync_all()).await;
    }
    if node
        .stopped_with_cluster
        .load(std::sync::atomic::Ordering::Acquire)
    {
        tracing::info!(
            "cluster shut down; exiting without leaving so the restart waits for this node"
        );
        server.abort();
        return Ok(());
    }
    match tokio::time::timeout(Duration::from_secs(10), driver.leave(node.uuid)).await {
        Ok(Ok(m)) => tracing::info!(epoch = m.epoch, "left the cluster"),
        Ok(Err(e)) => tracing::error!(error = %e, "leaving the cluster failed"),
        Err(_) => tracing::error!("leaving the cluster timed out"),
    }
    server.abort();
    Ok(())
}

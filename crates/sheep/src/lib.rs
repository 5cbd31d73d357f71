//! The sheep daemon as a library: the binary in `main.rs` parses options and calls [`run`].

pub mod admin;
pub mod check;
pub mod dispatch;
pub mod error;
pub mod export;
pub mod gateway;
pub mod node;
pub mod options;
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
    let nbd_server = match &opts.nbd {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("NBD listening on {addr}"))?;
            let provider = Arc::new(export::SheepExports::new(&node));
            let stop = nbd_shutdown_signal(&node);
            tracing::info!(%addr, "serving VDIs over NBD");
            Some(tokio::spawn(nbd::serve(
                l,
                provider,
                nbd::ServerConfig::default(),
                stop,
            )))
        }
        None => None,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stop = node.shutdown_signal();
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: leaving the cluster"),
        _ = int.recv() => tracing::info!("SIGINT: leaving the cluster"),
        _ = stop.changed() => tracing::info!("shutdown requested: leaving the cluster"),
    }
    node.request_shutdown();
    if let Some(handle) = nbd_server {
        // Let NBD connections finish: their close flushes and releases VDI locks.
        if tokio::time::timeout(Duration::from_secs(15), handle)
            .await
            .is_err()
        {
            tracing::warn!("NBD connections did not finish in time");
        }
    }
    if let Some(store) = node.store() {
        let _ = tokio::task::spawn_blocking(move || store.sync_all()).await;
    }
    match tokio::time::timeout(Duration::from_secs(10), driver.leave(node.uuid)).await {
        Ok(Ok(m)) => tracing::info!(epoch = m.epoch, "left the cluster"),
        Ok(Err(e)) => tracing::error!(error = %e, "leaving the cluster failed"),
        Err(_) => tracing::error!("leaving the cluster timed out"),
    }
    server.abort();
    Ok(())
}

/// The NBD server's stop signal, following the node's shutdown.
fn nbd_shutdown_signal(node: &Node) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut stop = node.shutdown_signal();
    tokio::spawn(async move {
        let _ = stop.changed().await;
        let _ = tx.send(true);
    });
    rx
}

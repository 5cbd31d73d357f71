//! Node and cluster administration ops: info, format, shutdown, and the test-only power cut.

use crate::dispatch::{blocking, Outcome};
use crate::error::{from_cluster, invalid};
use crate::node::Node;
use crate::vdi::member_info;
use proto::msg::{self, ClusterConfigInfo, ClusterInfoReply, FormatRequest, NodeInfoReply};
use proto::{ErrorCode, Header, Opcode, PeerError};
use std::time::Duration;

/// Smallest and largest object sizes `format` accepts. The upper bound keeps a whole
/// object within one frame's payload.
const OBJECT_SIZE_MIN: u32 = 64 << 10;
const OBJECT_SIZE_MAX: u32 = 4 << 20;

pub async fn node_info(node: &Node) -> Result<Outcome, PeerError> {
    let view = node.view();
    let (objects, used_bytes, sync_count) = match node.store() {
        Some(s) => {
            let s2 = s.clone();
            let objects = blocking(move || s2.list()).await?.len() as u64;
            (objects, s.used_bytes(), s.sync_count())
        }
        None => (0, 0, 0),
    };
    Ok(Outcome::json(&NodeInfoReply {
        uuid: node.uuid,
        addr: node.opts.listen.clone(),
        zone: node.opts.zone,
        vnodes: node.opts.effective_vnodes(),
        epoch: view.epoch(),
        serving: view.serving,
        objects,
        used_bytes,
        sync_count,
        fault_injection: node.opts.fault_injection,
        nbd_addr: node.opts.nbd.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }))
}

pub async fn cluster_info(node: &Node) -> Result<Outcome, PeerError> {
    let view = node.refresh().await?;
    let m = &view.membership;
    let status = match &m.status {
        cluster::ClusterStatus::Stopped { last_epoch, .. } => {
            let missing: Vec<String> = m
                .missing()
                .iter()
                .map(|n| format!("{} ({})", n.uuid, n.addr))
                .collect();
            if missing.is_empty() {
                format!("shut down at epoch {last_epoch}, starting")
            } else {
                format!(
                    "shut down at epoch {last_epoch}, waiting for: {}",
                    missing.join(", ")
                )
            }
        }
        _ if m.config.is_none() => "waiting for format".to_string(),
        _ => "running".to_string(),
    };
    Ok(Outcome::json(&ClusterInfoReply {
        status,
        epoch: m.epoch,
        members: m.members.iter().map(member_info).collect(),
        config: m.config.as_ref().map(|c| ClusterConfigInfo {
            cluster_uuid: c.cluster_uuid,
            format_generation: c.format_generation,
            copies: c.copies,
            object_size: c.object_size,
            formatted_at_unix: c.formatted_at_unix,
        }),
    }))
}

pub async fn format(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: FormatRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    if !req.object_size.is_power_of_two()
        || !(OBJECT_SIZE_MIN..=OBJECT_SIZE_MAX).contains(&req.object_size)
    {
        return Err(invalid(format!(
            "object size {} must be a power of two between {} KiB and {} MiB",
            req.object_size,
            OBJECT_SIZE_MIN >> 10,
            OBJECT_SIZE_MAX >> 20
        )));
    }
    let view = node.refresh().await?;
    if req.copies == 0 {
        return Err(invalid("copies must be at least 1"));
    }
    if req.copies as usize > view.data_nodes() {
        return Err(PeerError::new(
            ErrorCode::TooFewNodes,
            format!(
                "{} copies asked but only {} data node(s) are members",
                req.copies,
                view.data_nodes()
            ),
        ));
    }
    let cfg = cluster::ClusterConfig {
        cluster_uuid: uuid::Uuid::new_v4(),
        format_generation: 1,
        copies: req.copies,
        object_size: req.object_size,
        formatted_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let m = node.driver.format(cfg).await.map_err(from_cluster)?;
    node.apply(m).await?;
    tracing::info!(
        copies = req.copies,
        object_size = req.object_size,
        "cluster formatted"
    );
    cluster_info(node).await
}

/// Shuts the whole cluster down: every node drains NBD (connections flush and release
/// their VDI locks), then the cluster is marked stopped with its last members recorded;
/// every node sees that and exits without leaving. Starting the nodes again returns the
/// cluster to service once all of them are back.
pub async fn cluster_shutdown(node: &Node) -> Result<Outcome, PeerError> {
    let view = node.refresh().await?;
    if view.membership.config.is_none() {
        for m in view
            .membership
            .members
            .iter()
            .filter(|m| m.uuid != node.uuid)
        {
            let h = Header::request(Opcode::NodeShutdown, 0, view.epoch());
            if let Err(e) = node.call(m, h, Vec::new(), Duration::from_secs(5)).await {
                tracing::warn!(node = %m.addr, error = %e, "could not ask node to stop");
            }
        }
        node.request_shutdown();
        return Ok(Outcome::default());
    }
    let epoch = view.epoch();
    let drains = view.membership.members.iter().map(|m| async move {
        if m.uuid == node.uuid {
            node.drain_nbd().await;
            return;
        }
        let h = Header::request(Opcode::NodeDrain, 0, epoch);
        if let Err(e) = node.call(m, h, Vec::new(), Duration::from_secs(60)).await {
            tracing::warn!(node = %m.addr, error = %e, "could not drain node before shutdown");
        }
    });
    futures::future::join_all(drains).await;
    let m = node.driver.shutdown_cluster().await.map_err(from_cluster)?;
    tracing::warn!(epoch = m.epoch, "cluster shut down");
    node.apply(m).await?;
    node.stopped_with_cluster
        .store(true, std::sync::atomic::Ordering::Release);
    node.request_shutdown();
    Ok(Outcome::default())
}

/// Starts a shut-down cluster with the nodes that have returned.
pub async fn force_start(node: &Node) -> Result<Outcome, PeerError> {
    let m = node.driver.force_start().await.map_err(from_cluster)?;
    node.apply(m).await?;
    cluster_info(node).await
}

/// Test only: drops every write not yet made durable and dies at once, like a machine
/// losing power: no reply, nothing served after the cut (so nothing the cut dropped can
/// be fetched back by this node's own recovery).
pub async fn power_cut(node: &Node) -> Result<Outcome, PeerError> {
    if !node.opts.fault_injection {
        return Err(PeerError::new(
            ErrorCode::Unsupported,
            "power cut needs a sheep started with --fault-injection",
        ));
    }
    let store = node.store_or_err()?;
    tracing::warn!("simulated power cut");
    store.power_cut();
    std::process::exit(137);
}

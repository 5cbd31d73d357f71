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
    Ok(Outcome::json(&ClusterInfoReply {
        status: if m.config.is_some() {
            "running"
        } else {
            "waiting for format"
        }
        .to_string(),
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

/// Asks every other member to stop cleanly, then stops this node.
pub async fn cluster_shutdown(node: &Node) -> Result<Outcome, PeerError> {
    let view = node.refresh().await?;
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
    Ok(Outcome::default())
}

/// Test only: drops every write not yet made durable, then dies like a machine losing power.
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
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::process::exit(137);
    });
    Ok(Outcome::default())
}

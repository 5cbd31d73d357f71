//! VDI management ops (create, delete, list, info, resize, object location) and VDI data
//! I/O for dog (`vdi read` / `vdi write`) through this node as the gateway.

use crate::dispatch::Outcome;
use crate::error::{from_cluster, invalid};
use crate::gateway::{self, open_vdi, Refresh};
use crate::node::Node;
use crate::replicate::{replicate, Policy, WriteKind};
use futures::future::join_all;
use proto::inode::{vdi_size_max, VdiHeader, CACHE_MODES, SECTOR_SIZE, VDI_NAME_MAX};
use proto::msg::{
    self, CacheInfoReply, CacheRequest, MemberInfo, VdiCreateRequest, VdiInfo, VdiListReply,
    VdiLockInfo, VdiLockListReply, VdiNameRequest, VdiObjectReply, VdiObjectRequest,
    VdiResizeRequest, VdiSetRequest, VdiUnlockRequest,
};
use proto::{ErrorCode, Header, Oid, PeerError, Vid};

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn formatted(node: &Node) -> Result<cluster::ClusterConfig, PeerError> {
    node.view().membership.config.clone().ok_or_else(|| {
        PeerError::new(
            ErrorCode::NotFormatted,
            "cluster is not formatted; run `dog cluster format`",
        )
    })
}

fn check_size(size: u64, object_size: u32) -> Result<(), PeerError> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return Err(invalid(format!(
            "size {size} is not a positive multiple of {SECTOR_SIZE} bytes"
        )));
    }
    let max = vdi_size_max(object_size);
    if size > max {
        return Err(PeerError::new(
            ErrorCode::TooLarge,
            format!("size {size} exceeds the maximum VDI size {max}"),
        ));
    }
    Ok(())
}

pub fn member_info(m: &cluster::NodeInfo) -> MemberInfo {
    MemberInfo {
        uuid: m.uuid,
        addr: m.addr.clone(),
        zone: m.zone,
        vnodes: m.vnodes,
        nbd_addr: m.nbd_addr.clone(),
    }
}

/// Looks a VDI up by name.
pub async fn lookup(node: &Node, name: &str) -> Result<Vid, PeerError> {
    node.driver
        .vdi_lookup(name)
        .await
        .map_err(from_cluster)?
        .ok_or_else(|| PeerError::new(ErrorCode::NoSuchVdi, format!("no VDI named '{name}'")))
}

pub async fn create(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: VdiCreateRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    let cfg = formatted(node)?;
    if req.name.is_empty()
        || req.name.len() > VDI_NAME_MAX
        || req.name.contains('/')
        || req.name.chars().any(char::is_control)
    {
        return Err(invalid(format!(
            "invalid VDI name '{}': 1 to {VDI_NAME_MAX} bytes, no '/' or control characters",
            req.name
        )));
    }
    check_size(req.size, cfg.object_size)?;
    let copies = req.copies.unwrap_or(cfg.copies);
    if copies == 0 {
        return Err(invalid("copies must be at least 1"));
    }
    let data_nodes = node.view().data_nodes();
    if copies as usize > data_nodes {
        return Err(PeerError::new(
            ErrorCode::TooFewNodes,
            format!("{copies} copies asked but the cluster has {data_nodes} data node(s)"),
        ));
    }
    let min_copies = req.min_copies.unwrap_or(copies - copies / 2);
    if min_copies == 0 || min_copies > copies {
        return Err(invalid(format!(
            "min-copies must be between 1 and copies ({copies})"
        )));
    }
    let vid = node
        .driver
        .vdi_create(&req.name)
        .await
        .map_err(from_cluster)?;
    let header = VdiHeader {
        name: req.name.clone(),
        vid,
        size: req.size,
        copies,
        min_copies,
        created_unix: now_unix(),
        object_size: cfg.object_size,
        snap_id: 0,
        parent_vid: 0,
        snap_unix: 0,
        tag: String::new(),
        cache_mode: check_cache_mode(req.cache_mode.as_deref().unwrap_or(CACHE_MODES[0]))?,
        writethrough_until_flush: true,
    };
    let bytes = header.encode().map_err(|e| invalid(e.to_string()))?;
    let policy = Policy {
        copies: copies as usize,
        min_copies: min_copies as usize,
        durable: true,
        fence: 0,
    };
    let made = replicate(node, WriteKind::Create, Oid::inode(vid), 0, &bytes, policy).await;
    if let Err(e) = made {
        // Roll the registry back so the name is free again (the vid stays retired).
        let _ = node.driver.vdi_delete(&req.name, vid).await;
        return Err(e);
    }
    tracing::info!(name = %req.name, vid, size = req.size, copies, "created VDI");
    Ok(Outcome::json(&info_of(&header, 0)))
}

fn info_of(h: &VdiHeader, allocated: u64) -> VdiInfo {
    VdiInfo {
        name: h.name.clone(),
        vid: h.vid,
        size: h.size,
        copies: h.copies,
        min_copies: h.min_copies,
        created_unix: h.created_unix,
        object_size: h.object_size,
        allocated_objects: allocated,
        cache_mode: h.cache_mode.clone(),
        writethrough_until_flush: h.writethrough_until_flush,
    }
}

/// Validates a durability mode name.
fn check_cache_mode(mode: &str) -> Result<String, PeerError> {
    if CACHE_MODES.contains(&mode) {
        Ok(mode.to_string())
    } else {
        Err(invalid(format!(
            "unknown cache mode '{mode}': expected one of {}",
            CACHE_MODES.join(", ")
        )))
    }
}

fn parse_on_off(v: &str) -> Result<bool, PeerError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        other => Err(invalid(format!("expected on or off, got '{other}'"))),
    }
}

/// Refuses an operation on a VDI whose lock another gateway holds: it must go through
/// that gateway (which holds its cache).
async fn check_not_locked_elsewhere(
    node: &Node,
    vid: Vid,
    name: &str,
    what: &str,
) -> Result<(), PeerError> {
    if let Some(lock) = node.driver.lock_get(vid).await.map_err(from_cluster)? {
        if lock.holder != node.uuid {
            let addr = node
                .view()
                .member(lock.holder)
                .map(|m| m.addr.clone())
                .unwrap_or_else(|| "a node that is gone".into());
            return Err(PeerError::new(
                ErrorCode::Locked,
                format!("VDI '{name}' is in use by the gateway at {addr} ({}); {what} it through that node (dog -a {addr}), or `dog vdi lock unlock`", lock.holder),
            ));
        }
    }
    Ok(())
}

/// Rewrites a VDI's header block on its inode replicas (durably) and reloads it.
async fn store_header(node: &Node, h: &VdiHeader) -> Result<(), PeerError> {
    let bytes = h.encode().map_err(|e| invalid(e.to_string()))?;
    let v = open_vdi(node, h.vid, Refresh::Cached).await?;
    replicate(
        node,
        WriteKind::Write,
        Oid::inode(h.vid),
        0,
        &bytes,
        v.policy(true),
    )
    .await?;
    open_vdi(node, h.vid, Refresh::Header).await?;
    Ok(())
}

pub async fn set(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: VdiSetRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    formatted(node)?;
    let vid = lookup(node, &req.name).await?;
    let v = open_vdi(node, vid, Refresh::Header).await?;
    let mut h = v.header();
    match req.key.as_str() {
        "cache" => h.cache_mode = check_cache_mode(&req.value)?,
        "writethrough-until-flush" => h.writethrough_until_flush = parse_on_off(&req.value)?,
        other => {
            return Err(invalid(format!(
                "unknown VDI setting '{other}': expected 'cache' or 'writethrough-until-flush'"
            )))
        }
    }
    store_header(node, &h).await?;
    Ok(Outcome::json(&info_of(&h, v.allocated())))
}

pub async fn lock_list(node: &Node) -> Result<Outcome, PeerError> {
    formatted(node)?;
    let locks = node.driver.lock_list().await.map_err(from_cluster)?;
    let names = node.driver.vdi_list().await.map_err(from_cluster)?;
    let view = node.view();
    let locks = locks
        .into_iter()
        .map(|l| VdiLockInfo {
            name: names
                .iter()
                .find(|e| e.vid == l.vid)
                .map(|e| e.name.clone())
                .unwrap_or_default(),
            vid: l.vid,
            holder: l.holder,
            holder_addr: view.member(l.holder).map(|m| m.addr.clone()),
            generation: l.generation,
        })
        .collect();
    Ok(Outcome::json(&VdiLockListReply { locks }))
}

pub async fn unlock(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: VdiUnlockRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    formatted(node)?;
    let vid = lookup(node, &req.name).await?;
    let Some(lock) = node.driver.lock_get(vid).await.map_err(from_cluster)? else {
        return Err(invalid(format!("VDI '{}' is not locked", req.name)));
    };
    let holder_alive = node.view().member(lock.holder).is_some();
    if holder_alive && !req.force {
        return Err(PeerError::new(
            ErrorCode::Locked,
            format!(
                "VDI '{}' is locked by live node {} (generation {}); use --force to break it (the holder's unflushed writes will be refused)",
                req.name, lock.holder, lock.generation
            ),
        ));
    }
    node.driver.lock_break(vid).await.map_err(from_cluster)?;
    tracing::warn!(name = %req.name, holder = %lock.holder, generation = lock.generation, "VDI lock broken by admin");
    Ok(Outcome::default())
}

pub async fn info(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: VdiNameRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    formatted(node)?;
    let vid = lookup(node, &req.name).await?;
    let v = open_vdi(node, vid, Refresh::All).await?;
    Ok(Outcome::json(&info_of(&v.header(), v.allocated())))
}

pub async fn list(node: &Node) -> Result<Outcome, PeerError> {
    formatted(node)?;
    let entries = node.driver.vdi_list().await.map_err(from_cluster)?;
    let infos = join_all(entries.iter().map(|e| open_vdi(node, e.vid, Refresh::All))).await;
    let mut vdis = Vec::new();
    for (e, r) in entries.iter().zip(infos) {
        match r {
            Ok(v) => vdis.push(info_of(&v.header(), v.allocated())),
            Err(err) => tracing::warn!(name = %e.name, error = %err, "cannot read VDI header"),
        }
    }
    vdis.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Outcome::json(&VdiListReply { vdis }))
}

pub async fn delete(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: VdiNameRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    formatted(node)?;
    let vid = lookup(node, &req.name).await?;
    check_not_locked_elsewhere(node, vid, &req.name, "delete").await?;
    // A client that just disconnected from this gateway releases the lock after its
    // final flush: give it a moment.
    for _ in 0..50 {
        if node
            .driver
            .lock_get(vid)
            .await
            .map_err(from_cluster)?
            .is_none()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if node
        .driver
        .lock_get(vid)
        .await
        .map_err(from_cluster)?
        .is_some()
    {
        return Err(PeerError::new(
            ErrorCode::Locked,
            format!(
                "VDI '{}' is open on this gateway; disconnect its clients first",
                req.name
            ),
        ));
    }
    if let Some(c) = node.cache.get() {
        c.drop_vdi(vid);
    }
    let state = open_vdi(node, vid, Refresh::All).await;
    // Unregister first: from now on nobody can open it; the vid is never reused.
    node.driver
        .vdi_delete(&req.name, vid)
        .await
        .map_err(from_cluster)?;
    node.gateway.forget(vid);
    if let Ok(v) = state {
        let policy = v.policy(true).with_min_copies(1);
        for index in v.owned_indices() {
            let oid = Oid::data(vid, index);
            if let Err(e) = replicate(node, WriteKind::Remove, oid, 0, &[], policy).await {
                tracing::warn!(%oid, error = %e, "could not remove object of deleted VDI");
            }
        }
        if let Err(e) = replicate(node, WriteKind::Remove, Oid::inode(vid), 0, &[], policy).await {
            tracing::warn!(vid, error = %e, "could not remove inode of deleted VDI");
        }
    }
    tracing::info!(name = %req.name, vid, "deleted VDI");
    Ok(Outcome::default())
}

pub async fn resize(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: VdiResizeRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    let cfg = formatted(node)?;
    let vid = lookup(node, &req.name).await?;
    check_not_locked_elsewhere(node, vid, &req.name, "resize").await?;
    let v = open_vdi(node, vid, Refresh::Header).await?;
    if let Some(c) = node.cache.get().and_then(|c| c.get(vid)) {
        c.flush(node, &v).await?;
    }
    let mut h = v.header();
    check_size(req.size, cfg.object_size)?;
    if req.size < h.size {
        return Err(invalid(format!(
            "cannot shrink '{}' from {} to {} bytes",
            h.name, h.size, req.size
        )));
    }
    h.size = req.size;
    store_header(node, &h).await?;
    Ok(Outcome::json(&info_of(&h, v.allocated())))
}

pub async fn object(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: VdiObjectRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    formatted(node)?;
    let vid = lookup(node, &req.name).await?;
    let v = open_vdi(node, vid, Refresh::Header).await?;
    let h = v.header();
    if req.index >= h.object_count() {
        return Err(invalid(format!(
            "index {} is past the last object ({})",
            req.index,
            h.object_count().saturating_sub(1)
        )));
    }
    let owner = gateway::owner_of(node, &v, req.index).await?;
    let oid = Oid::data(if owner == 0 { vid } else { owner }, req.index);
    let nodes = node
        .view()
        .replicas(oid, h.copies as usize)
        .iter()
        .map(member_info)
        .collect();
    Ok(Outcome::json(&VdiObjectReply {
        oid: oid.to_string(),
        index: req.index,
        owner_vid: owner,
        nodes,
    }))
}

/// Opens the VDI named by a data request's inode oid and checks the range.
async fn io_target(
    node: &Node,
    h: &Header,
    len: u64,
) -> Result<std::sync::Arc<gateway::VdiState>, PeerError> {
    formatted(node)?;
    let oid = Oid::from_raw(h.oid).map_err(|e| invalid(e.to_string()))?;
    if !oid.is_inode() {
        return Err(invalid("VDI I/O must name the VDI's inode oid"));
    }
    let v = open_vdi(node, oid.vid(), Refresh::Header).await?;
    let size = v.header().size;
    if h.offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(PeerError::new(
            ErrorCode::InvalidRequest,
            format!(
                "range {}+{} is past the end of the VDI ({size} bytes)",
                h.offset, len
            ),
        ));
    }
    Ok(v)
}

/// `dog vdi read`: served by the gateway that holds the VDI (through its cache, which
/// has the newest data); a VDI in writeback mode held by another gateway is refused,
/// since its newest data may be only in that gateway's cache.
pub async fn read(node: &Node, h: &Header) -> Result<Outcome, PeerError> {
    let v = io_target(node, h, h.length as u64).await?;
    let hdr = v.header();
    if hdr.cache_mode == "writeback" {
        check_not_locked_elsewhere(node, hdr.vid, &hdr.name, "read").await?;
    }
    let data = match node.cache.get().and_then(|c| c.get(hdr.vid)) {
        Some(c) if node.exports.holds(hdr.vid).await => {
            c.read(node, &v, h.offset, h.length as u64).await?
        }
        _ => gateway::read(node, &v, h.offset, h.length as u64).await?,
    };
    Ok(Outcome::data(data))
}

/// `dog vdi write`: one writer per VDI. On the gateway holding the VDI the write goes
/// through its cache (written through to the replicas, durable when asked); elsewhere a
/// held VDI is refused. An unheld VDI is locked for the write, so the lock generation
/// moves and any cache of an earlier session is known to be stale.
pub async fn write(node: &Node, h: &Header, data: bytes::Bytes) -> Result<Outcome, PeerError> {
    let v = io_target(node, h, data.len() as u64).await?;
    let hdr = v.header();
    check_not_locked_elsewhere(node, hdr.vid, &hdr.name, "write").await?;
    let durable = h.has_flag(proto::frame::FLAG_DURABLE);
    node.exports
        .with_writer(node, hdr.vid, &hdr.name, |holder_cache| async move {
            match holder_cache {
                Some(c) => c.write(node, &v, h.offset, &data, true).await,
                None => gateway::write(node, &v, h.offset, &data, durable).await,
            }
        })
        .await?;
    Ok(Outcome::default())
}

/// This gateway's write-back caches (one VDI, or all).
pub async fn cache_info(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: CacheRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    let names = node.driver.vdi_list().await.map_err(from_cluster)?;
    let name_of = |vid: Vid| {
        names
            .iter()
            .find(|e| e.vid == vid)
            .map(|e| e.name.clone())
            .unwrap_or_default()
    };
    let mut caches = Vec::new();
    if let Some(nc) = node.cache.get() {
        let want = match &req.name {
            Some(n) => Some(lookup(node, n).await?),
            None => None,
        };
        for c in nc.all() {
            if want.is_none_or(|v| v == c.vid) {
                caches.push(c.info(&name_of(c.vid)));
            }
        }
    }
    caches.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Outcome::json(&CacheInfoReply {
        node: node.opts.listen.clone(),
        caches,
    }))
}

/// `dog vdi cache flush|purge NAME`: pushes and syncs the VDI's cache on this gateway;
/// purge then drops it (only when no client has it open).
pub async fn cache_flush(node: &Node, body: &[u8], purge: bool) -> Result<Outcome, PeerError> {
    let req: CacheRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    let name = req.name.ok_or_else(|| invalid("a VDI name is needed"))?;
    let vid = lookup(node, &name).await?;
    let nc = node.cache.get().ok_or_else(|| {
        PeerError::new(
            ErrorCode::Unsupported,
            format!(
                "the sheep at {} has no cache (--cache-size)",
                node.opts.listen
            ),
        )
    })?;
    let Some(c) = nc.get(vid) else {
        return Err(invalid(format!(
            "VDI '{name}' is not cached on the gateway at {}",
            node.opts.listen
        )));
    };
    let v = open_vdi(node, vid, Refresh::Header).await?;
    c.flush(node, &v).await?;
    crate::gateway::flush(node, &v).await?;
    if purge {
        if node
            .driver
            .lock_get(vid)
            .await
            .map_err(from_cluster)?
            .is_some_and(|l| l.holder == node.uuid)
        {
            return Err(PeerError::new(
                ErrorCode::Locked,
                format!("VDI '{name}' is open on this gateway: flushed, but not purged"),
            ));
        }
        nc.drop_vdi(vid);
    }
    Ok(Outcome::json(&c.info(&name)))
}

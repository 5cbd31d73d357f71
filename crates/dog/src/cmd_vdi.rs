//! `dog vdi ...`

use crate::conn::Sheep;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use futures::stream::{FuturesOrdered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use proto::msg::{
    CacheInfo, CacheInfoReply, CacheRequest, VdiCreateRequest, VdiInfo, VdiListReply,
    VdiLockListReply, VdiNameRequest, VdiObjectReply, VdiObjectRequest, VdiResizeRequest,
    VdiSetRequest, VdiUnlockRequest,
};
use proto::size::{human, parse_size};
use proto::{Header, Oid, Opcode};
use std::io::{IsTerminal, Read, Write};

/// Bytes per request of `vdi read` / `vdi write`.
const IO_CHUNK: u64 = 4 << 20;
/// Requests in flight during `vdi read` / `vdi write`.
const IO_DEPTH: usize = 4;
/// Ranges at least this large get a progress bar on a terminal.
const PROGRESS_MIN: u64 = 64 << 20;

#[derive(Subcommand)]
pub enum LockCmd {
    /// List the locked VDIs and their holders.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Release a VDI's lock whose holder is gone; --force breaks a live holder's lock.
    Unlock {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum CacheCmd {
    /// Objects, clean and dirty bytes, hit ratio, pushes, last flush.
    Info {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Push and sync the VDI's cache now.
    Flush { name: String },
    /// Flush, then drop the VDI's cache (when no client has it open).
    Purge { name: String },
}

#[derive(Subcommand)]
pub enum VdiCmd {
    /// Create a VDI of SIZE bytes (e.g. 10G).
    Create {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Replicas (default: the cluster's).
        #[arg(long, short = 'c')]
        copies: Option<u32>,
        /// Fewest live replicas a write needs (default: copies - copies/2).
        #[arg(long)]
        min_copies: Option<u32>,
        /// Durability mode of the NBD export: none (default), writethrough, writeback
        /// (needs gateways started with --cache-size).
        #[arg(long = "cache")]
        cache_mode: Option<String>,
    },
    /// Change a VDI setting: `cache MODE` (none, writethrough, writeback) or
    /// `writethrough-until-flush on|off` (writeback: write through until the client's
    /// first FLUSH; on by default).
    Set {
        name: String,
        key: String,
        value: String,
    },
    /// VDI locks (one writer per VDI).
    #[command(subcommand)]
    Lock(LockCmd),
    /// The write-back cache on the gateway that holds the VDI (or on --address).
    #[command(subcommand)]
    Cache(CacheCmd),
    /// List VDIs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a VDI and its objects.
    Delete { name: String },
    /// Grow a VDI to SIZE.
    Resize {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Write a VDI's data to stdout.
    Read {
        name: String,
        #[arg(value_parser = parse_size)]
        offset: Option<u64>,
        #[arg(value_parser = parse_size)]
        len: Option<u64>,
    },
    /// Write stdin into a VDI.
    Write {
        name: String,
        #[arg(value_parser = parse_size)]
        offset: Option<u64>,
        #[arg(value_parser = parse_size)]
        len: Option<u64>,
        /// Make every write durable on the replicas before it is acknowledged.
        #[arg(long)]
        durable: bool,
    },
    /// Show the object id of object INDEX and the nodes holding it.
    Object {
        name: String,
        index: u32,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(addr: &str, cmd: VdiCmd) -> Result<()> {
    let sheep = Sheep::connect(addr).await?;
    match cmd {
        VdiCmd::Create {
            name,
            size,
            copies,
            min_copies,
            cache_mode,
        } => {
            let req = VdiCreateRequest {
                name,
                size,
                copies,
                min_copies,
                cache_mode,
            };
            let v: VdiInfo = sheep.json(Opcode::VdiCreate, &req).await?;
            println!(
                "created VDI '{}' ({}, vid {:#x}, {} copies, min {}, cache {})",
                v.name,
                human(v.size),
                v.vid,
                v.copies,
                v.min_copies,
                v.cache_mode
            );
        }
        VdiCmd::Set { name, key, value } => {
            let v: VdiInfo = sheep
                .json(
                    Opcode::VdiSet,
                    &VdiSetRequest {
                        name,
                        key: key.clone(),
                        value: value.clone(),
                    },
                )
                .await?;
            println!(
                "VDI '{}': {key} = {value} (applies to NBD connections opened from now on)",
                v.name
            );
        }
        VdiCmd::Lock(LockCmd::List { json }) => {
            let l: VdiLockListReply = sheep.json(Opcode::VdiLockList, &()).await?;
            if json {
                return crate::print_json(&l.locks);
            }
            println!(
                "{:<24} {:>8} {:<36} {:<21} {:>10}",
                "Name", "Vid", "Holder", "Address", "Generation"
            );
            for k in &l.locks {
                println!(
                    "{:<24} {:>8x} {:<36} {:<21} {:>10}",
                    k.name,
                    k.vid,
                    k.holder,
                    k.holder_addr.as_deref().unwrap_or("(gone)"),
                    k.generation
                );
            }
        }
        VdiCmd::Cache(c) => cache(&sheep, c).await?,
        VdiCmd::Lock(LockCmd::Unlock { name, force }) => {
            sheep
                .op(
                    Opcode::VdiUnlock,
                    &VdiUnlockRequest {
                        name: name.clone(),
                        force,
                    },
                )
                .await?;
            println!("unlocked VDI '{name}'");
        }
        VdiCmd::List { json } => {
            let l: VdiListReply = sheep.json(Opcode::VdiList, &()).await?;
            if json {
                return crate::print_json(&l.vdis);
            }
            println!(
                "{:<24} {:>8} {:>10} {:>10} {:>7}  Cache",
                "Name", "Vid", "Size", "Used", "Copies"
            );
            for v in &l.vdis {
                let used = v.allocated_objects * v.object_size as u64;
                println!(
                    "{:<24} {:>8x} {:>10} {:>10} {:>5}/{}  {}",
                    v.name,
                    v.vid,
                    human(v.size),
                    human(used.min(v.size)),
                    v.copies,
                    v.min_copies,
                    v.cache_mode
                );
            }
        }
        VdiCmd::Delete { name } => {
            sheep
                .op(Opcode::VdiDelete, &VdiNameRequest { name: name.clone() })
                .await?;
            println!("deleted VDI '{name}'");
        }
        VdiCmd::Resize { name, size } => {
            let v: VdiInfo = sheep
                .json(Opcode::VdiResize, &VdiResizeRequest { name, size })
                .await?;
            println!("resized VDI '{}' to {}", v.name, human(v.size));
        }
        VdiCmd::Read { name, offset, len } => read(&sheep, &name, offset.unwrap_or(0), len).await?,
        VdiCmd::Write {
            name,
            offset,
            len,
            durable,
        } => write(&sheep, &name, offset.unwrap_or(0), len, durable).await?,
        VdiCmd::Object { name, index, json } => {
            let o: VdiObjectReply = sheep
                .json(Opcode::VdiObject, &VdiObjectRequest { name, index })
                .await?;
            if json {
                return crate::print_json(&o);
            }
            println!(
                "oid {} (index {}, {})",
                o.oid,
                o.index,
                if o.owner_vid == 0 {
                    "never written".to_string()
                } else {
                    format!("owned by vid {:#x}", o.owner_vid)
                }
            );
            for n in &o.nodes {
                println!("  {}  {}  zone {}", n.uuid, n.addr, n.zone);
            }
        }
    }
    Ok(())
}

async fn vdi_info(sheep: &Sheep, name: &str) -> Result<VdiInfo> {
    sheep
        .json(
            Opcode::VdiInfo,
            &VdiNameRequest {
                name: name.to_string(),
            },
        )
        .await
}

fn progress(len: u64) -> Option<ProgressBar> {
    if len < PROGRESS_MIN || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        pb.set_style(style);
    }
    Some(pb)
}

fn io_header(op: Opcode, vid: u32, offset: u64, len: u64, durable: bool) -> Header {
    let mut h = Header::request(op, 0, 0);
    h.oid = Oid::inode(vid).raw();
    h.offset = offset;
    h.length = len as u32;
    if durable {
        h.flags |= proto::frame::FLAG_DURABLE;
    }
    h
}

async fn read(sheep: &Sheep, name: &str, offset: u64, len: Option<u64>) -> Result<()> {
    let v = vdi_info(sheep, name).await?;
    if offset > v.size {
        bail!(
            "offset {offset} is past the end of '{name}' ({} bytes)",
            v.size
        );
    }
    let len = len.unwrap_or(v.size - offset);
    if offset + len > v.size {
        bail!(
            "range {offset}+{len} is past the end of '{name}' ({} bytes)",
            v.size
        );
    }
    let pb = progress(len);
    let mut out = std::io::stdout().lock();
    let mut inflight = FuturesOrdered::new();
    let mut pos = offset;
    let end = offset + len;
    loop {
        while pos < end && inflight.len() < IO_DEPTH {
            let n = IO_CHUNK.min(end - pos);
            inflight.push_back(
                sheep.call(io_header(Opcode::VdiRead, v.vid, pos, n, false), Vec::new()),
            );
            pos += n;
        }
        let Some(r) = inflight.next().await else {
            break;
        };
        let (_, data) = r.with_context(|| format!("reading '{name}'"))?;
        out.write_all(&data).context("writing to stdout")?;
        if let Some(pb) = &pb {
            pb.inc(data.len() as u64);
        }
    }
    out.flush()?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(())
}

/// Reads up to `want` bytes from stdin; fewer only at end of input.
fn read_stdin(want: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; want];
    let mut got = 0;
    let mut stdin = std::io::stdin().lock();
    while got < want {
        match stdin.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading stdin"),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

async fn write(
    sheep: &Sheep,
    name: &str,
    offset: u64,
    len: Option<u64>,
    durable: bool,
) -> Result<()> {
    let v = vdi_info(sheep, name).await?;
    if offset > v.size {
        bail!(
            "offset {offset} is past the end of '{name}' ({} bytes)",
            v.size
        );
    }
    let limit = len.unwrap_or(v.size - offset);
    if offset + limit > v.size {
        bail!(
            "range {offset}+{limit} is past the end of '{name}' ({} bytes)",
            v.size
        );
    }
    let pb = progress(limit);
    let mut inflight = FuturesOrdered::new();
    let mut pos = offset;
    let end = offset + limit;
    let mut eof = false;
    loop {
        while !eof && pos < end && inflight.len() < IO_DEPTH {
            let want = IO_CHUNK.min(end - pos) as usize;
            let data = read_stdin(want)?;
            if data.len() < want {
                eof = true;
            }
            if data.is_empty() {
                break;
            }
            let n = data.len() as u64;
            inflight
                .push_back(sheep.call(io_header(Opcode::VdiWrite, v.vid, pos, n, durable), data));
            pos += n;
        }
        let Some(r) = inflight.next().await else {
            break;
        };
        r.with_context(|| format!("writing '{name}'"))?;
        if let Some(pb) = &pb {
            pb.inc(IO_CHUNK);
        }
    }
    if !eof && len.is_none() && pos == end {
        // Input longer than the VDI: refuse silently truncating it.
        let extra = read_stdin(1)?;
        if !extra.is_empty() {
            bail!("input is longer than the VDI '{name}' ({} bytes from offset {offset}); only that much was written", v.size - offset);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if len.is_some() && pos < end {
        bail!(
            "input ended after {} of the {limit} bytes asked; those were written",
            pos - offset
        );
    }
    Ok(())
}

/// The gateway holding a VDI's lock (and so its cache), else the one at --address.
async fn cache_holder(sheep: &Sheep, name: &str) -> Result<Sheep> {
    let l: VdiLockListReply = sheep.json(Opcode::VdiLockList, &()).await?;
    match l
        .locks
        .iter()
        .find(|k| k.name == name)
        .and_then(|k| k.holder_addr.clone())
    {
        Some(addr) if addr != sheep.addr => Sheep::connect(&addr).await,
        _ => Sheep::connect(&sheep.addr).await,
    }
}

fn print_cache(c: &CacheInfo) {
    println!("VDI '{}' (vid {:#x})", c.name, c.vid);
    println!(
        "  objects {}, clean {}, dirty {} of which {} not pushed yet (limit {}), cache {}",
        c.objects,
        human(c.clean_bytes),
        human(c.dirty_bytes),
        human(c.unpushed_bytes),
        human(c.dirty_limit),
        human(c.size_limit)
    );
    println!(
        "  hits {}, misses {}, hit ratio {:.1}%",
        c.hits,
        c.misses,
        c.hit_ratio * 100.0
    );
    println!(
        "  pushes {} ({}), in flight {}, failed {}",
        c.pushes,
        human(c.pushed_bytes),
        c.pushes_in_flight,
        c.push_failures
    );
    println!(
        "  backpressure waits {}, written around the cache {} ({}), evictions {}, flushes {}",
        c.backpressure_waits,
        c.written_around,
        human(c.written_around_bytes),
        c.evictions,
        c.flushes
    );
    let last = c
        .last_flush_unix
        .map(|t| format!("{t} (unix)"))
        .unwrap_or_else(|| "never".into());
    println!(
        "  last flush {last}; {}",
        if c.seen_flush {
            "client has flushed"
        } else {
            "writing through until the client's first flush"
        }
    );
}

async fn cache(sheep: &Sheep, cmd: CacheCmd) -> Result<()> {
    match cmd {
        CacheCmd::Info { name, json } => {
            let gw = match &name {
                Some(n) => cache_holder(sheep, n).await?,
                None => Sheep::connect(&sheep.addr).await?,
            };
            let r: CacheInfoReply = gw
                .json(Opcode::VdiCacheInfo, &CacheRequest { name: name.clone() })
                .await?;
            if json {
                return crate::print_json(&r);
            }
            if r.caches.is_empty() {
                println!(
                    "no cached VDI{} on the gateway at {}",
                    name.map(|n| format!(" '{n}'")).unwrap_or_default(),
                    r.node
                );
            }
            for c in &r.caches {
                print_cache(c);
            }
        }
        CacheCmd::Flush { name } => {
            let gw = cache_holder(sheep, &name).await?;
            let c: CacheInfo = gw
                .json(Opcode::VdiCacheFlush, &CacheRequest { name: Some(name) })
                .await?;
            println!(
                "flushed the cache of '{}' on {}: {} dirty",
                c.name,
                gw.addr,
                human(c.dirty_bytes)
            );
        }
        CacheCmd::Purge { name } => {
            let gw = cache_holder(sheep, &name).await?;
            let c: CacheInfo = gw
                .json(Opcode::VdiCachePurge, &CacheRequest { name: Some(name) })
                .await?;
            println!("purged the cache of '{}' on {}", c.name, gw.addr);
        }
    }
    Ok(())
}

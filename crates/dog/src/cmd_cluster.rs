//! `dog cluster ...`

use crate::conn::Sheep;
use anyhow::Result;
use clap::Subcommand;
use proto::msg::{CheckReply, CheckRequest, ClusterInfoReply, FormatRequest};
use proto::size::{human, parse_size};
use proto::Opcode;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Format the cluster: fixes the default number of copies and the object size.
    Format {
        /// Replicas of every object (default 3).
        #[arg(long, short = 'c', default_value_t = 3)]
        copies: u32,
        /// Size of data objects, a power of two (default 4M).
        #[arg(long, default_value = "4M", value_parser = parse_size)]
        object_size: u64,
    },
    /// Show status, epoch, members and format.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Stop every node cleanly. Starting the nodes again (e.g. `dog local start I`)
    /// returns the cluster to service once every member of its last epoch is back.
    Shutdown,
    /// Start a shut-down cluster with the nodes that are back, without waiting for the
    /// missing ones (when a node is gone for good).
    ForceStart,
    /// Verify that every object of every VDI has `copies` identical, current replicas on
    /// the nodes placement names. Exit code 0 only when clean.
    Check {
        /// Fix what is wrong (recover missing, stale and diverged copies), then re-check.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(addr: &str, cmd: ClusterCmd) -> Result<()> {
    let sheep = Sheep::connect(addr).await?;
    match cmd {
        ClusterCmd::Format {
            copies,
            object_size,
        } => {
            let object_size =
                u32::try_from(object_size).map_err(|_| anyhow::anyhow!("object size too large"))?;
            let info: ClusterInfoReply = sheep
                .json(
                    Opcode::ClusterFormat,
                    &FormatRequest {
                        copies,
                        object_size,
                    },
                )
                .await?;
            println!(
                "formatted: {} copies, {} objects, {} node(s), epoch {}",
                copies,
                human(object_size as u64),
                info.members.len(),
                info.epoch
            );
        }
        ClusterCmd::Info { json } => {
            let info: ClusterInfoReply = sheep.json(Opcode::ClusterInfo, &()).await?;
            if json {
                return crate::print_json(&info);
            }
            println!("Cluster status: {}", info.status);
            println!("Epoch: {}", info.epoch);
            if let Some(c) = &info.config {
                println!("Cluster UUID: {}", c.cluster_uuid);
                println!("Copies: {}", c.copies);
                println!("Object size: {}", human(c.object_size as u64));
            }
            println!("Members ({}):", info.members.len());
            for m in &info.members {
                println!("  {}  {}  zone {}", m.uuid, m.addr, m.zone);
            }
        }
        ClusterCmd::Check { repair, json } => {
            let mut r: CheckReply = sheep
                .json(Opcode::ClusterCheck, &CheckRequest { repair })
                .await?;
            if repair && !r.problems.is_empty() {
                print_check(&r, json)?;
                eprintln!("re-checking after repair...");
                r = sheep
                    .json(Opcode::ClusterCheck, &CheckRequest { repair: false })
                    .await?;
            }
            print_check(&r, json)?;
            if !r.problems.is_empty() {
                anyhow::bail!("{} problem(s) found", r.problems.len());
            }
        }
        ClusterCmd::ForceStart => {
            let info: ClusterInfoReply = sheep.json(Opcode::ClusterForceStart, &()).await?;
            println!(
                "cluster started at epoch {} with {} node(s)",
                info.epoch,
                info.members.len()
            );
        }
        ClusterCmd::Shutdown => {
            sheep.op(Opcode::ClusterShutdown, &()).await?;
            println!("cluster shut down: every node drained its NBD clients and stopped");
        }
    }
    Ok(())
}

fn print_check(r: &CheckReply, json: bool) -> Result<()> {
    if json {
        return crate::print_json(r);
    }
    for p in &r.problems {
        println!(
            "{} object {} on {}: {}{}",
            p.vdi,
            p.oid,
            p.node.as_deref().unwrap_or("-"),
            p.problem,
            if p.repaired { " (repaired)" } else { "" }
        );
    }
    println!(
        "checked {} object(s): {} problem(s)",
        r.objects_checked,
        r.problems.len()
    );
    Ok(())
}

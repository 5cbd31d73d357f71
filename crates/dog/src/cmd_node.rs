//! `dog node ...`

use crate::conn::Sheep;
use proto::size::human;
use anyhow::Result;
use clap::Subcommand;
use futures::future::join_all;
use proto::msg::{ClusterInfoReply, NodeInfoReply};
use proto::Opcode;

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List the members of the current epoch.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show the node at --address (or every member with --all).
    Info {
        #[arg(long)]
        json: bool,
        /// Ask every member.
        #[arg(long)]
        all: bool,
    },
    /// TEST ONLY: simulate a power cut of the node at --address (needs --fault-injection).
    #[command(hide = true)]
    PowerCut,
}

async fn node_info(addr: &str) -> Result<NodeInfoReply> {
    Sheep::connect(addr).await?.json(Opcode::NodeInfo, &()).await
}

pub async fn run(addr: &str, cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::List { json } => {
            let sheep = Sheep::connect(addr).await?;
            let info: ClusterInfoReply = sheep.json(Opcode::ClusterInfo, &()).await?;
            if json {
                return crate::print_json(&info.members);
            }
            println!("{:<3} {:<36} {:<21} {:>5} {:>6}  nbd", "Id", "UUID", "Address", "Zone", "Vnodes");
            for (i, m) in info.members.iter().enumerate() {
                println!(
                    "{:<3} {:<36} {:<21} {:>5} {:>6}  {}",
                    i,
                    m.uuid,
                    m.addr,
                    m.zone,
                    m.vnodes,
                    m.nbd_addr.as_deref().unwrap_or("-")
                );
            }
            println!("{} node(s), epoch {}", info.members.len(), info.epoch);
        }
        NodeCmd::Info { json, all } => {
            let addrs: Vec<String> = if all {
                let sheep = Sheep::connect(addr).await?;
                let info: ClusterInfoReply = sheep.json(Opcode::ClusterInfo, &()).await?;
                info.members.into_iter().map(|m| m.addr).collect()
            } else {
                vec![addr.to_string()]
            };
            let infos: Vec<NodeInfoReply> = join_all(addrs.iter().map(|a| node_info(a)))
                .await
                .into_iter()
                .collect::<Result<_>>()?;
            if json {
                return if all { crate::print_json(&infos) } else { crate::print_json(&infos[0]) };
            }
            for n in infos {
                println!("Node {} at {}", n.uuid, n.addr);
                println!("  epoch {}, {}", n.epoch, if n.serving { "serving" } else { "NOT serving (fenced)" });
                println!("  zone {}, vnodes {}", n.zone, n.vnodes);
                println!("  objects {}, used {}", n.objects, human(n.used_bytes));
                println!("  syncs {}", n.sync_count);
                if let Some(nbd) = n.nbd_addr {
                    println!("  nbd {nbd}");
                }
            }
        }
        NodeCmd::PowerCut => {
            Sheep::connect(addr).await?.op(Opcode::DebugPowerCut, &()).await?;
            println!("power cut simulated at {addr}");
        }
    }
    Ok(())
}

//! `dog node ...`

use crate::conn::Sheep;
use anyhow::Result;
use clap::Subcommand;
use futures::future::join_all;
use proto::msg::{ClusterInfoReply, MemberInfo, NodeInfoReply, RecoveryInfo, ThrottleRequest};
use proto::size::human;
use proto::Opcode;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum RecoveryAction {
    /// Limit recovery to RATE bytes per second on every node (e.g. 20M; 0 = no limit).
    SetThrottle {
        #[arg(value_parser = proto::size::parse_size)]
        rate: u64,
    },
}

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
    /// Recovery progress of every node; `--wait` blocks until the cluster is recovered.
    Recovery {
        #[command(subcommand)]
        action: Option<RecoveryAction>,
        /// Wait until every node has recovered at the current epoch.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// TEST ONLY: simulate a power cut of the node at --address (needs --fault-injection).
    #[command(hide = true)]
    PowerCut,
}

async fn node_info(addr: &str) -> Result<NodeInfoReply> {
    Sheep::connect(addr)
        .await?
        .json(Opcode::NodeInfo, &())
        .await
}

pub async fn run(addr: &str, cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::List { json } => {
            let sheep = Sheep::connect(addr).await?;
            let info: ClusterInfoReply = sheep.json(Opcode::ClusterInfo, &()).await?;
            if json {
                return crate::print_json(&info.members);
            }
            println!(
                "{:<3} {:<36} {:<21} {:>5} {:>6}  nbd",
                "Id", "UUID", "Address", "Zone", "Vnodes"
            );
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
                return if all {
                    crate::print_json(&infos)
                } else {
                    crate::print_json(&infos[0])
                };
            }
            for n in infos {
                println!("Node {} at {}", n.uuid, n.addr);
                println!(
                    "  epoch {}, {}",
                    n.epoch,
                    if n.serving {
                        "serving"
                    } else {
                        "NOT serving (fenced)"
                    }
                );
                println!("  zone {}, vnodes {}", n.zone, n.vnodes);
                println!("  objects {}, used {}", n.objects, human(n.used_bytes));
                println!("  syncs {}", n.sync_count);
                if let Some(nbd) = n.nbd_addr {
                    println!("  nbd {nbd}");
                }
            }
        }
        NodeCmd::Recovery {
            action: Some(RecoveryAction::SetThrottle { rate }),
            ..
        } => {
            let members = members(addr).await?;
            for m in &members {
                let _: RecoveryInfo = Sheep::connect(&m.addr)
                    .await?
                    .json(
                        Opcode::RecoveryThrottle,
                        &ThrottleRequest {
                            bytes_per_sec: rate,
                        },
                    )
                    .await?;
            }
            let what = if rate == 0 {
                "no limit".to_string()
            } else {
                format!("{}/s", human(rate))
            };
            println!(
                "recovery throttle set to {what} on {} node(s)",
                members.len()
            );
        }
        NodeCmd::Recovery {
            action: None,
            wait,
            json,
            timeout,
        } => recovery(addr, wait, json, timeout).await?,
        NodeCmd::PowerCut => {
            // The node dies without replying: a lost connection is the expected answer.
            match Sheep::connect(addr)
                .await?
                .op_raw(Opcode::DebugPowerCut, &())
                .await
            {
                Ok(()) | Err(client::ClientError::Disconnected { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            println!("power cut simulated at {addr}");
        }
    }
    Ok(())
}

async fn members(addr: &str) -> Result<Vec<MemberInfo>> {
    let info: ClusterInfoReply = Sheep::connect(addr)
        .await?
        .json(Opcode::ClusterInfo, &())
        .await?;
    Ok(info.members)
}

/// Every member's recovery state at the current epoch.
async fn recovery_states(addr: &str) -> Result<(u32, Vec<(MemberInfo, Result<RecoveryInfo>)>)> {
    let info: ClusterInfoReply = Sheep::connect(addr)
        .await?
        .json(Opcode::ClusterInfo, &())
        .await?;
    let states = join_all(info.members.iter().map(|m| async move {
        Sheep::connect(&m.addr)
            .await?
            .json::<_, RecoveryInfo>(Opcode::RecoveryInfo, &())
            .await
    }))
    .await;
    Ok((info.epoch, info.members.into_iter().zip(states).collect()))
}

fn is_done(epoch: u32, r: &RecoveryInfo) -> bool {
    !r.running && r.done_epoch == Some(epoch) && r.pending_handoff == 0
}

async fn recovery(addr: &str, wait: bool, json: bool, timeout: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let bar =
        (wait && !json && std::io::stderr().is_terminal()).then(|| indicatif::ProgressBar::new(0));
    loop {
        let (epoch, states) = recovery_states(addr).await?;
        let done = states
            .iter()
            .all(|(_, r)| r.as_ref().is_ok_and(|r| is_done(epoch, r)));
        if let Some(b) = &bar {
            let (total, finished) = states
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .fold((0, 0), |a, r| (a.0 + r.to_recover, a.1 + r.recovered));
            b.set_length(total.max(1));
            b.set_position(finished);
            b.set_message(format!("epoch {epoch}"));
        }
        if !wait || done {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if json {
                let v: Vec<_> = states.iter().map(|(m, r)| serde_json::json!({"addr": m.addr, "uuid": m.uuid, "recovery": r.as_ref().ok()})).collect();
                return crate::print_json(
                    &serde_json::json!({"epoch": epoch, "done": done, "nodes": v}),
                );
            }
            println!(
                "epoch {epoch}: {}",
                if done {
                    "fully recovered"
                } else {
                    "recovering"
                }
            );
            println!(
                "{:<21} {:>8} {:>10} {:>8} {:>7} {:>12} {:>12} {:>9}",
                "Node", "State", "To recover", "Done", "Failed", "Rate", "Throttle", "Handoff"
            );
            for (m, r) in &states {
                match r {
                    Ok(r) => println!(
                        "{:<21} {:>8} {:>10} {:>8} {:>7} {:>10}/s {:>12} {:>9}",
                        m.addr,
                        if r.running {
                            "running"
                        } else if is_done(epoch, r) {
                            "done"
                        } else {
                            "pending"
                        },
                        r.to_recover,
                        r.recovered,
                        r.failed,
                        human(r.rate_bps),
                        if r.throttle_bps == 0 {
                            "none".to_string()
                        } else {
                            format!("{}/s", human(r.throttle_bps))
                        },
                        r.pending_handoff
                    ),
                    Err(e) => println!("{:<21} unreachable: {e}", m.addr),
                }
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("recovery not finished after {timeout} s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

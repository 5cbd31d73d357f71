//! `dog cluster check [--repair]`: every object of every VDI must have `copies` replicas
//! on the nodes placement names, with identical version stamps and contents.

use crate::dispatch::Outcome;
use crate::error::{from_cluster, invalid};
use crate::gateway::{open_vdi, Refresh};
use crate::node::Node;
use crate::replicate::OBJECT_CALL_TIMEOUT;
use cluster::NodeInfo;
use futures::future::join_all;
use proto::msg::{self, CheckProblem, CheckReply, CheckRequest};
use proto::{ErrorCode, Header, Oid, Opcode, PeerError};
use std::collections::HashMap;
use store::Stamp;

fn header(op: Opcode, epoch: u32, oid: Oid) -> Header {
    let mut h = Header::request(op, 0, epoch);
    h.oid = oid.raw();
    h
}

/// What one replica answered.
enum Seen {
    Copy { stamp: Stamp, crc: u32 },
    Problem(String),
}

pub async fn check(node: &Node, body: &[u8]) -> Result<Outcome, PeerError> {
    let req: CheckRequest = msg::decode(body).map_err(|e| invalid(e.to_string()))?;
    let mut reply = CheckReply::default();
    let entries = node.driver.vdi_list().await.map_err(from_cluster)?;
    for e in entries {
        let v = open_vdi(node, e.vid, Refresh::All).await?;
        let h = v.header();
        let mut oids = vec![Oid::inode(e.vid)];
        oids.extend(v.owned_indices().into_iter().map(|i| Oid::data(e.vid, i)));
        for oid in oids {
            reply.objects_checked += 1;
            let problems = check_object(node, &e.name, oid, h.copies as usize, req.repair).await;
            if !problems.is_empty() && req.repair {
                reply.repaired += problems.iter().filter(|p| p.repaired).count() as u64;
            }
            reply.problems.extend(problems);
        }
    }
    Ok(Outcome::json(&reply))
}

async fn check_object(
    node: &Node,
    vdi: &str,
    oid: Oid,
    copies: usize,
    repair: bool,
) -> Vec<CheckProblem> {
    let view = node.view();
    let owners = view.replicas(oid, copies);
    let mut problems = Vec::new();
    let problem = |node: Option<&NodeInfo>, what: String| CheckProblem {
        vdi: vdi.to_string(),
        oid: oid.to_string(),
        node: node.map(|n| n.addr.clone()),
        problem: what,
        repaired: false,
    };
    if owners.len() < copies {
        problems.push(problem(
            None,
            format!(
                "only {} node(s) can hold it; {copies} copies wanted",
                owners.len()
            ),
        ));
    }
    let epoch = view.epoch();
    let seen = join_all(owners.iter().map(|o| async move {
        match node
            .call(
                o,
                header(Opcode::ObjChecksum, epoch, oid),
                Vec::new(),
                OBJECT_CALL_TIMEOUT,
            )
            .await
        {
            Ok((h, p)) if p.len() == 4 => Seen::Copy {
                stamp: Stamp::new(h.epoch, h.generation),
                crc: u32::from_le_bytes([p[0], p[1], p[2], p[3]]),
            },
            Ok(_) => Seen::Problem("malformed checksum reply".into()),
            Err(e) => Seen::Problem(match e.code() {
                ErrorCode::NotFound => "missing".into(),
                ErrorCode::Checksum => format!("corrupt: {e}"),
                ErrorCode::Stale => "stale (quarantined)".into(),
                _ => format!("unreadable: {e}"),
            }),
        }
    }))
    .await;
    let newest = seen
        .iter()
        .filter_map(|s| {
            if let Seen::Copy { stamp, .. } = s {
                Some(*stamp)
            } else {
                None
            }
        })
        .max();
    // Among the newest copies, the content most of them agree on is the right one.
    let mut votes: HashMap<u32, usize> = HashMap::new();
    for s in &seen {
        if let Seen::Copy { stamp, crc } = s {
            if Some(*stamp) == newest {
                *votes.entry(*crc).or_default() += 1;
            }
        }
    }
    let good_crc = votes
        .iter()
        .max_by_key(|(crc, n)| (**n, std::cmp::Reverse(**crc)))
        .map(|(c, _)| *c);
    for (o, s) in owners.iter().zip(&seen) {
        let what = match s {
            Seen::Problem(p) => Some((p.clone(), false)),
            Seen::Copy { stamp, .. } if Some(*stamp) != newest => Some((
                format!("stale copy (stamp {stamp:?}, newest {newest:?})"),
                false,
            )),
            Seen::Copy { crc, .. } if Some(*crc) != good_crc => {
                Some(("content differs from the other copies".into(), true))
            }
            Seen::Copy { .. } => None,
        };
        let Some((what, diverged)) = what else {
            continue;
        };
        let mut p = problem(Some(o), what);
        if repair && newest.is_some() {
            p.repaired = repair_copy(node, o, oid, diverged).await.is_ok();
        }
        problems.push(p);
    }
    problems
}

/// Makes `owner`'s copy current: a diverged copy is quarantined first, then the owner
/// recovers the object from the newest copy.
async fn repair_copy(
    node: &Node,
    owner: &NodeInfo,
    oid: Oid,
    diverged: bool,
) -> Result<(), PeerError> {
    let epoch = node.view().epoch();
    if diverged {
        node.call(
            owner,
            header(Opcode::MarkStale, epoch, oid),
            Vec::new(),
            OBJECT_CALL_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_peer_error())?;
    }
    node.call(
        owner,
        header(Opcode::RecoverObj, epoch, oid),
        Vec::new(),
        OBJECT_CALL_TIMEOUT,
    )
    .await
    .map_err(|e| e.to_peer_error())?;
    Ok(())
}

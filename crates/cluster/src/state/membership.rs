//! Membership transitions, with no I/O: joins, leaves and reaps, format, and the
//! whole-cluster shutdown and restart. Every transition returns the membership of the
//! next epoch (or `None` when nothing changes and no epoch is spent).
//!
//! Shutdown and restart: `shut_down` records the running members as the last epoch's
//! members and empties `members`, so no node serves and placement has no nodes. Joins
//! then gather in `returned`; the join that completes it (every data node of the last
//! epoch back and alive) makes the cluster run again at its own epoch. Liveness is
//! probed by the driver and passed in as `dead`, so these functions stay pure.

use super::{limit, MEMBERS_MAX};
use crate::{ClusterConfig, ClusterError, ClusterStatus, Membership, NodeInfo};
use uuid::Uuid;

impl Membership {
    /// Whether `uuid` is a member. Relies on the members being sorted by uuid (the
    /// invariant every driver keeps).
    pub fn contains(&self, uuid: Uuid) -> bool {
        self.member(uuid).is_some()
    }

    /// The member with `uuid`, if any.
    pub fn member(&self, uuid: Uuid) -> Option<&NodeInfo> {
        find(&self.members, uuid)
    }

    /// Whether the status is `Running`.
    pub fn is_running(&self) -> bool {
        matches!(self.status, ClusterStatus::Running)
    }

    /// The nodes the cluster counts as present, whose liveness drivers watch: the
    /// members while `Running`, the returned nodes while `Stopped`.
    pub fn present(&self) -> &[NodeInfo] {
        match &self.status {
            ClusterStatus::Running => &self.members,
            ClusterStatus::Stopped { returned, .. } => returned,
        }
    }

    /// Whether node `uuid` is present (see [`Membership::present`]).
    pub fn is_present(&self, uuid: Uuid) -> bool {
        find(self.present(), uuid).is_some()
    }

    /// What a stopped cluster still waits for: the data nodes (vnodes > 0) of the last
    /// running epoch that have not returned. Gateway-only nodes hold no data, so the
    /// restart does not wait for them. Empty while `Running`.
    pub fn missing(&self) -> Vec<NodeInfo> {
        match &self.status {
            ClusterStatus::Running => Vec::new(),
            ClusterStatus::Stopped {
                last_members,
                returned,
                ..
            } => last_members
                .iter()
                .filter(|m| m.vnodes > 0 && find(returned, m.uuid).is_none())
                .cloned()
                .collect(),
        }
    }

    /// `Ok` while `Running`; the `Stopped` error, naming what is awaited, otherwise.
    pub fn check_running(&self) -> Result<(), ClusterError> {
        match &self.status {
            ClusterStatus::Running => Ok(()),
            ClusterStatus::Stopped { last_epoch, .. } => Err(ClusterError::Stopped {
                last_epoch: *last_epoch,
                missing: self.missing().iter().map(|m| m.uuid).collect(),
            }),
        }
    }

    /// The membership at the next epoch after `node` joined. While `Running`, the node
    /// is added to the members (or replaces its old entry). While `Stopped`, it is
    /// added to `returned`, the nodes in `dead` (liveness lost, as probed by the
    /// driver) are dropped from `returned`, and if nothing is missing any more the
    /// cluster runs again with `returned` as its members. `dead` is ignored while
    /// `Running`: dead members are `reap_dead`'s business.
    pub fn with_member(&self, node: NodeInfo, dead: &[Uuid]) -> Result<Membership, ClusterError> {
        let mut next = self.next_epoch()?;
        match &mut next.status {
            ClusterStatus::Running => insert_sorted(&mut next.members, node)?,
            ClusterStatus::Stopped { returned, .. } => {
                // The joining node just took its liveness: it is alive whatever a
                // probe before that said.
                returned.retain(|n| n.uuid == node.uuid || !dead.contains(&n.uuid));
                insert_sorted(returned, node)?;
            }
        }
        if !next.is_running() && next.missing().is_empty() {
            next.start();
        }
        Ok(next)
    }

    /// The membership at the next epoch without the nodes in `gone`, or `None` when none
    /// of them is present (nothing changes, no epoch is spent). While `Stopped` they
    /// leave `returned`; the last epoch's members are never forgotten this way.
    pub fn without_members(&self, gone: &[Uuid]) -> Result<Option<Membership>, ClusterError> {
        if !gone.iter().any(|&uuid| self.is_present(uuid)) {
            return Ok(None);
        }
        let mut next = self.next_epoch()?;
        match &mut next.status {
            ClusterStatus::Running => next.members.retain(|m| !gone.contains(&m.uuid)),
            ClusterStatus::Stopped { returned, .. } => returned.retain(|m| !gone.contains(&m.uuid)),
        }
        Ok(Some(next))
    }

    /// The membership at the next epoch with `config`, only if not formatted yet.
    pub fn formatted(&self, config: ClusterConfig) -> Result<Membership, ClusterError> {
        if self.config.is_some() {
            return Err(ClusterError::AlreadyFormatted);
        }
        check_config(&config)?;
        let mut next = self.next_epoch()?;
        next.config = Some(config);
        Ok(next)
    }

    /// The membership at the next epoch with its config replaced, if the epoch is still
    /// `expected_epoch` and the cluster is formatted. The status is kept.
    pub fn reconfigured(
        &self,
        expected_epoch: u32,
        config: ClusterConfig,
    ) -> Result<Membership, ClusterError> {
        if self.epoch != expected_epoch {
            return Err(ClusterError::Conflict {
                expected_epoch,
                current_epoch: self.epoch,
            });
        }
        if self.config.is_none() {
            return Err(ClusterError::NotFormatted);
        }
        check_config(&config)?;
        let mut next = self.next_epoch()?;
        next.config = Some(config);
        Ok(next)
    }

    /// The membership at the next epoch of a cluster shut down as a whole: `Stopped`,
    /// waiting for the current members, with no members. Only from `Running` and
    /// formatted.
    pub fn shut_down(&self) -> Result<Membership, ClusterError> {
        if self.config.is_none() {
            return Err(ClusterError::NotFormatted);
        }
        self.check_running()?;
        let mut next = self.next_epoch()?;
        next.status = ClusterStatus::Stopped {
            last_epoch: self.epoch,
            last_members: std::mem::take(&mut next.members),
            returned: Vec::new(),
        };
        Ok(next)
    }

    /// The membership at the next epoch of a stopped cluster started by force: running
    /// with the returned nodes not in `dead`, whoever is missing.
    pub fn force_started(&self, dead: &[Uuid]) -> Result<Membership, ClusterError> {
        let mut next = self.next_epoch()?;
        let ClusterStatus::Stopped { returned, .. } = &mut next.status else {
            return Err(ClusterError::NotStopped);
        };
        returned.retain(|n| !dead.contains(&n.uuid));
        if returned.is_empty() {
            return Err(ClusterError::NoneReturned);
        }
        next.start();
        Ok(next)
    }

    /// Invariants of a stored membership: members sorted by uuid, no uuid twice; while
    /// `Stopped`, no members, the same for the last members and the returned nodes, and
    /// a last running epoch before this one.
    pub fn check(&self) -> Result<(), String> {
        check_sorted(&self.members, "members")?;
        if let Some(config) = &self.config {
            check_config(config).map_err(|e| e.to_string())?;
        }
        if let ClusterStatus::Stopped {
            last_epoch,
            last_members,
            returned,
        } = &self.status
        {
            if !self.members.is_empty() {
                return Err(format!("{} members while stopped", self.members.len()));
            }
            if *last_epoch >= self.epoch {
                return Err(format!(
                    "stopped at epoch {} after its last running epoch {last_epoch}",
                    self.epoch
                ));
            }
            check_sorted(last_members, "last members")?;
            check_sorted(returned, "returned nodes")?;
        }
        Ok(())
    }

    /// Moves a stopped membership (already at its new epoch) to `Running`, with the
    /// returned nodes as members.
    fn start(&mut self) {
        let status = std::mem::take(&mut self.status);
        let ClusterStatus::Stopped { returned, .. } = status else {
            unreachable!("start of a running cluster");
        };
        assert!(self.members.is_empty(), "a stopped cluster has no members");
        self.members = returned;
    }

    fn next_epoch(&self) -> Result<Membership, ClusterError> {
        let epoch = self
            .epoch
            .checked_add(1)
            .ok_or_else(|| limit("epochs", u32::MAX as usize))?;
        Ok(Membership {
            epoch,
            ..self.clone()
        })
    }
}

/// The node with `uuid` in a list sorted by uuid.
fn find(nodes: &[NodeInfo], uuid: Uuid) -> Option<&NodeInfo> {
    nodes
        .binary_search_by(|m| m.uuid.cmp(&uuid))
        .ok()
        .map(|i| &nodes[i])
}

/// Adds `node` to a list sorted by uuid, replacing the entry with its uuid.
fn insert_sorted(nodes: &mut Vec<NodeInfo>, node: NodeInfo) -> Result<(), ClusterError> {
    match nodes.binary_search_by(|m| m.uuid.cmp(&node.uuid)) {
        Ok(i) => nodes[i] = node,
        Err(i) => {
            if nodes.len() >= MEMBERS_MAX {
                return Err(limit("members", MEMBERS_MAX));
            }
            nodes.insert(i, node)
        }
    }
    Ok(())
}

/// A node list of a stored membership is bounded, sorted by uuid, and has no repeats.
fn check_sorted(nodes: &[NodeInfo], what: &str) -> Result<(), String> {
    if nodes.len() > MEMBERS_MAX {
        return Err(format!("{} {what}, at most {MEMBERS_MAX}", nodes.len()));
    }
    if let Some(pair) = nodes.windows(2).find(|w| w[0].uuid >= w[1].uuid) {
        return Err(format!("{what} not sorted or repeated at {}", pair[1].uuid));
    }
    Ok(())
}

fn check_config(config: &ClusterConfig) -> Result<(), ClusterError> {
    if config.copies == 0 {
        return Err(ClusterError::InvalidConfig(
            "copies must be at least 1".into(),
        ));
    }
    if !config.object_size.is_power_of_two() {
        return Err(ClusterError::InvalidConfig(format!(
            "object size {} is not a power of two",
            config.object_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u128) -> NodeInfo {
        NodeInfo {
            uuid: Uuid::from_u128(n),
            addr: format!("127.0.0.1:{}", 7000 + n),
            zone: n as u32,
            vnodes: 128,
            nbd_addr: None,
        }
    }

    fn gateway(n: u128) -> NodeInfo {
        NodeInfo {
            vnodes: 0,
            ..node(n)
        }
    }

    fn config() -> ClusterConfig {
        ClusterConfig {
            cluster_uuid: Uuid::from_u128(99),
            format_generation: 1,
            copies: 2,
            object_size: 4 << 20,
            formatted_at_unix: 0,
        }
    }

    /// A formatted, running cluster with `nodes` as members.
    fn running(nodes: &[NodeInfo]) -> Membership {
        let mut m = Membership::default().formatted(config()).unwrap();
        for n in nodes {
            m = m.with_member(n.clone(), &[]).unwrap();
        }
        m
    }

    fn uuids(nodes: &[NodeInfo]) -> Vec<Uuid> {
        nodes.iter().map(|n| n.uuid).collect()
    }

    #[test]
    fn members_stay_sorted_and_rejoin_replaces() {
        let m = Membership::default();
        let m = m.with_member(node(3), &[]).unwrap();
        let m = m.with_member(node(1), &[]).unwrap();
        let mut moved = node(3);
        moved.addr = "127.0.0.1:9999".into();
        let m = m.with_member(moved.clone(), &[]).unwrap();
        assert_eq!(m.epoch, 3);
        assert_eq!(m.members, vec![node(1), moved]);
        m.check().unwrap();
    }

    #[test]
    fn removing_non_members_spends_no_epoch() {
        let m = Membership::default().with_member(node(1), &[]).unwrap();
        assert_eq!(m.without_members(&[Uuid::from_u128(9)]).unwrap(), None);
        let gone = m.without_members(&[Uuid::from_u128(1)]).unwrap().unwrap();
        assert_eq!((gone.epoch, gone.members.len()), (2, 0));
    }

    #[test]
    fn check_rejects_unsorted_members() {
        let m = Membership {
            epoch: 1,
            members: vec![node(2), node(1)],
            ..Membership::default()
        };
        assert!(m.check().is_err());
    }

    #[test]
    fn shutdown_empties_members_and_remembers_them() {
        let before = running(&[node(1), node(2)]);
        let stopped = before.shut_down().unwrap();
        assert_eq!(stopped.epoch, before.epoch + 1);
        assert!(stopped.members.is_empty() && !stopped.is_running());
        assert_eq!(stopped.missing(), vec![node(1), node(2)]);
        let ClusterStatus::Stopped { last_epoch, .. } = stopped.status else {
            panic!("not stopped");
        };
        assert_eq!(last_epoch, before.epoch);
        stopped.check().unwrap();
        assert!(matches!(
            stopped.shut_down(),
            Err(ClusterError::Stopped { missing, .. }) if missing.len() == 2
        ));
        assert!(matches!(
            Membership::default().shut_down(),
            Err(ClusterError::NotFormatted)
        ));
    }

    #[test]
    fn restart_waits_for_every_data_node_then_starts_at_one_epoch() {
        let stopped = running(&[node(1), node(2), gateway(3)])
            .shut_down()
            .unwrap();
        let one = stopped.with_member(node(2), &[]).unwrap();
        assert_eq!(one.missing(), vec![node(1)], "gateways are not awaited");
        assert!(one.is_present(node(2).uuid) && !one.contains(node(2).uuid));
        // A new node waits with the others and starts with them.
        let extra = one.with_member(node(4), &[]).unwrap();
        assert!(!extra.is_running());
        let mut moved = node(1);
        moved.addr = "127.0.0.1:1".into();
        let started = extra.with_member(moved.clone(), &[]).unwrap();
        assert_eq!(started.epoch, extra.epoch + 1);
        assert!(started.is_running());
        assert_eq!(started.members, vec![moved, node(2), node(4)]);
        started.check().unwrap();
    }

    #[test]
    fn dead_returned_nodes_are_dropped_so_the_cluster_waits() {
        let stopped = running(&[node(1), node(2), node(3)]).shut_down().unwrap();
        let two = stopped.with_member(node(1), &[]).unwrap();
        let two = two.with_member(node(2), &[]).unwrap();
        // Node 2 died before node 3 came back: the join of node 3 must not start.
        let three = two.with_member(node(3), &[node(2).uuid]).unwrap();
        assert!(!three.is_running());
        assert_eq!(three.missing(), vec![node(2)]);
        // A reap or leave of a returned node changes only `returned`.
        let reaped = three.without_members(&[node(1).uuid]).unwrap().unwrap();
        assert_eq!(uuids(reaped.present()), vec![node(3).uuid]);
        assert_eq!(reaped.missing(), vec![node(1), node(2)]);
        assert_eq!(reaped.without_members(&[node(1).uuid]).unwrap(), None);
    }

    #[test]
    fn force_start_runs_with_the_live_returned_nodes() {
        let running_cluster = running(&[node(1), node(2), node(3)]);
        assert!(matches!(
            running_cluster.force_started(&[]),
            Err(ClusterError::NotStopped)
        ));
        let stopped = running_cluster.shut_down().unwrap();
        assert!(matches!(
            stopped.force_started(&[]),
            Err(ClusterError::NoneReturned)
        ));
        let two = stopped.with_member(node(1), &[]).unwrap();
        let two = two.with_member(node(2), &[]).unwrap();
        assert!(matches!(
            two.force_started(&[node(1).uuid, node(2).uuid]),
            Err(ClusterError::NoneReturned)
        ));
        let forced = two.force_started(&[node(2).uuid]).unwrap();
        assert_eq!(
            (forced.epoch, forced.members.clone()),
            (two.epoch + 1, vec![node(1)])
        );
        assert!(forced.is_running());
    }

    #[test]
    fn check_rejects_members_while_stopped_and_bad_last_epoch() {
        let stopped = running(&[node(1)]).shut_down().unwrap();
        let with_members = Membership {
            members: vec![node(1)],
            ..stopped.clone()
        };
        assert!(with_members.check().unwrap_err().contains("stopped"));
        let from_future = Membership {
            epoch: 1,
            ..stopped
        };
        assert!(from_future
            .check()
            .unwrap_err()
            .contains("last running epoch"));
    }

    #[test]
    fn record_without_status_is_running() {
        let m: Membership =
            serde_json::from_str(r#"{"epoch": 3, "members": [], "config": null}"#).unwrap();
        assert!(m.is_running());
        let stopped = running(&[node(1)]).shut_down().unwrap();
        let text = serde_json::to_string(&stopped).unwrap();
        assert!(text.contains(r#""state":"stopped""#), "{text}");
        assert_eq!(serde_json::from_str::<Membership>(&text).unwrap(), stopped);
    }
}

//! The failure detector of a node's quorum groups: one per node, shared by
//! every group it leads (cheap with many idle groups: one tick a second reads
//! a timestamp per follower of the groups led here).
//!
//! Signal: when a peer last answered anything on this node's multiplexed
//! connection to it (`MuxPeer::last_reply_ms`). A group's leader sends each
//! follower a heartbeat every 100 ms, so a live follower of any group led
//! here answers many times a second; openraft 0.9 exposes no per-follower
//! "last heard" time of its own. A member silent for `down_after` (default
//! 5 s: 50 heartbeats in a row, not one slow RPC) is proposed `NodeDown` in
//! each group led here where it holds messages or credit, once (the machine
//! then has it down; a proposal in flight is not repeated). What it held goes
//! back to the ready list, counted as a delivery, for the other nodes'
//! consumers.
//!
//! A group led here for less than `down_after` proposes nothing (a new
//! leader has not heard its followers long enough), and neither does a tick
//! that comes long after the previous one (this process was paused: its
//! peers' silence is its own; it starts counting again).
//!
//! RabbitMQ for comparison: its quorum queues return a node's checked-out
//! messages when the leader sees the node down, which Erlang distribution
//! reports at once on a lost connection and otherwise after `net_ticktime`
//! (60 s). A refused connection here counts as silence too, so a killed node
//! is marked down `down_after` after its last answer.

use std::collections::HashMap;

/// One group as the detector sees it at a tick.
#[derive(Debug, Clone)]
pub struct GroupView {
    pub gid: u64,
    /// This node leads the group now.
    pub leader: bool,
    /// The other members: name, and when they last answered (ms, same clock
    /// as the tick's `now`; `None`: never).
    pub members: Vec<(String, Option<u64>)>,
}

/// The detector's memory between ticks (time passed in, in milliseconds).
#[derive(Debug)]
pub struct Detector {
    down_after: u64,
    last_tick: Option<u64>,
    /// Since when (as the detector saw it) this node leads each group.
    leading_since: HashMap<u64, u64>,
}

impl Detector {
    pub fn new(down_after_ms: u64) -> Self {
        Detector {
            down_after: down_after_ms.max(1),
            last_tick: None,
            leading_since: HashMap::new(),
        }
    }

    /// One tick at `now`: the (group, node) pairs to propose `NodeDown` for.
    /// `wanted(gid, node)`: the node is not marked down yet, holds messages or
    /// credit, and no such proposal is in flight.
    pub fn tick(
        &mut self,
        now: u64,
        groups: &[GroupView],
        mut wanted: impl FnMut(u64, &str) -> bool,
    ) -> Vec<(u64, String)> {
        let paused = self
            .last_tick
            .is_some_and(|t| now.saturating_sub(t) > self.down_after / 2);
        self.last_tick = Some(now);
        if paused {
            self.leading_since.clear();
        }
        let mut out = Vec::new();
        let mut led = HashMap::new();
        for g in groups.iter().filter(|g| g.leader) {
            let since = self.leading_since.get(&g.gid).copied().unwrap_or(now);
            led.insert(g.gid, since);
            if now.saturating_sub(since) < self.down_after {
                continue;
            }
            for (node, last) in &g.members {
                let heard = last.unwrap_or(0).max(since);
                if now.saturating_sub(heard) >= self.down_after && wanted(g.gid, node) {
                    out.push((g.gid, node.clone()));
                }
            }
        }
        self.leading_since = led;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(leader: bool, members: &[(&str, Option<u64>)]) -> Vec<GroupView> {
        vec![GroupView {
            gid: 7,
            leader,
            members: members.iter().map(|(n, t)| ((*n).to_owned(), *t)).collect(),
        }]
    }

    #[test]
    fn a_member_silent_for_the_timeout_is_proposed_down_once_worth_it() {
        let mut d = Detector::new(5000);
        // Became leader at 10 s; n2 answers all along, n3 stops at 11 s.
        for t in (10_000..16_000).step_by(1000) {
            let g = view(true, &[("n2", Some(t)), ("n3", Some(t.min(11_000)))]);
            assert!(d.tick(t, &g, |_, _| true).is_empty(), "at {t}");
        }
        let g = view(true, &[("n2", Some(16_000)), ("n3", Some(11_000))]);
        assert_eq!(d.tick(16_000, &g, |_, _| true), [(7, "n3".to_owned())]);
        // Not worth it (already down, holds nothing, or in flight): nothing.
        assert!(d.tick(17_000, &g, |_, n| n != "n3").is_empty());
    }

    /// Ticks every second from `from` to `to` (inclusive): the first tick
    /// that proposed something.
    fn first_pick(d: &mut Detector, from: u64, to: u64, g: &[GroupView]) -> Option<u64> {
        (from..=to)
            .step_by(1000)
            .find(|&t| !d.tick(t, g, |_, _| true).is_empty())
    }

    #[test]
    fn a_new_leader_and_a_paused_process_wait_a_full_timeout() {
        let mut d = Detector::new(5000);
        // A member never heard of: counted from when this node led the group.
        let never = view(true, &[("n3", None)]);
        assert_eq!(first_pick(&mut d, 1000, 20_000, &never), Some(6000));
        // Losing the lead forgets it; leading again starts over.
        assert!(d
            .tick(21_000, &view(false, &[("n3", None)]), |_, _| true)
            .is_empty());
        assert_eq!(first_pick(&mut d, 22_000, 40_000, &never), Some(27_000));
        // A tick long after the last (this process was stopped): start over.
        assert_eq!(first_pick(&mut d, 60_000, 80_000, &never), Some(65_000));
        // Never on one slow answer: 4.9 s late all along is not down.
        let mut d = Detector::new(5000);
        for t in (0..=20_000u64).step_by(1000) {
            let last = Some(t.saturating_sub(4900));
            assert!(d
                .tick(t, &view(true, &[("n2", last)]), |_, _| true)
                .is_empty());
        }
    }
}

//! Quiescing idle quorum groups: an idle queue's group costs no timer, no
//! heartbeat and no message between nodes.
//!
//! Why: every group runs openraft's timers. A leader heartbeats each follower
//! every 100 ms and every replica handles a tick every 150 ms, so 1,000 idle
//! quorum queues over three nodes cost most of a core (87% measured, the
//! goal is under 5%). RabbitMQ's Ra avoids per-group timers by watching
//! nodes, not groups; this does the same for groups that have nothing to say.
//!
//! How:
//! - **Liveness is per node, not per group.** Each node pings every peer it
//!   shares a group with on the multiplexed connection (`GroupRpc::Ping`),
//!   unless the peer answered something in the last interval anyway. A peer is
//!   alive while it answered within `silent_after` and its connection was not
//!   lost (a killed process resets it at once). Its pong carries its
//!   incarnation, so a restart shows even when it is quick. The failure
//!   detector (`detector.rs`) reads the same answers.
//! - **A leader quiesces its group** when nothing was written or read through
//!   it for `quiet_after`, every entry is applied here, and every live
//!   follower has matched the whole log (so it has also heard the commit
//!   index: many heartbeats went out since). It tells the live followers
//!   (`GroupRpc::Quiesce` with its term); once all of them agreed, it turns
//!   its heartbeat and tick off. A follower agrees only to the leader and term
//!   it follows, and turns its election timer and tick off.
//! - **Anything that needs the group wakes it** (all timers back on): a
//!   proposal or a leadership check on the leader (its AppendEntries follow at
//!   once); AppendEntries with entries, a vote request or a snapshot on a
//!   follower; and node events: the leader's node lost (its followers wake,
//!   and since they have not heard from it for long, elect at their next
//!   tick), or a member's node back or restarted (its leader wakes, so the
//!   member hears heartbeats before its own election timer fires). Empty
//!   AppendEntries (heartbeats, a leadership check) do not wake a follower:
//!   they come from a leader that is awake, or from one whose check is over.
//!
//! Busy groups keep openraft's own timers, with one shortcut from the same
//! node watch: when the leader's node is lost (its connection dropped, as a
//! killed process's does), the first live follower in id order stands at
//! once instead of waiting out its lease and election timeout.
//!
//! Races are harmless by construction: a follower that agreed to a quiesce
//! the leader then abandoned (a write came in between) is woken by that
//! write's entries; a leader's quiesce completes only if no wake happened
//! since it started (an epoch counts wakes). A quiet follower never elects on
//! its own, so what protects availability is the node event: a leader whose
//! node stops answering wakes all its quiet followers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;

use super::group::Registry;
use super::network::{now_ms, MuxPeer, MuxPeers};
use super::QRaft;
use crate::types::NodeId;

/// A group's quiet state on this node.
#[derive(Debug, Default)]
pub struct Quiet {
    quiet: AtomicBool,
    /// Counts wakes: a quiesce that started before one does not complete.
    epoch: Mutex<u64>,
    /// When the group was last used or woken ([`now_ms`]).
    last_active: AtomicU64,
    /// A quiesce round is in flight.
    quiescing: AtomicBool,
}

impl Quiet {
    pub fn new() -> Self {
        let q = Quiet::default();
        q.last_active.store(now_ms(), Ordering::Relaxed);
        q
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Relaxed)
    }

    fn epoch(&self) -> std::sync::MutexGuard<'_, u64> {
        match self.epoch.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The group is in use: wakes it if quiet (all of openraft's timers on)
    /// and restarts the idle clock.
    pub fn wake(&self, raft: &QRaft) {
        self.last_active.store(now_ms(), Ordering::Relaxed);
        if !self.is_quiet() && !self.quiescing.load(Ordering::Relaxed) {
            return;
        }
        let mut epoch = self.epoch();
        *epoch += 1;
        if self.quiet.swap(false, Ordering::Relaxed) {
            let rc = raft.runtime_config();
            rc.tick(true);
            rc.heartbeat(true);
            rc.elect(true);
        }
    }

    /// How long the group has been idle, in milliseconds.
    pub fn idle_ms(&self, now: u64) -> u64 {
        now.saturating_sub(self.last_active.load(Ordering::Relaxed))
    }

    /// Starts a leader's quiesce round unless one is in flight: the epoch to
    /// hand to [`Quiet::finish_leader`].
    pub fn begin(&self) -> Option<u64> {
        if self.is_quiet() || self.quiescing.swap(true, Ordering::Relaxed) {
            return None;
        }
        Some(*self.epoch())
    }

    /// Ends a leader's round: quiet (heartbeat and tick off) if every live
    /// follower agreed and nothing woke the group since `begin`.
    pub fn finish_leader(&self, raft: &QRaft, epoch: u64, agreed: bool) -> bool {
        let current = self.epoch();
        self.quiescing.store(false, Ordering::Relaxed);
        if !agreed || *current != epoch {
            return false;
        }
        let rc = raft.runtime_config();
        rc.heartbeat(false);
        rc.tick(false);
        self.quiet.store(true, Ordering::Relaxed);
        true
    }

    /// A follower asked by its leader: quiet (election timer and tick off).
    pub fn quiesce_follower(&self, raft: &QRaft) {
        let _epoch = self.epoch();
        let rc = raft.runtime_config();
        rc.elect(false);
        rc.tick(false);
        self.quiet.store(true, Ordering::Relaxed);
    }
}

/// What a leader knows when deciding to quiesce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderView {
    /// Milliseconds since the group was last used or woken.
    pub idle_ms: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// Each follower: whether its node is alive, and the index it matched.
    pub followers: Vec<(bool, Option<u64>)>,
}

/// Whether a leader may quiesce its group: idle long enough, everything
/// applied here, and every live follower caught up (a dead one is woken for
/// when it comes back).
pub fn ready(v: &LeaderView, quiet_after_ms: u64) -> bool {
    v.idle_ms >= quiet_after_ms
        && v.last_applied == v.last_log_index
        && v.followers
            .iter()
            .all(|(alive, matched)| !*alive || *matched == v.last_log_index)
        && v.followers.iter().any(|(alive, _)| *alive)
}

/// A change in a peer node's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// It stopped answering, or its connection was lost.
    Lost,
    /// It answers again, or answers as a new incarnation (restarted).
    Back,
}

/// Peers' liveness between ticks.
#[derive(Debug, Default)]
pub struct Liveness {
    peers: HashMap<String, (bool, Option<u64>)>,
}

impl Liveness {
    /// Records what a tick saw of `peer`: the event, if its state changed. A
    /// peer seen for the first time is no event, alive or not: nothing of it
    /// can be quiet yet, and right after this node starts no peer has
    /// answered yet (taking that for a loss would make a restarted member
    /// stand against a healthy leader).
    pub fn observe(
        &mut self,
        peer: &str,
        alive: bool,
        incarnation: Option<u64>,
    ) -> Option<PeerEvent> {
        let Some((was_alive, was_inc)) = self.peers.get(peer).copied() else {
            self.peers.insert(peer.to_owned(), (alive, incarnation));
            return None;
        };
        let restarted = matches!((was_inc, incarnation), (Some(a), Some(b)) if a != b);
        self.peers
            .insert(peer.to_owned(), (alive, incarnation.or(was_inc)));
        match (was_alive, alive) {
            (true, false) => Some(PeerEvent::Lost),
            (false, true) => Some(PeerEvent::Back),
            (true, true) if restarted => Some(PeerEvent::Back),
            _ => None,
        }
    }

    /// Forgets peers no group shares any more.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.peers.retain(|p, _| keep(p));
    }
}

/// The node's quiescer loop: every `every` (the heartbeat interval) it pings
/// quiet peers, turns peer events into wakes, and (every fifth tick) quiesces
/// the idle groups led here.
pub(crate) async fn run(
    registry: Weak<Registry>,
    peers: MuxPeers,
    me: NodeId,
    every: Duration,
    silent_after: Duration,
    quiet_after: Option<Duration>,
    mut stop: watch::Receiver<bool>,
) {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let (every_ms, silent_ms) = (ms(every), ms(silent_after));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut liveness = Liveness::default();
    // The peers this node shares a group with, refreshed every second (and
    // whenever the groups are listed anyway): a tick with nothing to do
    // touches only them.
    let mut shared: Vec<(String, Arc<MuxPeer>)> = Vec::new();
    for n in 0u64.. {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let quiesce_now = quiet_after.is_some() && n % 5 == 4;
        let mut handles = None;
        if n % 10 == 0 || quiesce_now {
            let Some(reg) = registry.upgrade() else {
                return;
            };
            let hs = reg.handles();
            drop(reg);
            let mut addrs: Vec<&str> = hs
                .iter()
                .flat_map(|h| h.members().iter())
                .filter(|(id, _)| **id != me)
                .map(|(_, m)| m.addr.as_str())
                .collect();
            addrs.sort_unstable();
            addrs.dedup();
            shared = addrs
                .into_iter()
                .map(|a| (a.to_owned(), peers.get(a)))
                .collect();
            liveness.retain(|a| shared.iter().any(|(s, _)| s == a));
            handles = Some(hs);
        }
        let now = now_ms();
        let mut events: HashMap<&str, PeerEvent> = HashMap::new();
        let mut alive: HashMap<&str, bool> = HashMap::new();
        for (addr, peer) in &shared {
            peer.ping_if_quiet(now, every_ms, silent_after);
            let up = peer.alive(now, silent_ms);
            alive.insert(addr, up);
            if let Some(e) = liveness.observe(addr, up, peer.incarnation()) {
                tracing::debug!(peer = %addr, event = ?e, "quorum peer liveness changed");
                events.insert(addr, e);
            }
        }
        if !events.is_empty() && handles.is_none() {
            let Some(reg) = registry.upgrade() else {
                return;
            };
            handles = Some(reg.handles());
        }
        let Some(handles) = handles else {
            continue;
        };
        if !events.is_empty() {
            for h in &handles {
                if h.is_leader() {
                    // A member back or restarted must hear heartbeats before
                    // its own election timer fires.
                    let back = h
                        .members()
                        .values()
                        .any(|m| events.get(m.addr.as_str()) == Some(&PeerEvent::Back));
                    if back && h.is_quiet() {
                        h.wake();
                    }
                    continue;
                }
                let leader = h.leader_member();
                let event = leader
                    .as_ref()
                    .and_then(|l| events.get(l.addr.as_str()).copied());
                if h.is_quiet() {
                    // The leader's node lost or restarted: elect.
                    if leader.is_none() || event.is_some() {
                        h.wake();
                    }
                } else if event == Some(PeerEvent::Lost) && first_to_elect(h, me, &alive) {
                    // A busy group's leader is gone too (its connection
                    // dropped: a killed process): one follower, the first
                    // live one in id order so that the followers do not
                    // split the vote, stands now instead of after its
                    // election timer (lease plus timeout, 0.55-0.7 s). The
                    // other follower still grants only once its lease of
                    // the old leader ran out.
                    let raft = h.raft().clone();
                    tokio::spawn(async move {
                        let _ = raft.trigger().elect().await;
                    });
                }
            }
        }
        let Some(quiet_after) = quiet_after.filter(|_| quiesce_now) else {
            continue;
        };
        for h in &handles {
            if h.is_quiet() || h.idle_ms(now) < ms(quiet_after) || !h.is_leader() {
                continue;
            }
            let view = {
                let m = h.metrics();
                let m = m.borrow();
                let matched = m.replication.as_ref();
                LeaderView {
                    idle_ms: h.idle_ms(now),
                    last_log_index: m.last_log_index,
                    last_applied: m.last_applied.map(|l| l.index),
                    followers: h
                        .members()
                        .iter()
                        .filter(|(id, _)| **id != me)
                        .map(|(id, mb)| {
                            let up = alive.get(mb.addr.as_str()).copied().unwrap_or(false);
                            let at = matched.and_then(|r| r.get(id).copied().flatten());
                            (up, at.map(|l| l.index))
                        })
                        .collect(),
                }
            };
            if ready(&view, ms(quiet_after)) {
                let live: Vec<_> = h
                    .members()
                    .iter()
                    .filter(|(id, m)| **id != me && alive.get(m.addr.as_str()) == Some(&true))
                    .map(|(_, m)| m.clone())
                    .collect();
                let (h, peers) = (h.clone(), peers.clone());
                tokio::spawn(async move { h.quiesce(peers, live).await });
            }
        }
    }
}

/// Whether this node is the follower that stands first when `h`'s leader is
/// lost: the live member with the lowest id other than the leader.
fn first_to_elect(h: &super::GroupHandle, me: NodeId, alive: &HashMap<&str, bool>) -> bool {
    let leader = h.leader();
    h.members()
        .iter()
        .filter(|(id, m)| {
            Some(**id) != leader && (**id == me || alive.get(m.addr.as_str()) == Some(&true))
        })
        .map(|(id, _)| *id)
        .next()
        == Some(me)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(idle: u64, last: u64, applied: u64, followers: &[(bool, Option<u64>)]) -> LeaderView {
        LeaderView {
            idle_ms: idle,
            last_log_index: Some(last),
            last_applied: Some(applied),
            followers: followers.to_vec(),
        }
    }

    #[test]
    fn a_leader_quiesces_only_idle_applied_and_with_live_followers_caught_up() {
        let caught_up = [(true, Some(9)), (true, Some(9))];
        assert!(ready(&view(2000, 9, 9, &caught_up), 2000));
        assert!(
            !ready(&view(1999, 9, 9, &caught_up), 2000),
            "not idle long enough"
        );
        assert!(
            !ready(&view(2000, 9, 8, &caught_up), 2000),
            "not applied here"
        );
        let behind = [(true, Some(9)), (true, Some(8))];
        assert!(
            !ready(&view(5000, 9, 9, &behind), 2000),
            "a live follower behind"
        );
        let dead_behind = [(true, Some(9)), (false, Some(3))];
        assert!(
            ready(&view(5000, 9, 9, &dead_behind), 2000),
            "a dead one is woken later"
        );
        let all_dead = [(false, Some(9)), (false, Some(9))];
        assert!(
            !ready(&view(5000, 9, 9, &all_dead), 2000),
            "nobody to agree"
        );
    }

    #[test]
    fn liveness_reports_losses_returns_and_restarts_once() {
        let mut l = Liveness::default();
        assert_eq!(l.observe("a", true, Some(1)), None);
        assert_eq!(l.observe("a", true, Some(1)), None);
        assert_eq!(l.observe("a", false, Some(1)), Some(PeerEvent::Lost));
        assert_eq!(l.observe("a", false, None), None);
        assert_eq!(l.observe("a", true, Some(1)), Some(PeerEvent::Back));
        // Restarted between two ticks: a new incarnation while alive.
        assert_eq!(l.observe("a", true, Some(2)), Some(PeerEvent::Back));
        assert_eq!(l.observe("a", true, None), None, "no pong yet: no news");
        // First seen dead: no event (a node that just started has heard no
        // peer yet); then alive is `Back`.
        assert_eq!(l.observe("b", false, None), None);
        assert_eq!(l.observe("b", true, Some(5)), Some(PeerEvent::Back));
        l.retain(|p| p == "b");
        assert_eq!(l.observe("a", true, Some(2)), None, "forgotten, then new");
    }
}

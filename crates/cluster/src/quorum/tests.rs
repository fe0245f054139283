//! Quorum groups on three in-process nodes over loopback TCP, authenticated
//! by a cookie as on the cluster port.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_core::quorum::{Assigned, QueueApplied, QueueCommand, QueueMachine};

use super::*;
use crate::transport::{Cookie, Link};

const WAIT: Duration = Duration::from_secs(15);

fn settings(name: &str, listen: &str, dir: &std::path::Path, incarnation: u64) -> QuorumSettings {
    let mut s = QuorumSettings::new(name.to_owned(), listen.to_owned(), dir.to_path_buf());
    // Small, so that the test sees snapshots, purges and a snapshot install.
    s.snapshot_every = 16;
    s.keep_logs = 0;
    s.incarnation = incarnation;
    s
}

fn link() -> Link {
    Link::client(None, Some(Cookie::new("quorum test cookie")))
}

/// What the groups handed to one node, by queue.
#[derive(Default)]
struct Recorder(Mutex<Vec<(String, u64, u32)>>);

impl Deliver for Recorder {
    fn assigned(&self, _vhost: &str, queue: &str, assigned: Vec<Assigned>) {
        let mut got = self.0.lock().unwrap();
        got.extend(
            assigned
                .into_iter()
                .map(|a| (queue.to_owned(), a.index, a.delivery_count)),
        );
    }
}

async fn open(
    name: &str,
    listen: &str,
    dir: &std::path::Path,
    incarnation: u64,
    deliver: Arc<Recorder>,
) -> QuorumGroups {
    QuorumGroups::open(
        settings(name, listen, dir, incarnation),
        link(),
        Some(deliver),
    )
    .await
    .unwrap()
}

fn placement(gid: u64, members: &BTreeMap<NodeId, Member>, initializer: NodeId) -> Placement {
    Placement {
        vhost: "/".into(),
        queue: format!("q{gid}"),
        gid,
        members: members.clone(),
        initializer,
    }
}

fn enqueue(enqueuer: u64, seq: u64) -> Batch {
    vec![QueueCommand::Enqueue {
        enqueuer,
        seq,
        body: format!("m{enqueuer}-{seq}").into_bytes(),
    }]
}

fn enqueued(outcome: &Outcome) -> Option<(u64, bool)> {
    match outcome.as_slice() {
        [QueueApplied::Enqueued { index, duplicate }] => Some((*index, *duplicate)),
        _ => None,
    }
}

/// Three data directories, one per node.
fn tempdirs() -> Vec<tempfile::TempDir> {
    (0..3).map(|_| tempfile::tempdir().unwrap()).collect()
}

/// The members a placement names: every node given, by id.
fn members_of<'a>(nodes: impl IntoIterator<Item = &'a QuorumGroups>) -> BTreeMap<NodeId, Member> {
    nodes
        .into_iter()
        .map(|n| (n.node_id(), n.member()))
        .collect()
}

fn view(nodes: &[Option<QuorumGroups>]) -> Vec<Option<&QuorumGroups>> {
    nodes.iter().map(|n| n.as_ref()).collect()
}

/// The node (index in `nodes`) that leads `gid`, once one does.
async fn leader_of(nodes: &[Option<&QuorumGroups>], gid: u64) -> usize {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if let Some(h) = n.and_then(|n| n.get(gid)) {
                if h.is_leader() {
                    return i;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader for group {gid}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_applied(h: &GroupHandle, index: u64) {
    let mut rx = h.applied();
    tokio::time::timeout(WAIT, rx.wait_for(|&i| i >= index))
        .await
        .unwrap_or_else(|_| panic!("group {} not applied to {index}", h.id()))
        .unwrap();
}

fn machine(h: &GroupHandle) -> QueueMachine {
    h.with_state(|m| m.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_fail_over_dedup_and_recover() {
    let dirs = tempdirs();
    let names = ["q1", "q2", "q3"];
    let recorders: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::default()).collect();
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        nodes.push(Some(
            open(name, "127.0.0.1:0", dirs[i].path(), 7, recorders[i].clone()).await,
        ));
    }
    let members = members_of(nodes.iter().flatten());
    let ids: Vec<NodeId> = nodes
        .iter()
        .map(|n| n.as_ref().unwrap().node_id())
        .collect();
    // Three groups, each initialised by a different node (leaders spread).
    for gid in 1..=3u64 {
        for n in nodes.iter().flatten() {
            let p = placement(gid, &members, ids[(gid as usize - 1) % 3]);
            let h = n.create(&p).await.unwrap();
            assert_eq!(h.id(), gid);
            // Idempotent.
            n.create(&p).await.unwrap();
            assert_eq!(n.placement("/", &p.queue), Some(p));
        }
    }

    // Enqueues on each group's leader.
    let mut last = BTreeMap::new();
    for gid in 1..=3u64 {
        let l = leader_of(&view(&nodes), gid).await;
        let h = nodes[l].as_ref().unwrap().get(gid).unwrap();
        let count = if gid == 1 { 40 } else { 10 };
        for seq in 1..=count {
            let (index, outcome) = h.propose(enqueue(7, seq)).await.unwrap();
            assert_eq!(enqueued(&outcome).map(|e| e.1), Some(false));
            last.insert(gid, index);
        }
    }
    // q1 (incarnation 7) checks out three of group 1's messages in one entry,
    // proposed through any node: only q1 is handed them, once.
    let (index, _) = nodes[2]
        .as_ref()
        .unwrap()
        .propose_to_queue(
            "/",
            "q1",
            vec![
                QueueCommand::NodeUp {
                    node: "q1".into(),
                    incarnation: 7,
                },
                QueueCommand::Checkout {
                    node: "q1".into(),
                    incarnation: 7,
                    credit: 3,
                },
            ],
        )
        .await
        .unwrap();
    let h = nodes[0].as_ref().unwrap().get(1).unwrap();
    wait_applied(&h, index).await;
    let handed: Vec<(String, u64, u32)> = recorders[0].0.lock().unwrap().clone();
    assert_eq!(
        handed,
        vec![
            ("q1".into(), 1, 0),
            ("q1".into(), 2, 0),
            ("q1".into(), 3, 0)
        ]
    );
    let g1 = leader_of(&view(&nodes), 1).await;
    let h1 = nodes[g1].as_ref().unwrap().get(1).unwrap();
    h1.propose(vec![
        QueueCommand::Settle {
            node: "q1".into(),
            indexes: vec![1],
        },
        QueueCommand::Return {
            node: "q1".into(),
            indexes: vec![2],
        },
    ])
    .await
    .unwrap();
    let (index, _) = h1.propose(enqueue(9, 1)).await.unwrap();
    last.insert(1, index);

    // Applied on all three, identically.
    for gid in 1..=3u64 {
        let mut states = Vec::new();
        for n in nodes.iter().flatten() {
            let h = n.get(gid).unwrap();
            wait_applied(&h, last[&gid]).await;
            states.push(machine(&h));
        }
        if gid == 1 {
            assert_eq!(
                (states[0].ready_count(), states[0].checked_out_count()),
                (39, 1)
            );
        } else {
            assert_eq!(states[0].ready_count(), 10);
        }
        assert!(
            states.iter().all(|s| *s == states[0]),
            "group {gid} differs"
        );
    }
    assert!(recorders[1].0.lock().unwrap().is_empty());
    assert!(recorders[2].0.lock().unwrap().is_empty());
    let before = machine(&h1);

    // Group 1's leader dies.
    let dead = g1;
    let dead_addr = nodes[dead].as_ref().unwrap().local_addr().to_string();
    drop(h1);
    let started = tokio::time::Instant::now();
    nodes[dead].take().unwrap().shutdown().await;
    let g1 = leader_of(&view(&nodes), 1).await;
    assert_ne!(g1, dead);
    let elected_in = started.elapsed();
    let node = nodes[g1].as_ref().unwrap();
    let h1 = node.get(1).unwrap();
    // Every committed command is on the new leader.
    let (_, after) = h1.leader_view().await.unwrap();
    assert_eq!(after, before);
    // A publisher resending after the leader change is deduplicated...
    assert_eq!(
        enqueued(&h1.propose(enqueue(7, 40)).await.unwrap().1),
        Some((40, true))
    );
    // ...and its next message goes in, also when proposed on a follower
    // (forwarded to the leader).
    assert_eq!(
        enqueued(&h1.propose(enqueue(7, 41)).await.unwrap().1).map(|e| e.1),
        Some(false)
    );
    let follower = (0..3).find(|&i| i != g1 && i != dead).unwrap();
    let fnode = nodes[follower].as_ref().unwrap();
    assert_eq!(
        enqueued(&fnode.propose(1, enqueue(7, 42)).await.unwrap().1).map(|e| e.1),
        Some(false)
    );
    assert_eq!(
        enqueued(
            &fnode
                .propose_to_queue("/", "q1", enqueue(7, 42))
                .await
                .unwrap()
                .1
        )
        .map(|e| e.1),
        Some(true)
    );
    // More while the dead node is away: snapshots are built and the log
    // purged, so it will need a snapshot to catch up.
    let mut index = 0;
    for seq in 43..=80 {
        index = h1.propose(enqueue(8, seq)).await.unwrap().0;
    }
    // Snapshots and purges run in the background: wait for one past the dead
    // node's last entry.
    let deadline = tokio::time::Instant::now() + WAIT;
    while h1.log_bounds().0.unwrap_or(u64::MAX) <= last[&1] + 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "log not purged past the dead node's last entry: {:?}",
            h1.log_bounds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The dead node restarts from its directory (a new incarnation) and
    // catches up.
    let again = open(
        names[dead],
        &dead_addr,
        dirs[dead].path(),
        8,
        recorders[dead].clone(),
    )
    .await;
    assert_eq!(again.groups(), vec![1, 2, 3]);
    assert!(again.placement("/", "q2").is_some());
    nodes[dead] = Some(again);
    let back = nodes[dead].as_ref().unwrap().get(1).unwrap();
    wait_applied(&back, index).await;
    wait_applied(&h1, index).await;
    assert_eq!(machine(&back), machine(&h1));
    assert_eq!(machine(&back).ready_count(), 39 + 2 + 38);
    // The other groups came back too, with their messages.
    for gid in 2..=3u64 {
        let h = nodes[dead].as_ref().unwrap().get(gid).unwrap();
        wait_applied(&h, last[&gid]).await;
        assert_eq!(machine(&h).ready_count(), 10);
    }
    // It could only catch up through a snapshot (its last entry was purged on
    // the leader), which it now has.
    let snap = back.metrics().borrow().snapshot;
    assert!(snap.is_some_and(|s| s.index > last[&1]), "{snap:?}");
    tracing::info!(?elected_in, "new leader elected");
    for n in nodes.iter().flatten() {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_cookie_gets_no_answer() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let good = open("c1", "127.0.0.1:0", d1.path(), 1, Arc::default()).await;
    let bad = QuorumGroups::open(
        settings("c2", "127.0.0.1:0", d2.path(), 1),
        Link::client(None, Some(Cookie::new("wrong"))),
        None,
    )
    .await
    .unwrap();
    let members = BTreeMap::from([(good.node_id(), good.member())]);
    let h = good
        .create(&placement(1, &members, good.node_id()))
        .await
        .unwrap();
    h.wait_leader(WAIT).await.unwrap();
    // `bad` knows where the group is but cannot get a proposal through.
    bad.place(placement(1, &members, good.node_id()));
    let r = bad.propose_to_queue("/", "q1", enqueue(1, 1)).await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(machine(&h).ready_count(), 0);
    // The right cookie gets through.
    assert!(good
        .propose_to_queue("/", "q1", enqueue(1, 1))
        .await
        .is_ok());
    good.shutdown().await;
    bad.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_groups_share_fsyncs_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = open("solo", "127.0.0.1:0", dir.path(), 1, Arc::default()).await;
    let members = BTreeMap::from([(node.node_id(), node.member())]);
    let groups = 20u64;
    for gid in 1..=groups {
        let h = node
            .create(&placement(gid, &members, node.node_id()))
            .await
            .unwrap();
        h.wait_leader(WAIT).await.unwrap();
    }
    let before_batches = node.wal_stats().batches.load(Ordering::Relaxed);
    let before_appends = node.wal_stats().appends.load(Ordering::Relaxed);
    // Every group proposes at once, one message at a time each.
    let mut tasks = Vec::new();
    for gid in 1..=groups {
        let h = node.get(gid).unwrap();
        tasks.push(tokio::spawn(async move {
            for seq in 1..=10 {
                h.propose(enqueue(1, seq)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let batches = node.wal_stats().batches.load(Ordering::Relaxed) - before_batches;
    let appends = node.wal_stats().appends.load(Ordering::Relaxed) - before_appends;
    assert!(appends >= groups * 10, "{appends} appends");
    assert!(
        batches * 2 < appends,
        "{batches} fsync batches for {appends} appends: no group commit"
    );

    tracing::info!(batches, appends, "group commit");
    node.delete(20).await.unwrap();
    assert!(node.placement("/", "q20").is_none());
    node.shutdown().await;
    drop(node);
    let node = open("solo", "127.0.0.1:0", dir.path(), 2, Arc::default()).await;
    assert_eq!(node.groups(), (1..groups).collect::<Vec<_>>());
    for gid in 1..groups {
        let h = node.get(gid).unwrap();
        h.wait_leader(WAIT).await.unwrap();
        let (_, m) = h.leader_view().await.unwrap();
        assert_eq!(m.ready_count(), 10, "group {gid}");
        assert_eq!(
            enqueued(&h.propose(enqueue(1, 10)).await.unwrap().1).map(|e| e.1),
            Some(true)
        );
    }
    node.shutdown().await;
}

/// This process's CPU time (user + system), from /proc (Linux; 100 Hz ticks).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    Duration::from_millis(fields.iter().sum::<u64>() * 10)
}

/// The idle cost of quorum groups: `QQ_IDLE_GROUPS` groups (default 300) over
/// three in-process nodes, leaders spread, nothing proposed; prints the CPU
/// the whole process (all three nodes) uses over 10 s. Run with
/// `QQ_IDLE_GROUPS=1000 cargo nextest run --release -p switchyard-cluster
/// --run-ignored only idle --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn idle_groups_cpu() {
    let groups: u64 = std::env::var("QQ_IDLE_GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let dirs = tempdirs();
    let mut nodes = Vec::new();
    for (i, name) in ["i1", "i2", "i3"].iter().enumerate() {
        let s = QuorumSettings::new(
            name.to_string(),
            "127.0.0.1:0".into(),
            dirs[i].path().into(),
        );
        nodes.push(std::sync::Arc::new(
            QuorumGroups::open(s, Link::default(), None).await.unwrap(),
        ));
    }
    let members = members_of(nodes.iter().map(|n| &**n));
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.node_id()).collect();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for n in &nodes {
        for gid in 1..=groups {
            let (n, p) = (n.clone(), placement(gid, &members, ids[(gid % 3) as usize]));
            tasks.push(tokio::spawn(async move {
                n.create(&p).await.unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    for gid in 1..=groups {
        nodes[0]
            .get(gid)
            .unwrap()
            .wait_leader(WAIT * 4)
            .await
            .unwrap();
    }
    eprintln!(
        "{groups} groups x 3 nodes created and led in {:?}",
        started.elapsed()
    );
    // Idle groups go quiet after `quiet_after` (2 s) and a quiesce round.
    // QQ_IDLE_NO_QUIESCE=1 measures them awake instead (for comparison).
    if std::env::var("QQ_IDLE_NO_QUIESCE").is_err() {
        let all_quiet = || {
            nodes
                .iter()
                .all(|n| (1..=groups).all(|g| n.get(g).unwrap().is_quiet()))
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while !all_quiet() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "groups never went quiet"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("all quiet {:?} after creation", started.elapsed());
    }
    let terms = |nodes: &[Arc<QuorumGroups>]| -> (Vec<usize>, u64) {
        let leaders = nodes
            .iter()
            .map(|n| {
                (1..=groups)
                    .filter(|g| n.get(*g).unwrap().is_leader())
                    .count()
            })
            .collect();
        let terms = (1..=groups)
            .map(|g| nodes[0].get(g).unwrap().metrics().borrow().current_term)
            .sum();
        (leaders, terms)
    };
    eprintln!("(leaders per node, sum of terms): {:?}", terms(&nodes));
    {}
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu0, t0) = (cpu_time(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
    let leaders: Vec<usize> = nodes
        .iter()
        .map(|n| {
            (1..=groups)
                .filter(|g| n.get(*g).unwrap().is_leader())
                .count()
        })
        .collect();
    eprintln!(
        "idle: {groups} groups over 3 nodes (leaders per node {leaders:?}): {:.1}% of one core \
         for all three nodes ({cpu:?} CPU in {wall:?})",
        cpu.as_secs_f64() * 100.0 / wall.as_secs_f64()
    );
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A member that was away while messages were checked out to it (its
/// incarnation announced, its credit granted) and that catches up through a
/// snapshot gets those messages handed over: no log entry assigns them to it
/// any more, only the snapshot has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restored_from_a_snapshot_gets_what_was_checked_out_to_it() {
    let dirs = tempdirs();
    let names = ["s1", "s2", "s3"];
    let recorders: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::default()).collect();
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        nodes.push(Some(
            open(name, "127.0.0.1:0", dirs[i].path(), 1, recorders[i].clone()).await,
        ));
    }
    let members = members_of(nodes.iter().flatten());
    let gid = 21;
    let p = placement(gid, &members, nodes[0].as_ref().unwrap().node_id());
    for n in nodes.iter().flatten() {
        n.create(&p).await.unwrap();
    }
    let l = leader_of(&view(&nodes), gid).await;
    let away = (l + 1) % 3;
    let away_addr = nodes[away].as_ref().unwrap().local_addr().to_string();
    nodes[away].take().unwrap().shutdown().await;
    // While it is away: its next incarnation and its consumers' credit are
    // written (as its link would on restart), then enough messages for
    // snapshots and purges past all of it.
    let h = nodes[l].as_ref().unwrap().get(gid).unwrap();
    let (checkout_at, _) = h
        .propose(vec![
            QueueCommand::NodeUp {
                node: names[away].into(),
                incarnation: 2,
            },
            QueueCommand::Checkout {
                node: names[away].into(),
                incarnation: 2,
                credit: 5,
            },
        ])
        .await
        .unwrap();
    let mut index = 0;
    for seq in 1..=40 {
        index = h.propose(enqueue(1, seq)).await.unwrap().0;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.log_bounds().0.unwrap_or(u64::MAX) <= checkout_at + 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "log not purged: {:?}",
            h.log_bounds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expected: Vec<u64> = machine(&h)
        .checked_out_to(names[away])
        .iter()
        .map(|a| a.index)
        .collect();
    assert_eq!(expected.len(), 5);
    // Back under that incarnation: caught up by a snapshot, and handed what
    // it holds.
    let again = open(
        names[away],
        &away_addr,
        dirs[away].path(),
        2,
        recorders[away].clone(),
    )
    .await;
    nodes[away] = Some(again);
    let back = nodes[away].as_ref().unwrap().get(gid).unwrap();
    wait_applied(&back, index).await;
    assert!(back
        .metrics()
        .borrow()
        .snapshot
        .is_some_and(|s| s.index > checkout_at));
    let handed: Vec<u64> = recorders[away]
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(q, _, _)| q == "q21")
        .map(|(_, i, _)| *i)
        .collect();
    assert_eq!(handed, expected);
    for n in nodes.iter().flatten() {
        n.shutdown().await;
    }
}

/// Idle groups go quiet on every replica; a write wakes them and reaches
/// every replica; quiet again, they still fail over when the leader's node
/// goes away (its followers wake on the node event and elect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_go_quiet_wake_on_use_and_still_fail_over() {
    let dirs = tempdirs();
    let recorders: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::default()).collect();
    let mut nodes = Vec::new();
    for (i, name) in ["z1", "z2", "z3"].iter().enumerate() {
        let mut s = settings(name, "127.0.0.1:0", dirs[i].path(), 1 + i as u64);
        s.quiet_after = Some(Duration::from_millis(500));
        let groups = QuorumGroups::open(s, link(), Some(recorders[i].clone()))
            .await
            .unwrap();
        nodes.push(Some(groups));
    }
    let members = members_of(nodes.iter().flatten());
    let ids: Vec<NodeId> = nodes.iter().flatten().map(|n| n.node_id()).collect();
    let gids = [11u64, 12, 13];
    for (k, gid) in gids.iter().enumerate() {
        let p = placement(*gid, &members, ids[k % 3]);
        for n in nodes.iter().flatten() {
            n.create(&p).await.unwrap();
        }
    }
    async fn quiet_everywhere(nodes: &[Option<QuorumGroups>], gid: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let live: Vec<&QuorumGroups> = nodes.iter().flatten().collect();
            if live
                .iter()
                .all(|n| n.get(gid).is_some_and(|h| h.is_quiet()))
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "group {gid} did not go quiet everywhere"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for gid in gids {
        quiet_everywhere(&nodes, gid).await;
    }
    // A quiet leader and quiet followers: a write wakes them, commits, and
    // every replica applies it (the commit index reaches the followers).
    let gid = gids[0];
    let l = leader_of(&view(&nodes), gid).await;
    let h = nodes[l].as_ref().unwrap().get(gid).unwrap();
    let (index, _) = h.propose(enqueue(1, 1)).await.unwrap();
    for n in nodes.iter().flatten() {
        wait_applied(&n.get(gid).unwrap(), index).await;
    }
    quiet_everywhere(&nodes, gid).await;
    // The quiet leader's node goes away: the others elect and serve writes.
    let old = nodes[l].take().unwrap();
    old.shutdown().await;
    drop(old);
    let started = std::time::Instant::now();
    let l2 = leader_of(&view(&nodes), gid).await;
    assert_ne!(l2, l);
    let h2 = nodes[l2].as_ref().unwrap().get(gid).unwrap();
    let (index2, _) = h2.propose(enqueue(1, 2)).await.unwrap();
    assert!(index2 > index);
    eprintln!("quiet group failed over in {:?}", started.elapsed());
    for n in nodes.iter().flatten() {
        n.shutdown().await;
    }
}

/// What a node's groups told it about itself being marked down.
#[derive(Default)]
struct DownRecorder(Mutex<Vec<(String, u64)>>);

impl Deliver for DownRecorder {
    fn assigned(&self, _vhost: &str, _queue: &str, _assigned: Vec<Assigned>) {}
    fn marked_down(&self, _vhost: &str, queue: &str, incarnation: u64) {
        self.0.lock().unwrap().push((queue.to_owned(), incarnation));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_marks_a_silent_member_down_once_and_its_messages_go_back() {
    let dirs = tempdirs();
    let downs: Vec<Arc<DownRecorder>> = (0..3).map(|_| Arc::default()).collect();
    let mut nodes = Vec::new();
    for (i, name) in ["d1", "d2", "d3"].iter().enumerate() {
        let mut s = settings(name, "127.0.0.1:0", dirs[i].path(), 40);
        s.down_after = Duration::from_millis(1000);
        let deliver: Arc<dyn Deliver> = downs[i].clone();
        nodes.push(Some(
            QuorumGroups::open(s, link(), Some(deliver)).await.unwrap(),
        ));
    }
    let members = members_of(nodes.iter().flatten());
    let first = nodes[0].as_ref().unwrap().node_id();
    for n in nodes.iter().flatten() {
        n.create(&placement(5, &members, first)).await.unwrap();
    }
    let l = leader_of(&view(&nodes), 5).await;
    // A follower takes two messages with credit left over; another member
    // holds nothing (it is never proposed down).
    let victim = (l + 1) % 3;
    let idle = (l + 2) % 3;
    let vname = nodes[victim].as_ref().unwrap().member().name;
    let h = nodes[l].as_ref().unwrap().get(5).unwrap();
    h.propose(vec![
        QueueCommand::NodeUp {
            node: vname.clone(),
            incarnation: 40,
        },
        QueueCommand::Checkout {
            node: vname.clone(),
            incarnation: 40,
            credit: 5,
        },
    ])
    .await
    .unwrap();
    h.propose(enqueue(1, 1)).await.unwrap();
    h.propose(enqueue(1, 2)).await.unwrap();
    // Alive and answering heartbeats: not marked down.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!machine(&h).is_down(&vname));
    assert_eq!(machine(&h).checked_out_to(&vname).len(), 2);

    // The victim stops answering: within a few timeouts, the leader has it
    // down, its messages ready again with a delivery counted, its credit gone.
    let stopped = tokio::time::Instant::now();
    nodes[victim].take().unwrap().shutdown().await;
    let deadline = stopped + WAIT;
    while !machine(&h).is_down(&vname) {
        assert!(tokio::time::Instant::now() < deadline, "never marked down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = stopped.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "too early: {waited:?}"
    );
    let m = machine(&h);
    assert_eq!((m.ready_count(), m.checked_out_count()), (2, 0));
    assert_eq!(m.credit_of(&vname), 0);
    let got = {
        let mut out = Vec::new();
        let mut m = m.clone();
        m.apply(
            m.applied_index() + 1,
            QueueCommand::NodeUp {
                node: "x".into(),
                incarnation: 1,
            },
            &mut out,
        );
        m.apply(
            m.applied_index() + 1,
            QueueCommand::Checkout {
                node: "x".into(),
                incarnation: 1,
                credit: 9,
            },
            &mut out,
        );
        out
    };
    assert!(got.iter().all(|a| a.delivery_count == 1) && got.len() == 2);
    // Proposed once: the log does not grow while nothing else happens.
    let before = h.applied().borrow().to_owned();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(*h.applied().borrow(), before, "NodeDown proposed again");
    let idle_name = nodes[idle].as_ref().unwrap().member().name;
    assert!(!machine(&h).is_down(&idle_name));
    assert!(downs.iter().all(|d| d.0.lock().unwrap().is_empty()));
    // A live member marked down (as after a partition) hears it from its own
    // copy of the machine, once, under the incarnation it had.
    let up = |inc: u64| QueueCommand::NodeUp {
        node: idle_name.clone(),
        incarnation: inc,
    };
    let down = || QueueCommand::NodeDown {
        node: idle_name.clone(),
    };
    h.propose(vec![up(40), down()]).await.unwrap();
    let told = || downs[idle].0.lock().unwrap().clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    while told().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never told");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (i, _) = h.propose(vec![down()]).await.unwrap();
    wait_applied(&nodes[idle].as_ref().unwrap().get(5).unwrap(), i).await;
    assert_eq!(told(), [("q5".to_owned(), 40)]);
    // Rejoined (the next incarnation), then down again: told again.
    h.propose(vec![up(41)]).await.unwrap();
    let (i, _) = h.propose(vec![down()]).await.unwrap();
    wait_applied(&nodes[idle].as_ref().unwrap().get(5).unwrap(), i).await;
    assert_eq!(told(), [("q5".to_owned(), 40), ("q5".to_owned(), 41)]);
    for n in nodes.iter().flatten() {
        n.shutdown().await;
    }
}

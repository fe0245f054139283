//! A local cluster of broker child processes for clustering tests: each node
//! gets the shipped config (listeners on port 0) plus a `[cluster]` section
//! whose inter-node ports were chosen free beforehand (the seeds must name
//! them), its own data directory, and can be killed (`kill -9`), paused
//! (SIGSTOP) and restarted.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::child::ChildBroker;

/// One node of a [`LocalCluster`].
pub struct ClusterNode {
    pub name: String,
    /// Its `[cluster] listen` address.
    pub cluster_addr: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The running process; `None` while killed.
    pub broker: Option<ChildBroker>,
    /// The listener addresses of the last start, by ready-file key.
    pub addrs: BTreeMap<String, String>,
    runs: usize,
}

/// N nodes forming one cluster.
pub struct LocalCluster {
    exe: PathBuf,
    pub nodes: Vec<ClusterNode>,
    /// The `seeds` list every node's config names (the first nodes).
    seeds: String,
    /// Appended to every node's config.
    extra: String,
    dir: PathBuf,
}

/// A port free now for a node's `[cluster] listen`, which must be known
/// before the node starts (the seeds name it). Taken below Linux's ephemeral
/// range (32768-60999): a port found there by binding port 0 is free only
/// until any outgoing connection on the machine (the other tests' nodes dial
/// each other all the time) picks it as its source port, before our node
/// binds it, or while a killed node is down before its restart.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32);
    for _ in 0..200 {
        // A cheap spread (splitmix64) over 20000..32000; bound to check it
        // is free.
        let mut z = seed.wrapping_add(NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let port = 20000 + (z % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("testkit: no free port");
    l.local_addr().expect("testkit: no local addr").port()
}

/// Reads the ready file's `{"key":"addr",...}` (flat, no escapes).
fn read_addrs(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).expect("testkit: no ready file");
    let inner = text.trim().trim_start_matches('{').trim_end_matches('}');
    inner
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once("\":\"")?;
            Some((
                k.trim_matches('"').to_owned(),
                v.trim_matches('"').to_owned(),
            ))
        })
        .collect()
}

impl LocalCluster {
    fn node(&self, i: usize) -> &ClusterNode {
        self.nodes
            .get(i)
            .unwrap_or_else(|| panic!("testkit: no node {i}"))
    }

    fn node_mut(&mut self, i: usize) -> &mut ClusterNode {
        self.nodes
            .get_mut(i)
            .unwrap_or_else(|| panic!("testkit: no node {i}"))
    }

    /// Writes the configs of `n` nodes (`n1`..) under `dir` and starts them all.
    pub fn start(exe: &Path, dir: &Path, n: usize) -> LocalCluster {
        Self::start_with(exe, dir, n, "")
    }

    /// [`LocalCluster::start`] with `extra` TOML appended to every node's
    /// config (a `[tls]` section).
    pub fn start_with(exe: &Path, dir: &Path, n: usize, extra: &str) -> LocalCluster {
        let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        let addrs: Vec<String> = names
            .iter()
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let seeds: Vec<String> = names
            .iter()
            .zip(&addrs)
            .map(|(n, a)| format!("\"{n}@{a}\""))
            .collect();
        let mut cluster = LocalCluster {
            exe: exe.to_owned(),
            nodes: Vec::new(),
            seeds: seeds.join(", "),
            extra: extra.to_owned(),
            dir: dir.to_owned(),
        };
        for (name, addr) in names.iter().zip(&addrs) {
            cluster.configure(name, addr);
        }
        // Start them all first, then wait: a node's start does not wait for
        // the others, but starting them together forms the cluster at once.
        for i in 0..n {
            cluster.restart(i);
        }
        cluster
    }

    /// Writes the config of a node named `name` with its `[cluster] listen`
    /// on `addr` and the cluster's seeds, and lists it (not started).
    fn configure(&mut self, name: &str, addr: &str) {
        let node_dir = self.dir.join(name);
        std::fs::create_dir_all(&node_dir).expect("testkit: cannot create node dir");
        let mut text = crate::child_config_toml(&node_dir.join("data"), &[]);
        text.push_str(&format!(
            "\n[cluster]\nnode = \"{name}\"\nlisten = \"{addr}\"\nseeds = [{}]\nwrite_timeout_ms = 5000\n",
            self.seeds
        ));
        text.push_str(&self.extra);
        let config = node_dir.join("config.toml");
        std::fs::write(&config, text).expect("testkit: cannot write config");
        self.nodes.push(ClusterNode {
            name: name.to_owned(),
            cluster_addr: addr.to_owned(),
            dir: node_dir,
            config,
            broker: None,
            addrs: BTreeMap::new(),
            runs: 0,
        });
    }

    /// Starts one more node, not among the seeds: not a member until
    /// `switchyard ctl cluster join` adds it. Returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let (name, addr) = (format!("n{}", i + 1), format!("127.0.0.1:{}", free_port()));
        self.configure(&name, &addr);
        self.restart(i);
        i
    }

    /// Starts node `i` (again) and waits until its listeners are bound.
    pub fn restart(&mut self, i: usize) {
        let exe = self.exe.clone();
        let node = self.node_mut(i);
        assert!(node.broker.is_none(), "testkit: {} is running", node.name);
        node.runs += 1;
        let broker = ChildBroker::start(&exe, &node.config, &node.dir, node.runs);
        node.addrs = read_addrs(&node.dir.join(format!("ready-{}.json", node.runs)));
        node.broker = Some(broker);
    }

    /// `kill -9` of node `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(b) = self.node_mut(i).broker.take() {
            b.kill9();
        }
    }

    /// SIGSTOP (`pause = true`) or SIGCONT of node `i`.
    pub fn signal_pause(&self, i: usize, pause: bool) {
        if let Some(b) = &self.node(i).broker {
            let sig = if pause { "-STOP" } else { "-CONT" };
            let _ = Command::new("kill")
                .arg(sig)
                .arg(b.child.id().to_string())
                .status();
        }
    }

    /// Node `i`'s address for a listener (`"management"`, `"amqp"`, ...).
    pub fn addr(&self, i: usize, listener: &str) -> String {
        self.node(i)
            .addrs
            .get(listener)
            .cloned()
            .unwrap_or_else(|| panic!("testkit: {} has no {listener} listener", self.node(i).name))
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("testkit: no node {name}"))
    }
}

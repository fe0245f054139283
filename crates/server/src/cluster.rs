//! `[cluster]`: this node's name, its inter-node listen address and the seed
//! nodes that form the cluster on first start (issue 14). Without the section
//! the broker is one node: no Raft, no extra listener or task.
//!
//! ```toml
//! [cluster]
//! node = "n1"
//! listen = "127.0.0.1:25672"
//! seeds = ["n1@127.0.0.1:25672", "n2@127.0.0.1:25673", "n3@127.0.0.1:25674"]
//! ```

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_cluster::{node_id, parse_member, Cluster, Cookie, Member, NodeTls, Settings};
use switchyard_core::Broker;
use switchyard_transport::TlsSettings;

/// The `[cluster]` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's unique name.
    pub node: String,
    /// `host:port` for inter-node traffic.
    pub listen: String,
    /// `name@host:port` of each node forming the cluster on first start. A node
    /// not listed joins later through `switchyard ctl cluster join`.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Milliseconds a metadata write (declare, admin change) waits for a
    /// commit before it fails.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Milliseconds a quorum queue group's member may go without answering
    /// its leader before the leader marks it down, giving what it had checked
    /// out to consumers on other nodes (RabbitMQ: at once on a lost
    /// connection, else after `net_ticktime`, 60 s).
    #[serde(default = "default_node_down_after_ms")]
    pub node_down_after_ms: u64,
    /// Milliseconds a publish to a clustered quorum queue may wait for its
    /// commit (a majority of the queue's members) before it fails: AMQP
    /// basic.nack, an MQTT 5 error reason code (MQTT 3.1.1: the connection
    /// closes), a STOMP ERROR. While a queue is past it, publishes to it are
    /// refused at once. Above the time a leader failover takes, so a failover
    /// only delays confirms.
    #[serde(default = "default_quorum_commit_timeout_ms")]
    pub quorum_commit_timeout_ms: u64,
    /// The cluster's shared secret (RabbitMQ's Erlang cookie): when set, a
    /// node only talks to peers (and `ctl cluster --config`) that prove they
    /// know it. Give every node the same one. `[tls]` authenticates nodes by
    /// certificate instead (or as well).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

fn default_write_timeout_ms() -> u64 {
    10_000
}

fn default_node_down_after_ms() -> u64 {
    5_000
}

fn default_quorum_commit_timeout_ms() -> u64 {
    30_000
}

impl ClusterConfig {
    /// Checks the section; the error text names the key.
    pub fn validate(&self) -> Result<Vec<Member>, String> {
        if self.node.is_empty() || self.node.contains('@') {
            return Err(format!(
                "invalid value '{}' for key cluster.node: a non-empty name without '@'",
                self.node
            ));
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "invalid value '{}' for key cluster.listen: must be host:port",
                self.listen
            ));
        }
        if self.write_timeout_ms == 0 {
            return Err(
                "invalid value 0 for key cluster.write_timeout_ms: must be at least 1".into(),
            );
        }
        if self.node_down_after_ms < 1000 {
            return Err(format!(
                "invalid value {} for key cluster.node_down_after_ms: must be at least 1000 \
                 (members answer heartbeats every 100 ms; less would mark busy nodes down)",
                self.node_down_after_ms
            ));
        }
        if self.quorum_commit_timeout_ms < 1000 {
            return Err(format!(
                "invalid value {} for key cluster.quorum_commit_timeout_ms: must be at least 1000 \
                 (an election alone takes up to a second; less would fail publishes on every failover)",
                self.quorum_commit_timeout_ms
            ));
        }
        if self.cookie.as_deref().is_some_and(|c| c.len() < 16) {
            return Err(
                "invalid value for key cluster.cookie: at least 16 characters (a guessable cookie protects nothing)".into(),
            );
        }
        let mut seeds = Vec::new();
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for s in &self.seeds {
            let m = parse_member(s).map_err(|e| format!("invalid entry in cluster.seeds: {e}"))?;
            if !names.insert(m.name.clone()) || !ids.insert(node_id(&m.name)) {
                return Err(format!("cluster.seeds names node '{}' twice", m.name));
            }
            seeds.push(m);
        }
        Ok(seeds)
    }

    /// Starts this node's part of the cluster; its Raft state lives in
    /// `<data_dir>/cluster`.
    /// Starts this node's part of the cluster. With `tls` (`[tls]` names a
    /// certificate), inter-node traffic is mutual TLS from the same files,
    /// which needs `cacertfile`: the CA that signs every node's certificate.
    pub async fn start(
        &self,
        data_dir: &Path,
        broker: Arc<Broker>,
        tls: Option<&TlsSettings>,
    ) -> std::io::Result<Cluster> {
        let seeds = self.validate().map_err(std::io::Error::other)?;
        let tls =
            match tls {
                None => None,
                Some(t) => Some(NodeTls::load(t).map_err(|e| {
                    std::io::Error::other(format!("inter-node TLS from [tls]: {e}"))
                })?),
            };
        let mut settings = Settings::new(
            self.node.clone(),
            self.listen.clone(),
            seeds,
            data_dir.join("cluster"),
        );
        settings.write_timeout = Duration::from_millis(self.write_timeout_ms);
        settings.node_down_after = Duration::from_millis(self.node_down_after_ms);
        settings.quorum_commit_timeout = Duration::from_millis(self.quorum_commit_timeout_ms);
        settings.tls = tls;
        settings.cookie = self.cookie.as_deref().map(Cookie::new);
        Cluster::start(settings, broker).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seeds: &[&str]) -> ClusterConfig {
        ClusterConfig {
            node: "n1".into(),
            listen: "127.0.0.1:25672".into(),
            seeds: seeds.iter().map(|s| s.to_string()).collect(),
            write_timeout_ms: 10_000,
            node_down_after_ms: 5_000,
            quorum_commit_timeout_ms: 30_000,
            cookie: None,
        }
    }

    #[test]
    fn the_issue_example_parses() {
        let text = r#"
            node = "n1"
            listen = "127.0.0.1:25672"
            seeds = ["n1@127.0.0.1:25672", "n2@127.0.0.1:25673", "n3@127.0.0.1:25674"]
        "#;
        let c: ClusterConfig = toml::from_str(text).unwrap();
        let seeds = c.validate().unwrap();
        assert_eq!(seeds.len(), 3);
        assert_eq!(seeds[1].name, "n2");
        assert_eq!(seeds[1].addr, "127.0.0.1:25673");
        assert_eq!(c.node_down_after_ms, 5000);
        assert_eq!(c.quorum_commit_timeout_ms, 30_000);
    }

    #[test]
    fn quorum_commit_timeout_is_at_least_a_second() {
        let mut c = cfg(&[]);
        c.quorum_commit_timeout_ms = 999;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("cluster.quorum_commit_timeout_ms"));
        c.quorum_commit_timeout_ms = 1000;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn node_down_after_is_at_least_a_second() {
        let mut c = cfg(&[]);
        c.node_down_after_ms = 999;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("cluster.node_down_after_ms"));
        c.node_down_after_ms = 1000;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_seeds_are_refused_with_the_key() {
        assert!(cfg(&["n1127.0.0.1:1"])
            .validate()
            .unwrap_err()
            .contains("cluster.seeds"));
        assert!(cfg(&["n1@a:1", "n1@b:2"])
            .validate()
            .unwrap_err()
            .contains("twice"));
        let mut c = cfg(&[]);
        c.listen = "nowhere".into();
        assert!(c.validate().unwrap_err().contains("cluster.listen"));
    }
}

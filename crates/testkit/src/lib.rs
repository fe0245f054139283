//! Test support: starts a real Switchyard in-process on 127.0.0.1, port 0, with its
//! data directory in a fresh temporary directory, and gives raw-bytes socket helpers
//! for protocol tests.
//!
//! It must not be used outside tests and must not fake any part of the broker: what
//! a test talks to is the same server the binary runs.
//!
//! Failing to start a broker or a socket error in a helper is a failed test, so
//! these functions panic with a message instead of returning errors; that is why
//! the workspace's panic lints are relaxed for this crate alone.
#![allow(clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::Broker;
use switchyard_server::{Config, RunningServer};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use switchyard_server::config;

pub mod amqp;
pub mod child;
pub mod cluster;
pub mod http;
pub mod stomp;
pub mod tls;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The shipped `config.toml` as text for a broker run as a child process
/// (`switchyard --config FILE`): every listener of it on 127.0.0.1 port 0
/// (read the ports from `--ready-file`), `data_dir` set, and each `(key, value)`
/// of `overrides` (a TOML value, e.g. `("heartbeat_secs", "5")`) replacing that
/// key's value in whichever table has it.
pub fn child_config_toml(data_dir: &Path, overrides: &[(&str, &str)]) -> String {
    let mut config: toml::Table = toml::from_str(config::EMBEDDED_CONFIG)
        .expect("testkit: the built-in config.toml is invalid");
    let listeners = config
        .get_mut("listeners")
        .expect("testkit: the built-in config.toml has no [listeners]");
    config::move_addresses_to_port_zero(listeners, LOOPBACK);
    config.insert(
        "data_dir".into(),
        toml::Value::String(data_dir.display().to_string()),
    );
    for (key, value) in overrides {
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| panic!("testkit: {value} is not a TOML value"));
        let table = if config.contains_key(*key) {
            &mut config
        } else {
            config
                .iter_mut()
                .filter_map(|(_, v)| v.as_table_mut())
                .find(|t| t.contains_key(*key))
                .unwrap_or_else(|| panic!("testkit: no key {key} in the built-in config.toml"))
        };
        table.insert((*key).to_owned(), value);
    }
    toml::to_string(&config).expect("testkit: cannot write the config back")
}

/// How long [`RawClient::read_exact`] waits before failing the test.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A broker running in this process. Dropping it stops it without waiting;
/// [`TestBroker::stop`] waits for connections to close.
pub struct TestBroker {
    server: RunningServer,
    amqp: SocketAddr,
    /// Removed when the broker is dropped; declared last so it outlives the server.
    _data_dir: TempDir,
}

/// Starts a broker with the shipped configuration, every listener on 127.0.0.1 port 0.
pub async fn start_broker() -> TestBroker {
    start_broker_with(|_| {}).await
}

/// Like [`start_broker`], after `configure` has changed the configuration (limits,
/// users, ...). The listeners and `data_dir` are set before `configure` runs, so
/// it may change them too.
pub async fn start_broker_with(configure: impl FnOnce(&mut Config)) -> TestBroker {
    let data_dir = tempfile::tempdir().expect("testkit: cannot create a temporary directory");
    let mut config = Config::embedded().expect("testkit: the built-in config.toml is invalid");
    // Every listener, whatever its name: the default ports may be taken here.
    config
        .listeners
        .move_all_to_port_zero(LOOPBACK)
        .unwrap_or_else(|e| panic!("testkit: cannot move the listeners: {e}"));
    config.data_dir = data_dir.path().join("data");
    configure(&mut config);
    let server = switchyard_server::start(config)
        .await
        .unwrap_or_else(|e| panic!("testkit: the broker did not start: {e}"));
    let amqp = *server
        .local_addrs()
        .get("amqp")
        .expect("testkit: the configuration has no AMQP listener");
    TestBroker {
        server,
        amqp,
        _data_dir: data_dir,
    }
}

impl TestBroker {
    /// The address of the AMQP listener.
    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp
    }

    /// The address of the STOMP (TCP) listener.
    pub fn stomp_addr(&self) -> SocketAddr {
        *self
            .server
            .local_addrs()
            .get("stomp")
            .expect("testkit: the configuration has no STOMP listener")
    }

    /// The address of the STOMP-over-WebSocket listener.
    pub fn stomp_ws_addr(&self) -> SocketAddr {
        *self
            .server
            .local_addrs()
            .get("stomp_ws")
            .expect("testkit: the configuration has no STOMP WebSocket listener")
    }

    /// The address of the MQTT (TCP) listener.
    pub fn mqtt_addr(&self) -> SocketAddr {
        *self
            .server
            .local_addrs()
            .get("mqtt")
            .expect("testkit: the configuration has no MQTT listener")
    }

    /// The address of the MQTT-over-WebSocket listener.
    pub fn mqtt_ws_addr(&self) -> SocketAddr {
        *self
            .server
            .local_addrs()
            .get("mqtt_ws")
            .expect("testkit: the configuration has no MQTT WebSocket listener")
    }

    /// The address of the RabbitMQ Stream protocol listener.
    pub fn stream_addr(&self) -> SocketAddr {
        *self
            .server
            .local_addrs()
            .get("stream")
            .expect("testkit: the configuration has no Stream protocol listener")
    }

    /// The address of the HTTP management listener (API and UI).
    pub fn management_addr(&self) -> SocketAddr {
        *self
            .server
            .local_addrs()
            .get("management")
            .expect("testkit: the configuration has no management listener")
    }

    /// `http://127.0.0.1:PORT/api`, the management API's root.
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.management_addr())
    }

    /// The address of the Prometheus listener.
    pub fn prometheus_addr(&self) -> SocketAddr {
        *self
            .server
            .local_addrs()
            .get("prometheus")
            .expect("testkit: the configuration has no Prometheus listener")
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`, for client libraries.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp)
    }

    /// The broker's core, to look at queues and counters directly.
    pub fn broker(&self) -> Arc<Broker> {
        self.server.broker()
    }

    /// The running server (listener addresses, open connections).
    pub fn server(&self) -> &RunningServer {
        &self.server
    }

    /// Shuts down gracefully: stops listening, tells every connection to close and
    /// waits for them (bounded). Returns whether all closed in time.
    pub async fn stop(self) -> bool {
        self.server.shutdown().await
    }
}

/// A plain TCP client that sends and reads bytes, for protocol-level tests.
pub struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("testkit: cannot connect to {addr}: {e}"));
        // Tests send small frames and wait for the answer: do not let Nagle hold them.
        stream
            .set_nodelay(true)
            .expect("testkit: cannot set TCP_NODELAY");
        RawClient { stream }
    }

    /// Sends `bytes` (all of them).
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("testkit: send failed: {e}"));
    }

    /// Reads exactly `n` bytes; fails the test after [`READ_TIMEOUT`] or if the
    /// broker closes first.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        match tokio::time::timeout(READ_TIMEOUT, self.stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => buf,
            Ok(Err(e)) => panic!("testkit: reading {n} bytes failed: {e}"),
            Err(_) => panic!("testkit: {n} bytes did not arrive within {READ_TIMEOUT:?}"),
        }
    }

    /// Waits up to `timeout` for data, then returns what has arrived so far without
    /// waiting more. Empty if nothing came in time or the broker closed.
    pub async fn read_available(&mut self, timeout: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        match tokio::time::timeout(timeout, self.stream.read(&mut buf)).await {
            Ok(Ok(n)) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Ok(Err(_)) | Err(_) => return out,
        }
        // Drain what is already buffered, without waiting for more.
        loop {
            match self.stream.try_read(&mut buf) {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
        }
    }

    /// Reads until the broker closes the connection (EOF or reset) and returns what
    /// it sent before closing; fails the test if it is still open after `timeout`.
    pub async fn expect_closed(&mut self, timeout: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        let closed = tokio::time::timeout(timeout, async {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
                }
            }
        })
        .await;
        if closed.is_err() {
            panic!(
                "testkit: connection still open after {timeout:?} (received {} bytes: {:?})",
                out.len(),
                out
            );
        }
        out
    }

    /// The underlying stream, for anything the helpers do not cover.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

/// A broker for tests written with blocking HTTP clients (which must not run on
/// a tokio worker thread): the broker runs on its own runtime, the test thread
/// stays free. Stops the broker when dropped.
pub struct BlockingBroker {
    runtime: tokio::runtime::Runtime,
    broker: Option<TestBroker>,
}

impl BlockingBroker {
    /// Starts a broker like [`start_broker_with`], on a runtime of its own.
    pub fn start_with(configure: impl FnOnce(&mut Config)) -> BlockingBroker {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("testkit: cannot build a tokio runtime");
        let broker = runtime.block_on(start_broker_with(configure));
        BlockingBroker {
            runtime,
            broker: Some(broker),
        }
    }

    pub fn start() -> BlockingBroker {
        Self::start_with(|_| {})
    }

    pub fn broker(&self) -> &TestBroker {
        self.broker
            .as_ref()
            .expect("testkit: the broker is running until drop")
    }

    /// Spawns a task (a client's event loop) on the broker's runtime.
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(f)
    }

    /// Runs a future (an AMQP, MQTT or STOMP client) on the broker's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

impl Drop for BlockingBroker {
    fn drop(&mut self) {
        if let Some(broker) = self.broker.take() {
            self.runtime.block_on(broker.stop());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_test_broker_listens_on_loopback_and_stops() {
        let b = start_broker().await;
        let addr = b.amqp_addr();
        assert!(addr.ip().is_loopback());
        assert_ne!(addr.port(), 0);
        assert_eq!(
            b.amqp_url(),
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", addr.port())
        );
        assert!(b.broker().has_vhost("/"));
        // No connection is open, so the stop cannot time out.
        assert!(b.stop().await);
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn the_configuration_can_be_changed() {
        let b = start_broker_with(|c| {
            c.vhosts.push(config::VHostConfig {
                name: "/test".into(),
            });
        })
        .await;
        assert!(b.broker().has_vhost("/test"));
        assert!(b.broker().has_vhost("/"));
    }

    #[tokio::test]
    async fn raw_client_reads_and_sees_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = RawClient::connect(addr).await;
        let (mut peer, _) = listener.accept().await.unwrap();
        client.send(b"ping").await;
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        peer.write_all(b"hello world").await.unwrap();
        assert_eq!(client.read_exact(5).await, b"hello");
        assert_eq!(
            client.read_available(Duration::from_secs(5)).await,
            b" world"
        );
        assert!(client
            .read_available(Duration::from_millis(20))
            .await
            .is_empty());
        peer.write_all(b"bye").await.unwrap();
        drop(peer);
        assert_eq!(client.expect_closed(Duration::from_secs(5)).await, b"bye");
    }
}

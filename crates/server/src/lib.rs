//! Switchyard's server shell: reads the configuration, builds the [`Broker`] from it,
//! binds one TCP listener per configured protocol, caps the connections open at once,
//! hands every accepted connection to its protocol adapter in its own task, and shuts
//! everything down on request.
//!
//! It must not speak any protocol itself (that is the adapters' job), route or store
//! messages (the core's), or print, parse arguments or install signal handlers (the
//! binary's): it is a library, so tests can run a broker in-process on port 0.

pub mod allocator;
mod auth_http;
mod auth_jwt;
pub mod cluster;
pub mod config;
pub mod config_auth;
pub mod config_tls;
mod listener;
pub mod memory;
/// The WebSocket transport, now in the transport layer.
pub use switchyard_transport::ws;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_amqp::AmqpSettings;
use switchyard_core::Broker;
use switchyard_store::DiskStore;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::{Config, ConfigError};

use listener::Protocol;
use switchyard_transport::{
    AcceptLoop, CertLoginFrom, Deadlines, HttpIncoming, TlsContext, Transport, WsOptions,
};

/// How long [`RunningServer::shutdown`] waits for connections to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create data_dir {path}: {error}")]
    DataDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot open the store in {path}: {error}")]
    Store {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot start the cluster node (listen {listen}): {error}")]
    Cluster {
        listen: String,
        error: std::io::Error,
    },
    #[error("cannot listen for {protocol} on {addr}: {error}")]
    Bind {
        protocol: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A started server. Dropping it stops the listeners and tells every connection
/// to close, without waiting; [`RunningServer::shutdown`] also waits.
pub struct RunningServer {
    broker: Arc<Broker>,
    addrs: BTreeMap<&'static str, SocketAddr>,
    shutdown: CancellationToken,
    accept_loops: Vec<JoinHandle<()>>,
    connections: TaskTracker,
    limit: Arc<Semaphore>,
    max_connections: usize,
    store: Arc<DiskStore>,
    /// The TLS listeners' configuration, when there are any.
    tls: Option<Arc<TlsContext>>,
    /// This node's part of the cluster, when `[cluster]` is set.
    cluster: Option<switchyard_cluster::Cluster>,
    /// Cancels `shutdown` when the server is dropped without `shutdown()`.
    _cancel_on_drop: DropGuard,
}

/// The AMQP adapter's settings from `[limits]`.
pub fn amqp_settings(config: &Config) -> AmqpSettings {
    let l = &config.limits;
    AmqpSettings {
        frame_max: l.frame_max,
        // Both were range-checked by `Config::validate`; saturate rather than trust it.
        channel_max: u16::try_from(l.channel_max).unwrap_or(u16::MAX),
        heartbeat: u16::try_from(l.heartbeat_secs).unwrap_or(u16::MAX),
        max_message_size: l.max_message_size,
        handshake_timeout: l.handshake_timeout(),
        max_unacked_per_connection: l.max_unacked_per_connection,
    }
}

/// The Stream protocol adapter's settings from `[stream]` and `[limits]`.
pub fn stream_settings(config: &Config) -> switchyard_stream::StreamSettings {
    let st = &config.stream;
    switchyard_stream::StreamSettings {
        frame_max: st.frame_max,
        heartbeat: st.heartbeat,
        handshake_timeout: config.limits.handshake_timeout(),
        advertised_host: st.advertised_host.clone(),
        advertised_port: st.advertised_port,
    }
}

/// The STOMP adapter's settings from `[stomp]` and `[limits]`.
pub fn stomp_settings(config: &Config) -> switchyard_stomp::StompSettings {
    let st = &config.stomp;
    let default_login =
        (!st.default_user.is_empty()).then(|| (st.default_user.clone(), st.default_pass.clone()));
    switchyard_stomp::StompSettings {
        limits: switchyard_stomp::codec::Limits {
            max_headers: st.max_headers,
            max_header_length: st.max_header_length,
            max_body: st.max_frame_size.min(config.limits.max_message_size),
        },
        default_vhost: st.default_vhost.clone(),
        default_login,
        heartbeat_min: Duration::from_millis(st.heartbeat_min_ms),
        handshake_timeout: config.limits.handshake_timeout(),
    }
}

/// The WebSocket endpoint of STOMP: its path, the STOMP subprotocols in order of
/// preference, and a message limit that leaves room for a whole frame's head.
fn stomp_ws_options(config: &Config) -> ws::WsOptions {
    let limits = stomp_settings(config).limits;
    ws::WsOptions {
        path: config.stomp.ws_path.clone(),
        subprotocols: vec!["v12.stomp", "v11.stomp", "v10.stomp"],
        max_message_size: limits
            .max_body
            .saturating_add(limits.max_headers.saturating_mul(limits.max_header_length))
            .saturating_add(64),
    }
}

/// The MQTT adapter's settings from `[mqtt]` and `[limits]`.
pub fn mqtt_settings(config: &Config) -> switchyard_mqtt::MqttSettings {
    let m = &config.mqtt;
    switchyard_mqtt::MqttSettings {
        exchange: m.exchange.clone(),
        default_vhost: m.default_vhost.clone(),
        lossless_vhosts: m.lossless_topic_vhosts.clone(),
        allow_anonymous: m.allow_anonymous,
        anonymous_user: m.anonymous_user.clone(),
        max_packet_size: m.max_packet_size,
        max_packet_size_unauthenticated: m.max_packet_size_unauthenticated,
        max_keep_alive_secs: m.max_keep_alive_secs,
        max_session_expiry_secs: m.max_session_expiry_secs,
        receive_maximum: m.receive_maximum,
        max_inflight: m.max_inflight_messages,
        max_queued: m.max_queued_messages,
        topic_alias_maximum: m.topic_alias_maximum,
        handshake_timeout: config.limits.handshake_timeout(),
        sys_interval: Duration::from_secs(m.sys_interval_secs),
    }
}

/// The WebSocket endpoint of MQTT: its path, the subprotocols MQTT clients
/// offer (`mqtt` for 3.1.1/5.0, `mqttv3.1` for 3.1), and a message limit of one
/// whole packet (a packet may still span several messages).
fn mqtt_ws_options(config: &Config) -> ws::WsOptions {
    ws::WsOptions {
        path: config.mqtt.ws_path.clone(),
        subprotocols: vec!["mqtt", "mqttv3.1"],
        max_message_size: config.mqtt.max_packet_size.saturating_add(16),
    }
}

/// Bodies recovery keeps in memory: half the memory watermark, where queues start
/// keeping bodies on disk anyway (the store's default when the alarm is off).
fn resident_budget(high_watermark: usize) -> usize {
    if high_watermark == 0 {
        switchyard_store::DEFAULT_RESIDENT_BUDGET
    } else {
        high_watermark / 2
    }
}

/// How often free disk space is checked.
const DISK_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Sets the broker's disk alarm while the file system holding `data_dir` has less
/// than `limit` bytes free. Runs until shutdown.
async fn watch_disk(
    data_dir: PathBuf,
    limit: u64,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
) {
    loop {
        let dir = data_dir.clone();
        // statvfs is a blocking system call; it is quick, but keep it off the
        // reactor threads all the same.
        match tokio::task::spawn_blocking(move || fs4::available_space(&dir)).await {
            Ok(Ok(free)) => broker.memory.set_disk_alarm(free < limit, free, limit),
            Ok(Err(e)) => warn!(error = %e, "cannot read free disk space"),
            Err(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(DISK_CHECK_INTERVAL) => {}
        }
    }
}

/// Binds `addr`; port 0 picks a free port.
async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Reloads the TLS files for new connections when their modification time
/// changes; checks every `every` until shutdown.
async fn watch_tls(tls: Arc<TlsContext>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let ctx = tls.clone();
        // Reading files blocks; keep it off the reactor threads.
        match tokio::task::spawn_blocking(move || ctx.reload_if_changed()).await {
            Ok(Some(Ok(()))) => info!("TLS certificates reloaded (files changed)"),
            Ok(Some(Err(e))) => {
                warn!(error = %e, "TLS certificates changed but do not load; keeping the previous ones");
            }
            Ok(None) | Err(_) => {}
        }
    }
}

/// Builds the broker from `config`, creates `data_dir` and binds every configured
/// listener. Must be called inside a tokio runtime; the accept loops run on it.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    config.validate()?;
    if let Some(c) = &config.cluster {
        // Peers, /api/nodes and the queues' `node` name it as the cluster does.
        switchyard_core::stats::process::set_node_name(&c.node);
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|error| ServerError::DataDir {
        path: config.data_dir.clone(),
        error,
    })?;

    let high_watermark = memory::watermark(
        config.limits.memory_high_watermark_bytes,
        config.limits.memory_high_watermark_relative,
    )
    .unwrap_or_else(|| {
        warn!("cannot read the machine's memory size: memory_high_watermark_relative ignored, using 1 GiB");
        1 << 30
    });
    let store_dir = config.data_dir.join("store");
    let (store, recovered, report) = DiskStore::open_with(
        &store_dir,
        switchyard_store::SEGMENT_SIZE,
        resident_budget(high_watermark),
    )
    .map_err(|error| ServerError::Store {
        path: store_dir.clone(),
        error,
    })?;
    info!(
        path = %store_dir.display(),
        exchanges = report.exchanges,
        queues = report.queues,
        bindings = report.bindings,
        messages = report.messages,
        truncated_segments = report.truncated_segments,
        "store opened"
    );
    let broker = Broker::open(
        store.clone(),
        recovered,
        high_watermark,
        switchyard_core::timer::Clock::System,
    )
    .map_err(|error| ServerError::Store {
        path: store_dir.clone(),
        error,
    })?;
    broker.auth.set_loopback_users(config.loopback_users());
    broker
        .connection_rate
        .set_rate(config.limits.connection_rate_per_ip);
    let backends = config.auth.backends().map_err(|message| {
        ServerError::Config(ConfigError::Invalid {
            origin: config.origin().to_owned(),
            message,
        })
    })?;
    broker.auth.set_backends(backends);
    apply_boot_definitions(&broker, &config)?;
    // Clustered: from here on, metadata commands go through the replicated log.
    let cluster = match &config.cluster {
        Some(c) => Some(
            c.start(
                &config.data_dir,
                broker.clone(),
                config.tls_settings().as_ref(),
            )
            .await
            .map_err(|error| ServerError::Cluster {
                listen: c.listen.clone(),
                error,
            })?,
        ),
        None => None,
    };

    let shutdown = CancellationToken::new();
    if high_watermark > 0 {
        // A first sample now: the alarm compares with measured memory from the
        // first connection on.
        if let Some(rss) = memory::resident_bytes() {
            broker.memory.measured(rss);
        }
        tokio::spawn(memory::watch(broker.clone(), shutdown.clone()));
    }
    if config.limits.disk_free_limit_bytes > 0 {
        tokio::spawn(watch_disk(
            config.data_dir.clone(),
            config.limits.disk_free_limit_bytes,
            broker.clone(),
            shutdown.clone(),
        ));
    }

    // The TLS configuration shared by every TLS listener; loaded before anything
    // is bound, so bad files stop the start with their reason.
    let tls = match config.tls_settings() {
        Some(settings) if config.has_tls_listener() => {
            Some(TlsContext::load(settings).map_err(|e| {
                ServerError::Config(ConfigError::Invalid {
                    origin: config.origin().to_owned(),
                    message: format!("[tls]: {e}"),
                })
            })?)
        }
        _ => None,
    };
    // Certificate login only where client certificates are verified (RabbitMQ
    // refuses it otherwise: "TLS configuration is unsafe").
    let cert_login =
        (config.tls.verify_peer).then(|| CertLoginFrom::from(config.auth.ssl_cert_login_from));
    let tls_transport = || tls.clone().map(Transport::Tls);
    let wss_transport = |ws: WsOptions| tls.clone().map(|t| Transport::Wss(t, Arc::new(ws)));

    // What each listener speaks: its name (the ready file's key), protocol,
    // transport and address.
    let mut wanted: Vec<(&'static str, Protocol, Transport, SocketAddr)> = Vec::new();
    let amqp = Protocol::Amqp(Arc::new(amqp_settings(&config)));
    if let Some(addr) = config.listeners.amqp {
        wanted.push(("amqp", amqp.clone(), Transport::Tcp, addr));
    }
    if let (Some(addr), Some(t)) = (config.listeners.amqps, tls_transport()) {
        wanted.push(("amqps", amqp, t, addr));
    }
    // One MQTT state for TCP and WebSocket: a client id is one session whichever
    // way the client comes in.
    // Built after the broker recovered its queues: restored persistent sessions
    // name their (durable) subscription queues.
    let opened = switchyard_mqtt::MqttState::open(
        &broker,
        &config.mqtt.exchange,
        &config.mqtt.lossless_topic_vhosts,
    );
    let (mqtt_state, restored) = opened.map_err(|error| ServerError::Store {
        path: store_dir.clone(),
        error,
    })?;
    if restored.retained > 0 || restored.sessions > 0 {
        info!(
            retained = restored.retained,
            sessions = restored.sessions,
            "MQTT state restored"
        );
    }
    // A vhost deleted at runtime takes its MQTT sessions and retained messages
    // with it (their records go in the store's transaction; this is memory).
    let forget = mqtt_state.clone();
    broker.on_vhost_deleted(Arc::new(move |vhost: &str| forget.forget_vhost(vhost)));
    // The management API's MQTT view reads sessions and retained messages
    // through the core's protocol-neutral directory.
    broker.session_directories.register(mqtt_state.clone());
    let l = &config.listeners;
    let mqtt_enabled = [l.mqtt, l.mqtt_ws, l.mqtts, l.mqtt_wss]
        .iter()
        .any(Option::is_some);
    let mqtt = Protocol::Mqtt(Arc::new(mqtt_settings(&config)), mqtt_state.clone());
    if let Some(addr) = l.mqtt {
        wanted.push(("mqtt", mqtt.clone(), Transport::Tcp, addr));
    }
    if let Some(addr) = l.mqtt_ws {
        let ws = Transport::Ws(Arc::new(mqtt_ws_options(&config)));
        wanted.push(("mqtt_ws", mqtt.clone(), ws, addr));
    }
    if let (Some(addr), Some(t)) = (l.mqtts, tls_transport()) {
        wanted.push(("mqtts", mqtt.clone(), t, addr));
    }
    if let (Some(addr), Some(t)) = (l.mqtt_wss, wss_transport(mqtt_ws_options(&config))) {
        wanted.push(("mqtt_wss", mqtt, t, addr));
    }
    let stomp = Protocol::Stomp(Arc::new(stomp_settings(&config)));
    if let Some(addr) = l.stomp {
        wanted.push(("stomp", stomp.clone(), Transport::Tcp, addr));
    }
    if let Some(addr) = l.stomp_ws {
        let ws = Transport::Ws(Arc::new(stomp_ws_options(&config)));
        wanted.push(("stomp_ws", stomp.clone(), ws, addr));
    }
    if let (Some(addr), Some(t)) = (l.stomps, tls_transport()) {
        wanted.push(("stomps", stomp.clone(), t, addr));
    }
    if let (Some(addr), Some(t)) = (l.stomp_wss, wss_transport(stomp_ws_options(&config))) {
        wanted.push(("stomp_wss", stomp, t, addr));
    }
    let stream = Protocol::Stream(Arc::new(stream_settings(&config)));
    if let Some(addr) = l.stream {
        wanted.push(("stream", stream.clone(), Transport::Tcp, addr));
    }
    if let (Some(addr), Some(t)) = (l.streams, tls_transport()) {
        wanted.push(("streams", stream, t, addr));
    }
    if wanted.is_empty() {
        warn!("no listener is configured: nobody can connect");
    }

    // The HTTP listeners (management API + UI, its HTTPS twin, Prometheus), bound
    // with the others so a taken port fails the start just the same.
    let mut http_wanted = Vec::new();
    for (name, addr, transport) in [
        ("management", l.management, Some(Transport::Tcp)),
        ("management_tls", l.management_tls, tls_transport()),
        ("prometheus", l.prometheus, Some(Transport::Tcp)),
    ] {
        if let (Some(addr), Some(transport)) = (addr, transport) {
            http_wanted.push((name, transport, addr));
        }
    }

    // Bind everything before accepting anything, so a failure leaves nothing running.
    let mut bound = Vec::new();
    for (name, protocol, transport, addr) in wanted {
        let (tcp, local) = bind(addr).await.map_err(|error| ServerError::Bind {
            protocol: name,
            addr,
            error,
        })?;
        bound.push((name, protocol, transport, tcp, local));
    }
    let mut http = Vec::new();
    for (name, transport, addr) in http_wanted {
        let (tcp, local) = bind(addr).await.map_err(|error| ServerError::Bind {
            protocol: name,
            addr,
            error,
        })?;
        http.push((name, transport, tcp, local));
    }

    let connections = TaskTracker::new();
    // One cap for all listeners: it guards the process's file descriptors and memory.
    let limit = Arc::new(Semaphore::new(config.limits.max_connections));
    let deadlines = Deadlines {
        tls: config.tls.handshake_timeout(),
        websocket: config.limits.handshake_timeout(),
    };
    let mut addrs = BTreeMap::new();
    if let Some(c) = &cluster {
        addrs.insert("cluster", c.local_addr());
    }
    let mut accept_loops = Vec::new();
    for (name, protocol, transport, tcp, local) in bound {
        info!(protocol = name, addr = %local, "listening");
        addrs.insert(name, local);
        let accept = AcceptLoop {
            name,
            listener: tcp,
            transport,
            deadlines,
            limit: Some(limit.clone()),
            shutdown: shutdown.clone(),
            tasks: connections.clone(),
        };
        accept_loops.push(tokio::spawn(listener::serve(
            accept,
            protocol,
            broker.clone(),
            cert_login,
        )));
    }
    for (name, _, _, local) in &http {
        info!(protocol = *name, addr = %local, "listening");
        addrs.insert(*name, *local);
    }
    if !http.is_empty() {
        let mut node = switchyard_mgmt::NodeInfo::local();
        node.disk_free_limit = config.limits.disk_free_limit_bytes;
        node.data_dir = Some(config.data_dir.clone());
        if let (Some(c), Some(settings)) = (&cluster, &config.cluster) {
            node.cluster = Some(c.view());
            // RabbitMQ's default cluster name: its first node's name.
            if let Some((first, _)) = settings.seeds.first().and_then(|s| s.split_once('@')) {
                node.cluster_name = first.to_owned();
            }
        }
        node.listeners = addrs
            .iter()
            .map(|(name, addr)| switchyard_mgmt::ListenerInfo {
                protocol: listener_protocol(name).to_owned(),
                addr: *addr,
            })
            .collect();
        let state = switchyard_mgmt::Management::new(broker.clone(), node);
        for (name, transport, tcp, _) in http {
            let router = if name == "prometheus" {
                switchyard_mgmt::prometheus_router(state.clone())
            } else {
                switchyard_mgmt::management_router(state.clone())
            };
            // HTTP connections are not counted against limits.max_connections
            // (as before); the accept loop still gives them the handshake deadlines.
            let (incoming, accepting) = HttpIncoming::start(AcceptLoop {
                name,
                listener: tcp,
                transport,
                deadlines,
                limit: None,
                shutdown: shutdown.clone(),
                tasks: connections.clone(),
            });
            accept_loops.push(accepting);
            let stop = shutdown.clone();
            let header_timeout = config.limits.handshake_timeout();
            accept_loops.push(tokio::spawn(async move {
                let served = switchyard_mgmt::serve(
                    incoming,
                    router,
                    async move { stop.cancelled().await },
                    header_timeout,
                )
                .await;
                if let Err(e) = served {
                    warn!(protocol = name, error = %e, "HTTP listener failed");
                }
            }));
        }
    }
    if let Some(tls) = &tls {
        let every = Duration::from_secs(config.tls.reload_interval_secs);
        if !every.is_zero() {
            accept_loops.push(tokio::spawn(watch_tls(
                tls.clone(),
                every,
                shutdown.clone(),
            )));
        }
    }
    // Message TTL, queue expiry and delayed messages; stops with the listeners.
    accept_loops.push(tokio::spawn(run_timers(broker.clone(), shutdown.clone())));
    if mqtt_enabled {
        // Will delays, session expiry and retained-message expiry; stops with
        // the listeners on shutdown.
        accept_loops.push(tokio::spawn(
            mqtt_state
                .clone()
                .run_timers(broker.clone(), shutdown.clone()),
        ));
        let settings = Arc::new(mqtt_settings(&config));
        if !settings.sys_interval.is_zero() {
            // `$SYS` topics into every vhost, every `[mqtt] sys_interval_secs`.
            let interval = settings.sys_interval;
            accept_loops.push(tokio::spawn(mqtt_state.clone().run_sys(
                broker.clone(),
                settings,
                config.vhost_names(),
                interval,
                shutdown.clone(),
            )));
        }
    }

    Ok(RunningServer {
        broker,
        addrs,
        _cancel_on_drop: shutdown.clone().drop_guard(),
        shutdown,
        accept_loops,
        connections,
        limit,
        max_connections: config.limits.max_connections,
        store,
        tls,
        cluster,
    })
}

/// RabbitMQ's protocol name of a listener (what `/api/overview` lists and the
/// health checks match), from the ready-file key.
fn listener_protocol(name: &str) -> &str {
    match name {
        "mqtt_ws" => "http/web-mqtt",
        "stomp_ws" => "http/web-stomp",
        "management" => "http",
        "prometheus" => "http/prometheus",
        "amqps" => "amqp/ssl",
        "mqtts" => "mqtt/ssl",
        "stomps" => "stomp/ssl",
        "streams" => "stream/ssl",
        "mqtt_wss" => "https/web-mqtt",
        "stomp_wss" => "https/web-stomp",
        "management_tls" => "https",
        other => other,
    }
}

/// Creates the config file's vhosts, users, permissions and policies that the
/// store has never seen (see [`Config::boot_definitions`]), through the same
/// commands as runtime administration. A definition whose vhost or user was
/// deleted at runtime is skipped with a warning (and tried again next start).
fn apply_boot_definitions(broker: &Broker, config: &Config) -> Result<(), ServerError> {
    let mut created = 0;
    for (id, command) in config.boot_definitions()? {
        let what = command.describe();
        match broker.seed(&id, command) {
            Ok(true) => created += 1,
            Ok(false) => {}
            Err(e) if e.kind == switchyard_core::ErrorKind::NotFound => {
                warn!(definition = %what, error = %e, "boot definition skipped");
            }
            Err(e) => {
                return Err(ServerError::Config(ConfigError::Invalid {
                    origin: config.origin().to_owned(),
                    message: format!("{what}: {e}"),
                }))
            }
        }
    }
    if created > 0 {
        info!(created, "boot definitions applied");
    }
    Ok(())
}

/// Milliseconds since the Unix epoch: the time the core is given.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The one timer task of the core's queues: ticks the broker, then sleeps until
/// the earliest deadline any queue has, or until a queue reports an earlier one.
/// One task for all queues rather than a timer per message or queue: a broker
/// with no TTLs or delays wakes once a second and does nothing else.
async fn run_timers(broker: Arc<Broker>, shutdown: CancellationToken) {
    /// Longest sleep: bounds the damage of a missed wake-up (and of clock jumps).
    const MAX_SLEEP_MS: u64 = 1000;
    loop {
        // Statistics samples every 5 s (the rate rings of stats.rs); this task
        // wakes at least once a second, so no task of their own is needed.
        broker.sample_stats(unix_ms());
        let next = broker.tick(unix_ms());
        let wait = next
            .min(broker.timers().earliest())
            .saturating_sub(unix_ms())
            .clamp(1, MAX_SLEEP_MS);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(wait)) => {}
            () = broker.timers().changed() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

impl RunningServer {
    /// The address each listener is bound to, by protocol name (`"amqp"`).
    pub fn local_addrs(&self) -> BTreeMap<&'static str, SocketAddr> {
        self.addrs.clone()
    }

    /// The broker every connection shares.
    pub fn broker(&self) -> Arc<Broker> {
        self.broker.clone()
    }

    /// This node's cluster status (`None` without `[cluster]`).
    pub fn cluster_status(&self) -> Option<switchyard_cluster::Status> {
        self.cluster.as_ref().map(|c| c.status())
    }

    /// Connections open now, over all listeners.
    pub fn open_connections(&self) -> usize {
        self.max_connections
            .saturating_sub(self.limit.available_permits())
    }

    /// Reloads the TLS certificate files for new connections (SIGHUP). On error
    /// the previous certificates stay in use; `Ok(false)`: no TLS listener.
    pub fn reload_tls(&self) -> Result<bool, switchyard_transport::TlsError> {
        match &self.tls {
            Some(tls) => tls.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// A token cancelled when the server shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, tells every connection to close, and waits up to
    /// [`SHUTDOWN_GRACE`] for them. Returns whether all of them finished in time.
    pub async fn shutdown(self) -> bool {
        self.shutdown_within(SHUTDOWN_GRACE).await
    }

    /// [`RunningServer::shutdown`] with a chosen wait.
    pub async fn shutdown_within(self, grace: Duration) -> bool {
        self.shutdown.cancel();
        for accept_loop in self.accept_loops {
            // An accept loop that panicked has nothing left to stop.
            let _ = accept_loop.await;
        }
        // No new connection task can be spawned now.
        self.connections.close();
        let open = self.connections.len();
        if open > 0 {
            info!(connections = open, "waiting for connections to close");
        }
        let finished = tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_ok();
        if !finished {
            warn!(
                connections = self.connections.len(),
                ?grace,
                "connections still open after the shutdown grace period"
            );
        }
        if let Some(c) = self.cluster {
            c.shutdown().await;
        }
        // Whatever was appended is written and synced before the process ends.
        self.store.close();
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_config(dir: &std::path::Path) -> Config {
        let mut c = Config::embedded().unwrap();
        // The shipped ports may be taken on a test machine (Mosquitto, RabbitMQ).
        c.listeners
            .move_all_to_port_zero([127, 0, 0, 1].into())
            .unwrap();
        c.data_dir = dir.join("data");
        c
    }

    #[tokio::test]
    async fn binds_port_zero_creates_data_dir_and_shuts_down() {
        let dir = std::env::temp_dir().join(format!("switchyard-server-{}", std::process::id()));
        let server = start(local_config(&dir)).await.unwrap();
        assert!(dir.join("data").is_dir());
        let addr = server.local_addrs()["amqp"];
        assert_ne!(addr.port(), 0);
        // Every listener of the shipped config runs, each on a port of its own.
        let addrs = server.local_addrs();
        assert!(addrs.len() >= 5, "{addrs:?}");
        assert!(addrs.values().all(|a| a.ip().is_loopback()), "{addrs:?}");
        // Whether a connection ends in time on shutdown is the adapter's business;
        // here the listener must stop.
        drop(tokio::net::TcpStream::connect(addr).await.unwrap());
        assert!(server.broker().has_vhost("/"));
        server.shutdown_within(Duration::from_secs(1)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once() {
        use tokio::io::AsyncReadExt;
        let dir = std::env::temp_dir().join(format!("switchyard-cap-{}", std::process::id()));
        let mut c = local_config(&dir);
        c.limits.max_connections = 1;
        let server = start(c).await.unwrap();
        let addr = server.local_addrs()["amqp"];
        // Take the only permit here rather than with a first connection: the adapter
        // may end that one at once (it is a placeholder while it is being written).
        let permit = server.limit.clone().try_acquire_owned().unwrap();
        assert_eq!(server.open_connections(), 1);
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "over-cap connection must be closed");
        drop(permit);
        server.shutdown().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_taken_port_is_a_bind_error_naming_the_protocol() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = std::env::temp_dir().join(format!("switchyard-bind-{}", std::process::id()));
        let mut c = local_config(&dir);
        c.listeners.amqp = Some(taken.local_addr().unwrap());
        let e = start(c).await.err().unwrap().to_string();
        assert!(e.starts_with("cannot listen for amqp on 127.0.0.1:"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

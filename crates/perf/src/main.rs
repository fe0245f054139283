//! `switchyard-perf`: a load generator for AMQP 0-9-1, MQTT 3.1.1/5.0 and STOMP
//! brokers over TCP and WebSocket, in the spirit of rabbitmq-perf-test.
//!
//! It works against any broker of those protocols (Switchyard, RabbitMQ,
//! Mosquitto), measures throughput and end-to-end latency (a send timestamp in the
//! first 8 bytes of every body, recorded in an HDR histogram), optionally samples a
//! broker process's CPU time and memory from /proc, prints a progress line every
//! second and a table (or JSON) at the end.
//!
//! It must not: run without a bound (every run has a duration and stops by itself)
//! or talk to anything but loopback addresses.

mod amqp;
mod mqtt;
mod procstat;
mod report;
mod run;
mod stomp;
mod stream;
mod transport;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::time::Instant;

use crate::run::{Run, Settings, Shared, Topology};

use crate::transport::Transport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Amqp,
    Mqtt,
    Stomp,
    /// The RabbitMQ Stream protocol.
    Stream,
}

/// Load generator for AMQP 0-9-1, MQTT 3.1.1/5.0 and STOMP brokers (loopback only).
#[derive(Debug, Parser)]
#[command(name = "switchyard-perf", version)]
struct Cli {
    /// Protocol to speak.
    #[arg(long, value_enum, default_value = "amqp")]
    protocol: Protocol,
    /// TCP or WebSocket (MQTT and STOMP; AMQP is TCP only).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
    /// Broker host: a loopback address or `localhost`.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port (default: the protocol's usual port).
    #[arg(long)]
    port: Option<u16>,
    /// HTTP path for WebSocket.
    #[arg(long, default_value = "/ws")]
    ws_path: String,
    #[arg(long, default_value = "guest")]
    user: String,
    #[arg(long, default_value = "guest")]
    pass: String,
    /// AMQP vhost / STOMP host header.
    #[arg(long, default_value = "/")]
    vhost: String,
    /// Producer (publisher) connections.
    #[arg(short = 'x', long, default_value_t = 1)]
    producers: usize,
    /// Consumer (subscriber) connections.
    #[arg(short = 'y', long, default_value_t = 1)]
    consumers: usize,
    /// Body size in bytes (the first 8 carry the send timestamp).
    #[arg(short = 's', long, default_value_t = 16)]
    size: usize,
    /// Total publish rate over all producers, msg/s (default: unlimited).
    #[arg(short = 'r', long)]
    rate: Option<f64>,
    /// Confirm window: unconfirmed messages per producer (AMQP publisher confirms,
    /// MQTT QoS 1 in flight, STOMP receipts). Default: no confirms.
    #[arg(short = 'c', long)]
    confirm: Option<u64>,
    /// Consumer prefetch (AMQP basic.qos, STOMP prefetch-count); 0 = unlimited.
    #[arg(short = 'q', long, default_value_t = 0)]
    prefetch: u16,
    /// Manual acks, one `multiple` ack every N messages (default: autoack).
    #[arg(short = 'n', long)]
    multi_ack: Option<u64>,
    /// Persistent messages (AMQP delivery-mode 2 into a durable queue, STOMP persistent:true).
    #[arg(long)]
    persistent: bool,
    /// MQTT QoS of publishes and subscriptions (0 or 1).
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// MQTT protocol version: 3 (3.1.1) or 5.
    #[arg(long, default_value_t = 3)]
    mqtt_version: u8,
    /// How producers and consumers are wired.
    #[arg(long, value_enum, default_value = "queue")]
    topology: Topology,
    /// AMQP: route through a topic exchange with this many bindings.
    #[arg(long, default_value_t = 0)]
    topic_bindings: usize,
    /// Open this many idle connections (no producers or consumers unless given too).
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// AMQP channels per idle connection.
    #[arg(long, default_value_t = 2)]
    idle_channels: u16,
    /// Length of the measured run, seconds (1..=3600).
    #[arg(short = 'z', long, default_value_t = 10)]
    duration: u64,
    /// Client worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Sample this broker process's CPU time and memory from /proc.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Seconds to wait after the run before the broker's last sample, so that
    /// its memory is what stays (a backlog's cost), not what the run's last
    /// moments held for a while (buffers, a growing queue's old allocation).
    #[arg(long, default_value_t = 0.0)]
    settle: f64,
    /// A label for the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Print the result as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Stream protocol: use this stream (created if missing, kept after the run)
    /// instead of a new one per run; lets a run replay what an earlier one wrote.
    #[arg(long)]
    stream: Option<String>,
    /// AMQP, `--topology queue`: use this queue (declared if missing, kept after
    /// the run) instead of a new one per run; lets a run fill a queue that a
    /// broker restart and a later run drain.
    #[arg(long)]
    queue: Option<String>,
    /// Stream protocol: where consumers start (`next`, or `first` to replay).
    #[arg(long, value_parser = ["next", "first"], default_value = "next")]
    stream_offset: String,
    /// AMQP: the queue type to declare (`classic`; `quorum`: durable, replicated
    /// on a cluster; or `stream`: consumed with a prefetch and acks, from `next`).
    #[arg(long, value_parser = ["classic", "quorum", "stream"], default_value = "classic")]
    queue_type: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    // A hard bound on the whole run, setup included (100k bindings or 10k
    // connections take a while, a broker that stops answering must not hang us).
    let limit = Duration::from_secs(cli.duration.saturating_add(600));
    runtime.block_on(async move {
        match tokio::time::timeout(limit, run_cli(cli)).await {
            Ok(result) => result,
            Err(_) => bail!("gave up after {} s", limit.as_secs()),
        }
    })?;
    // Leftover tasks (idle sockets, readers) must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn resolve(host: &str) -> Result<IpAddr> {
    if host == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let ip: IpAddr = host
        .parse()
        .with_context(|| format!("--host {host}: give an IP address or localhost"))?;
    if !ip.is_loopback() {
        bail!("--host {host} is not a loopback address; switchyard-perf only targets this machine");
    }
    Ok(ip)
}

async fn run_cli(cli: Cli) -> Result<()> {
    if cli.duration == 0 || cli.duration > 3600 {
        bail!("--duration must be 1..=3600 seconds");
    }
    if cli.topology == Topology::Pairs && cli.producers != cli.consumers {
        bail!("--topology pairs needs as many producers as consumers");
    }
    if cli.protocol == Protocol::Amqp && cli.transport == Transport::Ws {
        bail!("AMQP over WebSocket is not supported");
    }
    if cli.mqtt_version != 3 && cli.mqtt_version != 5 {
        bail!("--mqtt-version is 3 or 5");
    }
    let port = cli.port.unwrap_or(match (cli.protocol, cli.transport) {
        (Protocol::Amqp, _) => 5672,
        (Protocol::Mqtt, Transport::Tcp) => 1883,
        (Protocol::Mqtt, Transport::Ws) => 15675,
        (Protocol::Stomp, Transport::Tcp) => 61613,
        (Protocol::Stomp, Transport::Ws) => 15674,
        (Protocol::Stream, _) => 5552,
    });
    if cli.protocol == Protocol::Stream && cli.transport == Transport::Ws {
        bail!("the Stream protocol over WebSocket is not supported");
    }
    if cli.queue_type == "stream" && (cli.prefetch == 0 || cli.multi_ack.is_none()) {
        bail!("--queue-type stream needs a prefetch (-q) and acks (-n), as RabbitMQ does");
    }
    let addr = SocketAddr::new(resolve(&cli.host)?, port);
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 1_000_000)
            .unwrap_or(0)
    );
    let settings = Settings {
        addr,
        transport: cli.transport,
        ws_path: cli.ws_path.clone(),
        user: cli.user.clone(),
        pass: cli.pass.clone(),
        vhost: cli.vhost.clone(),
        producers: cli.producers,
        consumers: cli.consumers,
        size: cli.size,
        rate: cli.rate.filter(|r| *r > 0.0),
        confirm: cli.confirm.filter(|w| *w > 0),
        prefetch: cli.prefetch,
        multi_ack: cli.multi_ack,
        persistent: cli.persistent,
        qos: cli.qos,
        mqtt_version: cli.mqtt_version,
        topology: cli.topology,
        topic_bindings: cli.topic_bindings,
        idle: cli.idle,
        idle_channels: cli.idle_channels,
        duration: Duration::from_secs(cli.duration),
        run_id,
        stream: cli.stream.clone(),
        queue: cli.queue.clone(),
        stream_first: cli.stream_offset == "first",
        queue_type: (cli.queue_type != "classic").then(|| cli.queue_type.clone()),
        text_stamp: cli.protocol == Protocol::Stomp,
    };
    let proto = cli.protocol;
    let run = Run::new(settings.clone());
    let mut errors = Vec::new();

    // Setup before the clock starts: declarations (100k bindings take a while).
    let setup_started = Instant::now();
    let has_traffic = settings.producers > 0 || settings.consumers > 0;
    if proto == Protocol::Amqp && has_traffic {
        amqp::setup(&run).await?;
    }
    if proto == Protocol::Stream && has_traffic {
        stream::setup(&run).await?;
    }
    let setup_secs = setup_started.elapsed().as_secs_f64();

    // Idle connections first, so the memory they cost is measured on its own.
    let before_idle = cli.broker_pid.map(procstat::sample).transpose()?;
    let mut idle_conns = Vec::new();
    let mut idle_secs = 0.0;
    let mut after_idle = None;
    if settings.idle > 0 {
        let started = Instant::now();
        idle_conns = open_idle(&run, proto, settings.idle).await?;
        idle_secs = started.elapsed().as_secs_f64();
        // Let the broker settle (lazy allocations, GC) before sampling.
        tokio::time::sleep(Duration::from_secs(2)).await;
        after_idle = cli.broker_pid.map(procstat::sample).transpose()?;
        if !cli.quiet {
            eprintln!(
                "opened {} idle connections in {idle_secs:.1} s",
                idle_conns.len()
            );
        }
    }

    // Consumers subscribe before the window starts, so it measures steady state.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(settings.consumers.max(1));
    let mut consumers = Vec::new();
    for i in 0..settings.consumers {
        let run = run.clone();
        let ready = ready_tx.clone();
        consumers.push(tokio::spawn(async move {
            match proto {
                Protocol::Amqp => amqp::consumer(run, i, ready).await,
                Protocol::Mqtt => mqtt::subscriber(run, i, ready).await,
                Protocol::Stomp => stomp::consumer(run, i, ready).await,
                Protocol::Stream => stream::consumer(run, i, ready).await,
            }
        }));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < settings.consumers {
        match tokio::time::timeout(Duration::from_secs(120), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if ready < settings.consumers {
        run.stop.send_replace(true);
        for c in consumers {
            c.await??;
        }
        bail!(
            "only {ready} of {} consumers subscribed",
            settings.consumers
        );
    }

    if let Some(pid) = cli.broker_pid {
        procstat::reset_peak(pid);
    }
    let broker_start = cli.broker_pid.map(procstat::sample).transpose()?;
    let client_start = procstat::sample_self()?;
    let machine_start = procstat::machine_busy_secs()?;
    let started = Instant::now();
    let mut producers = Vec::new();
    for i in 0..settings.producers {
        let run = run.clone();
        producers.push(tokio::spawn(async move {
            match proto {
                Protocol::Amqp => amqp::producer(run, i).await,
                Protocol::Mqtt => mqtt::publisher(run, i).await,
                Protocol::Stomp => stomp::producer(run, i).await,
                Protocol::Stream => stream::producer(run, i).await,
            }
        }));
    }

    // The window, with a progress line every second.
    let end = started + settings.duration;
    let mut last = (0u64, 0u64, 0u64);
    let mut tick = started;
    while Instant::now() < end {
        tick = (tick + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(tick).await;
        let c = &run.counters;
        let now = (
            c.sent.load(Ordering::Relaxed),
            c.confirmed.load(Ordering::Relaxed),
            c.received.load(Ordering::Relaxed),
        );
        if !cli.quiet {
            eprintln!(
                "[{:>5.1}s] sent {:>9} msg/s  confirmed {:>9} msg/s  received {:>9} msg/s",
                started.elapsed().as_secs_f64(),
                now.0 - last.0,
                now.1 - last.1,
                now.2 - last.2
            );
        }
        last = now;
        if producers.iter().any(|p| p.is_finished()) || consumers.iter().any(|c| c.is_finished()) {
            // A client died early: stop now and report its error.
            break;
        }
    }
    run.stop.send_replace(true);
    let window = started.elapsed().as_secs_f64();
    let c = &run.counters;
    let busy = (run.epoch + Duration::from_nanos(c.last_received_ns.load(Ordering::Relaxed)))
        .saturating_duration_since(started)
        .as_secs_f64()
        .min(window);
    let (sent, confirmed, nacked, received, bytes) = (
        c.sent.load(Ordering::Relaxed),
        c.confirmed.load(Ordering::Relaxed),
        c.nacked.load(Ordering::Relaxed),
        c.received.load(Ordering::Relaxed),
        c.received_bytes.load(Ordering::Relaxed),
    );
    if cli.broker_pid.is_some() && cli.settle > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(cli.settle.min(60.0))).await;
    }
    let broker_end = cli.broker_pid.map(procstat::sample).transpose()?;
    let client_end = procstat::sample_self()?;
    let machine_end = procstat::machine_busy_secs()?;

    let mut hist = run::histogram()?;
    for p in producers {
        match tokio::time::timeout(Duration::from_secs(10), p).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => errors.push(format!("producer: {e:#}")),
            Ok(Err(e)) => errors.push(format!("producer task: {e}")),
            Err(_) => errors.push("producer did not stop within 10 s".into()),
        }
    }
    for h in consumers {
        match tokio::time::timeout(Duration::from_secs(10), h).await {
            Ok(Ok(Ok(h))) => {
                let _ = hist.add(h);
            }
            Ok(Ok(Err(e))) => errors.push(format!("consumer: {e:#}")),
            Ok(Err(e)) => errors.push(format!("consumer task: {e}")),
            Err(_) => errors.push("consumer did not stop within 10 s".into()),
        }
    }
    drop(idle_conns);
    if proto == Protocol::Amqp && has_traffic {
        if let Err(e) = amqp::teardown(&run).await {
            errors.push(format!("teardown: {e:#}"));
        }
    }
    if proto == Protocol::Stream && has_traffic {
        if let Err(e) = stream::teardown(&run).await {
            errors.push(format!("teardown: {e:#}"));
        }
    }

    let secs = window.max(1e-9);
    let broker = match (cli.broker_pid, broker_start, broker_end) {
        (Some(pid), Some(s), Some(e)) => Some(report::broker(
            pid,
            s,
            e,
            before_idle,
            after_idle,
            settings.idle,
            received,
        )),
        _ => None,
    };
    let report = report::Report {
        label: cli.label.clone(),
        protocol: proto,
        transport: settings.transport,
        producers: settings.producers,
        consumers: settings.consumers,
        size: settings.size,
        rate_target: settings.rate,
        confirm: settings.confirm,
        prefetch: settings.prefetch,
        multi_ack: settings.multi_ack,
        persistent: settings.persistent,
        qos: settings.qos,
        mqtt_version: settings.mqtt_version,
        topology: settings.topology,
        topic_bindings: settings.topic_bindings,
        idle: settings.idle,
        duration_secs: window,
        setup_secs,
        idle_open_secs: idle_secs,
        sent,
        confirmed,
        nacked,
        received,
        send_rate: sent as f64 / secs,
        confirm_rate: confirmed as f64 / secs,
        recv_rate: received as f64 / secs,
        recv_mb_per_sec: bytes as f64 / secs / 1e6,
        recv_busy_secs: busy,
        recv_busy_rate: if busy > 0.0 {
            received as f64 / busy
        } else {
            0.0
        },
        latency: report::Latency::from(&hist),
        broker,
        client_cpu_secs: client_end.cpu_secs - client_start.cpu_secs,
        other_cpu_secs: broker_cpu_other(
            machine_end - machine_start,
            client_end.cpu_secs - client_start.cpu_secs,
            broker_start
                .zip(broker_end)
                .map(|(s, e)| e.cpu_secs - s.cpu_secs),
        ),
        client_threads: cli.threads,
        errors,
    };
    if cli.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print_table();
    }
    Ok(())
}

/// CPU seconds used during the window by processes other than the broker and this
/// tool (None without a broker pid): how noisy the shared machine was.
fn broker_cpu_other(machine: f64, client: f64, broker: Option<f64>) -> Option<f64> {
    broker.map(|b| (machine - client - b).max(0.0))
}

/// Connections held open, doing nothing, until dropped.
#[allow(dead_code)] // held only for their sockets
enum IdleConn {
    Amqp(amqp::Conn),
    Mqtt(mqtt::Conn),
    Stomp(stomp::Conn),
    Stream(stream::Conn),
}

/// Opens `n` idle connections, 64 handshakes at a time.
async fn open_idle(run: &Shared, proto: Protocol, n: usize) -> Result<Vec<IdleConn>> {
    use futures_util::StreamExt;
    let channels = run.settings.idle_channels;
    let id = run.settings.run_id.clone();
    let opened: Vec<Result<IdleConn>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let run = run.clone();
            let id = id.clone();
            async move {
                Ok(match proto {
                    Protocol::Amqp => IdleConn::Amqp(amqp::Conn::open(&run, channels).await?),
                    Protocol::Mqtt => IdleConn::Mqtt(
                        mqtt::Conn::open(&run, &format!("perf-idle-{id}-{i}"), true).await?,
                    ),
                    Protocol::Stomp => IdleConn::Stomp(stomp::Conn::open(&run).await?),
                    Protocol::Stream => IdleConn::Stream(stream::Conn::open(&run).await?),
                })
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    opened.into_iter().collect()
}

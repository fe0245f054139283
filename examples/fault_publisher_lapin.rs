//! A lapin 4 publisher with confirms for the cluster fault matrix
//! (`tests/cluster_faults`, issue 14). It behaves like the pika publishers of
//! `tests/cluster_faults/workload.py`: persistent messages to the default
//! exchange with the queue as routing key, body `{"p": <producer>, "s": <seq>}`,
//! at most `--window` unconfirmed at `--rate` msg/s. When the connection or the
//! channel fails, or the oldest unconfirmed message waits longer than
//! `--confirm-timeout`, it moves to the next node and resends every unconfirmed
//! message in order; a nack resends that message (as the pika publisher does).
//!
//! It reports to the harness on stdout, one line per event, flushed at once (the
//! harness timestamps a line when it reads it):
//!
//! ```text
//! A <seq>      published (attempted)
//! C <seq>      confirmed by basic.ack
//! N <seq>      basic.nack (the message goes again)
//! E <text>     a connection event (connected, dropped and why)
//! ```
//!
//! It stops when its stdin reaches end of file or reads `stop`.
//!
//! ```sh
//! cargo run --example fault_publisher_lapin -- --pid 200 --queue q \
//!     --addrs 10.213.0.11:5672,10.213.0.12:5672,10.213.0.13:5672
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{BufRead, Write};
use std::time::Duration;

use clap::Parser;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Setup steps (connect, channel, confirm.select) that take longer than this fail.
const STEP_TIMEOUT: Duration = Duration::from_secs(6);

#[derive(Debug, Parser)]
#[command(about = "lapin publisher with confirms for tests/cluster_faults")]
struct Args {
    /// Producer id, the `p` of every body.
    #[arg(long)]
    pid: u64,
    /// Comma-separated host:port of every node's AMQP listener.
    #[arg(long, value_delimiter = ',', required = true)]
    addrs: Vec<String>,
    /// The queue (routing key on the default exchange).
    #[arg(long)]
    queue: String,
    /// Messages per second.
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Unconfirmed messages at most.
    #[arg(long, default_value_t = 10)]
    window: usize,
    /// Seconds the oldest unconfirmed message may wait before moving to the next node.
    #[arg(long, default_value_t = 5.0)]
    confirm_timeout: f64,
    /// Index into --addrs of the first node.
    #[arg(long, default_value_t = 0)]
    start_node: usize,
    /// AMQP heartbeat, seconds.
    #[arg(long, default_value_t = 5)]
    heartbeat: u16,
}

/// Line-per-event output to the harness.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    // The harness went away: nothing left to tell; stdin's end stops us.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct Publisher {
    args: Args,
    next_seq: u64,
    /// Unconfirmed messages to publish (again) before new ones, in order.
    resend: VecDeque<u64>,
    /// Our own id of each publish in flight -> (seq, sent at).
    outstanding: BTreeMap<u64, (u64, Instant)>,
    next_id: u64,
    stop: watch::Receiver<bool>,
}

enum Ended {
    Stopped,
    Failed(String),
}

impl Publisher {
    async fn run(mut self) {
        let mut node = self.args.start_node % self.args.addrs.len();
        loop {
            let addr = self.args.addrs.get(node).cloned().unwrap_or_default();
            let ended = self.session(&addr).await;
            // Whatever was not confirmed goes again, in order, on the next node.
            let pending: BTreeSet<u64> = self
                .outstanding
                .values()
                .map(|(seq, _)| *seq)
                .chain(self.resend.iter().copied())
                .collect();
            self.outstanding.clear();
            self.resend = pending.into_iter().collect();
            match ended {
                Ended::Stopped => {
                    emit("E stopped");
                    return;
                }
                Ended::Failed(why) => emit(&format!("E session on {addr}: {why}")),
            }
            if *self.stop.borrow() {
                return;
            }
            node = (node + 1) % self.args.addrs.len();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn session(&mut self, addr: &str) -> Ended {
        let uri = format!(
            "amqp://guest:guest@{addr}/%2f?heartbeat={}&connection_timeout=3000",
            self.args.heartbeat
        );
        let conn = match step(Connection::connect(&uri, ConnectionProperties::default())).await {
            Ok(c) => c,
            Err(e) => return Ended::Failed(format!("connect: {e}")),
        };
        let ch = match step(conn.create_channel()).await {
            Ok(c) => c,
            Err(e) => return Ended::Failed(format!("channel.open: {e}")),
        };
        if let Err(e) = step(ch.confirm_select(ConfirmSelectOptions::default())).await {
            return Ended::Failed(format!("confirm.select: {e}"));
        }
        let host = addr.split(':').next().unwrap_or(addr);
        emit(&format!("E publishing via {host}"));

        let (tx, mut confirms) = mpsc::unbounded_channel::<(u64, lapin::Result<Confirmation>)>();
        let window = self.args.window.max(1);
        let confirm_timeout = Duration::from_secs_f64(self.args.confirm_timeout);
        let mut tokens = 0.0f64;
        let mut last = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    // Dropping the connection closes it in the background; a stalled
                    // peer never answers a close.
                    return Ended::Stopped;
                }
                Some((id, result)) = confirms.recv() => {
                    let Some((seq, _)) = self.outstanding.remove(&id) else { continue };
                    match result {
                        Ok(Confirmation::Ack(_)) => emit(&format!("C {seq}")),
                        Ok(Confirmation::Nack(_)) => {
                            emit(&format!("N {seq}"));
                            self.resend.push_back(seq);
                        }
                        Ok(Confirmation::NotRequested) => {
                            self.outstanding.insert(id, (seq, Instant::now()));
                            return Ended::Failed("publish not confirmed (confirms off?)".into());
                        }
                        Err(e) => {
                            self.outstanding.insert(id, (seq, Instant::now()));
                            return Ended::Failed(format!("confirm: {e}"));
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if let Some(oldest) = self.outstanding.values().map(|(_, t)| *t).min() {
                        let waited = now.saturating_duration_since(oldest);
                        if waited > confirm_timeout {
                            return Ended::Failed(format!("no confirm for {:.1} s", waited.as_secs_f64()));
                        }
                    }
                    if !conn.status().connected() {
                        return Ended::Failed("connection closed".into());
                    }
                    if !ch.status().connected() {
                        return Ended::Failed("channel closed".into());
                    }
                    tokens = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.args.rate)
                        .min(window as f64);
                    last = now;
                    while tokens >= 1.0 && self.outstanding.len() < window {
                        let seq = match self.resend.pop_front() {
                            Some(seq) => seq,
                            None => {
                                self.next_seq += 1;
                                self.next_seq - 1
                            }
                        };
                        let id = self.next_id;
                        self.next_id += 1;
                        // In flight from here on: a failure below resends it.
                        self.outstanding.insert(id, (seq, now));
                        emit(&format!("A {seq}"));
                        let body = format!("{{\"p\": {}, \"s\": {seq}}}", self.args.pid);
                        let mut headers = FieldTable::default();
                        headers.insert("p".into(), AMQPValue::LongLongInt(self.args.pid as i64));
                        headers.insert("s".into(), AMQPValue::LongLongInt(seq as i64));
                        let props = BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_headers(headers);
                        let publish = ch.basic_publish(
                            "".into(),
                            self.args.queue.as_str().into(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            props,
                        );
                        let confirm = match tokio::time::timeout(confirm_timeout, publish).await {
                            Ok(Ok(confirm)) => confirm,
                            Ok(Err(e)) => return Ended::Failed(format!("basic.publish: {e}")),
                            Err(_) => return Ended::Failed("basic.publish stalled".into()),
                        };
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let _ = tx.send((id, confirm.await));
                        });
                        tokens -= 1.0;
                    }
                }
            }
        }
    }
}

/// A setup step with a bound.
async fn step<T>(fut: impl std::future::Future<Output = lapin::Result<T>>) -> Result<T, String> {
    match tokio::time::timeout(STEP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {} s", STEP_TIMEOUT.as_secs())),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(!args.addrs.is_empty(), "--addrs is empty");
    let (stop_tx, stop) = watch::channel(false);
    // stdin closes when the harness is done (or gone).
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) if l.trim() == "stop" => break,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        let _ = stop_tx.send(true);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(
        Publisher {
            args,
            next_seq: 0,
            resend: VecDeque::new(),
            outstanding: BTreeMap::new(),
            next_id: 0,
            stop,
        }
        .run(),
    );
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

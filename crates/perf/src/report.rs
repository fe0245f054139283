//! The result of a run: a human table on stdout, or JSON with `--json`.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procstat::Sample;

#[derive(Debug, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn from(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            samples: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Broker {
    pub pid: u32,
    /// CPU seconds the broker used during the measured window.
    pub cpu_secs: f64,
    /// Messages received by consumers per broker CPU second.
    pub msgs_per_cpu_sec: f64,
    pub rss_kb_start: u64,
    pub rss_kb_end: u64,
    /// Peak resident set since the broker started (VmHWM).
    pub hwm_kb: u64,
    /// Resident set added by the idle connections, per connection, in bytes.
    pub idle_bytes_per_conn: Option<f64>,
    /// Bytes the broker read in the window through system calls (page cache
    /// included), and from the disk itself.
    pub read_syscall_bytes: u64,
    pub disk_read_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub label: String,
    pub protocol: crate::Protocol,
    pub transport: crate::transport::Transport,
    pub producers: usize,
    pub consumers: usize,
    pub size: usize,
    pub rate_target: Option<f64>,
    pub confirm: Option<u64>,
    pub prefetch: u16,
    pub multi_ack: Option<u64>,
    pub persistent: bool,
    pub qos: u8,
    pub mqtt_version: u8,
    pub topology: crate::run::Topology,
    pub topic_bindings: usize,
    pub idle: usize,
    pub duration_secs: f64,
    pub setup_secs: f64,
    pub idle_open_secs: f64,
    pub sent: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub received: u64,
    pub send_rate: f64,
    pub confirm_rate: f64,
    pub recv_rate: f64,
    pub recv_mb_per_sec: f64,
    /// From the window's start to the last message counted: shorter than the
    /// window when consumers ran out of messages (a replay read to its end).
    pub recv_busy_secs: f64,
    /// Messages received per second over `recv_busy_secs`.
    pub recv_busy_rate: f64,
    pub latency: Latency,
    pub broker: Option<Broker>,
    /// CPU seconds this load generator used in the window (to show it is not the bottleneck).
    pub client_cpu_secs: f64,
    pub client_threads: usize,
    /// CPU seconds other processes used during the window (noise on a shared machine).
    pub other_cpu_secs: Option<f64>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn print_table(&self) {
        let mut rows: Vec<(&str, String)> = vec![
            ("scenario", self.label.clone()),
            (
                "protocol",
                format!("{:?} over {:?}", self.protocol, self.transport).to_lowercase(),
            ),
            (
                "clients",
                format!(
                    "{} producers, {} consumers, {} idle, topology {:?}",
                    self.producers, self.consumers, self.idle, self.topology
                ),
            ),
            ("duration", format!("{:.1} s", self.duration_secs)),
            ("setup", format!("{:.1} s", self.setup_secs)),
            (
                "sent",
                format!("{} ({:.0} msg/s)", self.sent, self.send_rate),
            ),
            (
                "confirmed",
                format!(
                    "{} ({:.0} msg/s), nacked {}",
                    self.confirmed, self.confirm_rate, self.nacked
                ),
            ),
            (
                "received",
                format!(
                    "{} ({:.0} msg/s, {:.1} MB/s)",
                    self.received, self.recv_rate, self.recv_mb_per_sec
                ),
            ),
            (
                "receiving",
                format!(
                    "for {:.2} s of the window ({:.0} msg/s over that time)",
                    self.recv_busy_secs, self.recv_busy_rate
                ),
            ),
            (
                "latency",
                format!(
                    "p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us ({} samples)",
                    self.latency.p50_us,
                    self.latency.p99_us,
                    self.latency.p999_us,
                    self.latency.max_us,
                    self.latency.samples
                ),
            ),
            ("client cpu", format!("{:.2} s", self.client_cpu_secs)),
            (
                "other processes' cpu",
                self.other_cpu_secs.map_or("-".into(), |c| {
                    format!("{c:.2} s (noise from the rest of the machine)")
                }),
            ),
        ];
        if let Some(b) = &self.broker {
            rows.push((
                "broker cpu",
                format!(
                    "{:.2} s ({:.0} msg per CPU second)",
                    b.cpu_secs, b.msgs_per_cpu_sec
                ),
            ));
            rows.push((
                "broker memory",
                format!(
                    "RSS {} -> {} kB, peak {} kB",
                    b.rss_kb_start, b.rss_kb_end, b.hwm_kb
                ),
            ));
            rows.push((
                "broker reads",
                format!(
                    "{} bytes by system calls, {} from disk",
                    b.read_syscall_bytes, b.disk_read_bytes
                ),
            ));
            if let Some(per) = b.idle_bytes_per_conn {
                rows.push(("per idle connection", format!("{:.0} bytes", per)));
            }
        }
        if self.idle > 0 {
            rows.push((
                "idle connections opened in",
                format!("{:.1} s", self.idle_open_secs),
            ));
        }
        for e in &self.errors {
            rows.push(("error", e.clone()));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            println!("{k:<width$}  {v}");
        }
    }
}

/// Broker figures from samples taken around the window (and around the idle
/// connections, if any).
pub fn broker(
    pid: u32,
    start: Sample,
    end: Sample,
    before_idle: Option<Sample>,
    after_idle: Option<Sample>,
    idle: usize,
    received: u64,
) -> Broker {
    let cpu = (end.cpu_secs - start.cpu_secs).max(0.0);
    let idle_bytes_per_conn = match (before_idle, after_idle) {
        (Some(b), Some(a)) if idle > 0 => {
            Some((a.rss_kb as f64 - b.rss_kb as f64) * 1024.0 / idle as f64)
        }
        _ => None,
    };
    Broker {
        pid,
        cpu_secs: cpu,
        msgs_per_cpu_sec: if cpu > 0.0 {
            received as f64 / cpu
        } else {
            0.0
        },
        rss_kb_start: start.rss_kb,
        rss_kb_end: end.rss_kb,
        hwm_kb: end.hwm_kb,
        idle_bytes_per_conn,
        read_syscall_bytes: end.rchar.saturating_sub(start.rchar),
        disk_read_bytes: end.read_bytes.saturating_sub(start.read_bytes),
    }
}

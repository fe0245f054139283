//! `$SYS` topics, as Mosquitto publishes them: broker facts and MQTT counters
//! that MQTT dashboards and monitoring scripts read.
//!
//! Every `[mqtt] sys_interval_secs` (0 = off) [`MqttState::run_sys`] publishes
//! them into each vhost as retained messages (QoS 0), so a new subscriber gets
//! the latest values at once. They never go through the MQTT exchange: AMQP and
//! STOMP consumers of `amq.topic` (say with `#`) never see them; they are put
//! straight into the queues of the MQTT subscriptions whose filter matches, and
//! kept in memory only (they describe the running broker, not durable state).
//! A filter starting with a wildcard never matches them (spec 4.7.2), and a
//! SUBSCRIBE to `$SYS/...` needs read permission on the resource `$SYS`
//! ([`SYS_RESOURCE`]; see the session). Clients may not publish to `$SYS`.
//!
//! The counters are Mosquitto's: `clients/*` count MQTT clients (sessions),
//! `messages/*` count MQTT packets of every kind, `publish/messages/*` PUBLISH
//! packets only; the load is an exponentially weighted per-minute rate.
//!
//! Must not: speak the protocol, hold a lock across `.await`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchyard_core::Broker;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{Properties, QoS};
use crate::mapping::{self, MqttMessage};
use crate::state::{unix_ms, MqttState};
use crate::MqttSettings;

/// The resource name whose read permission (as for an exchange: a regex of the
/// user's `read` permission in the vhost must match it) a SUBSCRIBE to a
/// `$SYS/...` filter needs. RabbitMQ checks reads from a topic exchange as
/// reads of a resource; `$SYS` is a source of its own, so it is a resource of
/// its own: `read = ".*"` allows it, `read = "^amq\.topic$|^mqtt-"` does not.
pub const SYS_RESOURCE: &str = "$SYS";

/// Whether `topic` (a name or a filter) is under `$SYS`.
pub fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// Broker-wide MQTT counters, updated by every connection (relaxed atomics:
/// they are statistics, read every few seconds).
#[derive(Debug, Default)]
pub struct SysStats {
    /// Connections attached to a session now.
    pub connected: AtomicUsize,
    /// MQTT packets received / sent, of every kind.
    pub packets_received: AtomicU64,
    pub packets_sent: AtomicU64,
    /// PUBLISH packets received / sent.
    pub publish_received: AtomicU64,
    pub publish_sent: AtomicU64,
}

impl SysStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// An exponentially weighted moving average of a per-minute rate over one
/// minute (Mosquitto's `load/.../1min`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    last_count: u64,
    last_at: Option<Instant>,
    value: f64,
}

impl Load {
    /// Takes the counter's value at `now`; returns the load.
    pub fn update(&mut self, count: u64, now: Instant) -> f64 {
        if let Some(at) = self.last_at {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            if secs > 0.0 {
                let per_minute = count.saturating_sub(self.last_count) as f64 * 60.0 / secs;
                let keep = (-secs / 60.0).exp();
                self.value = self.value * keep + per_minute * (1.0 - keep);
            }
        }
        self.last_count = count;
        self.last_at = Some(now);
        self.value
    }
}

/// The topics and values of one round, in publishing order.
#[derive(Debug, Clone, PartialEq)]
pub struct SysValues {
    pub uptime_secs: u64,
    pub connected: usize,
    pub total: usize,
    pub packets_received: u64,
    pub packets_sent: u64,
    pub publish_received: u64,
    pub publish_sent: u64,
    pub subscriptions: usize,
    pub retained: usize,
    pub load_received_1min: f64,
}

impl SysValues {
    pub fn topics(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "$SYS/broker/version",
                format!("switchyard version {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                "$SYS/broker/uptime",
                format!("{} seconds", self.uptime_secs),
            ),
            ("$SYS/broker/clients/connected", self.connected.to_string()),
            (
                "$SYS/broker/clients/disconnected",
                self.total.saturating_sub(self.connected).to_string(),
            ),
            ("$SYS/broker/clients/total", self.total.to_string()),
            (
                "$SYS/broker/messages/received",
                self.packets_received.to_string(),
            ),
            ("$SYS/broker/messages/sent", self.packets_sent.to_string()),
            (
                "$SYS/broker/publish/messages/received",
                self.publish_received.to_string(),
            ),
            (
                "$SYS/broker/publish/messages/sent",
                self.publish_sent.to_string(),
            ),
            (
                "$SYS/broker/subscriptions/count",
                self.subscriptions.to_string(),
            ),
            (
                "$SYS/broker/retained messages/count",
                self.retained.to_string(),
            ),
            (
                "$SYS/broker/load/messages/received/1min",
                format!("{:.2}", self.load_received_1min),
            ),
        ]
    }
}

impl MqttState {
    /// One round of `$SYS` at `now`: into each of `vhosts` that has the MQTT
    /// exchange, as retained messages (memory only) and into the queues of the
    /// MQTT subscriptions that match.
    pub fn publish_sys(
        &self,
        broker: &Broker,
        settings: &MqttSettings,
        vhosts: &[String],
        load: &mut Load,
        now: Instant,
        now_ms: u64,
    ) {
        let stats = &self.stats;
        let received = stats.packets_received.load(Ordering::Relaxed);
        let (total, subscriptions) = self.session_and_subscription_counts();
        let values = SysValues {
            uptime_secs: now.saturating_duration_since(self.started).as_secs(),
            connected: stats.connected.load(Ordering::Relaxed),
            total,
            packets_received: received,
            packets_sent: stats.packets_sent.load(Ordering::Relaxed),
            publish_received: stats.publish_received.load(Ordering::Relaxed),
            publish_sent: stats.publish_sent.load(Ordering::Relaxed),
            subscriptions,
            retained: self.retained.count_durable(),
            load_received_1min: load.update(received, now),
        };
        let topics = values.topics();
        for name in vhosts {
            let Ok(vhost) = broker.vhost(name) else {
                continue;
            };
            if vhost.exchange(&settings.exchange).is_err() {
                continue;
            }
            let lossless = settings.lossless_vhosts.contains(name);
            let subscribers = self.sys_subscriptions(name);
            for (topic, value) in &topics {
                let message = mapping::to_core(
                    MqttMessage {
                        topic: (*topic).to_owned(),
                        qos: QoS::AtMostOnce,
                        retain: true,
                        properties: Properties::default(),
                        payload: Bytes::from(value.clone()),
                    },
                    &settings.exchange,
                    lossless,
                    0,
                    now_ms,
                );
                self.retained.set_volatile(name, topic, message.clone());
                let mut queues: Vec<&str> = subscribers
                    .iter()
                    .filter(|(filter, _)| mapping::filter_matches(filter, topic))
                    .map(|(_, q)| q.as_str())
                    .collect();
                queues.sort_unstable();
                queues.dedup();
                for q in queues {
                    if let Ok(q) = vhost.queue(q) {
                        q.publish(message.clone());
                    }
                }
            }
        }
    }

    /// Publishes `$SYS` every `interval` until `shutdown` (the server spawns
    /// this once when `[mqtt] sys_interval_secs` is not 0); the first round
    /// goes at once.
    pub async fn run_sys(
        self: Arc<Self>,
        broker: Arc<Broker>,
        settings: Arc<MqttSettings>,
        vhosts: Vec<String>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut load = Load::default();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = every.tick() => self.publish_sys(&broker, &settings, &vhosts, &mut load, Instant::now(), unix_ms()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_a_one_minute_moving_average_of_the_rate_per_minute() {
        let t0 = Instant::now();
        let mut l = Load::default();
        assert_eq!(l.update(0, t0), 0.0);
        // 10 messages in 10 s is 60 a minute; after 10 s the average has moved
        // 1 - e^(-1/6) of the way there.
        let v = l.update(10, t0 + Duration::from_secs(10));
        assert!(
            (v - 60.0 * (1.0 - (-1.0f64 / 6.0).exp())).abs() < 1e-9,
            "{v}"
        );
        // A steady rate for long enough: close to it.
        let mut at = t0 + Duration::from_secs(10);
        let mut n = 10;
        for _ in 0..60 {
            at += Duration::from_secs(10);
            n += 10;
            l.update(n, at);
        }
        assert!((l.update(n, at) - 60.0).abs() < 0.1);
    }

    #[test]
    fn topics_are_mosquittos() {
        let v = SysValues {
            uptime_secs: 5,
            connected: 2,
            total: 3,
            packets_received: 10,
            packets_sent: 11,
            publish_received: 4,
            publish_sent: 6,
            subscriptions: 7,
            retained: 1,
            load_received_1min: 1.5,
        };
        let t = v.topics();
        let get = |name: &str| t.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        assert_eq!(get("$SYS/broker/uptime").as_deref(), Some("5 seconds"));
        assert_eq!(
            get("$SYS/broker/clients/disconnected").as_deref(),
            Some("1")
        );
        assert_eq!(
            get("$SYS/broker/load/messages/received/1min").as_deref(),
            Some("1.50")
        );
        assert!(t.iter().all(|(k, _)| is_sys(k)));
        assert!(!is_sys("$SYSTEM/x") && is_sys("$SYS/#"));
    }
}

//! The MQTT state as the management API sees it: sessions and retained
//! messages through the core's protocol-neutral [`SessionDirectory`].

use tokio::time::Instant;

use bytes::Bytes;
use switchyard_core::connections::protocol;
use switchyard_core::message::{Message, Properties};
use switchyard_core::sessions::{RetainedView, SessionDirectory, SessionView, SubscriptionView};
use switchyard_core::Broker;

use super::MqttState;

impl SessionDirectory for MqttState {
    fn protocol(&self) -> &'static str {
        "mqtt"
    }

    fn sessions(&self, broker: &Broker) -> Vec<SessionView> {
        let sessions: Vec<_> = self.sessions.lock().values().cloned().collect();
        let now = Instant::now();
        let mut out: Vec<SessionView> = sessions
            .iter()
            .map(|s| {
                let d = s.lock();
                let mut queues: Vec<&str> = d
                    .own_queues
                    .iter()
                    .map(String::as_str)
                    .chain(d.subscriptions.values().map(|s| s.queue.as_str()))
                    .collect();
                queues.sort_unstable();
                queues.dedup();
                let queued = broker.vhost(&d.key.vhost).map_or(0, |v| {
                    queues
                        .iter()
                        .filter_map(|q| v.queue(q).ok())
                        .map(|q| q.message_count())
                        .sum()
                });
                SessionView {
                    vhost: d.key.vhost.clone(),
                    client_id: d.key.client_id.clone(),
                    connected: d.owner.is_some(),
                    persistent: d.expiry_secs > 0,
                    expiry_secs: d.expiry_secs,
                    expires_in_ms: d.expires_at.map(|at| {
                        u64::try_from(at.saturating_duration_since(now).as_millis())
                            .unwrap_or(u64::MAX)
                    }),
                    protocol: match d.protocol_level {
                        3 => protocol::MQTT_31,
                        5 => protocol::MQTT_50,
                        _ => protocol::MQTT_311,
                    },
                    subscriptions: d
                        .subscriptions
                        .values()
                        .map(|s| SubscriptionView {
                            filter: s.filter.clone(),
                            qos: s.options.qos as u8,
                            share: s.share.clone(),
                            queue: s.queue.clone(),
                        })
                        .collect(),
                    queued,
                    in_flight: d.inflight.len(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.vhost, &a.client_id).cmp(&(&b.vhost, &b.client_id)));
        out
    }

    fn retained(&self, vhost: Option<&str>) -> Vec<RetainedView> {
        let map = self.retained.by_vhost.lock();
        map.iter()
            .filter(|(v, _)| vhost.is_none_or(|want| want == v.as_str()))
            .flat_map(|(v, topics)| {
                topics.values().map(move |r| RetainedView {
                    vhost: v.clone(),
                    topic: r.topic.clone(),
                    message: r.message.clone(),
                })
            })
            .collect()
    }

    fn delete_retained(&self, vhost: &str, topic: &str) -> std::io::Result<bool> {
        let exists = self
            .retained
            .by_vhost
            .lock()
            .get(vhost)
            .is_some_and(|v| v.contains_key(topic));
        if !exists {
            return Ok(false);
        }
        // An empty retained message clears the topic: the same path a client's
        // empty retained PUBLISH takes, store record included.
        let empty = Message::new("", topic, Properties::default(), Bytes::new());
        self.retained.set(vhost, topic, empty)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_messages_are_listed_and_deleted() {
        let state = MqttState::new();
        let msg = Message::new("amq.topic", "a.b", Properties::default(), Bytes::from("on"));
        state.retained.set("/", "a/b", msg).unwrap();
        let listed = state.retained(Some("/"));
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].topic, "a/b");
        assert!(state.retained(Some("other")).is_empty());
        assert!(state.delete_retained("/", "a/b").unwrap());
        assert!(!state.delete_retained("/", "a/b").unwrap());
        assert!(state.retained(None).is_empty());
    }
}

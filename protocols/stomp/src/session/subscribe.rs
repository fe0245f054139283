//! SUBSCRIBE and UNSUBSCRIBE, and the queues destinations stand for: declared on
//! first use for `/queue/`, server-named and bound for `/topic/` and
//! `/exchange/`, named from the subscription id for durable topic
//! subscriptions, private per session for `/temp-queue/`.

use std::sync::Arc;

use switchyard_core::auth::{Access, Resource};
use switchyard_core::consumer::{Consumer, ConsumerOptions};
use switchyard_core::queue::{Queue, QueueOptions};
use switchyard_core::vhost::QueueDeclare;
use switchyard_core::FieldTable;

use super::{AckMode, FrameError, Session, Subscription};
use crate::codec::{Frame, Version};
use crate::mapping::{Destination, QueueSpec, TOPIC_EXCHANGE};

/// Prefix of the queue behind a durable topic subscription without
/// `x-queue-name`: the id names it, so a reconnect with the same id resumes it.
pub const DURABLE_PREFIX: &str = "stomp-subscription-";

fn is_true(frame: &Frame, name: &str) -> bool {
    frame
        .get(name)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

impl Session {
    pub(super) fn subscribe(&mut self, frame: &Frame) -> Result<(), FrameError> {
        let dest = frame
            .get("destination")
            .ok_or_else(|| FrameError::missing_header("SUBSCRIBE", "destination"))?;
        // 1.0 made `id` optional; then the destination identifies the subscription.
        let explicit_id = frame.get("id");
        let id = match (explicit_id, self.version) {
            (Some(id), _) => id.to_owned(),
            (None, Version::V1_0) => dest.to_owned(),
            (None, _) => return Err(FrameError::missing_header("SUBSCRIBE", "id")),
        };
        if self.subscriptions.contains_key(&id) {
            return Err(FrameError::new(
                "duplicate subscription",
                format!("subscription id '{id}' is already in use on this connection"),
            ));
        }
        let ack = match frame.get("ack").unwrap_or("auto") {
            "auto" => AckMode::Auto,
            "client" => AckMode::Client,
            "client-individual" => AckMode::ClientIndividual,
            other => {
                return Err(FrameError::new(
                    "invalid header",
                    format!("ack:{other} is not one of auto, client, client-individual"),
                ))
            }
        };
        let prefetch = match frame.get("prefetch-count") {
            None => 0,
            Some(v) => v.trim().parse::<u32>().map_err(|_| {
                FrameError::new(
                    "invalid header",
                    format!("prefetch-count:{v} is not a non-negative integer"),
                )
            })?,
        };
        let durable = is_true(frame, "durable") || is_true(frame, "persistent");
        let destination = Destination::parse(dest)?;
        let queue = match destination {
            Destination::Queue(q) => self.ensure_queue(&q, &frame.headers, true)?,
            Destination::AmqQueue(q) => {
                let vhost = self.vhost()?;
                let queue = vhost.queue(&q)?;
                vhost.check_owner(&queue, self.id)?;
                queue
            }
            Destination::Topic(key) => {
                self.subscription_queue(frame, explicit_id, TOPIC_EXCHANGE, &key, durable)?
            }
            Destination::Exchange { exchange, key } => {
                self.vhost()?.exchange(&exchange)?;
                self.subscription_queue(frame, explicit_id, &exchange, &key, durable)?
            }
            Destination::TempQueue(_) | Destination::ReplyQueue(_) => {
                return Err(FrameError::new(
                    "invalid destination",
                    format!(
                        "cannot SUBSCRIBE to '{dest}': temp queues are subscribed by using them in reply-to"
                    ),
                ))
            }
        };
        self.check(Access::Read, Resource::Queue, &queue.name)?;
        let arguments = crate::mapping::stream_consumer_arguments(&frame.headers)?;
        self.add_subscription(id, queue, ack, prefetch, durable, arguments)
    }

    fn add_subscription(
        &mut self,
        id: String,
        queue: Arc<Queue>,
        ack: AckMode,
        prefetch: u32,
        durable: bool,
        arguments: FieldTable,
    ) -> Result<(), FrameError> {
        let consumer = Consumer::new(
            self.broker.next_id(),
            ConsumerOptions {
                tag: id.clone(),
                channel: 0,
                no_ack: ack == AckMode::Auto,
                exclusive: false,
                prefetch,
                arguments,
            },
            self.shared_credit.clone(),
            self.outbox.clone(),
        );
        // Deliveries go through the outbox, written after this frame's RECEIPT.
        queue.add_consumer(consumer.clone())?;
        self.subscriptions.insert(
            id,
            Subscription {
                consumer,
                queue,
                ack,
                durable,
            },
        );
        self.note_consumers();
        Ok(())
    }

    /// The queue of a `/topic/` or `/exchange/` subscription, bound to `exchange`
    /// with `key`. Durable (with an `id`): named from the id (or `x-queue-name`),
    /// durable, shared by reconnects. Otherwise server-named, exclusive and
    /// auto-delete: it goes with the subscription.
    fn subscription_queue(
        &mut self,
        frame: &Frame,
        explicit_id: Option<&str>,
        exchange: &str,
        key: &str,
        durable: bool,
    ) -> Result<Arc<Queue>, FrameError> {
        // Before the queue is declared: a refused subscription leaves nothing.
        self.check_topic(exchange, Access::Read, key)?;
        let spec = if durable {
            let Some(id) = explicit_id else {
                return Err(FrameError::new(
                    "missing header",
                    "a durable subscription needs an 'id' header: it names the subscription's queue",
                ));
            };
            let mut spec = QueueSpec::from_headers(&frame.headers, true, false, false)?;
            spec.name
                .get_or_insert_with(|| format!("{DURABLE_PREFIX}{id}"));
            spec
        } else {
            QueueSpec::from_headers(&frame.headers, false, true, true)?
        };
        let (name, server_named) = match spec.name.clone() {
            Some(n) => (n, false),
            None => (
                switchyard_core::vhost::VHost::generate_name("amq.gen-"),
                true,
            ),
        };
        let queue = self.declare(&name, spec, server_named)?;
        self.check(Access::Write, Resource::Queue, &queue.name)?;
        self.check(Access::Read, Resource::Exchange, exchange)?;
        self.vhost()?
            .bind_queue(&queue.name, exchange, key, FieldTable::new(), self.id)?;
        Ok(queue)
    }

    /// The queue behind `/queue/<q>`: used as it is when it exists and the frame
    /// asks for no particular properties; otherwise declared (durable, not
    /// exclusive, not auto-delete unless the headers say so), which checks an
    /// existing queue's properties as an AMQP declare would.
    ///
    /// `consume`: the queue is for a SUBSCRIBE, so another connection's exclusive
    /// queue is refused; a SEND may publish to it, as AMQP allows.
    pub(super) fn ensure_queue(
        &mut self,
        name: &str,
        headers: &[(String, String)],
        consume: bool,
    ) -> Result<Arc<Queue>, FrameError> {
        let spec = QueueSpec::from_headers(headers, true, false, false)?;
        let vhost = self.vhost()?;
        if !spec.explicit {
            if let Ok(q) = vhost.queue(name) {
                if consume {
                    vhost.check_owner(&q, self.id)?;
                }
                return Ok(q);
            }
        }
        self.declare(name, spec, false)
    }

    fn declare(
        &mut self,
        name: &str,
        spec: QueueSpec,
        server_named: bool,
    ) -> Result<Arc<Queue>, FrameError> {
        self.check(Access::Configure, Resource::Queue, name)?;
        let exclusive = spec.exclusive;
        let declared = self.vhost()?.declare_queue(QueueDeclare {
            name: name.to_owned(),
            passive: false,
            options: QueueOptions {
                durable: spec.durable,
                exclusive,
                auto_delete: spec.auto_delete,
                arguments: spec.arguments,
            },
            connection: self.id,
            server_named,
        })?;
        let queue = declared.queue;
        if exclusive && !self.owned_queues.iter().any(|q| Arc::ptr_eq(q, &queue)) {
            self.owned_queues.push(queue.clone());
        }
        Ok(queue)
    }

    /// The session's private queue for `/temp-queue/<id>`, created on first use
    /// and subscribed with subscription id `/temp-queue/<id>` (auto ack), so
    /// replies sent to its real name arrive on this connection.
    pub(super) fn temp_queue(&mut self, id: &str) -> Result<Arc<Queue>, FrameError> {
        if let Some(q) = self.temp_queues.get(id) {
            return Ok(q.clone());
        }
        let name = switchyard_core::vhost::VHost::generate_name("amq.gen-");
        let spec = QueueSpec {
            durable: false,
            auto_delete: true,
            exclusive: true,
            arguments: FieldTable::new(),
            name: None,
            explicit: true,
        };
        let queue = self.declare(&name, spec, true)?;
        let subscription = format!("/temp-queue/{id}");
        if !self.subscriptions.contains_key(&subscription) {
            self.add_subscription(
                subscription,
                queue.clone(),
                AckMode::Auto,
                0,
                false,
                FieldTable::new(),
            )?;
        }
        self.temp_queues.insert(id.to_owned(), queue.clone());
        Ok(queue)
    }

    pub(super) fn unsubscribe(&mut self, frame: &Frame) -> Result<(), FrameError> {
        let id = match (frame.get("id"), self.version) {
            (Some(id), _) => id,
            // 1.0 may name the subscription by its destination instead.
            (None, Version::V1_0) => frame
                .get("destination")
                .ok_or_else(|| FrameError::missing_header("UNSUBSCRIBE", "id"))?,
            (None, _) => return Err(FrameError::missing_header("UNSUBSCRIBE", "id")),
        }
        .to_owned();
        let sub = self.subscriptions.remove(&id);
        self.note_consumers();
        let sub = sub.ok_or_else(|| {
            FrameError::new(
                "unknown subscription",
                format!("there is no subscription with id '{id}' on this connection"),
            )
        })?;
        let vhost = self.vhost()?;
        sub.consumer.deactivate();
        // Its unacknowledged messages go back to the queue for other consumers.
        let (mine, rest): (Vec<_>, Vec<_>) =
            self.unacked.drain(..).partition(|u| u.subscription == id);
        self.unacked = rest.into();
        super::settle_entries(mine, super::Outcome::Requeue, Some(&vhost));
        vhost.cancel_consumer(&sub.queue, sub.consumer.id);
        if sub.durable && (is_true(frame, "durable") || is_true(frame, "persistent")) {
            // Ending a durable subscription for good deletes its queue.
            self.check(Access::Configure, Resource::Queue, &sub.queue.name)?;
            vhost.delete_queue(&sub.queue.name, false, false, self.id)?;
        }
        // An auto-delete queue went with its last consumer.
        self.owned_queues.retain(|q| !q.is_deleted());
        Ok(())
    }
}

//! One AMQP channel: its methods (exchange, queue, basic, confirm, tx), the
//! message being assembled from content frames, its consumers and its unacked
//! deliveries.
//!
//! A channel gets everything connection-wide through a [`Ctx`] of borrowed
//! session fields, so it never needs the whole session and the borrow checker
//! can see that a channel and the connection's output are disjoint.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use switchyard_core::auth::{Access, Resource, TopicRules};
use switchyard_core::consumer::{Consumer, ConsumerOptions, Credit, Delivery, Outbox};
use switchyard_core::deadletter::DeathReason;
use switchyard_core::exchange::ExchangeOptions;
use switchyard_core::queue::{Queue, QueueOptions, QueuedMessage};
use switchyard_core::stats::{ChannelState, SourceGuard, Stat};
use switchyard_core::vhost::{
    ExchangeDeclare, QueueDeclare, Routed, StreamWait, VHost, WaitState, DIRECT_REPLY_TO,
};
use switchyard_core::{message, Broker, Message, Properties};

use super::{ConnError, MethodError};
use crate::codec::{self, reply_code, Method};
use crate::AmqpSettings;

/// The connection-wide state a channel method may use or change.
pub(crate) struct Ctx<'a> {
    pub broker: &'a Arc<Broker>,
    pub vhost: &'a Arc<VHost>,
    pub user: &'a str,
    pub connection: u64,
    pub out: &'a mut switchyard_driver::Output,
    pub outbox: &'a Arc<Outbox>,
    pub frame_max: u32,
    pub exclusive_queues: &'a mut Vec<Arc<Queue>>,
    pub write_allowed: &'a mut HashMap<String, bool>,
    pub topic_rules: Option<&'a TopicRules>,
    pub has_published: &'a mut bool,
}

impl Ctx<'_> {
    fn check(&self, access: Access, resource: Resource, name: &str) -> Result<(), MethodError> {
        self.broker
            .auth
            .check(self.user, &self.vhost.name, access, resource, name)
            .map_err(MethodError::from)
    }

    /// Write permission on an exchange, cached: permissions change only with the
    /// config, and a regex match per publish would dominate small messages.
    fn check_publish(&mut self, exchange: &str) -> Result<(), MethodError> {
        if self.write_allowed.get(exchange) == Some(&true) {
            return Ok(());
        }
        // Permissions name the default exchange `amq.default`, as RabbitMQ does.
        let name = if exchange.is_empty() {
            "amq.default"
        } else {
            exchange
        };
        let result = self.check(Access::Write, Resource::Exchange, name);
        if self.write_allowed.len() < 1024 {
            self.write_allowed
                .insert(exchange.to_owned(), result.is_ok());
        }
        result
    }

    /// Topic permission on `routing_key` (a published key for write, a binding
    /// key for read) when `exchange` is a topic exchange.
    fn check_topic(
        &self,
        exchange: &str,
        access: Access,
        routing_key: &str,
    ) -> Result<(), MethodError> {
        match self.topic_rules {
            None => Ok(()),
            Some(rules) => rules
                .authorize(self.vhost, exchange, access, routing_key)
                .map_err(MethodError::from),
        }
    }

    fn send(&mut self, channel: u16, method: impl Into<Method>) {
        codec::encode_method(self.out, channel, &method.into());
    }
}

/// A message whose content frames are still arriving.
#[derive(Debug)]
struct Content {
    publish: codec::BasicPublish,
    /// Set once the content header has arrived.
    header: Option<(u64, Properties)>,
    body: BytesMut,
    /// The common single-frame body, kept as the read buffer's slice (no copy).
    single: Option<Bytes>,
}

/// A delivered message waiting for ack, nack or reject.
#[derive(Debug)]
struct Unacked {
    tag: u64,
    queue: Arc<Queue>,
    message: QueuedMessage,
    /// None for basic.get, whose deliveries hold no prefetch credit.
    consumer: Option<Arc<Consumer>>,
}

/// A consumer on this channel.
#[derive(Debug)]
struct ConsumerEntry {
    consumer: Arc<Consumer>,
    queue: Arc<Queue>,
    /// The reply address when this is the direct reply-to consumer.
    reply_to: Option<String>,
}

/// An operation deferred by a transaction until tx.commit.
#[derive(Debug)]
enum TxOp {
    Publish {
        message: Arc<Message>,
        mandatory: bool,
    },
    Settle {
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    },
}

/// A tx.commit whose commit-ok waits: for the store to sync what it
/// published to durable queues, and for the stream and quorum queue logs it
/// reached to commit it.
struct PendingCommit {
    durable_at: u64,
    waits: Vec<StreamWait>,
}

pub(crate) struct Channel {
    id: u16,
    closing: bool,
    /// Boxed: about 420 bytes (the publish, its properties) that a channel
    /// holds only while a message's frames arrive; inline, every idle channel
    /// would carry them.
    content: Option<Box<Content>>,
    next_tag: u64,
    /// In delivery-tag order (tags only grow).
    unacked: VecDeque<Unacked>,
    consumers: HashMap<String, ConsumerEntry>,
    /// basic.qos global=false: the prefetch of consumers created from now on.
    consumer_prefetch: u32,
    /// basic.qos global=true: the channel-wide limit all its consumers share.
    shared_credit: Arc<Credit>,
    confirm: bool,
    /// Sequence number of the last publish in confirm mode.
    publish_seq: u64,
    /// Highest sequence number confirmed to the client.
    confirmed: u64,
    /// Persistent publishes (sequence number, store position) not yet synced.
    awaiting_sync: VecDeque<(u64, u64)>,
    /// Publishes that reached stream queues (sequence number, the streams'
    /// commits they wait for), in order.
    awaiting_streams: VecDeque<(u64, Vec<StreamWait>)>,
    /// Sequence numbers to nack rather than ack (a queue refused the message:
    /// `x-overflow` reject-publish, or a quorum queue's commit timed out), in
    /// order; sent in sequence with the acks.
    nacks: VecDeque<u64>,
    /// tx.commit-ok replies held until their messages are safe, in order.
    commits_awaiting: VecDeque<PendingCommit>,
    tx: Option<Vec<TxOp>>,
    /// The last queue declared: what an empty queue name refers to.
    last_queue: Option<String>,
    /// This channel's direct reply-to address, if it consumes one.
    reply_to: Option<String>,
    /// The channel's message statistics (stats.rs): written by this
    /// connection's task only.
    stats: SourceGuard,
}

/// What completing a content-bearing publish yields.
pub(crate) type Published = (codec::BasicPublish, Properties, Bytes);

impl Channel {
    /// `connection_credit`: the connection's cap on unacknowledged deliveries
    /// (`[limits] max_unacked_per_connection`), shared by its channels.
    pub(crate) fn new(id: u16, stats: SourceGuard, connection_credit: Arc<Credit>) -> Self {
        Channel {
            id,
            closing: false,
            content: None,
            next_tag: 1,
            unacked: VecDeque::new(),
            consumers: HashMap::new(),
            consumer_prefetch: 0,
            shared_credit: Arc::new(Credit::with_parent(0, connection_credit)),
            confirm: false,
            publish_seq: 0,
            confirmed: 0,
            awaiting_sync: VecDeque::new(),
            awaiting_streams: VecDeque::new(),
            nacks: VecDeque::new(),
            commits_awaiting: VecDeque::new(),
            tx: None,
            last_queue: None,
            reply_to: None,
            stats,
        }
    }

    pub(crate) fn id(&self) -> u16 {
        self.id
    }

    /// Copies the channel's settings and in-flight counts to its statistics,
    /// where `/api/channels` reads them (once per read batch / outbox drain).
    pub(crate) fn publish_state(&self) {
        let (mut messages_uncommitted, mut acks_uncommitted) = (0, 0);
        for op in self.tx.iter().flatten() {
            match op {
                TxOp::Publish { .. } => messages_uncommitted += 1,
                TxOp::Settle { .. } => acks_uncommitted += 1,
            }
        }
        self.stats.set_state(&ChannelState {
            prefetch_count: u64::from(self.consumer_prefetch),
            global_prefetch_count: u64::from(self.shared_credit.limit()),
            confirm: self.confirm,
            transactional: self.tx.is_some(),
            messages_unacknowledged: self.unacked.len() as u64,
            messages_unconfirmed: if self.confirm {
                self.publish_seq.saturating_sub(self.confirmed)
            } else {
                0
            },
            messages_uncommitted,
            acks_uncommitted,
        });
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing
    }

    pub(crate) fn set_closing(&mut self) {
        self.closing = true;
    }

    pub(crate) fn expecting_content(&self) -> bool {
        self.content.is_some()
    }

    pub(crate) fn has_consumer(&self, consumer: &Arc<Consumer>) -> bool {
        !self.closing
            && self
                .consumers
                .get(consumer.tag())
                .is_some_and(|e| Arc::ptr_eq(&e.consumer, consumer))
    }

    /// Drops a consumer the broker cancelled. Returns whether it was still known.
    pub(crate) fn forget_consumer(&mut self, consumer: &Arc<Consumer>) -> bool {
        if self.has_consumer(consumer) {
            self.consumers.remove(consumer.tag());
            self.stats.set_consumers(self.consumers.len());
            true
        } else {
            false
        }
    }

    /// Asks every queue this channel consumes from to dispatch again (credit was
    /// freed).
    pub(crate) fn redispatch(&self) {
        for e in self.consumers.values() {
            e.queue.dispatch();
        }
    }

    // ---- content ----

    pub(crate) fn handle_header(
        &mut self,
        class_id: u16,
        body_size: u64,
        properties: Properties,
        settings: &AmqpSettings,
    ) -> Result<Option<Published>, MethodError> {
        let Some(content) = self.content.as_mut().filter(|c| c.header.is_none()) else {
            return Err(ConnError::unexpected_frame(format!(
                "expected method frame, got non method frame instead on channel {}",
                self.id
            ))
            .into());
        };
        if class_id != codec::BASIC_CLASS_ID {
            return Err(ConnError::unexpected_frame(format!(
                "content header for class {class_id} instead of 60"
            ))
            .into());
        }
        let max = u64::try_from(settings.max_message_size).unwrap_or(u64::MAX);
        if body_size > max {
            self.content = None;
            // The body frames still to come are dropped by the closing channel.
            return Err(MethodError::precondition(format!(
                "message size {body_size} is larger than configured max size {max}"
            )));
        }
        content.header = Some((body_size, properties));
        if body_size == 0 {
            return Ok(self.take_content());
        }
        Ok(None)
    }

    pub(crate) fn handle_body(&mut self, payload: Bytes) -> Result<Option<Published>, MethodError> {
        let Some(content) = self.content.as_mut() else {
            return Err(ConnError::unexpected_frame(format!(
                "expected method frame, got non method frame instead on channel {}",
                self.id
            ))
            .into());
        };
        let Some((size, _)) = content.header.as_ref() else {
            return Err(ConnError::unexpected_frame(
                "expected content header for class 60, got non content header frame instead",
            )
            .into());
        };
        let size = usize::try_from(*size).unwrap_or(usize::MAX);
        let have = content.body.len() + content.single.as_ref().map_or(0, Bytes::len);
        if have.saturating_add(payload.len()) > size {
            return Err(ConnError::unexpected_frame(format!(
                "body frames carry more than the {size} bytes announced"
            ))
            .into());
        }
        if have == 0 && payload.len() == size {
            content.single = Some(payload);
        } else {
            if let Some(first) = content.single.take() {
                content.body.reserve(size);
                content.body.extend_from_slice(&first);
            }
            if content.body.is_empty() {
                content.body.reserve(size);
            }
            content.body.extend_from_slice(&payload);
        }
        let have = content.body.len() + content.single.as_ref().map_or(0, Bytes::len);
        Ok(if have == size {
            self.take_content()
        } else {
            None
        })
    }

    fn take_content(&mut self) -> Option<Published> {
        let c = *self.content.take()?;
        let (_, properties) = c.header?;
        // A body in one frame is a slice of the read buffer; one assembled
        // from several frames has its own allocation already.
        let body = match c.single {
            Some(single) => message::own_if_small(single),
            None => c.body.freeze(),
        };
        Some((c.publish, properties, body))
    }

    /// Routes a complete message (or defers it to tx.commit).
    pub(crate) fn publish(
        &mut self,
        ctx: &mut Ctx<'_>,
        (publish, mut properties, body): Published,
    ) -> Result<(), MethodError> {
        *ctx.has_published = true;
        ctx.check_publish(&publish.exchange)?;
        ctx.check_topic(&publish.exchange, Access::Write, &publish.routing_key)?;
        if let Some(user_id) = properties.user_id.as_deref() {
            if user_id != ctx.user {
                return Err(MethodError::precondition(format!(
                    "user_id property set to '{user_id}' but authenticated user was '{}'",
                    ctx.user
                )));
            }
        }
        if let Some(exp) = properties.expiration.as_deref() {
            if exp.parse::<u64>().is_err() {
                return Err(MethodError::precondition(format!(
                    "invalid expiration '{exp}'"
                )));
            }
        }
        if properties.reply_to.as_deref() == Some(DIRECT_REPLY_TO) {
            let address = self
                .reply_to
                .clone()
                .ok_or_else(|| MethodError::precondition("fast reply consumer does not exist"))?;
            properties.reply_to = Some(address);
        }
        let mut message = Message::new(publish.exchange, publish.routing_key, properties, body);
        // The receive time is stored with a persistent message: TTLs and delays
        // continue from it after a restart. Only this task holds the Arc yet.
        if let Some(m) = Arc::get_mut(&mut message) {
            m.received_ms = Some(unix_now_ms()).into();
        }
        if let Some(ops) = self.tx.as_mut() {
            // The exchange must exist now, though the routing happens at commit.
            ctx.vhost
                .exchange(&message.exchange)
                .map_err(MethodError::from)?;
            ops.push(TxOp::Publish {
                message,
                mandatory: publish.mandatory,
            });
            return Ok(());
        }
        let routed = self.route(ctx, message, publish.mandatory)?;
        let durable_at = routed.durable_at;
        if self.confirm && !routed.streams_done() {
            self.awaiting_streams
                .push_back((self.publish_seq + 1, routed.streams.into_vec()));
        }
        if self.confirm {
            self.publish_seq += 1;
            if routed.rejected > 0 {
                // RabbitMQ nacks a publish that any queue refused.
                self.nacks.push_back(self.publish_seq);
            }
            if durable_at > 0 {
                // Confirmed only once the store has synced it (group commit).
                self.awaiting_sync.push_back((self.publish_seq, durable_at));
            }
        }
        Ok(())
    }

    /// Routes a message; returns where it went, with the store position it
    /// needs synced (0: none) and how many queues refused it.
    fn route(
        &mut self,
        ctx: &mut Ctx<'_>,
        message: Arc<Message>,
        mandatory: bool,
    ) -> Result<Routed, MethodError> {
        let now = message.received_ms.get().unwrap_or_else(unix_now_ms);
        let routed = ctx
            .vhost
            .publish_at(message.clone(), now)
            .map_err(MethodError::from)?;
        self.stats.published(message.body_size());
        if self.confirm {
            self.stats.add(Stat::PublishConfirm, 1);
        }
        if routed.queues == 0 {
            self.stats.add(
                if mandatory {
                    Stat::ReturnUnroutable
                } else {
                    Stat::DropUnroutable
                },
                1,
            );
        }
        if routed.queues == 0 && mandatory {
            let ret = codec::BasicReturn {
                reply_code: reply_code::NO_ROUTE,
                reply_text: "NO_ROUTE".into(),
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
            };
            codec::encode_content(
                ctx.out,
                self.id,
                &Method::from(ret),
                &message.properties,
                &message.body,
                ctx.frame_max,
            );
        }
        Ok(routed)
    }

    /// Whether confirms wait for the store to sync.
    pub(crate) fn awaits_sync(&self) -> bool {
        !self.awaiting_sync.is_empty()
            || !self.commits_awaiting.is_empty()
            || !self.awaiting_streams.is_empty()
    }

    /// Sends the commit-oks earned so far, in order: a commit is answered once
    /// the store has synced `synced` past what it published to durable
    /// queues and every stream or quorum queue it reached has committed it.
    /// Returns the error that closes the channel when a commit failed (a
    /// quorum queue could not commit it in time).
    pub(crate) fn flush_commits(
        &mut self,
        out: &mut BytesMut,
        synced: u64,
    ) -> Result<(), MethodError> {
        while let Some(commit) = self.commits_awaiting.front() {
            if commit.durable_at > synced {
                break;
            }
            match StreamWait::state_of_all(&commit.waits) {
                WaitState::Pending => break,
                WaitState::Done => {}
                WaitState::Failed => {
                    // RabbitMQ's answer when a queue rejects part of a
                    // committed transaction: some of it may have been
                    // enqueued, so neither commit-ok nor a silent loss.
                    self.commits_awaiting.clear();
                    return Err(MethodError::precondition("partial tx completion"));
                }
            }
            self.commits_awaiting.pop_front();
            if !self.closing {
                codec::encode_method(out, self.id, &Method::from(codec::TxCommitOk {}));
            }
        }
        Ok(())
    }

    /// Sends the confirms earned so far in one basic.ack: every publish up to the
    /// first one whose store position is beyond `synced`.
    pub(crate) fn flush_confirms(&mut self, out: &mut BytesMut, synced: u64) {
        while self
            .awaiting_sync
            .front()
            .is_some_and(|&(_, at)| at <= synced)
        {
            self.awaiting_sync.pop_front();
        }
        // In order: a publish is settled once every log it reached committed
        // it, or failed once one of them gave up on it (a clustered quorum
        // queue without a majority past `[cluster] quorum_commit_timeout_ms`):
        // then it is nacked, never acked.
        while let Some((seq, waits)) = self.awaiting_streams.front() {
            match StreamWait::state_of_all(waits) {
                WaitState::Pending => break,
                WaitState::Done => {}
                WaitState::Failed => {
                    let seq = *seq;
                    let at = self.nacks.partition_point(|&s| s < seq);
                    if self.nacks.get(at) != Some(&seq) {
                        self.nacks.insert(at, seq);
                    }
                }
            }
            self.awaiting_streams.pop_front();
        }
        let confirmable = match self.awaiting_sync.front() {
            Some(&(seq, _)) => seq - 1,
            None => self.publish_seq,
        };
        let confirmable = match self.awaiting_streams.front() {
            Some((seq, _)) => confirmable.min(seq - 1),
            None => confirmable,
        };
        if !self.confirm || self.closing {
            return;
        }
        let before = self.confirmed;
        // Refused publishes are nacked one by one, in order with the acks around them.
        while let Some(&seq) = self.nacks.front().filter(|&&seq| seq <= confirmable) {
            self.nacks.pop_front();
            if seq > self.confirmed + 1 {
                let ack = codec::BasicAck {
                    delivery_tag: seq - 1,
                    multiple: seq - 1 > self.confirmed + 1,
                };
                codec::encode_method(out, self.id, &Method::from(ack));
            }
            let nack = codec::BasicNack {
                delivery_tag: seq,
                multiple: false,
                requeue: false,
            };
            codec::encode_method(out, self.id, &Method::from(nack));
            self.confirmed = seq;
        }
        if confirmable > self.confirmed {
            let ack = codec::BasicAck {
                delivery_tag: confirmable,
                multiple: confirmable > self.confirmed + 1,
            };
            codec::encode_method(out, self.id, &Method::from(ack));
            self.confirmed = confirmable;
        }
        self.stats
            .add(Stat::Confirm, self.confirmed.saturating_sub(before));
    }

    // ---- deliveries ----

    pub(crate) fn write_delivery(
        &mut self,
        out: &mut switchyard_driver::Output,
        d: Delivery,
        frame_max: u32,
    ) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let qt = d.queue.queue_type();
        if d.message.redelivered() {
            self.stats.add_for(qt, Stat::Redeliver, 1);
        }
        let kind = if d.consumer.no_ack() {
            Stat::DeliverNoAck
        } else {
            Stat::Deliver
        };
        self.stats.add_for(qt, kind, 1);
        let msg = &d.message.message;
        let deliver = codec::BasicDeliver {
            consumer_tag: d.consumer.tag().into(),
            delivery_tag: tag,
            redelivered: d.message.redelivered(),
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
        };
        codec::encode_content(
            out,
            self.id,
            &Method::from(deliver),
            &msg.properties,
            &msg.body,
            frame_max,
        );
        if !d.consumer.no_ack() {
            self.unacked.push_back(Unacked {
                tag,
                queue: d.queue,
                message: d.message,
                consumer: Some(d.consumer),
            });
        }
    }

    /// Takes the unacked entries an ack/nack/reject names.
    fn take_unacked(&mut self, tag: u64, multiple: bool) -> Result<Vec<Unacked>, MethodError> {
        if multiple {
            let n = if tag == 0 {
                self.unacked.len()
            } else {
                self.unacked.partition_point(|u| u.tag <= tag)
            };
            if n == 0 && tag != 0 {
                return Err(MethodError::precondition(format!(
                    "unknown delivery tag {tag}"
                )));
            }
            return Ok(self.unacked.drain(..n).collect());
        }
        let pos = self
            .unacked
            .binary_search_by_key(&tag, |u| u.tag)
            .map_err(|_| MethodError::precondition(format!("unknown delivery tag {tag}")))?;
        Ok(self.unacked.remove(pos).into_iter().collect())
    }

    /// Acks (`requeue` None), or nacks/rejects with or without requeue.
    fn settle(
        &mut self,
        vhost: &VHost,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Result<(), MethodError> {
        let entries = self.take_unacked(tag, multiple)?;
        if requeue.is_none() {
            for e in &entries {
                self.stats.add_for(e.queue.queue_type(), Stat::Ack, 1);
            }
        }
        settle_entries(entries, Outcome::of(requeue), Some(vhost));
        self.redispatch();
        Ok(())
    }

    /// Gives back everything the channel holds: unacked messages return to their
    /// queues as redelivered, consumers are cancelled.
    pub(crate) fn release(&mut self, vhost: Option<&VHost>) {
        self.content = None;
        self.tx = None;
        // Stop the consumers first, so the requeued messages go to other
        // consumers (or a single active consumer's successor) rather than back
        // into this channel's dying outbox.
        for e in self.consumers.values() {
            e.consumer.deactivate();
        }
        let entries: Vec<Unacked> = self.unacked.drain(..).collect();
        settle_entries(entries, Outcome::Requeue, vhost);
        for (_, e) in self.consumers.drain() {
            e.consumer.deactivate();
            match (&e.reply_to, vhost) {
                (Some(address), Some(v)) => v.close_reply_to(address),
                (None, Some(v)) => v.cancel_consumer(&e.queue, e.consumer.id),
                _ => {
                    e.queue.remove_consumer(e.consumer.id);
                }
            }
        }
        self.reply_to = None;
        self.stats.set_consumers(0);
    }

    // ---- methods ----

    pub(crate) fn handle(&mut self, ctx: &mut Ctx<'_>, method: Method) -> Result<(), MethodError> {
        let id = self.id;
        match method {
            Method::BasicPublish(m) => {
                if m.immediate {
                    // RabbitMQ dropped `immediate` in 3.0 and refuses it with this
                    // connection error, before looking at anything else.
                    return Err(ConnError::not_implemented("immediate=true").into());
                }
                // The exchange is checked when the content is complete (as RabbitMQ).
                self.content = Some(Box::new(Content {
                    publish: m,
                    header: None,
                    body: BytesMut::new(),
                    single: None,
                }));
                Ok(())
            }
            Method::BasicAck(m) => self.ack_or_defer(ctx.vhost, m.delivery_tag, m.multiple, None),
            Method::BasicNack(m) => {
                self.ack_or_defer(ctx.vhost, m.delivery_tag, m.multiple, Some(m.requeue))
            }
            Method::BasicReject(m) => {
                self.ack_or_defer(ctx.vhost, m.delivery_tag, false, Some(m.requeue))
            }
            Method::BasicQos(m) => {
                if m.prefetch_size != 0 {
                    return Err(ConnError::not_implemented(format!(
                        "prefetch_size!=0 ({})",
                        m.prefetch_size
                    ))
                    .into());
                }
                if m.global {
                    self.shared_credit.set_limit(u32::from(m.prefetch_count));
                    self.redispatch();
                } else {
                    self.consumer_prefetch = u32::from(m.prefetch_count);
                    // RabbitMQ (rabbit_channel's unlimit_prefetch): a per-consumer
                    // qos lifts the channel-wide limit. Clients rely on it.
                    self.shared_credit.set_limit(0);
                    self.redispatch();
                }
                ctx.send(id, codec::BasicQosOk {});
                Ok(())
            }
            Method::BasicConsume(m) => self.consume(ctx, m),
            Method::BasicCancel(m) => {
                let removed = self.consumers.remove(m.consumer_tag.as_str());
                self.stats.set_consumers(self.consumers.len());
                if let Some(e) = removed {
                    e.consumer.deactivate();
                    match e.reply_to {
                        Some(address) => {
                            ctx.vhost.close_reply_to(&address);
                            self.reply_to = None;
                        }
                        None => ctx.vhost.cancel_consumer(&e.queue, e.consumer.id),
                    }
                }
                if !m.no_wait {
                    ctx.send(
                        id,
                        codec::BasicCancelOk {
                            consumer_tag: m.consumer_tag,
                        },
                    );
                }
                Ok(())
            }
            Method::BasicGet(m) => self.get(ctx, m),
            Method::BasicRecover(m) => {
                self.recover(m.requeue)?;
                ctx.send(id, codec::BasicRecoverOk {});
                Ok(())
            }
            Method::BasicRecoverAsync(m) => self.recover(m.requeue),
            Method::ExchangeDeclare(m) => self.exchange_declare(ctx, m),
            Method::ExchangeDelete(m) => {
                ctx.check(Access::Configure, Resource::Exchange, &m.exchange)?;
                ctx.vhost.delete_exchange(&m.exchange, m.if_unused)?;
                if !m.no_wait {
                    ctx.send(id, codec::ExchangeDeleteOk {});
                }
                Ok(())
            }
            Method::ExchangeBind(m) => {
                ctx.check(Access::Write, Resource::Exchange, &m.destination)?;
                ctx.check(Access::Read, Resource::Exchange, &m.source)?;
                ctx.check_topic(&m.source, Access::Read, &m.routing_key)?;
                ctx.vhost
                    .bind_exchange(&m.destination, &m.source, &m.routing_key, m.arguments)?;
                if !m.no_wait {
                    ctx.send(id, codec::ExchangeBindOk {});
                }
                Ok(())
            }
            Method::ExchangeUnbind(m) => {
                ctx.check(Access::Write, Resource::Exchange, &m.destination)?;
                ctx.check(Access::Read, Resource::Exchange, &m.source)?;
                ctx.check_topic(&m.source, Access::Read, &m.routing_key)?;
                ctx.vhost.unbind_exchange(
                    &m.destination,
                    &m.source,
                    &m.routing_key,
                    &m.arguments,
                )?;
                if !m.no_wait {
                    ctx.send(id, codec::ExchangeUnbindOk {});
                }
                Ok(())
            }
            Method::QueueDeclare(m) => self.queue_declare(ctx, m),
            Method::QueueBind(m) => {
                let queue = self.queue_name(&m.queue)?;
                ctx.check(Access::Write, Resource::Queue, &queue)?;
                ctx.check(Access::Read, Resource::Exchange, &m.exchange)?;
                ctx.check_topic(&m.exchange, Access::Read, &m.routing_key)?;
                ctx.vhost.bind_queue(
                    &queue,
                    &m.exchange,
                    &m.routing_key,
                    m.arguments,
                    ctx.connection,
                )?;
                if !m.no_wait {
                    ctx.send(id, codec::QueueBindOk {});
                }
                Ok(())
            }
            Method::QueueUnbind(m) => {
                let queue = self.queue_name(&m.queue)?;
                ctx.check(Access::Write, Resource::Queue, &queue)?;
                ctx.check(Access::Read, Resource::Exchange, &m.exchange)?;
                ctx.check_topic(&m.exchange, Access::Read, &m.routing_key)?;
                ctx.vhost.unbind_queue(
                    &queue,
                    &m.exchange,
                    &m.routing_key,
                    &m.arguments,
                    ctx.connection,
                )?;
                ctx.send(id, codec::QueueUnbindOk {});
                Ok(())
            }
            Method::QueuePurge(m) => {
                let queue = self.queue_name(&m.queue)?;
                ctx.check(Access::Read, Resource::Queue, &queue)?;
                let n = ctx.vhost.purge_queue(&queue, ctx.connection)?;
                if !m.no_wait {
                    ctx.send(
                        id,
                        codec::QueuePurgeOk {
                            message_count: count(n),
                        },
                    );
                }
                Ok(())
            }
            Method::QueueDelete(m) => {
                let queue = self.queue_name(&m.queue)?;
                ctx.check(Access::Configure, Resource::Queue, &queue)?;
                let n = ctx
                    .vhost
                    .delete_queue(&queue, m.if_unused, m.if_empty, ctx.connection)?;
                ctx.exclusive_queues.retain(|q| q.name != queue);
                if !m.no_wait {
                    ctx.send(
                        id,
                        codec::QueueDeleteOk {
                            message_count: count(n),
                        },
                    );
                }
                Ok(())
            }
            Method::ConfirmSelect(m) => {
                if self.tx.is_some() {
                    return Err(MethodError::precondition(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                self.confirm = true;
                if !m.no_wait {
                    ctx.send(id, codec::ConfirmSelectOk {});
                }
                Ok(())
            }
            Method::TxSelect(_) => {
                if self.confirm {
                    return Err(MethodError::precondition(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                self.tx.get_or_insert_with(Vec::new);
                ctx.send(id, codec::TxSelectOk {});
                Ok(())
            }
            Method::TxCommit(_) => {
                let ops = self
                    .tx
                    .replace(Vec::new())
                    .ok_or_else(|| MethodError::precondition("channel is not transactional"))?;
                let mut commit = PendingCommit {
                    durable_at: 0,
                    waits: Vec::new(),
                };
                for op in ops {
                    match op {
                        TxOp::Publish { message, mandatory } => {
                            let routed = self.route(ctx, message, mandatory)?;
                            commit.durable_at = commit.durable_at.max(routed.durable_at);
                            if !routed.streams_done() {
                                commit.waits.extend(routed.streams);
                            }
                        }
                        TxOp::Settle {
                            tag,
                            multiple,
                            requeue,
                        } => self.settle(ctx.vhost, tag, multiple, requeue)?,
                    }
                }
                if commit.durable_at > 0
                    || !commit.waits.is_empty()
                    || !self.commits_awaiting.is_empty()
                {
                    // commit-ok promises the messages are safe: wait for the
                    // store's sync and the logs' commits (a quorum queue's
                    // majority), answering commits in order.
                    self.commits_awaiting.push_back(commit);
                } else {
                    ctx.send(id, codec::TxCommitOk {});
                }
                Ok(())
            }
            Method::TxRollback(_) => {
                let ops = self
                    .tx
                    .as_mut()
                    .ok_or_else(|| MethodError::precondition("channel is not transactional"))?;
                ops.clear();
                ctx.send(id, codec::TxRollbackOk {});
                Ok(())
            }
            Method::ChannelFlow(m) => {
                if !m.active {
                    return Err(ConnError::not_implemented("active=false").into());
                }
                ctx.send(id, codec::ChannelFlowOk { active: true });
                Ok(())
            }
            Method::AccessRequest(_) => {
                ctx.send(id, codec::AccessRequestOk { ticket: 1 });
                Ok(())
            }
            other => Err(ConnError::command_invalid(format!(
                "method '{}' is not valid from a client on channel {id}",
                other.name()
            ))
            .into()),
        }
    }

    fn ack_or_defer(
        &mut self,
        vhost: &VHost,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Result<(), MethodError> {
        match self.tx.as_mut() {
            Some(ops) => {
                ops.push(TxOp::Settle {
                    tag,
                    multiple,
                    requeue,
                });
                Ok(())
            }
            None => self.settle(vhost, tag, multiple, requeue),
        }
    }

    fn recover(&mut self, requeue: bool) -> Result<(), MethodError> {
        if !requeue {
            return Err(ConnError::not_implemented("requeue=false").into());
        }
        let entries: Vec<Unacked> = self.unacked.drain(..).collect();
        settle_entries(entries, Outcome::Requeue, None);
        Ok(())
    }

    /// An empty queue name means the channel's last declared queue.
    fn queue_name(&self, name: &str) -> Result<String, MethodError> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| MethodError::not_found("no previously declared queue"))
    }

    fn exchange_declare(
        &mut self,
        ctx: &mut Ctx<'_>,
        m: codec::ExchangeDeclare,
    ) -> Result<(), MethodError> {
        if m.exchange.is_empty() && !m.passive {
            return Err(MethodError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if !m.passive {
            ctx.check(Access::Configure, Resource::Exchange, &m.exchange)?;
        }
        if let Some(ae) = m.arguments.get_str("alternate-exchange") {
            // Publishing through the alternate exchange needs write on it.
            ctx.check(Access::Write, Resource::Exchange, ae)?;
        }
        ctx.vhost.declare_exchange(ExchangeDeclare {
            name: m.exchange.into(),
            kind: m.kind.into(),
            passive: m.passive,
            options: ExchangeOptions {
                durable: m.durable,
                auto_delete: m.auto_delete,
                internal: m.internal,
                arguments: m.arguments,
            },
        })?;
        if !m.no_wait {
            ctx.send(self.id, codec::ExchangeDeclareOk {});
        }
        Ok(())
    }

    fn queue_declare(
        &mut self,
        ctx: &mut Ctx<'_>,
        m: codec::QueueDeclare,
    ) -> Result<(), MethodError> {
        if m.passive && m.queue == DIRECT_REPLY_TO {
            // RabbitMQ answers a consumer count of 1, so clients that check for one proceed.
            ctx.send(
                self.id,
                codec::QueueDeclareOk {
                    queue: m.queue,
                    message_count: 0,
                    consumer_count: 1,
                },
            );
            return Ok(());
        }
        let mut req = QueueDeclare {
            name: m.queue.into(),
            passive: m.passive,
            options: QueueOptions {
                durable: m.durable,
                exclusive: m.exclusive,
                auto_delete: m.auto_delete,
                arguments: m.arguments,
            },
            connection: ctx.connection,
            server_named: false,
        };
        if req.name.is_empty() && !req.passive {
            // Named here so that the configure permission is checked on the real name.
            req.name = VHost::generate_name("amq.gen-");
            req.server_named = true;
        }
        if req.passive {
            req.name = self.queue_name(&req.name)?;
        } else {
            ctx.check(Access::Configure, Resource::Queue, &req.name)?;
        }
        let exclusive = req.options.exclusive && !req.passive;
        let declared = ctx.vhost.declare_queue(req)?;
        let queue = declared.queue;
        if exclusive && !ctx.exclusive_queues.iter().any(|q| Arc::ptr_eq(q, &queue)) {
            ctx.exclusive_queues.push(queue.clone());
        }
        self.last_queue = Some(queue.name.clone());
        if !m.no_wait {
            ctx.send(
                self.id,
                codec::QueueDeclareOk {
                    queue: queue.name.as_str().into(),
                    message_count: count(declared.message_count),
                    consumer_count: count(declared.consumer_count),
                },
            );
        }
        Ok(())
    }

    fn consume(&mut self, ctx: &mut Ctx<'_>, m: codec::BasicConsume) -> Result<(), MethodError> {
        let tag = if m.consumer_tag.is_empty() {
            VHost::generate_name("amq.ctag-")
        } else {
            m.consumer_tag.to_string()
        };
        if self.consumers.contains_key(&tag) {
            return Err(
                ConnError::not_allowed(format!("attempt to reuse consumer tag '{tag}'")).into(),
            );
        }
        let options = ConsumerOptions {
            tag: tag.clone(),
            channel: self.id,
            no_ack: m.no_ack,
            exclusive: m.exclusive,
            prefetch: self.consumer_prefetch,
            arguments: m.arguments,
        };
        let consumer = Consumer::new(
            ctx.broker.next_id(),
            options,
            self.shared_credit.clone(),
            ctx.outbox.clone(),
        );
        let entry = if m.queue == DIRECT_REPLY_TO {
            if !m.no_ack {
                return Err(MethodError::precondition(
                    "reply consumer cannot acknowledge",
                ));
            }
            if self.reply_to.is_some() {
                return Err(MethodError::precondition("reply consumer already set"));
            }
            // Reply before the queue can deliver: the reply address exists once the
            // client has consume-ok.
            let (address, queue) = ctx.vhost.open_reply_to(consumer.clone())?;
            self.reply_to = Some(address.clone());
            ConsumerEntry {
                consumer,
                queue,
                reply_to: Some(address),
            }
        } else {
            let name = self.queue_name(&m.queue)?;
            ctx.check(Access::Read, Resource::Queue, &name)?;
            let queue = ctx.vhost.queue(&name)?;
            ctx.vhost.check_owner(&queue, ctx.connection)?;
            // consume-ok must precede the first delivery; deliveries go through the
            // outbox, which is written after this method's reply.
            queue.add_consumer(consumer.clone())?;
            ConsumerEntry {
                consumer,
                queue,
                reply_to: None,
            }
        };
        self.consumers.insert(tag.clone(), entry);
        self.stats.set_consumers(self.consumers.len());
        if !m.no_wait {
            ctx.send(
                self.id,
                codec::BasicConsumeOk {
                    consumer_tag: tag.into(),
                },
            );
        }
        Ok(())
    }

    fn get(&mut self, ctx: &mut Ctx<'_>, m: codec::BasicGet) -> Result<(), MethodError> {
        let name = self.queue_name(&m.queue)?;
        ctx.check(Access::Read, Resource::Queue, &name)?;
        let queue = ctx.vhost.queue(&name)?;
        ctx.vhost.check_owner(&queue, ctx.connection)?;
        if queue.stream().is_some() {
            return Err(
                ConnError::not_implemented("basic.get not supported by stream queues").into(),
            );
        }
        let qt = queue.queue_type();
        let Some(got) = queue.get(m.no_ack) else {
            self.stats.add_for(qt, Stat::GetEmpty, 1);
            ctx.send(
                self.id,
                codec::BasicGetEmpty {
                    cluster_id: Default::default(),
                },
            );
            return Ok(());
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        if got.message.redelivered() {
            self.stats.add_for(qt, Stat::Redeliver, 1);
        }
        self.stats
            .add_for(qt, if m.no_ack { Stat::GetNoAck } else { Stat::Get }, 1);
        let msg = &got.message.message;
        let ok = codec::BasicGetOk {
            delivery_tag: tag,
            redelivered: got.message.redelivered(),
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
            message_count: count(got.remaining),
        };
        codec::encode_content(
            ctx.out,
            self.id,
            &Method::from(ok),
            &msg.properties,
            &msg.body,
            ctx.frame_max,
        );
        if !m.no_ack {
            self.unacked.push_back(Unacked {
                tag,
                queue,
                message: got.message,
                consumer: None,
            });
        }
        Ok(())
    }
}

/// What to do with delivered messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Acked: gone for good.
    Ack,
    /// Back to the queue, marked redelivered.
    Requeue,
    /// Rejected without requeue: dead-lettered if the queue says so, else dropped.
    Reject,
}

impl Outcome {
    fn of(requeue: Option<bool>) -> Self {
        match requeue {
            None => Outcome::Ack,
            Some(true) => Outcome::Requeue,
            Some(false) => Outcome::Reject,
        }
    }
}

/// Settles unacked entries, one queue lock per queue for the batch.
fn settle_entries(entries: Vec<Unacked>, outcome: Outcome, vhost: Option<&VHost>) {
    // Group per queue so each queue is locked once for the batch.
    let mut by_queue: Vec<(Arc<Queue>, Vec<QueuedMessage>)> = Vec::new();
    // Stream consumers that track their offset on the server: the highest
    // offset each acked in this batch. Only an ack moves the stored offset:
    // a requeue (a closing channel hands back what it had in flight) or a
    // nack must not skip what the consumer never processed.
    let mut stream_acks: Vec<(Arc<Queue>, u64, u64)> = Vec::new();
    for e in entries {
        if let (Outcome::Ack, Some(c), Some(_)) = (outcome, &e.consumer, e.queue.stream()) {
            match stream_acks.iter_mut().find(|(_, id, _)| *id == c.id) {
                Some((_, _, at)) => *at = (*at).max(e.message.id),
                None => stream_acks.push((e.queue.clone(), c.id, e.message.id)),
            }
        }
        if let Some(c) = &e.consumer {
            c.release(1);
        }
        match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &e.queue)) {
            Some((_, list)) => list.push(e.message),
            None => by_queue.push((e.queue, vec![e.message])),
        }
    }
    for (queue, consumer, offset) in stream_acks {
        if let Some(s) = queue.stream() {
            s.acked(consumer, offset);
        }
    }
    for (queue, messages) in by_queue {
        match (outcome, vhost) {
            (Outcome::Requeue, _) => queue.requeue(messages),
            (Outcome::Reject, Some(vhost)) => {
                vhost.dead_letter(&queue, &messages, DeathReason::Rejected, unix_now())
            }
            (Outcome::Ack | Outcome::Reject, _) => queue.settle(&messages),
        }
    }
}

/// Milliseconds since the Unix epoch: the core takes its time from the adapter.
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the Unix epoch, for `x-death` times.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

//! Virtual hosts: the namespace of exchanges and queues, and the operations that
//! span them (declare, bind, route, delete).
//!
//! The exchange and queue maps sit behind `RwLock`s that publishers only read.
//! Lock order when nesting: `exchanges`, then `queues`, then a queue's own state.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use crate::consumer::Consumer;
use crate::deadletter::{self, DeathReason};
use crate::error::{CoreError, CoreResult};
use crate::exchange::{Destination, DestinationName, Exchange, ExchangeKind, ExchangeOptions};
use crate::field::{FieldTable, FieldValue};
use crate::memory::MemoryMonitor;
use crate::message::Message;
use crate::queue::{Queue, QueueOptions, QueuedMessage};

/// The pseudo-queue of RabbitMQ's direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The exchanges every vhost starts with (besides the default exchange `""`).
const PREDECLARED: [(&str, ExchangeKind); 6] = [
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    ("amq.rabbitmq.trace", ExchangeKind::Topic),
];

/// What a queue declaration asks for.
#[derive(Debug, Clone, Default)]
pub struct QueueDeclare {
    pub name: String,
    pub passive: bool,
    pub options: QueueOptions,
    /// The declaring connection, for exclusive queues.
    pub connection: u64,
}

/// What a queue declaration answers.
#[derive(Debug, Clone)]
pub struct QueueDeclared {
    pub queue: Arc<Queue>,
    pub message_count: usize,
    pub consumer_count: usize,
}

/// What an exchange declaration asks for.
#[derive(Debug, Clone)]
pub struct ExchangeDeclare {
    pub name: String,
    pub kind: String,
    pub passive: bool,
    pub options: ExchangeOptions,
}

/// Where a publish went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// Number of queues (and direct reply-to consumers) that received the message.
    pub queues: usize,
}

#[derive(Debug)]
pub struct VHost {
    pub name: String,
    exchanges: RwLock<HashMap<String, Arc<Exchange>>>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    /// Direct reply-to: generated reply address -> its private queue.
    reply_to: Mutex<HashMap<String, Arc<Queue>>>,
    memory: Arc<MemoryMonitor>,
}

fn opts(durable: bool) -> ExchangeOptions {
    ExchangeOptions {
        durable,
        auto_delete: false,
        internal: false,
        arguments: FieldTable::new(),
    }
}

/// RabbitMQ shows boolean arguments this way in equivalence errors.
fn show_bool(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

fn show_value(v: Option<&FieldValue>) -> String {
    match v {
        None => "none".to_owned(),
        Some(v) => match v.as_str() {
            Some(s) => s.to_owned(),
            None => match v.as_i64() {
                Some(i) => i.to_string(),
                None => format!("{v:?}"),
            },
        },
    }
}

/// Compares the `x-` arguments of two declarations (other arguments carry no
/// semantics and are not compared, as in RabbitMQ). Numeric arguments compare by
/// value whatever their integer width.
fn inequivalent_arg<'a>(
    received: &'a FieldTable,
    current: &'a FieldTable,
) -> Option<(&'a str, String, String)> {
    let names = received
        .iter()
        .chain(current.iter())
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("x-"));
    for name in names {
        let (a, b) = (received.get(name), current.get(name));
        let same = match (
            a.and_then(FieldValue::as_i64),
            b.and_then(FieldValue::as_i64),
        ) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        };
        if !same {
            return Some((name, show_value(a), show_value(b)));
        }
    }
    None
}

impl VHost {
    pub fn new(name: impl Into<String>, memory: Arc<MemoryMonitor>) -> Arc<Self> {
        let mut exchanges = HashMap::new();
        exchanges.insert(
            String::new(),
            Arc::new(Exchange::new("", ExchangeKind::Direct, opts(true))),
        );
        for (name, kind) in PREDECLARED {
            exchanges.insert(
                name.to_owned(),
                Arc::new(Exchange::new(name, kind, opts(true))),
            );
        }
        Arc::new(VHost {
            name: name.into(),
            exchanges: RwLock::new(exchanges),
            queues: RwLock::new(HashMap::new()),
            reply_to: Mutex::new(HashMap::new()),
            memory,
        })
    }

    fn no_exchange(&self, name: &str) -> CoreError {
        CoreError::not_found(format!("no exchange '{}' in vhost '{}'", name, self.name))
    }

    fn no_queue(&self, name: &str) -> CoreError {
        CoreError::not_found(format!("no queue '{}' in vhost '{}'", name, self.name))
    }

    pub fn exchange(&self, name: &str) -> CoreResult<Arc<Exchange>> {
        self.exchanges
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_exchange(name))
    }

    pub fn queue(&self, name: &str) -> CoreResult<Arc<Queue>> {
        self.queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_queue(name))
    }

    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    /// Checks that `connection` may use `queue` (exclusive queues belong to the
    /// connection that declared them).
    pub fn check_owner(&self, queue: &Queue, connection: u64) -> CoreResult<()> {
        match queue.owner {
            Some(owner) if owner != connection => Err(CoreError::locked(format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                queue.name, self.name
            ))),
            _ => Ok(()),
        }
    }

    // ---- exchanges ----

    pub fn declare_exchange(&self, req: ExchangeDeclare) -> CoreResult<Arc<Exchange>> {
        if req.passive {
            return self.exchange(&req.name);
        }
        let kind = ExchangeKind::parse(&req.kind).ok_or_else(|| {
            CoreError::command_invalid(format!("unknown exchange type '{}'", req.kind))
        })?;
        let mut exchanges = self.exchanges.write();
        if let Some(existing) = exchanges.get(&req.name) {
            let current = &existing.options;
            let mismatch = if existing.kind != kind {
                Some(("type", req.kind.clone(), existing.kind.as_str().to_owned()))
            } else if current.durable != req.options.durable {
                Some((
                    "durable",
                    show_bool(req.options.durable).into(),
                    show_bool(current.durable).into(),
                ))
            } else if current.auto_delete != req.options.auto_delete {
                Some((
                    "auto_delete",
                    show_bool(req.options.auto_delete).into(),
                    show_bool(current.auto_delete).into(),
                ))
            } else if current.internal != req.options.internal {
                Some((
                    "internal",
                    show_bool(req.options.internal).into(),
                    show_bool(current.internal).into(),
                ))
            } else {
                inequivalent_arg(&req.options.arguments, &current.arguments)
            };
            if let Some((arg, received, current)) = mismatch {
                return Err(CoreError::precondition(format!(
                    "inequivalent arg '{}' for exchange '{}' in vhost '{}': received '{}' but current is '{}'",
                    arg, req.name, self.name, received, current
                )));
            }
            return Ok(existing.clone());
        }
        if req.name.starts_with("amq.") {
            return Err(CoreError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                req.name
            )));
        }
        let exchange = Arc::new(Exchange::new(req.name.clone(), kind, req.options));
        exchanges.insert(req.name, exchange.clone());
        Ok(exchange)
    }

    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> CoreResult<()> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(CoreError::access_refused(format!(
                "operation not permitted on exchange '{}' in vhost '{}'",
                name, self.name
            )));
        }
        let mut exchanges = self.exchanges.write();
        let Some(exchange) = exchanges.get(name) else {
            // RabbitMQ answers delete-ok for an exchange that does not exist.
            return Ok(());
        };
        if if_unused && exchange.binding_count() > 0 {
            return Err(CoreError::precondition(format!(
                "exchange '{}' in vhost '{}' in use",
                name, self.name
            )));
        }
        exchanges.remove(name);
        // Bindings that lead to the deleted exchange go with it.
        let dest = DestinationName::Exchange(name.to_owned());
        let sources: Vec<Arc<Exchange>> = exchanges.values().cloned().collect();
        drop(exchanges);
        self.unbind_everywhere(&sources, &dest);
        Ok(())
    }

    /// Removes all bindings to `dest` and deletes auto-delete exchanges left with
    /// no bindings.
    fn unbind_everywhere(&self, sources: &[Arc<Exchange>], dest: &DestinationName) {
        let emptied: Vec<String> = sources
            .iter()
            .filter(|x| x.unbind_all(dest) > 0 && x.options.auto_delete && x.binding_count() == 0)
            .map(|x| x.name.clone())
            .collect();
        for name in emptied {
            let _ = self.delete_exchange(&name, true);
        }
    }

    // ---- queues ----

    /// Generates a server name like RabbitMQ's `amq.gen-<22 chars>`.
    pub fn generate_name(prefix: &str) -> String {
        use base64::Engine;
        let bytes: [u8; 16] = rand::random();
        format!(
            "{prefix}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    pub fn declare_queue(&self, mut req: QueueDeclare) -> CoreResult<QueueDeclared> {
        let answer = |q: &Arc<Queue>| QueueDeclared {
            queue: q.clone(),
            message_count: q.message_count(),
            consumer_count: q.consumer_count(),
        };
        if req.passive {
            let q = self.queue(&req.name)?;
            self.check_owner(&q, req.connection)?;
            return Ok(answer(&q));
        }
        if req.name.is_empty() {
            req.name = Self::generate_name("amq.gen-");
        } else if req.name.starts_with("amq.") {
            return Err(CoreError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                req.name
            )));
        }
        validate_queue_arguments(&req.name, &self.name, &req.options)?;
        let mut queues = self.queues.write();
        if let Some(existing) = queues.get(&req.name) {
            self.check_owner(existing, req.connection)?;
            let cur = &existing.options;
            let new = &req.options;
            let mismatch = if cur.durable != new.durable {
                Some((
                    "durable",
                    show_bool(new.durable).into(),
                    show_bool(cur.durable).into(),
                ))
            } else if cur.exclusive != new.exclusive {
                Some((
                    "exclusive",
                    show_bool(new.exclusive).into(),
                    show_bool(cur.exclusive).into(),
                ))
            } else if cur.auto_delete != new.auto_delete {
                Some((
                    "auto_delete",
                    show_bool(new.auto_delete).into(),
                    show_bool(cur.auto_delete).into(),
                ))
            } else {
                inequivalent_arg(&new.arguments, &cur.arguments)
            };
            if let Some((arg, received, current)) = mismatch {
                return Err(CoreError::precondition(format!(
                    "inequivalent arg '{}' for queue '{}' in vhost '{}': received '{}' but current is '{}'",
                    arg, req.name, self.name, received, current
                )));
            }
            return Ok(answer(existing));
        }
        let owner = req.options.exclusive.then_some(req.connection);
        let queue = Queue::new(
            req.name.clone(),
            self.name.clone(),
            req.options,
            owner,
            self.memory.clone(),
        );
        queues.insert(req.name, queue.clone());
        Ok(answer(&queue))
    }

    /// Deletes a queue; returns how many messages it held. Deleting a queue that
    /// does not exist succeeds with 0, as in RabbitMQ.
    pub fn delete_queue(
        &self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        connection: u64,
    ) -> CoreResult<usize> {
        let Ok(queue) = self.queue(name) else {
            return Ok(0);
        };
        self.check_owner(&queue, connection)?;
        if if_unused && queue.consumer_count() > 0 {
            return Err(CoreError::precondition(format!(
                "queue '{}' in vhost '{}' in use",
                name, self.name
            )));
        }
        if if_empty && queue.message_count() > 0 {
            return Err(CoreError::precondition(format!(
                "queue '{}' in vhost '{}' is not empty",
                name, self.name
            )));
        }
        Ok(self.remove_queue(&queue))
    }

    /// Removes a queue from the vhost, with its bindings. Returns its message count.
    pub fn remove_queue(&self, queue: &Arc<Queue>) -> usize {
        {
            let mut queues = self.queues.write();
            match queues.get(&queue.name) {
                Some(q) if Arc::ptr_eq(q, queue) => {
                    queues.remove(&queue.name);
                }
                _ => return 0,
            }
        }
        let count = queue.mark_deleted();
        let sources = self.exchanges();
        self.unbind_everywhere(&sources, &DestinationName::Queue(queue.name.clone()));
        count
    }

    /// Removes a consumer from a queue, deleting the queue if it is auto-delete and
    /// that was its last consumer.
    pub fn cancel_consumer(&self, queue: &Arc<Queue>, consumer_id: u64) {
        if queue.remove_consumer(consumer_id) {
            self.remove_queue(queue);
        }
    }

    pub fn purge_queue(&self, name: &str, connection: u64) -> CoreResult<usize> {
        let q = self.queue(name)?;
        self.check_owner(&q, connection)?;
        Ok(q.purge())
    }

    // ---- bindings ----

    fn check_bindable_source(&self, source: &str) -> CoreResult<Arc<Exchange>> {
        if source.is_empty() {
            return Err(CoreError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        self.exchange(source)
    }

    pub fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
        connection: u64,
    ) -> CoreResult<()> {
        let q = self.queue(queue)?;
        self.check_owner(&q, connection)?;
        let x = self.check_bindable_source(exchange)?;
        x.bind(Destination::Queue(q), routing_key, arguments);
        Ok(())
    }

    pub fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> CoreResult<()> {
        let q = self.queue(queue)?;
        self.check_owner(&q, connection)?;
        let x = self.check_bindable_source(exchange)?;
        x.unbind(
            &DestinationName::Queue(q.name.clone()),
            routing_key,
            arguments,
        );
        self.maybe_auto_delete(&x);
        Ok(())
    }

    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> CoreResult<()> {
        let src = self.check_bindable_source(source)?;
        self.check_bindable_source(destination)?;
        src.bind(
            Destination::Exchange(destination.to_owned()),
            routing_key,
            arguments,
        );
        Ok(())
    }

    pub fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> CoreResult<()> {
        let src = self.check_bindable_source(source)?;
        self.check_bindable_source(destination)?;
        src.unbind(
            &DestinationName::Exchange(destination.to_owned()),
            routing_key,
            arguments,
        );
        self.maybe_auto_delete(&src);
        Ok(())
    }

    fn maybe_auto_delete(&self, exchange: &Exchange) {
        if exchange.options.auto_delete && exchange.binding_count() == 0 {
            let _ = self.delete_exchange(&exchange.name, true);
        }
    }

    // ---- publishing ----

    /// Routes a message from its exchange to every matching queue. Fails only if
    /// the exchange does not exist or is internal.
    pub fn publish(&self, message: Arc<Message>) -> CoreResult<Routed> {
        let queues = self.route(&message)?;
        for q in &queues {
            q.publish(message.clone());
        }
        Ok(Routed {
            queues: queues.len(),
        })
    }

    /// The queues a message would reach, each once.
    pub fn route(&self, message: &Message) -> CoreResult<SmallVec<[Arc<Queue>; 4]>> {
        let mut out: SmallVec<[Arc<Queue>; 4]> = SmallVec::new();
        if message.exchange.is_empty() {
            let key = &message.routing_key;
            let found = if key.starts_with(DIRECT_REPLY_TO) {
                self.reply_to.lock().get(key).cloned()
            } else {
                self.queues.read().get(key).cloned()
            };
            out.extend(found);
            return Ok(out);
        }
        let start = self.exchange(&message.exchange)?;
        if start.options.internal {
            return Err(CoreError::access_refused(format!(
                "cannot publish to internal exchange '{}' in vhost '{}'",
                start.name, self.name
            )));
        }
        let headers = message.properties.headers.as_ref();
        let mut pending: SmallVec<[Arc<Exchange>; 2]> = SmallVec::from_elem(start, 1);
        let mut visited: SmallVec<[String; 2]> = SmallVec::new();
        while let Some(x) = pending.pop() {
            if visited.contains(&x.name) {
                continue;
            }
            visited.push(x.name.clone());
            let mut matched = false;
            x.route(&message.routing_key, headers, |dest| {
                matched = true;
                match dest {
                    Destination::Queue(q) => {
                        if !out.iter().any(|o| Arc::ptr_eq(o, q)) && !q.is_deleted() {
                            out.push(q.clone());
                        }
                    }
                    Destination::Exchange(name) => {
                        if let Some(next) = self.exchanges.read().get(name) {
                            pending.push(next.clone());
                        }
                    }
                }
            });
            if !matched {
                if let Some(ae) = x
                    .alternate_exchange()
                    .and_then(|n| self.exchanges.read().get(n).cloned())
                {
                    pending.push(ae);
                }
            }
        }
        Ok(out)
    }

    /// Dead-letters messages a queue gives up on to its dead-letter exchange (if
    /// it has one), then settles them in the queue.
    pub fn dead_letter(
        &self,
        queue: &Queue,
        messages: &[QueuedMessage],
        reason: DeathReason,
        now_secs: u64,
    ) {
        if let Some((exchange, routing_key)) = deadletter::target(queue) {
            for m in messages {
                let copy = deadletter::dead_lettered(
                    &m.message,
                    &queue.name,
                    reason,
                    exchange,
                    routing_key,
                    now_secs,
                );
                // A missing dead-letter exchange drops the message, as in RabbitMQ.
                let _ = self.publish(copy);
            }
        }
        queue.settle(messages);
    }

    // ---- direct reply-to ----

    /// Registers a direct reply-to consumer and returns the reply address that
    /// publishers put in `reply_to`. Its private queue is in no map but this one.
    pub fn open_reply_to(&self, consumer: Arc<Consumer>) -> CoreResult<(String, Arc<Queue>)> {
        let address = Self::generate_name(&format!("{DIRECT_REPLY_TO}."));
        let queue = Queue::new(
            address.clone(),
            self.name.clone(),
            QueueOptions::default(),
            None,
            self.memory.clone(),
        );
        queue.add_consumer(consumer)?;
        self.reply_to.lock().insert(address.clone(), queue.clone());
        Ok((address, queue))
    }

    pub fn close_reply_to(&self, address: &str) {
        if let Some(q) = self.reply_to.lock().remove(address) {
            q.mark_deleted();
        }
    }
}

/// Rejects queue arguments RabbitMQ would reject, with its wording.
fn validate_queue_arguments(queue: &str, vhost: &str, options: &QueueOptions) -> CoreResult<()> {
    let args = &options.arguments;
    let bad = |arg: &str, why: &str| {
        Err(CoreError::precondition(format!(
            "invalid arg '{arg}' for queue '{queue}' in vhost '{vhost}': {why}"
        )))
    };
    for name in [
        "x-message-ttl",
        "x-expires",
        "x-max-length",
        "x-max-length-bytes",
        "x-max-priority",
        "x-delivery-limit",
    ] {
        if let Some(v) = args.get(name) {
            match v.as_i64() {
                Some(n) if n >= 0 => {}
                Some(n) => return bad(name, &format!("{{value_negative,{n}}}")),
                None => return bad(name, "{unacceptable_type,...}"),
            }
        }
    }
    if let Some(t) = args.get("x-queue-type") {
        match t.as_str() {
            Some("classic") => {}
            Some("quorum") => {
                if !options.durable || options.exclusive {
                    return Err(CoreError::precondition(format!(
                        "invalid property '{}' for queue '{}' in vhost '{}'",
                        if options.exclusive { "exclusive" } else { "non-durable" },
                        queue,
                        vhost
                    )));
                }
            }
            Some("stream") => {
                return Err(CoreError::precondition(format!(
                    "invalid arg 'x-queue-type' for queue '{queue}' in vhost '{vhost}': stream queues are not supported by Switchyard yet"
                )))
            }
            _ => return bad("x-queue-type", "unknown queue type"),
        }
    }
    Ok(())
}

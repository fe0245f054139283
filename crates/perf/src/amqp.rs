//! A lean AMQP 0-9-1 client on Switchyard's own pure codec: producers, consumers,
//! topology setup and idle connections.
//!
//! It speaks only what a load generator needs (PLAIN login, one or two channels,
//! declare/bind/purge/delete, publish with confirms, consume with qos and acks),
//! works against any 0-9-1 broker (RabbitMQ included), and encodes a whole batch of
//! publishes into one buffer written with one call.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use switchyard_amqp::codec::{self, Frame, Method};
use switchyard_core::field::{FieldTable, FieldValue};
use switchyard_core::message::Properties;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::run::{batch_limit, Counters, Pacer, Recorder, Shared, Topology};
use crate::transport::{self, Reader, Writer};

const FRAME_MAX: u32 = 131_072;

pub struct Conn {
    reader: Reader,
    writer: Writer,
    input: BytesMut,
    out: BytesMut,
    ends: Vec<usize>,
    frame_max: u32,
}

/// Where producers publish and consumers consume, for producer/consumer `i`.
pub struct Names {
    pub exchange: String,
    pub queue: String,
    pub topic: bool,
}

pub fn names(run: &Shared, i: usize) -> Names {
    let s = &run.settings;
    let id = &s.run_id;
    if s.topic_bindings > 0 {
        return Names {
            exchange: format!("perf-topic-{id}"),
            queue: format!("perf-q-{id}"),
            topic: true,
        };
    }
    match s.topology {
        Topology::Queue => Names {
            exchange: String::new(),
            queue: s.queue.clone().unwrap_or_else(|| format!("perf-q-{id}")),
            topic: false,
        },
        Topology::Pairs => Names {
            exchange: String::new(),
            queue: format!("perf-q-{id}-{i}"),
            topic: false,
        },
        Topology::Fanout => Names {
            exchange: format!("perf-fanout-{id}"),
            queue: format!("perf-q-{id}-{i}"),
            topic: false,
        },
    }
}

impl Conn {
    /// Connects, logs in and opens channels 1..=channels.
    pub async fn open(run: &Shared, channels: u16) -> Result<Conn> {
        let s = &run.settings;
        let (reader, writer) = transport::connect(s.addr, s.transport, &s.ws_path, "amqp").await?;
        let mut c = Conn {
            reader,
            writer,
            input: BytesMut::with_capacity(64 * 1024),
            out: BytesMut::with_capacity(64 * 1024),
            ends: Vec::new(),
            frame_max: codec::FRAME_MIN_SIZE,
        };
        c.writer.send_one(&codec::PROTOCOL_HEADER).await?;
        match c.recv_method(0).await? {
            Method::ConnectionStart(_) => {}
            other => bail!("expected connection.start, got {}", other.name()),
        }
        let mut response = Vec::with_capacity(s.user.len() + s.pass.len() + 2);
        response.push(0);
        response.extend_from_slice(s.user.as_bytes());
        response.push(0);
        response.extend_from_slice(s.pass.as_bytes());
        c.push(
            0,
            codec::ConnectionStartOk {
                client_properties: FieldTable::new(),
                mechanism: "PLAIN".into(),
                response: Bytes::from(response),
                locale: "en_US".into(),
            }
            .into(),
        );
        c.flush().await?;
        let tune = match c.recv_method(0).await? {
            Method::ConnectionTune(t) => t,
            Method::ConnectionClose(cl) => bail!("login refused: {}", cl.reply_text),
            other => bail!("expected connection.tune, got {}", other.name()),
        };
        let frame_max = match tune.frame_max {
            0 => FRAME_MAX,
            n => n.min(FRAME_MAX),
        };
        c.push(
            0,
            codec::ConnectionTuneOk {
                channel_max: tune.channel_max,
                frame_max,
                // No heartbeats: runs are short and a busy loop would only add noise.
                heartbeat: 0,
            }
            .into(),
        );
        c.push(
            0,
            codec::ConnectionOpen {
                virtual_host: s.vhost.as_str().into(),
                ..Default::default()
            }
            .into(),
        );
        c.flush().await?;
        c.frame_max = frame_max;
        c.expect(0, "connection.open-ok").await?;
        for ch in 1..=channels {
            c.push(ch, codec::ChannelOpen::default().into());
        }
        c.flush().await?;
        // RabbitMQ runs each channel in its own process, so the open-oks may come
        // back in any order: count them on whichever channel they arrive.
        let mut opened = 0;
        while opened < channels {
            match c.recv().await? {
                Frame::Method {
                    method: Method::ChannelOpenOk(_),
                    ..
                } => opened += 1,
                Frame::Method {
                    method: Method::ConnectionClose(cl),
                    ..
                } => bail!(
                    "channel.open: connection closed: {} {}",
                    cl.reply_code,
                    cl.reply_text
                ),
                _ => {}
            }
        }
        Ok(c)
    }

    fn push(&mut self, channel: u16, method: Method) {
        codec::encode_method(&mut self.out, channel, &method);
        self.ends.push(self.out.len());
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.writer.send(&mut self.out, &mut self.ends).await?;
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<Frame> {
        loop {
            if let Some(frame) =
                codec::decode_frame(&mut self.input, self.frame_max.max(FRAME_MAX))?
            {
                return Ok(frame);
            }
            if self.reader.read(&mut self.input).await? == 0 {
                bail!("broker closed the connection");
            }
        }
    }

    async fn recv_method(&mut self, channel: u16) -> Result<Method> {
        loop {
            match self.recv().await? {
                Frame::Method { channel: c, method } if c == channel || c == 0 => {
                    return Ok(method)
                }
                _ => continue,
            }
        }
    }

    /// Waits for the reply `name` on `channel`; a close is an error with its text.
    async fn expect(&mut self, channel: u16, name: &str) -> Result<Method> {
        let m = self.recv_method(channel).await?;
        match m {
            Method::ConnectionClose(c) => bail!(
                "{name}: connection closed: {} {}",
                c.reply_code,
                c.reply_text
            ),
            Method::ChannelClose(c) => {
                bail!("{name}: channel closed: {} {}", c.reply_code, c.reply_text)
            }
            m if m.name() == name => Ok(m),
            other => bail!("expected {name}, got {}", other.name()),
        }
    }

    /// Sends several requests on channel 1 and reads their replies, pipelined in
    /// windows (100k bindings one round trip at a time would take minutes).
    async fn pipelined(&mut self, requests: Vec<Method>, reply: &str) -> Result<()> {
        for chunk in requests.chunks(500) {
            for m in chunk {
                self.push(1, m.clone());
            }
            self.flush().await?;
            for _ in chunk {
                self.expect(1, reply).await?;
            }
        }
        Ok(())
    }

    pub async fn close(mut self) {
        self.push(
            0,
            codec::ConnectionClose {
                reply_code: 200,
                reply_text: "bye".into(),
                ..Default::default()
            }
            .into(),
        );
        if self.flush().await.is_ok() {
            let deadline = Instant::now() + std::time::Duration::from_secs(2);
            let _ = timeout_at(deadline, self.expect(0, "connection.close-ok")).await;
        }
        self.writer.close().await;
    }
}

/// Declares the exchange, queues and bindings of the run (before any client starts).
pub async fn setup(run: &Shared) -> Result<()> {
    let s = &run.settings;
    let mut c = Conn::open(run, 1).await.context("setup connection")?;
    // Streams are durable by rule.
    let durable = s.persistent || s.queue_type.is_some();
    let n0 = names(run, 0);
    let mut queue_args = FieldTable::new();
    if let Some(kind) = &s.queue_type {
        queue_args.insert("x-queue-type", FieldValue::string(kind.clone()));
    }
    if !n0.exchange.is_empty() {
        let kind = if n0.topic { "topic" } else { "fanout" };
        c.push(
            1,
            codec::ExchangeDeclare {
                exchange: n0.exchange.as_str().into(),
                kind: kind.into(),
                durable,
                arguments: FieldTable::new(),
                ..Default::default()
            }
            .into(),
        );
        c.flush().await?;
        c.expect(1, "exchange.declare-ok").await?;
    }
    let queues: Vec<String> = match (s.topology, n0.topic) {
        (_, true) | (Topology::Queue, _) => vec![n0.queue.clone()],
        _ => (0..s.consumers).map(|i| names(run, i).queue).collect(),
    };
    let declares = queues
        .iter()
        .map(|q| {
            codec::QueueDeclare {
                queue: q.as_str().into(),
                durable,
                arguments: queue_args.clone(),
                ..Default::default()
            }
            .into()
        })
        .collect();
    c.pipelined(declares, "queue.declare-ok").await?;
    if n0.topic {
        // S11: many bindings, one of which (perf.<i>.*) matches each published key.
        let binds = (0..s.topic_bindings)
            .map(|i| {
                codec::QueueBind {
                    queue: n0.queue.as_str().into(),
                    exchange: n0.exchange.as_str().into(),
                    routing_key: format!("perf.{i}.*").into(),
                    arguments: FieldTable::new(),
                    ..Default::default()
                }
                .into()
            })
            .collect();
        c.pipelined(binds, "queue.bind-ok").await?;
    } else if !n0.exchange.is_empty() {
        let binds = queues
            .iter()
            .map(|q| {
                codec::QueueBind {
                    queue: q.as_str().into(),
                    exchange: n0.exchange.as_str().into(),
                    arguments: FieldTable::new(),
                    ..Default::default()
                }
                .into()
            })
            .collect();
        c.pipelined(binds, "queue.bind-ok").await?;
    }
    c.close().await;
    Ok(())
}

/// Deletes what [`setup`] declared.
pub async fn teardown(run: &Shared) -> Result<()> {
    let s = &run.settings;
    if s.queue.is_some() && s.topology == Topology::Queue && s.topic_bindings == 0 {
        // A named queue is kept for a later run.
        return Ok(());
    }
    let mut c = Conn::open(run, 1).await.context("teardown connection")?;
    let n0 = names(run, 0);
    let queues: Vec<String> = match (s.topology, n0.topic) {
        (_, true) | (Topology::Queue, _) => vec![n0.queue.clone()],
        _ => (0..s.consumers).map(|i| names(run, i).queue).collect(),
    };
    let deletes = queues
        .into_iter()
        .map(|queue| {
            codec::QueueDelete {
                queue: queue.into(),
                ..Default::default()
            }
            .into()
        })
        .collect();
    c.pipelined(deletes, "queue.delete-ok").await?;
    if !n0.exchange.is_empty() {
        c.pipelined(
            vec![codec::ExchangeDelete {
                exchange: n0.exchange.into(),
                ..Default::default()
            }
            .into()],
            "exchange.delete-ok",
        )
        .await?;
    }
    c.close().await;
    Ok(())
}

/// One producer: publishes until the deadline, within the confirm window if any.
pub async fn producer(run: Shared, i: usize) -> Result<()> {
    let s = &run.settings;
    let mut c = Conn::open(&run, 1).await?;
    let n = names(&run, i);
    if s.confirm.is_some() {
        c.push(1, codec::ConfirmSelect::default().into());
        c.flush().await?;
        c.expect(1, "confirm.select-ok").await?;
    }
    let Conn {
        reader,
        mut writer,
        input,
        frame_max,
        ..
    } = c;
    // Acks come back on the read half, handled by a task of their own so that a
    // full socket in one direction never stalls the other.
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let ack_task = tokio::spawn(confirm_reader(run.clone(), reader, input, acked_tx));

    let mut props = Properties::default();
    if s.persistent {
        props.delivery_mode = Some(2);
    }
    let mut body = run.body();
    let mut out = BytesMut::with_capacity(128 * 1024);
    let mut ends = Vec::new();
    let mut pacer = Pacer::new(s.producer_rate());
    let batch = batch_limit(s.size);
    let mut published = 0u64;
    let mut publish = codec::BasicPublish {
        exchange: n.exchange.as_str().into(),
        routing_key: n.queue.as_str().into(),
        ..Default::default()
    };
    let publish_key_base = n.topic;
    // The method and header frames are the same for every message (but for S11's
    // routing keys): encode them once, so the client spends its time on the wire.
    let mut template = encode_template(&publish, &props, body.len());
    let chunk = usize::try_from(frame_max.saturating_sub(codec::FRAME_OVERHEAD))
        .unwrap_or(usize::MAX)
        .max(1);
    while !run.finished() {
        let window = match s.confirm {
            Some(w) => w.saturating_sub(published - *acked_rx.borrow()),
            None => u64::MAX,
        };
        if window == 0 {
            tokio::select! {
                r = acked_rx.changed() => if r.is_err() { break },
                () = run.stopped() => break,
            }
            continue;
        }
        let due = pacer.due(batch.min(window));
        if due == 0 {
            tokio::select! {
                () = sleep_until(pacer.next_due()) => {}
                () = run.stopped() => break,
            }
            continue;
        }
        for k in 0..due {
            if publish_key_base {
                publish.routing_key = compact_str::format_compact!(
                    "perf.{}.x",
                    (published + k) as usize % s.topic_bindings.max(1)
                );
                template = encode_template(&publish, &props, body.len());
            }
            run.stamp(&mut body);
            out.extend_from_slice(&template);
            for part in body.chunks(chunk) {
                codec::encode_body(&mut out, 1, part);
            }
            ends.push(out.len());
        }
        tokio::select! {
            r = writer.send(&mut out, &mut ends) => r?,
            () = run.stopped() => break,
        }
        published += due;
        pacer.sent(due);
        Counters::add(&run.counters.sent, due);
    }
    ack_task.abort();
    writer.finish(&[]).await;
    Ok(())
}

fn encode_template(publish: &codec::BasicPublish, props: &Properties, size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(128);
    codec::encode_method(&mut buf, 1, &Method::BasicPublish(publish.clone()));
    codec::encode_header(&mut buf, 1, codec::BASIC_CLASS_ID, size as u64, props);
    buf.freeze()
}

async fn confirm_reader(
    run: Shared,
    mut reader: Reader,
    mut input: BytesMut,
    acked: tokio::sync::watch::Sender<u64>,
) -> Result<()> {
    let mut highest = 0u64;
    loop {
        let before = highest;
        let mut nacks = 0;
        while let Some(frame) = codec::decode_frame(&mut input, FRAME_MAX)? {
            match frame {
                Frame::Method {
                    method: Method::BasicAck(a),
                    ..
                } => {
                    highest = highest.max(a.delivery_tag);
                }
                Frame::Method {
                    method: Method::BasicNack(a),
                    ..
                } => {
                    // A multiple nack covers everything above the last confirm.
                    let from = if a.multiple {
                        highest
                    } else {
                        a.delivery_tag.saturating_sub(1)
                    };
                    nacks += a.delivery_tag.saturating_sub(from);
                    highest = highest.max(a.delivery_tag);
                }
                Frame::Method {
                    method: Method::ConnectionClose(c),
                    ..
                } => {
                    return Err(anyhow!(
                        "broker closed the producer: {} {}",
                        c.reply_code,
                        c.reply_text
                    ));
                }
                Frame::Method {
                    method: Method::ChannelClose(c),
                    ..
                } => {
                    return Err(anyhow!(
                        "broker closed the channel: {} {}",
                        c.reply_code,
                        c.reply_text
                    ));
                }
                _ => {}
            }
        }
        if highest > before {
            Counters::add(&run.counters.confirmed, highest - before);
            Counters::add(&run.counters.nacked, nacks);
            let _ = acked.send(highest);
        }
        if reader.read(&mut input).await? == 0 {
            return Ok(());
        }
    }
}

/// One consumer: counts and times deliveries until the deadline.
pub async fn consumer(
    run: Shared,
    i: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Result<hdrhistogram::Histogram<u64>> {
    let s = &run.settings;
    let mut c = Conn::open(&run, 1).await?;
    let n = names(&run, i);
    let autoack = s.multi_ack.is_none();
    let mut consume_args = FieldTable::new();
    if s.queue_type.as_deref() == Some("stream") {
        consume_args.insert("x-stream-offset", FieldValue::string("next"));
    }
    if s.prefetch > 0 {
        c.push(
            1,
            codec::BasicQos {
                prefetch_count: s.prefetch,
                ..Default::default()
            }
            .into(),
        );
        c.flush().await?;
        c.expect(1, "basic.qos-ok").await?;
    }
    c.push(
        1,
        codec::BasicConsume {
            queue: n.queue.as_str().into(),
            consumer_tag: format!("perf-{i}").into(),
            no_ack: autoack,
            arguments: consume_args,
            ..Default::default()
        }
        .into(),
    );
    c.flush().await?;
    c.expect(1, "basic.consume-ok").await?;
    let _ = ready.send(()).await;
    drop(ready);

    let mut rec = Recorder::new(run.clone())?;
    // Ack every N, but never wait for more than half the prefetch window (or the
    // broker would stop sending before we ack).
    let every = match (s.multi_ack, s.prefetch) {
        (Some(n), 0) => n.max(1),
        (Some(n), p) => n.max(1).min(u64::from(p).div_ceil(2)),
        (None, _) => u64::MAX,
    };
    let mut unacked = 0u64;
    let mut last_tag = 0u64;
    // The message being assembled: its delivery tag is known from basic.deliver,
    // its size from the header, the stamp from the first body frame.
    let mut body_left: u64 = 0;
    let mut head: Vec<u8> = Vec::with_capacity(16);
    let mut body_len = 0usize;
    let frame_max = c.frame_max;
    loop {
        while let Some(frame) = codec::decode_frame(&mut c.input, frame_max.max(FRAME_MAX))? {
            match frame {
                Frame::Method {
                    method: Method::BasicDeliver(d),
                    ..
                } => {
                    last_tag = d.delivery_tag;
                }
                Frame::Header { body_size, .. } => {
                    body_left = body_size;
                    body_len = usize::try_from(body_size).unwrap_or(usize::MAX);
                    head.clear();
                    if body_size == 0 {
                        rec.message(&head, 0);
                        unacked += 1;
                    }
                }
                Frame::Body { payload, .. } => {
                    if head.len() < 8 {
                        let take = (8 - head.len()).min(payload.len());
                        head.extend_from_slice(payload.get(..take).unwrap_or_default());
                    }
                    body_left = body_left.saturating_sub(payload.len() as u64);
                    if body_left == 0 {
                        rec.message(&head, body_len);
                        unacked += 1;
                    }
                }
                Frame::Method {
                    method: Method::ConnectionClose(cl),
                    ..
                } => {
                    bail!(
                        "broker closed the consumer: {} {}",
                        cl.reply_code,
                        cl.reply_text
                    )
                }
                Frame::Method {
                    method: Method::ChannelClose(cl),
                    ..
                } => {
                    bail!(
                        "broker closed the consumer's channel: {} {}",
                        cl.reply_code,
                        cl.reply_text
                    )
                }
                _ => {}
            }
        }
        if !autoack && unacked >= every {
            c.push(
                1,
                codec::BasicAck {
                    delivery_tag: last_tag,
                    multiple: true,
                }
                .into(),
            );
            unacked = 0;
        } else if autoack {
            unacked = 0;
        }
        rec.flush();
        c.flush().await?;
        if run.finished() {
            break;
        }
        let read = tokio::select! {
            r = c.reader.read(&mut c.input) => r?,
            () = run.stopped() => break,
        };
        if read == 0 {
            bail!("broker closed the consumer's connection");
        }
    }
    let hist = rec.hist;
    // Cancel quickly; the broker requeues what we did not ack.
    c.writer.finish(&[]).await;
    Ok(hist)
}

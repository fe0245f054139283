//! A lean MQTT 3.1.1 / 5.0 client: publishers, subscribers and idle connections.
//!
//! Packets (MQTT 3.1.1 section 2, 5.0 section 2):
//!
//! ```text
//! packet          = fixed-header variable-header payload
//! fixed-header    = type-and-flags remaining-length     ; remaining-length: 1-4 byte varint
//! CONNECT         = "MQTT" level flags keep-alive [props] client-id [user] [password]
//! PUBLISH         = topic [packet-id if QoS > 0] [props] payload
//! PUBACK          = packet-id [reason [props]]
//! SUBSCRIBE       = packet-id [props] 1*(filter options)
//! ```
//!
//! `[props]` exist only in 5.0; we send none (an empty property length) and skip
//! the broker's, except CONNACK's Receive Maximum, which bounds our QoS 1 window.

use anyhow::{bail, Result};
use bytes::{Buf, BufMut, BytesMut};
use tokio::time::sleep_until;

use crate::run::{batch_limit, Counters, Pacer, Recorder, Shared, Topology};
use crate::transport::{self, Reader, Writer};

pub struct Conn {
    reader: Reader,
    writer: Writer,
    input: BytesMut,
    /// Receive Maximum from a 5.0 CONNACK: QoS 1 publishes the broker accepts in flight.
    receive_max: u64,
    v5: bool,
}

/// One decoded packet: the first byte and the rest (after the remaining length).
struct Packet {
    first: u8,
    body: BytesMut,
}

fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
    buf.put_slice(s.get(..usize::from(u16::MAX)).unwrap_or(s));
}

/// Reads a varint at `at`; None if incomplete, Err if longer than 4 bytes.
fn varint(buf: &[u8], at: usize) -> Result<Option<(usize, usize)>> {
    let mut n = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(at + i) else {
            return Ok(None);
        };
        n |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((n, i + 1)));
        }
    }
    bail!("malformed remaining length")
}

fn decode(buf: &mut BytesMut) -> Result<Option<Packet>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((len, used)) = varint(buf, 1)? else {
        return Ok(None);
    };
    if buf.len() < 1 + used + len {
        return Ok(None);
    }
    buf.advance(1 + used);
    Ok(Some(Packet {
        first,
        body: buf.split_to(len),
    }))
}

/// Skips a 5.0 property block at the front of `b`.
fn skip_props(b: &mut BytesMut) -> Result<()> {
    let Some((len, used)) = varint(b, 0)? else {
        bail!("truncated properties");
    };
    if b.len() < used + len {
        bail!("truncated properties");
    }
    b.advance(used + len);
    Ok(())
}

impl Conn {
    pub async fn open(run: &Shared, client_id: &str, clean: bool) -> Result<Conn> {
        let s = &run.settings;
        let sub = if s.mqtt_version == 5 {
            "mqtt"
        } else {
            "mqtt, mqttv3.1"
        };
        let (reader, mut writer) = transport::connect(s.addr, s.transport, &s.ws_path, sub).await?;
        let v5 = s.mqtt_version == 5;
        let mut body = BytesMut::with_capacity(64);
        put_str(&mut body, b"MQTT");
        body.put_u8(if v5 { 5 } else { 4 });
        let mut flags = if clean { 0x02 } else { 0 };
        if !s.user.is_empty() {
            flags |= 0x80 | 0x40;
        }
        body.put_u8(flags);
        // Keep-alive off: runs are bounded and pings would only add noise.
        body.put_u16(0);
        if v5 {
            body.put_u8(0);
        }
        put_str(&mut body, client_id.as_bytes());
        if !s.user.is_empty() {
            put_str(&mut body, s.user.as_bytes());
            put_str(&mut body, s.pass.as_bytes());
        }
        let mut packet = BytesMut::with_capacity(body.len() + 5);
        packet.put_u8(0x10);
        put_varint(&mut packet, body.len());
        packet.put_slice(&body);
        writer.send_one(&packet).await?;
        let mut c = Conn {
            reader,
            writer,
            input: BytesMut::with_capacity(64 * 1024),
            receive_max: 65_535,
            v5,
        };
        let mut ack = c.recv().await?;
        if ack.first >> 4 != 2 || ack.body.len() < 2 {
            bail!("expected CONNACK, got packet type {}", ack.first >> 4);
        }
        let code = ack.body.get(1).copied().unwrap_or(0xff);
        if code != 0 {
            bail!("CONNACK refused the connection: code {code:#x}");
        }
        if v5 {
            ack.body.advance(2);
            c.receive_max = receive_maximum(&ack.body).unwrap_or(65_535);
        }
        Ok(c)
    }

    async fn recv(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = decode(&mut self.input)? {
                return Ok(p);
            }
            if self.reader.read(&mut self.input).await? == 0 {
                bail!("broker closed the connection");
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Result<()> {
        let mut body = BytesMut::new();
        body.put_u16(1);
        if self.v5 {
            body.put_u8(0);
        }
        put_str(&mut body, filter.as_bytes());
        body.put_u8(qos);
        let mut packet = BytesMut::new();
        packet.put_u8(0x82);
        put_varint(&mut packet, body.len());
        packet.put_slice(&body);
        self.writer.send_one(&packet).await?;
        loop {
            let mut p = self.recv().await?;
            if p.first >> 4 != 9 {
                continue;
            }
            p.body.advance(2.min(p.body.len()));
            if self.v5 {
                skip_props(&mut p.body)?;
            }
            match p.body.first() {
                Some(&code) if code < 0x80 => return Ok(()),
                code => bail!("SUBACK refused {filter}: {code:?}"),
            }
        }
    }

    pub async fn close(mut self) {
        self.writer.finish(&[0xe0, 0]).await;
    }
}

/// Receive Maximum (property 0x21) from a CONNACK's properties, if present.
fn receive_maximum(props: &[u8]) -> Option<u64> {
    let (len, used) = varint(props, 0).ok()??;
    let mut p = props.get(used..used + len)?;
    while let Some((&id, rest)) = p.split_first() {
        // Fixed-size properties we may meet in a CONNACK; anything else ends the scan.
        let size = match id {
            0x21 => {
                return Some(u64::from(u16::from_be_bytes(
                    rest.get(..2)?.try_into().ok()?,
                )))
            }
            0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x13 | 0x22 => 2,
            0x11 | 0x27 => 4,
            0x12 | 0x1a | 0x1c | 0x1f | 0x15 => {
                2 + usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?))
            }
            _ => return None,
        };
        p = rest.get(size..)?;
    }
    None
}

pub fn topic(run: &Shared, i: usize) -> String {
    match run.settings.topology {
        Topology::Pairs => format!("perf/{}/{i}", run.settings.run_id),
        _ => format!("perf/{}/t", run.settings.run_id),
    }
}

pub async fn publisher(run: Shared, i: usize) -> Result<()> {
    let s = &run.settings;
    let id = format!("perf-pub-{}-{i}", s.run_id);
    let c = Conn::open(&run, &id, true).await?;
    let qos = s.qos.min(1);
    // QoS 1 is bounded by the window (and the broker's Receive Maximum); QoS 0 is not.
    let window = if qos == 1 {
        s.confirm.unwrap_or(c.receive_max).min(c.receive_max).max(1)
    } else {
        u64::MAX
    };
    let Conn {
        reader,
        mut writer,
        input,
        v5,
        ..
    } = c;
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let ack_task = tokio::spawn(puback_reader(run.clone(), reader, input, acked_tx));
    let topic = topic(&run, i);
    // Everything but the stamp and the packet id is the same for every publish.
    let mut head = BytesMut::new();
    let var_len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + usize::from(v5) + s.size;
    head.put_u8(0x30 | (qos << 1));
    put_varint(&mut head, var_len);
    put_str(&mut head, topic.as_bytes());
    let mut body = run.body();
    let mut out = BytesMut::with_capacity(128 * 1024);
    let mut ends = Vec::new();
    let mut pacer = Pacer::new(s.producer_rate());
    let batch = batch_limit(s.size);
    let mut published = 0u64;
    while !run.finished() {
        let room = window.saturating_sub(published - *acked_rx.borrow());
        if room == 0 {
            tokio::select! {
                r = acked_rx.changed() => if r.is_err() { break },
                () = run.stopped() => break,
            }
            continue;
        }
        let due = pacer.due(batch.min(room));
        if due == 0 {
            tokio::select! {
                () = sleep_until(pacer.next_due()) => {}
                () = run.stopped() => break,
            }
            continue;
        }
        for k in 0..due {
            out.extend_from_slice(&head);
            if qos > 0 {
                // Ids 1..=65535 in order; the window keeps them from wrapping onto
                // one still in flight.
                out.put_u16(((published + k) % 65_535 + 1) as u16);
            }
            if v5 {
                out.put_u8(0);
            }
            run.stamp(&mut body);
            out.extend_from_slice(&body);
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
    writer.finish(&[0xe0, 0]).await;
    Ok(())
}

async fn puback_reader(
    run: Shared,
    mut reader: Reader,
    mut input: BytesMut,
    acked: tokio::sync::watch::Sender<u64>,
) -> Result<()> {
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while let Some(p) = decode(&mut input)? {
            if p.first >> 4 == 4 {
                n += 1;
            }
        }
        if n > 0 {
            total += n;
            Counters::add(&run.counters.confirmed, n);
            let _ = acked.send(total);
        }
        if reader.read(&mut input).await? == 0 {
            return Ok(());
        }
    }
}

pub async fn subscriber(
    run: Shared,
    i: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Result<hdrhistogram::Histogram<u64>> {
    let s = &run.settings;
    let id = format!("perf-sub-{}-{i}", s.run_id);
    let mut c = Conn::open(&run, &id, true).await?;
    c.subscribe(&topic(&run, i), s.qos.min(1)).await?;
    let _ = ready.send(()).await;
    drop(ready);
    let mut rec = Recorder::new(run.clone())?;
    let mut acks = BytesMut::new();
    let mut ends = Vec::new();
    loop {
        while let Some(mut p) = decode(&mut c.input)? {
            if p.first >> 4 != 3 {
                continue;
            }
            let qos = (p.first >> 1) & 3;
            let Some(tlen) = p
                .body
                .get(..2)
                .and_then(|b| <[u8; 2]>::try_from(b).ok())
                .map(|b| usize::from(u16::from_be_bytes(b)))
            else {
                bail!("PUBLISH without a topic");
            };
            p.body.advance((2 + tlen).min(p.body.len()));
            if qos > 0 {
                let Some(pid) = p.body.get(..2).and_then(|b| <[u8; 2]>::try_from(b).ok()) else {
                    bail!("PUBLISH without a packet id");
                };
                p.body.advance(2);
                acks.put_slice(&[0x40, 2]);
                acks.put_slice(&pid);
                ends.push(acks.len());
            }
            if c.v5 {
                skip_props(&mut p.body)?;
            }
            rec.message(&p.body, p.body.len());
        }
        rec.flush();
        if !acks.is_empty() {
            c.writer.send(&mut acks, &mut ends).await?;
        }
        if run.finished() {
            break;
        }
        let read = tokio::select! {
            r = c.reader.read(&mut c.input) => r?,
            () = run.stopped() => break,
        };
        if read == 0 {
            bail!("broker closed the subscriber's connection");
        }
    }
    let hist = rec.hist;
    c.close().await;
    Ok(hist)
}

//! A lean RabbitMQ Stream protocol client: one stream per run (or `--stream`),
//! producers publishing batches under a confirm window, consumers subscribing
//! with chunk credit (from `next`, or from `first` to measure replay).
//!
//! Frames come from the Stream adapter's pure codec (as the AMQP client uses
//! the AMQP adapter's), so this measures the broker rather than a client
//! library. Messages are the smallest AMQP 1.0 message a stream client sends:
//! one data section holding the body.

use anyhow::{bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use switchyard_stream::codec::{code, decode_frame, key, Reader as Fields, Writer as Frame};
use tokio::time::sleep_until;

use crate::run::{batch_limit, Counters, Pacer, Recorder, Shared};
use crate::transport::{self, Reader, Writer};

/// Chunks a consumer may have in flight (it returns one credit per chunk).
const CREDIT: u16 = 10;

pub struct Conn {
    reader: Reader,
    writer: Writer,
    input: BytesMut,
    correlation: u32,
}

/// The run's stream.
pub fn stream_name(run: &Shared) -> String {
    match &run.settings.stream {
        Some(name) => name.clone(),
        None => format!("perf-s-{}", run.settings.run_id),
    }
}

impl Conn {
    /// Connects and logs in: PeerProperties, SASL PLAIN, Tune, Open.
    pub async fn open(run: &Shared) -> Result<Conn> {
        let s = &run.settings;
        let (reader, writer) = transport::connect(s.addr, s.transport, &s.ws_path, "").await?;
        let mut c = Conn {
            reader,
            writer,
            input: BytesMut::with_capacity(64 * 1024),
            correlation: 0,
        };
        c.request(key::PEER_PROPERTIES, |w| {
            w.properties([("product", "switchyard-perf")].into_iter());
        })
        .await?;
        c.request(key::SASL_HANDSHAKE, |_| {}).await?;
        let mut plain = vec![0u8];
        plain.extend_from_slice(s.user.as_bytes());
        plain.push(0);
        plain.extend_from_slice(s.pass.as_bytes());
        let (status, _) = c
            .request(key::SASL_AUTHENTICATE, |w| {
                w.string("PLAIN")
                    .i32(i32::try_from(plain.len()).unwrap_or(0));
                w.raw(&plain);
            })
            .await?;
        if status != code::OK {
            bail!("stream login refused (code {status:#x})");
        }
        // The broker's Tune; we agree to it, without heartbeats.
        let (k, _, body) = c.recv().await?;
        if k != key::TUNE {
            bail!("expected Tune, got command {k:#x}");
        }
        let frame_max = Fields::new(body).u32()?;
        let mut out = BytesMut::new();
        let mut w = Frame::start(&mut out, key::TUNE, 1);
        w.u32(frame_max).u32(0);
        w.finish();
        c.writer.send_one(&out).await?;
        let vhost = s.vhost.clone();
        let (status, _) = c
            .request(key::OPEN, |w| {
                w.string(&vhost);
            })
            .await?;
        if status != code::OK {
            bail!("stream open refused (code {status:#x})");
        }
        Ok(c)
    }

    /// Sends a request (the correlation id is written first) and waits for its
    /// answer's code and the fields after it.
    async fn request(
        &mut self,
        k: u16,
        fields: impl FnOnce(&mut Frame<'_>),
    ) -> Result<(u16, Bytes)> {
        self.correlation += 1;
        let mut out = BytesMut::new();
        let mut w = Frame::start(&mut out, k, 1);
        w.u32(self.correlation);
        fields(&mut w);
        w.finish();
        self.writer.send_one(&out).await?;
        loop {
            let (got, _, body) = self.recv().await?;
            if got == k | key::RESPONSE {
                let mut f = Fields::new(body);
                let _correlation = f.u32()?;
                let status = f.u16()?;
                return Ok((status, f.raw(f.remaining())?));
            }
            if got == key::CLOSE {
                bail!("the broker closed the connection");
            }
        }
    }

    async fn recv(&mut self) -> Result<(u16, u16, Bytes)> {
        loop {
            if let Some(f) = decode_frame(&mut self.input, 0).map_err(|e| anyhow::anyhow!("{e}"))? {
                return Ok((f.key, f.version, f.body));
            }
            if self.reader.read(&mut self.input).await? == 0 {
                bail!("broker closed the connection");
            }
        }
    }

    pub async fn close(mut self) {
        self.writer.close().await;
    }
}

/// Creates the run's stream (one that exists already is fine).
pub async fn setup(run: &Shared) -> Result<()> {
    let mut c = Conn::open(run).await.context("setup connection")?;
    let name = stream_name(run);
    let (status, _) = c
        .request(key::CREATE, |w| {
            w.string(&name).count(0);
        })
        .await?;
    if status != code::OK && status != code::STREAM_ALREADY_EXISTS {
        bail!("cannot create stream {name} (code {status:#x})");
    }
    c.close().await;
    Ok(())
}

/// Deletes the run's stream unless `--stream` named it.
pub async fn teardown(run: &Shared) -> Result<()> {
    if run.settings.stream.is_some() {
        return Ok(());
    }
    let mut c = Conn::open(run).await?;
    let name = stream_name(run);
    c.request(key::DELETE, |w| {
        w.string(&name);
    })
    .await?;
    c.close().await;
    Ok(())
}

/// One message: an AMQP 1.0 data section holding `body`.
fn put_message(w: &mut Frame<'_>, id: u64, body: &[u8]) {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    w.u64(id);
    if body.len() < 256 {
        let short = u8::try_from(len).unwrap_or(u8::MAX);
        w.u32(len + 5).raw(&[0x00, 0x53, 0x75, 0xa0, short]);
    } else {
        w.u32(len + 8).raw(&[0x00, 0x53, 0x75, 0xb0]).u32(len);
    }
    w.raw(body);
}

pub async fn producer(run: Shared, _i: usize) -> Result<()> {
    let s = &run.settings;
    let mut c = Conn::open(&run).await?;
    let name = stream_name(&run);
    let (status, _) = c
        .request(key::DECLARE_PUBLISHER, |w| {
            // No reference (no deduplication): an empty string, which every
            // broker reads; RabbitMQ refuses a null one.
            w.u8(0).string("").string(&name);
        })
        .await?;
    if status != code::OK {
        bail!("declare publisher refused (code {status:#x})");
    }
    let Conn {
        reader,
        mut writer,
        input,
        ..
    } = c;
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let confirms = tokio::spawn(confirm_reader(run.clone(), reader, input, acked_tx));
    let mut body = run.body();
    let mut out = BytesMut::with_capacity(128 * 1024);
    let mut ends = Vec::new();
    let mut pacer = Pacer::new(s.producer_rate());
    let batch = batch_limit(s.size);
    let mut published = 0u64;
    // The Stream protocol always confirms; without -c the window is RabbitMQ's
    // default publisher credit.
    let window = s.confirm.unwrap_or(50_000);
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
        let mut w = Frame::start(&mut out, key::PUBLISH, 1);
        w.u8(0).i32(i32::try_from(due).unwrap_or(i32::MAX));
        for k in 0..due {
            run.stamp(&mut body);
            put_message(&mut w, published + k + 1, &body);
        }
        w.finish();
        ends.push(out.len());
        tokio::select! {
            r = writer.send(&mut out, &mut ends) => r?,
            () = run.stopped() => break,
        }
        published += due;
        pacer.sent(due);
        Counters::add(&run.counters.sent, due);
    }
    confirms.abort();
    writer.close().await;
    Ok(())
}

async fn confirm_reader(
    run: Shared,
    mut reader: Reader,
    mut input: BytesMut,
    acked: tokio::sync::watch::Sender<u64>,
) -> Result<()> {
    let mut total = 0u64;
    loop {
        let mut n = 0u64;
        while let Some(f) = decode_frame(&mut input, 0).map_err(|e| anyhow::anyhow!("{e}"))? {
            match f.key {
                key::PUBLISH_CONFIRM => {
                    let mut r = Fields::new(f.body);
                    let _publisher = r.u8()?;
                    n += u64::try_from(r.count()?).unwrap_or(0);
                }
                key::PUBLISH_ERROR => {
                    let mut r = Fields::new(f.body);
                    let _publisher = r.u8()?;
                    let errors = u64::try_from(r.count()?).unwrap_or(0);
                    Counters::add(&run.counters.nacked, errors);
                    n += errors;
                }
                key::CLOSE => bail!("the broker closed the producer's connection"),
                _ => {}
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

pub async fn consumer(
    run: Shared,
    i: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Result<hdrhistogram::Histogram<u64>> {
    let s = &run.settings;
    let mut c = Conn::open(&run).await?;
    let name = stream_name(&run);
    // 1 = first, 3 = next.
    let offset_type: u16 = if s.stream_first { 1 } else { 3 };
    let (status, _) = c
        .request(key::SUBSCRIBE, |w| {
            w.u8(0).string(&name).u16(offset_type).u16(CREDIT).count(0);
        })
        .await?;
    if status != code::OK {
        bail!("consumer {i}: subscribe refused (code {status:#x})");
    }
    let _ = ready.send(()).await;
    drop(ready);
    let mut rec = Recorder::new(run.clone())?;
    let mut out = BytesMut::new();
    let mut ends = Vec::new();
    loop {
        let mut chunks = 0u16;
        while let Some(f) = decode_frame(&mut c.input, 0).map_err(|e| anyhow::anyhow!("{e}"))? {
            match f.key {
                key::DELIVER => {
                    chunks += 1;
                    let mut body = f.body;
                    // Subscription id, and the committed chunk id in version 2.
                    body.advance(if f.version >= 2 { 9 } else { 1 });
                    read_chunk(&mut rec, body)?;
                }
                key::CLOSE => bail!("the broker closed the consumer's connection"),
                _ => {}
            }
        }
        rec.flush();
        if chunks > 0 {
            let mut w = Frame::start(&mut out, key::CREDIT, 1);
            w.u8(0).u16(chunks);
            w.finish();
            ends.push(out.len());
            c.writer.send(&mut out, &mut ends).await?;
        }
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
    c.close().await;
    Ok(hist)
}

/// Records every message of an osiris chunk (48-byte header, then entries).
fn read_chunk(rec: &mut Recorder, mut chunk: Bytes) -> Result<()> {
    if chunk.len() < 48 {
        bail!("a Deliver frame shorter than a chunk header");
    }
    let mut header = Fields::new(chunk.split_to(48));
    let _magic = header.u8()?;
    let _kind = header.u8()?;
    let entries = header.u16()?;
    let mut data = Fields::new(chunk);
    for _ in 0..entries {
        let size = data.u32()?;
        if size & 0x8000_0000 != 0 {
            bail!("sub-entry batches are not read by switchyard-perf");
        }
        let message = data.raw(usize::try_from(size).unwrap_or(usize::MAX))?;
        let body = data_section(&message);
        rec.message(body, body.len());
    }
    Ok(())
}

/// The body of a message that is one data section (what producers send), else
/// the whole message.
fn data_section(m: &[u8]) -> &[u8] {
    match m.get(..4) {
        Some([0x00, 0x53, 0x75, 0xa0]) => m.get(5..).unwrap_or_default(),
        Some([0x00, 0x53, 0x75, 0xb0]) => m.get(8..).unwrap_or_default(),
        _ => m,
    }
}

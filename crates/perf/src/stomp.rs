//! A lean STOMP 1.2 client: producers (with optional receipts), consumers (auto or
//! client acks) and idle connections.
//!
//! Frames (STOMP 1.2):
//!
//! ```text
//! frame   = command EOL *(header EOL) EOL body NUL *EOL
//! header  = name ":" value
//! body    = content-length octets, or up to the first NUL without it
//! ```
//!
//! Heart-beats are switched off (`heart-beat:0,0`); stray EOLs between frames are
//! skipped anyway.

use anyhow::{bail, Result};
use bytes::{Buf, BufMut, BytesMut};
use tokio::time::sleep_until;

use crate::run::{batch_limit, Counters, Pacer, Recorder, Shared, Topology};
use crate::transport::{self, Reader, Writer};

pub struct Conn {
    reader: Reader,
    writer: Writer,
    input: BytesMut,
}

/// One received frame: its command, headers and body.
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: BytesMut,
}

impl Frame {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Decodes one frame from the front of `buf`; Ok(None) until it is whole.
fn decode(buf: &mut BytesMut) -> Result<Option<Frame>> {
    // Heart-beat EOLs between frames.
    let skip = buf
        .iter()
        .take_while(|&&b| b == b'\n' || b == b'\r')
        .count();
    buf.advance(skip);
    let Some(end) = memchr::memmem::find(buf, b"\n\n") else {
        return Ok(None);
    };
    let head = buf.get(..end).unwrap_or_default();
    let head = std::str::from_utf8(head)?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let command = lines.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    let mut length = None;
    for line in lines {
        if let Some((n, v)) = line.split_once(':') {
            if n == "content-length" && length.is_none() {
                length = Some(v.trim().parse::<usize>()?);
            }
            headers.push((n.to_owned(), v.to_owned()));
        }
    }
    let body_at = end + 2;
    let body_len = match length {
        Some(n) => n,
        None => match memchr::memchr(0, buf.get(body_at..).unwrap_or_default()) {
            Some(n) => n,
            None => return Ok(None),
        },
    };
    if buf.len() < body_at + body_len + 1 {
        return Ok(None);
    }
    buf.advance(body_at);
    let body = buf.split_to(body_len);
    buf.advance(1); // NUL
    Ok(Some(Frame {
        command,
        headers,
        body,
    }))
}

fn put_frame(buf: &mut BytesMut, command: &str, headers: &[(&str, &str)], body: &[u8]) {
    buf.put_slice(command.as_bytes());
    buf.put_u8(b'\n');
    for (n, v) in headers {
        buf.put_slice(n.as_bytes());
        buf.put_u8(b':');
        buf.put_slice(v.as_bytes());
        buf.put_u8(b'\n');
    }
    buf.put_u8(b'\n');
    buf.put_slice(body);
    buf.put_u8(0);
}

impl Conn {
    pub async fn open(run: &Shared) -> Result<Conn> {
        let s = &run.settings;
        let (reader, writer) = transport::connect(
            s.addr,
            s.transport,
            &s.ws_path,
            "v12.stomp, v11.stomp, v10.stomp",
        )
        .await?;
        let mut c = Conn {
            reader,
            writer,
            input: BytesMut::with_capacity(64 * 1024),
        };
        let mut out = BytesMut::new();
        put_frame(
            &mut out,
            "CONNECT",
            &[
                ("accept-version", "1.2"),
                ("host", &s.vhost),
                ("login", &s.user),
                ("passcode", &s.pass),
                ("heart-beat", "0,0"),
            ],
            b"",
        );
        c.writer.send_one(&out).await?;
        let f = c.recv().await?;
        match f.command.as_str() {
            "CONNECTED" => Ok(c),
            "ERROR" => bail!("STOMP login refused: {}", f.get("message").unwrap_or("")),
            other => bail!("expected CONNECTED, got {other}"),
        }
    }

    async fn recv(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = decode(&mut self.input)? {
                return Ok(f);
            }
            if self.reader.read(&mut self.input).await? == 0 {
                bail!("broker closed the connection");
            }
        }
    }

    pub async fn close(mut self) {
        self.writer.finish(b"DISCONNECT\n\n\0").await;
    }
}

pub fn destination(run: &Shared, i: usize) -> String {
    let id = &run.settings.run_id;
    match run.settings.topology {
        Topology::Queue => format!("/queue/perf-q-{id}"),
        Topology::Pairs => format!("/queue/perf-q-{id}-{i}"),
        Topology::Fanout => format!("/topic/perf-t-{id}"),
    }
}

pub async fn producer(run: Shared, i: usize) -> Result<()> {
    let s = &run.settings;
    let c = Conn::open(&run).await?;
    let Conn {
        reader,
        mut writer,
        input,
    } = c;
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let ack_task = tokio::spawn(receipt_reader(run.clone(), reader, input, acked_tx));
    let dest = destination(&run, i);
    let len = s.size.to_string();
    let mut body = run.body();
    let mut out = BytesMut::with_capacity(128 * 1024);
    let mut ends = Vec::new();
    let mut pacer = Pacer::new(s.producer_rate());
    let batch = batch_limit(s.size);
    let mut published = 0u64;
    let window = s.confirm.unwrap_or(u64::MAX);
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
            run.stamp(&mut body);
            let receipt = (published + k).to_string();
            let mut headers = vec![
                ("destination", dest.as_str()),
                ("content-length", len.as_str()),
            ];
            if s.persistent {
                headers.push(("persistent", "true"));
            }
            if s.confirm.is_some() {
                headers.push(("receipt", receipt.as_str()));
            }
            put_frame(&mut out, "SEND", &headers, &body);
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
    writer.finish(b"DISCONNECT\n\n\0").await;
    Ok(())
}

async fn receipt_reader(
    run: Shared,
    mut reader: Reader,
    mut input: BytesMut,
    acked: tokio::sync::watch::Sender<u64>,
) -> Result<()> {
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while let Some(f) = decode(&mut input)? {
            match f.command.as_str() {
                "RECEIPT" => n += 1,
                "ERROR" => bail!("broker sent ERROR: {}", f.get("message").unwrap_or("")),
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
    let dest = destination(&run, i);
    let ack_mode = if s.multi_ack.is_some() {
        "client"
    } else {
        "auto"
    };
    let prefetch = s.prefetch.to_string();
    let mut headers = vec![
        ("id", "0"),
        ("destination", dest.as_str()),
        ("ack", ack_mode),
        ("receipt", "sub"),
    ];
    if s.prefetch > 0 {
        headers.push(("prefetch-count", prefetch.as_str()));
    }
    let mut out = BytesMut::new();
    put_frame(&mut out, "SUBSCRIBE", &headers, b"");
    c.writer.send_one(&out).await?;
    out.clear();
    loop {
        let f = c.recv().await?;
        match f.command.as_str() {
            "RECEIPT" => break,
            "ERROR" => bail!("SUBSCRIBE refused: {}", f.get("message").unwrap_or("")),
            _ => {}
        }
    }
    let _ = ready.send(()).await;
    drop(ready);
    let mut rec = Recorder::new(run.clone())?;
    let every = match (s.multi_ack, s.prefetch) {
        (Some(n), 0) => n.max(1),
        (Some(n), p) => n.max(1).min(u64::from(p).div_ceil(2)),
        (None, _) => u64::MAX,
    };
    let mut unacked = 0u64;
    let mut last_ack = String::new();
    let mut ends = Vec::new();
    loop {
        while let Some(f) = decode(&mut c.input)? {
            match f.command.as_str() {
                "MESSAGE" => {
                    rec.message(&f.body, f.body.len());
                    if s.multi_ack.is_some() {
                        unacked += 1;
                        // 1.2 names the ack id in `ack`; 1.0/1.1 brokers use message-id.
                        if let Some(id) = f.get("ack").or_else(|| f.get("message-id")) {
                            last_ack.clear();
                            last_ack.push_str(id);
                        }
                    }
                }
                "ERROR" => bail!("broker sent ERROR: {}", f.get("message").unwrap_or("")),
                _ => {}
            }
        }
        rec.flush();
        if unacked >= every {
            // `ack:client` is cumulative: one ACK covers every earlier message.
            put_frame(
                &mut out,
                "ACK",
                &[("id", &last_ack), ("message-id", &last_ack)],
                b"",
            );
            ends.push(out.len());
            c.writer.send(&mut out, &mut ends).await?;
            unacked = 0;
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

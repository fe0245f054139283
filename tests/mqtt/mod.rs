//! Helpers shared by the MQTT end-to-end tests: a raw MQTT client built on our
//! codec (for exact packets: reason codes, flags, bad input), and small
//! wrappers that run rumqttc's event loops in tasks and hand their events out
//! through channels.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchyard_mqtt::codec::{
    self, Ack, Connect, Decoder, LastWill, Packet, Properties, Publish, QoS, SubOptions, Subscribe,
    Version,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(10);

/// An MQTT client that sends and receives packets exactly as written.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    decoder: Decoder,
    pub version: Version,
}

pub fn connect_packet(version: Version, client_id: &str) -> Connect {
    Connect {
        version,
        clean_start: true,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: client_id.into(),
        will: None,
        username: Some("guest".into()),
        password: Some(Bytes::from_static(b"guest")),
    }
}

pub fn publish(topic: &str, qos: QoS, packet_id: u16, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

pub fn subscribe(packet_id: u16, filter: &str, qos: QoS) -> Subscribe {
    Subscribe {
        packet_id,
        properties: Properties::default(),
        filters: vec![(
            filter.into(),
            SubOptions {
                qos,
                ..SubOptions::default()
            },
        )],
    }
}

pub fn will(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain,
        properties: Properties::default(),
    }
}

impl Raw {
    /// Opens a TCP connection without sending anything.
    pub async fn open(addr: SocketAddr, version: Version) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut decoder = Decoder::new(usize::MAX);
        // Prime the decoder's version with a CONNECT of that version.
        let mut prime = BytesMut::new();
        codec::encode_unlimited(
            &Packet::Connect(Box::new(connect_packet(version, "x"))),
            version,
            &mut prime,
        );
        decoder.decode(&mut prime).unwrap();
        Raw {
            stream,
            buf: BytesMut::new(),
            decoder,
            version,
        }
    }

    /// Connects with `c` and returns the CONNACK.
    pub async fn connect_with(addr: SocketAddr, c: Connect) -> (Raw, codec::ConnAck) {
        let mut raw = Raw::open(addr, c.version).await;
        raw.send(&Packet::Connect(Box::new(c))).await;
        match raw.recv().await {
            Packet::ConnAck(a) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects as guest with a clean session; panics unless accepted.
    pub async fn connect(addr: SocketAddr, version: Version, client_id: &str) -> Raw {
        let (raw, ack) = Raw::connect_with(addr, connect_packet(version, client_id)).await;
        assert_eq!(ack.code, 0, "CONNACK {ack:?}");
        raw
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        codec::encode_unlimited(p, self.version, &mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.unwrap();
    }

    /// The next packet; fails the test after [`WAIT`] or on close.
    pub async fn recv(&mut self) -> Packet {
        match self.try_recv(WAIT).await {
            Some(p) => p,
            None => panic!("no packet within {WAIT:?}"),
        }
    }

    /// The next packet within `timeout`, or `None` (timeout or closed).
    pub async fn try_recv(&mut self, timeout: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.decoder.decode(&mut self.buf).unwrap() {
                return Some(p);
            }
            let mut chunk = vec![0u8; 65536];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next PUBLISH (skipping nothing: anything else fails the test).
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Reads until the broker closes; returns the packets it sent before.
    pub async fn expect_closed(&mut self) -> Vec<Packet> {
        let mut got = Vec::new();
        let closed = tokio::time::timeout(WAIT, async {
            loop {
                while let Ok(Some(p)) = self.decoder.decode(&mut self.buf) {
                    got.push(p);
                }
                let mut chunk = vec![0u8; 65536];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "connection still open; got {got:?}");
        got
    }

    /// Subscribes and returns the SUBACK codes.
    pub async fn subscribe(&mut self, s: Subscribe) -> Vec<u8> {
        let id = s.packet_id;
        self.send(&Packet::Subscribe(s)).await;
        match self.recv().await {
            Packet::SubAck(a) => {
                assert_eq!(a.packet_id, id);
                a.codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes QoS 1 and waits for the PUBACK; returns its reason code.
    pub async fn publish_qos1(&mut self, topic: &str, id: u16, payload: &[u8]) -> u8 {
        self.send(&Packet::Publish(publish(
            topic,
            QoS::AtLeastOnce,
            id,
            payload,
        )))
        .await;
        match self.recv().await {
            Packet::PubAck(a) => {
                assert_eq!(a.packet_id, id);
                a.reason
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    pub async fn puback(&mut self, id: u16) {
        self.send(&Packet::PubAck(Ack::new(id, 0))).await;
    }

    /// A PINGREQ/PINGRESP round trip: everything the broker sent before the
    /// PINGRESP is returned (a barrier: the broker handled what we sent).
    pub async fn sync(&mut self) -> Vec<Packet> {
        self.send(&Packet::PingReq).await;
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                Packet::PingResp => return before,
                p => before.push(p),
            }
        }
    }

    /// Sends DISCONNECT and waits for the close.
    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect(codec::Disconnect::default()))
            .await;
        self.expect_closed().await;
    }
}

/// rumqttc v4 client whose event loop runs in a task; events arrive on the
/// channel (errors end the stream).
pub fn v4_client(
    opts: rumqttc::MqttOptions,
) -> (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<rumqttc::Event>,
    tokio::task::JoinHandle<()>,
) {
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    (client, rx, task)
}

pub fn v4_opts(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_credentials("guest", "guest");
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Waits for the next event matching `pick`, skipping others.
pub async fn v4_next<T>(
    rx: &mut mpsc::UnboundedReceiver<rumqttc::Event>,
    mut pick: impl FnMut(rumqttc::Packet) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(rumqttc::Event::Incoming(p))) => {
                if let Some(t) = pick(p) {
                    return t;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("rumqttc event loop ended"),
            Err(_) => panic!("no matching event within {WAIT:?}"),
        }
    }
}

pub async fn v4_publish(rx: &mut mpsc::UnboundedReceiver<rumqttc::Event>) -> rumqttc::Publish {
    v4_next(rx, |p| match p {
        rumqttc::Packet::Publish(p) => Some(p),
        _ => None,
    })
    .await
}

pub async fn v4_suback(rx: &mut mpsc::UnboundedReceiver<rumqttc::Event>) -> rumqttc::SubAck {
    v4_next(rx, |p| match p {
        rumqttc::Packet::SubAck(a) => Some(a),
        _ => None,
    })
    .await
}

pub async fn v4_connack(rx: &mut mpsc::UnboundedReceiver<rumqttc::Event>) -> rumqttc::ConnAck {
    v4_next(rx, |p| match p {
        rumqttc::Packet::ConnAck(a) => Some(a),
        _ => None,
    })
    .await
}

use rumqttc::v5 as r5;

/// rumqttc v5 client whose event loop runs in a task.
pub fn v5_client(
    opts: r5::MqttOptions,
) -> (
    r5::AsyncClient,
    mpsc::UnboundedReceiver<r5::Event>,
    tokio::task::JoinHandle<()>,
) {
    let (client, mut el) = r5::AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    (client, rx, task)
}

pub fn v5_opts(addr: SocketAddr, id: &str) -> r5::MqttOptions {
    let mut o = r5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_credentials("guest", "guest");
    o.set_keep_alive(Duration::from_secs(30));
    o
}

pub async fn v5_next<T>(
    rx: &mut mpsc::UnboundedReceiver<r5::Event>,
    mut pick: impl FnMut(r5::mqttbytes::v5::Packet) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r5::Event::Incoming(p))) => {
                if let Some(t) = pick(p) {
                    return t;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("rumqttc v5 event loop ended"),
            Err(_) => panic!("no matching v5 event within {WAIT:?}"),
        }
    }
}

pub async fn v5_publish(rx: &mut mpsc::UnboundedReceiver<r5::Event>) -> r5::mqttbytes::v5::Publish {
    v5_next(rx, |p| match p {
        r5::mqttbytes::v5::Packet::Publish(p) => Some(p),
        _ => None,
    })
    .await
}

pub async fn v5_suback(rx: &mut mpsc::UnboundedReceiver<r5::Event>) -> r5::mqttbytes::v5::SubAck {
    v5_next(rx, |p| match p {
        r5::mqttbytes::v5::Packet::SubAck(a) => Some(a),
        _ => None,
    })
    .await
}

pub async fn v5_connack(rx: &mut mpsc::UnboundedReceiver<r5::Event>) -> r5::mqttbytes::v5::ConnAck {
    v5_next(rx, |p| match p {
        r5::mqttbytes::v5::Packet::ConnAck(a) => Some(a),
        _ => None,
    })
    .await
}

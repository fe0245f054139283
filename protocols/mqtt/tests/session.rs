//! The session state machine in memory, without sockets (quinn-proto style):
//! bytes in, packets out, deliveries through the outbox, time passed in.
// Test helpers outside #[test] functions fail a test by panicking, as tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use switchyard_core::auth::{hash_password, Auth};
use switchyard_core::Broker;
use switchyard_mqtt::codec::{
    self, Connect, Decoder, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version,
};
use switchyard_mqtt::session::{Now, Session};
use switchyard_mqtt::{MqttSettings, MqttState};

fn broker() -> Arc<Broker> {
    let mut auth = Auth::new();
    auth.add_user(
        "guest",
        &hash_password("guest", [1, 2, 3, 4]),
        vec![],
        false,
    )
    .unwrap();
    auth.set_permissions("guest", "/", ".*", ".*", ".*")
        .unwrap();
    Broker::new(auth, &[], 0)
}

struct Peer {
    session: Session,
    decoder: Decoder,
    version: Version,
}

impl Peer {
    fn new(b: &Arc<Broker>, state: &Arc<MqttState>, version: Version, id: &str) -> Peer {
        let session = Session::new(
            b.clone(),
            state.clone(),
            Arc::new(MqttSettings::default()),
            "127.0.0.1:9".parse().unwrap(),
        );
        let mut decoder = Decoder::new(usize::MAX);
        let connect = Connect {
            version,
            clean_start: true,
            keep_alive: 0,
            properties: Properties::default(),
            client_id: id.into(),
            will: None,
            username: Some("guest".into()),
            password: Some(Bytes::from_static(b"guest")),
        };
        let mut prime = BytesMut::new();
        codec::encode_unlimited(
            &Packet::Connect(Box::new(connect.clone())),
            version,
            &mut prime,
        );
        decoder.decode(&mut prime).unwrap();
        let mut p = Peer {
            session,
            decoder,
            version,
        };
        let out = p.send(&Packet::Connect(Box::new(connect)));
        assert!(
            matches!(out.as_slice(), [Packet::ConnAck(a)] if a.code == 0),
            "{out:?}"
        );
        p
    }

    /// Feeds a packet (one byte at a time, as a slow socket would) and returns
    /// what the session answered, deliveries included.
    fn send(&mut self, p: &Packet) -> Vec<Packet> {
        let mut bytes = BytesMut::new();
        codec::encode_unlimited(p, self.version, &mut bytes);
        let mut input = BytesMut::new();
        for b in bytes.iter() {
            input.extend_from_slice(&[*b]);
            self.session.handle_input(&mut input, Now::read());
        }
        self.poll()
    }

    fn poll(&mut self) -> Vec<Packet> {
        self.session.handle_outbox(Now::read());
        let out = self.session.output();
        let mut got = Vec::new();
        while let Some(p) = self.decoder.decode(out).unwrap() {
            got.push(p);
        }
        got
    }
}

#[test]
fn publish_routes_through_the_core_to_a_subscriber_session() {
    let b = broker();
    let state = MqttState::new();
    let mut sub = Peer::new(&b, &state, Version::V5, "sub");
    let out = sub.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![(
            "a/+".into(),
            SubOptions {
                qos: QoS::AtLeastOnce,
                ..SubOptions::default()
            },
        )],
    }));
    assert!(matches!(out.as_slice(), [Packet::SubAck(s)] if s.codes == [1]));
    assert!(b
        .vhost("/")
        .unwrap()
        .queue("mqtt-subscription-subqos1")
        .is_ok());

    let mut publ = Peer::new(&b, &state, Version::V311, "pub");
    let out = publ.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "a/b".into(),
        packet_id: 3,
        properties: Properties::default(),
        payload: Bytes::from_static(b"hi"),
    }));
    assert!(matches!(out.as_slice(), [Packet::PubAck(a)] if a.packet_id == 3));
    let got = sub.poll();
    let [Packet::Publish(p)] = got.as_slice() else {
        panic!("{got:?}")
    };
    assert_eq!(
        (&p.topic[..], p.qos, &p.payload[..]),
        ("a/b", QoS::AtLeastOnce, &b"hi"[..])
    );
    // Unacked: one message in flight in the queue.
    let q = b
        .vhost("/")
        .unwrap()
        .queue("mqtt-subscription-subqos1")
        .unwrap();
    assert_eq!(q.unacked_count(), 1);
    sub.send(&Packet::PubAck(codec::Ack::new(p.packet_id, 0)));
    assert_eq!(q.unacked_count(), 0);
    // A clean session's queues go with it.
    sub.session.finish("test over", Now::read());
    assert!(b
        .vhost("/")
        .unwrap()
        .queue("mqtt-subscription-subqos1")
        .is_err());
    assert_eq!(
        state.session_count(),
        1,
        "only the publisher's session is left"
    );
}

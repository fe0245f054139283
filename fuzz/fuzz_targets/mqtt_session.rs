//! Arbitrary bytes into a logged-in MQTT session on an in-process broker (no
//! sockets): after a valid CONNECT of the chosen version, anything may follow.
//! The session must never panic, whatever it answers.
#![no_main]

use std::sync::Arc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchyard_core::auth::{hash_password, Auth};
use switchyard_core::Broker;
use switchyard_mqtt::codec::{self, Packet, Version};
use switchyard_mqtt::session::{Now, Session};
use switchyard_mqtt::{MqttSettings, MqttState};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let version = if first % 2 == 0 { Version::V311 } else { Version::V5 };
    let mut auth = Auth::new();
    let _ = auth.add_user("guest", &hash_password("guest", [1, 2, 3, 4]), vec![], false);
    let _ = auth.set_permissions("guest", "/", ".*", ".*", ".*");
    let broker = Broker::new(auth, &[], 0);
    let state = MqttState::new();
    let settings = Arc::new(MqttSettings::default());
    let peer = "127.0.0.1:1".parse().unwrap();
    let mut s = Session::new(broker, state, settings, peer);
    let c = codec::Connect {
        version,
        clean_start: first & 2 == 0,
        keep_alive: 0,
        properties: Default::default(),
        client_id: "fuzz".into(),
        will: None,
        username: Some("guest".into()),
        password: Some(bytes::Bytes::from_static(b"guest")),
    };
    let mut input = BytesMut::new();
    codec::encode_unlimited(&Packet::Connect(Box::new(c)), version, &mut input);
    input.extend_from_slice(rest);
    let now = Now::read();
    // In a few pieces, as a socket would hand them over.
    let cut = rest.len() / 2;
    let mut buf = input.split_to(input.len() - (rest.len() - cut));
    s.handle_input(&mut buf, now);
    s.handle_outbox(now);
    buf.extend_from_slice(&input);
    s.handle_input(&mut buf, now);
    s.handle_outbox(now);
    s.output().clear();
    s.finish("fuzz done", now);
});

//! Arbitrary bytes into an AMQP 0-9-1 session on an in-process broker (no
//! sockets), after the protocol header and a valid handshake (start-ok with
//! PLAIN guest/guest, tune-ok, open of `/`): channels, declares, publishes and
//! whatever garbage follows. The session must never panic, whatever it answers.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use switchyard_amqp::codec;
use switchyard_amqp::session::Session;
use switchyard_amqp::AmqpSettings;
use switchyard_core::auth::{hash_password, Auth};
use switchyard_core::{Broker, FieldTable};

fuzz_target!(|data: &[u8]| {
    let mut auth = Auth::new();
    let _ = auth.add_user("guest", &hash_password("guest", [1, 2, 3, 4]), vec![], false);
    let _ = auth.set_permissions("guest", "/", ".*", ".*", ".*");
    let broker = Broker::new(auth, &[], 0);
    let settings = Arc::new(AmqpSettings {
        frame_max: 4096,
        channel_max: 8,
        heartbeat: 0,
        max_message_size: 1 << 16,
        handshake_timeout: Duration::from_secs(10),
        max_unacked_per_connection: 0,
    });
    let peer = "127.0.0.1:1".parse().unwrap();
    let mut s = Session::new(broker, settings, peer);
    let mut input = BytesMut::from(&codec::PROTOCOL_HEADER[..]);
    codec::encode_method(
        &mut input,
        0,
        &codec::ConnectionStartOk {
            client_properties: FieldTable::new(),
            mechanism: "PLAIN".into(),
            response: Bytes::from_static(b"\0guest\0guest"),
            locale: "en_US".into(),
        }
        .into(),
    );
    codec::encode_method(
        &mut input,
        0,
        &codec::ConnectionTuneOk {
            channel_max: 8,
            frame_max: 4096,
            heartbeat: 0,
        }
        .into(),
    );
    codec::encode_method(
        &mut input,
        0,
        &codec::ConnectionOpen {
            virtual_host: "/".into(),
            ..Default::default()
        }
        .into(),
    );
    let handshake = input.len();
    input.extend_from_slice(data);
    // In two pieces, as a socket would hand them over.
    let cut = handshake + data.len() / 2;
    let mut buf = input.split_to(cut);
    s.handle_input(&mut buf);
    s.handle_outbox();
    buf.extend_from_slice(&input);
    s.handle_input(&mut buf);
    s.handle_outbox();
    s.output().clear();
    s.finish("fuzz done".into());
});

//! Arbitrary bytes into a STOMP session on an in-process broker (no sockets),
//! after a valid CONNECT (guest/guest, version 1.0-1.2 chosen by the first
//! byte): SUBSCRIBE, SEND, ACK, transactions and garbage alike. The session must
//! never panic, whatever it answers.
#![no_main]

use std::sync::Arc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchyard_core::auth::{hash_password, Auth};
use switchyard_core::Broker;
use switchyard_stomp::session::Session;
use switchyard_stomp::StompSettings;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let version = ["1.0", "1.1", "1.2"][usize::from(first % 3)];
    let mut auth = Auth::new();
    let _ = auth.add_user("guest", &hash_password("guest", [1, 2, 3, 4]), vec![], false);
    let _ = auth.set_permissions("guest", "/", ".*", ".*", ".*");
    let broker = Broker::new(auth, &[], 0);
    let settings = Arc::new(StompSettings::default());
    let peer = "127.0.0.1:1".parse().unwrap();
    let mut s = Session::new(broker, settings, peer);
    let connect =
        format!("CONNECT\naccept-version:{version}\nhost:/\nlogin:guest\npasscode:guest\n\n\0");
    let mut input = BytesMut::from(connect.as_bytes());
    input.extend_from_slice(rest);
    let cut = connect.len() + rest.len() / 2;
    let mut buf = input.split_to(cut);
    s.handle_input(&mut buf);
    s.handle_outbox();
    buf.extend_from_slice(&input);
    s.handle_input(&mut buf);
    s.handle_outbox();
    s.finish("fuzz done".into());
});

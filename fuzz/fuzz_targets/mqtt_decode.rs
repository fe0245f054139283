//! Arbitrary bytes through the MQTT decoder, as a client of each version would
//! send them: it must never panic, and whatever it decodes must encode and decode
//! back to the same packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchyard_mqtt::codec::{self, Decoder, Packet, Version};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let version = match first % 4 {
        0 => None,
        1 => Some(Version::V31),
        2 => Some(Version::V311),
        _ => Some(Version::V5),
    };
    let mut d = Decoder::new(1 << 20);
    if let Some(v) = version {
        let c = codec::Connect {
            version: v,
            clean_start: true,
            keep_alive: 0,
            properties: Default::default(),
            client_id: "f".into(),
            will: None,
            username: None,
            password: None,
        };
        let mut prime = BytesMut::new();
        codec::encode_unlimited(&Packet::Connect(Box::new(c)), v, &mut prime);
        let _ = d.decode(&mut prime);
    }
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(p)) = d.decode(&mut buf) {
        let v = match &p {
            Packet::Connect(c) => c.version,
            _ => d.version().unwrap_or(Version::V311),
        };
        let mut out = BytesMut::new();
        codec::encode_unlimited(&p, v, &mut out);
        let again = codec::decode_one(&out, (!matches!(p, Packet::Connect(_))).then_some(v));
        assert_eq!(again, Ok(Some(p)), "re-encoded packet must decode the same");
    }
});

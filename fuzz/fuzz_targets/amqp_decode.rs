//! Arbitrary bytes, split at arbitrary points, through the AMQP 0-9-1 frame
//! decoder with a small frame-max: it must never panic, and every method it
//! decodes must encode and decode back to the same method.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchyard_amqp::codec::{self, Frame};

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(control).max(1);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match codec::decode_frame(&mut buf, 4096) {
                Ok(Some(Frame::Method { channel, method })) => {
                    let mut out = BytesMut::new();
                    codec::encode_method(&mut out, channel, &method);
                    match codec::decode_frame(&mut out, 0) {
                        Ok(Some(Frame::Method { method: back, .. })) => {
                            // Short strings over 255 bytes cannot come in; what came
                            // in must go out unchanged.
                            assert_eq!(back, method);
                        }
                        other => panic!("re-encoded method did not decode: {other:?}"),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

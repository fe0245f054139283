//! Fuzz target: arbitrary bytes, split at arbitrary points, through the STOMP
//! decoder in every version with small limits. It must never panic, and when the
//! stream decodes, re-encoding each frame and decoding it again must give the
//! same frame (for frames whose headers the version can carry).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchyard_stomp::codec::{Decoder, Limits, Version};

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let version = Version::ALL[usize::from(control % 3)];
    let step = usize::from(control / 3).max(1);
    let limits = Limits {
        max_headers: 16,
        max_header_length: 512,
        max_body: 4096,
    };
    let mut d = Decoder::new(limits);
    d.set_version(version);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(frame)) => {
                    // Round trip through the encoder with an explicit length.
                    let mut f = frame.clone();
                    f.headers.retain(|(k, _)| k != "content-length");
                    f.headers
                        .insert(0, ("content-length".into(), f.body.len().to_string()));
                    let carries = |s: &str| !s.contains('\r') && !s.contains('\n');
                    let unescaped = f.command.is_unescaped() || version == Version::V1_0;
                    let representable = !unescaped
                        || f.headers
                            .iter()
                            .all(|(k, v)| carries(k) && carries(v) && !k.contains(':'));
                    if representable && version != Version::V1_1 {
                        let mut again = Decoder::new(Limits {
                            max_headers: 64,
                            max_header_length: 8192,
                            max_body: 1 << 20,
                        });
                        again.set_version(version);
                        let mut bytes = f.to_bytes(version);
                        let back = again.decode(&mut bytes).ok().flatten();
                        assert_eq!(back.as_ref(), Some(&f));
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

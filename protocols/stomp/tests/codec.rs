//! The STOMP codec: known byte vectors from the three specs, every error, split
//! invariance (one byte at a time, any split), limits before buffering, and
//! proptest properties (round trip, any split, never panics on arbitrary bytes).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use switchyard_stomp::codec::{CodecError, Command, Decoder, Frame, Limits, Version};

fn decoder(version: Version) -> Decoder {
    let mut d = Decoder::new(Limits::default());
    d.set_version(version);
    d
}

/// Decodes everything in `bytes` fed at once; panics on error.
fn decode_all(version: Version, bytes: &[u8]) -> Vec<Frame> {
    let mut d = decoder(version);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = d.decode(&mut buf).unwrap() {
        out.push(f);
    }
    out
}

/// Decodes `bytes` fed in chunks of `step` bytes.
fn decode_chunked(
    version: Version,
    limits: Limits,
    bytes: &[u8],
    step: usize,
) -> Result<Vec<Frame>, CodecError> {
    let mut d = Decoder::new(limits);
    d.set_version(version);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in bytes.chunks(step.max(1)) {
        buf.extend_from_slice(chunk);
        while let Some(f) = d.decode(&mut buf)? {
            out.push(f);
        }
    }
    Ok(out)
}

fn decode_err(version: Version, limits: Limits, bytes: &[u8]) -> CodecError {
    let mut d = Decoder::new(limits);
    d.set_version(version);
    let mut buf = BytesMut::from(bytes);
    loop {
        match d.decode(&mut buf) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("no error; waiting for more bytes"),
            Err(e) => return e,
        }
    }
}

// ---- known vectors ----

#[test]
fn the_1_2_spec_example_frames() {
    let frames = decode_all(
        Version::V1_2,
        b"SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\0",
    );
    assert_eq!(frames.len(), 1);
    let f = &frames[0];
    assert_eq!(f.command, Command::Send);
    assert_eq!(f.get("destination"), Some("/queue/a"));
    assert_eq!(f.get("content-type"), Some("text/plain"));
    assert_eq!(&f.body[..], b"hello queue a");
}

#[test]
fn crlf_line_endings_of_1_2() {
    let frames = decode_all(
        Version::V1_2,
        b"SEND\r\ndestination:/queue/a\r\nreceipt:77\r\n\r\nbody\0",
    );
    assert_eq!(frames[0].get("destination"), Some("/queue/a"));
    assert_eq!(frames[0].get("receipt"), Some("77"));
    assert_eq!(&frames[0].body[..], b"body");
}

#[test]
fn repeated_headers_keep_all_and_the_first_wins() {
    let f = &decode_all(Version::V1_2, b"MESSAGE\nfoo:World\nfoo:Hello\n\n\0")[0];
    assert_eq!(f.get("foo"), Some("World"));
    assert_eq!(f.headers.len(), 2);
}

#[test]
fn content_length_bodies_may_hold_nul() {
    let f = &decode_all(
        Version::V1_2,
        b"SEND\ndestination:/queue/a\ncontent-length:5\n\na\0b\0c\0",
    )[0];
    assert_eq!(&f.body[..], b"a\0b\0c");
}

#[test]
fn heartbeat_eols_between_frames_are_skipped() {
    let frames = decode_all(
        Version::V1_2,
        b"\n\r\n\nBEGIN\ntransaction:t\n\n\0\n\n\r\nCOMMIT\ntransaction:t\n\n\0\n",
    );
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].command, Command::Begin);
    assert_eq!(frames[1].command, Command::Commit);
}

#[test]
fn escapes_decode_per_version_and_never_on_connect() {
    let raw = b"SEND\nde\\cst:a\\nb\\\\c\\cd\n\n\0";
    let f = &decode_all(Version::V1_1, raw)[0];
    assert_eq!(f.get("de:st"), Some("a\nb\\c:d"));
    let f = &decode_all(Version::V1_2, b"SEND\nx:a\\rb\n\n\0")[0];
    assert_eq!(f.get("x"), Some("a\rb"));
    // 1.0 has no escapes: the bytes stay.
    let f = &decode_all(Version::V1_0, raw)[0];
    assert_eq!(f.get("de\\cst"), Some("a\\nb\\\\c\\cd"));
    // CONNECT / STOMP are never unescaped, whatever the version.
    let f = &decode_all(Version::V1_2, b"CONNECT\npasscode:a\\b\n\n\0")[0];
    assert_eq!(f.get("passcode"), Some("a\\b"));
    let f = &decode_all(Version::V1_2, b"STOMP\nlogin:x\\cy\n\n\0")[0];
    assert_eq!(f.get("login"), Some("x\\cy"));
}

#[test]
fn colons_in_values_are_kept() {
    let f = &decode_all(Version::V1_0, b"SEND\ndestination:/queue/a:b:c\n\n\0")[0];
    assert_eq!(f.get("destination"), Some("/queue/a:b:c"));
}

#[test]
fn encoding_escapes_per_version_and_not_on_connected() {
    let f = Frame::new(Command::Message)
        .header("a:b", "x\ny:z\\w\rq")
        .body(&b"hi"[..]);
    assert_eq!(
        &f.to_bytes(Version::V1_2)[..],
        b"MESSAGE\na\\cb:x\\ny\\cz\\\\w\\rq\n\nhi\0"
    );
    assert_eq!(
        &f.to_bytes(Version::V1_1)[..],
        b"MESSAGE\na\\cb:x\\ny\\cz\\\\w\rq\n\nhi\0"
    );
    // 1.0 cannot carry CR/LF in a header: they become spaces, colons stay.
    assert_eq!(
        &f.to_bytes(Version::V1_0)[..],
        b"MESSAGE\na:b:x y:z\\w q\n\nhi\0"
    );
    let c = Frame::new(Command::Connected).header("server", "a:b");
    assert_eq!(
        &c.to_bytes(Version::V1_2)[..],
        b"CONNECTED\nserver:a:b\n\n\0"
    );
}

// ---- errors ----

#[test]
fn every_bad_input_is_an_error_with_what_was_wrong() {
    let l = Limits::default();
    let v = Version::V1_2;
    assert_eq!(
        decode_err(v, l, b"FOO\n\n\0"),
        CodecError::UnknownCommand {
            command: "FOO".into()
        }
    );
    // A lower-case command is not a command.
    assert!(matches!(
        decode_err(v, l, b"send\n\n\0"),
        CodecError::UnknownCommand { .. }
    ));
    assert_eq!(
        decode_err(v, l, b"SEND\nnocolon\n\n\0"),
        CodecError::NoColon { offset: 5 }
    );
    assert!(matches!(
        decode_err(v, l, b"SEND\nx:a\\tb\n\n\0"),
        CodecError::BadEscape { offset: 8, .. }
    ));
    assert!(matches!(
        decode_err(Version::V1_1, l, b"SEND\nx:a\\rb\n\n\0"),
        CodecError::BadEscape { .. }
    ));
    assert_eq!(
        decode_err(v, l, b"SEND\ncontent-length:12a\n\n\0"),
        CodecError::BadContentLength {
            value: "12a".into()
        }
    );
    assert!(matches!(
        decode_err(v, l, b"SEND\ncontent-length:-1\n\n\0"),
        CodecError::BadContentLength { .. }
    ));
    assert_eq!(
        decode_err(v, l, b"SEND\ncontent-length:2\n\nabc\0"),
        CodecError::MissingNul {
            length: 2,
            found: b'c'
        }
    );
    assert!(matches!(
        decode_err(v, l, b"SEND\nx:\xff\xfe\n\n\0"),
        CodecError::NotUtf8 { .. }
    ));
    // Every error has a short summary and a readable text.
    let e = decode_err(v, l, b"SEND\nx:a\\tb\n\n\0");
    assert_eq!(e.summary(), "bad header escape");
    assert!(e.to_string().contains("'\\t'"), "{e}");
}

#[test]
fn limits_are_checked_before_the_rest_is_buffered() {
    let l = Limits {
        max_headers: 3,
        max_header_length: 300,
        max_body: 1000,
    };
    let v = Version::V1_2;
    // The fourth header line fails as it ends, with no blank line in sight.
    let mut d = Decoder::new(l);
    let mut buf = BytesMut::from(&b"SEND\na:1\nb:2\nc:3\nd:4\n"[..]);
    assert_eq!(
        d.decode(&mut buf),
        Err(CodecError::TooManyHeaders { limit: 3 })
    );
    // A line over the limit fails before its LF arrives.
    let mut d = Decoder::new(l);
    let mut buf = BytesMut::from(&b"SEND\nx:"[..]);
    buf.extend_from_slice(&[b'y'; 400]);
    assert!(matches!(
        d.decode(&mut buf),
        Err(CodecError::HeaderTooLong { limit: 300, .. })
    ));
    // content-length over the body limit fails before any body byte.
    let mut d = Decoder::new(l);
    let mut buf = BytesMut::from(&b"SEND\ncontent-length:1001\n\n"[..]);
    assert_eq!(
        d.decode(&mut buf),
        Err(CodecError::BodyTooLarge {
            size: 1001,
            limit: 1000
        })
    );
    // Without content-length: once the limit is passed without a NUL.
    let mut d = Decoder::new(l);
    let mut buf = BytesMut::from(&b"SEND\n\n"[..]);
    assert_eq!(d.decode(&mut buf), Ok(None));
    buf.extend_from_slice(&[b'z'; 1001]);
    assert!(matches!(
        d.decode(&mut buf),
        Err(CodecError::BodyTooLarge { limit: 1000, .. })
    ));
    // Exactly at the limits is fine.
    let mut ok = b"SEND\na:1\nb:2\ncontent-length:1000\n\n".to_vec();
    ok.extend_from_slice(&[b'q'; 1000]);
    ok.push(0);
    assert_eq!(decode_chunked(v, l, &ok, 7).unwrap()[0].body.len(), 1000);
}

// ---- split invariance ----

fn sample_stream() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(b"\n\r\n");
    s.extend_from_slice(b"SEND\r\ndestination:/queue/a\r\ncontent-length:4\r\n\r\na\0\nb\0\n");
    s.extend_from_slice(b"SUBSCRIBE\nid:0\ndestination:/topic/x.*\nack:client\n\n\0");
    s.extend_from_slice(b"SEND\ndestination:/queue/b\nk:v\\c\\n\nk:second\n\nno length\0\n\n");
    s.extend_from_slice(b"ACK\nid:12\n\n\0");
    s
}

#[test]
fn one_byte_at_a_time_gives_the_same_frames() {
    let whole = decode_all(Version::V1_2, &sample_stream());
    assert_eq!(whole.len(), 4);
    assert_eq!(&whole[0].body[..], b"a\0\nb");
    assert_eq!(whole[2].get("k"), Some("v:\n"));
    for step in [1, 2, 3, 5, 8, 13, 64] {
        let got = decode_chunked(Version::V1_2, Limits::default(), &sample_stream(), step).unwrap();
        assert_eq!(got, whole, "step {step}");
    }
}

#[test]
fn byte_at_a_time_is_linear_in_the_frame_size() {
    // 1000 headers and a 512 KiB body without content-length, fed one byte per
    // call: a decoder that rescanned from the frame start on every call would
    // do ~10^11 byte comparisons here and never finish in a test run.
    let mut frame = b"SEND\n".to_vec();
    for i in 0..1000 {
        frame.extend_from_slice(format!("h{i}:value-{i}\n").as_bytes());
    }
    frame.extend_from_slice(b"\n");
    frame.extend_from_slice(&vec![b'x'; 512 * 1024]);
    frame.push(0);
    let got = decode_chunked(Version::V1_2, Limits::default(), &frame, 1).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers.len(), 1000);
    assert_eq!(got[0].body.len(), 512 * 1024);
}

#[test]
fn bodies_are_slices_of_the_read_buffer() {
    let mut d = decoder(Version::V1_2);
    let mut buf = BytesMut::from(&b"SEND\ncontent-length:3\n\nabc\0"[..]);
    let start = buf.as_ptr() as usize;
    let f = d.decode(&mut buf).unwrap().unwrap();
    let body_at = f.body.as_ptr() as usize;
    assert_eq!(
        body_at - start,
        b"SEND\ncontent-length:3\n\n".len(),
        "no copy"
    );
}

// ---- properties ----

fn header_text(version: Version, unescaped: bool) -> BoxedStrategy<String> {
    // What each version can carry in a header: 1.0 and unescaped frames no CR/LF
    // (and no ':' in names, handled by the caller); 1.1 no CR (it has no escape
    // for it, and CR before LF reads as an EOL).
    let chars = match (version, unescaped) {
        (_, true) | (Version::V1_0, _) => "[a-zA-Z0-9 :/._\\-\\\\é]{0,12}",
        (Version::V1_1, _) => "[a-zA-Z0-9 :/._\\-\\\\\n é]{0,12}",
        (Version::V1_2, _) => "[a-zA-Z0-9 :/._\\-\\\\\n\r é]{0,12}",
    };
    chars.prop_map(|s| s).boxed()
}

fn any_frame() -> impl Strategy<Value = (Version, Frame)> {
    let version = prop_oneof![
        Just(Version::V1_0),
        Just(Version::V1_1),
        Just(Version::V1_2)
    ];
    let command = proptest::sample::select(Command::ALL.to_vec());
    (version, command).prop_flat_map(|(version, command)| {
        let unescaped = command.is_unescaped() || version == Version::V1_0;
        let name = header_text(version, unescaped).prop_map(move |n| {
            let n = if unescaped { n.replace(':', "_") } else { n };
            if n.is_empty() || n == "content-length" {
                "h".to_owned()
            } else {
                n
            }
        });
        let headers = proptest::collection::vec((name, header_text(version, unescaped)), 0..6);
        let body = proptest::collection::vec(any::<u8>(), 0..200);
        (Just(version), Just(command), headers, body).prop_map(|(v, c, headers, body)| {
            let mut f = Frame::new(c);
            for (k, val) in headers {
                f = f.header(k, val);
            }
            let f = f.header("content-length", body.len().to_string());
            (v, f.body(Bytes::from(body)))
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn round_trip((version, frame) in any_frame()) {
        let bytes = frame.to_bytes(version);
        let got = decode_all(version, &bytes);
        prop_assert_eq!(got, vec![frame]);
    }

    #[test]
    fn any_split_gives_the_same_frames(
        frames in proptest::collection::vec(any_frame(), 1..4),
        eols in proptest::collection::vec(0usize..3, 4),
        step in 1usize..40,
    ) {
        // All frames of one stream share the first one's version.
        let version = frames[0].0;
        let frames: Vec<Frame> = frames
            .into_iter()
            .filter(|(v, _)| *v == version)
            .map(|(_, f)| f)
            .collect();
        let mut bytes = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            bytes.extend(std::iter::repeat_n(b'\n', eols[i % eols.len()]));
            bytes.extend_from_slice(&f.to_bytes(version));
        }
        let got = decode_chunked(version, Limits::default(), &bytes, step).unwrap();
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        step in 1usize..50,
        v in 0usize..3,
    ) {
        let limits = Limits { max_headers: 8, max_header_length: 256, max_body: 300 };
        let _ = decode_chunked(Version::ALL[v], limits, &bytes, step);
    }

    #[test]
    fn stomp_shaped_noise_never_panics(
        parts in proptest::collection::vec(
            prop_oneof![
                Just(b"SEND\n".to_vec()), Just(b"MESSAGE\n".to_vec()), Just(b"\n".to_vec()),
                Just(b"\r\n".to_vec()), Just(b"\0".to_vec()), Just(b"content-length:".to_vec()),
                Just(b"3".to_vec()), Just(b"\\".to_vec()), Just(b":".to_vec()),
                Just(b"a".to_vec()), Just(b"\\c".to_vec()), Just(b"CONNECT\n".to_vec()),
            ],
            0..60,
        ),
        step in 1usize..10,
    ) {
        let bytes: Vec<u8> = parts.concat();
        let limits = Limits { max_headers: 8, max_header_length: 64, max_body: 64 };
        let _ = decode_chunked(Version::V1_2, limits, &bytes, step);
    }

    #[test]
    fn over_limit_bodies_are_refused(extra in 1usize..100) {
        let limits = Limits { max_headers: 8, max_header_length: 256, max_body: 100 };
        let frame = Frame::new(Command::Send)
            .header("content-length", (100 + extra).to_string())
            .body(vec![b'x'; 100 + extra]);
        let err = decode_chunked(Version::V1_2, limits, &frame.to_bytes(Version::V1_2), 1000);
        let refused = matches!(err, Err(CodecError::BodyTooLarge { .. }));
        prop_assert!(refused);
    }
}

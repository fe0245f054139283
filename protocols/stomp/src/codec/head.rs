//! The nom parsers for a frame's head: the command line and the header lines.
//!
//! They run once over a head whose end (the blank line) the decoder has already
//! found, so they use nom's `complete` parsers: a head never has to be re-parsed
//! because more bytes arrived. What stays outside nom is the version-dependent
//! unescaping of names and values, a byte loop that reports the exact offset of a
//! bad sequence.

use nom::bytes::complete::{tag, take_till};
use nom::combinator::opt;
use nom::sequence::terminated;
use nom::{IResult, Parser};

use super::error::{CodecError, Escaped};
use super::Version;

/// One line up to LF; a CR before the LF is dropped (EOL = [CR] LF).
pub(crate) fn line(input: &[u8]) -> IResult<&[u8], &[u8]> {
    let (rest, text) = terminated(take_till(|b| b == b'\n'), tag(&b"\n"[..])).parse(input)?;
    Ok((rest, text.strip_suffix(b"\r").unwrap_or(text)))
}

/// `header = header-name ":" header-value`: splits at the first colon. Colons in
/// the value are kept (1.0 has no escape for them and clients send them).
pub(crate) fn header(input: &[u8]) -> IResult<&[u8], Header<'_>> {
    let (rest, name) = take_till(|b| b == b':').parse(input)?;
    let (value, colon) = opt(tag(&b":"[..])).parse(rest)?;
    Ok((&[], (name, colon.map(|_| value))))
}

/// A header line split into name and value; no value when the line has no `:`.
pub(crate) type Header<'a> = (&'a [u8], Option<&'a [u8]>);

/// How header text is escaped on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escaping {
    /// STOMP 1.0, and CONNECT / STOMP / CONNECTED frames in every version.
    None,
    /// STOMP 1.1: `\n`, `\c`, `\\`.
    V11,
    /// STOMP 1.2: 1.1's and `\r`.
    V12,
}

impl Escaping {
    pub(crate) fn for_version(version: Version) -> Self {
        match version {
            Version::V1_0 => Escaping::None,
            Version::V1_1 => Escaping::V11,
            Version::V1_2 => Escaping::V12,
        }
    }

    /// Decodes one header name or value. `offset` is where `raw` starts in the
    /// frame, for the error.
    pub(crate) fn decode(self, raw: &[u8], offset: usize) -> Result<String, CodecError> {
        let text = if self == Escaping::None || !raw.contains(&b'\\') {
            raw.to_vec()
        } else {
            let mut out = Vec::with_capacity(raw.len());
            let mut bytes = raw.iter().enumerate();
            while let Some((i, &b)) = bytes.next() {
                if b != b'\\' {
                    out.push(b);
                    continue;
                }
                let next = bytes.next().map(|(_, &n)| n);
                let decoded = match (next, self) {
                    (Some(b'n'), _) => b'\n',
                    (Some(b'c'), _) => b':',
                    (Some(b'\\'), _) => b'\\',
                    (Some(b'r'), Escaping::V12) => b'\r',
                    (sequence, _) => {
                        let (version, allowed) = if self == Escaping::V12 {
                            ("1.2", "\\r \\n \\c \\\\")
                        } else {
                            ("1.1", "\\n \\c \\\\")
                        };
                        return Err(CodecError::BadEscape {
                            offset: offset + i,
                            sequence: Escaped(sequence),
                            version,
                            allowed,
                        });
                    }
                };
                out.push(decoded);
            }
            out
        };
        String::from_utf8(text).map_err(|_| CodecError::NotUtf8 { offset })
    }

    /// Appends `text` escaped. 1.0 cannot carry CR or LF in a header at all, so
    /// they become spaces there rather than break the frame.
    pub(crate) fn encode(self, text: &str, out: &mut bytes::BytesMut) {
        let needs = |b: u8| match self {
            Escaping::None => b == b'\n' || b == b'\r',
            Escaping::V11 => b == b'\n' || b == b':' || b == b'\\',
            Escaping::V12 => b == b'\n' || b == b'\r' || b == b':' || b == b'\\',
        };
        let bytes = text.as_bytes();
        if !bytes.iter().any(|&b| needs(b)) {
            out.extend_from_slice(bytes);
            return;
        }
        for &b in bytes {
            if !needs(b) {
                out.extend_from_slice(&[b]);
                continue;
            }
            let escaped: &[u8] = match (self, b) {
                (Escaping::None, _) => b" ",
                (_, b'\n') => b"\\n",
                (_, b'\r') => b"\\r",
                (_, b':') => b"\\c",
                _ => b"\\\\",
            };
            out.extend_from_slice(escaped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_drop_cr_and_headers_split_at_the_first_colon() {
        assert_eq!(line(b"SEND\r\nx").unwrap(), (&b"x"[..], &b"SEND"[..]));
        assert_eq!(line(b"a:b\n").unwrap(), (&b""[..], &b"a:b"[..]));
        assert!(line(b"no end").is_err());
        assert_eq!(header(b"a:b:c").unwrap().1, (&b"a"[..], Some(&b"b:c"[..])));
        assert_eq!(header(b"a:").unwrap().1, (&b"a"[..], Some(&b""[..])));
        assert_eq!(header(b"abc").unwrap().1, (&b"abc"[..], None));
    }

    #[test]
    fn escapes_per_version() {
        let v12 = Escaping::V12.decode(br"a\nb\cc\\d\re", 0).unwrap();
        assert_eq!(v12, "a\nb:c\\d\re");
        assert!(matches!(
            Escaping::V11.decode(br"x\r", 10),
            Err(CodecError::BadEscape { offset: 11, .. })
        ));
        assert!(matches!(
            Escaping::V12.decode(br"x\t", 0),
            Err(CodecError::BadEscape { .. })
        ));
        assert!(matches!(
            Escaping::V12.decode(b"x\\", 0),
            Err(CodecError::BadEscape {
                sequence: Escaped(None),
                ..
            })
        ));
        assert_eq!(Escaping::None.decode(br"a\tb", 0).unwrap(), r"a\tb");
        let mut out = bytes::BytesMut::new();
        Escaping::V12.encode("a:b\nc\\d\re", &mut out);
        assert_eq!(&out[..], br"a\cb\nc\\d\re");
        out.clear();
        Escaping::V11.encode("a\rb", &mut out);
        assert_eq!(&out[..], b"a\rb");
    }
}

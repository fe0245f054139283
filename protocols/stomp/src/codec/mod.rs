//! STOMP wire codec: bytes <-> frames, for STOMP 1.0, 1.1 and 1.2. Pure: no I/O,
//! no async, no core calls.
//!
//! Grammar (STOMP 1.2 "Augmented BNF", with what 1.0 and 1.1 change):
//!
//! ```text
//! frame-stream = 1*( *EOL frame )          ; EOLs between frames are heart-beats
//! frame        = command EOL *( header EOL ) EOL *OCTET NULL
//! EOL          = [CR] LF                   ; CR LF is 1.2's; accepted in every version
//! command      = "CONNECT" / "STOMP" / "SEND" / "SUBSCRIBE" / "UNSUBSCRIBE" / "BEGIN"
//!              / "COMMIT" / "ABORT" / "ACK" / "NACK" / "DISCONNECT"
//!              / "CONNECTED" / "MESSAGE" / "RECEIPT" / "ERROR"
//! header       = header-name ":" header-value   ; split at the first ':'
//! escapes      = 1.0: none; 1.1: \n \c \\ ; 1.2: \r \n \c \\ ; any other is fatal.
//!                CONNECT, STOMP and CONNECTED are never escaped (1.1/1.2 rule).
//! body         = content-length octets (may hold NULs) then NULL, or, without
//!                content-length, every octet up to the first NULL.
//! repeated headers: the first occurrence wins (kept in order, see Frame::get).
//! ```
//!
//! Decoding is incremental and linear in the frame size however the bytes arrive:
//! [`Decoder`] remembers how far it has scanned (for the blank line ending the
//! head, then for the NUL ending the body) and never rescans. The head is parsed
//! once with nom (see `head`) when its end is known. Limits come first: a line
//! longer than `max_header_length` fails as soon as that many bytes of it are
//! buffered, the header count as the line crossing it ends, a `content-length`
//! over `max_body` before any of the body is buffered, and a body without
//! `content-length` once `max_body` bytes arrived without a NUL. "Need more bytes"
//! is `Ok(None)`. Bodies are slices of the read buffer, never copies.
//!
//! What the codec does not do: check that a command is valid from this peer, that
//! required headers are present or that the frame fits the session's state. That
//! is the session's job.

mod error;
mod head;

use bytes::{Buf, Bytes, BytesMut};
use switchyard_driver::Sink;

pub use error::{CodecError, Escaped};
pub use head::Escaping;

/// A STOMP protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V1_0,
    V1_1,
    V1_2,
}

impl Version {
    /// Every version this codec speaks, oldest first.
    pub const ALL: [Version; 3] = [Version::V1_0, Version::V1_1, Version::V1_2];

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    pub fn parse(s: &str) -> Option<Version> {
        match s.trim() {
            "1.0" => Some(Version::V1_0),
            "1.1" => Some(Version::V1_1),
            "1.2" => Some(Version::V1_2),
            _ => None,
        }
    }
}

/// The frame commands of STOMP 1.0 to 1.2, client's and server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Begin,
    Commit,
    Abort,
    Ack,
    Nack,
    Disconnect,
    Connected,
    Message,
    Receipt,
    Error,
}

impl Command {
    pub const ALL: [Command; 15] = [
        Command::Connect,
        Command::Stomp,
        Command::Send,
        Command::Subscribe,
        Command::Unsubscribe,
        Command::Begin,
        Command::Commit,
        Command::Abort,
        Command::Ack,
        Command::Nack,
        Command::Disconnect,
        Command::Connected,
        Command::Message,
        Command::Receipt,
        Command::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Disconnect => "DISCONNECT",
            Command::Connected => "CONNECTED",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
        }
    }

    pub fn parse(bytes: &[u8]) -> Option<Command> {
        Command::ALL
            .into_iter()
            .find(|c| c.as_str().as_bytes() == bytes)
    }

    /// The frames whose headers are never escaped (STOMP 1.1 and 1.2: "CONNECT and
    /// CONNECTED frames do not escape", and STOMP is CONNECT's other name).
    pub fn is_unescaped(self) -> bool {
        matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }
}

/// One frame: a command, its headers in wire order, and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    /// In the order received; a name may repeat, and then the first one counts.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Frame {
    pub fn new(command: Command) -> Self {
        Frame {
            command,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header (builder style).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body (builder style).
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The value of header `name`: the first occurrence, as STOMP 1.2 says
    /// ("only the first header entry SHOULD be used").
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Encodes the frame as it is (no header is added: callers that need
    /// `content-length` put it in).
    pub fn encode(&self, version: Version, out: &mut BytesMut) {
        let mut w = FrameWriter::start(out, self.command, version);
        for (k, v) in &self.headers {
            w.header(k, v);
        }
        w.finish(&self.body);
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self, version: Version) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode(version, &mut out);
        out
    }
}

/// Writes one frame straight into an output buffer, escaping headers as the
/// version and command require; used for MESSAGE frames so a delivery costs no
/// intermediate header list.
pub struct FrameWriter<'a, O: Sink = BytesMut> {
    out: &'a mut O,
    escaping: Escaping,
}

impl<'a, O: Sink> FrameWriter<'a, O> {
    pub fn start(out: &'a mut O, command: Command, version: Version) -> Self {
        let buf = out.bytes();
        buf.extend_from_slice(command.as_str().as_bytes());
        buf.extend_from_slice(b"\n");
        let escaping = if command.is_unescaped() {
            Escaping::None
        } else {
            Escaping::for_version(version)
        };
        FrameWriter { out, escaping }
    }

    pub fn header(&mut self, name: &str, value: &str) {
        let buf = self.out.bytes();
        self.escaping.encode(name, buf);
        buf.extend_from_slice(b":");
        self.escaping.encode(value, buf);
        buf.extend_from_slice(b"\n");
    }

    /// Ends the head, appends the body and the closing NUL.
    pub fn finish(self, body: &[u8]) {
        let buf = self.out.bytes();
        buf.extend_from_slice(b"\n");
        buf.extend_from_slice(body);
        buf.extend_from_slice(b"\0");
    }

    /// As [`FrameWriter::finish`], for a message body: a large one is
    /// written from its own buffer (see `switchyard_driver::Output`).
    pub fn finish_body(self, body: &Bytes) {
        self.out.bytes().extend_from_slice(b"\n");
        self.out.put_body(body);
        self.out.bytes().extend_from_slice(b"\0");
    }
}

/// Limits on what one frame may hold; checked before the bytes are buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Header lines per frame.
    pub max_headers: usize,
    /// Bytes per command or header line, as on the wire (escaped), without EOL.
    pub max_header_length: usize,
    /// Bytes of body.
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_headers: 1000,
            max_header_length: 102_400,
            max_body: 134_217_728,
        }
    }
}

/// Where the decoder is within the current frame.
#[derive(Debug)]
enum State {
    /// Looking for the blank line that ends the head.
    Head {
        /// Bytes of the frame already looked at for LF.
        scanned: usize,
        /// Where the line being scanned starts.
        line_start: usize,
        /// Complete lines so far (the command line included).
        lines: usize,
    },
    /// The head is parsed; waiting for the body and its NUL.
    Body {
        command: Command,
        headers: Vec<(String, String)>,
        /// Bytes of head, blank line included: where the body starts.
        head_len: usize,
        content_length: Option<usize>,
        /// Bytes of the frame already searched for NUL (no content-length).
        scanned: usize,
    },
}

const FRESH: State = State::Head {
    scanned: 0,
    line_start: 0,
    lines: 0,
};

/// A streaming STOMP decoder. Feed it the connection's read buffer; it consumes
/// whole frames and keeps its place in a partial one.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    version: Version,
    state: State,
}

impl Decoder {
    /// A decoder for the start of a connection (STOMP 1.0 rules until told
    /// otherwise; CONNECT is unescaped in every version anyway).
    pub fn new(limits: Limits) -> Self {
        Decoder {
            limits,
            version: Version::V1_0,
            state: FRESH,
        }
    }

    /// The negotiated version decides the escaping of the frames that follow.
    pub fn set_version(&mut self, version: Version) {
        self.version = version;
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether a frame is partly buffered (bytes after the last whole frame that
    /// are not heart-beat EOLs).
    pub fn in_frame(&self) -> bool {
        !matches!(
            self.state,
            State::Head {
                scanned: 0,
                lines: 0,
                ..
            }
        )
    }

    /// Decodes the next frame from the front of `buf`, consuming it (and any
    /// heart-beat EOLs before it). `Ok(None)`: more bytes are needed; what was
    /// scanned is remembered, so the next call continues where this one stopped.
    /// After an error the decoder's state is unspecified: the connection must end.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if let State::Head {
            scanned,
            line_start,
            lines: 0,
        } = &mut self.state
        {
            // Before the command line only EOLs (heart-beats) may come; a CR LF
            // can be split across reads, so this looks again on every call (it
            // stops at the first other byte, so it costs nothing once the
            // command has begun).
            let skipped = skip_heartbeats(buf);
            *scanned = scanned.saturating_sub(skipped);
            *line_start = 0;
        }
        if let State::Head {
            scanned,
            line_start,
            lines,
        } = &mut self.state
        {
            let limits = self.limits;
            let Some(head_len) = scan_head(buf, scanned, line_start, lines, limits)? else {
                return Ok(None);
            };
            let (command, headers) =
                parse_head(buf.get(..head_len).unwrap_or_default(), self.version)?;
            let content_length = match headers.iter().find(|(k, _)| k == "content-length") {
                None => None,
                Some((_, v)) => {
                    let n = parse_length(v)?;
                    if n > limits.max_body {
                        return Err(CodecError::BodyTooLarge {
                            size: n,
                            limit: limits.max_body,
                        });
                    }
                    Some(n)
                }
            };
            self.state = State::Body {
                command,
                headers,
                head_len,
                content_length,
                scanned: head_len,
            };
        }
        let State::Body {
            head_len,
            content_length,
            scanned,
            ..
        } = &mut self.state
        else {
            return Ok(None);
        };
        let head_len = *head_len;
        let (body_len, total) = match *content_length {
            Some(n) => {
                let total = head_len + n + 1;
                let Some(&end) = buf.get(total - 1) else {
                    return Ok(None);
                };
                if end != 0 {
                    return Err(CodecError::MissingNul {
                        length: n,
                        found: end,
                    });
                }
                (n, total)
            }
            None => {
                let from = (*scanned).max(head_len);
                match memchr::memchr(0, buf.get(from..).unwrap_or_default()) {
                    Some(i) => (from + i - head_len, from + i + 1),
                    None => {
                        *scanned = buf.len();
                        let size = buf.len().saturating_sub(head_len);
                        if size > self.limits.max_body {
                            return Err(CodecError::BodyTooLarge {
                                size,
                                limit: self.limits.max_body,
                            });
                        }
                        return Ok(None);
                    }
                }
            }
        };
        let State::Body {
            command, headers, ..
        } = std::mem::replace(&mut self.state, FRESH)
        else {
            return Ok(None);
        };
        let mut bytes = buf.split_to(total);
        bytes.advance(head_len);
        bytes.truncate(body_len);
        Ok(Some(Frame {
            command,
            headers,
            body: bytes.freeze(),
        }))
    }
}

/// Drops the EOLs (heart-beats) before a frame. A lone CR at the end stays until
/// its LF arrives.
fn skip_heartbeats(buf: &mut BytesMut) -> usize {
    let mut n = 0;
    loop {
        match (buf.get(n), buf.get(n + 1)) {
            (Some(b'\n'), _) => n += 1,
            (Some(b'\r'), Some(b'\n')) => n += 2,
            _ => break,
        }
    }
    buf.advance(n);
    n
}

/// Continues the search for the blank line ending the head from `scanned`.
/// Returns the head's length (blank line included) once found.
fn scan_head(
    buf: &[u8],
    scanned: &mut usize,
    line_start: &mut usize,
    lines: &mut usize,
    limits: Limits,
) -> Result<Option<usize>, CodecError> {
    let line_limit = limits.max_header_length;
    while let Some(i) = memchr::memchr(b'\n', buf.get(*scanned..).unwrap_or_default()) {
        let lf = *scanned + i;
        let line = buf.get(*line_start..lf).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        *scanned = lf + 1;
        if line.is_empty() && *lines > 0 {
            return Ok(Some(lf + 1));
        }
        if line.len() > line_limit {
            return Err(CodecError::HeaderTooLong {
                offset: *line_start,
                limit: line_limit,
            });
        }
        if *lines == 0 && Command::parse(line).is_none() {
            // Fail on the command line alone: nothing more of a frame that cannot
            // be valid needs buffering.
            return Err(unknown_command(line));
        }
        *lines += 1;
        if *lines > limits.max_headers + 1 {
            return Err(CodecError::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        *line_start = lf + 1;
    }
    *scanned = buf.len();
    // The partial line may still end in the CR of a CR LF.
    if buf.len() - *line_start > line_limit + 1 {
        if *lines == 0 {
            let head = buf.get(..64.min(buf.len())).unwrap_or_default();
            if Command::ALL
                .iter()
                .all(|c| !c.as_str().as_bytes().starts_with(head))
            {
                return Err(unknown_command(head));
            }
        }
        return Err(CodecError::HeaderTooLong {
            offset: *line_start,
            limit: line_limit,
        });
    }
    Ok(None)
}

fn unknown_command(line: &[u8]) -> CodecError {
    let shown = line.get(..64.min(line.len())).unwrap_or_default();
    CodecError::UnknownCommand {
        command: String::from_utf8_lossy(shown).into_owned(),
    }
}

/// Parses a complete head (command line, header lines, blank line).
fn parse_head(
    head: &[u8],
    version: Version,
) -> Result<(Command, Vec<(String, String)>), CodecError> {
    let malformed = |offset| CodecError::NoColon { offset };
    let (mut rest, command_line) = head::line(head).map_err(|_| malformed(0))?;
    let command = Command::parse(command_line).ok_or_else(|| unknown_command(command_line))?;
    let escaping = if command.is_unescaped() {
        Escaping::None
    } else {
        Escaping::for_version(version)
    };
    let mut headers = Vec::new();
    loop {
        let offset = head.len() - rest.len();
        let (next, line) = head::line(rest).map_err(|_| malformed(offset))?;
        if line.is_empty() {
            break;
        }
        let (_, (name, value)) = head::header(line).map_err(|_| malformed(offset))?;
        let value = value.ok_or_else(|| malformed(offset))?;
        let name = escaping.decode(name, offset)?;
        let value = escaping.decode(value, offset + name.len() + 1)?;
        headers.push((name, value));
        rest = next;
    }
    Ok((command, headers))
}

fn parse_length(value: &str) -> Result<usize, CodecError> {
    let digits = value.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CodecError::BadContentLength {
            value: value.chars().take(64).collect(),
        });
    }
    // All digits: only overflow can fail, and such a length is over any limit.
    Ok(digits.parse().unwrap_or(usize::MAX))
}

/// A heart-beat: one EOL.
pub fn encode_heartbeat(out: &mut BytesMut) {
    out.extend_from_slice(b"\n");
}

//! The AMQP 0-9-1 connection state machine: frames in, core calls and frames out.
//!
//! No sockets and no clocks here (quinn-proto's rule): the connection task hands
//! in the bytes it read ([`Session::handle_input`]) and the deliveries its outbox
//! collected ([`Session::handle_outbox`]); the session appends the frames to send
//! to [`Session::output`] and says through [`Session::is_closed`] when the socket
//! should be closed. The negotiation (start, tune, open) and connection-level
//! errors live here; channel methods are in [`channel`].
//!
//! Errors follow the spec's split, as RabbitMQ applies it: soft errors (403, 404,
//! 405, 406) close the channel with channel.close; hard errors (5xx, 530) close
//! the connection with connection.close. Either way only this connection is
//! affected and the reply text is RabbitMQ's (`NOT_FOUND - no queue 'q' in vhost
//! '/'`).

mod channel;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use switchyard_driver::Output;

use bytes::{Bytes, BytesMut};
use switchyard_core::auth::{LoginError, TopicRules, User};
use switchyard_core::authn::{LoginRequest, LoginStart, PendingLogin};
use switchyard_core::connections::{protocol, ConnectionGuard, ConnectionInfo};
use switchyard_core::consumer::{Credit, Outbox, Outgoing};
use switchyard_core::queue::Queue;
use switchyard_core::stats::{ConnectionGuard as CountedConnection, Protocol, SourceGuard, Stat};
use switchyard_core::vhost::VHost;
use switchyard_core::{Broker, CoreError, ErrorKind, FieldTable, FieldValue};
use tokio::sync::watch;

use crate::codec::{self, reply_code, CodecError, Frame, Method};
use crate::AmqpSettings;
use channel::Channel;

/// How many deliveries may wait in a connection's outbox before queues hold back
/// (on top of prefetch): bounds the memory a slow reader can pin.
pub const OUTBOX_CAPACITY: usize = 4096;

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the 8-byte protocol header.
    Header,
    /// connection.start sent, waiting for start-ok.
    StartOk,
    /// connection.tune sent, waiting for tune-ok.
    TuneOk,
    /// Waiting for connection.open.
    Open,
    /// Ready for channels.
    Running,
    /// We sent connection.close and wait for close-ok; everything else is ignored.
    Closing,
    /// The socket should be closed once the output is written.
    Closed,
}

/// What the client said it understands (client-properties.capabilities).
#[derive(Debug, Default, Clone, Copy)]
struct ClientCapabilities {
    consumer_cancel_notify: bool,
    connection_blocked: bool,
    authentication_failure_close: bool,
}

/// A connection-level error: connection.close with this code and text.
#[derive(Debug)]
pub(crate) struct ConnError {
    code: u16,
    text: String,
    class_id: u16,
    method_id: u16,
}

impl ConnError {
    fn new(code: u16, name: &str, text: impl std::fmt::Display) -> Self {
        ConnError {
            code,
            text: format!("{name} - {text}"),
            class_id: 0,
            method_id: 0,
        }
    }

    fn during(mut self, method: &Method) -> Self {
        self.class_id = method.class_id();
        self.method_id = method.method_id();
        self
    }

    pub(crate) fn unexpected_frame(text: impl std::fmt::Display) -> Self {
        ConnError::new(reply_code::UNEXPECTED_FRAME, "UNEXPECTED_FRAME", text)
    }

    pub(crate) fn channel_error(text: impl std::fmt::Display) -> Self {
        ConnError::new(reply_code::CHANNEL_ERROR, "CHANNEL_ERROR", text)
    }

    pub(crate) fn command_invalid(text: impl std::fmt::Display) -> Self {
        ConnError::new(reply_code::COMMAND_INVALID, "COMMAND_INVALID", text)
    }

    pub(crate) fn not_implemented(text: impl std::fmt::Display) -> Self {
        ConnError::new(reply_code::NOT_IMPLEMENTED, "NOT_IMPLEMENTED", text)
    }

    pub(crate) fn not_allowed(text: impl std::fmt::Display) -> Self {
        ConnError::new(reply_code::NOT_ALLOWED, "NOT_ALLOWED", text)
    }
}

/// An error while handling a channel's method: soft ones close the channel, hard
/// ones the connection.
#[derive(Debug)]
pub(crate) enum MethodError {
    Channel { code: u16, text: String },
    Connection(ConnError),
}

impl MethodError {
    pub(crate) fn precondition(text: impl std::fmt::Display) -> Self {
        MethodError::Channel {
            code: reply_code::PRECONDITION_FAILED,
            text: format!("PRECONDITION_FAILED - {text}"),
        }
    }
    pub(crate) fn not_found(text: impl std::fmt::Display) -> Self {
        MethodError::Channel {
            code: reply_code::NOT_FOUND,
            text: format!("NOT_FOUND - {text}"),
        }
    }
    pub(crate) fn access_refused(text: impl std::fmt::Display) -> Self {
        MethodError::Channel {
            code: reply_code::ACCESS_REFUSED,
            text: format!("ACCESS_REFUSED - {text}"),
        }
    }
}

impl From<ConnError> for MethodError {
    fn from(e: ConnError) -> Self {
        MethodError::Connection(e)
    }
}

/// The reply code of a core error, and whether it is a hard (connection) error.
impl From<CoreError> for MethodError {
    fn from(e: CoreError) -> Self {
        let text = e.to_string();
        let code = match e.kind {
            ErrorKind::NotFound => reply_code::NOT_FOUND,
            ErrorKind::AccessRefused => reply_code::ACCESS_REFUSED,
            ErrorKind::ResourceLocked => reply_code::RESOURCE_LOCKED,
            ErrorKind::PreconditionFailed => reply_code::PRECONDITION_FAILED,
            ErrorKind::CommandInvalid => {
                return ConnError {
                    code: reply_code::COMMAND_INVALID,
                    text,
                    class_id: 0,
                    method_id: 0,
                }
                .into()
            }
            ErrorKind::NotAllowed => {
                return ConnError {
                    code: reply_code::NOT_ALLOWED,
                    text,
                    class_id: 0,
                    method_id: 0,
                }
                .into()
            }
            ErrorKind::ResourceError => {
                return ConnError {
                    code: reply_code::RESOURCE_ERROR,
                    text,
                    class_id: 0,
                    method_id: 0,
                }
                .into()
            }
            ErrorKind::NotImplemented => {
                return ConnError {
                    code: reply_code::NOT_IMPLEMENTED,
                    text,
                    class_id: 0,
                    method_id: 0,
                }
                .into()
            }
        };
        MethodError::Channel { code, text }
    }
}

/// One AMQP connection's protocol state.
pub struct Session {
    broker: Arc<Broker>,
    settings: Arc<AmqpSettings>,
    peer: SocketAddr,
    /// Broker-wide id: owner of exclusive queues.
    id: u64,
    state: State,
    /// Frames to write, appended in order.
    out: Output,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    /// The SASL mechanism of a successful login, for the management API.
    auth_mechanism: &'static str,
    capabilities: ClientCapabilities,
    user: String,
    vhost: Option<Arc<VHost>>,
    /// Boxed: a channel is several hundred bytes, and a map's spare slots
    /// hold a whole value each; boxed, an idle connection's spare slots cost
    /// a pointer (measured: 3 kB -> 1.6 kB for two channels).
    channels: HashMap<u16, Box<Channel>>,
    outbox: Arc<Outbox>,
    /// Exclusive queues this connection declared: deleted when it closes.
    exclusive_queues: Vec<Arc<Queue>>,
    /// Cache of write permission per exchange: a regex match per publish would
    /// dominate small messages. Dropped when the broker's permissions change
    /// (`perm_generation`), so a change applies from the next read batch.
    write_allowed: HashMap<String, bool>,
    perm_generation: u64,
    /// When the access token of a `jwt` login expires (ms since the epoch).
    token_expires_ms: Option<u64>,
    /// A `connection.update-secret` waiting for the backend chain.
    pending_secret: Option<PendingLogin>,
    /// The user's topic permissions in the vhost, compiled (None: there are
    /// none, and publishing costs nothing extra). Refreshed with `write_allowed`.
    topic_rules: Option<Arc<TopicRules>>,
    /// A login an external authentication backend is deciding, with the SASL
    /// mechanism (for the refusal text); input waits meanwhile.
    pending_login: Option<(PendingLogin, String)>,
    /// `max_unacked_per_connection`: the parent of every channel's credit.
    unacked_credit: Arc<Credit>,
    /// The client's properties from connection.start-ok, for the registry.
    client_properties: FieldTable,
    /// In the broker's connection registry from connection.open on.
    registration: Option<ConnectionGuard>,
    /// Whether this connection has published (the memory alarm blocks publishers).
    has_published: bool,
    /// Whether connection.blocked was sent and not yet unblocked.
    blocked_sent: bool,
    /// Why the connection ended, for the log.
    close_reason: Option<String>,
    /// The client started the close handshake and has our close-ok: it closes the
    /// socket itself, and must be given the time to (see [`Session::peer_closes`]).
    peer_closes: bool,
    /// The store's synced position (None: no store, nothing to wait for).
    synced: Option<watch::Receiver<u64>>,
    /// Counts the connection in the node's opened/closed totals.
    _counted: CountedConnection,
    /// The connection's own statistics (octets), from connection.open on.
    stats: Option<SourceGuard>,
}

impl Session {
    pub fn new(broker: Arc<Broker>, settings: Arc<AmqpSettings>, peer: SocketAddr) -> Self {
        let unacked_credit = Arc::new(Credit::new(settings.max_unacked_per_connection));
        let id = broker.next_id();
        let synced = broker.synced();
        let counted = broker.stats.open_connection();
        Session {
            broker,
            settings,
            peer,
            id,
            state: State::Header,
            out: Output::default(),
            frame_max: codec::FRAME_MIN_SIZE,
            channel_max: 0,
            heartbeat: 0,
            auth_mechanism: "PLAIN",
            capabilities: ClientCapabilities::default(),
            user: String::new(),
            vhost: None,
            channels: HashMap::new(),
            outbox: Outbox::new(OUTBOX_CAPACITY),
            exclusive_queues: Vec::new(),
            write_allowed: HashMap::new(),
            perm_generation: 0,
            token_expires_ms: None,
            pending_secret: None,
            topic_rules: None,
            pending_login: None,
            unacked_credit,
            client_properties: FieldTable::new(),
            registration: None,
            has_published: false,
            blocked_sent: false,
            close_reason: None,
            peer_closes: false,
            _counted: counted,
            stats: None,
            synced,
        }
    }

    /// The bytes to write next. The caller writes and clears them.
    pub fn output(&mut self) -> &mut Output {
        // What the caller takes now is what goes out on the wire.
        if let Some(stats) = &self.stats {
            stats.add(Stat::SendOct, self.out.pending() as u64);
        }
        &mut self.out
    }

    /// A receiver of the store's synced position, for the connection task.
    pub fn synced(&self) -> Option<watch::Receiver<u64>> {
        self.synced.clone()
    }

    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// The socket should be closed once the output is flushed.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The connection ended with our close-ok to the client's connection.close: the
    /// client closes the socket once it has read the close-ok, and the socket must
    /// stay open until then (as RabbitMQ keeps it, for up to 30 s).
    ///
    /// Closing it first puts our FIN right behind the close-ok, and a client that
    /// reads until the socket would block before it parses (lapin 2.x) then sees
    /// end-of-stream before the close-ok and reports `ConnectionAborted`.
    pub fn peer_closes(&self) -> bool {
        self.peer_closes && self.state == State::Closed
    }

    /// connection.open-ok has been sent: the handshake timeout no longer applies.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Running)
    }

    /// We sent connection.close and wait for the peer's close-ok.
    pub fn is_closing(&self) -> bool {
        self.state == State::Closing
    }

    /// The negotiated heartbeat interval in seconds (0 = none).
    pub fn heartbeat(&self) -> u16 {
        self.heartbeat
    }

    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.as_deref()
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether the memory alarm should stop reading from this connection: it
    /// blocks publishers only, as RabbitMQ does, so consumers keep draining.
    pub fn blocks_on_alarm(&self) -> bool {
        self.has_published && self.state == State::Running
    }

    /// Tells a blocked-aware client it is blocked or unblocked (alarm changes).
    pub fn set_blocked(&mut self, blocked: bool) {
        if !self.capabilities.connection_blocked
            || blocked == self.blocked_sent
            || self.state != State::Running
        {
            return;
        }
        self.blocked_sent = blocked;
        let method = if blocked {
            Method::from(codec::ConnectionBlocked {
                reason: "low on memory".into(),
            })
        } else {
            Method::from(codec::ConnectionUnblocked {})
        };
        codec::encode_method(&mut self.out, 0, &method);
    }

    /// Feeds bytes read from the socket. Whole frames are consumed from `input`;
    /// a partial frame stays for the next call.
    pub fn handle_input(&mut self, input: &mut BytesMut) {
        let generation = self.broker.auth.generation();
        // A login token that expired grants nothing from now on: results
        // cached under it go (RabbitMQ refuses operations until update-secret).
        let token_expired = self.token_expires_ms.is_some_and(|at| unix_ms() >= at);
        if token_expired {
            self.token_expires_ms = None;
        }
        if generation != self.perm_generation || token_expired {
            self.perm_generation = generation;
            self.write_allowed.clear();
            self.refresh_topic_rules();
        }
        let before = input.len();
        let capped = self.unacked_credit.is_full();
        self.handle_frames(input);
        if capped && !self.unacked_credit.is_full() {
            // Acks freed room under the connection's cap: any channel's queues
            // may have been held back by it.
            for ch in self.channels.values() {
                ch.redispatch();
            }
        }
        if let Some(stats) = &self.stats {
            stats.add(Stat::RecvOct, before.saturating_sub(input.len()) as u64);
        }
    }

    fn handle_frames(&mut self, input: &mut BytesMut) {
        while !matches!(self.state, State::Closed) {
            if self.state == State::Header {
                match codec::decode_protocol_header(input) {
                    Ok(None) => return,
                    Ok(Some(_)) => self.send_start(),
                    Err(e) => {
                        // The spec's answer to a header we do not speak: ours, then close.
                        self.out.extend_from_slice(&codec::PROTOCOL_HEADER);
                        self.finish(format!("{e}"));
                        return;
                    }
                }
                continue;
            }
            let limit = if self.state == State::Running || self.state == State::Closing {
                self.frame_max
            } else {
                codec::FRAME_MIN_SIZE
            };
            match codec::decode_frame(input, limit) {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    if let Err(e) = self.handle_frame(frame) {
                        self.close_connection(e);
                    }
                }
                Err(e) => {
                    self.codec_error(&e);
                    return;
                }
            }
        }
        self.flush_confirms();
    }

    fn codec_error(&mut self, e: &CodecError) {
        let name = match e.reply_code() {
            reply_code::SYNTAX_ERROR => "SYNTAX_ERROR",
            reply_code::NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
            _ => "FRAME_ERROR",
        };
        self.close_connection(ConnError::new(e.reply_code(), name, e));
        // The stream position is lost: nothing more can be read, so do not wait
        // for a close-ok that could not be parsed.
        self.finish(format!("{e}"));
    }

    /// Sends connection.close and waits for close-ok (ignoring all else).
    fn close_connection(&mut self, e: ConnError) {
        if matches!(self.state, State::Closing | State::Closed) {
            return;
        }
        tracing::warn!(peer = %self.peer, user = %self.user, code = e.code, text = %e.text, "closing AMQP connection");
        let close = codec::ConnectionClose {
            reply_code: e.code,
            reply_text: e.text.as_str().into(),
            class_id: e.class_id,
            method_id: e.method_id,
        };
        codec::encode_method(&mut self.out, 0, &Method::from(close));
        self.close_reason = Some(e.text);
        self.release_resources();
        // Before the connection is open the client may not answer close-ok; close
        // the socket after writing (RabbitMQ does the same for handshake errors).
        self.state = if self.vhost.is_some() {
            State::Closing
        } else {
            State::Closed
        };
    }

    /// The broker is shutting down: close with 320 CONNECTION_FORCED.
    pub fn shutdown(&mut self) {
        if self.state == State::Running {
            self.close_connection(ConnError::new(
                reply_code::CONNECTION_FORCED,
                "CONNECTION_FORCED",
                "broker forced connection closure with reason 'shutdown'",
            ));
        } else {
            self.finish("broker shutdown".into());
        }
    }

    /// A heartbeat timeout or socket error ended the connection.
    pub fn finish(&mut self, reason: String) {
        if self.close_reason.is_none() {
            self.close_reason = Some(reason);
        }
        self.release_resources();
        self.state = State::Closed;
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<(), ConnError> {
        match self.state {
            State::Closing => {
                // Only close-ok (or a crossing close) matters now.
                if let Frame::Method { channel: 0, method } = frame {
                    if matches!(
                        method,
                        Method::ConnectionCloseOk(_) | Method::ConnectionClose(_)
                    ) {
                        if matches!(method, Method::ConnectionClose(_)) {
                            codec::encode_method(
                                &mut self.out,
                                0,
                                &Method::from(codec::ConnectionCloseOk {}),
                            );
                            self.peer_closes = true;
                        }
                        self.state = State::Closed;
                    }
                }
                return Ok(());
            }
            State::Closed | State::Header => return Ok(()),
            _ => {}
        }
        match frame {
            Frame::Heartbeat { channel: 0 } => Ok(()),
            Frame::Heartbeat { channel } => Err(ConnError::new(
                reply_code::FRAME_ERROR,
                "FRAME_ERROR",
                format!("heartbeat frame on channel {channel}"),
            )),
            Frame::Method { channel: 0, method } => self.handle_connection_method(method),
            Frame::Method { channel, method } => {
                if self.state != State::Running {
                    return Err(ConnError::command_invalid(format!(
                        "expected connection method, got '{}' on channel {channel}",
                        method.name()
                    ))
                    .during(&method));
                }
                self.handle_channel_method(channel, method)
            }
            Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
            } => self.handle_content(channel, |ch, settings| {
                ch.handle_header(class_id, body_size, properties, settings)
            }),
            Frame::Body { channel, payload } => {
                self.handle_content(channel, |ch, _| ch.handle_body(payload))
            }
        }
    }

    /// A content header or body frame: completes a publish when the last piece
    /// arrives.
    fn handle_content(
        &mut self,
        id: u16,
        piece: impl FnOnce(
            &mut Channel,
            &AmqpSettings,
        ) -> Result<Option<channel::Published>, MethodError>,
    ) -> Result<(), ConnError> {
        if self.state != State::Running || id == 0 {
            return Err(ConnError::unexpected_frame(format!(
                "content frame on channel {id}"
            )));
        }
        let Some(ch) = self.channels.get_mut(&id) else {
            return Err(ConnError::channel_error(format!(
                "expected 'channel.open' on channel {id}"
            )));
        };
        if ch.is_closing() {
            return Ok(());
        }
        let result = match piece(ch, &self.settings) {
            Ok(Some(published)) => self.with_channel(id, |ch, ctx| ch.publish(ctx, published)),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        self.method_result(
            id,
            result,
            codec::BasicPublish::CLASS_ID,
            codec::BasicPublish::METHOD_ID,
        )
    }

    fn refresh_topic_rules(&mut self) {
        self.topic_rules = self
            .vhost
            .as_ref()
            .and_then(|v| self.broker.auth.topic_rules(&self.user, &v.name, None));
    }

    /// Runs `f` on channel `id` with the connection-wide context.
    fn with_channel(
        &mut self,
        id: u16,
        f: impl FnOnce(&mut Channel, &mut channel::Ctx<'_>) -> Result<(), MethodError>,
    ) -> Result<(), MethodError> {
        let vhost = self
            .vhost
            .as_ref()
            .ok_or_else(|| ConnError::command_invalid("connection not open"))?;
        let ch = self.channels.get_mut(&id).ok_or_else(|| {
            ConnError::channel_error(format!("expected 'channel.open' on channel {id}"))
        })?;
        let mut ctx = channel::Ctx {
            broker: &self.broker,
            vhost,
            user: &self.user,
            connection: self.id,
            out: &mut self.out,
            outbox: &self.outbox,
            frame_max: self.frame_max,
            exclusive_queues: &mut self.exclusive_queues,
            write_allowed: &mut self.write_allowed,
            topic_rules: self.topic_rules.as_deref(),
            has_published: &mut self.has_published,
        };
        f(ch, &mut ctx)
    }

    /// Turns a channel method's error into channel.close (soft) or a connection
    /// error (hard).
    fn method_result(
        &mut self,
        id: u16,
        result: Result<(), MethodError>,
        class_id: u16,
        method_id: u16,
    ) -> Result<(), ConnError> {
        match result {
            Ok(()) => Ok(()),
            Err(MethodError::Connection(mut e)) => {
                if e.class_id == 0 {
                    e.class_id = class_id;
                    e.method_id = method_id;
                }
                Err(e)
            }
            Err(MethodError::Channel { code, text }) => {
                tracing::debug!(channel = id, code, %text, "closing AMQP channel");
                self.close_channel(id, code, text, class_id, method_id);
                Ok(())
            }
        }
    }

    // ---- negotiation ----

    fn send_start(&mut self) {
        let s = |v: &str| FieldValue::string(v);
        let capabilities: FieldTable = [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ]
        .into_iter()
        .map(|c| (c.to_owned(), FieldValue::Bool(true)))
        .collect();
        let server_properties: FieldTable = vec![
            ("capabilities".to_owned(), FieldValue::Table(capabilities)),
            ("cluster_name".to_owned(), s("switchyard")),
            ("copyright".to_owned(), s("Switchyard contributors")),
            (
                "information".to_owned(),
                s("Switchyard: one broker for AMQP 0-9-1, MQTT and STOMP"),
            ),
            ("platform".to_owned(), s("Rust")),
            ("product".to_owned(), s("Switchyard")),
            ("version".to_owned(), s(env!("CARGO_PKG_VERSION"))),
        ]
        .into_iter()
        .collect();
        let start = codec::ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties,
            // EXTERNAL (certificate login) is offered on TLS listeners only, as
            // RabbitMQ's rabbit_auth_mechanism_ssl does, with or without a
            // client certificate, so a client without one learns why it failed.
            mechanisms: if on_tls() {
                Bytes::from_static(b"PLAIN AMQPLAIN EXTERNAL")
            } else {
                Bytes::from_static(b"PLAIN AMQPLAIN")
            },
            locales: Bytes::from_static(b"en_US"),
        };
        codec::encode_method(&mut self.out, 0, &Method::from(start));
        self.state = State::StartOk;
    }

    fn handle_connection_method(&mut self, method: Method) -> Result<(), ConnError> {
        match (self.state, method) {
            (State::StartOk, Method::ConnectionStartOk(m)) => self.handle_start_ok(m),
            (State::TuneOk, Method::ConnectionTuneOk(m)) => self.handle_tune_ok(m),
            (State::Open, Method::ConnectionOpen(m)) => self.handle_open(m),
            (State::Running, Method::ConnectionClose(_)) => {
                codec::encode_method(&mut self.out, 0, &Method::from(codec::ConnectionCloseOk {}));
                self.finish("client closed the connection".into());
                self.peer_closes = true;
                Ok(())
            }
            (_, Method::ConnectionClose(_)) => {
                self.finish("client closed the connection during the handshake".into());
                Ok(())
            }
            (State::Running, Method::ConnectionUpdateSecret(m)) => {
                self.update_secret(m.new_secret.to_vec());
                Ok(())
            }
            (State::Running, Method::ConnectionBlocked(_) | Method::ConnectionUnblocked(_)) => {
                Ok(())
            }
            (_, m) => Err(ConnError::command_invalid(format!(
                "unexpected method '{}' on channel 0",
                m.name()
            ))
            .during(&m)),
        }
    }

    fn handle_start_ok(&mut self, m: codec::ConnectionStartOk) -> Result<(), ConnError> {
        self.client_properties = m.client_properties.clone();
        if let Some(caps) = m
            .client_properties
            .get("capabilities")
            .and_then(FieldValue::as_table)
        {
            let on = |name: &str| caps.get_bool(name).unwrap_or(false);
            self.capabilities = ClientCapabilities {
                consumer_cancel_notify: on("consumer_cancel_notify"),
                connection_blocked: on("connection.blocked"),
                authentication_failure_close: on("authentication_failure_close"),
            };
        }
        let credentials = match m.mechanism.as_str() {
            "PLAIN" => parse_plain(&m.response),
            "AMQPLAIN" => parse_amqplain(&m.response),
            "EXTERNAL" if on_tls() => None,
            other => {
                return Err(ConnError::command_invalid(format!(
                    "unknown authentication mechanism '{other}'"
                )));
            }
        };
        if m.mechanism == "EXTERNAL" {
            // The SASL response is ignored (RabbitMQ's rule): the name comes from
            // the verified client certificate, and that user must exist.
            let login = match switchyard_core::connections::accepted().and_then(|a| a.cert_login) {
                Some(name) => self
                    .broker
                    .auth
                    .login_external(&name, Some(self.peer.ip()))
                    .map(|u| u.name.clone())
                    .map_err(|e| e.to_string()),
                None => Err("connection peer presented no TLS (x.509) certificate, or the TLS listener does not verify peers (tls.verify_peer = false)".to_owned()),
            };
            self.login_decided(login, &m.mechanism);
            return Ok(());
        }
        let Some((username, password)) = credentials else {
            self.login_decided(Err("malformed credentials".to_owned()), &m.mechanism);
            return Ok(());
        };
        match self.begin_login(username, password) {
            LoginStart::Done(result) => self.login_decided(login_result(result), &m.mechanism),
            LoginStart::Pending(pending) => {
                self.pending_login = Some((pending, m.mechanism.into()))
            }
        }
        Ok(())
    }

    /// Whether a login (or a secret update) waits for an external
    /// authentication backend: nothing more is read until it is decided.
    pub fn login_pending(&self) -> bool {
        self.pending_login.is_some() || self.pending_secret.is_some()
    }

    /// `connection.update-secret`: the new secret (an access token) goes
    /// through the backend chain as a login of the same user; the connection
    /// keeps its rights (now the new token's) or is closed, as RabbitMQ.
    fn update_secret(&mut self, secret: Vec<u8>) {
        match self.begin_login(self.user.clone(), secret) {
            LoginStart::Done(result) => self.secret_decided(result.map(|u| u.name)),
            LoginStart::Pending(pending) => self.pending_secret = Some(pending),
        }
    }

    /// Asks the backend chain; a pending answer wakes the outbox.
    fn begin_login(&self, username: String, password: Vec<u8>) -> LoginStart {
        let request = LoginRequest {
            username,
            password,
            peer: Some(self.peer.ip()),
            ..LoginRequest::default()
        };
        let outbox = self.outbox.clone();
        self.broker
            .auth
            .clone()
            .begin_login(request, move || outbox.wake())
    }

    fn secret_decided(&mut self, result: Result<String, LoginError>) {
        match result {
            Ok(name) if name == self.user => {
                self.token_expires_ms = self.broker.auth.token_expiry(&self.user);
                // The new token's rights apply from the next operation.
                self.perm_generation = u64::MAX;
                codec::encode_method(
                    &mut self.out,
                    0,
                    &Method::from(codec::ConnectionUpdateSecretOk {}),
                );
            }
            refused => {
                let why = match refused {
                    Ok(other) => format!("the new secret names user '{other}'"),
                    Err(e) => e.to_string(),
                };
                self.close_connection(ConnError::new(
                    reply_code::NOT_ALLOWED,
                    "NOT_ALLOWED",
                    format!("Secret update was refused for user '{}': {why}", self.user),
                ));
            }
        }
    }

    /// Continues the handshake with a login's answer.
    fn login_decided(&mut self, login: Result<String, String>, mechanism: &str) {
        match login {
            Ok(user) => {
                self.token_expires_ms = self.broker.auth.token_expiry(&user);
                self.user = user;
                self.auth_mechanism = match mechanism {
                    "EXTERNAL" => "EXTERNAL",
                    "AMQPLAIN" => "AMQPLAIN",
                    _ => "PLAIN",
                };
                let tune = codec::ConnectionTune {
                    channel_max: self.settings.channel_max,
                    frame_max: self.settings.frame_max,
                    heartbeat: self.settings.heartbeat,
                };
                codec::encode_method(&mut self.out, 0, &Method::from(tune));
                self.state = State::TuneOk;
            }
            Err(why) => {
                tracing::warn!(peer = %self.peer, %mechanism, "AMQP login refused: {why}");
                let text = format!(
                    "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                );
                if self.capabilities.authentication_failure_close {
                    self.close_connection(ConnError::new(
                        reply_code::ACCESS_REFUSED,
                        "ACCESS_REFUSED",
                        text,
                    ));
                }
                self.finish(format!("login refused: {why}"));
            }
        }
    }

    fn handle_tune_ok(&mut self, m: codec::ConnectionTuneOk) -> Result<(), ConnError> {
        let server_max = self.settings.frame_max;
        let frame_max = if m.frame_max == 0 {
            server_max
        } else {
            m.frame_max
        };
        if frame_max < codec::FRAME_MIN_SIZE {
            return Err(ConnError::not_allowed(format!(
                "frame_max={frame_max} < {} min size",
                codec::FRAME_MIN_SIZE
            )));
        }
        if frame_max > server_max {
            return Err(ConnError::not_allowed(format!(
                "frame_max={frame_max} > {server_max} max size"
            )));
        }
        let server_channels = self.settings.channel_max;
        let channel_max = if m.channel_max == 0 {
            server_channels
        } else {
            m.channel_max
        };
        if channel_max > server_channels {
            return Err(ConnError::not_allowed(format!(
                "negotiated channel_max = {channel_max} is higher than the maximum allowed value ({server_channels})"
            )));
        }
        self.frame_max = frame_max;
        self.channel_max = channel_max;
        // The client's value is final (it may disable heartbeats with 0).
        self.heartbeat = m.heartbeat;
        self.state = State::Open;
        Ok(())
    }

    fn handle_open(&mut self, m: codec::ConnectionOpen) -> Result<(), ConnError> {
        let name = m.virtual_host;
        let vhost = self
            .broker
            .vhost(&name)
            .map_err(|_| ConnError::not_allowed(format!("vhost {name} not found")))?;
        self.broker
            .auth
            .check_vhost(&self.user, &name)
            .map_err(|e| ConnError::not_allowed(e.text))?;
        self.stats =
            Some(
                self.broker
                    .stats
                    .open_source(Protocol::Amqp091, self.id, 0, &name, false),
            );
        let mut info = ConnectionInfo::new(
            protocol::AMQP_091,
            &self.user,
            &name,
            self.peer,
            self.broker.timers().now_ms(),
        );
        info.client_properties = std::mem::take(&mut self.client_properties);
        info.channel_max = self.channel_max;
        info.frame_max = self.frame_max;
        info.timeout = self.heartbeat;
        info.auth_mechanism = self.auth_mechanism;
        let guard = self
            .broker
            .register_connection(self.id, info, self.outbox.clone())
            .map_err(|e| ConnError::not_allowed(e.text))?;
        self.registration = Some(guard);
        self.vhost = Some(vhost);
        self.refresh_topic_rules();
        codec::encode_method(
            &mut self.out,
            0,
            &Method::from(codec::ConnectionOpenOk {
                known_hosts: Default::default(),
            }),
        );
        self.state = State::Running;
        tracing::debug!(peer = %self.peer, user = %self.user, vhost = %name, "AMQP connection open");
        Ok(())
    }

    // ---- channels ----

    fn handle_channel_method(&mut self, id: u16, method: Method) -> Result<(), ConnError> {
        if id > self.channel_max {
            return Err(ConnError::channel_error(format!(
                "channel {id} exceeds the negotiated channel_max {}",
                self.channel_max
            ))
            .during(&method));
        }
        if let Method::ChannelOpen(_) = method {
            if self.channels.contains_key(&id) {
                return Err(ConnError::channel_error(format!(
                    "second 'channel.open' seen on channel {id}"
                ))
                .during(&method));
            }
            // The user's `max-channels` limit over all its connections.
            self.broker
                .admit_channel(&self.user)
                .map_err(|e| ConnError::not_allowed(e.text))?;
            let vhost = self.vhost.as_ref().map_or("/", |v| v.name.as_str());
            let stats = self
                .broker
                .stats
                .open_source(Protocol::Amqp091, self.id, id, vhost, true);
            self.channels.insert(
                id,
                Box::new(Channel::new(id, stats, self.unacked_credit.clone())),
            );
            self.count_channels();
            codec::encode_method(
                &mut self.out,
                id,
                &Method::from(codec::ChannelOpenOk {
                    channel_id: Bytes::new(),
                }),
            );
            return Ok(());
        }
        let Some(channel) = self.channels.get_mut(&id) else {
            return Err(ConnError::channel_error(format!(
                "expected 'channel.open' on channel {id}"
            ))
            .during(&method));
        };
        if channel.is_closing() {
            // After our channel.close only close-ok (or a crossing close) counts.
            match method {
                Method::ChannelCloseOk(_) => {
                    self.channels.remove(&id);
                    self.count_channels();
                }
                Method::ChannelClose(_) => {
                    codec::encode_method(
                        &mut self.out,
                        id,
                        &Method::from(codec::ChannelCloseOk {}),
                    );
                }
                _ => {}
            }
            return Ok(());
        }
        if channel.expecting_content() {
            return Err(ConnError::unexpected_frame(
                "expected content header for class 60, got non content header frame instead",
            )
            .during(&method));
        }
        match method {
            Method::ChannelClose(_) => {
                if let Some(mut ch) = self.channels.remove(&id) {
                    ch.release(self.vhost.as_deref());
                }
                self.count_channels();
                codec::encode_method(&mut self.out, id, &Method::from(codec::ChannelCloseOk {}));
                Ok(())
            }
            Method::ChannelCloseOk(_) => Ok(()),
            method => {
                let (class_id, method_id) = (method.class_id(), method.method_id());
                let result = self.with_channel(id, |ch, ctx| ch.handle(ctx, method));
                self.method_result(id, result, class_id, method_id)
            }
        }
    }

    /// Sends channel.close for a soft error and releases the channel's resources;
    /// the channel stays (closing) until the client's close-ok.
    fn close_channel(&mut self, id: u16, code: u16, text: String, class_id: u16, method_id: u16) {
        let vhost = self.vhost.clone();
        if let Some(ch) = self.channels.get_mut(&id) {
            ch.release(vhost.as_deref());
            ch.set_closing();
        }
        let close = codec::ChannelClose {
            reply_code: code,
            reply_text: text.into(),
            class_id,
            method_id,
        };
        codec::encode_method(&mut self.out, id, &Method::from(close));
    }

    // ---- deliveries ----

    /// Tells the registry how many channels are open (for listings and the
    /// users' `max-channels`).
    fn count_channels(&self) {
        if let Some(g) = &self.registration {
            g.set_channels(u32::try_from(self.channels.len()).unwrap_or(u32::MAX));
        }
    }

    /// The registry of the broker's live connections, while registered: the
    /// management API's counters live there.
    pub fn registration(&self) -> Option<&ConnectionGuard> {
        self.registration.as_ref()
    }

    /// Encodes what queues put in the outbox, and lets queues that were held back
    /// for lack of outbox room dispatch again. First honours a close request
    /// from the broker (an operator, a deleted user or vhost): connection.close
    /// 320 CONNECTION_FORCED with the reason, as RabbitMQ.
    pub fn handle_outbox(&mut self) {
        if let Some(pending) = self.pending_secret.take() {
            match pending.take() {
                Some(result) => self.secret_decided(result.map(|u| u.name)),
                None => {
                    self.pending_secret = Some(pending);
                    return;
                }
            }
        }
        if let Some((pending, mechanism)) = self.pending_login.take() {
            match pending.take() {
                Some(result) => self.login_decided(login_result(result), &mechanism),
                None => {
                    self.pending_login = Some((pending, mechanism));
                    return;
                }
            }
        }
        if let Some(reason) = self
            .registration
            .as_ref()
            .and_then(ConnectionGuard::take_close_request)
        {
            tracing::info!(peer = %self.peer, user = %self.user, %reason, "closing AMQP connection on request");
            self.close_connection(ConnError::new(
                reply_code::CONNECTION_FORCED,
                "CONNECTION_FORCED",
                reason,
            ));
            return;
        }
        let items = self.outbox.drain();
        for item in items {
            match item {
                Outgoing::Deliver(d) => {
                    let live = self
                        .channels
                        .get(&d.consumer.options.channel)
                        .is_some_and(|ch| ch.has_consumer(&d.consumer));
                    if !live || self.state != State::Running {
                        // Cancelled or closed while the delivery was in flight: put it back.
                        d.give_back();
                        continue;
                    }
                    let frame_max = self.frame_max;
                    if let Some(ch) = self.channels.get_mut(&d.consumer.options.channel) {
                        ch.write_delivery(&mut self.out, d, frame_max);
                    }
                }
                Outgoing::Cancelled(consumer) => {
                    let notify = self.capabilities.consumer_cancel_notify;
                    if let Some(ch) = self.channels.get_mut(&consumer.options.channel) {
                        if ch.forget_consumer(&consumer) && notify && self.state == State::Running {
                            let cancel = codec::BasicCancel {
                                consumer_tag: consumer.tag().into(),
                                no_wait: true,
                            };
                            codec::encode_method(&mut self.out, ch.id(), &Method::from(cancel));
                        }
                    }
                }
            }
        }
        if self.outbox.take_starved() {
            // Room again: let the queues that were held back dispatch.
            for ch in self.channels.values() {
                ch.redispatch();
            }
        }
        for ch in self.channels.values() {
            ch.publish_state();
        }
    }

    /// Sends the publisher confirms earned by the frames just handled: one
    /// basic.ack (multiple) per channel per read batch.
    pub fn flush_confirms(&mut self) {
        if self.state != State::Running {
            return;
        }
        let synced = self.synced.as_ref().map_or(u64::MAX, |rx| *rx.borrow());
        let mut failed = Vec::new();
        for (&id, ch) in &mut self.channels {
            ch.flush_confirms(&mut self.out, synced);
            if let Err(e) = ch.flush_commits(&mut self.out, synced) {
                failed.push((id, e));
            }
            ch.publish_state();
        }
        let commit = Method::from(codec::TxCommit {});
        for (id, e) in failed {
            if let Err(e) = self.method_result(id, Err(e), commit.class_id(), commit.method_id()) {
                self.close_connection(e);
            }
        }
    }

    /// Some confirm or commit waits for the store: the connection task should
    /// call [`Session::flush_confirms`] when the synced position moves.
    pub fn awaits_sync(&self) -> bool {
        self.channels.values().any(|ch| ch.awaits_sync())
    }

    /// Releases everything the connection holds: unacked messages go back to
    /// their queues (redelivered), consumers are cancelled, exclusive queues
    /// deleted.
    fn release_resources(&mut self) {
        let vhost = self.vhost.clone();
        for (_, mut ch) in self.channels.drain() {
            ch.release(vhost.as_deref());
        }
        if let Some(vhost) = vhost.as_deref() {
            for q in self.exclusive_queues.drain(..) {
                vhost.remove_queue(&q);
            }
        }
        // Deliveries already in the outbox go back to their queues too.
        self.outbox.give_back_all();
        // Out of the registry: no longer listed, counted or closable.
        self.registration = None;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.release_resources();
    }
}

/// PLAIN: `authzid \0 authcid \0 password` (authzid ignored).
/// Whether this connection came in over TLS (see [`switchyard_core::connections::Accepted`]).
fn on_tls() -> bool {
    switchyard_core::connections::accepted().is_some_and(|a| a.tls)
}

fn parse_plain(response: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut parts = response.splitn(3, |b| *b == 0);
    let _authzid = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let pass = parts.next()?.to_vec();
    Some((user, pass))
}

/// AMQPLAIN: a field table without its length prefix, holding LOGIN and PASSWORD.
fn parse_amqplain(response: &Bytes) -> Option<(String, Vec<u8>)> {
    let table = codec::decode_table_body(response).ok()?;
    let user = table.get_str("LOGIN")?.to_owned();
    let pass = match table.get("PASSWORD")? {
        FieldValue::LongStr(b) | FieldValue::ByteArray(b) => b.to_vec(),
        _ => return None,
    };
    Some((user, pass))
}

/// Milliseconds since the Unix epoch (token expiry checks).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn login_result(result: Result<User, LoginError>) -> Result<String, String> {
    result.map(|u| u.name).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_response_parses() {
        assert_eq!(
            parse_plain(b"\0guest\0pw"),
            Some(("guest".into(), b"pw".to_vec()))
        );
        assert_eq!(parse_plain(b"guest"), None);
    }
}

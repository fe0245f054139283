//! One Stream protocol connection as a state machine: bytes in, bytes out, the
//! core called in between; no socket, no clock of its own (the connection
//! driver runs it, see [`crate::conn`]).
//!
//! Handshake (PROTOCOL.adoc §Authentication): PeerProperties, SaslHandshake,
//! SaslAuthenticate (PLAIN through the broker's backend chain; EXTERNAL with a
//! verified client certificate), the server's Tune and the client's, Open.
//!
//! Publishing: a publisher is declared on one stream (with an optional
//! reference, which turns on deduplication: publishing ids at or below the
//! highest one stored for the reference are confirmed without being stored
//! again). Each Publish frame becomes one append to the stream's log; its
//! PublishConfirm goes out once the log's writer has synced it
//! (`fdatasync`), as AMQP confirms do. RabbitMQ does not sync before it
//! confirms; we do.
//!
//! Consuming: a subscription reads the stream's chunks from its offset and
//! sends each as a Deliver frame in osiris' layout, one credit per frame.
//! What Stream clients published is stored as the AMQP 1.0 bytes they sent
//! (chunks of [`EntryFormat::Amqp10`]): such a chunk goes out as its stored
//! header and data, unchanged. Chunks of the core's message model (written over
//! AMQP 0-9-1, STOMP, MQTT) have each entry encoded as an AMQP 1.0 message on
//! the way out ([`crate::amqp10`]). A chunk larger than the client's frame max,
//! or read from an offset inside it, is sent as frames rebuilt from its
//! entries, each a chunk of its own with contiguous offsets.
//! Deliveries run only from [`Session::handle_outbox`] (which the driver calls
//! only while its output has room), so a consumer with much credit cannot make
//! the broker buffer a stream: the session wakes its own outbox to go on.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_driver::Output;

use bytes::{BufMut, Bytes, BytesMut};
use switchyard_core::auth::{Access, LoginError, Resource};
use switchyard_core::authn::{LoginRequest, LoginStart, PendingLogin};
use switchyard_core::connections::{protocol, ConnectionGuard, ConnectionInfo};
use switchyard_core::consumer::Outbox;
use switchyard_core::error::{CoreError, ErrorKind};
use switchyard_core::field::{FieldTable, FieldValue};
use switchyard_core::message::Message;
use switchyard_core::queue::{Queue, QueueOptions};
use switchyard_core::stream::{EntryFormat, Filter, OffsetSpec, StreamEntry};
use switchyard_core::stream_queue::StreamQueue;
use switchyard_core::vhost::{QueueDeclare, StreamWait, VHost};
use switchyard_core::Broker;
use tokio::sync::watch;

use crate::amqp10;
use crate::codec::{code, decode_frame, key, Frame, FrameError, Reader, Writer};
use crate::conn::StreamSettings;

/// The largest frame accepted before Open (RabbitMQ's `initial_frame_max`):
/// enough for a PLAIN login with a JWT as its password.
pub const INITIAL_FRAME_MAX: u32 = 8192;
/// Unconfirmed messages a connection may have before the broker stops
/// reading it (RabbitMQ's `initial_credits`), and the level it resumes at
/// (`credits_required_for_unblocking`).
const UNCONFIRMED_HIGH: usize = 50_000;
const UNCONFIRMED_LOW: usize = 12_500;
/// Stop producing deliveries past this much output; the driver writes it,
/// then the outbox wakes the session again.
const OUTPUT_ROOM: usize = 1024 * 1024;
/// The longest reference (publisher or consumer) RabbitMQ accepts.
const MAX_REFERENCE: usize = 256;
/// How often a publisher's highest stored publishing id is saved while it
/// publishes (it is also saved when the publisher goes).
const SEQUENCE_SAVE_EVERY: Duration = Duration::from_secs(1);
/// Header of a chunk as a consumer receives it (osiris' layout).
const CHUNK_HEADER: usize = 48;
/// Room kept in a Deliver frame for its key, version, subscription id,
/// committed chunk id and chunk header.
const DELIVER_OVERHEAD: usize = 4 + 2 + 2 + 1 + 8 + CHUNK_HEADER;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a successful SaslAuthenticate.
    Authenticating,
    /// Logged in; the client's Tune and then Open are due.
    Tuning,
    Open,
    /// We sent Close; the client's answer (or the timeout) ends it.
    Closing,
    Closed,
}

#[derive(Debug)]
struct Publisher {
    queue: Arc<Queue>,
    stream: Arc<StreamQueue>,
    reference: Option<String>,
    /// The highest publishing id accepted (deduplication by reference).
    highest: u64,
    /// When the highest confirmed id was last saved to the store.
    saved_at: Instant,
}

#[derive(Debug)]
struct Subscription {
    queue: Arc<Queue>,
    stream: Arc<StreamQueue>,
    /// The next offset to deliver.
    next: u64,
    /// Deliver frames the client still accepts.
    credit: u32,
    filter: Filter,
}

/// A Publish frame waiting for its stream to sync.
#[derive(Debug)]
struct PendingConfirm {
    publisher: u8,
    ids: Vec<u64>,
    wait: Option<StreamWait>,
}

/// The Stream protocol session of one connection.
pub struct Session {
    broker: Arc<Broker>,
    settings: Arc<StreamSettings>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    id: u64,
    out: Output,
    outbox: Arc<Outbox>,
    synced: Option<watch::Receiver<u64>>,
    state: State,
    /// The largest frame read now.
    frame_max: u32,
    /// The client's frame max (0: none): deliveries stay under it.
    client_frame_max: u32,
    heartbeat: u32,
    client_properties: Vec<(String, String)>,
    login: Option<(PendingLogin, u32, &'static str)>,
    user: String,
    vhost: Option<Arc<VHost>>,
    registration: Option<ConnectionGuard>,
    publishers: HashMap<u8, Publisher>,
    subscriptions: HashMap<u8, Subscription>,
    confirms: VecDeque<PendingConfirm>,
    unconfirmed: usize,
    reading_paused: bool,
    deliver_v2: bool,
    close_reason: Option<String>,
}

/// An error answered to one request: its response code (the connection stays).
type Answer<T> = Result<T, u16>;

fn core_code(e: &CoreError) -> u16 {
    match e.kind {
        ErrorKind::AccessRefused | ErrorKind::NotAllowed => code::ACCESS_REFUSED,
        ErrorKind::NotFound => code::STREAM_DOES_NOT_EXIST,
        ErrorKind::PreconditionFailed | ErrorKind::ResourceLocked => code::PRECONDITION_FAILED,
        _ => code::INTERNAL_ERROR,
    }
}

impl Session {
    pub fn new(broker: Arc<Broker>, settings: Arc<StreamSettings>, peer: SocketAddr) -> Self {
        let id = broker.next_id();
        let synced = broker.synced();
        Session {
            local: switchyard_core::connections::accepted().map(|a| a.local),
            broker,
            settings,
            peer,
            id,
            out: Output::default(),
            outbox: Outbox::new(1),
            synced,
            state: State::Authenticating,
            frame_max: INITIAL_FRAME_MAX,
            client_frame_max: 0,
            heartbeat: 0,
            client_properties: Vec::new(),
            login: None,
            user: String::new(),
            vhost: None,
            registration: None,
            publishers: HashMap::new(),
            subscriptions: HashMap::new(),
            confirms: VecDeque::new(),
            unconfirmed: 0,
            reading_paused: false,
            deliver_v2: false,
            close_reason: None,
        }
    }

    pub fn output(&mut self) -> &mut Output {
        &mut self.out
    }

    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    pub fn synced(&self) -> Option<watch::Receiver<u64>> {
        self.synced.clone()
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn is_closing(&self) -> bool {
        self.state == State::Closing
    }

    pub fn heartbeat(&self) -> u32 {
        self.heartbeat
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.as_deref()
    }

    /// A login waits for its backend, or too many messages wait for their
    /// confirm: the driver stops reading until that changes.
    pub fn input_paused(&self) -> bool {
        self.login.is_some() || self.reading_paused
    }

    pub fn blocks_on_alarm(&self) -> bool {
        !self.publishers.is_empty()
    }

    /// Confirms wait for a sync, or a subscription waits for new chunks.
    pub fn awaits_sync(&self) -> bool {
        !self.confirms.is_empty() || self.subscriptions.values().any(|s| s.credit > 0)
    }

    /// Feeds bytes read from the socket; whole frames are consumed.
    pub fn handle_input(&mut self, input: &mut BytesMut) {
        let before = input.len();
        while matches!(
            self.state,
            State::Authenticating | State::Tuning | State::Open | State::Closing
        ) && self.login.is_none()
        {
            let frame = match decode_frame(input, self.frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    self.close(e.code, &e.text);
                    input.clear();
                    break;
                }
            };
            if let Err(e) = self.handle_frame(frame) {
                self.close(e.code, &e.text);
            }
        }
        if let Some(r) = &self.registration {
            r.received(before.saturating_sub(input.len()));
        }
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<(), FrameError> {
        let Frame {
            key: k,
            version,
            body,
        } = frame;
        let mut r = Reader::new(body);
        if k & key::RESPONSE != 0 {
            // Answers to what we sent: Close (ours) is the only request we make.
            if k & !key::RESPONSE == key::CLOSE && self.state == State::Closing {
                self.state = State::Closed;
            }
            return Ok(());
        }
        match (self.state, k) {
            (_, key::HEARTBEAT) => Ok(()),
            (_, key::CLOSE) => {
                let corr = r.u32()?;
                let closing = r.u16()?;
                let reason = r.string()?;
                Writer::response(&mut self.out, key::CLOSE, corr, code::OK).finish();
                self.finish(format!(
                    "client closed the connection ({closing}: {reason})"
                ));
                Ok(())
            }
            (State::Authenticating, key::PEER_PROPERTIES) => self.peer_properties(&mut r),
            (State::Authenticating, key::SASL_HANDSHAKE) => {
                let corr = r.u32()?;
                let external = self.certificate_user().is_some();
                let mut w = Writer::response(&mut self.out, key::SASL_HANDSHAKE, corr, code::OK);
                w.count(if external { 2 } else { 1 });
                w.string("PLAIN");
                if external {
                    w.string("EXTERNAL");
                }
                w.finish();
                Ok(())
            }
            (State::Authenticating, key::SASL_AUTHENTICATE) => self.authenticate(&mut r),
            (State::Tuning | State::Open, key::TUNE) => {
                let frame_max = r.u32()?;
                let heartbeat = r.u32()?;
                self.client_frame_max = frame_max;
                self.heartbeat = heartbeat;
                Ok(())
            }
            (State::Tuning, key::OPEN) => self.open(&mut r),
            (State::Tuning | State::Open, key::EXCHANGE_COMMAND_VERSIONS) => {
                self.exchange_command_versions(&mut r)
            }
            (State::Open, _) => self.command(k, version, &mut r),
            (State::Closing, _) => Ok(()),
            (_, other) => Err(FrameError::new(
                code::UNKNOWN_FRAME,
                format!("command {other:#06x} is not allowed before the connection is open"),
            )),
        }
    }

    fn command(&mut self, k: u16, version: u16, r: &mut Reader) -> Result<(), FrameError> {
        match k {
            key::PUBLISH => self.publish(version, r),
            key::CREDIT => self.credit(r),
            key::STORE_OFFSET => self.store_offset(r),
            key::DECLARE_PUBLISHER => {
                let corr = r.u32()?;
                let result = self.declare_publisher(r)?;
                self.respond(
                    key::DECLARE_PUBLISHER,
                    corr,
                    result.err().unwrap_or(code::OK),
                );
                Ok(())
            }
            key::QUERY_PUBLISHER_SEQUENCE => {
                let corr = r.u32()?;
                let reference = r.string()?;
                let stream = r.string()?;
                let (status, seq) = match self.stream_queue(&stream) {
                    Ok((_, s)) => (code::OK, s.publisher_sequence(&reference)),
                    Err(c) => (c, 0),
                };
                let mut w =
                    Writer::response(&mut self.out, key::QUERY_PUBLISHER_SEQUENCE, corr, status);
                w.u64(seq);
                w.finish();
                Ok(())
            }
            key::DELETE_PUBLISHER => {
                let corr = r.u32()?;
                let id = r.u8()?;
                let status = match self.publishers.remove(&id) {
                    Some(p) => {
                        save_sequence(&p);
                        code::OK
                    }
                    None => code::PUBLISHER_DOES_NOT_EXIST,
                };
                self.respond(key::DELETE_PUBLISHER, corr, status);
                Ok(())
            }
            key::SUBSCRIBE => {
                let corr = r.u32()?;
                let result = self.subscribe(r)?;
                self.respond(key::SUBSCRIBE, corr, result.err().unwrap_or(code::OK));
                self.outbox.wake();
                Ok(())
            }
            key::UNSUBSCRIBE => {
                let corr = r.u32()?;
                let id = r.u8()?;
                let status = match self.subscriptions.remove(&id) {
                    Some(_) => code::OK,
                    None => code::SUBSCRIPTION_ID_DOES_NOT_EXIST,
                };
                self.respond(key::UNSUBSCRIBE, corr, status);
                Ok(())
            }
            key::QUERY_OFFSET => {
                let corr = r.u32()?;
                let reference = r.string()?;
                let stream = r.string()?;
                let (status, offset) = match self.stream_queue(&stream) {
                    Ok((_, s)) => match s.stored_offset(&reference) {
                        // Stored as the next offset to read; answered as the last one.
                        Some(next) if next > 0 => (code::OK, next - 1),
                        _ => (code::NO_OFFSET, 0),
                    },
                    Err(c) => (c, 0),
                };
                let mut w = Writer::response(&mut self.out, key::QUERY_OFFSET, corr, status);
                w.u64(offset);
                w.finish();
                Ok(())
            }
            key::CREATE => {
                let corr = r.u32()?;
                let result = self.create(r)?;
                self.respond(key::CREATE, corr, result.err().unwrap_or(code::OK));
                Ok(())
            }
            key::DELETE => {
                let corr = r.u32()?;
                let result = self.delete(r)?;
                self.respond(key::DELETE, corr, result.err().unwrap_or(code::OK));
                Ok(())
            }
            key::METADATA => self.metadata(r),
            key::STREAM_STATS => {
                let corr = r.u32()?;
                let stream = r.string()?;
                match self.stream_queue(&stream) {
                    Ok((_, s)) => {
                        let b = s.log.bounds();
                        let id = |v: u64| {
                            if b.next == b.first {
                                -1
                            } else {
                                i64::try_from(v).unwrap_or(i64::MAX)
                            }
                        };
                        let mut w =
                            Writer::response(&mut self.out, key::STREAM_STATS, corr, code::OK);
                        w.count(3);
                        for (name, v) in [
                            ("first_chunk_id", id(b.first)),
                            ("committed_chunk_id", id(b.last_chunk)),
                            ("last_chunk_id", id(b.last_chunk)),
                        ] {
                            w.string(name).i64(v);
                        }
                        w.finish();
                    }
                    Err(c) => {
                        let mut w = Writer::response(&mut self.out, key::STREAM_STATS, corr, c);
                        w.count(0);
                        w.finish();
                    }
                }
                Ok(())
            }
            key::ROUTE | key::PARTITIONS => {
                // Super streams are not implemented: no partitions to name.
                let corr = r.u32()?;
                let mut w = Writer::response(&mut self.out, k, corr, code::STREAM_DOES_NOT_EXIST);
                w.count(0);
                w.finish();
                Ok(())
            }
            key::EXCHANGE_COMMAND_VERSIONS => self.exchange_command_versions(r),
            key::PEER_PROPERTIES | key::SASL_HANDSHAKE | key::SASL_AUTHENTICATE | key::OPEN => {
                Err(FrameError::new(
                    code::UNKNOWN_FRAME,
                    format!("command {k:#06x} is not allowed on an open connection"),
                ))
            }
            other => Err(FrameError::new(
                code::UNKNOWN_FRAME,
                format!("unknown command {other:#06x}"),
            )),
        }
    }

    fn respond(&mut self, k: u16, corr: u32, status: u16) {
        Writer::response(&mut self.out, k, corr, status).finish();
    }

    // ------------------------------------------------------------ handshake

    fn peer_properties(&mut self, r: &mut Reader) -> Result<(), FrameError> {
        let corr = r.u32()?;
        self.client_properties = r.properties()?;
        let props = [
            ("product", "Switchyard"),
            // Clients read the RabbitMQ version they talk to from here to pick
            // features (the JS client enables filtering from 3.13): this is the
            // level of the Stream protocol served.
            ("version", "3.13.0"),
            ("switchyard_version", env!("CARGO_PKG_VERSION")),
            ("platform", "Rust"),
            ("cluster_name", "switchyard"),
            (
                "information",
                "Switchyard message broker, https://github.com/switchyard",
            ),
        ];
        let mut w = Writer::response(&mut self.out, key::PEER_PROPERTIES, corr, code::OK);
        w.properties(props.into_iter());
        w.finish();
        Ok(())
    }

    /// The user a verified client certificate names (TLS listeners that ask
    /// for one).
    fn certificate_user(&self) -> Option<String> {
        switchyard_core::connections::accepted()
            .and_then(|a| a.cert_login)
            .map(|n| n.to_string())
    }

    fn authenticate(&mut self, r: &mut Reader) -> Result<(), FrameError> {
        let corr = r.u32()?;
        let mechanism = r.string()?;
        let data = r.bytes()?;
        match mechanism.as_str() {
            "PLAIN" => {
                // [authzid] \0 authcid \0 passwd
                let mut parts = data.split(|b| *b == 0);
                let (_authz, user, pass) = (parts.next(), parts.next(), parts.next());
                let (Some(user), Some(pass)) = (user, pass) else {
                    self.respond(key::SASL_AUTHENTICATE, corr, code::SASL_ERROR);
                    return Err(FrameError::new(
                        code::SASL_ERROR,
                        "malformed PLAIN response",
                    ));
                };
                let request = LoginRequest {
                    username: String::from_utf8_lossy(user).into_owned(),
                    password: pass.to_vec(),
                    peer: Some(self.peer.ip()),
                    vhost: None,
                    client_id: None,
                };
                let outbox = self.outbox.clone();
                match self.broker.auth.begin_login(request, move || outbox.wake()) {
                    LoginStart::Done(result) => self.logged_in(corr, "PLAIN", result),
                    LoginStart::Pending(pending) => {
                        self.login = Some((pending, corr, "PLAIN"));
                    }
                }
                Ok(())
            }
            "EXTERNAL" => {
                let result = match self.certificate_user() {
                    Some(name) => self.broker.auth.login_external(&name, Some(self.peer.ip())),
                    None => Err(LoginError::BadCredentials(String::new())),
                };
                self.logged_in(corr, "EXTERNAL", result);
                Ok(())
            }
            other => {
                self.respond(
                    key::SASL_AUTHENTICATE,
                    corr,
                    code::SASL_MECHANISM_NOT_SUPPORTED,
                );
                Err(FrameError::new(
                    code::SASL_MECHANISM_NOT_SUPPORTED,
                    format!("SASL mechanism {other} is not supported"),
                ))
            }
        }
    }

    fn logged_in(
        &mut self,
        corr: u32,
        mechanism: &'static str,
        result: Result<switchyard_core::auth::User, LoginError>,
    ) {
        match result {
            Ok(user) => {
                self.user = user.name;
                self.respond(key::SASL_AUTHENTICATE, corr, code::OK);
                self.state = State::Tuning;
                self.frame_max = self.settings.frame_max;
                let mut w = Writer::start(&mut self.out, key::TUNE, 1);
                w.u32(self.settings.frame_max).u32(self.settings.heartbeat);
                w.finish();
                tracing::debug!(peer = %self.peer, user = %self.user, mechanism, "stream login");
            }
            Err(e) => {
                let status = match e {
                    LoginError::NotLoopback(_) => code::AUTHENTICATION_FAILURE_LOOPBACK,
                    _ => code::AUTHENTICATION_FAILURE,
                };
                tracing::info!(peer = %self.peer, mechanism, "stream login refused: {e}");
                self.respond(key::SASL_AUTHENTICATE, corr, status);
                // RabbitMQ closes the socket after a failed login.
                self.finish(format!("authentication failed: {e}"));
            }
        }
    }

    fn open(&mut self, r: &mut Reader) -> Result<(), FrameError> {
        let corr = r.u32()?;
        let name = r.string()?;
        let vhost = match self.broker.vhost(&name) {
            Ok(v) => v,
            Err(_) => {
                self.respond(key::OPEN, corr, code::VIRTUAL_HOST_ACCESS_FAILURE);
                return Err(FrameError::new(
                    code::VIRTUAL_HOST_ACCESS_FAILURE,
                    format!("vhost '{name}' does not exist"),
                ));
            }
        };
        if let Err(e) = self.broker.auth.check_vhost(&self.user, &name) {
            self.respond(key::OPEN, corr, code::VIRTUAL_HOST_ACCESS_FAILURE);
            return Err(FrameError::new(code::VIRTUAL_HOST_ACCESS_FAILURE, e.text));
        }
        let mut info = ConnectionInfo::new(
            protocol::STREAM,
            &self.user,
            &name,
            self.peer,
            self.broker.timers().now_ms(),
        );
        info.timeout = u16::try_from(self.heartbeat).unwrap_or(u16::MAX);
        let mut props = FieldTable::new();
        for (k, v) in &self.client_properties {
            props.insert(k.clone(), FieldValue::string(v.clone()));
        }
        info.client_properties = props;
        match self
            .broker
            .register_connection(self.id, info, self.outbox.clone())
        {
            Ok(guard) => self.registration = Some(guard),
            Err(e) => {
                self.respond(key::OPEN, corr, code::VIRTUAL_HOST_ACCESS_FAILURE);
                return Err(FrameError::new(code::VIRTUAL_HOST_ACCESS_FAILURE, e.text));
            }
        }
        if self.client_frame_max != 0 {
            self.frame_max = self
                .frame_max
                .min(self.client_frame_max.max(INITIAL_FRAME_MAX));
        }
        self.vhost = Some(vhost);
        self.state = State::Open;
        let (host, port) = self.advertised();
        let port = port.to_string();
        let mut w = Writer::response(&mut self.out, key::OPEN, corr, code::OK);
        w.properties(
            [
                ("advertised_host", host.as_str()),
                ("advertised_port", port.as_str()),
            ]
            .into_iter(),
        );
        w.finish();
        tracing::debug!(peer = %self.peer, user = %self.user, vhost = %name, "stream connection open");
        Ok(())
    }

    /// Where clients should connect for a stream's leader and replicas: this
    /// node, as configured, else the address this connection reached.
    fn advertised(&self) -> (String, u16) {
        let host = if self.settings.advertised_host.is_empty() {
            self.local
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| "localhost".to_owned())
        } else {
            self.settings.advertised_host.clone()
        };
        let port = if self.settings.advertised_port == 0 {
            self.local.map(|a| a.port()).unwrap_or(5552)
        } else {
            self.settings.advertised_port
        };
        (host, port)
    }

    fn exchange_command_versions(&mut self, r: &mut Reader) -> Result<(), FrameError> {
        let corr = r.u32()?;
        let n = r.count()?;
        for _ in 0..n {
            let (k, _min, max) = (r.u16()?, r.u16()?, r.u16()?);
            if k == key::DELIVER && max >= 2 {
                self.deliver_v2 = true;
            }
        }
        // In key order: rstream indexes the answer by key - 1.
        let ours: [(u16, u16, u16); 28] = std::array::from_fn(|i| {
            let k = u16::try_from(i + 1).unwrap_or(0);
            match k {
                key::PUBLISH | key::DELIVER => (k, 1, 2),
                _ => (k, 1, 1),
            }
        });
        let mut w = Writer::response(
            &mut self.out,
            key::EXCHANGE_COMMAND_VERSIONS,
            corr,
            code::OK,
        );
        w.count(ours.len());
        for (k, min, max) in ours {
            w.u16(k).u16(min).u16(max);
        }
        w.finish();
        Ok(())
    }

    // ------------------------------------------------------------ streams

    fn vhost(&self) -> Answer<Arc<VHost>> {
        self.vhost.clone().ok_or(code::INTERNAL_ERROR)
    }

    /// A stream of the connection's vhost.
    fn stream_queue(&self, name: &str) -> Answer<(Arc<Queue>, Arc<StreamQueue>)> {
        let queue = self
            .vhost()?
            .queue(name)
            .map_err(|_| code::STREAM_DOES_NOT_EXIST)?;
        let stream = queue.stream().cloned().ok_or(code::STREAM_DOES_NOT_EXIST)?;
        Ok((queue, stream))
    }

    fn check(&self, access: Access, name: &str) -> Answer<()> {
        let vhost = self.vhost()?;
        self.broker
            .auth
            .check(&self.user, &vhost.name, access, Resource::Queue, name)
            .map_err(|e| {
                tracing::info!(peer = %self.peer, "{}", e.text);
                code::ACCESS_REFUSED
            })
    }

    fn create(&mut self, r: &mut Reader) -> Result<Answer<()>, FrameError> {
        let name = r.string()?;
        let args = r.properties()?;
        Ok(self.create_stream(&name, &args))
    }

    fn create_stream(&mut self, name: &str, args: &[(String, String)]) -> Answer<()> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(code::PRECONDITION_FAILED);
        }
        self.check(Access::Configure, name)?;
        let vhost = self.vhost()?;
        if vhost.queue(name).is_ok() {
            return Err(code::STREAM_ALREADY_EXISTS);
        }
        let mut arguments = FieldTable::new();
        arguments.insert("x-queue-type", FieldValue::string("stream"));
        for (k, v) in args {
            // RabbitMQ's rabbit_stream_manager:stream_queue_arguments.
            let number = || {
                v.parse::<i64>()
                    .map(FieldValue::I64)
                    .map_err(|_| code::PRECONDITION_FAILED)
            };
            let (arg, value) = match k.as_str() {
                "max-length-bytes" => ("x-max-length-bytes", number()?),
                "max-age" => ("x-max-age", FieldValue::string(v.clone())),
                "stream-max-segment-size-bytes" => ("x-stream-max-segment-size-bytes", number()?),
                "initial-cluster-size" => ("x-initial-cluster-size", number()?),
                "queue-leader-locator" => ("x-queue-leader-locator", FieldValue::string(v.clone())),
                "stream-filter-size-bytes" => ("x-stream-filter-size-bytes", number()?),
                _ => continue,
            };
            arguments.insert(arg, value);
        }
        let req = QueueDeclare {
            name: name.to_owned(),
            passive: false,
            options: QueueOptions {
                durable: true,
                exclusive: false,
                auto_delete: false,
                arguments,
            },
            connection: self.id,
            server_named: false,
        };
        vhost.declare_queue(req).map_err(|e| {
            tracing::info!(peer = %self.peer, stream = name, "stream not created: {}", e.text);
            core_code(&e)
        })?;
        Ok(())
    }

    fn delete(&mut self, r: &mut Reader) -> Result<Answer<()>, FrameError> {
        let name = r.string()?;
        Ok((|| {
            self.stream_queue(&name)?;
            self.check(Access::Configure, &name)?;
            self.vhost()?
                .delete_queue(&name, false, false, self.id)
                .map_err(|e| core_code(&e))?;
            self.forget_deleted();
            Ok(())
        })())
    }

    fn metadata(&mut self, r: &mut Reader) -> Result<(), FrameError> {
        let corr = r.u32()?;
        let n = r.count()?;
        let mut names = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            names.push(r.string()?);
        }
        let (host, port) = self.advertised();
        let found: Vec<u16> = names
            .iter()
            .map(|s| self.stream_queue(s).err().unwrap_or(code::OK))
            .collect();
        let mut w = Writer::start(&mut self.out, key::METADATA | key::RESPONSE, 1);
        w.u32(corr);
        w.count(1);
        w.u16(0).string(&host).u32(u32::from(port));
        w.count(names.len());
        for (name, status) in names.iter().zip(found) {
            w.string(name).u16(status).u16(0);
            // Replicas: none (one node).
            w.count(0);
        }
        w.finish();
        Ok(())
    }

    /// Publishers and subscriptions on streams that no longer exist go, with
    /// RabbitMQ's MetadataUpdate (stream not available) telling the client.
    fn forget_deleted(&mut self) {
        let mut gone: Vec<String> = Vec::new();
        self.publishers.retain(|_, p| {
            let live = !p.queue.is_deleted();
            if !live {
                gone.push(p.queue.name.clone());
            }
            live
        });
        self.subscriptions.retain(|_, s| {
            let live = !s.queue.is_deleted();
            if !live {
                gone.push(s.queue.name.clone());
            }
            live
        });
        gone.sort();
        gone.dedup();
        for stream in gone {
            let mut w = Writer::start(&mut self.out, key::METADATA_UPDATE, 1);
            w.u16(code::STREAM_NOT_AVAILABLE).string(&stream);
            w.finish();
        }
    }

    // ------------------------------------------------------------ publishing

    fn declare_publisher(&mut self, r: &mut Reader) -> Result<Answer<()>, FrameError> {
        let id = r.u8()?;
        let reference = r.opt_string()?.filter(|s| !s.is_empty());
        let stream = r.string()?;
        Ok((|| {
            if reference.as_ref().is_some_and(|s| s.len() > MAX_REFERENCE) {
                return Err(code::PRECONDITION_FAILED);
            }
            if self.publishers.contains_key(&id) {
                return Err(code::PRECONDITION_FAILED);
            }
            let (queue, sq) = self.stream_queue(&stream)?;
            self.check(Access::Write, &stream)?;
            let highest = reference.as_deref().map_or(0, |r| sq.publisher_sequence(r));
            self.publishers.insert(
                id,
                Publisher {
                    queue,
                    stream: sq,
                    reference,
                    highest,
                    saved_at: Instant::now(),
                },
            );
            Ok(())
        })())
    }

    fn publish(&mut self, version: u16, r: &mut Reader) -> Result<(), FrameError> {
        let publisher_id = r.u8()?;
        let n = r.count()?;
        let now = self.broker.timers().now_ms();
        let mut ids = Vec::with_capacity(n.min(4096));
        let mut duplicates = Vec::new();
        let mut errors: Vec<(u64, u16)> = Vec::new();
        // The messages as the client sent them: slices of the frame, stored
        // unchanged (AMQP 1.0 entries), never decoded here.
        let mut entries: Vec<StreamEntry> = Vec::with_capacity(n.min(4096));
        let publisher = self.publishers.get(&publisher_id);
        let mut highest = publisher.as_ref().map_or(0, |p| p.highest);
        let dedup = publisher.as_ref().is_some_and(|p| p.reference.is_some());
        for _ in 0..n {
            let publishing_id = r.u64()?;
            let filter = if version >= 2 { r.opt_string()? } else { None };
            let filter = filter.filter(|f| !f.is_empty());
            // The top bit of the next byte: a sub-entry batch (entry type with
            // the compression, u16 count, u32 uncompressed size, u32 size, the
            // entries) instead of one message (u32 size, the message).
            let (data, batch) = if r.peek_u8()? & 0x80 != 0 {
                let entry_type = r.u8()?;
                let _count = r.u16()?;
                let _uncompressed = r.u32()?;
                let len = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
                let data = r.raw(len)?;
                if (entry_type >> 4) & 0x7 != 0 {
                    // Compressed batches (gzip, snappy, lz4, zstd) are not read.
                    errors.push((publishing_id, code::PRECONDITION_FAILED));
                    continue;
                }
                (data, true)
            } else {
                let len = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
                (r.raw(len)?, false)
            };
            if publisher.is_none() {
                errors.push((publishing_id, code::PUBLISHER_DOES_NOT_EXIST));
                continue;
            }
            let before = entries.len();
            let entry = |data: Bytes| StreamEntry {
                filter: filter.clone(),
                data,
                format: EntryFormat::Amqp10,
            };
            if batch {
                if split_batch(&data, |m| entries.push(entry(m))).is_none() {
                    entries.truncate(before);
                    errors.push((publishing_id, code::PRECONDITION_FAILED));
                    continue;
                }
            } else {
                entries.push(entry(data));
            }
            if dedup && publishing_id <= highest {
                entries.truncate(before);
                duplicates.push(publishing_id);
                continue;
            }
            highest = highest.max(publishing_id);
            ids.push(publishing_id);
        }
        if let Some(p) = self.publishers.get_mut(&publisher_id) {
            p.highest = highest;
            if !entries.is_empty() {
                let count = entries.len() as u64;
                match p.stream.log.append(entries, now) {
                    Ok(first) => {
                        let after = first.saturating_add(count);
                        self.unconfirmed += ids.len();
                        self.confirms.push_back(PendingConfirm {
                            publisher: publisher_id,
                            ids,
                            wait: Some(StreamWait::new(p.stream.log.committed(), after)),
                        });
                    }
                    Err(e) => {
                        tracing::error!(peer = %self.peer, error = %e, "cannot append to a stream");
                        errors.extend(ids.into_iter().map(|id| (id, code::INTERNAL_ERROR)));
                    }
                }
            } else if !ids.is_empty() {
                // Empty sub-entry batches: nothing to store, confirmed in order.
                self.confirms.push_back(PendingConfirm {
                    publisher: publisher_id,
                    ids,
                    wait: None,
                });
            }
        }
        if !duplicates.is_empty() {
            // RabbitMQ confirms what it already has, without storing it again.
            self.confirms.push_back(PendingConfirm {
                publisher: publisher_id,
                ids: duplicates,
                wait: None,
            });
        }
        if !errors.is_empty() {
            let mut w = Writer::start(&mut self.out, key::PUBLISH_ERROR, 1);
            w.u8(publisher_id).count(errors.len());
            for (id, c) in errors {
                w.u64(id).u16(c);
            }
            w.finish();
        }
        self.reading_paused = self.unconfirmed >= UNCONFIRMED_HIGH;
        self.flush_confirms();
        Ok(())
    }

    /// Sends the PublishConfirms whose messages are on disk, in order.
    pub fn flush_confirms(&mut self) {
        while self
            .confirms
            .front()
            .is_some_and(|c| c.wait.as_ref().is_none_or(StreamWait::done))
        {
            let Some(c) = self.confirms.pop_front() else {
                break;
            };
            if c.wait.is_some() {
                self.unconfirmed = self.unconfirmed.saturating_sub(c.ids.len());
            }
            if let Some(p) = self.publishers.get_mut(&c.publisher) {
                if let (Some(reference), Some(max)) = (&p.reference, c.ids.iter().max()) {
                    let save = p.saved_at.elapsed() >= SEQUENCE_SAVE_EVERY;
                    p.stream.set_publisher_sequence(reference, *max, save);
                    if save {
                        p.saved_at = Instant::now();
                    }
                }
            }
            let mut w = Writer::start(&mut self.out, key::PUBLISH_CONFIRM, 1);
            w.u8(c.publisher).count(c.ids.len());
            for id in c.ids {
                w.u64(id);
            }
            w.finish();
        }
        if self.reading_paused && self.unconfirmed <= UNCONFIRMED_LOW {
            self.reading_paused = false;
        }
    }

    /// The store or a stream synced: confirms may go, and subscriptions that
    /// were caught up may have new chunks (delivered from the outbox turn).
    pub fn on_synced(&mut self) {
        self.flush_confirms();
        if self.subscriptions.values().any(|s| s.credit > 0) {
            self.outbox.wake();
        }
    }

    // ------------------------------------------------------------ consuming

    fn subscribe(&mut self, r: &mut Reader) -> Result<Answer<()>, FrameError> {
        let id = r.u8()?;
        let stream = r.string()?;
        let spec = match r.u16()? {
            1 => OffsetSpec::First,
            2 => OffsetSpec::Last,
            3 => OffsetSpec::Next,
            4 => OffsetSpec::Offset(r.u64()?),
            5 => OffsetSpec::Timestamp(r.i64()?),
            other => {
                return Err(FrameError::new(
                    code::PRECONDITION_FAILED,
                    format!("unknown offset type {other}"),
                ))
            }
        };
        let credit = r.u16()?;
        let props = r.properties()?;
        Ok((|| {
            if self.subscriptions.contains_key(&id) {
                return Err(code::SUBSCRIPTION_ID_ALREADY_EXISTS);
            }
            let (queue, sq) = self.stream_queue(&stream)?;
            self.check(Access::Read, &stream)?;
            let mut filter = Filter::default();
            for (k, v) in &props {
                if k.starts_with("filter.") {
                    filter.values.push(v.clone());
                } else if k == "match-unfiltered" {
                    filter.match_unfiltered = v == "true";
                } else if k == "single-active-consumer" && v == "true" {
                    // Not implemented: refused rather than silently shared.
                    return Err(code::PRECONDITION_FAILED);
                }
            }
            let next = sq.log.resolve(spec);
            self.subscriptions.insert(
                id,
                Subscription {
                    queue,
                    stream: sq,
                    next,
                    credit: u32::from(credit),
                    filter,
                },
            );
            Ok(())
        })())
    }

    fn credit(&mut self, r: &mut Reader) -> Result<(), FrameError> {
        let id = r.u8()?;
        let credit = r.u16()?;
        match self.subscriptions.get_mut(&id) {
            Some(s) => {
                s.credit = s.credit.saturating_add(u32::from(credit));
                self.outbox.wake();
            }
            None => {
                // Answered only when something is wrong (no correlation id).
                let mut w = Writer::start(&mut self.out, key::CREDIT | key::RESPONSE, 1);
                w.u16(code::SUBSCRIPTION_ID_DOES_NOT_EXIST).u8(id);
                w.finish();
            }
        }
        Ok(())
    }

    fn store_offset(&mut self, r: &mut Reader) -> Result<(), FrameError> {
        let reference = r.string()?;
        let stream = r.string()?;
        let offset = r.u64()?;
        if reference.is_empty() || reference.len() > MAX_REFERENCE {
            return Ok(());
        }
        // No answer in the protocol: a refusal is only logged.
        match self.stream_queue(&stream) {
            Ok((_, sq)) if self.check(Access::Read, &stream).is_ok() => {
                sq.store_offset(&reference, offset.saturating_add(1));
            }
            _ => tracing::debug!(peer = %self.peer, stream, "offset not stored"),
        }
        Ok(())
    }

    /// Deliveries, a login's answer, a close request: see the module doc.
    pub fn handle_outbox(&mut self) {
        if let Some((pending, corr, mechanism)) = self.login.take() {
            match pending.take() {
                Some(result) => self.logged_in(corr, mechanism, result),
                None => {
                    self.login = Some((pending, corr, mechanism));
                    return;
                }
            }
        }
        if let Some(reason) = self
            .registration
            .as_ref()
            .and_then(ConnectionGuard::take_close_request)
        {
            tracing::info!(peer = %self.peer, user = %self.user, %reason, "closing stream connection on request");
            self.close(code::OK, &reason);
            return;
        }
        self.outbox.drain();
        if self.state != State::Open {
            return;
        }
        self.forget_deleted();
        let ids: Vec<u8> = self.subscriptions.keys().copied().collect();
        for id in ids {
            if self.out.len() >= OUTPUT_ROOM {
                // The driver writes this first, then comes back.
                self.outbox.wake();
                return;
            }
            self.deliver(id);
        }
    }

    /// Sends chunks to subscription `id` while it has credit and room.
    fn deliver(&mut self, id: u8) {
        let limit = match self.client_frame_max {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        }
        .saturating_sub(DELIVER_OVERHEAD)
        .max(1024);
        let mut data = Vec::new();
        // Core-format entries are converted here, one after the other.
        let mut converted = Vec::new();
        loop {
            let Some(sub) = self.subscriptions.get_mut(&id) else {
                return;
            };
            if sub.credit == 0 {
                return;
            }
            if self.out.len() >= OUTPUT_ROOM {
                self.outbox.wake();
                return;
            }
            let chunk = match sub.stream.log.read_chunk(sub.next) {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a stream chunk");
                    return;
                }
            };
            let from = sub.next.max(chunk.id);
            if !chunk.may_match(&sub.filter) {
                sub.next = chunk.next();
                continue;
            }
            let committed = sub.stream.log.bounds().last_chunk;
            if chunk.format == EntryFormat::Amqp10
                && from == chunk.id
                && chunk.data().len() <= limit
            {
                // The whole chunk, as stored: its header and data, no copy
                // but the one into the output.
                write_deliver(
                    &mut self.out,
                    id,
                    self.deliver_v2,
                    committed,
                    &chunk,
                    chunk.id,
                    chunk.records,
                    chunk.crc,
                    chunk.data(),
                );
                sub.credit -= 1;
                sub.next = chunk.next();
                continue;
            }
            // Entries from `from`, as AMQP 1.0, in frames under the client's
            // frame max; each frame is a chunk of its own (contiguous offsets).
            let mut first = from;
            let mut count: u32 = 0;
            data.clear();
            for (offset, entry) in chunk.entries() {
                if offset < from {
                    continue;
                }
                let encoded: &[u8] = match chunk.format {
                    EntryFormat::Amqp10 => &entry,
                    EntryFormat::Core => {
                        let Some(message) = Message::decode_stream_entry(&entry) else {
                            tracing::warn!(offset, "undecodable stream entry skipped");
                            // Still sent (as an empty message) to keep offsets contiguous.
                            push_entry(&mut data, &[0x00, 0x53, 0x75, 0xa0, 0x00]);
                            count += 1;
                            continue;
                        };
                        converted.clear();
                        amqp10::encode(&message, &mut converted);
                        &converted
                    }
                };
                if count > 0
                    && (data.len() + 4 + encoded.len() > limit || count >= u32::from(u16::MAX))
                {
                    let sub = self.subscriptions.get_mut(&id);
                    let Some(sub) = sub else { return };
                    write_deliver(
                        &mut self.out,
                        id,
                        self.deliver_v2,
                        committed,
                        &chunk,
                        first,
                        count,
                        crc32fast::hash(&data),
                        &data,
                    );
                    sub.credit -= 1;
                    sub.next = offset;
                    if sub.credit == 0 {
                        return;
                    }
                    data.clear();
                    first = offset;
                    count = 0;
                }
                push_entry(&mut data, encoded);
                count += 1;
            }
            let Some(sub) = self.subscriptions.get_mut(&id) else {
                return;
            };
            sub.next = chunk.next();
            if count > 0 {
                write_deliver(
                    &mut self.out,
                    id,
                    self.deliver_v2,
                    committed,
                    &chunk,
                    first,
                    count,
                    crc32fast::hash(&data),
                    &data,
                );
                sub.credit -= 1;
            }
        }
    }

    // ------------------------------------------------------------ closing

    /// Closes the connection with `code` and `reason` (the client answers).
    pub fn close(&mut self, status: u16, reason: &str) {
        if matches!(self.state, State::Closing | State::Closed) {
            return;
        }
        let mut w = Writer::start(&mut self.out, key::CLOSE, 1);
        w.u32(0).u16(status).string(reason);
        w.finish();
        tracing::info!(peer = %self.peer, user = %self.user, code = status, reason, "closing stream connection");
        self.close_reason = Some(reason.to_owned());
        self.release();
        self.state = State::Closing;
    }

    /// The connection ends now: what it held is released.
    pub fn finish(&mut self, reason: String) {
        if self.state == State::Closed {
            return;
        }
        if self.close_reason.is_none() {
            self.close_reason = Some(reason);
        }
        self.release();
        self.state = State::Closed;
    }

    fn release(&mut self) {
        for (_, p) in self.publishers.drain() {
            save_sequence(&p);
        }
        self.subscriptions.clear();
        self.registration = None;
    }

    /// The broker is shutting down.
    pub fn shutdown(&mut self) {
        if self.state == State::Open {
            self.close(code::OK, "broker shutting down");
        } else {
            self.finish("broker shutting down".into());
        }
    }
}

/// Saves a publisher's highest publishing id (it goes away).
fn save_sequence(p: &Publisher) {
    if let Some(reference) = &p.reference {
        if p.highest > 0 {
            p.stream.set_publisher_sequence(reference, p.highest, true);
        }
    }
}

/// The messages of an uncompressed sub-entry batch (`size:u32 data` each),
/// handed to `each`; `None` when the batch is malformed.
fn split_batch(data: &Bytes, mut each: impl FnMut(Bytes)) -> Option<()> {
    let mut r = Reader::new(data.clone());
    while r.remaining() > 0 {
        let len = usize::try_from(r.u32().ok()?).ok()?;
        each(r.raw(len).ok()?);
    }
    Some(())
}

fn push_entry(data: &mut Vec<u8>, entry: &[u8]) {
    data.put_u32(u32::try_from(entry.len()).unwrap_or(u32::MAX) & 0x7fff_ffff);
    data.extend_from_slice(entry);
}

/// One Deliver frame: the chunk's header (osiris' layout, no Bloom filter, no
/// trailer) for `count` entries from offset `first`, then `data`.
#[allow(clippy::too_many_arguments)]
fn write_deliver(
    out: &mut BytesMut,
    subscription: u8,
    v2: bool,
    committed: u64,
    chunk: &switchyard_core::stream::Chunk,
    first: u64,
    count: u32,
    crc: u32,
    data: &[u8],
) {
    let mut w = Writer::start(out, key::DELIVER, if v2 { 2 } else { 1 });
    w.u8(subscription);
    if v2 {
        w.u64(committed);
    }
    w.u8(0x50) // magic 5, version 0
        .u8(0) // user chunk
        .u16(u16::try_from(count).unwrap_or(u16::MAX))
        .u32(count)
        .i64(chunk.timestamp)
        .u64(1) // epoch
        .u64(first)
        .u32(crc)
        .u32(u32::try_from(data.len()).unwrap_or(u32::MAX))
        .u32(0) // trailer
        .u32(0) // Bloom size and reserved
        .raw(data);
    w.finish();
}

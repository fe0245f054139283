//! The STOMP connection state machine: frames in, core calls and frames out.
//!
//! No sockets and no clocks here (quinn-proto's rule): the connection task hands
//! in the bytes it read ([`Session::handle_input`]) and the deliveries its outbox
//! collected ([`Session::handle_outbox`]); the session appends the frames to send
//! to [`Session::output`] and says through [`Session::is_closed`] when the socket
//! should be closed. TCP and WebSocket connections run the same session.
//!
//! Every refusal is an ERROR frame (`message` header, readable body, `receipt-id`
//! when the offending frame asked for a receipt) followed by the end of the
//! connection, as the spec says; only this connection is affected. A connection
//! that ends for any reason gives back what it holds: unacknowledged messages go
//! back to their queues (redelivered), consumers are cancelled, open transactions
//! are dropped, and the exclusive queues it made (topic subscriptions, temp
//! queues) are deleted.

mod error;
mod subscribe;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use switchyard_driver::Output;

use bytes::BytesMut;
use switchyard_core::auth::{Access, Resource, TopicRules};
use switchyard_core::authn::{LoginRequest, LoginStart, PendingLogin};
use switchyard_core::connections::{protocol, ConnectionGuard, ConnectionInfo};
use switchyard_core::consumer::{Consumer, Credit, Outbox, Outgoing};
use switchyard_core::deadletter::DeathReason;
use switchyard_core::queue::{Queue, QueuedMessage};
use switchyard_core::stats::{
    ChannelState, ConnectionGuard as CountedConnection, Protocol, SourceGuard, Stat,
};
use switchyard_core::vhost::VHost;
use switchyard_core::vhost::{StreamWait, WaitState};
use switchyard_core::{message, Broker, Message};
use tokio::sync::watch;

use crate::codec::{Command, Decoder, Frame, FrameWriter, Version};
use crate::mapping::{self, Destination};
use crate::StompSettings;

pub use error::FrameError;

/// How many deliveries may wait in a connection's outbox before queues hold back
/// (on top of prefetch): bounds what a slow reader with `ack:auto` can pin.
pub const OUTBOX_CAPACITY: usize = 4096;

/// The `server` header of CONNECTED.
const SERVER: &str = concat!("Switchyard/", env!("CARGO_PKG_VERSION"));

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for CONNECT or STOMP.
    Connecting,
    /// CONNECTED sent.
    Open,
    /// The socket should be closed once the output is written.
    Closed,
}

/// A subscription's `ack` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckMode {
    /// Settled when sent.
    Auto,
    /// An ACK settles the message and every earlier one of the subscription.
    Client,
    /// An ACK settles that message only.
    ClientIndividual,
}

/// One SUBSCRIBE.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) consumer: Arc<Consumer>,
    pub(crate) queue: Arc<Queue>,
    pub(crate) ack: AckMode,
    /// A durable topic subscription: its queue outlives the connection and is
    /// deleted only by an UNSUBSCRIBE that says `durable:true`.
    pub(crate) durable: bool,
}

/// A delivered message waiting for ACK or NACK.
#[derive(Debug)]
struct Unacked {
    /// The MESSAGE's `ack` / `message-id`.
    id: u64,
    subscription: String,
    consumer: Arc<Consumer>,
    queue: Arc<Queue>,
    message: QueuedMessage,
}

/// What becomes of settled messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ack,
    /// NACK with `requeue` (the default): back to the queue, redelivered.
    Requeue,
    /// NACK with `requeue:false`: dead-lettered if the queue says so, else dropped.
    Reject,
}

/// An operation a transaction holds until COMMIT.
#[derive(Debug)]
enum TxOp {
    Send(Arc<Message>),
    Settle { id: u64, outcome: Outcome },
}

/// One STOMP connection's protocol state.
pub struct Session {
    broker: Arc<Broker>,
    settings: Arc<StompSettings>,
    peer: SocketAddr,
    /// Broker-wide id: owner of the exclusive queues this connection declares.
    id: u64,
    state: State,
    decoder: Decoder,
    version: Version,
    out: Output,
    user: String,
    vhost: Option<Arc<VHost>>,
    outbox: Arc<Outbox>,
    /// STOMP has no connection-wide prefetch; the core's shared credit is unlimited.
    shared_credit: Arc<Credit>,
    subscriptions: HashMap<String, Subscription>,
    /// In delivery order (ids only grow).
    unacked: VecDeque<Unacked>,
    next_message_id: u64,
    transactions: HashMap<String, Vec<TxOp>>,
    /// `/temp-queue/<id>` -> the private queue behind it.
    temp_queues: HashMap<String, Arc<Queue>>,
    /// Exclusive queues this connection declared: deleted when it ends.
    owned_queues: Vec<Arc<Queue>>,
    /// Write permission per exchange, cached: a regex match per SEND would
    /// dominate small messages. Dropped when the broker's permissions change
    /// (`perm_generation`), so a change applies from the next read batch.
    write_allowed: HashMap<String, bool>,
    /// The user's topic permissions in the vhost, compiled (None: there are
    /// none, and a SEND costs nothing extra). Refreshed with `write_allowed`.
    topic_rules: Option<Arc<TopicRules>>,
    /// A CONNECT whose login an external authentication backend is deciding
    /// (with the frame and the login name); no frame is read meanwhile.
    /// Boxed: set only while an external backend decides (96 bytes inline).
    pending_login: Option<Box<(PendingLogin, Frame, String)>>,
    perm_generation: u64,
    /// When the access token of a `jwt` login expires (ms since the epoch).
    token_expires_ms: Option<u64>,
    /// In the broker's connection registry from CONNECTED on.
    registration: Option<ConnectionGuard>,
    has_published: bool,
    heartbeat_out: Duration,
    heartbeat_in: Duration,
    close_reason: Option<String>,
    /// The store's synced position (None: no store, nothing to wait for).
    synced: Option<watch::Receiver<u64>>,
    /// RECEIPTs not yet written, in frame order, each with the store position
    /// that must be on disk first (0: none; it still waits for those before it,
    /// so receipts keep the order of the frames they answer).
    pending_receipts: VecDeque<(u64, Vec<StreamWait>, String)>,
    /// Stream commits the frame being handled waits for (its SENDs reached
    /// stream queues, which sync on their own): taken by its receipt.
    stream_waits: Vec<StreamWait>,
    /// DISCONNECT came while receipts waited: close once they are written.
    disconnecting: bool,
    /// Counts the connection in the node's opened/closed totals.
    _counted: CountedConnection,
    /// The session's message statistics (stats.rs), from CONNECT on; written by
    /// this connection's task only.
    stats: Option<SourceGuard>,
}

impl Session {
    pub fn new(broker: Arc<Broker>, settings: Arc<StompSettings>, peer: SocketAddr) -> Self {
        let id = broker.next_id();
        let decoder = Decoder::new(settings.limits);
        let synced = broker.synced();
        let counted = broker.stats.open_connection();
        Session {
            _counted: counted,
            stats: None,
            broker,
            settings,
            peer,
            id,
            state: State::Connecting,
            decoder,
            version: Version::V1_0,
            out: Output::default(),
            user: String::new(),
            vhost: None,
            outbox: Outbox::new(OUTBOX_CAPACITY),
            shared_credit: Arc::new(Credit::new(0)),
            subscriptions: HashMap::new(),
            unacked: VecDeque::new(),
            next_message_id: 1,
            transactions: HashMap::new(),
            temp_queues: HashMap::new(),
            owned_queues: Vec::new(),
            write_allowed: HashMap::new(),
            topic_rules: None,
            pending_login: None,
            perm_generation: 0,
            token_expires_ms: None,
            registration: None,
            has_published: false,
            heartbeat_out: Duration::ZERO,
            heartbeat_in: Duration::ZERO,
            close_reason: None,
            synced,
            pending_receipts: VecDeque::new(),
            stream_waits: Vec::new(),
            disconnecting: false,
        }
    }

    /// Keeps the session's consumer gauge (statistics) current.
    fn note_consumers(&self) {
        if let Some(stats) = &self.stats {
            stats.set_consumers(self.subscriptions.len());
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

    /// Some RECEIPT waits for the store: the connection task should call
    /// [`Session::flush_receipts`] when the synced position moves.
    pub fn awaits_sync(&self) -> bool {
        !self.pending_receipts.is_empty()
    }

    /// Writes the RECEIPTs whose messages are now on disk, in order; ends the
    /// connection if a DISCONNECT was waiting for them.
    pub fn flush_receipts(&mut self) {
        if self.state == State::Closed {
            return;
        }
        let synced = self.synced.as_ref().map_or(u64::MAX, |rx| *rx.borrow());
        while let Some((at, streams, _)) = self.pending_receipts.front() {
            let state = StreamWait::state_of_all(streams);
            if *at > synced || state == WaitState::Pending {
                break;
            }
            let Some((_, _, id)) = self.pending_receipts.pop_front() else {
                break;
            };
            if state == WaitState::Failed {
                // A quorum queue did not commit a SEND in time (`[cluster]
                // quorum_commit_timeout_ms`): never a RECEIPT for it. STOMP's
                // only negative answer is ERROR, which ends the connection
                // (spec 1.2 "ERROR"); it names the frame by its receipt.
                // Without a receipt header there is nothing to answer.
                self.pending_receipts.clear();
                self.fail(
                    FrameError::new(
                        "publish failed",
                        "a quorum queue did not commit the message in time (no majority); \
                         it may or may not be enqueued",
                    ),
                    Some(&id),
                );
                return;
            }
            self.write_receipt(&id);
        }
        if self.disconnecting && self.pending_receipts.is_empty() {
            self.finish("client sent DISCONNECT".into());
        }
    }

    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// The socket should be closed once the output is flushed.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// CONNECTED has been sent: the handshake timeout no longer applies.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// The negotiated version (1.0 until CONNECT).
    pub fn version(&self) -> Version {
        self.version
    }

    /// How often the server must send something (zero: never).
    pub fn heartbeat_out(&self) -> Duration {
        self.heartbeat_out
    }

    /// How often the client promised to send something (zero: no promise).
    pub fn heartbeat_in(&self) -> Duration {
        self.heartbeat_in
    }

    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.as_deref()
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether the memory alarm should stop reading from this connection: it
    /// blocks publishers only (as RabbitMQ does), so consumers keep draining.
    pub fn blocks_on_alarm(&self) -> bool {
        self.has_published && self.state == State::Open
    }

    /// Feeds bytes read from the socket. Whole frames are consumed from `input`;
    /// a partial frame stays for the next call (the decoder remembers how far it
    /// looked).
    pub fn handle_input(&mut self, input: &mut BytesMut) {
        let generation = self.broker.auth.generation();
        // A login token that expired grants nothing from now on: results
        // cached under it go (STOMP has no way to renew it).
        let token_expired = self.token_expires_ms.is_some_and(|at| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .is_ok_and(|now| now.as_millis() >= u128::from(at))
        });
        if token_expired {
            self.token_expires_ms = None;
        }
        if generation != self.perm_generation || token_expired {
            self.perm_generation = generation;
            self.write_allowed.clear();
            self.refresh_topic_rules();
        }
        let before = input.len();
        self.handle_frames(input);
        if let Some(stats) = &self.stats {
            stats.add(Stat::RecvOct, before.saturating_sub(input.len()) as u64);
        }
        self.publish_state();
    }

    /// Copies the connection's in-flight counts to its statistics, where
    /// `/api/channels` shows them as its one channel: prefetch = the largest
    /// subscription's `prefetch-count`, unacknowledged = MESSAGEs awaiting
    /// ACK/NACK, transactional while a BEGIN is open (its SENDs and ACKs
    /// uncommitted).
    fn publish_state(&self) {
        let Some(stats) = &self.stats else {
            return;
        };
        let (mut messages_uncommitted, mut acks_uncommitted) = (0, 0);
        for op in self.transactions.values().flatten() {
            match op {
                TxOp::Send(_) => messages_uncommitted += 1,
                TxOp::Settle { .. } => acks_uncommitted += 1,
            }
        }
        stats.set_state(&ChannelState {
            prefetch_count: self
                .subscriptions
                .values()
                .map(|s| u64::from(s.consumer.options.prefetch))
                .max()
                .unwrap_or(0),
            transactional: !self.transactions.is_empty(),
            messages_unacknowledged: self.unacked.len() as u64,
            messages_uncommitted,
            acks_uncommitted,
            ..ChannelState::default()
        });
    }

    fn handle_frames(&mut self, input: &mut BytesMut) {
        while self.state != State::Closed && self.pending_login.is_none() {
            match self.decoder.decode(input) {
                Ok(None) => break,
                Ok(Some(frame)) => self.handle_frame(frame),
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "bad STOMP frame");
                    self.fail(FrameError::from(e), None);
                }
            }
        }
        // Receipts whose messages the store synced while this batch was handled.
        if !self.pending_receipts.is_empty() {
            self.flush_receipts();
        }
    }

    /// The broker is shutting down.
    pub fn shutdown(&mut self) {
        if self.state == State::Open {
            self.fail(
                FrameError::new("server shutdown", "The broker is shutting down."),
                None,
            );
        } else {
            self.finish("broker shutdown".into());
        }
    }

    /// The connection ended without an ERROR frame (socket closed, missed
    /// heart-beats, handshake timeout).
    pub fn finish(&mut self, reason: String) {
        if self.close_reason.is_none() {
            self.close_reason = Some(reason);
        }
        self.release_resources();
        self.state = State::Closed;
    }

    /// Sends ERROR and ends the connection.
    fn fail(&mut self, e: FrameError, receipt: Option<&str>) {
        if self.state == State::Closed {
            return;
        }
        tracing::debug!(peer = %self.peer, user = %self.user, message = %e.message, detail = %e.detail, "STOMP ERROR");
        let mut w = FrameWriter::start(&mut self.out, Command::Error, self.version);
        w.header("message", &e.message);
        if let Some(r) = receipt {
            w.header("receipt-id", r);
        }
        for (k, v) in &e.headers {
            w.header(k, v);
        }
        w.header("content-type", "text/plain");
        w.header("content-length", &e.detail.len().to_string());
        w.finish(e.detail.as_bytes());
        self.finish(format!("{}: {}", e.message, e.detail));
    }

    /// Answers a frame's `receipt` header once the store has synced
    /// `durable_at` (0: nothing to wait for) and every earlier receipt is out.
    fn receipt(&mut self, receipt: Option<&str>, durable_at: u64) {
        let streams = std::mem::take(&mut self.stream_waits);
        let Some(r) = receipt else { return };
        if durable_at == 0 && streams.is_empty() && self.pending_receipts.is_empty() {
            self.write_receipt(r);
        } else {
            self.pending_receipts
                .push_back((durable_at, streams, r.to_owned()));
        }
    }

    fn write_receipt(&mut self, id: &str) {
        let mut w = FrameWriter::start(&mut self.out, Command::Receipt, self.version);
        w.header("receipt-id", id);
        w.finish(b"");
    }

    fn handle_frame(&mut self, frame: Frame) {
        let receipt = frame.get("receipt").map(str::to_owned);
        if self.disconnecting {
            // After DISCONNECT nothing more is processed (its receipt is pending).
            return;
        }
        let result: Result<u64, FrameError> = match (self.state, frame.command) {
            (State::Closed, _) => return,
            (State::Connecting, Command::Connect | Command::Stomp) => {
                // CONNECT carries no receipt (the spec lists none; CONNECTED is the answer).
                if let Err(e) = self.connect(&frame) {
                    self.fail(e, None);
                }
                return;
            }
            (State::Connecting, other) => Err(FrameError::new(
                "not connected",
                format!(
                    "the first frame must be CONNECT or STOMP, not {}",
                    other.as_str()
                ),
            )),
            (State::Open, Command::Connect | Command::Stomp) => Err(FrameError::new(
                "already connected",
                "CONNECT was sent twice on one connection",
            )),
            (State::Open, Command::Send) => self.send(frame),
            (State::Open, Command::Subscribe) => self.subscribe(&frame).map(|()| 0),
            (State::Open, Command::Unsubscribe) => self.unsubscribe(&frame).map(|()| 0),
            (State::Open, Command::Ack) => self.ack(&frame, Command::Ack).map(|()| 0),
            (State::Open, Command::Nack) => self.ack(&frame, Command::Nack).map(|()| 0),
            (State::Open, Command::Begin) => self.begin(&frame).map(|()| 0),
            (State::Open, Command::Commit) => self.commit(&frame),
            (State::Open, Command::Abort) => self.abort(&frame).map(|()| 0),
            (State::Open, Command::Disconnect) => {
                // The receipt promises everything before it is done, stored
                // messages included: close only once it is written.
                self.receipt(receipt.as_deref(), 0);
                if self.pending_receipts.is_empty() {
                    self.finish("client sent DISCONNECT".into());
                } else {
                    self.disconnecting = true;
                }
                return;
            }
            (
                State::Open,
                c @ (Command::Connected | Command::Message | Command::Receipt | Command::Error),
            ) => Err(FrameError::new(
                "unexpected frame",
                format!("{} is a server frame; a client may not send it", c.as_str()),
            )),
        };
        match result {
            Ok(durable_at) => self.receipt(receipt.as_deref(), durable_at),
            Err(e) => self.fail(e, receipt.as_deref()),
        }
    }

    // ---- CONNECT ----

    fn connect(&mut self, frame: &Frame) -> Result<(), FrameError> {
        let version = negotiate(frame.get("accept-version"))?;
        self.version = version;
        // Checked before the login; used once it is decided (`connect_as`).
        let (cx, cy) = parse_heartbeat(frame.get("heart-beat"))?;
        // Certificate login (RabbitMQ's rabbit_stomp_processor creds/3): a login
        // header wins; without one, a verified client certificate on a TLS
        // listener names the user (which must exist) before the default login.
        let cert_login = switchyard_core::connections::accepted()
            .and_then(|a| a.cert_login)
            .filter(|_| frame.get("login").is_none());
        if let Some(name) = cert_login {
            let user = match self.broker.auth.login_external(&name, Some(self.peer.ip())) {
                Ok(u) => u.name.clone(),
                Err(why) => {
                    tracing::warn!(peer = %self.peer, "STOMP certificate login refused: {why}");
                    return Err(FrameError::new(
                        "access refused",
                        format!("Login refused for user '{name}'."),
                    ));
                }
            };
            return self.connected(frame, version, (cx, cy), user);
        }
        let (login, passcode) = match (frame.get("login"), &self.settings.default_login) {
            (Some(login), _) => (
                login.to_owned(),
                frame.get("passcode").unwrap_or_default().to_owned(),
            ),
            (None, Some((login, passcode))) => (login.clone(), passcode.clone()),
            (None, None) => {
                return Err(FrameError::new(
                    "access refused",
                    "CONNECT has no login header and the broker has no default STOMP user",
                ))
            }
        };
        let request = LoginRequest {
            username: login.clone(),
            password: passcode.into_bytes(),
            peer: Some(self.peer.ip()),
            vhost: frame
                .get("host")
                .filter(|h| self.broker.has_vhost(h))
                .map(str::to_owned),
            client_id: None,
        };
        let outbox = self.outbox.clone();
        let login_result = match self
            .broker
            .auth
            .clone()
            .begin_login(request, move || outbox.wake())
        {
            LoginStart::Done(result) => result,
            LoginStart::Pending(pending) => {
                self.pending_login = Some(Box::new((pending, frame.clone(), login)));
                return Ok(());
            }
        };
        self.connect_as(frame, &login, login_result)
    }

    /// Whether a CONNECT waits for an external authentication backend.
    pub fn login_pending(&self) -> bool {
        self.pending_login.is_some()
    }

    /// The rest of CONNECT once the login is decided.
    fn connect_as(
        &mut self,
        frame: &Frame,
        login: &str,
        login_result: Result<switchyard_core::auth::User, switchyard_core::auth::LoginError>,
    ) -> Result<(), FrameError> {
        let version = self.version;
        let (cx, cy) = parse_heartbeat(frame.get("heart-beat"))?;
        let user = match login_result {
            Ok(u) => u.name,
            Err(why) => {
                tracing::warn!(peer = %self.peer, "STOMP login refused: {why}");
                return Err(FrameError::new(
                    "access refused",
                    format!("Login refused for user '{login}'."),
                ));
            }
        };
        self.connected(frame, version, (cx, cy), user)
    }

    /// CONNECT after login: the vhost, the registry, CONNECTED.
    fn connected(
        &mut self,
        frame: &Frame,
        version: Version,
        (cx, cy): (u64, u64),
        user: String,
    ) -> Result<(), FrameError> {
        // `host` names the vhost when such a vhost exists; many clients send the
        // server's host name there, which then means the default vhost.
        let vhost_name = frame
            .get("host")
            .filter(|h| self.broker.has_vhost(h))
            .unwrap_or(&self.settings.default_vhost)
            .to_owned();
        let vhost = self.broker.vhost(&vhost_name)?;
        self.broker
            .auth
            .check_vhost(&user, &vhost_name)
            .map_err(|e| FrameError::new("access refused", e.to_string()))?;
        // Heart-beats (spec: max of what one side can do and the other wants; 0 on
        // either side means none). `heartbeat_min` keeps a client from making the
        // broker send or expect a beat every millisecond.
        let min = self.settings.heartbeat_min;
        let bound = |ms: u64| {
            if ms == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(ms).max(min)
            }
        };
        self.heartbeat_out = bound(cy);
        self.heartbeat_in = bound(cx);
        let mut info = ConnectionInfo::new(
            match version {
                Version::V1_0 => protocol::STOMP_10,
                Version::V1_1 => protocol::STOMP_11,
                Version::V1_2 => protocol::STOMP_12,
            },
            &user,
            &vhost_name,
            self.peer,
            self.broker.timers().now_ms(),
        );
        info.timeout = u16::try_from(self.heartbeat_in.as_secs()).unwrap_or(u16::MAX);
        let by_certificate = frame.get("login").is_none()
            && switchyard_core::connections::accepted()
                .and_then(|a| a.cert_login)
                .is_some_and(|name| *name == *user);
        if by_certificate {
            info.auth_mechanism = "EXTERNAL";
        }
        let guard = self
            .broker
            .register_connection(self.id, info, self.outbox.clone())
            .map_err(|e| {
                tracing::warn!(peer = %self.peer, user = %user, "STOMP connection refused: {e}");
                if e.text.contains(switchyard_core::ratelimit::REFUSAL) {
                    return FrameError::new(
                        "Bad CONNECT",
                        format!("Connection refused: {}", e.text),
                    );
                }
                // RabbitMQ's text for the vhost limit; the same shape for the user's.
                let which = if e.text.starts_with("connection refused for user") {
                    "user"
                } else {
                    "vhost"
                };
                FrameError::new(
                    "Bad CONNECT",
                    format!("Connection refused: {which} connection limit reached"),
                )
            })?;
        self.registration = Some(guard);
        self.token_expires_ms = self.broker.auth.token_expiry(&user);
        self.user = user;
        let protocol = match self.version {
            Version::V1_0 => Protocol::Stomp10,
            Version::V1_1 => Protocol::Stomp11,
            Version::V1_2 => Protocol::Stomp12,
        };
        self.stats = Some(
            self.broker
                .stats
                .open_source(protocol, self.id, 0, &vhost.name, false),
        );
        self.vhost = Some(vhost);
        self.refresh_topic_rules();
        self.decoder.set_version(version);
        self.state = State::Open;
        let mut w = FrameWriter::start(&mut self.out, Command::Connected, version);
        w.header("version", version.as_str());
        w.header("session", &format!("session-{}", self.id));
        w.header("server", SERVER);
        w.header(
            "heart-beat",
            &format!(
                "{},{}",
                self.heartbeat_out.as_millis(),
                self.heartbeat_in.as_millis()
            ),
        );
        w.finish(b"");
        tracing::debug!(peer = %self.peer, user = %self.user, vhost = %vhost_name, version = version.as_str(), "STOMP connection open");
        Ok(())
    }

    fn vhost(&self) -> Result<Arc<VHost>, FrameError> {
        self.vhost
            .clone()
            .ok_or_else(|| FrameError::new("not connected", "no CONNECT yet"))
    }

    fn check(&self, access: Access, resource: Resource, name: &str) -> Result<(), FrameError> {
        let vhost = self.vhost()?;
        self.broker
            .auth
            .check(&self.user, &vhost.name, access, resource, name)
            .map_err(FrameError::from)
    }

    fn refresh_topic_rules(&mut self) {
        self.topic_rules = self
            .vhost
            .as_ref()
            .and_then(|v| self.broker.auth.topic_rules(&self.user, &v.name, None));
    }

    /// Topic permission on `key` (a routing key for write, a binding key for
    /// read) when `exchange` is a topic exchange.
    pub(super) fn check_topic(
        &self,
        exchange: &str,
        access: Access,
        key: &str,
    ) -> Result<(), FrameError> {
        match (&self.topic_rules, &self.vhost) {
            (Some(rules), Some(vhost)) => rules
                .authorize(vhost, exchange, access, key)
                .map_err(FrameError::from),
            _ => Ok(()),
        }
    }

    /// Write permission on an exchange, cached (see `write_allowed`).
    fn check_publish(&mut self, exchange: &str) -> Result<(), FrameError> {
        if self.write_allowed.get(exchange) == Some(&true) {
            return Ok(());
        }
        let result = self.check(Access::Write, Resource::Exchange, exchange);
        if self.write_allowed.len() < 1024 {
            self.write_allowed
                .insert(exchange.to_owned(), result.is_ok());
        }
        result
    }

    // ---- SEND ----

    /// SEND; returns the store position its receipt must wait for (0: none).
    fn send(&mut self, frame: Frame) -> Result<u64, FrameError> {
        let dest = frame
            .get("destination")
            .ok_or_else(|| FrameError::missing_header("SEND", "destination"))?;
        let destination = Destination::parse(dest)?;
        let mut properties = mapping::properties_from_headers(&frame.headers)?;
        if let Some(user_id) = properties.user_id.as_deref() {
            if user_id != self.user {
                return Err(FrameError::new(
                    "PRECONDITION_FAILED",
                    format!(
                        "user-id header set to '{user_id}' but authenticated user was '{}'",
                        self.user
                    ),
                ));
            }
        }
        if let Some(reply_to) = properties.reply_to.take() {
            properties.reply_to = Some(self.reply_to_property(&reply_to)?);
        }
        let (exchange, key) = match destination {
            Destination::Queue(q) => {
                self.ensure_queue(&q, &frame.headers, false)?;
                (String::new(), q)
            }
            Destination::AmqQueue(q) | Destination::ReplyQueue(q) => (String::new(), q),
            Destination::Topic(key) => (mapping::TOPIC_EXCHANGE.to_owned(), key),
            Destination::Exchange { exchange, key } => (exchange, key),
            Destination::TempQueue(id) => (String::new(), self.temp_queue(&id)?.name.clone()),
        };
        self.check_publish(&exchange)?;
        self.check_topic(&exchange, Access::Write, &key)?;
        self.has_published = true;
        let tx = frame.get("transaction").map(str::to_owned);
        let message = Message::new(exchange, key, properties, message::own_if_small(frame.body));
        if let Some(tx) = tx.as_deref() {
            // The exchange must exist now, though the routing happens at COMMIT.
            self.vhost()?.exchange(&message.exchange)?;
            self.transactions
                .get_mut(tx)
                .ok_or_else(|| unknown_transaction(tx))?
                .push(TxOp::Send(message));
            return Ok(0);
        }
        self.publish(message)
    }

    /// Routes a message; returns the store position that must be synced before
    /// a RECEIPT may say it is safe (0: transient, or no durable queue took it).
    /// INTEROP.md: "A RECEIPT for a persistent SEND is sent after it is stored";
    /// one fsync covers every message that arrived meanwhile (group commit).
    fn publish(&mut self, message: Arc<Message>) -> Result<u64, FrameError> {
        let size = message.body_size();
        let routed = self.vhost()?.publish(message)?;
        self.stream_waits
            .extend(routed.streams.iter().filter(|w| !w.done()).cloned());
        if let Some(stats) = &self.stats {
            stats.published(size);
            if routed.queues == 0 {
                stats.add(Stat::DropUnroutable, 1);
            }
        }
        Ok(routed.durable_at)
    }

    /// `reply-to` as the property carries it: `/temp-queue/<id>` becomes the real
    /// name of this session's reply queue (created and subscribed on first use),
    /// `/reply-queue/<q>` becomes `<q>`, anything else stays (mapping.rs).
    fn reply_to_property(&mut self, reply_to: &str) -> Result<String, FrameError> {
        if let Some(id) = reply_to.strip_prefix("/temp-queue/") {
            if id.is_empty() {
                return Err(mapping::Destination::parse(reply_to)
                    .err()
                    .map(FrameError::from)
                    .unwrap_or_else(|| FrameError::new("invalid destination", reply_to)));
            }
            return Ok(self.temp_queue(id)?.name.clone());
        }
        Ok(mapping::reply_to_property(reply_to)
            .unwrap_or(reply_to)
            .to_owned())
    }

    // ---- ACK / NACK ----

    fn ack(&mut self, frame: &Frame, command: Command) -> Result<(), FrameError> {
        // 1.2 names the message by `id` (the MESSAGE's `ack`); 1.0 and 1.1 by
        // `message-id`. Both carry the same value here, so either is accepted.
        let name = if self.version == Version::V1_2 {
            "id"
        } else {
            "message-id"
        };
        let value = frame
            .get(name)
            .or_else(|| frame.get("id"))
            .or_else(|| frame.get("message-id"))
            .ok_or_else(|| FrameError::missing_header(command.as_str(), name))?;
        let id: u64 = value.parse().map_err(|_| unknown_message(value))?;
        let outcome = match command {
            Command::Nack if frame.get("requeue") == Some("false") => Outcome::Reject,
            Command::Nack => Outcome::Requeue,
            _ => Outcome::Ack,
        };
        if self.unacked.binary_search_by_key(&id, |u| u.id).is_err() {
            return Err(unknown_message(value));
        }
        if let Some(tx) = frame.get("transaction") {
            self.transactions
                .get_mut(tx)
                .ok_or_else(|| unknown_transaction(tx))?
                .push(TxOp::Settle { id, outcome });
            return Ok(());
        }
        self.settle(id, outcome)
    }

    /// Settles message `id` (and, for `ack:client`, every earlier one of its
    /// subscription: client acks are cumulative).
    fn settle(&mut self, id: u64, outcome: Outcome) -> Result<(), FrameError> {
        let pos = self
            .unacked
            .binary_search_by_key(&id, |u| u.id)
            .map_err(|_| unknown_message(&id.to_string()))?;
        let cumulative = self
            .unacked
            .get(pos)
            .and_then(|u| self.subscriptions.get(&u.subscription))
            .is_some_and(|s| s.ack == AckMode::Client);
        let taken: Vec<Unacked> = if cumulative {
            let sub = self
                .unacked
                .get(pos)
                .map(|u| u.subscription.clone())
                .unwrap_or_default();
            let mut taken = Vec::new();
            let mut kept = VecDeque::with_capacity(self.unacked.len());
            for u in self.unacked.drain(..) {
                if u.id <= id && u.subscription == sub {
                    taken.push(u);
                } else {
                    kept.push_back(u);
                }
            }
            self.unacked = kept;
            taken
        } else {
            self.unacked.remove(pos).into_iter().collect()
        };
        if let (Outcome::Ack, Some(stats)) = (outcome, &self.stats) {
            for u in &taken {
                stats.add_for(u.queue.queue_type(), Stat::Ack, 1);
            }
        }
        let vhost = self.vhost.clone();
        settle_entries(taken, outcome, vhost.as_deref());
        Ok(())
    }

    // ---- transactions ----

    fn transaction_name<'f>(frame: &'f Frame, command: &str) -> Result<&'f str, FrameError> {
        frame
            .get("transaction")
            .ok_or_else(|| FrameError::missing_header(command, "transaction"))
    }

    fn begin(&mut self, frame: &Frame) -> Result<(), FrameError> {
        let tx = Self::transaction_name(frame, "BEGIN")?;
        if self.transactions.contains_key(tx) {
            return Err(FrameError::new(
                "transaction error",
                format!("transaction '{tx}' is already open"),
            ));
        }
        self.transactions.insert(tx.to_owned(), Vec::new());
        Ok(())
    }

    /// COMMIT; its receipt waits until every persistent SEND in it is stored.
    fn commit(&mut self, frame: &Frame) -> Result<u64, FrameError> {
        let tx = Self::transaction_name(frame, "COMMIT")?;
        let ops = self
            .transactions
            .remove(tx)
            .ok_or_else(|| unknown_transaction(tx))?;
        let mut durable_at = 0;
        for op in ops {
            match op {
                TxOp::Send(message) => durable_at = durable_at.max(self.publish(message)?),
                TxOp::Settle { id, outcome } => self.settle(id, outcome)?,
            }
        }
        Ok(durable_at)
    }

    fn abort(&mut self, frame: &Frame) -> Result<(), FrameError> {
        let tx = Self::transaction_name(frame, "ABORT")?;
        self.transactions
            .remove(tx)
            .map(|_| ())
            .ok_or_else(|| unknown_transaction(tx))
    }

    // ---- deliveries ----

    /// The connection's entry in the broker's registry, while registered: the
    /// management API's counters live there.
    pub fn registration(&self) -> Option<&ConnectionGuard> {
        self.registration.as_ref()
    }

    /// Encodes what queues put in the outbox as MESSAGE frames, and lets queues
    /// that were held back for lack of outbox room dispatch again.
    pub fn handle_outbox(&mut self) {
        if let Some(boxed) = self.pending_login.take() {
            let (pending, frame, login) = *boxed;
            match pending.take() {
                None => {
                    self.pending_login = Some(Box::new((pending, frame, login)));
                    return;
                }
                Some(result) => {
                    if let Err(e) = self.connect_as(&frame, &login, result) {
                        self.fail(e, None);
                    }
                }
            }
        }
        // A close request from the broker (an operator, a deleted user or
        // vhost): an ERROR frame with the reason, then the socket closes.
        if let Some(reason) = self
            .registration
            .as_ref()
            .and_then(ConnectionGuard::take_close_request)
        {
            tracing::info!(peer = %self.peer, user = %self.user, %reason, "closing STOMP connection on request");
            self.fail(FrameError::new("Connection forced", reason), None);
            return;
        }
        for item in self.outbox.drain() {
            match item {
                Outgoing::Deliver(d) => {
                    let live = self.state == State::Open
                        && self
                            .subscriptions
                            .get(d.consumer.tag())
                            .is_some_and(|s| Arc::ptr_eq(&s.consumer, &d.consumer));
                    if !live {
                        // Unsubscribed or closed while the delivery was in flight.
                        d.give_back();
                        continue;
                    }
                    let id = self.next_message_id;
                    self.next_message_id += 1;
                    if let Some(stats) = &self.stats {
                        let qt = d.queue.queue_type();
                        if d.message.redelivered() {
                            stats.add_for(qt, Stat::Redeliver, 1);
                        }
                        let kind = if d.consumer.no_ack() {
                            Stat::DeliverNoAck
                        } else {
                            Stat::Deliver
                        };
                        stats.add_for(qt, kind, 1);
                    }
                    self.write_message(id, d.consumer.tag(), &d.message);
                    if !d.consumer.no_ack() {
                        self.unacked.push_back(Unacked {
                            id,
                            subscription: d.consumer.tag().to_owned(),
                            consumer: d.consumer,
                            queue: d.queue,
                            message: d.message,
                        });
                    }
                }
                Outgoing::Cancelled(consumer) => {
                    let tag = consumer.tag().to_owned();
                    let live = self
                        .subscriptions
                        .get(&tag)
                        .is_some_and(|s| Arc::ptr_eq(&s.consumer, &consumer));
                    if live && self.state == State::Open {
                        // STOMP has no way to cancel one subscription from the
                        // server side: ERROR and close, so the client knows.
                        self.fail(
                            FrameError::new(
                                "subscription cancelled",
                                format!("the queue of subscription '{tag}' was deleted"),
                            )
                            .with_header("subscription", tag),
                            None,
                        );
                    }
                }
            }
        }
        if self.outbox.take_starved() {
            for s in self.subscriptions.values() {
                s.queue.dispatch();
            }
        }
        self.publish_state();
    }

    fn write_message(&mut self, id: u64, subscription: &str, queued: &QueuedMessage) {
        let msg = &queued.message;
        let id_text = id.to_string();
        let mut w = FrameWriter::start(&mut self.out, Command::Message, self.version);
        w.header("subscription", subscription);
        w.header("destination", &mapping::message_destination(msg));
        w.header("message-id", &id_text);
        if self.version == Version::V1_2 {
            w.header("ack", &id_text);
        }
        if queued.redelivered() {
            w.header("redelivered", "true");
        }
        mapping::write_property_headers(&mut w, &msg.properties);
        // Always: bodies may hold NULs, and clients then need not scan for the end.
        w.header("content-length", &msg.body.len().to_string());
        w.finish_body(&msg.body);
    }

    /// Gives back everything the connection holds.
    fn release_resources(&mut self) {
        self.transactions.clear();
        self.pending_receipts.clear();
        let vhost = self.vhost.clone();
        let entries: Vec<Unacked> = self.unacked.drain(..).collect();
        settle_entries(entries, Outcome::Requeue, vhost.as_deref());
        for (_, s) in self.subscriptions.drain() {
            s.consumer.deactivate();
            match vhost.as_deref() {
                Some(v) => v.cancel_consumer(&s.queue, s.consumer.id),
                None => {
                    s.queue.remove_consumer(s.consumer.id);
                }
            }
        }
        self.temp_queues.clear();
        if let Some(v) = vhost.as_deref() {
            for q in self.owned_queues.drain(..) {
                v.remove_queue(&q);
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

/// Picks the highest version both sides speak. No `accept-version` means 1.0.
fn negotiate(accept: Option<&str>) -> Result<Version, FrameError> {
    let Some(list) = accept else {
        return Ok(Version::V1_0);
    };
    list.split(',')
        .filter_map(Version::parse)
        .max()
        .ok_or_else(|| {
            let ours = Version::ALL.map(Version::as_str).join(",");
            FrameError::new(
                "unsupported version",
                format!("Supported protocol versions are {ours}; the client accepts {list}"),
            )
            .with_header("version", ours)
        })
}

/// `heart-beat:<cx>,<cy>`; absent means `0,0`.
fn parse_heartbeat(value: Option<&str>) -> Result<(u64, u64), FrameError> {
    let Some(v) = value else { return Ok((0, 0)) };
    let bad = || {
        FrameError::new(
            "invalid header",
            format!("heart-beat '{v}' is not two non-negative integers separated by a comma"),
        )
    };
    let (a, b) = v.split_once(',').ok_or_else(bad)?;
    let a = a.trim().parse().map_err(|_| bad())?;
    let b = b.trim().parse().map_err(|_| bad())?;
    Ok((a, b))
}

fn unknown_transaction(tx: &str) -> FrameError {
    FrameError::new(
        "transaction error",
        format!("transaction '{tx}' was not begun (or was already committed or aborted)"),
    )
}

fn unknown_message(id: &str) -> FrameError {
    FrameError::new(
        "unknown message",
        format!("no unacknowledged message with id '{id}' on this connection"),
    )
}

/// Settles entries, one queue lock per queue for the batch, and lets the queues
/// dispatch into the credit this frees.
fn settle_entries(entries: Vec<Unacked>, outcome: Outcome, vhost: Option<&VHost>) {
    let mut by_queue: Vec<(Arc<Queue>, Vec<QueuedMessage>)> = Vec::new();
    for e in entries {
        e.consumer.release(1);
        match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &e.queue)) {
            Some((_, list)) => list.push(e.message),
            None => by_queue.push((e.queue, vec![e.message])),
        }
    }
    for (queue, messages) in by_queue {
        match (outcome, vhost) {
            (Outcome::Requeue, _) => queue.requeue(messages),
            (Outcome::Reject, Some(v)) => {
                v.dead_letter(&queue, &messages, DeathReason::Rejected, unix_now());
                queue.dispatch();
            }
            (Outcome::Ack | Outcome::Reject, _) => {
                queue.settle(&messages);
                queue.dispatch();
            }
        }
    }
}

/// Seconds since the Unix epoch, for `x-death` times.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    //! Whole exchanges in memory: bytes in, bytes out, no socket and no clock.

    use super::*;
    use crate::codec::Limits;
    use switchyard_core::auth::{hash_password, Auth};

    fn session() -> Session {
        let mut auth = Auth::new();
        auth.add_user(
            "guest",
            &hash_password("guest", [1, 2, 3, 4]),
            vec![],
            false,
        )
        .unwrap();
        auth.set_permissions("guest", "/", ".*", ".*", ".*")
            .unwrap();
        let broker = Broker::new(auth, &["/".to_owned()], 0);
        Session::new(
            broker,
            Arc::new(StompSettings::default()),
            "127.0.0.1:1".parse().unwrap(),
        )
    }

    /// Feeds `bytes` and returns every frame the session wrote since the last call.
    fn exchange(s: &mut Session, bytes: &[u8]) -> Vec<Frame> {
        let mut input = BytesMut::from(bytes);
        s.handle_input(&mut input);
        s.handle_outbox();
        let mut d = Decoder::new(Limits::default());
        d.set_version(s.version());
        let mut out = std::mem::take(s.output());
        let mut frames = Vec::new();
        while let Some(f) = d.decode(&mut out).unwrap() {
            frames.push(f);
        }
        frames
    }

    #[test]
    fn connect_subscribe_send_receive_ack_in_memory() {
        let mut s = session();
        let f = exchange(
            &mut s,
            b"CONNECT\naccept-version:1.1,1.2\nhost:/\nheart-beat:5000,0\n\n\0",
        );
        assert_eq!(f[0].command, Command::Connected);
        assert_eq!(f[0].get("version"), Some("1.2"));
        assert_eq!(f[0].get("heart-beat"), Some("0,5000"));
        assert_eq!(s.heartbeat_in(), Duration::from_secs(5));
        assert!(s.heartbeat_out().is_zero());
        let f = exchange(
            &mut s,
            b"SUBSCRIBE\nid:0\ndestination:/queue/q\nack:client\nreceipt:1\n\n\0\
              SEND\ndestination:/queue/q\nx-k:v\\cw\n\nhello\0",
        );
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].get("receipt-id"), Some("1"));
        let m = &f[1];
        assert_eq!(m.command, Command::Message);
        assert_eq!(m.get("x-k"), Some("v:w"));
        assert_eq!(&m.body[..], b"hello");
        let ack = format!("ACK\nid:{}\nreceipt:2\n\n\0", m.get("ack").unwrap());
        let f = exchange(&mut s, ack.as_bytes());
        assert_eq!(f[0].get("receipt-id"), Some("2"));
        assert!(!s.is_closed());
    }

    #[test]
    fn an_error_closes_the_session_and_names_the_receipt() {
        let mut s = session();
        exchange(&mut s, b"CONNECT\naccept-version:1.2\nhost:/\n\n\0");
        let f = exchange(&mut s, b"SEND\nreceipt:77\n\nx\0");
        assert_eq!(f[0].command, Command::Error);
        assert_eq!(f[0].get("message"), Some("missing header"));
        assert_eq!(f[0].get("receipt-id"), Some("77"));
        assert!(s.is_closed());
        // Nothing more is read once closed.
        assert!(exchange(&mut s, b"SEND\ndestination:/queue/q\n\nx\0").is_empty());
    }
}

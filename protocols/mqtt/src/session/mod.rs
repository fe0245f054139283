//! The MQTT connection state machine: packets in, core calls and packets out.
//!
//! No sockets and no clock (quinn-proto's rule): the connection task hands in the
//! bytes it read ([`Session::handle_input`]), the deliveries its outbox collected
//! ([`Session::handle_outbox`]) and the time ([`Now`]); the session appends the
//! packets to send to [`Session::output`] and says through
//! [`Session::is_closed`] when the socket should be closed. TCP and WebSocket
//! feed the same session.
//!
//! What outlives the connection (subscriptions, in-flight QoS 1/2 messages, QoS 2
//! packet ids) is in the session's [`SessionData`] in the broker-wide
//! [`MqttState`]; every packet handler locks it briefly and first checks that
//! this connection is still the attached one (a takeover may have happened).
//!
//! Errors: a bad packet or a protocol violation closes this connection only:
//! MQTT 5 clients get a DISCONNECT with the reason code first (or a CONNACK
//! with one, before the session is up), 3.1.1 clients a plain close, as the
//! specs say.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use switchyard_driver::Output;

use bytes::BytesMut;
use switchyard_core::auth::{Access, Resource, TopicRules};
use switchyard_core::authn::{LoginRequest, LoginStart, PendingLogin};
use switchyard_core::connections::{protocol, ConnectionGuard, ConnectionInfo};
use switchyard_core::consumer::Consumer;
use switchyard_core::consumer::{ConsumerOptions, Credit, Delivery, Outbox, Outgoing};
use switchyard_core::queue::QueueOptions;
use switchyard_core::stats::{
    ChannelState, ConnectionGuard as CountedConnection, Protocol, SourceGuard, Stat,
};
use switchyard_core::vhost::{QueueDeclare, StreamWait, VHost, WaitState};
use switchyard_core::{Broker, FieldTable};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::reason::{self, v3};
use crate::codec::{
    self, Ack, CodecError, ConnAck, Connect, Decoder, Disconnect, LastWill, Packet, Properties,
    Publish, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe, Version,
};
use crate::mapping::{self, MqttMessage};
use crate::state::{Inflight, MqttState, SessionKey, SessionRef, Stage, Subscription};
use crate::sys::{self, SysStats};
use crate::MqttSettings;

/// Deliveries that may wait in a connection's outbox before queues hold back.
pub const OUTBOX_CAPACITY: usize = 1024;

/// A CONNECT waiting for its login's answer, with what it already decided.
#[derive(Debug)]
struct PendingConnect {
    login: PendingLogin,
    connect: Box<Connect>,
    vhost_name: String,
    assigned: Option<String>,
}

/// The time, as the connection task reads it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    /// Milliseconds since the Unix epoch (message expiry bookkeeping).
    pub unix_ms: u64,
}

impl Now {
    pub fn read() -> Self {
        Now {
            instant: Instant::now(),
            unix_ms: crate::state::unix_ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for CONNECT.
    Connect,
    Connected,
    /// The socket should be closed once the output is written.
    Closed,
}

/// Why the connection is being closed by us: the MQTT 5 reason code and a
/// text for the log.
#[derive(Debug)]
struct Close {
    reason: u8,
    text: String,
}

impl Close {
    fn new(reason: u8, text: impl Into<String>) -> Self {
        Close {
            reason,
            text: text.into(),
        }
    }
    fn protocol(text: impl Into<String>) -> Self {
        Close::new(reason::PROTOCOL_ERROR, text)
    }
}

/// What the client told us in CONNECT about itself.
#[derive(Debug, Clone, Copy)]
struct ClientLimits {
    /// Largest packet the client accepts.
    max_packet_size: usize,
    /// Topic aliases the client accepts from us.
    topic_alias_max: u16,
    /// Whether reason strings / user properties may be sent on errors.
    problem_info: bool,
}

/// Topic aliases (MQTT 5) of one connection.
#[derive(Default)]
struct TopicAliases {
    /// Set up by the client (alias -> topic).
    incoming: HashMap<u16, String>,
    /// Set up by us towards the client (topic -> alias).
    outgoing: HashMap<String, u16>,
}

/// One MQTT connection's protocol state.
pub struct Session {
    broker: Arc<Broker>,
    state: Arc<MqttState>,
    settings: Arc<MqttSettings>,
    peer: SocketAddr,
    /// Broker-wide connection id.
    id: u64,
    phase: Phase,
    version: Version,
    decoder: Decoder,
    out: Output,
    outbox: Arc<Outbox>,
    /// Receive-maximum credit shared by this connection's QoS 1/2 consumers.
    credit: Arc<Credit>,
    /// Cancelled when another connection takes the session over.
    kick: CancellationToken,
    user: String,
    vhost: Option<Arc<VHost>>,
    lossless: bool,
    session: Option<SessionRef>,
    client_id: String,
    /// Boxed: rarely set, 400 bytes inline in every connection.
    will: Option<Box<LastWill>>,
    keep_alive: u16,
    /// When the access token the client logged in with expires (`jwt`
    /// backend): the connection is closed then (MQTT has no re-authentication
    /// here), with DISCONNECT 0xA0 for v5, as RabbitMQ does.
    token_expires: Option<Instant>,
    client: ClientLimits,
    /// Topic aliases, both ways; boxed at the first one (MQTT 5 only, and
    /// rare): two empty maps inline would cost every connection 96 bytes.
    aliases: Option<Box<TopicAliases>>,
    may_write: Option<bool>,
    may_read: Option<bool>,
    /// The user's topic permissions in the vhost with this client id expanded
    /// (None: there are none, and a PUBLISH costs nothing extra).
    topic_rules: Option<Arc<TopicRules>>,
    /// A CONNECT whose login an external authentication backend is deciding;
    /// no packet is read meanwhile.
    pending_login: Option<PendingConnect>,
    /// The broker's permission generation `may_write`/`may_read` were cached
    /// at: a runtime change drops them (from the next read batch on).
    perm_generation: u64,
    /// In the broker's connection registry while connected.
    registration: Option<ConnectionGuard>,
    may_read_sys: Option<bool>,
    /// Counted in `$SYS/broker/clients/connected`.
    counted_connected: bool,
    has_published: bool,
    close_reason: Option<String>,
    finished: bool,
    /// The store's synced position (None: no store, nothing to wait for).
    synced: Option<watch::Receiver<u64>>,
    /// PUBACKs / PUBRECs not yet written, in packet order, each with the store
    /// position that must be on disk first (DESIGN.md: an MQTT PUBACK for a
    /// persistent message goes only after the fsync that covers it; 0 = none,
    /// but it still waits for those before it so acks keep their order), and
    /// the streams that must have committed it (a stream's log syncs on its
    /// own; its commits wake the store's synced position too).
    pending_acks: VecDeque<(u64, Vec<StreamWait>, Packet)>,
    /// PUBACKs among `pending_acks`: QoS 1 PUBLISHes the client sent that we
    /// have not acknowledged yet, counted against our Receive Maximum.
    unacked_qos1: usize,
    /// Counts the connection in the node's opened/closed totals.
    _counted: CountedConnection,
    /// The session's message statistics (stats.rs), from CONNECT on; written by
    /// this connection's task only.
    stats: Option<SourceGuard>,
}

impl Session {
    pub fn new(
        broker: Arc<Broker>,
        state: Arc<MqttState>,
        settings: Arc<MqttSettings>,
        peer: SocketAddr,
    ) -> Self {
        let id = broker.next_id();
        let decoder = Decoder::new(settings.max_packet_size_unauthenticated);
        let synced = broker.synced();
        let counted = broker.stats.open_connection();
        Session {
            _counted: counted,
            stats: None,
            broker,
            state,
            peer,
            id,
            phase: Phase::Connect,
            version: Version::V311,
            decoder,
            out: Output::default(),
            outbox: Outbox::new(OUTBOX_CAPACITY),
            credit: Arc::new(Credit::new(u32::from(settings.max_inflight))),
            kick: CancellationToken::new(),
            user: String::new(),
            vhost: None,
            lossless: false,
            session: None,
            client_id: String::new(),
            will: None,
            keep_alive: 0,
            token_expires: None,
            client: ClientLimits {
                max_packet_size: codec::MAX_REMAINING_LENGTH + 5,
                topic_alias_max: 0,
                problem_info: true,
            },
            aliases: None,
            may_write: None,
            topic_rules: None,
            pending_login: None,
            may_read: None,
            perm_generation: 0,
            registration: None,
            may_read_sys: None,
            counted_connected: false,
            has_published: false,
            close_reason: None,
            finished: false,
            synced,
            pending_acks: VecDeque::new(),
            unacked_qos1: 0,
            settings,
        }
    }

    /// A receiver of the store's synced position, for the connection task.
    pub fn synced(&self) -> Option<watch::Receiver<u64>> {
        self.synced.clone()
    }

    /// Some PUBACK/PUBREC waits for the store: the connection task should call
    /// [`Session::flush_acks`] when the synced position moves.
    pub fn awaits_sync(&self) -> bool {
        !self.pending_acks.is_empty()
    }

    /// Writes the acks whose messages the store has synced, in order.
    pub fn flush_acks(&mut self) {
        if self.phase != Phase::Connected {
            self.pending_acks.clear();
            self.unacked_qos1 = 0;
            return;
        }
        let synced = self.synced.as_ref().map_or(u64::MAX, |rx| *rx.borrow());
        while let Some((at, streams, _)) = self.pending_acks.front() {
            let state = StreamWait::state_of_all(streams);
            if *at > synced || state == WaitState::Pending {
                break;
            }
            if let Some((_, _, mut p)) = self.pending_acks.pop_front() {
                if state == WaitState::Failed && !self.publish_failed(&mut p) {
                    return;
                }
                match &p {
                    Packet::PubAck(_) => {
                        self.unacked_qos1 = self.unacked_qos1.saturating_sub(1);
                    }
                    Packet::PubRec(a) if a.reason < 0x80 => self.confirm_incoming(a.packet_id),
                    _ => {}
                }
                self.send(&p);
            }
        }
        self.publish_state();
    }

    /// A quorum queue the PUBLISH reached did not commit it in time (`[cluster]
    /// quorum_commit_timeout_ms`): never a success. MQTT 5 gets the PUBACK or
    /// PUBREC with reason 0x83 (implementation specific error), as RabbitMQ
    /// sends for a publish a queue rejected. MQTT 3.1.1 has no negative ack,
    /// and acking would claim it is safe; RabbitMQ leaves it unacknowledged,
    /// which leaves the client waiting on it, so this closes the connection:
    /// the client sees the failure and re-sends what was not acknowledged
    /// when it reconnects. Returns false when the connection was closed.
    fn publish_failed(&mut self, p: &mut Packet) -> bool {
        const TEXT: &str = "a quorum queue did not commit the message in time (no majority)";
        if let (Packet::PubRec(a), Some(session)) = (&*p, &self.session) {
            // Not routed for good: a re-sent PUBLISH with this id is routed
            // again rather than answered as a duplicate.
            session.lock().incoming_qos2.remove(&a.packet_id);
        }
        if !self.v5() {
            self.close(Close::new(reason::IMPLEMENTATION_SPECIFIC_ERROR, TEXT));
            self.pending_acks.clear();
            self.unacked_qos1 = 0;
            return false;
        }
        let problem_info = self.client.problem_info;
        if let Packet::PubAck(a) | Packet::PubRec(a) = p {
            a.reason = reason::IMPLEMENTATION_SPECIFIC_ERROR;
            if problem_info {
                a.properties.reason_string = Some(TEXT.into());
            }
        }
        true
    }

    /// A QoS 2 PUBREC is about to go out and its message is on disk: the
    /// packet id goes into the session's record first (a persistent session's
    /// record is committed here, one store commit per QoS 2 PUBLISH), so that
    /// the PUBLISH re-sent after a restart is recognised and not routed again.
    /// Written only now, not at PUBLISH, so a record never names a message
    /// that a crash could still lose.
    fn confirm_incoming(&mut self, id: u16) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let mut data = session.lock();
        if data.owned_by(self.id) && data.confirm_incoming(id) {
            self.state.persist_session(&mut data);
        }
    }

    /// Sends an ack once the store position `durable_at` is synced and every
    /// stream in `streams` committed the message.
    fn send_after_sync(&mut self, durable_at: u64, streams: Vec<StreamWait>, p: Packet) {
        if durable_at == 0 && streams.is_empty() && self.pending_acks.is_empty() {
            if let Packet::PubRec(a) = &p {
                if a.reason < 0x80 {
                    self.confirm_incoming(a.packet_id);
                }
            }
            self.send(&p);
        } else {
            if let Packet::PubAck(_) = p {
                self.unacked_qos1 += 1;
            }
            self.pending_acks.push_back((durable_at, streams, p));
        }
    }

    /// Packets produced so far, to be written to the socket.
    pub fn output(&mut self) -> &mut Output {
        // What the caller takes now is what goes out on the wire.
        if let Some(stats) = &self.stats {
            stats.add(Stat::SendOct, self.out.pending() as u64);
        }
        &mut self.out
    }

    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// Cancelled when another connection takes this session over.
    pub fn kicked(&self) -> CancellationToken {
        self.kick.clone()
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    pub fn is_connected(&self) -> bool {
        self.phase == Phase::Connected
    }

    /// The keep-alive in force (None: off or not connected yet).
    pub fn keep_alive(&self) -> Option<Duration> {
        (self.phase == Phase::Connected && self.keep_alive > 0)
            .then(|| Duration::from_secs(u64::from(self.keep_alive)))
    }

    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.as_deref()
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Whether the memory alarm should stop reading from this connection: only
    /// from publishers, so subscribers can still acknowledge and drain queues.
    pub fn blocks_on_alarm(&self) -> bool {
        self.has_published
    }

    fn v5(&self) -> bool {
        self.version.is_v5()
    }

    // ------------------------------------------------------------ output

    /// Queues a packet (our own control packets are never near any size limit
    /// that matters, except reason strings: see `send_limited`).
    fn send(&mut self, p: &Packet) {
        SysStats::add(&self.state.stats.packets_sent, 1);
        if codec::encode(p, self.version, self.client.max_packet_size, &mut self.out).is_err() {
            // Only properties can make a control packet large: send it bare.
            let bare = strip_properties(p);
            codec::encode_unlimited(&bare, self.version, &mut self.out);
        }
    }

    /// Closes the connection: MQTT 5 clients get a DISCONNECT with the reason
    /// first (when connected), 3.1.1 clients a plain close.
    fn close(&mut self, c: Close) {
        if self.phase == Phase::Closed {
            return;
        }
        tracing::debug!(peer = %self.peer, client_id = %self.client_id, reason = c.reason, text = %c.text, "closing MQTT connection");
        if self.phase == Phase::Connected && self.v5() {
            let mut properties = Properties::default();
            if self.client.problem_info {
                properties.reason_string = Some(c.text.clone());
            }
            self.send(&Packet::Disconnect(Disconnect {
                reason: c.reason,
                properties,
            }));
        }
        self.close_reason = Some(c.text);
        self.phase = Phase::Closed;
        self.registration = None;
    }

    /// Refuses a CONNECT with a CONNACK carrying the code, then closes.
    fn refuse(&mut self, v5_code: u8, v3_code: u8, text: impl Into<String>) {
        let text = text.into();
        let code = if self.v5() { v5_code } else { v3_code };
        let mut properties = Properties::default();
        if self.v5() && self.client.problem_info {
            properties.reason_string = Some(text.clone());
        }
        self.send(&Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties,
        }));
        tracing::debug!(peer = %self.peer, code, %text, "MQTT CONNECT refused");
        self.close_reason = Some(text);
        self.phase = Phase::Closed;
    }

    // ------------------------------------------------------------- input

    fn refresh_topic_rules(&mut self) {
        self.topic_rules = self.vhost.as_ref().and_then(|v| {
            self.broker
                .auth
                .topic_rules(&self.user, &v.name, Some(&self.client_id))
        });
    }

    /// Topic permission on the routing key of `topic` (a topic name for write,
    /// a filter for read) on the MQTT exchange; the refusal text is RabbitMQ's.
    fn topic_refusal(&self, topic: &str, access: Access) -> Option<String> {
        let (rules, vhost) = self.topic_rules.as_ref().zip(self.vhost.as_ref())?;
        let refusal = |key: &str| {
            rules
                .authorize(vhost, &self.settings.exchange, access, key)
                .err()
                .map(|e| e.text)
        };
        match access {
            // A publish's key is built inline (no allocation per message).
            Access::Write => refusal(&mapping::topic_to_key(topic, self.lossless)),
            _ => refusal(&mapping::filter_to_key(topic, self.lossless)),
        }
    }

    /// Decodes and handles every complete packet in `input`.
    pub fn handle_input(&mut self, input: &mut BytesMut, now: Now) {
        let generation = self.broker.auth.generation();
        if generation != self.perm_generation {
            self.perm_generation = generation;
            self.may_write = None;
            self.may_read = None;
            self.may_read_sys = None;
            self.refresh_topic_rules();
        }
        let before = input.len();
        self.handle_packets(input, now);
        if let Some(stats) = &self.stats {
            stats.add(Stat::RecvOct, before.saturating_sub(input.len()) as u64);
        }
        self.publish_state();
    }

    /// Copies the session's window and in-flight counts to its statistics,
    /// where `/api/channels` shows them as the connection's one channel:
    /// prefetch = the in-flight window (Receive Maximum), unacknowledged = QoS
    /// 1/2 deliveries awaiting PUBACK/PUBREC, unconfirmed = the client's QoS
    /// 1/2 PUBLISHes whose PUBACK/PUBREC waits for the store.
    fn publish_state(&self) {
        if let Some(stats) = &self.stats {
            stats.set_state(&ChannelState {
                prefetch_count: u64::from(self.credit.limit()),
                confirm: true,
                messages_unacknowledged: u64::from(self.credit.used()),
                messages_unconfirmed: self.pending_acks.len() as u64,
                ..ChannelState::default()
            });
        }
    }

    fn handle_packets(&mut self, input: &mut BytesMut, now: Now) {
        while self.phase != Phase::Closed && self.pending_login.is_none() {
            match self.decoder.decode(input) {
                Ok(Some(packet)) => {
                    SysStats::add(&self.state.stats.packets_received, 1);
                    if let Err(c) = self.handle_packet(packet, now) {
                        self.close(c);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.codec_error(&e);
                    break;
                }
            }
        }
        // Acks whose messages the store synced while this batch was handled.
        if !self.pending_acks.is_empty() {
            self.flush_acks();
        }
    }

    fn codec_error(&mut self, e: &CodecError) {
        if self.phase == Phase::Connect {
            if let CodecError::UnsupportedProtocol { .. } = e {
                // The client's version is not one we speak: answer in 3.1.1's
                // format (return code 1), which every MQTT client can read.
                self.version = Version::V311;
                self.refuse(
                    reason::UNSUPPORTED_PROTOCOL_VERSION,
                    v3::UNACCEPTABLE_PROTOCOL_VERSION,
                    e.to_string(),
                );
                return;
            }
            self.close_reason = Some(e.to_string());
            self.phase = Phase::Closed;
            return;
        }
        self.close(Close::new(e.reason_code(), e.to_string()));
    }

    fn handle_packet(&mut self, packet: Packet, now: Now) -> Result<(), Close> {
        if self.phase == Phase::Connect {
            return match packet {
                Packet::Connect(c) => {
                    self.handle_connect(*c, now);
                    Ok(())
                }
                other => {
                    self.close_reason = Some(format!("{} before CONNECT", other.name()));
                    self.phase = Phase::Closed;
                    Ok(())
                }
            };
        }
        match packet {
            Packet::Connect(_) => Err(Close::protocol("second CONNECT")),
            Packet::Publish(p) => self.handle_publish(p, now),
            Packet::PubAck(a) => {
                self.handle_puback(a);
                Ok(())
            }
            Packet::PubRec(a) => {
                self.handle_pubrec(a);
                Ok(())
            }
            Packet::PubRel(a) => {
                self.handle_pubrel(a);
                Ok(())
            }
            Packet::PubComp(a) => {
                self.handle_pubcomp(a);
                Ok(())
            }
            Packet::Subscribe(s) => self.handle_subscribe(s, now),
            Packet::Unsubscribe(u) => {
                self.handle_unsubscribe(u);
                Ok(())
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.handle_disconnect(d),
            Packet::Auth(_) => Err(Close::protocol(
                "AUTH without an authentication method in CONNECT",
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => Err(
                Close::protocol(format!("{} may only be sent by the server", packet.name())),
            ),
        }
    }

    // ----------------------------------------------------------- CONNECT

    fn handle_connect(&mut self, c: Connect, now: Now) {
        self.version = c.version;
        let props = &c.properties;
        self.client.problem_info = props.request_problem_information != Some(0);
        if let Some(max) = props.maximum_packet_size {
            self.client.max_packet_size = usize::try_from(max).unwrap_or(usize::MAX);
        }
        self.client.topic_alias_max = props.topic_alias_maximum.unwrap_or(0);
        if props.authentication_method.is_some() {
            // No enhanced authentication method is configured (spec 4.12).
            self.refuse(
                reason::BAD_AUTHENTICATION_METHOD,
                v3::NOT_AUTHORIZED,
                "no enhanced authentication method is configured",
            );
            return;
        }

        // Client identifier.
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            if !self.v5() && (!c.clean_start || self.version == Version::V31) {
                self.refuse(
                    reason::CLIENT_IDENTIFIER_NOT_VALID,
                    v3::IDENTIFIER_REJECTED,
                    "empty client identifier needs a clean session",
                );
                return;
            }
            let id = VHost::generate_name("switchyard-");
            if self.v5() {
                assigned = Some(id.clone());
            }
            id
        } else {
            c.client_id.clone()
        };
        self.client_id = client_id.clone();

        // Login: `vhost:user` picks the vhost (RabbitMQ's convention).
        let (vhost_name, user) = match &c.username {
            Some(u) => match u.split_once(':') {
                Some((vh, name)) if self.broker.has_vhost(vh) => (vh.to_owned(), name.to_owned()),
                _ => (self.settings.default_vhost.clone(), u.clone()),
            },
            None => (self.settings.default_vhost.clone(), String::new()),
        };
        let peer_ip = Some(self.peer.ip());
        // Certificate login (RabbitMQ's rabbit_mqtt_processor creds/3): a user
        // name and password in CONNECT win; without either, a verified client
        // certificate on a TLS listener names the user, which must exist.
        let cert_login = switchyard_core::connections::accepted()
            .and_then(|a| a.cert_login)
            .filter(|_| c.username.is_none() && c.password.is_none());
        let user = if let Some(name) = cert_login {
            match self.broker.auth.login_external(&name, peer_ip) {
                Ok(u) => u.name.clone(),
                Err(e) => {
                    self.refuse(
                        reason::BAD_USER_NAME_OR_PASSWORD,
                        v3::BAD_USER_NAME_OR_PASSWORD,
                        format!("certificate login: {e}"),
                    );
                    return;
                }
            }
        } else if c.username.is_none() {
            if !self.settings.allow_anonymous {
                self.refuse(
                    reason::BAD_USER_NAME_OR_PASSWORD,
                    v3::BAD_USER_NAME_OR_PASSWORD,
                    "anonymous connections are not allowed",
                );
                return;
            }
            let name = self.settings.anonymous_user.clone();
            match self.broker.auth.user(&name) {
                Some(u) if !u.loopback_only || self.peer.ip().is_loopback() => name,
                _ => {
                    self.refuse(
                        reason::NOT_AUTHORIZED,
                        v3::NOT_AUTHORIZED,
                        format!("anonymous user '{name}' may not connect from here"),
                    );
                    return;
                }
            }
        } else {
            let request = LoginRequest {
                username: user,
                password: c.password.clone().unwrap_or_default().to_vec(),
                peer: peer_ip,
                vhost: Some(vhost_name.clone()),
                client_id: Some(client_id),
            };
            let outbox = self.outbox.clone();
            match self
                .broker
                .auth
                .clone()
                .begin_login(request, move || outbox.wake())
            {
                LoginStart::Done(Ok(u)) => u.name,
                LoginStart::Done(Err(e)) => {
                    self.refuse(
                        reason::BAD_USER_NAME_OR_PASSWORD,
                        v3::BAD_USER_NAME_OR_PASSWORD,
                        e.to_string(),
                    );
                    return;
                }
                LoginStart::Pending(login) => {
                    self.pending_login = Some(PendingConnect {
                        login,
                        connect: Box::new(c),
                        vhost_name,
                        assigned,
                    });
                    return;
                }
            }
        };
        self.connect_as(c, now, vhost_name, user, assigned);
    }

    /// Whether a CONNECT waits for an external authentication backend.
    pub fn login_pending(&self) -> bool {
        self.pending_login.is_some()
    }

    /// The rest of CONNECT once `user` has logged in.
    fn connect_as(
        &mut self,
        c: Connect,
        now: Now,
        vhost_name: String,
        user: String,
        assigned: Option<String>,
    ) {
        let props = &c.properties;
        let client_id = self.client_id.clone();
        let vhost = match self
            .broker
            .auth
            .check_vhost(&user, &vhost_name)
            .and_then(|()| self.broker.vhost(&vhost_name))
        {
            Ok(v) => v,
            Err(e) => {
                self.refuse(reason::NOT_AUTHORIZED, v3::NOT_AUTHORIZED, e.to_string());
                return;
            }
        };
        if vhost.exchange(&self.settings.exchange).is_err() {
            self.refuse(
                reason::SERVER_UNAVAILABLE,
                v3::SERVER_UNAVAILABLE,
                format!(
                    "the MQTT exchange '{}' does not exist in vhost '{}'",
                    self.settings.exchange, vhost_name
                ),
            );
            return;
        }
        self.token_expires =
            self.broker.auth.token_expiry(&user).map(|at_ms| {
                now.instant + Duration::from_millis(at_ms.saturating_sub(now.unix_ms))
            });
        self.user = user;
        self.lossless = self.settings.lossless_vhosts.contains(&vhost_name);
        self.vhost = Some(vhost.clone());
        self.refresh_topic_rules();
        let protocol = match self.version {
            Version::V31 => Protocol::Mqtt310,
            Version::V311 => Protocol::Mqtt311,
            Version::V5 => Protocol::Mqtt50,
        };
        self.stats = Some(
            self.broker
                .stats
                .open_source(protocol, self.id, 0, &vhost.name, false),
        );

        if let Some(w) = &c.will {
            if !mapping::valid_topic_name(&w.topic) {
                self.refuse(
                    reason::TOPIC_NAME_INVALID,
                    v3::IDENTIFIER_REJECTED,
                    "invalid will topic",
                );
                return;
            }
            if !self.may_write() || sys::is_sys(&w.topic) {
                self.refuse(
                    reason::NOT_AUTHORIZED,
                    v3::NOT_AUTHORIZED,
                    "no write permission for the will message",
                );
                return;
            }
            // Topic permissions apply to the will as to any PUBLISH (RabbitMQ
            // checks it at CONNECT).
            if let Some(text) = self.topic_refusal(&w.topic, Access::Write) {
                self.refuse(reason::NOT_AUTHORIZED, v3::NOT_AUTHORIZED, text);
                return;
            }
        }
        self.will = c.will.clone().map(Box::new);

        // In the registry (listed, counted for the vhost's and user's
        // `max-connections`, closable by the broker) before the CONNACK.
        let mut info = ConnectionInfo::new(
            match self.version {
                Version::V31 => protocol::MQTT_31,
                Version::V311 => protocol::MQTT_311,
                Version::V5 => protocol::MQTT_50,
            },
            &self.user,
            &vhost_name,
            self.peer,
            now.unix_ms,
        );
        info.timeout = c.keep_alive;
        // The same rule as the login's: no credentials in CONNECT and a
        // certificate that names a user.
        if c.username.is_none()
            && c.password.is_none()
            && switchyard_core::connections::accepted().is_some_and(|a| a.cert_login.is_some())
        {
            info.auth_mechanism = "EXTERNAL";
        }
        // Exactly one entry (a `push` would reserve four: 190 bytes more per
        // connection for as long as it lives).
        info.client_properties = switchyard_core::field::FieldTable(vec![(
            "client_id".into(),
            switchyard_core::FieldValue::string(client_id.as_str()),
        )]);
        match self
            .broker
            .register_connection(self.id, info, self.outbox.clone())
        {
            Ok(guard) => self.registration = Some(guard),
            Err(e) => {
                // The per-address rate limit has its own MQTT 5 code.
                let code = if e.text.contains(switchyard_core::ratelimit::REFUSAL) {
                    reason::CONNECTION_RATE_EXCEEDED
                } else {
                    // RabbitMQ: quota exceeded (v5), not authorised (v3).
                    reason::QUOTA_EXCEEDED
                };
                self.refuse(code, v3::NOT_AUTHORIZED, e.text);
                return;
            }
        }

        // Session expiry: v5 from the property, v3 from clean session; capped.
        let requested = if self.v5() {
            props.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry = requested.min(self.settings.max_session_expiry_secs);

        let key = SessionKey {
            vhost: vhost_name,
            client_id,
        };
        let (session, present) =
            self.state
                .attach(&vhost, key, self.id, self.kick.clone(), c.clean_start);
        {
            let mut data = session.lock();
            data.expiry_secs = expiry;
            data.protocol_level = self.version.level();
            // Before the CONNACK: session-present after a restart needs the record.
            self.state.persist_session(&mut data);
        }
        self.session = Some(session);

        // Keep-alive: the server may lower it (MQTT 5 Server Keep Alive).
        let max_ka = self.settings.max_keep_alive_secs;
        let mut server_keep_alive = None;
        self.keep_alive = c.keep_alive;
        if self.v5() && max_ka > 0 && (c.keep_alive == 0 || c.keep_alive > max_ka) {
            self.keep_alive = max_ka;
            server_keep_alive = Some(max_ka);
        }

        let receive_max = props.receive_maximum.unwrap_or(u16::MAX);
        self.credit
            .set_limit(u32::from(receive_max.min(self.settings.max_inflight)));
        self.decoder
            .set_max_packet_size(self.settings.max_packet_size);

        let mut ack = Properties::default();
        if self.v5() {
            if expiry != requested {
                ack.session_expiry_interval = Some(expiry);
            }
            ack.receive_maximum = Some(self.settings.receive_maximum);
            ack.maximum_packet_size =
                Some(u32::try_from(self.settings.max_packet_size).unwrap_or(u32::MAX));
            ack.topic_alias_maximum = Some(self.settings.topic_alias_maximum);
            ack.assigned_client_identifier = assigned;
            ack.server_keep_alive = server_keep_alive;
            ack.retain_available = Some(1);
            ack.wildcard_subscription_available = Some(1);
            ack.subscription_identifier_available = Some(1);
            ack.shared_subscription_available = Some(1);
            if props.request_response_information == Some(1) {
                // A topic prefix the client may use for responses to itself.
                ack.response_information = Some(format!("responses/{}", self.client_id));
            }
        }
        self.send(&Packet::ConnAck(ConnAck {
            session_present: present,
            code: reason::SUCCESS,
            properties: ack,
        }));
        self.phase = Phase::Connected;
        self.state.stats.connected.fetch_add(1, Ordering::Relaxed);
        self.counted_connected = true;
        tracing::debug!(peer = %self.peer, client_id = %self.client_id, user = %self.user, version = ?self.version, present, "MQTT client connected");

        if present {
            self.resume(now);
        }
    }

    /// After a resumed session's CONNACK: re-sends what was in flight (DUP set,
    /// same packet ids; PUBREL for QoS 2 past PUBREC) and consumes its queues
    /// again.
    fn resume(&mut self, _now: Now) {
        let Some((session, vhost)) = self.session.clone().zip(self.vhost.clone()) else {
            return;
        };
        let mut data = session.lock();
        let resend: Vec<(u16, Stage, Publish)> = data
            .inflight
            .iter()
            .map(|(id, f)| (*id, f.stage, f.publish.clone()))
            .collect();
        for f in data.inflight.values_mut() {
            f.charged = self.credit.try_acquire();
        }
        for (id, stage, mut p) in resend {
            if stage == Stage::PubComp {
                self.send(&Packet::PubRel(Ack::new(id, reason::SUCCESS)));
            } else {
                p.dup = true;
                self.send_publish(p);
            }
        }
        let queues: Vec<String> = {
            let mut q: Vec<String> = data
                .subscriptions
                .values()
                .map(|s| s.queue.clone())
                .collect();
            q.sort();
            q.dedup();
            q
        };
        for name in queues {
            let qos0 = name.starts_with("mqtt-subscription-") && name.ends_with("qos0");
            if let Err(e) = self.consume(&mut data, &vhost, &name, qos0) {
                tracing::warn!(peer = %self.peer, queue = %name, error = %e, "cannot resume consuming");
            }
        }
    }

    // ----------------------------------------------------------- PUBLISH

    fn may_write(&mut self) -> bool {
        if let Some(ok) = self.may_write {
            return ok;
        }
        let ok = self.vhost.as_ref().is_some_and(|v| {
            self.broker
                .auth
                .check(
                    &self.user,
                    &v.name,
                    Access::Write,
                    Resource::Exchange,
                    &self.settings.exchange,
                )
                .is_ok()
        });
        self.may_write = Some(ok);
        ok
    }

    fn may_read(&mut self) -> bool {
        if let Some(ok) = self.may_read {
            return ok;
        }
        let ok = self.vhost.as_ref().is_some_and(|v| {
            self.broker
                .auth
                .check(
                    &self.user,
                    &v.name,
                    Access::Read,
                    Resource::Exchange,
                    &self.settings.exchange,
                )
                .is_ok()
        });
        self.may_read = Some(ok);
        ok
    }

    /// Read permission on `$SYS` (see [`sys::SYS_RESOURCE`]).
    fn may_read_sys(&mut self) -> bool {
        if let Some(ok) = self.may_read_sys {
            return ok;
        }
        let ok = self.vhost.as_ref().is_some_and(|v| {
            self.broker
                .auth
                .check(
                    &self.user,
                    &v.name,
                    Access::Read,
                    Resource::Exchange,
                    sys::SYS_RESOURCE,
                )
                .is_ok()
        });
        self.may_read_sys = Some(ok);
        ok
    }

    fn handle_publish(&mut self, mut p: Publish, now: Now) -> Result<(), Close> {
        SysStats::add(&self.state.stats.publish_received, 1);
        // Topic alias (spec 3.3.2.3.4).
        if self.v5() {
            if let Some(alias) = p.properties.topic_alias.take() {
                if alias == 0 || alias > self.settings.topic_alias_maximum {
                    return Err(Close::new(
                        reason::TOPIC_ALIAS_INVALID,
                        format!("topic alias {alias} is out of range"),
                    ));
                }
                if p.topic.is_empty() {
                    p.topic = self
                        .aliases
                        .as_ref()
                        .and_then(|a| a.incoming.get(&alias).cloned())
                        .ok_or_else(|| {
                            Close::protocol(format!("topic alias {alias} was never set"))
                        })?;
                } else {
                    let aliases = self.aliases.get_or_insert_with(Default::default);
                    aliases.incoming.insert(alias, p.topic.clone());
                }
            }
            if !p.properties.subscription_identifiers.is_empty() {
                return Err(Close::protocol(
                    "PUBLISH from a client with a subscription identifier",
                ));
            }
        }
        if !mapping::valid_topic_name(&p.topic) {
            return Err(Close::new(
                reason::TOPIC_NAME_INVALID,
                format!("invalid topic name '{}'", p.topic),
            ));
        }
        let refusal = if sys::is_sys(&p.topic) {
            Some(format!(
                "'{}': $SYS topics are the broker's to publish",
                p.topic
            ))
        } else if !self.may_write() {
            Some(format!(
                "write access to exchange '{}' refused for user '{}'",
                self.settings.exchange, self.user
            ))
        } else {
            self.topic_refusal(&p.topic, Access::Write)
        };
        if let Some(text) = refusal {
            // 3.1.1 has no way to refuse a PUBLISH: RabbitMQ disconnects.
            if !self.v5() || p.qos == QoS::AtMostOnce {
                return Err(Close::new(reason::NOT_AUTHORIZED, text));
            }
            let ack = self.reason_ack(p.packet_id, reason::NOT_AUTHORIZED, text);
            // Through the ack queue: acks go out in the order of the PUBLISHes.
            let ack = if p.qos == QoS::AtLeastOnce {
                Packet::PubAck(ack)
            } else {
                Packet::PubRec(ack)
            };
            self.send_after_sync(0, Vec::new(), ack);
            return Ok(());
        }
        let Some((session, vhost)) = self.session.clone().zip(self.vhost.clone()) else {
            return Err(Close::protocol("PUBLISH without a session"));
        };
        let origin = {
            let data = session.lock();
            if p.qos == QoS::ExactlyOnce {
                if let Some(at) = data.incoming_qos2.get(&p.packet_id).copied() {
                    // A re-sent QoS 2 PUBLISH: routed already; just confirm again
                    // (once the first copy is on disk).
                    drop(data);
                    self.send_after_sync(
                        at.unwrap_or(0),
                        Vec::new(),
                        Packet::PubRec(Ack::new(p.packet_id, reason::SUCCESS)),
                    );
                    return Ok(());
                }
            }
            // Receive Maximum (MQTT 5 3.3.4): QoS 1 PUBLISHes count until their
            // PUBACK is sent (which waits for the fsync when a durable queue
            // took them), QoS 2 ones until PUBCOMP. 3.1.1 has no such limit:
            // only QoS 2 packet ids are bounded there.
            let unacked = data.incoming_qos2.len() + if self.v5() { self.unacked_qos1 } else { 0 };
            if p.qos != QoS::AtMostOnce
                && (self.v5() || p.qos == QoS::ExactlyOnce)
                && unacked >= usize::from(self.settings.receive_maximum)
            {
                return Err(Close::new(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "more unacknowledged QoS 1 and 2 PUBLISHes than the receive maximum",
                ));
            }
            data.origin
        };
        self.has_published = true;
        let (qos, packet_id, retain) = (p.qos, p.packet_id, p.retain);
        let topic = p.topic.clone();
        let message = mapping::to_core(
            MqttMessage {
                topic: p.topic,
                qos,
                retain,
                properties: p.properties,
                payload: p.payload,
            },
            &self.settings.exchange,
            self.lossless,
            origin,
            now.unix_ms,
        );
        let size = message.body_size();
        let published = self.state.publish(&vhost, &topic, message, retain);
        if let (Some(stats), Ok(r)) = (&self.stats, &published) {
            stats.published(size);
            if r.queues == 0 {
                stats.add(Stat::DropUnroutable, 1);
            }
        }
        let streams = |r: &switchyard_core::vhost::Routed| -> Vec<StreamWait> {
            r.streams.iter().filter(|w| !w.done()).cloned().collect()
        };
        let (code, durable_at, streams) = match published {
            Ok(r) if r.queues == 0 && self.v5() => {
                (reason::NO_MATCHING_SUBSCRIBERS, r.durable_at, Vec::new())
            }
            Ok(r) => (reason::SUCCESS, r.durable_at, streams(&r)),
            Err(e) => {
                if !self.v5() {
                    return Err(Close::new(
                        reason::IMPLEMENTATION_SPECIFIC_ERROR,
                        e.to_string(),
                    ));
                }
                (reason::IMPLEMENTATION_SPECIFIC_ERROR, 0, Vec::new())
            }
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.send_after_sync(
                    durable_at,
                    streams,
                    Packet::PubAck(Ack::new(packet_id, code)),
                );
            }
            QoS::ExactlyOnce => {
                if code < 0x80 {
                    session
                        .lock()
                        .incoming_qos2
                        .insert(packet_id, Some(durable_at));
                }
                self.send_after_sync(
                    durable_at,
                    streams,
                    Packet::PubRec(Ack::new(packet_id, code)),
                );
            }
        }
        Ok(())
    }

    fn reason_ack(&self, packet_id: u16, code: u8, text: String) -> Ack {
        let mut a = Ack::new(packet_id, code);
        if self.client.problem_info {
            a.properties.reason_string = Some(text);
        }
        a
    }

    /// PUBREL from the client: the QoS 2 publish is complete.
    fn handle_pubrel(&mut self, a: Ack) {
        // Forgotten on disk before the PUBCOMP: once the client has it, it may
        // reuse the id for a new message, which a stale id would swallow.
        let known = self.session.as_ref().is_some_and(|s| {
            let mut data = s.lock();
            let known = data.incoming_qos2.remove(&a.packet_id).is_some();
            if known {
                self.state.persist_session(&mut data);
            }
            known
        });
        let code = if known || !self.v5() {
            reason::SUCCESS
        } else {
            reason::PACKET_IDENTIFIER_NOT_FOUND
        };
        self.send(&Packet::PubComp(Ack::new(a.packet_id, code)));
    }

    // ----------------------------------------------- outgoing QoS 1 / 2

    fn settle(&self, f: &mut Inflight) {
        if let Some((q, m)) = f.source.take() {
            if let Some(stats) = &self.stats {
                stats.add_for(q.queue_type(), Stat::Ack, 1);
            }
            q.settle(&[m]);
        }
    }

    fn release(&self, f: &mut Inflight) {
        if f.charged {
            f.charged = false;
            self.credit.release(1);
        }
    }

    fn handle_puback(&mut self, a: Ack) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let mut data = session.lock();
        if !data.owned_by(self.id) {
            return;
        }
        if data
            .inflight
            .get(&a.packet_id)
            .is_some_and(|f| f.stage == Stage::PubAck)
        {
            if let Some(mut f) = data.inflight.remove(&a.packet_id) {
                self.settle(&mut f);
                self.release(&mut f);
            }
        }
        self.redispatch(&data);
    }

    fn handle_pubrec(&mut self, a: Ack) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let mut data = session.lock();
        if !data.owned_by(self.id) {
            return;
        }
        let Some(f) = data.inflight.get_mut(&a.packet_id) else {
            drop(data);
            let code = if self.v5() {
                reason::PACKET_IDENTIFIER_NOT_FOUND
            } else {
                reason::SUCCESS
            };
            self.send(&Packet::PubRel(Ack::new(a.packet_id, code)));
            return;
        };
        match f.stage {
            Stage::PubAck => {}
            Stage::PubRec | Stage::PubComp => {
                let mut f = f.clone();
                if a.reason >= 0x80 {
                    // The client refused it: the exchange ends here.
                    self.settle(&mut f);
                    self.release(&mut f);
                    data.inflight.remove(&a.packet_id);
                    self.redispatch(&data);
                    return;
                }
                f.stage = Stage::PubComp;
                let source = f.source.take();
                data.inflight.insert(a.packet_id, f);
                // The owed PUBREL is in the session's record before the message
                // leaves its queue: after a crash, one or the other is re-sent.
                self.state.persist_session(&mut data);
                if let Some((q, m)) = source {
                    q.settle(&[m]);
                }
                drop(data);
                self.send(&Packet::PubRel(Ack::new(a.packet_id, reason::SUCCESS)));
            }
        }
    }

    fn handle_pubcomp(&mut self, a: Ack) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let mut data = session.lock();
        if !data.owned_by(self.id) {
            return;
        }
        if data
            .inflight
            .get(&a.packet_id)
            .is_some_and(|f| f.stage == Stage::PubComp)
        {
            if let Some(mut f) = data.inflight.remove(&a.packet_id) {
                self.settle(&mut f);
                self.release(&mut f);
            }
            // A PUBREL no longer owed. Were this write lost, the PUBREL would be
            // re-sent after a restart and answered 0x92: harmless.
            self.state.persist_session(&mut data);
        }
        self.redispatch(&data);
    }

    /// Lets the queues of this connection's consumers hand out more, after an
    /// ack freed credit.
    fn redispatch(&self, data: &crate::state::SessionData) {
        for (q, _) in &data.consumers {
            q.dispatch();
        }
    }

    /// Writes a PUBLISH, applying an outgoing topic alias when the client
    /// accepts them. Returns false (nothing written) when the packet is larger
    /// than the client's maximum packet size: the spec says to drop it.
    fn send_publish(&mut self, mut p: Publish) -> bool {
        let mut new_alias = None;
        if self.v5() && self.client.topic_alias_max > 0 {
            let outgoing = self.aliases.as_ref().map(|a| &a.outgoing);
            let set = outgoing.map_or(0, HashMap::len);
            if let Some(a) = outgoing.and_then(|o| o.get(&p.topic)) {
                p.properties.topic_alias = Some(*a);
                p.topic = String::new();
            } else if set < usize::from(self.client.topic_alias_max) {
                let a = u16::try_from(set + 1).unwrap_or(u16::MAX);
                p.properties.topic_alias = Some(a);
                new_alias = Some((p.topic.clone(), a));
            }
        }
        let sent = codec::encode(
            &Packet::Publish(p),
            self.version,
            self.client.max_packet_size,
            &mut self.out,
        )
        .is_ok();
        if sent {
            if let Some((topic, a)) = new_alias {
                let aliases = self.aliases.get_or_insert_with(Default::default);
                aliases.outgoing.insert(topic, a);
            }
            SysStats::add(&self.state.stats.packets_sent, 1);
            SysStats::add(&self.state.stats.publish_sent, 1);
        }
        sent
    }

    // --------------------------------------------------------- deliveries

    /// The connection's entry in the broker's registry, while registered: the
    /// management API's counters live there.
    pub fn registration(&self) -> Option<&ConnectionGuard> {
        self.registration.as_ref()
    }

    /// Encodes what queues put in the outbox, and lets queues that were held
    /// back for lack of outbox room dispatch again.
    pub fn handle_outbox(&mut self, now: Now) {
        if let Some(p) = self.pending_login.take() {
            match p.login.take() {
                None => {
                    self.pending_login = Some(p);
                    return;
                }
                Some(Ok(u)) => self.connect_as(*p.connect, now, p.vhost_name, u.name, p.assigned),
                Some(Err(e)) => {
                    self.refuse(
                        reason::BAD_USER_NAME_OR_PASSWORD,
                        v3::BAD_USER_NAME_OR_PASSWORD,
                        e.to_string(),
                    );
                    return;
                }
            }
        }
        // A close request from the broker (an operator, a deleted user or
        // vhost): MQTT 5 gets DISCONNECT 0x98 Administrative action, 3.1.1 a
        // plain close (it has no server DISCONNECT).
        if let Some(reason) = self
            .registration
            .as_ref()
            .and_then(ConnectionGuard::take_close_request)
        {
            tracing::info!(peer = %self.peer, client_id = %self.client_id, %reason, "closing MQTT connection on request");
            self.close(Close::new(reason::ADMINISTRATIVE_ACTION, reason));
            return;
        }
        let items = self.outbox.drain();
        if items.is_empty() {
            return;
        }
        let Some(session) = self.session.clone() else {
            for item in items {
                self.give_back(item);
            }
            return;
        };
        let mut data = session.lock();
        let live = data.owned_by(self.id) && self.phase == Phase::Connected;
        for item in items {
            if !live {
                self.give_back(item);
                continue;
            }
            match item {
                Outgoing::Deliver(d) => self.deliver(&mut data, d, now),
                Outgoing::Cancelled(c) => data.consumers.retain(|(_, x)| x.id != c.id),
            }
        }
        if self.outbox.take_starved() {
            self.redispatch(&data);
        }
        drop(data);
        self.publish_state();
    }

    /// Returns an undeliverable delivery to its queue.
    fn give_back(&self, item: Outgoing) {
        if let Outgoing::Deliver(d) = item {
            if !d.consumer.no_ack() {
                self.credit.release(1);
                d.queue.requeue(vec![d.message]);
            }
        }
    }

    /// Drops a delivery for good (expired, too large, matched by no
    /// subscription): settled in its queue.
    fn discard(&self, d: &Delivery) {
        if !d.consumer.no_ack() {
            self.credit.release(1);
            d.queue.settle(std::slice::from_ref(&d.message));
        }
    }

    fn deliver(&mut self, data: &mut crate::state::SessionData, d: Delivery, now: Now) {
        let msg = d.message.message.clone();
        let Some((topic, mut props)) = mapping::from_core(&msg, self.lossless, now.unix_ms) else {
            self.discard(&d);
            return;
        };
        // The subscriptions bound to this queue that match decide the QoS, the
        // identifiers and retain-as-published (rules in
        // `mapping::subscription_matches`). A message that reached the queue
        // through a binding no subscription explains (one an AMQP client added
        // to the queue, a dead-letter exchange) is still delivered, at the
        // queue's QoS: it was routed here. Only MQTT's own rules drop a message:
        // `$` topics under a leading wildcard (4.7.2), no-local, and an MQTT
        // topic its filter does not match although RabbitMQ's key does.
        let exact = mapping::has_published_topic(&msg, self.lossless);
        let mut sub_qos: Option<QoS> = None;
        let mut queue_qos: Option<QoS> = None;
        let mut excluded = false;
        let mut rap = false;
        for s in data.subscriptions.values() {
            if s.queue != d.queue.name {
                continue;
            }
            if (topic.starts_with('$') && s.filter.starts_with(['+', '#']))
                || (s.options.no_local && msg.origin.get() == Some(data.origin))
            {
                excluded = true;
                continue;
            }
            if !mapping::subscription_matches(&s.filter, &s.key, &topic, &msg.routing_key, exact) {
                // An MQTT message its binding took but its filter does not
                // (`a.b/c` under `a/+/c`): MQTT's answer is no.
                excluded |= exact && mapping::key_matches(&s.key, &msg.routing_key);
                queue_qos = queue_qos.max(Some(s.options.qos));
                continue;
            }
            sub_qos = sub_qos.max(Some(s.options.qos));
            rap |= s.options.retain_as_published;
            if let Some(id) = s.id {
                props.subscription_identifiers.push(id);
            }
        }
        let Some(sub_qos) = sub_qos.or(queue_qos.filter(|_| !excluded)) else {
            self.discard(&d);
            return;
        };
        let qos = mapping::published_qos(&msg).min(sub_qos);
        let mut p = Publish {
            dup: d.message.redelivered() && qos != QoS::AtMostOnce,
            qos,
            retain: rap && mapping::published_retain(&msg),
            topic,
            packet_id: 0,
            properties: props,
            payload: msg.body.clone(),
        };
        if let Some(stats) = &self.stats {
            let qt = d.queue.queue_type();
            if d.message.redelivered() {
                stats.add_for(qt, Stat::Redeliver, 1);
            }
            let kind = if qos == QoS::AtMostOnce {
                Stat::DeliverNoAck
            } else {
                Stat::Deliver
            };
            stats.add_for(qt, kind, 1);
        }
        if qos == QoS::AtMostOnce {
            self.discard(&d);
            self.send_publish(p);
            return;
        }
        let Some(id) = data.alloc_packet_id() else {
            self.give_back(Outgoing::Deliver(d));
            return;
        };
        p.packet_id = id;
        if !self.send_publish(p.clone()) {
            self.discard(&d);
            return;
        }
        data.inflight.insert(
            id,
            Inflight {
                stage: if qos == QoS::AtLeastOnce {
                    Stage::PubAck
                } else {
                    Stage::PubRec
                },
                publish: p,
                charged: !d.consumer.no_ack(),
                source: Some((d.queue, d.message)),
            },
        );
    }

    // --------------------------------------------------------- SUBSCRIBE

    /// Starts consuming `queue` for this connection unless it already does.
    fn consume(
        &self,
        data: &mut crate::state::SessionData,
        vhost: &VHost,
        queue: &str,
        no_ack: bool,
    ) -> Result<(), switchyard_core::CoreError> {
        if data.consumers.iter().any(|(q, _)| q.name == queue) {
            return Ok(());
        }
        let q = vhost.queue(queue)?;
        let consumer = Consumer::new(
            self.broker.next_id(),
            ConsumerOptions {
                tag: format!("mqtt-{}", self.client_id),
                channel: 0,
                no_ack,
                exclusive: false,
                prefetch: 0,
                arguments: FieldTable::new(),
            },
            self.credit.clone(),
            self.outbox.clone(),
        );
        data.consumers.push((q.clone(), consumer.clone()));
        if let Some(stats) = &self.stats {
            stats.set_consumers(data.consumers.len());
        }
        q.add_consumer(consumer)
    }

    fn handle_subscribe(&mut self, s: Subscribe, now: Now) -> Result<(), Close> {
        let Some((session, vhost)) = self.session.clone().zip(self.vhost.clone()) else {
            return Err(Close::protocol("SUBSCRIBE without a session"));
        };
        let sub_id = s.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        for (filter, options) in &s.filters {
            let code =
                self.subscribe_one(&session, &vhost, filter, *options, sub_id, &mut retained)?;
            codes.push(code);
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            properties: Properties::default(),
            codes,
        }));
        // Retained messages follow the SUBACK (spec 3.8.4).
        let mut data = session.lock();
        // One record write per SUBSCRIBE, however many filters it had.
        self.state.persist_session(&mut data);
        for (r, qos, id) in retained {
            let Some((topic, mut props)) =
                mapping::from_core(&r.message, self.lossless, now.unix_ms)
                    .map(|(_, p)| (r.topic.clone(), p))
            else {
                continue;
            };
            props.subscription_identifiers.extend(id);
            let qos = mapping::published_qos(&r.message).min(qos);
            let mut p = Publish {
                dup: false,
                qos,
                retain: true,
                topic,
                packet_id: 0,
                properties: props,
                payload: r.message.body.clone(),
            };
            if qos == QoS::AtMostOnce {
                self.send_publish(p);
                continue;
            }
            let Some(pid) = data.alloc_packet_id() else {
                continue;
            };
            p.packet_id = pid;
            if self.send_publish(p.clone()) {
                data.inflight.insert(
                    pid,
                    Inflight {
                        stage: if qos == QoS::AtLeastOnce {
                            Stage::PubAck
                        } else {
                            Stage::PubRec
                        },
                        publish: p,
                        source: None,
                        charged: false,
                    },
                );
            }
        }
        Ok(())
    }

    /// One filter of a SUBSCRIBE; returns its SUBACK code.
    fn subscribe_one(
        &mut self,
        session: &SessionRef,
        vhost: &Arc<VHost>,
        raw: &str,
        options: codec::SubOptions,
        sub_id: Option<u32>,
        retained: &mut Vec<(crate::state::Retained, QoS, Option<u32>)>,
    ) -> Result<u8, Close> {
        let v5 = self.v5();
        let failure = |v5_code: u8| if v5 { v5_code } else { v3::SUBACK_FAILURE };
        let (share, filter) = match mapping::parse_shared(raw) {
            Some(Ok((g, f))) => (Some(g.to_owned()), f.to_owned()),
            Some(Err(())) => {
                if !v5 {
                    return Err(Close::new(
                        reason::TOPIC_FILTER_INVALID,
                        format!("invalid shared subscription '{raw}'"),
                    ));
                }
                return Ok(reason::TOPIC_FILTER_INVALID);
            }
            None => (None, raw.to_owned()),
        };
        if !mapping::valid_filter(&filter) {
            if !v5 {
                return Err(Close::new(
                    reason::TOPIC_FILTER_INVALID,
                    format!("invalid topic filter '{raw}'"),
                ));
            }
            return Ok(reason::TOPIC_FILTER_INVALID);
        }
        if share.is_some() && options.no_local {
            return Err(Close::protocol("no-local on a shared subscription"));
        }
        if !self.may_read() || (sys::is_sys(&filter) && !self.may_read_sys()) {
            return Ok(failure(reason::NOT_AUTHORIZED));
        }
        if let Some(text) = self.topic_refusal(&filter, Access::Read) {
            tracing::info!(peer = %self.peer, client_id = %self.client_id, "{text}");
            return Ok(failure(reason::NOT_AUTHORIZED));
        }
        let key = mapping::filter_to_key(&filter, self.lossless);
        let qos1 = options.qos != QoS::AtMostOnce;
        let queue = match &share {
            Some(g) => mapping::shared_queue_name(g, &filter, &key, self.lossless),
            None => format!(
                "mqtt-subscription-{}{}",
                self.client_id,
                if qos1 { "qos1" } else { "qos0" }
            ),
        };
        let exchange = self.settings.exchange.clone();
        let mut data = session.lock();
        if !data.owned_by(self.id) {
            return Err(Close::new(reason::SESSION_TAKEN_OVER, "session taken over"));
        }
        let previous = data.subscriptions.get(raw).cloned();
        let persistent = data.expiry_secs > 0;
        // The client's own queues hold at most `max_queued` messages beyond
        // those in flight (Mosquitto's max_queued_messages); a queue that exists
        // keeps the arguments it was made with (a changed limit applies to new
        // sessions), so re-subscribing never meets an inequivalent argument.
        let arguments = match vhost.queue(&queue) {
            Ok(existing) => existing.options.arguments.clone(),
            Err(_) if share.is_none() => mapping::session_queue_arguments(self.settings.max_queued),
            Err(_) => FieldTable::new(),
        };
        let declared = vhost.declare_queue(QueueDeclare {
            name: queue.clone(),
            passive: false,
            options: QueueOptions {
                durable: persistent || share.is_some(),
                exclusive: false,
                auto_delete: false,
                arguments,
            },
            connection: 0,
            ..QueueDeclare::default()
        });
        if let Err(e) = declared {
            tracing::debug!(queue = %queue, error = %e, "MQTT subscription queue refused");
            return Ok(failure(reason::IMPLEMENTATION_SPECIFIC_ERROR));
        }
        if share.is_none() && !data.own_queues.contains(&queue) {
            data.own_queues.push(queue.clone());
        }
        let args = mapping::binding_arguments(&filter, self.lossless);
        if let Err(e) = vhost.bind_queue(&queue, &exchange, &key, args, 0) {
            tracing::debug!(queue = %queue, error = %e, "MQTT subscription binding refused");
            return Ok(failure(reason::IMPLEMENTATION_SPECIFIC_ERROR));
        }
        if let Some(prev) = &previous {
            if prev.queue != queue {
                // The QoS moved the subscription to the other queue.
                crate::state::unbind_subscription(vhost, &exchange, prev, self.lossless);
            }
        } else if share.is_some() {
            self.state.acquire_shared(&vhost.name, &queue);
        }
        data.subscriptions.insert(
            raw.to_owned(),
            Subscription {
                filter: filter.clone(),
                share: share.clone(),
                options,
                id: sub_id,
                queue: queue.clone(),
                key,
            },
        );
        let no_ack = share.is_none() && !qos1;
        if let Err(e) = self.consume(&mut data, vhost, &queue, no_ack) {
            tracing::debug!(queue = %queue, error = %e, "cannot consume MQTT subscription queue");
            return Ok(failure(reason::IMPLEMENTATION_SPECIFIC_ERROR));
        }
        drop(data);
        let send_retained = share.is_none()
            && match options.retain_handling {
                0 => true,
                1 => previous.is_none(),
                _ => false,
            };
        if send_retained {
            for r in self.state.retained.matching(&vhost.name, &filter) {
                retained.push((r, options.qos, sub_id));
            }
        }
        Ok(options.qos.as_u8())
    }

    fn handle_unsubscribe(&mut self, u: Unsubscribe) {
        let Some((session, vhost)) = self.session.clone().zip(self.vhost.clone()) else {
            return;
        };
        let exchange = self.settings.exchange.clone();
        let mut codes = Vec::with_capacity(u.filters.len());
        let mut data = session.lock();
        for raw in &u.filters {
            let Some(sub) = data.subscriptions.remove(raw) else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
                continue;
            };
            codes.push(reason::SUCCESS);
            let key_still_used = data
                .subscriptions
                .values()
                .any(|s| s.queue == sub.queue && s.key == sub.key);
            if sub.share.is_some() {
                // Leave the group: stop consuming its queue.
                let mut mine = Vec::new();
                data.consumers.retain(|(q, c)| {
                    let keep = q.name != sub.queue;
                    if !keep {
                        mine.push((q.clone(), c.clone()));
                    }
                    keep
                });
                for (q, c) in mine {
                    vhost.cancel_consumer(&q, c.id);
                }
                if let Some(stats) = &self.stats {
                    stats.set_consumers(data.consumers.len());
                }
                self.state.release_shared(&vhost, &sub.queue, &sub.key);
            } else if !key_still_used {
                crate::state::unbind_subscription(&vhost, &exchange, &sub, self.lossless);
            }
        }
        self.state.persist_session(&mut data);
        drop(data);
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: Properties::default(),
            codes,
        }));
    }

    // -------------------------------------------------------- DISCONNECT

    fn handle_disconnect(&mut self, d: Disconnect) -> Result<(), Close> {
        if let (Some(new), Some(session)) = (d.properties.session_expiry_interval, &self.session) {
            let mut data = session.lock();
            if data.expiry_secs == 0 && new != 0 {
                drop(data);
                return Err(Close::protocol(
                    "session expiry set in DISCONNECT after 0 in CONNECT",
                ));
            }
            data.expiry_secs = new.min(self.settings.max_session_expiry_secs);
            self.state.persist_session(&mut data);
        }
        // A normal DISCONNECT discards the will; 0x04 asks for it (MQTT 5).
        if !(self.v5() && d.reason == reason::DISCONNECT_WITH_WILL_MESSAGE) {
            self.will = None;
        }
        self.close_reason = Some(format!("client sent DISCONNECT (reason {:#04x})", d.reason));
        self.phase = Phase::Closed;
        Ok(())
    }

    // ---------------------------------------------- closing from outside

    /// Another connection took the session over.
    pub fn taken_over(&mut self) {
        self.close(Close::new(
            reason::SESSION_TAKEN_OVER,
            "another connection with the same client identifier",
        ));
    }

    /// The client was silent for 1.5 times its keep-alive.
    pub fn keep_alive_expired(&mut self) {
        self.close(Close::new(reason::KEEP_ALIVE_TIMEOUT, "keep-alive timeout"));
    }

    /// When the login's access token expires, while connected.
    pub fn token_expires(&self) -> Option<Instant> {
        self.token_expires
            .filter(|_| self.phase == Phase::Connected)
    }

    /// The access token expired: the connection ends.
    pub fn token_expired(&mut self) {
        self.close(Close::new(
            reason::MAXIMUM_CONNECT_TIME,
            "the access token expired",
        ));
    }

    /// The broker is shutting down.
    pub fn shutdown(&mut self) {
        self.close(Close::new(
            reason::SERVER_SHUTTING_DOWN,
            "server shutting down",
        ));
    }

    /// The handshake took too long.
    pub fn handshake_timeout(&mut self) {
        self.close_reason = Some("no CONNECT in time".into());
        self.phase = Phase::Closed;
    }

    /// The connection is over (socket closed, or we closed it): publishes the
    /// will unless the client disconnected cleanly, detaches from the session,
    /// returns undelivered messages to their queues. Safe to call twice.
    pub fn finish(&mut self, reason: &str, now: Now) {
        if self.finished {
            return;
        }
        self.finished = true;
        if std::mem::take(&mut self.counted_connected) {
            self.state.stats.connected.fetch_sub(1, Ordering::Relaxed);
        }
        if self.close_reason.is_none() {
            self.close_reason = Some(reason.to_owned());
        }
        self.phase = Phase::Closed;
        let Some((session, vhost)) = self.session.clone().zip(self.vhost.clone()) else {
            return;
        };
        let (key, origin, owned) = {
            let data = session.lock();
            (data.key.clone(), data.origin, data.owned_by(self.id))
        };
        let ended = self.state.detach(&vhost, &session, self.id, now.instant);
        for item in self.outbox.drain() {
            self.give_back(item);
        }
        if let Some(w) = self.will.take().map(|w| *w) {
            let delay = w.properties.will_delay_interval.unwrap_or(0);
            let retain = w.retain;
            let topic = w.topic.clone();
            let message = mapping::to_core(
                MqttMessage {
                    topic: w.topic,
                    qos: w.qos,
                    retain,
                    properties: {
                        let mut p = w.properties;
                        p.will_delay_interval = None;
                        p
                    },
                    payload: w.payload,
                },
                &self.settings.exchange,
                self.lossless,
                origin,
                now.unix_ms,
            );
            // A delayed will waits unless the session ends first or was taken
            // over (then the new connection resumes it at once).
            if delay == 0 || ended {
                let _ = self.state.publish(&vhost, &topic, message, retain);
            } else if owned {
                let at = now.instant + Duration::from_secs(u64::from(delay));
                self.state
                    .schedule_will(key, vhost, topic, message, retain, at);
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The connection task always calls `finish`; this is a safety net so a
        // panic in the task cannot leave consumers attached.
        if !self.finished {
            self.finish("connection dropped", Now::read());
        }
    }
}

/// The same packet without reason strings and user properties (spec: these
/// are the first things to drop when a packet would exceed the client's limit).
fn strip_properties(p: &Packet) -> Packet {
    let strip = |props: &Properties| Properties {
        reason_string: None,
        user_properties: Vec::new(),
        ..props.clone()
    };
    match p {
        Packet::ConnAck(a) => Packet::ConnAck(ConnAck {
            properties: strip(&a.properties),
            ..a.clone()
        }),
        Packet::PubAck(a) => Packet::PubAck(Ack::new(a.packet_id, a.reason)),
        Packet::PubRec(a) => Packet::PubRec(Ack::new(a.packet_id, a.reason)),
        Packet::PubRel(a) => Packet::PubRel(Ack::new(a.packet_id, a.reason)),
        Packet::PubComp(a) => Packet::PubComp(Ack::new(a.packet_id, a.reason)),
        Packet::Disconnect(d) => Packet::Disconnect(Disconnect {
            reason: d.reason,
            properties: strip(&d.properties),
        }),
        other => other.clone(),
    }
}

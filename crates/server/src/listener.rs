//! Which protocol adapter serves which listener. The accept loop, the handshakes
//! of TLS and WebSocket and their deadlines are the transport layer's
//! ([`switchyard_transport::AcceptLoop`]); this file hands each established
//! connection to its adapter, inside the [`ACCEPTED`] scope that tells the
//! session how it was accepted (TLS, WebSocket, certificate login).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use switchyard_amqp::AmqpSettings;
use switchyard_core::connections::{Accepted, ACCEPTED};
use switchyard_core::Broker;
use switchyard_mqtt::{MqttSettings, MqttState};
use switchyard_stomp::StompSettings;
use switchyard_transport::{cert_login_name, AcceptLoop, CertLoginFrom, Connection, Stream};
use tokio_util::sync::CancellationToken;

/// What a listener serves; one variant per protocol adapter. The transport
/// (TCP, TLS, WebSocket, WebSocket over TLS) is the accept loop's.
#[derive(Clone)]
pub(crate) enum Protocol {
    Amqp(Arc<AmqpSettings>),
    /// MQTT 3.1/3.1.1/5.0: the settings and the broker-wide MQTT state.
    Mqtt(Arc<MqttSettings>, Arc<MqttState>),
    Stomp(Arc<StompSettings>),
    /// The RabbitMQ Stream protocol.
    Stream(Arc<switchyard_stream::StreamSettings>),
}

/// Runs `accept` until shutdown, serving each connection with `protocol`.
/// `cert_login`: where certificate logins take the user name from, when the TLS
/// configuration verifies client certificates (`None`: no certificate login).
pub(crate) async fn serve(
    accept: AcceptLoop,
    protocol: Protocol,
    broker: Arc<Broker>,
    cert_login: Option<CertLoginFrom>,
) {
    // One handler per protocol, so each connection's future is stored inline
    // in its task at that protocol's own size: a handler shared by every
    // protocol returns one type, which must be boxed (a second allocation,
    // and a wrapper keeping room for what it moved into the box) or sized for
    // the largest protocol.
    match protocol {
        Protocol::Amqp(settings) => {
            run(
                accept,
                broker,
                cert_login,
                move |stream, peer, broker, token| {
                    switchyard_amqp::serve(stream, peer, broker, settings.clone(), token)
                },
            )
            .await
        }
        Protocol::Mqtt(settings, state) => {
            run(
                accept,
                broker,
                cert_login,
                move |stream, peer, broker, token| {
                    switchyard_mqtt::serve(
                        stream,
                        peer,
                        broker,
                        state.clone(),
                        settings.clone(),
                        token,
                    )
                },
            )
            .await
        }
        Protocol::Stomp(settings) => {
            run(
                accept,
                broker,
                cert_login,
                move |stream, peer, broker, token| {
                    switchyard_stomp::serve(stream, peer, broker, settings.clone(), token)
                },
            )
            .await
        }
        Protocol::Stream(settings) => {
            run(
                accept,
                broker,
                cert_login,
                move |stream, peer, broker, token| {
                    switchyard_stream::serve(stream, peer, broker, settings.clone(), token)
                },
            )
            .await
        }
    }
}

/// Runs `accept`, serving each connection with `serve` inside the
/// [`ACCEPTED`] scope.
async fn run<H, F>(
    accept: AcceptLoop,
    broker: Arc<Broker>,
    cert_login: Option<CertLoginFrom>,
    serve: H,
) where
    H: Fn(Stream, SocketAddr, Arc<Broker>, CancellationToken) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    accept
        .run(move |conn: Connection, token: CancellationToken| {
            let cert_login = cert_login
                .zip(conn.peer_certificate.as_ref())
                .and_then(|(from, der)| cert_login_name(der, from))
                .map(Arc::<str>::from);
            let facts = Accepted {
                local: conn.local,
                tls: conn.tls,
                websocket: conn.websocket,
                cert_login,
            };
            // `serve` builds the session before returning its future, and a
            // session may read the facts as it is built (the Stream protocol
            // takes its advertised address from them): build it inside the
            // scope too, then run it inside.
            let connection = ACCEPTED.sync_scope(facts.clone(), || {
                serve(conn.stream, conn.peer, broker.clone(), token)
            });
            ACCEPTED.scope(facts, connection)
        })
        .await;
}

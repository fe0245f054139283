//! Which protocol adapter serves which listener. The accept loop, the handshakes
//! of TLS and WebSocket and their deadlines are the transport layer's
//! ([`switchyard_transport::AcceptLoop`]); this file hands each established
//! connection to its adapter, inside the [`ACCEPTED`] scope that tells the
//! session how it was accepted (TLS, WebSocket, certificate login).

use std::sync::Arc;

use switchyard_amqp::AmqpSettings;
use switchyard_core::connections::{Accepted, ACCEPTED};
use switchyard_core::Broker;
use switchyard_mqtt::{MqttSettings, MqttState};
use switchyard_stomp::StompSettings;
use switchyard_transport::{cert_login_name, AcceptLoop, CertLoginFrom, Connection};
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
    accept
        .run(move |conn: Connection, token: CancellationToken| {
            let protocol = protocol.clone();
            let broker = broker.clone();
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
            let (stream, peer) = (conn.stream, conn.peer);
            // Each protocol's connection future is boxed on its own: inline,
            // this future would be as large as the largest of them (a match
            // is sized by its biggest arm), and every idle MQTT connection
            // would pay for an AMQP session's state.
            ACCEPTED.scope(facts, async move {
                match protocol {
                    Protocol::Amqp(settings) => {
                        Box::pin(switchyard_amqp::serve(
                            stream, peer, broker, settings, token,
                        ))
                        .await;
                    }
                    Protocol::Mqtt(settings, state) => {
                        Box::pin(switchyard_mqtt::serve(
                            stream, peer, broker, state, settings, token,
                        ))
                        .await;
                    }
                    Protocol::Stomp(settings) => {
                        Box::pin(switchyard_stomp::serve(
                            stream, peer, broker, settings, token,
                        ))
                        .await;
                    }
                    Protocol::Stream(settings) => {
                        Box::pin(switchyard_stream::serve(
                            stream, peer, broker, settings, token,
                        ))
                        .await;
                    }
                }
            })
        })
        .await;
}

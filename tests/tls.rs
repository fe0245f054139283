//! TLS listeners, certificate login and hostile clients (issue 10 items 2, 3, 7):
//! real TLS clients (rustls) over real sockets against an in-process broker with
//! certificates made by rcgen in the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::Duration;

use rcgen::DnType;
use switchyard_testkit::tls::{rustls, tls_connect, TestCerts};
use switchyard_testkit::{start_broker_with, TestBroker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s, client id "c1", no
/// user name or password.
const MQTT_CONNECT: [u8; 16] = [
    0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1',
];

fn addr(b: &TestBroker, name: &str) -> SocketAddr {
    *b.server()
        .local_addrs()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} listener"))
}

async fn tls_broker(certs: &TestCerts, verify_peer: bool) -> TestBroker {
    start_broker_with(|c| {
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        c.listeners.amqps = Some(lo);
        c.listeners.mqtts = Some(lo);
        c.listeners.stomps = Some(lo);
        c.listeners.mqtt_wss = Some(lo);
        c.listeners.management_tls = Some(lo);
        c.mqtt.allow_anonymous = false;
        c.stomp.default_user = String::new();
        certs.configure(c, verify_peer);
    })
    .await
}

/// Adds a user without a password (it cannot log in with one) and gives it `/`.
fn add_cert_user(b: &TestBroker, name: &str) {
    use switchyard_core::admin::MetaCommand;
    let broker = b.broker();
    broker
        .apply(MetaCommand::PutUser {
            name: name.into(),
            password_hash: String::new(),
            hashing_algorithm: String::new(),
            tags: vec![],
        })
        .unwrap();
    broker
        .apply(MetaCommand::SetPermissions {
            user: name.into(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        })
        .unwrap();
}

async fn read_some<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("no answer within 5 s")
        .expect("read");
    buf
}

async fn mqtt_connack<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> u8 {
    s.write_all(&MQTT_CONNECT).await.unwrap();
    let ack = read_some(s, 4).await;
    assert_eq!(&ack[..2], &[0x20, 2], "CONNACK expected: {ack:?}");
    ack[3]
}

#[tokio::test]
async fn mqtts_and_stomps_log_in_with_the_client_certificate() {
    let certs = TestCerts::generate();
    let b = tls_broker(&certs, true).await;
    add_cert_user(&b, "O=client,CN=alice");
    let alice = certs.client_cert(
        "alice",
        &[
            (DnType::CommonName, "alice"),
            (DnType::OrganizationName, "client"),
        ],
    );
    let mallory = certs.client_cert("mallory", &[(DnType::CommonName, "mallory")]);

    // MQTT: no credentials in CONNECT, the certificate names the user.
    let mut s = tls_connect(addr(&b, "mqtts"), certs.client_config(Some(&alice), &[]))
        .await
        .unwrap();
    assert_eq!(mqtt_connack(&mut s).await, 0, "certificate login accepted");
    let users: Vec<String> = b
        .broker()
        .connections()
        .list()
        .iter()
        .map(|c| c.info.user.clone())
        .collect();
    assert!(users.contains(&"O=client,CN=alice".to_owned()), "{users:?}");
    let info = b.broker().connections().list();
    assert!(info.iter().all(|c| c.info.tls));

    // A certificate whose user does not exist: refused (4 = bad user name or password).
    let mut s = tls_connect(addr(&b, "mqtts"), certs.client_config(Some(&mallory), &[]))
        .await
        .unwrap();
    assert_eq!(mqtt_connack(&mut s).await, 4);

    // No certificate (allowed: fail_if_no_peer_cert = false), no credentials,
    // anonymous off: refused.
    let mut s = tls_connect(addr(&b, "mqtts"), certs.client_config(None, &[]))
        .await
        .unwrap();
    assert_eq!(mqtt_connack(&mut s).await, 4);

    // STOMP: CONNECT without login, the certificate names the user.
    let mut s = tls_connect(addr(&b, "stomps"), certs.client_config(Some(&alice), &[]))
        .await
        .unwrap();
    s.write_all(b"CONNECT\naccept-version:1.2\nhost:/\n\n\0")
        .await
        .unwrap();
    let head = read_some(&mut s, 9).await;
    assert_eq!(&head, b"CONNECTED");

    // Without a certificate and without a default user: ERROR.
    let mut s = tls_connect(addr(&b, "stomps"), certs.client_config(None, &[]))
        .await
        .unwrap();
    s.write_all(b"CONNECT\naccept-version:1.2\nhost:/\n\n\0")
        .await
        .unwrap();
    let head = read_some(&mut s, 5).await;
    assert_eq!(&head, b"ERROR");
}

#[tokio::test]
async fn amqps_offers_external_only_over_tls() {
    let certs = TestCerts::generate();
    let b = tls_broker(&certs, true).await;
    let start_mechanisms = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut plain = TcpStream::connect(b.amqp_addr()).await.unwrap();
    plain.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = timeout(Duration::from_secs(5), plain.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = start_mechanisms(&buf[..n]);
    assert!(text.contains("PLAIN AMQPLAIN") && !text.contains("EXTERNAL"));

    let mut tls = tls_connect(addr(&b, "amqps"), certs.client_config(None, &[]))
        .await
        .unwrap();
    tls.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let n = timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(start_mechanisms(&buf[..n]).contains("PLAIN AMQPLAIN EXTERNAL"));
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_spoken_and_a_client_without_certificate_is_refused_when_required() {
    let certs = TestCerts::generate();
    let b = start_broker_with(|c| {
        c.listeners.mqtts = Some("127.0.0.1:0".parse().unwrap());
        certs.configure(c, true);
        c.tls.fail_if_no_peer_cert = true;
    })
    .await;
    let alice = certs.client_cert("alice", &[(DnType::CommonName, "alice")]);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut s = tls_connect(
            addr(&b, "mqtts"),
            certs.client_config(Some(&alice), &[version]),
        )
        .await
        .unwrap_or_else(|e| panic!("{version:?}: {e}"));
        assert_eq!(
            s.get_ref().1.protocol_version(),
            Some(version.version),
            "negotiated version"
        );
        // The user "CN=alice" does not exist: refused, but over a working TLS session.
        assert_eq!(mqtt_connack(&mut s).await, 4);
    }
    // fail_if_no_peer_cert: no certificate, no session. With TLS 1.3 the client
    // learns it on its first read.
    let refused = async {
        let mut s = tls_connect(addr(&b, "mqtts"), certs.client_config(None, &[])).await?;
        s.write_all(&MQTT_CONNECT).await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map(|_| buf)
    };
    assert!(timeout(Duration::from_secs(5), refused)
        .await
        .unwrap()
        .is_err());
}

#[tokio::test]
async fn certificates_are_reloaded_for_new_connections_and_a_bad_file_keeps_the_old_ones() {
    let certs = TestCerts::generate();
    let b = start_broker_with(|c| {
        c.listeners.mqtts = Some("127.0.0.1:0".parse().unwrap());
        certs.configure(c, false);
        c.tls.reload_interval_secs = 0;
    })
    .await;
    let server_cn = |s: &switchyard_testkit::tls::tokio_rustls::client::TlsStream<TcpStream>| {
        let der = s.get_ref().1.peer_certificates().unwrap()[0].clone();
        switchyard_transport::cert_login_name(&der, switchyard_transport::CertLoginFrom::CommonName)
            .unwrap()
    };
    let config = certs.client_config(None, &[]);
    let before = tls_connect(addr(&b, "mqtts"), config.clone())
        .await
        .unwrap();
    assert_eq!(server_cn(&before), "switchyard");

    certs.write_server_cert("switchyard-renewed");
    assert!(b.server().reload_tls().unwrap());
    let after = tls_connect(addr(&b, "mqtts"), config.clone())
        .await
        .unwrap();
    assert_eq!(server_cn(&after), "switchyard-renewed");

    // A broken key: the reload fails and says so; the renewed certificate stays.
    std::fs::write(&certs.server_key, "not a key").unwrap();
    let err = b.server().reload_tls().unwrap_err().to_string();
    assert!(err.contains("server.key"), "{err}");
    let still = tls_connect(addr(&b, "mqtts"), config).await.unwrap();
    assert_eq!(server_cn(&still), "switchyard-renewed");
}

/// Attack test (issue 10 item 7): slow-loris clients on the plain and TLS ports,
/// half-open TLS handshakes and a flood of connection attempts, while a normal
/// client's round trip stays under 1 s; the deadlines close the attackers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_half_open_handshakes_and_a_connect_flood_do_not_starve_a_client() {
    let certs = TestCerts::generate();
    let b = start_broker_with(|c| {
        c.listeners.mqtts = Some("127.0.0.1:0".parse().unwrap());
        certs.configure(c, false);
        c.limits.handshake_timeout_secs = 1;
        c.tls.handshake_timeout_ms = 500;
    })
    .await;
    let mqtt = b.mqtt_addr();
    let mqtts = addr(&b, "mqtts");
    let amqp = b.amqp_addr();

    // The normal client, connected before the attack.
    let mut client = TcpStream::connect(mqtt).await.unwrap();
    assert_eq!(mqtt_connack(&mut client).await, 0);

    // Slow-loris: 40 connections on each plain port dripping one byte of a
    // valid handshake every 200 ms (a CONNECT, a start-ok frame, each declaring
    // 200 bytes that never all come); 40 half-open TLS handshakes (TCP, then nothing).
    let mut mqtt_drip = vec![0x10, 0xC8, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
    mqtt_drip.resize(40, b'x');
    let mut amqp_drip = b"AMQP\x00\x00\x09\x01\x01\x00\x00\x00\x00\x00\xC8".to_vec();
    amqp_drip.resize(40, 0);
    // STOMP and the HTTP listeners (management, Prometheus) too: a frame or a
    // request header that never ends.
    let mut stomp_drip = b"CONNECT\naccept-version:1.2\nhost:/\n".to_vec();
    stomp_drip.resize(40, b'x');
    let mut http_drip = b"GET /api/overview HTTP/1.1\r\nHost: x\r\n".to_vec();
    http_drip.resize(40, b'x');
    let mut attackers = Vec::new();
    for (target, drip, count) in [
        (mqtt, mqtt_drip, 40),
        (amqp, amqp_drip, 40),
        (b.stomp_addr(), stomp_drip, 10),
        (b.management_addr(), http_drip.clone(), 10),
        (b.prometheus_addr(), http_drip, 10),
    ] {
        for _ in 0..count {
            let drip = drip.clone();
            attackers.push(tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(target).await else {
                    return None;
                };
                let started = Instant::now();
                for byte in &drip {
                    if s.write_all(&[*byte]).await.is_err() {
                        return Some(started.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Still open after 8 s of dripping: the deadline did not work.
                None
            }));
        }
    }
    let mut half_open = Vec::new();
    for _ in 0..40 {
        half_open.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(mqtts).await.ok()?;
            let started = Instant::now();
            let mut buf = [0u8; 16];
            // The server closes it: read returns end of stream (or an error).
            let _ = timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .ok()?;
            Some(started.elapsed())
        }));
    }
    // Connect flood: 8 tasks opening and dropping connections for 2 s.
    let flood_until = Instant::now() + Duration::from_secs(2);
    let mut flood = Vec::new();
    for i in 0..8 {
        let target = [mqtt, mqtts, amqp][i % 3];
        flood.push(tokio::spawn(async move {
            let mut n = 0u32;
            while Instant::now() < flood_until {
                if TcpStream::connect(target).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }

    // Meanwhile: PINGREQ -> PINGRESP round trips on the established client.
    let mut worst = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let t = Instant::now();
        client.write_all(&[0xC0, 0]).await.unwrap();
        assert_eq!(read_some(&mut client, 2).await, [0xD0, 0]);
        worst = worst.max(t.elapsed());
    }
    let mut flooded = 0;
    for f in flood {
        flooded += f.await.unwrap();
    }
    assert!(flooded > 100, "the flood made {flooded} connections");
    assert!(worst < Duration::from_secs(1), "worst round trip {worst:?}");

    // A new client still gets in after the flood.
    let mut late = TcpStream::connect(mqtt).await.unwrap();
    assert_eq!(mqtt_connack(&mut late).await, 0);

    for a in attackers {
        let closed_after = a
            .await
            .unwrap()
            .expect("a slow-loris connection stayed open");
        // handshake_timeout_secs = 1, plus the drain after our FIN.
        assert!(closed_after < Duration::from_secs(4), "{closed_after:?}");
    }
    for h in half_open {
        let closed_after = h
            .await
            .unwrap()
            .expect("a half-open TLS handshake stayed open");
        assert!(closed_after < Duration::from_secs(3), "{closed_after:?}");
    }
}

#[tokio::test]
async fn management_over_https_and_stomp_over_wss() {
    let certs = TestCerts::generate();
    let b = start_broker_with(|c| {
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        c.listeners.management_tls = Some(lo);
        c.listeners.stomp_wss = Some(lo);
        certs.configure(c, false);
    })
    .await;
    // HTTPS: the management API answers over TLS (guest/guest from loopback).
    let mut s = tls_connect(addr(&b, "management_tls"), certs.client_config(None, &[]))
        .await
        .unwrap();
    s.write_all(
        b"GET /api/overview HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    timeout(Duration::from_secs(5), s.read_to_end(&mut response))
        .await
        .unwrap()
        .ok();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("\"management_tls\"") || text.contains("https"),
        "{text}"
    );

    // STOMP over WebSocket over TLS.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let tls = tls_connect(addr(&b, "stomp_wss"), certs.client_config(None, &[]))
        .await
        .unwrap();
    let mut request = "wss://localhost/ws".into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "v12.stomp".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    ws.send(Message::text(
        "CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0",
    ))
    .await
    .unwrap();
    let reply = timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        reply.to_text().unwrap().starts_with("CONNECTED"),
        "{reply:?}"
    );
}

//! Runtime administration through `Broker::apply`, in memory, with time passed
//! in (a manual clock): users and logins, permissions and the cache generation,
//! policies and operator policies applied to live queues, limits with
//! RabbitMQ's refusal texts, vhost and user deletion closing connections, and
//! the commands' serialisation. No test sleeps.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;
use switchyard_core::admin::{MetaCommand, PolicySpec, UserLimits, VhostLimits, SHA256};
use switchyard_core::auth::{hash_password, Access, Auth, Resource};
use switchyard_core::connections::{protocol, ConnectionGuard, ConnectionInfo};
use switchyard_core::consumer::Outbox;
use switchyard_core::message::{Message, Properties};
use switchyard_core::policy::Policies;
use switchyard_core::queue::QueueOptions;
use switchyard_core::timer::Clock;
use switchyard_core::vhost::QueueDeclare;
use switchyard_core::{Broker, ErrorKind, FieldTable, FieldValue};

const T0: u64 = 1_700_000_000_000;

fn broker() -> Arc<Broker> {
    Broker::build(
        Auth::new(),
        &[],
        0,
        None,
        Policies::default(),
        Clock::Manual(AtomicU64::new(T0)),
    )
}

fn put_user(b: &Broker, name: &str, password: &str) {
    b.apply(MetaCommand::PutUser {
        name: name.into(),
        password_hash: hash_password(password, [9, 8, 7, 6]),
        hashing_algorithm: SHA256.into(),
        tags: vec!["management".into()],
    })
    .unwrap();
}

fn all(b: &Broker, user: &str, vhost: &str) {
    b.apply(MetaCommand::SetPermissions {
        user: user.into(),
        vhost: vhost.into(),
        configure: ".*".into(),
        write: ".*".into(),
        read: ".*".into(),
    })
    .unwrap();
}

fn put_vhost(b: &Broker, name: &str) {
    b.apply(MetaCommand::PutVhost {
        name: name.into(),
        description: "test".into(),
        tags: vec!["t".into()],
        default_queue_type: None,
    })
    .unwrap();
}

fn table(pairs: &[(&str, i64)]) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in pairs {
        t.insert(*k, FieldValue::I64(*v));
    }
    t
}

fn policy(name: &str, pattern: &str, definition: FieldTable) -> PolicySpec {
    PolicySpec {
        vhost: "/".into(),
        name: name.into(),
        pattern: pattern.into(),
        apply_to: "queues".into(),
        priority: 0,
        definition,
    }
}

fn declare(b: &Broker, vhost: &str, name: &str) {
    b.vhost(vhost)
        .unwrap()
        .declare_queue(QueueDeclare {
            name: name.into(),
            options: QueueOptions::default(),
            ..Default::default()
        })
        .unwrap();
}

fn publish(b: &Broker, queue: &str, n: usize, now: u64) {
    let v = b.vhost("/").unwrap();
    for i in 0..n {
        let m = Message::new(
            "",
            queue,
            Properties::default(),
            Bytes::from(format!("m{i}")),
        );
        v.publish_at(m, now).unwrap();
    }
}

fn ready(b: &Broker, queue: &str) -> usize {
    b.vhost("/").unwrap().queue(queue).unwrap().message_count()
}

fn connect(b: &Broker, user: &str, vhost: &str, port: u16) -> Result<ConnectionGuard, String> {
    let peer: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let info = ConnectionInfo::new(protocol::AMQP_091, user, vhost, peer, T0);
    b.register_connection(b.next_id(), info, Outbox::new(4))
        .map_err(|e| e.text)
}

#[test]
fn a_user_put_at_runtime_logs_in_and_is_listed_with_its_hash() {
    let b = broker();
    assert!(b.auth.login("bob", b"pw", None).is_err());
    put_user(&b, "bob", "pw");
    assert!(b.auth.login("bob", b"pw", None).is_ok());
    assert!(b.auth.login("bob", b"nope", None).is_err());
    let u = b.user_info("bob").unwrap();
    assert_eq!(u.password_hash, hash_password("pw", [9, 8, 7, 6]));
    assert_eq!(u.hashing_algorithm, SHA256);
    assert_eq!(u.tags, vec!["management".to_string()]);
    // Changing the password: the old one stops working at once.
    put_user(&b, "bob", "new");
    assert!(b.auth.login("bob", b"pw", None).is_err());
    assert!(b.auth.login("bob", b"new", None).is_ok());
}

#[test]
fn permissions_change_at_once_and_bump_the_generation() {
    let b = broker();
    put_user(&b, "bob", "pw");
    let g0 = b.auth.generation();
    assert!(b.auth.check_vhost("bob", "/").is_err());
    all(&b, "bob", "/");
    assert!(b.auth.generation() > g0);
    assert!(b
        .auth
        .check("bob", "/", Access::Write, Resource::Exchange, "amq.topic")
        .is_ok());
    b.apply(MetaCommand::SetPermissions {
        user: "bob".into(),
        vhost: "/".into(),
        configure: ".*".into(),
        write: "^nothing$".into(),
        read: ".*".into(),
    })
    .unwrap();
    let e = b
        .auth
        .check("bob", "/", Access::Write, Resource::Exchange, "amq.topic")
        .unwrap_err();
    assert_eq!(
        e.text,
        "access to exchange 'amq.topic' in vhost '/' refused for user 'bob'"
    );
    let listed = b.permissions();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].write, "^nothing$");
    b.apply(MetaCommand::ClearPermissions {
        user: "bob".into(),
        vhost: "/".into(),
    })
    .unwrap();
    assert!(b.auth.check_vhost("bob", "/").is_err());
}

#[test]
fn invalid_commands_change_nothing_and_say_why() {
    let b = broker();
    let e = b
        .apply(MetaCommand::SetPermissions {
            user: "ghost".into(),
            vhost: "/".into(),
            configure: String::new(),
            write: String::new(),
            read: String::new(),
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    put_user(&b, "bob", "pw");
    let e = b
        .apply(MetaCommand::SetPermissions {
            user: "bob".into(),
            vhost: "/".into(),
            configure: "(".into(),
            write: String::new(),
            read: String::new(),
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PreconditionFailed);
    assert!(b.permissions().is_empty());
    let e = b
        .apply(MetaCommand::PutUser {
            name: "x".into(),
            password_hash: "not base64!".into(),
            hashing_algorithm: SHA256.into(),
            tags: vec![],
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PreconditionFailed);
    let e = b
        .apply(MetaCommand::SetPolicy(policy(
            "p",
            ".*",
            table(&[("max-priority", 5)]),
        )))
        .unwrap_err();
    assert_eq!(
        e.text,
        "policy 'p': Validation failed: [{<<\"max-priority\">>,5}] are not recognised policy settings"
    );
    let e = b
        .apply(MetaCommand::DeleteVhost {
            name: "nope".into(),
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
}

#[test]
fn a_policy_set_at_runtime_trims_a_live_queue_and_clearing_it_lifts_the_limit() {
    let b = broker();
    declare(&b, "/", "orders");
    declare(&b, "/", "other");
    publish(&b, "orders", 10, T0);
    publish(&b, "other", 10, T0);
    b.apply(MetaCommand::SetPolicy(policy(
        "cap",
        "^orders$",
        table(&[("max-length", 3)]),
    )))
    .unwrap();
    assert_eq!(ready(&b, "orders"), 3, "trimmed at once");
    assert_eq!(ready(&b, "other"), 10, "the pattern does not match");
    let q = b.vhost("/").unwrap().queue("orders").unwrap();
    assert_eq!(q.settings().policy.as_deref(), Some("cap"));
    // The oldest went: the newest three stay.
    let first = q.get(true).unwrap();
    assert_eq!(first.message.message.body, Bytes::from("m7"));
    publish(&b, "orders", 5, T0);
    assert_eq!(ready(&b, "orders"), 3);
    b.apply(MetaCommand::ClearPolicy {
        vhost: "/".into(),
        name: "cap".into(),
    })
    .unwrap();
    assert_eq!(q.settings().policy, None);
    publish(&b, "orders", 5, T0);
    assert_eq!(ready(&b, "orders"), 8, "no limit any more");
    assert!(b.policies().is_empty());
}

#[test]
fn a_message_ttl_policy_expires_messages_already_queued() {
    let b = broker();
    declare(&b, "/", "q");
    publish(&b, "q", 4, T0);
    b.apply(MetaCommand::SetPolicy(policy(
        "ttl",
        "^q$",
        table(&[("message-ttl", 1000)]),
    )))
    .unwrap();
    assert_eq!(ready(&b, "q"), 4);
    b.tick(T0 + 999);
    assert_eq!(ready(&b, "q"), 4);
    b.tick(T0 + 1000);
    assert_eq!(ready(&b, "q"), 0, "expired one TTL after the policy came");
    // Lifted: new messages stay.
    b.apply(MetaCommand::ClearPolicy {
        vhost: "/".into(),
        name: "ttl".into(),
    })
    .unwrap();
    publish(&b, "q", 2, T0 + 1000);
    b.tick(T0 + 100_000);
    assert_eq!(ready(&b, "q"), 2);
}

#[test]
fn operator_policies_combine_with_policies_lowest_limit_wins() {
    let b = broker();
    declare(&b, "/", "q");
    publish(&b, "q", 20, T0);
    b.apply(MetaCommand::SetPolicy(policy(
        "user",
        ".*",
        table(&[("max-length", 10)]),
    )))
    .unwrap();
    assert_eq!(ready(&b, "q"), 10);
    b.apply(MetaCommand::SetOperatorPolicy(policy(
        "ops",
        ".*",
        table(&[("max-length", 4)]),
    )))
    .unwrap();
    assert_eq!(ready(&b, "q"), 4, "the operator's lower limit wins");
    let s = b.vhost("/").unwrap().queue("q").unwrap().settings();
    assert_eq!(s.policy.as_deref(), Some("user"));
    assert_eq!(s.operator_policy.as_deref(), Some("ops"));
    assert_eq!(b.operator_policies().len(), 1);
    // An operator policy may not set what operators cannot.
    let mut dlx = FieldTable::new();
    dlx.insert("dead-letter-exchange", FieldValue::string("x"));
    assert!(b
        .apply(MetaCommand::SetOperatorPolicy(policy("bad", ".*", dlx)))
        .is_err());
    b.apply(MetaCommand::ClearOperatorPolicy {
        vhost: "/".into(),
        name: "ops".into(),
    })
    .unwrap();
    publish(&b, "q", 20, T0);
    assert_eq!(ready(&b, "q"), 10, "back to the policy's limit");
}

#[test]
fn vhost_limits_refuse_queues_and_connections_with_rabbitmq_texts() {
    let b = broker();
    put_user(&b, "bob", "pw");
    all(&b, "bob", "/");
    b.apply(MetaCommand::SetVhostLimits {
        vhost: "/".into(),
        limits: VhostLimits {
            max_connections: Some(1),
            max_queues: Some(1),
        },
    })
    .unwrap();
    declare(&b, "/", "one");
    let e = b
        .vhost("/")
        .unwrap()
        .declare_queue(QueueDeclare {
            name: "two".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PreconditionFailed);
    assert_eq!(
        e.text,
        "cannot declare queue 'two': queue limit in vhost '/' (1) is reached"
    );
    let first = connect(&b, "bob", "/", 50001).unwrap();
    assert_eq!(
        connect(&b, "bob", "/", 50002).unwrap_err(),
        "access to vhost '/' refused for user 'bob': connection limit (1) is reached"
    );
    drop(first);
    let _again = connect(&b, "bob", "/", 50003).unwrap();
    b.apply(MetaCommand::ClearVhostLimit {
        vhost: "/".into(),
        limit: Some("max-queues".into()),
    })
    .unwrap();
    declare(&b, "/", "two");
    let listed = b.vhost_limits();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].limits.max_connections, Some(1));
    assert_eq!(listed[0].limits.max_queues, None);
    b.apply(MetaCommand::ClearVhostLimit {
        vhost: "/".into(),
        limit: None,
    })
    .unwrap();
    assert!(b.vhost_limits().is_empty());
}

#[test]
fn user_limits_refuse_connections_and_channels() {
    let b = broker();
    put_user(&b, "bob", "pw");
    all(&b, "bob", "/");
    b.apply(MetaCommand::SetUserLimits {
        user: "bob".into(),
        limits: UserLimits {
            max_connections: Some(1),
            max_channels: Some(2),
        },
    })
    .unwrap();
    let c = connect(&b, "bob", "/", 50010).unwrap();
    assert_eq!(
        connect(&b, "bob", "/", 50011).unwrap_err(),
        "connection refused for user 'bob': user connection limit (1) is reached"
    );
    assert!(b.admit_channel("bob").is_ok());
    c.set_channels(2);
    assert_eq!(
        b.admit_channel("bob").unwrap_err().text,
        "number of channels opened for user 'bob' has reached the maximum allowed user limit of 2"
    );
    // A negative limit is no limit, as in RabbitMQ.
    b.apply(MetaCommand::SetUserLimits {
        user: "bob".into(),
        limits: UserLimits {
            max_connections: None,
            max_channels: Some(-1),
        },
    })
    .unwrap();
    assert!(b.admit_channel("bob").is_ok());
}

#[test]
fn deleting_a_user_closes_its_connections_and_drops_its_rights() {
    let b = broker();
    put_user(&b, "bob", "pw");
    put_user(&b, "ann", "pw");
    all(&b, "bob", "/");
    all(&b, "ann", "/");
    let bob = connect(&b, "bob", "/", 50020).unwrap();
    let ann = connect(&b, "ann", "/", 50021).unwrap();
    b.apply(MetaCommand::DeleteUser { name: "bob".into() })
        .unwrap();
    assert_eq!(
        bob.take_close_request().as_deref(),
        Some("user 'bob' is deleted")
    );
    assert!(ann.take_close_request().is_none());
    assert!(b.auth.login("bob", b"pw", None).is_err());
    assert!(b.permissions().iter().all(|p| p.user != "bob"));
}

#[test]
fn deleting_a_vhost_closes_its_connections_and_deletes_everything_in_it() {
    let b = broker();
    put_vhost(&b, "shop");
    put_user(&b, "bob", "pw");
    all(&b, "bob", "shop");
    all(&b, "bob", "/");
    b.apply(MetaCommand::SetPolicy(PolicySpec {
        vhost: "shop".into(),
        ..policy("p", ".*", table(&[("max-length", 5)]))
    }))
    .unwrap();
    declare(&b, "shop", "orders");
    let held = b.vhost("shop").unwrap();
    let q = held.queue("orders").unwrap();
    let in_shop = connect(&b, "bob", "shop", 50030).unwrap();
    let in_root = connect(&b, "bob", "/", 50031).unwrap();
    let info = b.vhost_info("shop").unwrap();
    assert_eq!(info.description, "test");
    b.apply(MetaCommand::DeleteVhost {
        name: "shop".into(),
    })
    .unwrap();
    assert_eq!(
        in_shop.take_close_request().as_deref(),
        Some("vhost 'shop' is deleted")
    );
    assert!(in_root.take_close_request().is_none());
    assert!(!b.has_vhost("shop"));
    assert!(q.is_deleted());
    assert!(b.policies().is_empty());
    assert!(b.permissions().iter().all(|p| p.vhost != "shop"));
    // A connection still holding the vhost cannot create anything in it.
    let e = held
        .declare_queue(QueueDeclare {
            name: "late".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.text, "vhost 'shop' is deleted");
    // Created again, it is empty.
    put_vhost(&b, "shop");
    assert!(b.queue_infos(Some("shop")).unwrap().is_empty());
}

#[test]
fn listings_show_queues_exchanges_and_bindings() {
    let b = broker();
    declare(&b, "/", "q1");
    b.vhost("/")
        .unwrap()
        .bind_queue("q1", "amq.topic", "a.#", FieldTable::new(), 0)
        .unwrap();
    publish(&b, "q1", 2, T0);
    let queues = b.queue_infos(Some("/")).unwrap();
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0].messages_ready, 2);
    assert_eq!(queues[0].queue_type, "classic");
    let exchanges = b.exchange_infos(None).unwrap();
    assert!(exchanges
        .iter()
        .any(|x| x.name == "amq.topic" && x.kind == "topic"));
    let bindings = b.binding_infos(Some("/")).unwrap();
    assert!(bindings
        .iter()
        .any(|x| x.source.is_empty() && x.destination == "q1" && x.routing_key == "q1"));
    assert!(bindings
        .iter()
        .any(|x| x.source == "amq.topic" && x.routing_key == "a.#"));
    assert_eq!(
        b.queue_infos(Some("nope")).unwrap_err().kind,
        ErrorKind::NotFound
    );
}

#[test]
fn commands_round_trip_through_json_and_the_store_encoding() {
    let cmds = vec![
        MetaCommand::PutVhost {
            name: "v".into(),
            description: "d".into(),
            tags: vec!["a".into()],
            default_queue_type: Some("quorum".into()),
        },
        MetaCommand::SetPolicy(policy("p", "^a", table(&[("max-length", 3)]))),
        MetaCommand::SetVhostLimits {
            vhost: "v".into(),
            limits: VhostLimits {
                max_connections: Some(3),
                max_queues: None,
            },
        },
        MetaCommand::ClearTopicPermissions {
            user: "u".into(),
            vhost: "v".into(),
            exchange: None,
        },
    ];
    for c in cmds {
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<MetaCommand>(&json).unwrap(), c);
        let bin = postcard::to_stdvec(&c).unwrap();
        assert_eq!(postcard::from_bytes::<MetaCommand>(&bin).unwrap(), c);
    }
}

#[test]
fn topic_permissions_are_stored_listed_and_cleared() {
    let b = broker();
    put_user(&b, "bob", "pw");
    b.apply(MetaCommand::SetTopicPermissions {
        user: "bob".into(),
        vhost: "/".into(),
        exchange: "amq.topic".into(),
        write: "^sensors\\.".into(),
        read: ".*".into(),
    })
    .unwrap();
    let listed = b.topic_permissions();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].write, "^sensors\\.");
    b.apply(MetaCommand::ClearTopicPermissions {
        user: "bob".into(),
        vhost: "/".into(),
        exchange: Some("amq.topic".into()),
    })
    .unwrap();
    assert!(b.topic_permissions().is_empty());
}

#[test]
fn a_vhost_whose_default_queue_type_is_quorum_declares_quorum_queues() {
    let b = broker();
    b.apply(MetaCommand::PutVhost {
        name: "q".into(),
        description: String::new(),
        tags: vec![],
        default_queue_type: Some("quorum".into()),
    })
    .unwrap();
    let v = b.vhost("q").unwrap();
    let durable = || QueueDeclare {
        name: "orders".into(),
        options: QueueOptions {
            durable: true,
            ..Default::default()
        },
        ..Default::default()
    };
    v.declare_queue(durable()).unwrap();
    // Declared again without the argument: equivalent, as in RabbitMQ 4.
    v.declare_queue(durable()).unwrap();
    let infos = b.queue_infos(Some("q")).unwrap();
    assert_eq!(infos[0].queue_type, "quorum");
    // A queue that cannot be quorum stays classic.
    v.declare_queue(QueueDeclare {
        name: "tmp".into(),
        options: QueueOptions {
            exclusive: true,
            ..Default::default()
        },
        connection: 1,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(v.queue("tmp").unwrap().info().queue_type, "classic");
    assert_eq!(
        b.apply(MetaCommand::PutVhost {
            name: "s".into(),
            description: String::new(),
            tags: vec![],
            default_queue_type: Some("stream".into()),
        })
        .unwrap_err()
        .kind,
        ErrorKind::PreconditionFailed
    );
}

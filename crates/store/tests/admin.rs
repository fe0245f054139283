//! Runtime administration on disk: what `Broker::apply` committed is what a
//! broker opened on the same directory has, including deletions; a deleted
//! vhost takes its durable queues, exchanges, bindings and adapter records
//! with it; boot definitions are seeded once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::sync::Arc;

use switchyard_core::admin::{MetaCommand, PolicySpec, UserLimits, VhostLimits, SHA256};
use switchyard_core::auth::hash_password;
use switchyard_core::exchange::ExchangeOptions;
use switchyard_core::persist::Store;
use switchyard_core::queue::QueueOptions;
use switchyard_core::timer::Clock;
use switchyard_core::vhost::{ExchangeDeclare, QueueDeclare};
use switchyard_core::{Broker, FieldTable, FieldValue};
use switchyard_store::DiskStore;

fn open(dir: &Path) -> (Arc<DiskStore>, Arc<Broker>) {
    let (store, recovered, _) = DiskStore::open(dir).unwrap();
    let broker = Broker::open(store.clone(), recovered, 0, Clock::System).unwrap();
    (store, broker)
}

fn durable_queue(b: &Broker, vhost: &str, name: &str) {
    b.vhost(vhost)
        .unwrap()
        .declare_queue(QueueDeclare {
            name: name.into(),
            options: QueueOptions {
                durable: true,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
}

fn commands() -> Vec<MetaCommand> {
    let mut definition = FieldTable::new();
    definition.insert("max-length", FieldValue::I64(2));
    vec![
        MetaCommand::PutVhost {
            name: "shop".into(),
            description: "the shop".into(),
            tags: vec!["prod".into()],
            default_queue_type: Some("classic".into()),
        },
        MetaCommand::PutUser {
            name: "bob".into(),
            password_hash: hash_password("pw", [1, 2, 3, 4]),
            hashing_algorithm: SHA256.into(),
            tags: vec!["administrator".into()],
        },
        MetaCommand::SetPermissions {
            user: "bob".into(),
            vhost: "shop".into(),
            configure: ".*".into(),
            write: "^x".into(),
            read: ".*".into(),
        },
        MetaCommand::SetTopicPermissions {
            user: "bob".into(),
            vhost: "shop".into(),
            exchange: "amq.topic".into(),
            write: ".*".into(),
            read: ".*".into(),
        },
        MetaCommand::SetPolicy(PolicySpec {
            vhost: "shop".into(),
            name: "cap".into(),
            pattern: "^orders$".into(),
            apply_to: "queues".into(),
            priority: 1,
            definition: definition.clone(),
        }),
        MetaCommand::SetOperatorPolicy(PolicySpec {
            vhost: "shop".into(),
            name: "ops".into(),
            pattern: ".*".into(),
            apply_to: "queues".into(),
            priority: 0,
            definition,
        }),
        MetaCommand::SetVhostLimits {
            vhost: "shop".into(),
            limits: VhostLimits {
                max_connections: Some(10),
                max_queues: Some(100),
            },
        },
        MetaCommand::SetUserLimits {
            user: "bob".into(),
            limits: UserLimits {
                max_connections: Some(3),
                max_channels: None,
            },
        },
    ]
}

#[test]
fn applied_commands_are_what_the_next_open_finds() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let (store, b) = open(dir.path());
        for c in commands() {
            b.apply(c).unwrap();
        }
        durable_queue(&b, "shop", "orders");
        let snapshot = (
            b.vhost_infos(),
            b.users(),
            b.permissions(),
            b.topic_permissions(),
            b.policies(),
            b.operator_policies(),
            b.vhost_limits(),
            b.user_limits(),
        );
        store.close();
        snapshot
    };
    let (_store, b) = open(dir.path());
    let after = (
        b.vhost_infos(),
        b.users(),
        b.permissions(),
        b.topic_permissions(),
        b.policies(),
        b.operator_policies(),
        b.vhost_limits(),
        b.user_limits(),
    );
    assert_eq!(before, after);
    assert!(b.auth.login("bob", b"pw", None).is_ok());
    // The recovered queue has the stored policies applied.
    let q = b.vhost("shop").unwrap().queue("orders").unwrap();
    assert_eq!(q.settings().policy.as_deref(), Some("cap"));
    assert_eq!(q.settings().operator_policy.as_deref(), Some("ops"));
    assert_eq!(q.settings().max_length, Some(2));
}

#[test]
fn deletions_survive_a_reopen_and_a_deleted_vhost_takes_everything_with_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, b) = open(dir.path());
        for c in commands() {
            b.apply(c).unwrap();
        }
        durable_queue(&b, "shop", "orders");
        let shop = b.vhost("shop").unwrap();
        shop.declare_exchange(ExchangeDeclare {
            name: "x".into(),
            kind: "direct".into(),
            passive: false,
            options: ExchangeOptions {
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::new(),
            },
        })
        .unwrap();
        shop.bind_queue("orders", "x", "k", FieldTable::new(), 0)
            .unwrap();
        // An adapter's records of the vhost (as MQTT keys them) and of another.
        store
            .save_record("mqtt.retained", "shop\0a/b", b"v")
            .unwrap();
        store.save_record("mqtt.retained", "/\0a/b", b"v").unwrap();
        b.apply(MetaCommand::DeleteVhost {
            name: "shop".into(),
        })
        .unwrap();
        b.apply(MetaCommand::DeleteUser { name: "bob".into() })
            .unwrap();
        store.close();
    }
    let (store, b) = open(dir.path());
    assert!(!b.has_vhost("shop"));
    assert!(b.vhost_infos().is_empty(), "nothing seeded in this test");
    assert!(b.users().is_empty());
    assert!(b.permissions().is_empty());
    assert!(b.topic_permissions().is_empty());
    assert!(b.policies().is_empty());
    assert!(b.operator_policies().is_empty());
    assert!(b.vhost_limits().is_empty());
    assert!(b.user_limits().is_empty());
    let retained = store.records("mqtt.retained").unwrap();
    assert_eq!(retained.len(), 1);
    assert_eq!(retained[0].0, "/\0a/b");
    // The same name again is a new, empty vhost: the old queue did not come back.
    b.apply(MetaCommand::PutVhost {
        name: "shop".into(),
        description: String::new(),
        tags: vec![],
        default_queue_type: None,
    })
    .unwrap();
    assert!(b.queue_infos(Some("shop")).unwrap().is_empty());
    assert!(b
        .exchange_infos(Some("shop"))
        .unwrap()
        .iter()
        .all(|x| x.name != "x"));
}

#[test]
fn boot_definitions_are_seeded_once() {
    let dir = tempfile::tempdir().unwrap();
    let guest = || MetaCommand::PutUser {
        name: "guest".into(),
        password_hash: hash_password("guest", [5, 5, 5, 5]),
        hashing_algorithm: SHA256.into(),
        tags: vec![],
    };
    {
        let (store, b) = open(dir.path());
        assert!(b.seed("user\0guest", guest()).unwrap());
        assert!(!b.seed("user\0guest", guest()).unwrap());
        b.apply(MetaCommand::DeleteUser {
            name: "guest".into(),
        })
        .unwrap();
        store.close();
    }
    let (_store, b) = open(dir.path());
    assert!(b.was_seeded("user\0guest"));
    assert!(
        !b.seed("user\0guest", guest()).unwrap(),
        "deleted at runtime"
    );
    assert!(b.users().is_empty());
}

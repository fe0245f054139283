//! `switchyard ctl` as a script runs it: the built binary against an in-process
//! broker's management listener, asserting on stdout, stderr and exit codes.

// clippy.toml exempts `#[test]` functions only; the helpers below are test code too.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::process::Command;

use serde_json::Value;
use switchyard_testkit::{start_broker, TestBroker};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// Runs `switchyard ctl --host 127.0.0.1 --port <management> <args>` as guest,
/// off the runtime's threads (the broker runs on them).
async fn ctl_at(addr: SocketAddr, user: &str, password: &str, args: &[&str]) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "ctl",
        "--host",
        "127.0.0.1",
        "--port",
        &addr.port().to_string(),
    ])
    .args(["--username", user, "--password", password])
    .args(args)
    .env_remove("SWITCHYARD_CTL_HOST")
    .env_remove("SWITCHYARD_CTL_PORT");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ctl(b: &TestBroker, args: &[&str]) -> Out {
    ctl_at(b.management_addr(), "guest", "guest", args).await
}

/// Runs and requires exit code 0.
async fn ok(b: &TestBroker, args: &[&str]) -> Out {
    let out = ctl(b, args).await;
    assert_eq!(
        out.code, 0,
        "ctl {args:?} failed: {}{}",
        out.stdout, out.stderr
    );
    out
}

fn find<'a>(rows: &'a Value, name: &str) -> Option<&'a Value> {
    rows.as_array().unwrap().iter().find(|r| r["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_lifecycle_publish_get_peek_purge_delete() {
    let b = start_broker().await;
    let out = ok(
        &b,
        &[
            "declare",
            "queue",
            "--name",
            "ctl q",
            "--durable",
            "true",
            "--arguments",
            r#"{"x-max-length": 10}"#,
        ],
    )
    .await;
    assert_eq!(out.stdout, "declared queue ctl q in /\n");

    // A table for people, with the queue's row.
    let table = ok(&b, &["list", "queues"]).await.stdout;
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("vhost  name"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("/      ctl q")),
        "{table}"
    );

    let published = ok(
        &b,
        &[
            "publish",
            "--routing-key",
            "ctl q",
            "--payload",
            "hello from ctl",
        ],
    )
    .await;
    assert!(
        published.stdout.ends_with(": routed\n"),
        "{}",
        published.stdout
    );
    let unrouted = ok(
        &b,
        &["publish", "--routing-key", "nowhere", "--payload", "x"],
    )
    .await;
    assert!(
        unrouted.stdout.contains("not routed"),
        "{}",
        unrouted.stdout
    );

    // JSON for scripts: the API's own objects.
    let rows = ok(&b, &["--json", "list", "queues", "--vhost", "/"])
        .await
        .json();
    let q = find(&rows, "ctl q").unwrap();
    assert_eq!(q["durable"], true);
    assert_eq!(q["arguments"]["x-max-length"], 10);
    assert_eq!(q["messages"], 1);

    // Peek leaves the message; get with ack_requeue_false takes it.
    let peeked = ok(&b, &["--json", "peek", "--queue", "ctl q"]).await.json();
    assert_eq!(peeked[0]["payload"], "hello from ctl");
    let got = ok(
        &b,
        &[
            "--json",
            "get",
            "--queue",
            "ctl q",
            "--ackmode",
            "ack_requeue_false",
        ],
    )
    .await
    .json();
    assert_eq!(got[0]["payload"], "hello from ctl");
    assert_eq!(got[0]["redelivered"], false);
    let empty = ok(&b, &["get", "--queue", "ctl q"]).await;
    assert_eq!(empty.stdout, "the queue is empty\n");

    ok(&b, &["publish", "--routing-key", "ctl q", "--payload", "a"]).await;
    ok(&b, &["publish", "--routing-key", "ctl q", "--payload", "b"]).await;
    ok(&b, &["purge", "queue", "--name", "ctl q"]).await;
    let rows = ok(&b, &["--json", "list", "queues"]).await.json();
    assert_eq!(find(&rows, "ctl q").unwrap()["messages"], 0);

    ok(&b, &["delete", "queue", "--name", "ctl q"]).await;
    let again = ctl(&b, &["delete", "queue", "--name", "ctl q"]).await;
    assert_eq!(again.code, 66, "{}", again.stderr);
    assert!(
        again
            .stderr
            .starts_with("switchyard ctl: not found (HTTP 404)"),
        "{}",
        again.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_and_bindings() {
    let b = start_broker().await;
    ok(
        &b,
        &["declare", "exchange", "--name", "events", "--type", "topic"],
    )
    .await;
    ok(&b, &["declare", "queue", "--name", "audit"]).await;
    ok(
        &b,
        &[
            "declare",
            "binding",
            "--source",
            "events",
            "--destination",
            "audit",
            "--routing-key",
            "order.*",
        ],
    )
    .await;
    let routed = ok(
        &b,
        &[
            "publish",
            "--exchange",
            "events",
            "--routing-key",
            "order.created",
            "--payload",
            "{}",
        ],
    )
    .await;
    assert!(routed.stdout.ends_with(": routed\n"), "{}", routed.stdout);

    let bindings = ok(&b, &["--json", "list", "bindings"]).await.json();
    assert!(bindings
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["source"] == "events"
            && x["destination"] == "audit"
            && x["routing_key"] == "order.*"));
    let xs = ok(&b, &["--json", "list", "exchanges"]).await.json();
    assert_eq!(find(&xs, "events").unwrap()["type"], "topic");

    ok(
        &b,
        &[
            "delete",
            "binding",
            "--source",
            "events",
            "--destination",
            "audit",
            "--routing-key",
            "order.*",
        ],
    )
    .await;
    let not_routed = ok(
        &b,
        &[
            "publish",
            "--exchange",
            "events",
            "--routing-key",
            "order.created",
            "--payload",
            "{}",
        ],
    )
    .await;
    assert!(
        not_routed.stdout.contains("not routed"),
        "{}",
        not_routed.stdout
    );
    let missing = ctl(
        &b,
        &[
            "delete",
            "binding",
            "--source",
            "events",
            "--destination",
            "audit",
            "--routing-key",
            "order.*",
        ],
    )
    .await;
    assert_eq!(missing.code, 66, "{}", missing.stderr);

    // An inequivalent redeclaration is the broker refusing the request: 65.
    let clash = ctl(
        &b,
        &[
            "declare", "exchange", "--name", "events", "--type", "fanout",
        ],
    )
    .await;
    assert_eq!(clash.code, 65, "{}{}", clash.stdout, clash.stderr);
    assert!(clash.stderr.contains("inequivalent"), "{}", clash.stderr);

    ok(&b, &["delete", "exchange", "--name", "events"]).await;
    let xs = ok(&b, &["--json", "list", "exchanges"]).await.json();
    assert!(find(&xs, "events").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_scripts_can_use() {
    let b = start_broker().await;
    let addr = b.management_addr();

    let auth = ctl_at(addr, "guest", "wrong", &["list", "queues"]).await;
    assert_eq!(auth.code, 77, "{}", auth.stderr);
    assert!(
        auth.stderr.contains("access refused (HTTP 401)"),
        "{}",
        auth.stderr
    );

    let usage = ctl(&b, &["list", "nonsense"]).await;
    assert_eq!(usage.code, 64, "{}", usage.stderr);
    let usage = ctl(&b, &["declare", "queue"]).await;
    assert_eq!(usage.code, 64, "{}", usage.stderr);
    let usage = ctl(
        &b,
        &["declare", "queue", "--name", "q", "--arguments", "[1"],
    )
    .await;
    assert_eq!(usage.code, 64, "{}", usage.stderr);

    let help = ctl(&b, &["--help"]).await;
    assert_eq!(help.code, 0);
    for line in [
        "64  bad usage",
        "66  not found",
        "69  the broker cannot be reached",
        "77  access refused",
    ] {
        assert!(
            help.stdout.contains(line),
            "--help lacks {line:?}:\n{}",
            help.stdout
        );
    }

    // A port nothing listens on: bind one, note it, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = ctl_at(closed, "guest", "guest", &["list", "queues"]).await;
    assert_eq!(refused.code, 69, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("cannot reach"),
        "{}",
        refused.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_overview() {
    let b = start_broker().await;
    let amqp_port = b.amqp_addr().port().to_string();
    assert_eq!(ok(&b, &["health-check", "alarms"]).await.stdout, "ok\n");
    assert_eq!(
        ok(&b, &["health-check", "port-listener", &amqp_port])
            .await
            .stdout,
        "ok\n"
    );
    assert_eq!(
        ok(&b, &["health-check", "protocol-listener", "amqp"])
            .await
            .stdout,
        "ok\n"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let failed = ctl(
        &b,
        &["health-check", "port-listener", &closed.port().to_string()],
    )
    .await;
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    assert!(
        failed.stdout.starts_with("failed: No active listener"),
        "{}",
        failed.stdout
    );

    let overview = ok(&b, &["show", "overview"]).await.stdout;
    assert!(
        overview.lines().any(|l| l.starts_with("queues ")),
        "{overview}"
    );
    assert!(
        overview.contains(&format!(":{amqp_port}")),
        "listeners missing: {overview}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_vhosts_permissions_policies_and_definitions() {
    let b = start_broker().await;
    ok(
        &b,
        &[
            "declare",
            "vhost",
            "--name",
            "staging",
            "--description",
            "for tests",
        ],
    )
    .await;
    ok(
        &b,
        &[
            "declare",
            "user",
            "--name",
            "ops",
            "--password",
            "s3cret",
            "--tags",
            "monitoring",
        ],
    )
    .await;
    ok(
        &b,
        &[
            "--vhost",
            "staging",
            "declare",
            "permissions",
            "--user",
            "guest",
        ],
    )
    .await;
    ok(
        &b,
        &[
            "--vhost",
            "staging",
            "declare",
            "permissions",
            "--user",
            "ops",
            "--configure",
            "^ops-",
            "--write",
            ".*",
            "--read",
            ".*",
        ],
    )
    .await;

    let users = ok(&b, &["--json", "list", "users"]).await.json();
    assert_eq!(
        find(&users, "ops").unwrap()["tags"],
        serde_json::json!(["monitoring"])
    );
    let vhosts = ok(&b, &["--json", "list", "vhosts"]).await.json();
    assert!(find(&vhosts, "staging").is_some());
    let perms = ok(&b, &["--json", "--vhost", "staging", "list", "permissions"])
        .await
        .json();
    assert_eq!(perms.as_array().unwrap().len(), 2, "{perms}");
    let ops = perms
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["user"] == "ops")
        .unwrap();
    assert_eq!(ops["configure"], "^ops-");

    // The new user's password works for the API (monitoring may read the overview).
    let as_ops = ctl_at(b.management_addr(), "ops", "s3cret", &["show", "overview"]).await;
    assert_eq!(as_ops.code, 0, "{}", as_ops.stderr);
    // ... and its permissions hold: configure is only ^ops- in staging.
    let refused = ctl_at(
        b.management_addr(),
        "ops",
        "s3cret",
        &["--vhost", "staging", "declare", "queue", "--name", "other"],
    )
    .await;
    assert_eq!(refused.code, 77, "{}", refused.stderr);

    // A policy trims a queue that already holds messages.
    ok(
        &b,
        &["--vhost", "staging", "declare", "queue", "--name", "ops-q"],
    )
    .await;
    for i in 0..5 {
        ok(
            &b,
            &[
                "--vhost",
                "staging",
                "publish",
                "--routing-key",
                "ops-q",
                "--payload",
                &i.to_string(),
            ],
        )
        .await;
    }
    ok(
        &b,
        &[
            "--vhost",
            "staging",
            "declare",
            "policy",
            "--name",
            "cap",
            "--pattern",
            "^ops-",
            "--definition",
            r#"{"max-length": 2}"#,
        ],
    )
    .await;
    let pols = ok(&b, &["--json", "list", "policies"]).await.json();
    assert_eq!(find(&pols, "cap").unwrap()["definition"]["max-length"], 2);
    let q = ok(&b, &["--json", "--vhost", "staging", "list", "queues"])
        .await
        .json();
    assert_eq!(find(&q, "ops-q").unwrap()["messages"], 2);

    // Export, delete, import: the objects come back.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defs.json");
    let file = file.to_str().unwrap();
    ok(&b, &["definitions", "export", "--file", file]).await;
    let defs: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    assert!(defs["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == "ops"));
    ok(
        &b,
        &["--vhost", "staging", "delete", "policy", "--name", "cap"],
    )
    .await;
    ok(&b, &["delete", "user", "--name", "ops"]).await;
    let gone = ctl_at(b.management_addr(), "ops", "s3cret", &["show", "overview"]).await;
    assert_eq!(gone.code, 77, "{}", gone.stderr);
    ok(&b, &["definitions", "import", "--file", file]).await;
    let users = ok(&b, &["--json", "list", "users"]).await.json();
    assert!(find(&users, "ops").is_some(), "{users}");
    let pols = ok(&b, &["--json", "list", "policies"]).await.json();
    assert!(find(&pols, "cap").is_some(), "{pols}");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    let bad = ctl(
        &b,
        &["definitions", "import", "--file", bad.to_str().unwrap()],
    )
    .await;
    assert_eq!(bad.code, 65, "{}", bad.stderr);

    ok(
        &b,
        &[
            "--vhost",
            "staging",
            "delete",
            "permissions",
            "--user",
            "ops",
        ],
    )
    .await;
    let perms = ok(&b, &["--json", "--vhost", "staging", "list", "permissions"])
        .await
        .json();
    assert_eq!(perms.as_array().unwrap().len(), 1, "{perms}");
    ok(&b, &["delete", "vhost", "--name", "staging"]).await;
    let vhosts = ok(&b, &["--json", "list", "vhosts"]).await.json();
    assert!(find(&vhosts, "staging").is_none());
}

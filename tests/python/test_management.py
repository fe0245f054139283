"""The management HTTP API with the clients people use against RabbitMQ:
pyrabbit2, Debian's rabbitmqadmin v1 (extracted by scripts/install-test-deps,
never installed), and KEDA's and Terraform's exact requests replayed with
``requests`` (MANAGEMENT.md §4): percent-encoding, the binding ``Location``,
the paged wrapper, string booleans, ``arguments: []``."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pika
import pytest
import requests
from pyrabbit2.api import Client as PyRabbit
from pyrabbit2.http import HTTPError

RABBITMQADMIN = (Path(__file__).resolve().parent / ".deps" / "rabbitmq-server" / "usr" / "bin"
                 / "rabbitmqadmin")
AUTH = ("guest", "guest")


def pyrabbit(m) -> PyRabbit:
    return PyRabbit(f"{m.host}:{m.port}", "guest", "guest")


# ---------------------------------------------------------------- pyrabbit2


def test_pyrabbit2_declares_publishes_gets_and_administers(mgmt):
    c = pyrabbit(mgmt)
    assert c.is_alive()
    assert c.get_whoami()["name"] == "guest"
    assert c.get_overview()["rabbitmq_version"]
    assert len(c.get_nodes()) == 1
    # pyrabbit2 PUTs a vhost with no body at all.
    c.create_vhost("py-vhost")
    assert "py-vhost" in c.get_vhost_names()
    c.create_user("py-user", "py-pass", tags="management")
    c.set_vhost_permissions("py-vhost", "py-user", ".*", ".*", ".*")
    assert c.get_permission("py-vhost", "py-user")["read"] == ".*"
    # create_exchange sends "arguments": [].
    c.create_exchange("py-vhost", "py-x", "direct", durable=True)
    c.create_queue("py-vhost", "py-q", durable=True)
    c.create_binding("py-vhost", "py-x", "py-q", "key")
    assert c.publish("py-vhost", "py-x", "key", "hello") is True
    assert c.get_queue_depth("py-vhost", "py-q") == 1
    msgs = c.get_messages("py-vhost", "py-q", count=1, requeue=True)
    assert msgs[0]["payload"] == "hello"
    assert any(b["source"] == "py-x" for b in c.get_queue_bindings("py-vhost", "py-q"))
    # Pattern listing walks the paged wrapper until page_count.
    names = [q["name"] for q in c.get_queues("py-vhost", pattern="^py-", regex=True)]
    assert names == ["py-q"]
    c.purge_queue("py-vhost", "py-q")
    assert c.get_queue_depth("py-vhost", "py-q") == 0
    c.delete_binding("py-vhost", "py-x", "py-q", "key")
    assert not any(b["source"] == "py-x" for b in c.get_queue_bindings("py-vhost", "py-q"))
    defs = c.get_definitions()
    assert any(q["name"] == "py-q" for q in defs["queues"])
    c.delete_queue("py-vhost", "py-q")
    c.delete_exchange("py-vhost", "py-x")
    c.delete_user("py-user")
    c.delete_vhost("py-vhost")
    assert "py-vhost" not in c.get_vhost_names()


def test_pyrabbit2_sees_401_for_a_non_admin(mgmt):
    c = pyrabbit(mgmt)
    c.create_user("watcher", "pw", tags="management")
    w = PyRabbit(f"{mgmt.host}:{mgmt.port}", "watcher", "pw")
    assert w.get_whoami()["tags"] == ["management"]
    with pytest.raises(Exception):
        w.get_users()


# ---------------------------------------------------------------- rabbitmqadmin v1


def admin(m, *args: str) -> str:
    if not RABBITMQADMIN.is_file():
        pytest.skip("rabbitmqadmin v1 not extracted: run scripts/install-test-deps")
    out = subprocess.run(
        [sys.executable, str(RABBITMQADMIN), "-H", m.host, "-P", str(m.port), "-u", "guest",
         "-p", "guest", *args],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"rabbitmqadmin {args}: {out.stdout}{out.stderr}"
    return out.stdout


def test_rabbitmqadmin_v1_round_trip(mgmt, tmp_path):
    # String booleans ("durable":"true") and columns= on every list.
    admin(mgmt, "declare", "vhost", "name=adm-v")
    admin(mgmt, "declare", "exchange", "--vhost=adm-v", "name=adm-x", "type=topic")
    admin(mgmt, "declare", "queue", "--vhost=adm-v", "name=adm-q", "durable=true",
          'arguments={"x-max-length": 5}')
    admin(mgmt, "declare", "binding", "--vhost=adm-v", "source=adm-x", "destination=adm-q",
          "routing_key=a.#")
    admin(mgmt, "publish", "--vhost=adm-v", "exchange=adm-x", "routing_key=a.b",
          "payload=from-admin")
    listed = json.loads(admin(mgmt, "-f", "raw_json", "list", "queues", "--vhost=adm-v"))
    assert [(q["name"], q["messages"]) for q in listed] == [("adm-q", 1)]
    got = admin(mgmt, "get", "--vhost=adm-v", "queue=adm-q", "ackmode=ack_requeue_false")
    assert "from-admin" in got
    assert "adm-x" in admin(mgmt, "list", "exchanges", "--vhost=adm-v")
    assert "a.#" in admin(mgmt, "list", "bindings", "--vhost=adm-v")
    assert "rabbitmq_version" in admin(mgmt, "show", "overview")
    admin(mgmt, "list", "nodes")
    admin(mgmt, "list", "users")
    admin(mgmt, "list", "vhosts")
    admin(mgmt, "list", "permissions")
    admin(mgmt, "list", "connections")
    admin(mgmt, "list", "channels")
    admin(mgmt, "list", "consumers")
    admin(mgmt, "list", "policies")
    admin(mgmt, "declare", "policy", "--vhost=adm-v", "name=adm-p", "pattern=^adm",
          'definition={"max-length": 1}', "apply-to=queues")
    assert "adm-p" in admin(mgmt, "list", "policies")
    admin(mgmt, "declare", "user", "name=adm-u", "password=pw", "tags=monitoring")
    admin(mgmt, "declare", "permission", "vhost=adm-v", "user=adm-u", "configure=.*",
          "write=.*", "read=.*")
    export = tmp_path / "defs.json"
    admin(mgmt, "export", str(export))
    defs = json.loads(export.read_text())
    assert any(q["name"] == "adm-q" and q["vhost"] == "adm-v" for q in defs["queues"])
    admin(mgmt, "delete", "queue", "--vhost=adm-v", "name=adm-q")
    admin(mgmt, "import", str(export))
    listed = json.loads(admin(mgmt, "-f", "raw_json", "list", "queues", "--vhost=adm-v"))
    assert [q["name"] for q in listed] == ["adm-q"]
    admin(mgmt, "purge", "queue", "--vhost=adm-v", "name=adm-q")
    admin(mgmt, "delete", "binding", "--vhost=adm-v", "source=adm-x", "destination=adm-q",
          "destination_type=queue",
          "properties_key=a.%23")
    admin(mgmt, "delete", "vhost", "name=adm-v")
    assert "adm-v" not in admin(mgmt, "list", "vhosts")


# ---------------------------------------------------------------- raw HTTP rules


def test_auth_errors_and_encoding_rules(mgmt):
    api = mgmt.api
    r = requests.get(f"{api}/overview")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="RabbitMQ Management"'
    r = requests.get(f"{api}/overview", auth=("guest", "wrong"))
    assert r.status_code == 401 and r.json() == {"error": "not_authorized", "reason": "Login failed"}
    r = requests.get(f"{api}/queues/%2F/missing", auth=AUTH)
    assert r.status_code == 404 and r.json()["error"]
    # rabbitmqadmin v2 encodes every non-alphanumeric byte: my-q arrives as my%2Dq.
    assert requests.put(f"{api}/queues/%2F/my%2Dq", json={}, auth=AUTH).status_code == 201
    assert requests.get(f"{api}/queues/%2F/my-q", auth=AUTH).json()["name"] == "my-q"
    # A '+' in a path segment is a plus, and %2F stays inside its segment.
    assert requests.put(f"{api}/queues/%2F/a+b%2Fc", json={}, auth=AUTH).status_code == 201
    names = [q["name"] for q in requests.get(f"{api}/queues/%2F", auth=AUTH).json()]
    assert "a+b/c" in names
    # amq.default in a path is the default exchange.
    r = requests.post(f"{api}/exchanges/%2F/amq.default/publish", auth=AUTH,
                      json={"routing_key": "my-q", "payload": "x", "payload_encoding": "string",
                            "properties": {}})
    assert r.json() == {"routed": True}
    # String booleans, arguments [] and unknown keys.
    r = requests.put(f"{api}/exchanges/%2F/sb-x", auth=AUTH,
                     json={"type": "fanout", "durable": "true", "auto_delete": "false",
                           "internal": "false", "arguments": [], "vhost": "/", "name": "sb-x"})
    assert r.status_code == 201
    x = requests.get(f"{api}/exchanges/%2F/sb-x", auth=AUTH).json()
    assert (x["durable"], x["auto_delete"], x["arguments"]) == (True, False, {})
    # Re-declaring differently is the AMQP error, as a 400 with its text.
    r = requests.put(f"{api}/exchanges/%2F/sb-x", auth=AUTH, json={"type": "topic"})
    assert r.status_code == 400 and "inequivalent arg 'type'" in r.json()["reason"]
    # Empty-body PUT, tags as "a, b" and returned as arrays.
    assert requests.put(f"{api}/vhosts/empty-body", auth=AUTH, data=b"").status_code == 201
    assert requests.put(f"{api}/users/tagged", auth=AUTH,
                        json={"password": "p", "tags": "monitoring, policymaker"}).status_code == 201
    assert requests.get(f"{api}/users/tagged", auth=AUTH).json()["tags"] == ["monitoring",
                                                                            "policymaker"]
    assert requests.put(f"{api}/users/tagged", auth=AUTH,
                        json={"password": "p", "tags": "monitoring"}).status_code == 204
    # page_size above 500 is refused.
    r = requests.get(f"{api}/queues?page=1&page_size=501", auth=AUTH)
    assert r.status_code == 400


def test_health_checks_are_json_and_never_500(mgmt):
    api = mgmt.api
    assert requests.get(f"{api}/health/checks/alarms", auth=AUTH).json() == {"status": "ok"}
    r = requests.get(f"{api}/health/checks/port-listener/{mgmt.broker.port}", auth=AUTH)
    assert r.status_code == 200 and r.json()["port"] == mgmt.broker.port
    r = requests.get(f"{api}/health/checks/port-listener/1", auth=AUTH)
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert requests.get(f"{api}/health/checks/port-listener/abc", auth=AUTH).status_code == 400
    r = requests.get(f"{api}/health/checks/protocol-listener/amqp091", auth=AUTH)
    assert r.status_code == 200
    r = requests.get(f"{api}/health/checks/protocol-listener/stomp", auth=AUTH)
    assert r.status_code == 503 and r.json()["missing"] == ["stomp"]
    assert requests.get(f"{api}/health/checks/virtual-hosts", auth=AUTH).status_code == 200


# ---------------------------------------------------------------- KEDA and Terraform


def test_keda_queue_length_and_regex_requests(mgmt):
    """KEDA's scaler (pkg/scalers/rabbitmq_scaler.go): vhost and queue QueryEscaped, the
    single-queue GET must be 200, the regex mode needs the paged wrapper."""
    api = mgmt.api
    for q in ["orders.eu", "orders.us", "other"]:
        requests.put(f"{api}/queues/%2F/{q}", json={"durable": True}, auth=AUTH)
    ch = mgmt.broker.connect().channel()
    # Confirmed: the three are in the queue before the API is asked.
    ch.confirm_delivery()
    for _ in range(3):
        ch.basic_publish("", "orders.eu", b"m")
    host = f"http://guest:guest@{mgmt.host}:{mgmt.port}"
    vhost = urllib.parse.quote_plus("/")
    r = requests.get(f"{host}/api/queues/{vhost}/{urllib.parse.quote_plus('orders.eu')}")
    assert r.status_code == 200
    info = r.json()
    assert info["messages"] == 3 and info["messages_ready"] == 3
    assert info["messages_unacknowledged"] == 0
    pattern = urllib.parse.quote_plus(r"^orders\.")
    r = requests.get(f"{host}/api/queues/{vhost}?page=1&use_regex=true&pagination=false"
                     f"&name={pattern}&page_size=100")
    assert r.status_code == 200
    body = r.json()
    assert body["page_count"] == 1
    assert sorted(i["name"] for i in body["items"]) == ["orders.eu", "orders.us"]
    assert set(body) == {"filtered_count", "item_count", "items", "page", "page_count",
                         "page_size", "total_count"}
    assert body["total_count"] == 3 and body["filtered_count"] == 2


def test_terraform_binding_location_and_reads(mgmt):
    """The Terraform provider (through rabbit-hole): POST the binding, take the
    Location's last segment (path-unescaped) as properties_key, find the binding by
    it in the list, and DELETE by it. Requests carry Connection: close."""
    api = mgmt.api
    s = requests.Session()
    s.auth = AUTH
    s.headers.update({"Content-Type": "application/json", "Connection": "close"})
    assert s.put(f"{api}/vhosts/tf", data=json.dumps(
        {"description": "terraform", "tags": "a,b", "tracing": False})).status_code == 201
    assert s.get(f"{api}/vhosts/tf").json()["tags"] == ["a", "b"]
    assert s.put(f"{api}/exchanges/tf/tf-x", data=json.dumps(
        {"type": "topic", "durable": True, "auto_delete": False, "arguments": {}})).status_code == 201
    assert s.put(f"{api}/queues/tf/tf-q", data=json.dumps(
        {"durable": True, "auto_delete": False, "arguments": {}})).status_code == 201
    for key, args in [("", {}), ("a b/c", {}), ("a b/c", {"x-match": "all"})]:
        r = s.post(f"{api}/bindings/tf/e/tf-x/q/tf-q",
                   data=json.dumps({"routing_key": key, "arguments": args}))
        assert r.status_code == 201
        location = r.headers["Location"]
        assert location.startswith("tf-q/")
        props = urllib.parse.unquote(location.rsplit("/", 1)[1])
        listed = s.get(f"{api}/bindings/tf/e/tf-x/q/tf-q").json()
        match = [b for b in listed if b["properties_key"] == props]
        assert len(match) == 1 and match[0]["routing_key"] == key
        assert match[0]["arguments"] == args
        r = s.delete(f"{api}/bindings/tf/e/tf-x/q/tf-q/{urllib.parse.quote(props, safe='')}")
        assert r.status_code == 204
        assert s.get(f"{api}/bindings/tf/e/tf-x/q/tf-q").json() == []
    # Reads Terraform makes, and 404 once gone (it then drops the resource).
    q = s.get(f"{api}/queues/tf/tf-q").json()
    assert (q["durable"], q["auto_delete"], q["arguments"]) == (True, False, {})
    assert s.put(f"{api}/policies/tf/tf-p", data=json.dumps(
        {"pattern": "^tf", "priority": 0, "apply-to": "queues",
         "definition": {"max-length": 10}})).status_code == 201
    p = s.get(f"{api}/policies/tf/tf-p").json()
    assert (p["pattern"], p["apply-to"], p["definition"]) == ("^tf", "queues", {"max-length": 10})
    assert s.put(f"{api}/vhost-limits/tf/max-connections",
                 data=json.dumps({"value": 10})).status_code == 204
    assert s.get(f"{api}/vhost-limits/tf").json() == [
        {"vhost": "tf", "value": {"max-connections": 10}}]
    assert s.delete(f"{api}/queues/tf/tf-q").status_code == 204
    assert s.get(f"{api}/queues/tf/tf-q").status_code == 404
    assert float(s.get(f"{api}/overview").json()["rabbitmq_version"].rsplit(".", 1)[0]) >= 3.7


def test_user_created_over_http_uses_amqp_and_loses_write(mgmt):
    api = mgmt.api
    requests.put(f"{api}/users/app", json={"password": "app-pw", "tags": ""}, auth=AUTH)
    requests.put(f"{api}/permissions/%2F/app", auth=AUTH,
                 json={"configure": ".*", "write": ".*", "read": ".*"})
    conn = mgmt.broker.connect(username="app", password="app-pw")
    ch = conn.channel()
    ch.queue_declare("app-q")
    ch.confirm_delivery()
    ch.basic_publish("", "app-q", b"one")
    requests.put(f"{api}/permissions/%2F/app", auth=AUTH,
                 json={"configure": ".*", "write": "^$", "read": ".*"})
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.basic_publish("", "app-q", b"two")
    assert e.value.reply_code == 403

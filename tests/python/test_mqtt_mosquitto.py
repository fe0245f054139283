"""MQTT with Debian's mosquitto_pub / mosquitto_sub (3.1, 3.1.1 and 5.0) against a
fresh Switchyard per test. scripts/install-test-deps installs mosquitto-clients."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid

import pika
import pytest

from mqtt_helpers import Client

pytestmark = pytest.mark.skipif(
    not shutil.which("mosquitto_pub"),
    reason="mosquitto-clients not installed (scripts/install-test-deps installs it)")

VERSIONS = ["mqttv31", "mqttv311", "mqttv5"]


def base(addr, version, client_id=None):
    host, port = addr
    args = ["-h", host, "-p", str(port), "-V", version, "-u", "guest", "-P", "guest"]
    if client_id:
        args += ["-i", client_id]
    return args


def start_sub(addr, version, topic, *extra, count=1, fmt="%t|%q|%r|%p"):
    """mosquitto_sub printing `count` messages in `fmt`, then exiting. Its client id
    is in ``.client_id`` (for :func:`wait_subscribed`)."""
    client_id = f"sub-{uuid.uuid4().hex[:6]}"
    p = subprocess.Popen(["mosquitto_sub", *base(addr, version, client_id),
                          "-t", topic, "-C", str(count), "-W", "15", "-F", fmt, *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.client_id = client_id
    return p


def wait_subscribed(broker, sub, qos1=False):
    """mosquitto_sub prints nothing when subscribed, so ask the broker over AMQP:
    the subscription queue exists and has the MQTT client as its consumer."""
    name = f"mqtt-subscription-{sub.client_id}{'qos1' if qos1 else 'qos0'}"
    conn = pika.BlockingConnection(broker.params())
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ch = conn.channel()
            try:
                if ch.queue_declare(name, passive=True).method.consumer_count > 0:
                    return
                ch.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass
            conn.sleep(0.02)
        raise AssertionError(f"{name} not consumed within 10 s")
    finally:
        conn.close()


def pub(addr, version, topic, message, *extra):
    r = subprocess.run(["mosquitto_pub", *base(addr, version), "-t", topic, "-m", message,
                        *extra], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("version", VERSIONS)
def test_pub_sub_every_qos(mqtt_broker, version):
    a = mqtt_broker.mqtt
    sub = start_sub(a, version, "m/#", "-q", "2", count=3)
    wait_subscribed(mqtt_broker, sub, qos1=True)
    for q in ("0", "1", "2"):
        pub(a, version, f"m/q{q}", f"hello{q}", "-q", q)
    out, err = sub.communicate(timeout=20)
    assert sub.returncode == 0, err
    assert out.splitlines() == ["m/q0|0|0|hello0", "m/q1|1|0|hello1", "m/q2|2|0|hello2"]


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_and_clear(mqtt_broker, version):
    a = mqtt_broker.mqtt
    pub(a, version, "r/status", "online", "-r", "-q", "1")
    sub = start_sub(a, version, "r/+", count=1)
    out, _ = sub.communicate(timeout=20)
    assert out.strip() == "r/status|0|1|online"
    pub(a, version, "r/status", "", "-r")
    sub = subprocess.run(["mosquitto_sub", *base(a, version), "-t", "r/+", "-C", "1",
                          "-W", "1"], capture_output=True, text=True, timeout=20)
    assert sub.stdout == "", "cleared retained message must not be delivered"


def test_v5_properties_from_mosquitto_pub(mqtt_broker):
    a = mqtt_broker.mqtt
    sub = start_sub(a, "mqttv5", "props", count=1, fmt="%t|%P|%p")
    wait_subscribed(mqtt_broker, sub)
    pub(a, "mqttv5", "props", "{}", "-q", "1",
        "-D", "publish", "user-property", "source", "mosquitto",
        "-D", "publish", "content-type", "application/json",
        "-D", "publish", "response-topic", "replies/m",
        "-D", "publish", "correlation-data", "c1")
    out, err = sub.communicate(timeout=20)
    assert out.strip() == "props|source:mosquitto|{}", (out, err)
    # The same message seen from AMQP has the mapped properties.
    conn = pika.BlockingConnection(mqtt_broker.params())
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "amq.topic", "props")
    pub(a, "mqttv5", "props", "{}", "-q", "1",
        "-D", "publish", "content-type", "application/json",
        "-D", "publish", "response-topic", "replies/m",
        "-D", "publish", "correlation-data", "c1")
    for _ in range(200):
        method, pr, body = ch.basic_get(q, auto_ack=True)
        if method:
            break
        time.sleep(0.02)
    assert method
    assert pr.content_type == "application/json"
    assert pr.correlation_id == "c1"
    assert pr.delivery_mode == 2
    rt = pr.headers["x-reply-to-topic"]
    assert rt in ("replies.m", b"replies.m")
    conn.close()


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_will_of_a_killed_mosquitto_sub(mqtt_broker, version):
    a = mqtt_broker.mqtt
    watcher = Client(a, "watcher", 5 if version == "mqttv5" else 4)
    watcher.subscribe("wills/#", 1)
    victim = subprocess.Popen(["mosquitto_sub", *base(a, version, "victim"), "-t", "x",
                               "--will-topic", "wills/victim", "--will-payload", "gone",
                               "--will-qos", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_subscribed(mqtt_broker, type("S", (), {"client_id": "victim"}))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    m = watcher.next()
    assert (m.topic, m.payload, m.qos) == ("wills/victim", b"gone", 1)


@pytest.mark.parametrize("version", VERSIONS)
def test_bad_password_is_refused(mqtt_broker, version):
    host, port = mqtt_broker.mqtt
    r = subprocess.run(["mosquitto_pub", "-h", host, "-p", str(port), "-V", version,
                        "-u", "guest", "-P", "wrong", "-t", "x", "-m", "y"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode != 0
    assert "bad user name or password" in r.stderr.lower() or "not authori" in r.stderr.lower(), \
        r.stderr


def test_persistent_session_with_mosquitto_sub(mqtt_broker):
    a = mqtt_broker.mqtt
    # -c: clean session off; first run just subscribes.
    first = subprocess.run(["mosquitto_sub", *base(a, "mqttv311", "durable-sub"), "-c",
                            "-q", "1", "-t", "d/#", "-W", "1"],
                           capture_output=True, text=True, timeout=20)
    assert first.returncode in (0, 27), first.stderr  # 27: timed out, as asked
    pub(a, "mqttv311", "d/1", "kept", "-q", "1")
    second = subprocess.run(["mosquitto_sub", *base(a, "mqttv311", "durable-sub"), "-c",
                             "-q", "1", "-t", "d/#", "-C", "1", "-W", "10"],
                            capture_output=True, text=True, timeout=20)
    assert second.stdout.strip() == "kept", second.stderr

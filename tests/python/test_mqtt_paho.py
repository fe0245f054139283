"""MQTT with paho-mqtt (3.1.1 and 5.0, over TCP and WebSocket) against a fresh
Switchyard per test, and MQTT <-> AMQP (pika) / STOMP (stomp.py) interop: the
worked examples 1-3 of INTEROP.md in both directions."""

from __future__ import annotations

import time
import uuid

import pika
import pytest
import stomp
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from helpers import Permission, User
from mqtt_helpers import Client, props

TRANSPORTS = ["tcp", "websockets"]
VERSIONS = [4, 5]


def addr_of(broker, transport):
    return broker.mqtt if transport == "tcp" else broker.mqtt_ws


def cid(prefix="c"):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_qos_0_1_2_delivered_at_min_of_publish_and_subscription(mqtt_broker, version, transport):
    a = addr_of(mqtt_broker, transport)
    sub = Client(a, cid("sub"), version, transport)
    assert sub.subscribe("t/q2", 2) == [2]
    assert sub.subscribe("t/q1", 1) == [1]
    pub = Client(a, cid("pub"), version, transport)
    for qos in (0, 1, 2):
        pub.publish("t/q2", f"m{qos}", qos=qos)
        m = sub.next()
        assert (m.topic, m.payload, m.qos) == ("t/q2", f"m{qos}".encode(), qos)
    pub.publish("t/q1", "down", qos=2)
    assert sub.next().qos == 1
    sub.nothing_within(0.2)
    sub.stop()
    pub.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_retained_set_replace_clear_with_wildcards(mqtt_broker, version, transport):
    a = addr_of(mqtt_broker, transport)
    pub = Client(a, cid("pub"), version, transport)
    pub.publish("house/hall/light", "on", qos=1, retain=True)
    pub.publish("house/hall/light", "off", qos=1, retain=True)
    for f in ("house/hall/light", "house/+/light", "house/#"):
        s = Client(a, cid("s"), version, transport)
        s.subscribe(f, 1)
        m = s.next()
        assert (m.topic, m.payload, m.retain) == ("house/hall/light", b"off", True), f
        s.stop()
    pub.publish("house/hall/light", b"", qos=1, retain=True)
    s = Client(a, cid("s"), version, transport)
    s.subscribe("house/#", 1)
    s.nothing_within(0.3)


@pytest.mark.parametrize("version", VERSIONS)
def test_will_on_crash_not_on_clean_disconnect(mqtt_broker, version):
    a = mqtt_broker.mqtt
    watcher = Client(a, cid("w"), version)
    watcher.subscribe("lwt/#", 1)
    dev = Client(a, cid("dev"), version, will=dict(topic="lwt/dev", payload="dead", qos=1))
    dev.stop()
    watcher.nothing_within(0.3)
    dev = Client(a, cid("dev"), version, will=dict(topic="lwt/dev", payload="dead", qos=1,
                                                    retain=True))
    dev.kill()
    m = watcher.next()
    assert (m.topic, m.payload, m.qos) == ("lwt/dev", b"dead", 1)
    late = Client(a, cid("late"), version)
    late.subscribe("lwt/dev", 0)
    assert late.next().retain


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", VERSIONS)
def test_persistent_session_resumes_with_queued_messages(mqtt_broker, version, transport):
    a = addr_of(mqtt_broker, transport)
    name = cid("persist")
    cp = props(PacketTypes.CONNECT, SessionExpiryInterval=300) if version == 5 else None
    s = Client(a, name, version, transport, clean=False, connect_props=cp)
    assert not s.session_present
    s.subscribe("jobs/#", 1)
    s.stop()
    pub = Client(a, cid("pub"), version, transport)
    pub.publish("jobs/1", "while away", qos=1)
    s = Client(a, name, version, transport, clean=False, connect_props=cp)
    assert s.session_present
    assert s.next().payload == b"while away"
    s.stop()
    # Clean start ends it.
    s = Client(a, name, version, transport, clean=True)
    assert not s.session_present


def test_v5_properties_subscription_ids_no_local_and_topic_alias(mqtt_broker):
    a = mqtt_broker.mqtt
    me = Client(a, cid("me"), 5)
    opts = SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True)
    assert me.subscribe("p/#", options=opts,
                        properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=9)) == [1]
    me.publish("p/own", "mine", qos=1)
    me.nothing_within(0.3)
    other = Client(a, cid("other"), 5)
    rc = other.publish("p/x", "{}", qos=1, retain=True, properties=props(
        ContentType="application/json", ResponseTopic="p/reply", CorrelationData=b"\x00\x07",
        MessageExpiryInterval=120, PayloadFormatIndicator=1,
        UserProperty=[("k", "v"), ("k", "w")]))
    assert rc == 0
    m = me.next()
    p = m.properties
    assert m.retain, "retain as published"
    assert p.SubscriptionIdentifier == [9]
    assert p.ContentType == "application/json"
    assert p.ResponseTopic == "p/reply"
    assert p.CorrelationData == b"\x00\x07"
    assert 0 < p.MessageExpiryInterval <= 120
    assert p.UserProperty == [("k", "v"), ("k", "w")]
    # Topic alias from the client: the topic is sent once.
    other.publish("p/alias", "1", properties=props(TopicAlias=1))
    other.publish("", "2", properties=props(TopicAlias=1))
    assert [me.next().topic, me.next().topic] == ["p/alias", "p/alias"]


def test_v5_connack_and_assigned_client_id(mqtt_broker_factory):
    b = mqtt_broker_factory(extra_toml="[mqtt]\nmax_keep_alive_secs = 20\n")
    c = Client(b.mqtt, "", 5, keepalive=0)
    p = c.connack_props
    assert p.AssignedClientIdentifier
    assert p.ServerKeepAlive == 20
    assert p.SharedSubscriptionAvailable == 1
    assert p.TopicAliasMaximum == 16


# paho reports 3.1.1 return code 4 as reason 0x86 too (the wire value is checked in
# tests/mqtt_protocol.rs).
@pytest.mark.parametrize("version,code", [(4, 0x86), (5, 0x86)])
def test_bad_password_is_refused(mqtt_broker, version, code):
    Client(mqtt_broker.mqtt, cid("x"), version, password="wrong", expect_rc=code)


def test_permissions_refuse_publish_and_subscribe(mqtt_broker_factory):
    b = mqtt_broker_factory(users=[User("reader", "pw")],
                            permissions=[Permission("reader", "/", ".*", "^mqtt-", ".*")])
    r5 = Client(b.mqtt, cid("r5"), 5, username="reader", password="pw")
    assert r5.publish("x", "no", qos=1) == 0x87
    b2 = mqtt_broker_factory(users=[User("writer", "pw")],
                             permissions=[Permission("writer", "/", ".*", ".*", "^none$")])
    w4 = Client(b2.mqtt, cid("w4"), 4, username="writer", password="pw")
    assert w4.subscribe("x", 0) == [0x80]


def test_shared_subscription_competes_with_an_amqp_consumer(mqtt_broker):
    a = mqtt_broker.mqtt
    m = Client(a, cid("m"), 5)
    assert m.subscribe("$share/grp/work/+", 1) == [1]
    conn = pika.BlockingConnection(mqtt_broker.params())
    ch = conn.channel()
    got_amqp = []
    ch.basic_consume("mqtt-shared-grp-work.*", lambda c, meth, pr, body: (
        got_amqp.append(body), c.basic_ack(meth.delivery_tag)))
    pub = Client(a, cid("p"), 4)
    for i in range(20):
        pub.publish("work/x", str(i), qos=1)
    got_mqtt = []
    deadline = time.monotonic() + 10
    while len(got_mqtt) + len(got_amqp) < 20 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
        while not m.messages.empty():
            got_mqtt.append(m.messages.get().payload)
    assert sorted(int(x) for x in got_mqtt + got_amqp) == list(range(20))
    assert got_mqtt and got_amqp, (len(got_mqtt), len(got_amqp))
    conn.close()


# ------------------------------------------------------- worked examples 1-3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_example_1_mqtt_to_amqp_and_stomp(mqtt_broker, transport):
    conn = pika.BlockingConnection(mqtt_broker.params())
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "amq.topic", "sensors.*.temp")
    st = stomp.Connection([mqtt_broker.stomp])
    listener = stomp.listener.TestListener(receipt="r1")
    st.set_listener("l", listener)
    st.connect("guest", "guest", wait=True)
    st.subscribe("/topic/sensors.*.temp", id="1", ack="auto", receipt="r1")
    listener.wait_on_receipt()

    c = Client(addr_of(mqtt_broker, transport), cid("sensor"), 4, transport)
    c.publish("sensors/room1/temp", "21.5", qos=1)

    method, pr, body = None, None, None
    for _ in range(200):
        method, pr, body = ch.basic_get(q, auto_ack=True)
        if method:
            break
        time.sleep(0.02)
    assert method and method.routing_key == "sensors.room1.temp"
    assert pr.delivery_mode == 2
    assert body == b"21.5"
    listener.wait_for_message()
    headers, msg = listener.get_latest_message()
    assert headers["destination"] == "/topic/sensors.room1.temp"
    assert headers["persistent"] == "true"
    assert msg in ("21.5", b"21.5")
    st.disconnect()
    conn.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_example_1_reverse_amqp_to_mqtt(mqtt_broker, version):
    c = Client(mqtt_broker.mqtt, cid("s"), version)
    c.subscribe("sensors/+/temp", 1)
    conn = pika.BlockingConnection(mqtt_broker.params())
    ch = conn.channel()
    ch.basic_publish("amq.topic", "sensors.room2.temp", b"19.0",
                     pika.BasicProperties(delivery_mode=2))
    ch.basic_publish("amq.topic", "sensors.room3.temp", b"18.0",
                     pika.BasicProperties(delivery_mode=1))
    m1, m2 = c.next(), c.next()
    assert (m1.topic, m1.qos, m1.payload) == ("sensors/room2/temp", 1, b"19.0")
    assert (m2.topic, m2.qos) == ("sensors/room3/temp", 0)
    conn.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_example_2_stomp_to_mqtt_and_back(mqtt_broker, transport):
    c = Client(addr_of(mqtt_broker, transport), cid("dev42"), 5, transport)
    c.subscribe("cmd/+", 1)
    st = stomp.Connection([mqtt_broker.stomp])
    listener = stomp.listener.TestListener(receipt="r")
    st.set_listener("l", listener)
    st.connect("guest", "guest", wait=True)
    st.send("/topic/cmd.dev42", "reboot")
    m = c.next()
    assert (m.topic, m.qos, m.payload) == ("cmd/dev42", 0, b"reboot")
    st.subscribe("/topic/status.*", id="1", ack="auto", receipt="r")
    listener.wait_on_receipt()
    c.publish("status/dev42", "up", qos=1)
    listener.wait_for_message()
    headers, body = listener.get_latest_message()
    assert headers["destination"] == "/topic/status.dev42"
    st.disconnect()


def test_example_3_amqp_to_mqtt5_response_topic_and_correlation(mqtt_broker):
    c = Client(mqtt_broker.mqtt, cid("v5"), 5)
    c.subscribe("a/b", 0)
    conn = pika.BlockingConnection(mqtt_broker.params())
    ch = conn.channel()
    ch.basic_publish("amq.topic", "a.b", b"req", pika.BasicProperties(
        correlation_id="7", headers={"x-reply-to-topic": "replies.x", "who": "pika"}))
    m = c.next()
    assert m.properties.ResponseTopic == "replies/x"
    assert m.properties.CorrelationData == b"7"
    assert ("who", "pika") in m.properties.UserProperty
    conn.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_example_3_reverse_mqtt5_request_amqp_responder(mqtt_broker, transport):
    conn = pika.BlockingConnection(mqtt_broker.params())
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "amq.topic", "rpc.echo")
    c = Client(addr_of(mqtt_broker, transport), cid("req"), 5, transport)
    c.subscribe("replies/me", 1)
    c.publish("rpc/echo", "ping", qos=1, properties=props(
        ResponseTopic="replies/me", CorrelationData=b"abc"))
    for _ in range(200):
        method, pr, body = ch.basic_get(q, auto_ack=True)
        if method:
            break
        time.sleep(0.02)
    assert method, "request did not reach the AMQP responder"
    assert pr.headers["x-reply-to-topic"] in ("replies.me", b"replies.me")
    reply_key = pr.headers["x-reply-to-topic"]
    reply_key = reply_key.decode() if isinstance(reply_key, bytes) else reply_key
    ch.basic_publish("amq.topic", reply_key, b"pong:" + body,
                     pika.BasicProperties(correlation_id=pr.correlation_id))
    m = c.next()
    assert (m.topic, m.payload) == ("replies/me", b"pong:ping")
    assert m.properties.CorrelationData == b"abc"
    conn.close()


def test_v5_qos1_beyond_receive_maximum_gets_disconnect_0x93(mqtt_broker_factory):
    """Issue 12 item 3: a QoS 1 PUBLISH counts against our Receive Maximum until
    its PUBACK is sent. paho does not apply the CONNACK's Receive Maximum (2 here)
    to its own sending, so with no inflight limit of its own it exceeds it: a
    durable queue takes the messages, so their PUBACKs wait for the fsync."""
    b = mqtt_broker_factory(extra_toml="[mqtt]\nreceive_maximum = 2\n")
    sub = Client(b.mqtt, cid("rm-sub"), 5, clean=False,
                 connect_props=props(PacketTypes.CONNECT, SessionExpiryInterval=600))
    assert sub.subscribe("rm/#", 1) == [1]
    pub = Client(b.mqtt, cid("rm-pub"), 5, max_inflight=0)
    assert pub.connack_props.ReceiveMaximum == 2
    for _ in range(500):
        pub.c.publish("rm/x", b"m", qos=1)
    rc = pub.disconnects.get(timeout=10)
    assert rc.value == 0x93, rc
    # Within the limit nothing happens: a client that waits for each PUBACK.
    ok = Client(b.mqtt, cid("rm-ok"), 5)
    for _ in range(5):
        assert ok.publish("rm/y", "fine", qos=1) == 0


@pytest.mark.parametrize("version", [4, 5])
def test_topics_with_dots_arrive_exactly_and_amqp_sees_rabbitmq_keys(mqtt_broker, version):
    """Issue 12 item 1: a dot inside a level is no reason to drop a message at
    delivery; MQTT subscribers get the publisher's topic, AMQP RabbitMQ's key."""
    conn = pika.BlockingConnection(mqtt_broker.params())
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "amq.topic", "com.acme.#")
    sub = Client(mqtt_broker.mqtt, cid("dots-s"), version)
    assert sub.subscribe("com.acme/+", 1) == [1]
    shared = Client(mqtt_broker.mqtt, cid("dots-g"), 5)
    assert shared.subscribe("$share/g/com.acme/#", 1) == [1]
    pub = Client(mqtt_broker.mqtt, cid("dots-p"), version)
    pub.publish("com.acme/x", "1", qos=1)
    m = sub.next()
    assert (m.topic, m.payload) == ("com.acme/x", b"1")
    assert shared.next().topic == "com.acme/x"
    deliver, _, body = next(ch.consume(q, auto_ack=True, inactivity_timeout=10))
    assert (deliver.routing_key, body) == ("com.acme.x", b"1")
    # From AMQP: RabbitMQ's mapping of the key, delivered although the MQTT
    # filter alone would not match `com/acme/y`.
    ch.basic_publish("amq.topic", "com.acme.y", b"2")
    assert sub.next().topic == "com/acme/y"
    conn.close()


@pytest.mark.parametrize("version", [4, 5])
def test_plus_over_a_dotted_level_as_mosquitto(mqtt_broker, version):
    """Issue 12 item 1, the issue's own example in the default (RabbitMQ) topic
    mode: `plant/v1.2/+` takes `plant/v1.2/temp.celsius` (Mosquitto does), and
    `plant/+/temp` takes `plant/v1.2/temp`; `plant/v1/+/temp` does not, although
    RabbitMQ's key `plant.v1.2.temp` matches its binding key `plant.v1.*.temp`."""
    sub = Client(mqtt_broker.mqtt, cid("plus-s"), version)
    assert sub.subscribe("plant/v1.2/+", 1) == [1]
    other = Client(mqtt_broker.mqtt, cid("plus-o"), version)
    assert other.subscribe("plant/+/temp", 1) == [1]
    assert other.subscribe("plant/v1/+/temp", 1) == [1]
    pub = Client(mqtt_broker.mqtt, cid("plus-p"), version)
    pub.publish("plant/v1.2/temp.celsius", "21.5", qos=1)
    m = sub.next()
    assert (m.topic, m.payload) == ("plant/v1.2/temp.celsius", b"21.5")
    pub.publish("plant/v1.2/temp", "22", qos=1)
    assert sub.next().topic == "plant/v1.2/temp"
    m = other.next()
    assert (m.topic, m.payload) == ("plant/v1.2/temp", b"22")
    pub.publish("plant/v1/9/temp", "23", qos=1)
    assert other.next().topic == "plant/v1/9/temp"
    assert other.nothing_within(0.3)


@pytest.mark.parametrize("version", [4, 5])
def test_max_queued_messages_keeps_the_newest_for_an_offline_client(mqtt_broker_factory, version):
    """Issue 10 item 6: `[mqtt] max_queued_messages` (Mosquitto's name) bounds what is
    held for a client beyond its in-flight window. While the persistent subscriber is
    away, 30 QoS 1 messages arrive for it with a cap of 10: the oldest are dropped (its
    queue's x-max-length with drop-head), the publisher is never refused or slowed, and
    the returning client gets exactly the newest 10, in order."""
    b = mqtt_broker_factory(extra_toml="[mqtt]\nmax_queued_messages = 10\n")
    sub_id = cid("mq-sub")
    extra = {} if version == 4 else {
        "connect_props": props(PacketTypes.CONNECT, SessionExpiryInterval=600)}
    sub = Client(b.mqtt, sub_id, version, clean=False, **extra)
    assert sub.subscribe("mq/t", 1) == [1]
    sub.stop()
    pub = Client(b.mqtt, cid("mq-pub"), version)
    for i in range(30):
        assert pub.publish("mq/t", f"m{i}", qos=1) in (0, None)
    pub.stop()
    ch = pika.BlockingConnection(b.params()).channel()
    q = ch.queue_declare(f"mqtt-subscription-{sub_id}qos1", passive=True)
    assert q.method.message_count == 10
    ch.connection.close()
    back = Client(b.mqtt, sub_id, version, clean=False, **extra)
    assert back.session_present
    got = [back.next().payload.decode() for _ in range(10)]
    assert got == [f"m{i}" for i in range(20, 30)]
    assert back.nothing_within(0.5)
    back.stop()

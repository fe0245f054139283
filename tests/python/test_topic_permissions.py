"""Topic permissions (RabbitMQ's `set_topic_permissions`) across AMQP (pika), MQTT 3.1.1
and 5 (paho-mqtt) and STOMP (stomp.py): a write regex over published routing keys, a
read regex over binding keys, {username} and {client_id} expanded, only on topic
exchanges, and RabbitMQ's refusal texts."""

import pika
import pytest
import stomp
from pika.exceptions import ChannelClosedByBroker

from helpers import Permission, User, drain_events, quiet_period, toml_str, uniq
from mqtt_helpers import Client
import stomp_helpers

REFUSED = ("ACCESS_REFUSED - {access} access to topic '{key}' in exchange '{x}' in vhost '/' "
           "refused for user '{user}'")


def topic_permission(user, exchange, write, read):
    return "\n".join([
        "[[topic_permissions]]",
        f"user = {toml_str(user)}",
        'vhost = "/"',
        f"exchange = {toml_str(exchange)}",
        f"write = {toml_str(write)}",
        f"read = {toml_str(read)}",
        "",
    ])


@pytest.fixture
def topic_broker(mqtt_broker_factory):
    """`dev` may publish only below `dev.` and bind to `dev.` or `public.` on amq.topic;
    `device` (MQTT) only below its client id; a rule on amq.direct (not a topic
    exchange) must change nothing."""
    extra = (topic_permission("dev", "amq.topic", r"^{username}\.", r"^({username}|public)\.")
             + topic_permission("dev", "amq.direct", "^never$", "^never$")
             + topic_permission("device", "amq.topic", r"^{client_id}\.", r"^{client_id}\."))
    return mqtt_broker_factory(
        users=[User("dev", "pw"), User("device", "pw")],
        permissions=[Permission("dev"), Permission("device")],
        extra_toml=extra)


def amqp_channel(broker, user="dev"):
    conn = pika.BlockingConnection(broker.params(username=user, password="pw"))
    return conn, conn.channel()


def test_amqp_publish_is_checked_against_the_write_regex(topic_broker):
    gconn = pika.BlockingConnection(topic_broker.params())
    gch = gconn.channel()
    q = gch.queue_declare("", exclusive=True).method.queue
    gch.queue_bind(q, "amq.topic", "#")

    conn, ch = amqp_channel(topic_broker)
    ch.confirm_delivery()
    ch.basic_publish("amq.topic", "dev.temp", b"ok")
    # amq.direct has a rule too, but topic permissions apply to topic exchanges only.
    ch.basic_publish("amq.direct", "anything", b"ok")
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.basic_publish("amq.topic", "other.temp", b"no")
    assert ei.value.reply_code == 403
    assert ei.value.reply_text == REFUSED.format(access="write", key="other.temp",
                                                 x="amq.topic", user="dev")
    method, _, body = gch.basic_get(q, auto_ack=True)
    assert body == b"ok" and method.routing_key == "dev.temp"
    assert gch.basic_get(q, auto_ack=True) == (None, None, None)
    conn.close()
    gconn.close()


def test_amqp_bind_is_checked_against_the_read_regex(topic_broker):
    conn, ch = amqp_channel(topic_broker)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "amq.topic", "public.#")
    ch.queue_bind(q, "amq.topic", "dev.*")
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.queue_bind(q, "amq.topic", "#")
    assert ei.value.reply_code == 403
    assert ei.value.reply_text == REFUSED.format(access="read", key="#", x="amq.topic",
                                                 user="dev")
    ch = conn.channel()
    dst = uniq("dst")
    ch.exchange_declare(dst, "fanout", auto_delete=True)
    ch.exchange_bind(dst, "amq.topic", "public.x")
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.exchange_bind(dst, "amq.topic", "secret.x")
    assert ei.value.reply_code == 403
    assert "read access to topic 'secret.x' in exchange 'amq.topic'" in ei.value.reply_text
    conn.close()


def test_mqtt_v311_publish_outside_the_regex_disconnects(topic_broker):
    watcher = Client(topic_broker.mqtt, "watcher", 4)
    assert watcher.subscribe("#", 1) == [1]
    c = Client(topic_broker.mqtt, uniq("c"), 4, username="dev", password="pw")
    c.publish("dev/ok", "1", qos=1)
    assert watcher.next().topic == "dev/ok"
    c.c.publish("other/x", "2", qos=1)
    assert c.disconnects.get(timeout=10) is not None
    assert watcher.nothing_within(0.3)
    watcher.stop()


def test_mqtt_v311_subscribe_outside_the_regex_gets_0x80(topic_broker):
    c = Client(topic_broker.mqtt, uniq("c"), 4, username="dev", password="pw")
    assert c.subscribe("other/#", 1) == [0x80]
    assert c.subscribe("public/+", 1) == [1]
    assert c.subscribe("dev/#", 0) == [0]
    c.stop()


def test_mqtt_v5_reason_codes_and_client_id_expansion(topic_broker):
    c = Client(topic_broker.mqtt, "sensor-7", 5, username="device", password="pw")
    assert c.subscribe("sensor-7/#", 1) == [1]
    assert c.subscribe("sensor-8/#", 1) == [0x87]
    assert c.publish("sensor-7/t", "ok", qos=1) == 0x00
    assert c.next().topic == "sensor-7/t"
    assert c.publish("sensor-8/t", "no", qos=1) == 0x87
    # The refusal does not end the session: the next allowed PUBLISH goes through.
    assert c.publish("sensor-7/u", "ok", qos=1) == 0x00
    assert c.next().topic == "sensor-7/u"
    c.stop()
    # Another client id of the same user gets its own expansion.
    d = Client(topic_broker.mqtt, "sensor-8", 5, username="device", password="pw")
    assert d.subscribe("sensor-8/#", 1) == [1]
    assert d.publish("sensor-8/t", "ok", qos=1) == 0x00
    assert d.next().topic == "sensor-8/t"
    assert d.publish("sensor-7/t", "no", qos=1) == 0x87
    d.stop()


def test_stomp_send_and_subscribe_get_an_error_with_the_text(topic_broker):
    conn, listener = stomp_helpers.connect(topic_broker, login="dev", passcode="pw")
    stomp_helpers.subscribe(conn, listener, "/topic/dev.#", "s1")
    conn.send("/topic/dev.a", "ok")
    assert listener.message().headers["destination"] == "/topic/dev.a"
    conn.send("/topic/other.a", "no")
    err = listener.error()
    assert err.headers["message"] == "ACCESS_REFUSED"
    assert REFUSED.format(access="write", key="other.a", x="amq.topic",
                          user="dev") in err.body
    listener.wait_disconnected()

    conn, listener = stomp_helpers.connect(topic_broker, login="dev", passcode="pw")
    conn.subscribe("/topic/other.#", "s2", ack="auto")
    err = listener.error()
    assert REFUSED.format(access="read", key="other.#", x="amq.topic",
                          user="dev") in err.body
    listener.wait_disconnected()


@pytest.mark.parametrize("version,code", [(5, 0x87), (4, 0x87)])
def test_mqtt_will_topic_outside_the_regex_refuses_connect(topic_broker, version, code):
    # paho reports the 3.1.1 return code 5 (not authorised) as 0x87 too.
    Client(topic_broker.mqtt, "sensor-9", version, username="device", password="pw",
           will={"topic": "sensor-1/status", "payload": "gone"}, expect_rc=code)
    ok = Client(topic_broker.mqtt, "sensor-9", version, username="device", password="pw",
                will={"topic": "sensor-9/status", "payload": "gone"})
    ok.stop()


def test_users_without_topic_permissions_are_not_restricted(topic_broker):
    c = Client(topic_broker.mqtt, uniq("g"), 5)
    assert c.subscribe("anything/#", 1) == [1]
    assert c.publish("anything/x", "ok", qos=1) == 0x00
    assert c.next().topic == "anything/x"
    c.stop()


# ------------------------------------------------------------- [limits] connection rate
# One connection a second from 127.0.0.1 (a burst of one): the second connection,
# opened right after the first, is refused with the protocol's own error naming the
# limit. (The refill timing itself is unit-tested with a given clock in
# crates/core/src/ratelimit.rs; here the second connect must come within 1 s.)

RATE_TOML = "[limits]\nconnection_rate_per_ip = 1\n"
RATE_TEXT = "connection rate limit (1 per second from 127.0.0.1) is reached"


def test_connection_rate_per_ip_amqp(mqtt_broker_factory):
    b = mqtt_broker_factory(extra_toml=RATE_TOML)
    first = pika.BlockingConnection(b.params())
    # pika reports a close during connection.open as ProbableAccessDeniedError.
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as ei:
        pika.BlockingConnection(b.params())
    assert "(530)" in str(ei.value) and RATE_TEXT in str(ei.value)
    assert first.is_open
    first.close()


# paho reports the 3.1.1 return code 5 (not authorised) as reason 0x87.
@pytest.mark.parametrize("version,code", [(5, 0x9F), (4, 0x87)])
def test_connection_rate_per_ip_mqtt(mqtt_broker_factory, version, code):
    b = mqtt_broker_factory(extra_toml=RATE_TOML)
    first = Client(b.mqtt, uniq("a"), version)
    Client(b.mqtt, uniq("b"), version, expect_rc=code)
    first.stop()


def test_connection_rate_per_ip_stomp(mqtt_broker_factory):
    b = mqtt_broker_factory(extra_toml=RATE_TOML)
    first, _ = stomp_helpers.connect(b)
    conn = stomp.Connection12([b.stomp])
    listener = stomp_helpers.Collector()
    conn.set_listener("c", listener)
    conn.connect("guest", "guest", wait=False)
    err = listener.error()
    assert RATE_TEXT in err.body
    first.disconnect()


# ------------------------------------------------------- [limits] max_unacked_per_connection


def test_unacked_deliveries_are_capped_per_connection(mqtt_broker_factory):
    """Two channels consuming two queues without prefetch: together they get no more
    than `max_unacked_per_connection` unacknowledged deliveries; each ack lets one more
    through, on whichever channel has messages waiting."""
    b = mqtt_broker_factory(extra_toml="[limits]\nmax_unacked_per_connection = 3\n")
    conn = pika.BlockingConnection(b.params())
    pub = conn.channel()
    queues = [uniq("capq"), uniq("capq")]
    for q in queues:
        pub.queue_declare(q, auto_delete=True)
        for i in range(5):
            pub.basic_publish("", q, str(i).encode())
    got = []
    channels = []
    for q in queues:
        ch = conn.channel()
        ch.basic_consume(q, lambda c, m, p, body: got.append((c, m.delivery_tag)))
        channels.append(ch)
    assert drain_events([conn], lambda: len(got) >= 3)
    quiet_period([conn], 0.5)
    assert len(got) == 3
    ch, tag = got.pop(0)
    ch.basic_ack(tag)
    assert drain_events([conn], lambda: len(got) >= 3)
    quiet_period([conn], 0.5)
    assert len(got) == 3
    delivered = 4
    while delivered < 10:
        ch, tag = got.pop(0)
        ch.basic_ack(tag)
        assert drain_events([conn], lambda: len(got) == 3), f"after {delivered} deliveries"
        delivered += 1
    for ch, tag in got:
        ch.basic_ack(tag)
    conn.close()

"""kombu (over the py-amqp transport) and py-amqp used directly."""

import socket
import time

import amqp
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from helpers import assert_closed


def _kombu(broker, **transport_options):
    return Connection(broker.amqp_url, connect_timeout=5,
                      transport_options={"max_retries": 1, **transport_options})


def _drain_until(conn, cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for messages")
        try:
            conn.drain_events(timeout=min(left, 0.5))
        except socket.timeout:
            pass


def test_kombu_producer_consumer_durable_ack(broker, names):
    exchange = Exchange(names("kx"), type="direct", durable=True)
    queue = Queue(names("kq"), exchange=exchange, routing_key="orders", durable=True)
    # confirm_publish: publish() waits for basic.ack, so the passive declare below sees
    # all three (RabbitMQ's declare-ok counts can lag behind unconfirmed publishes)
    with _kombu(broker, confirm_publish=True) as conn:
        assert conn.transport_cls in ("amqp", "pyamqp") or conn.transport.driver_type == "amqp"
        producer = Producer(conn.default_channel)
        for i in range(3):
            producer.publish({"order": i, "item": "widget"}, exchange=exchange,
                             routing_key="orders", declare=[queue], serializer="json",
                             delivery_mode=2, retry=False)

        name, message_count, consumer_count = queue.bind(conn.default_channel).queue_declare(
            passive=True)
        assert (name, message_count, consumer_count) == (queue.name, 3, 0)

        received = []

        def on_message(body, message):
            received.append((body, message))
            message.ack()

        with Consumer(conn, queues=[queue], callbacks=[on_message], accept=["json"]):
            _drain_until(conn, lambda: len(received) == 3)
        assert [b for b, _ in received] == [{"order": i, "item": "widget"} for i in range(3)]
        msg = received[0][1]
        assert msg.content_type == "application/json"
        assert msg.properties["delivery_mode"] == 2
        assert msg.delivery_info["exchange"] == exchange.name
        assert msg.delivery_info["routing_key"] == "orders"
        assert msg.delivery_info["redelivered"] is False
        assert queue.bind(conn.default_channel).queue_declare(passive=True)[1] == 0


def test_kombu_requeue_and_reject(broker, names):
    queue = Queue(names("kq"), durable=False, auto_delete=False)
    with _kombu(broker) as conn:
        producer = conn.Producer()
        producer.publish("first", routing_key=queue.name, declare=[queue], serializer="json",
                         retry=False)
        producer.publish("second", routing_key=queue.name, declare=[queue], serializer="json",
                         retry=False)
        seen = []

        def on_message(body, message):
            seen.append((body, message.delivery_info["redelivered"]))
            if len(seen) == 1:
                message.requeue()  # basic.reject(requeue=True)
            elif body == "second":
                message.reject()  # dropped
            else:
                message.ack()

        with Consumer(conn, queues=[queue], callbacks=[on_message], accept=["json"]):
            _drain_until(conn, lambda: len(seen) == 3)
        assert sorted(seen) == sorted([("first", False), ("first", True), ("second", False)])
        assert queue.bind(conn.default_channel).queue_declare(passive=True)[1] == 0


def test_kombu_simple_queue(broker, names):
    name = names("simple")
    with _kombu(broker) as conn:
        sq = conn.SimpleQueue(name)
        sq.put({"n": 1})
        sq.put({"n": 2})
        m1 = sq.get(block=True, timeout=5)
        assert m1.payload == {"n": 1}
        m1.ack()
        m2 = sq.get(block=True, timeout=5)
        assert m2.payload == {"n": 2}
        m2.ack()
        with pytest.raises(sq.Empty):
            sq.get(block=True, timeout=0.3)
        assert sq.qsize() == 0
        sq.close()


def test_kombu_fanout_topic(broker, names):
    fan = Exchange(names("kfan"), type="fanout", auto_delete=True)
    topic = Exchange(names("ktopic"), type="topic", auto_delete=True)
    q1 = Queue(names("q1"), exchange=fan, exclusive=True)
    q2 = Queue(names("q2"), exchange=fan, exclusive=True)
    q3 = Queue(names("q3"), exchange=topic, routing_key="a.*", exclusive=True)
    with _kombu(broker) as conn:
        got = {}

        def cb(body, message):
            got.setdefault(message.delivery_info["consumer_tag"], []).append(body)
            message.ack()

        consumer = Consumer(conn, queues=[q1, q2, q3], callbacks=[cb], accept=["json"])
        with consumer:
            p = conn.Producer()
            p.publish("broadcast", exchange=fan, routing_key="", serializer="json", retry=False)
            p.publish("a.b", exchange=topic, routing_key="a.b", serializer="json", retry=False)
            p.publish("x.b", exchange=topic, routing_key="x.b", serializer="json", retry=False)
            _drain_until(conn, lambda: sum(len(v) for v in got.values()) == 3)
        assert sorted(b for v in got.values() for b in v) == ["a.b", "broadcast", "broadcast"]


# ----------------------------------------------------------------------- py-amqp direct


def _amqp(broker):
    conn = amqp.Connection(f"{broker.host}:{broker.port}", userid=broker.username,
                           password=broker.password, virtual_host=broker.vhost,
                           connect_timeout=5, read_timeout=5, write_timeout=5)
    conn.connect()
    return conn


def test_py_amqp_server_generated_consumer_tag(broker, names):
    conn = _amqp(broker)
    try:
        ch = conn.channel()
        q = names("q")
        ch.queue_declare(q)
        tag = ch.basic_consume(q, callback=lambda m: None)  # consumer_tag='' -> server picks
        assert tag.startswith("amq.ctag-")
        ch.basic_cancel(tag)
        ch.queue_delete(q)
    finally:
        conn.close()


def test_py_amqp_publish_get_ack(broker, names):
    conn = _amqp(broker)
    try:
        ch = conn.channel()
        q = names("q")
        ch.queue_declare(q, durable=True, auto_delete=False)
        ch.confirm_select()
        for i in range(2):
            ch.basic_publish(amqp.Message(f"m{i}", content_type="text/plain",
                                          application_headers={"i": i}, delivery_mode=2),
                             exchange="", routing_key=q, confirm_timeout=5)
        msg = ch.basic_get(q, no_ack=False)
        assert msg.body == b"m0" or msg.body == "m0"
        assert msg.delivery_info["message_count"] == 1
        assert msg.application_headers == {"i": 0}
        assert msg.properties["delivery_mode"] == 2
        ch.basic_ack(msg.delivery_tag)
        msg2 = ch.basic_get(q, no_ack=True)
        assert msg2.delivery_info["message_count"] == 0
        assert ch.basic_get(q) is None
        ch.queue_delete(q)
    finally:
        conn.close()


def test_py_amqp_reused_consumer_tag_530(broker, names):
    conn = _amqp(broker)
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q, exclusive=True)
    ch.basic_consume(q, consumer_tag="dup", callback=lambda m: None)
    with pytest.raises(amqp.exceptions.NotAllowed) as ei:
        ch.basic_consume(q, consumer_tag="dup", callback=lambda m: None)
        conn.drain_events(timeout=5)
    assert_closed(ei.value, 530, "NOT_ALLOWED - attempt to reuse consumer tag 'dup'",
                  kind="connection")
    conn.collect()


def test_py_amqp_channel_error_then_new_channel(broker, names):
    conn = _amqp(broker)
    try:
        ch = conn.channel()
        q = names("missing")
        with pytest.raises(amqp.exceptions.NotFound) as ei:
            ch.queue_declare(q, passive=True)
        assert_closed(ei.value, 404, f"NOT_FOUND - no queue '{q}' in vhost '{broker.vhost}'")
        ch2 = conn.channel()
        name, _, _ = ch2.queue_declare("", exclusive=True)
        assert name.startswith("amq.gen-")
    finally:
        conn.close()

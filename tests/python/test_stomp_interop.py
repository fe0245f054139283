"""STOMP (stomp.py) <-> AMQP (pika): the header mapping of INTEROP.md and worked
examples 1 and 4."""

from __future__ import annotations

import pika

from stomp_helpers import connect, subscribe


def test_send_headers_become_amqp_properties(stomp_broker):
    ch = stomp_broker.channel()
    ch.queue_declare("props")
    conn, _ = connect(stomp_broker)
    conn.send("/queue/props", '{"id": 1}', headers={
        "content-type": "application/json", "persistent": "true", "priority": "3",
        "correlation-id": "c1", "reply-to": "/queue/answers", "expiration": "60000",
        "amqp-message-id": "m1", "type": "order", "app-id": "web", "x-custom": "yes",
    }, receipt="r")
    deadline_method = None
    for _ in range(100):
        method, props, body = ch.basic_get("props", auto_ack=True)
        if method:
            deadline_method = method
            break
        ch.connection.sleep(0.05)
    assert deadline_method, "message did not arrive"
    assert body == b'{"id": 1}'
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    assert props.priority == 3
    assert props.correlation_id == "c1"
    assert props.reply_to == "/queue/answers"
    assert props.expiration == "60000"
    assert props.message_id == "m1"
    assert props.type == "order"
    assert props.app_id == "web"
    assert props.headers["x-custom"] in ("yes", b"yes")


def test_amqp_properties_become_message_headers(stomp_broker):
    conn, lst = connect(stomp_broker)
    subscribe(conn, lst, "/queue/from-amqp", "s")
    ch = stomp_broker.channel()
    ch.basic_publish("", "from-amqp", b"hi", pika.BasicProperties(
        content_type="text/plain", delivery_mode=2, correlation_id="c2",
        reply_to="amq.gen-xyz", message_id="m2", headers={"x-origin": "pika", "n": 5}))
    m = lst.message()
    assert m.body == "hi"
    assert m.headers["destination"] == "/queue/from-amqp"
    assert m.headers["content-type"] == "text/plain"
    assert m.headers["persistent"] == "true"
    assert m.headers["correlation-id"] == "c2"
    assert m.headers["reply-to"] == "/reply-queue/amq.gen-xyz"
    assert m.headers["amqp-message-id"] == "m2"
    assert m.headers["x-origin"] == "pika"
    assert m.headers["n"] == "5"


def test_worked_example_1_amqp_and_stomp_halves(stomp_broker):
    """A persistent publish to amq.topic `sensors.room1.temp` reaches an AMQP queue
    bound with `sensors.*.temp` and a STOMP subscriber of /topic/sensors.*.temp.
    (The MQTT publisher's part is in the MQTT cross tests.)"""
    ch = stomp_broker.channel()
    ch.queue_declare("temps")
    ch.queue_bind("temps", "amq.topic", "sensors.*.temp")
    conn, lst = connect(stomp_broker)
    subscribe(conn, lst, "/topic/sensors.*.temp", "t")
    ch.basic_publish("amq.topic", "sensors.room1.temp", b"21.5",
                     pika.BasicProperties(delivery_mode=2))
    m = lst.message()
    assert m.headers["destination"] == "/topic/sensors.room1.temp"
    assert m.headers["persistent"] == "true"
    method, props, body = ch.basic_get("temps", auto_ack=True)
    assert body == b"21.5" and props.delivery_mode == 2


def test_worked_example_4_rpc_through_a_temp_queue(stomp_broker):
    ch = stomp_broker.channel()
    ch.queue_declare("rpc", durable=True)
    conn, lst = connect(stomp_broker)
    conn.send("/queue/rpc", "ping", headers={"reply-to": "/temp-queue/r1",
                                             "correlation-id": "7"})
    got = None
    for _ in range(100):
        method, props, body = ch.basic_get("rpc", auto_ack=True)
        if method:
            got = props
            break
        ch.connection.sleep(0.05)
    assert got is not None
    assert got.reply_to.startswith("amq.gen-")
    ch.basic_publish("", got.reply_to, b"pong",
                     pika.BasicProperties(correlation_id=got.correlation_id))
    m = lst.message()
    assert m.body == "pong"
    assert m.headers["subscription"] == "/temp-queue/r1"
    assert m.headers["correlation-id"] == "7"

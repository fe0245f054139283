"""queue.declare/bind/unbind/purge/delete as RabbitMQ does them."""

import decimal
import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from helpers import (assert_closed, confirmed_channel, drain_events, expect_channel_error,
                     get_all)


def _wait_queue_gone(broker, q, timeout=5.0):
    """Passive-declare until 404 (deletion may follow the triggering reply)."""
    conn = broker.connect()
    deadline = time.monotonic() + timeout
    while True:
        ch = conn.channel()
        try:
            ch.queue_declare(q, passive=True)
        except ChannelClosedByBroker as e:
            assert_closed(e, 404, f"NOT_FOUND - no queue '{q}' in vhost '{broker.vhost}'")
            return
        ch.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"queue {q} still exists after {timeout}s")
        conn.process_data_events(time_limit=0.05)


def test_server_named_queue(broker):
    ch = broker.connect().channel()
    ok = ch.queue_declare("")
    name = ok.method.queue
    assert name.startswith("amq.gen-")
    assert len(name) > len("amq.gen-")
    assert ok.method.message_count == 0 and ok.method.consumer_count == 0
    second = ch.queue_declare("", exclusive=True).method.queue
    assert second.startswith("amq.gen-") and second != name
    ch.basic_publish("", name, b"hi")
    ch.confirm_delivery()
    ch.basic_publish("", name, b"there")
    assert get_all(ch, name) == [b"hi", b"there"]
    ch.queue_delete(name)


def test_queue_declare_returns_counts_and_passive(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    q = names("q")
    ok = ch.queue_declare(q)
    assert ok.method.queue == q
    assert (ok.method.message_count, ok.method.consumer_count) == (0, 0)
    for i in range(3):
        pub.basic_publish("", q, str(i).encode())
    ok = ch.queue_declare(q, passive=True)
    assert (ok.method.message_count, ok.method.consumer_count) == (3, 0)
    # a non-passive redeclare reports the same counts
    ok = ch.queue_declare(q)
    assert (ok.method.message_count, ok.method.consumer_count) == (3, 0)

    # one consumer holding one unacked message: message_count counts only ready ones
    cconn = broker.connect()
    cch = cconn.channel()
    cch.basic_qos(prefetch_count=1)
    got = []
    cch.basic_consume(q, lambda c, m, p, b: got.append(m))
    assert drain_events([cconn], lambda: got)
    ok = ch.queue_declare(q, passive=True)
    assert (ok.method.message_count, ok.method.consumer_count) == (2, 1)


def test_queue_declare_passive_missing(broker, names):
    ch = broker.connect().channel()
    q = names("missing")
    expect_channel_error(lambda: ch.queue_declare(q, passive=True), 404,
                         f"NOT_FOUND - no queue '{q}' in vhost '{broker.vhost}'")


def test_exclusive_queue_locked_for_other_connections(broker, names):
    owner = broker.connect()
    och = owner.channel()
    q = names("excl")
    och.queue_declare(q, exclusive=True)
    och.basic_publish("", q, b"mine")

    other = broker.connect()
    locked = (f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in "
              f"vhost '{broker.vhost}'")
    ops = {
        "declare": lambda ch: ch.queue_declare(q, exclusive=True),
        "declare-nonexclusive": lambda ch: ch.queue_declare(q),
        "passive": lambda ch: ch.queue_declare(q, passive=True),
        "consume": lambda ch: ch.basic_consume(q, lambda *a: None),
        "get": lambda ch: ch.basic_get(q),
        "purge": lambda ch: ch.queue_purge(q),
        "delete": lambda ch: ch.queue_delete(q),
        "bind": lambda ch: ch.queue_bind(q, "amq.fanout"),
    }
    for name, op in ops.items():
        ch = other.channel()
        with pytest.raises(ChannelClosedByBroker) as ei:
            op(ch)
        assert_closed(ei.value, 405, locked)

    # the owner is unaffected; the queue goes away with the owner's connection
    assert och.queue_declare(q, passive=True).method.message_count == 1
    owner.close()
    _wait_queue_gone(broker, q)


def test_exclusive_queue_shared_by_channels_of_one_connection(broker, names):
    conn = broker.connect()
    q = names("excl")
    conn.channel().queue_declare(q, exclusive=True)
    ch2 = conn.channel()
    ch2.confirm_delivery()
    ch2.basic_publish("", q, b"x")
    assert get_all(conn.channel(), q) == [b"x"]


def test_exclusive_queue_deleted_when_channel_closes_stays(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("excl")
    ch.queue_declare(q, exclusive=True)
    ch.close()  # exclusivity is per connection, not per channel
    conn.channel().queue_declare(q, passive=True)


def test_auto_delete_queue_deleted_after_last_consumer_cancels(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("autodel")
    ch.queue_declare(q, auto_delete=True)
    ch.queue_declare(q, passive=True)  # no consumer yet: stays
    t1 = ch.basic_consume(q, lambda *a: None)
    t2 = ch.basic_consume(q, lambda *a: None)
    ch.basic_cancel(t1)
    ok = conn.channel().queue_declare(q, passive=True)  # one consumer left
    assert ok.method.consumer_count == 1
    ch.basic_cancel(t2)
    _wait_queue_gone(broker, q)


def test_auto_delete_queue_deleted_when_consumer_connection_closes(broker, names):
    ch = broker.connect().channel()
    q = names("autodel")
    ch.queue_declare(q, auto_delete=True)
    c2 = broker.connect()
    c2.channel().basic_consume(q, lambda *a: None)
    c2.close()
    _wait_queue_gone(broker, q)


@pytest.mark.parametrize("first,second,arg,detail", [
    (dict(durable=True), dict(durable=False), "durable", "received 'false' but current is 'true'"),
    (dict(), dict(auto_delete=True), "auto_delete", "received 'true' but current is 'false'"),
    (dict(arguments={"x-message-ttl": 1000}), dict(arguments={"x-message-ttl": 2000}),
     "x-message-ttl", "received '2000' but current is '1000'"),
    (dict(), dict(arguments={"x-max-length": 10}),
     "x-max-length", "received the value '10' of type 'signedint' but current is none"),
    (dict(arguments={"x-max-length": 10}), dict(),
     "x-max-length", "received none but current is the value '10' of type 'signedint'"),
])
def test_queue_declare_equivalence(broker, names, first, second, arg, detail):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q, **first)
    expect_channel_error(lambda: ch.queue_declare(q, **second), 406,
                         f"PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{q}' in "
                         f"vhost '{broker.vhost}': {detail}")
    conn.channel().queue_declare(q, passive=True)


def test_queue_declare_amq_prefix_refused(broker, names):
    ch = broker.connect().channel()
    q = "amq." + names("q")
    expect_channel_error(lambda: ch.queue_declare(q), 403,
                         f"ACCESS_REFUSED - queue name '{q}' contains reserved prefix 'amq.*'")


def test_queue_purge_returns_count(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    q = names("q")
    ch.queue_declare(q)
    for i in range(5):
        pub.basic_publish("", q, b"m")
    assert ch.queue_purge(q).method.message_count == 5
    assert ch.queue_purge(q).method.message_count == 0
    assert get_all(ch, q) == []


def test_queue_purge_keeps_unacked(broker, names):
    pub = confirmed_channel(broker)
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    for i in range(3):
        pub.basic_publish("", q, str(i).encode())
    m, _, _ = ch.basic_get(q, auto_ack=False)  # one unacked
    assert ch.queue_purge(q).method.message_count == 2
    ch.close()  # the unacked one comes back
    ch = conn.channel()
    assert ch.queue_declare(q, passive=True).method.message_count == 1


def test_queue_delete_returns_count(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    q = names("q")
    ch.queue_declare(q)
    for i in range(4):
        pub.basic_publish("", q, b"m")
    assert ch.queue_delete(q).method.message_count == 4
    # deleting a queue that does not exist is not an error
    assert ch.queue_delete(q).method.message_count == 0
    expect_channel_error(lambda: ch.queue_declare(q, passive=True), 404, "NOT_FOUND")


def test_queue_delete_if_unused(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    cch = broker.connect().channel()
    tag = cch.basic_consume(q, lambda *a: None)
    expect_channel_error(lambda: ch.queue_delete(q, if_unused=True), 406,
                         f"PRECONDITION_FAILED - queue '{q}' in vhost '{broker.vhost}' in use")
    cch.basic_cancel(tag)
    ch = conn.channel()
    ch.queue_delete(q, if_unused=True)
    expect_channel_error(lambda: ch.queue_declare(q, passive=True), 404, "NOT_FOUND")


def test_queue_delete_if_empty(broker, names):
    pub = confirmed_channel(broker)
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    pub.basic_publish("", q, b"m")
    expect_channel_error(lambda: ch.queue_delete(q, if_empty=True), 406,
                         f"PRECONDITION_FAILED - queue '{q}' in vhost '{broker.vhost}' not empty")
    ch = conn.channel()
    assert get_all(ch, q) == [b"m"]
    assert ch.queue_delete(q, if_empty=True).method.message_count == 0


def test_queue_delete_cancels_consumers_and_removes_bindings(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    x = names("x")
    q = names("q")
    ch.exchange_declare(x, "fanout")
    ch.queue_declare(q)
    ch.queue_bind(q, x)
    ch.queue_delete(q)
    ch.queue_declare(q)  # re-created: the old binding is gone
    pub = confirmed_channel(broker)
    pub.basic_publish(x, "", b"m")
    assert get_all(ch, q) == []


def test_queue_bind_unbind(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x = names("x")
    q = names("q")
    ch.exchange_declare(x, "direct")
    ch.queue_declare(q)
    ch.queue_bind(q, x, routing_key="a")
    ch.queue_bind(q, x, routing_key="a")  # idempotent
    ch.queue_bind(q, x, routing_key="b")
    pub.basic_publish(x, "a", b"a1")
    pub.basic_publish(x, "b", b"b1")
    assert get_all(ch, q) == [b"a1", b"b1"]

    ch.queue_unbind(q, x, routing_key="a")
    pub.basic_publish(x, "a", b"a2")
    pub.basic_publish(x, "b", b"b2")
    assert get_all(ch, q) == [b"b2"]
    ch.queue_unbind(q, x, routing_key="a")  # unbinding a missing binding is fine
    ch.queue_unbind(q, x, routing_key="b")
    pub.basic_publish(x, "b", b"b3")
    assert get_all(ch, q) == []


def test_queue_bind_with_arguments_is_a_distinct_binding(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x = names("x")
    q = names("q")
    ch.exchange_declare(x, "headers")
    ch.queue_declare(q)
    ch.queue_bind(q, x, arguments={"x-match": "all", "a": "1"})
    ch.queue_bind(q, x, arguments={"x-match": "all", "b": "2"})
    pub.basic_publish(x, "", b"a", pika.BasicProperties(headers={"a": "1"}))
    pub.basic_publish(x, "", b"b", pika.BasicProperties(headers={"b": "2"}))
    assert get_all(ch, q) == [b"a", b"b"]
    ch.queue_unbind(q, x, arguments={"x-match": "all", "a": "1"})
    pub.basic_publish(x, "", b"a", pika.BasicProperties(headers={"a": "1"}))
    pub.basic_publish(x, "", b"b", pika.BasicProperties(headers={"b": "2"}))
    assert get_all(ch, q) == [b"b"]


def test_message_properties_round_trip(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    q = names("q")
    ch.queue_declare(q)
    props = pika.BasicProperties(
        content_type="application/json", content_encoding="utf-8",
        headers={"s": "str", "i": 42, "neg": -7, "big": 2 ** 40, "d": decimal.Decimal("1.5"),
                 "b": True, "l": [1, "two"], "t": {"nested": "yes"}, "bytes": b"\x00\x01"},
        delivery_mode=2, priority=5, correlation_id="corr-1", reply_to="replies",
        expiration="60000", message_id="msg-1", timestamp=1700000000, type="order.created",
        user_id=broker.username, app_id="tests")
    pub.basic_publish("", q, b'{"k": 1}', props)
    m, p, body = ch.basic_get(q, auto_ack=True)
    assert body == b'{"k": 1}'
    assert m.routing_key == q and m.exchange == "" and m.redelivered is False
    for field in ("content_type", "content_encoding", "delivery_mode", "priority",
                  "correlation_id", "reply_to", "expiration", "message_id", "timestamp",
                  "type", "user_id", "app_id"):
        assert getattr(p, field) == getattr(props, field), field
    assert p.headers == props.headers


def test_user_id_must_match_the_connection_user(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    ch.basic_publish("", q, b"m", pika.BasicProperties(user_id="someone-else"))
    from helpers import wait_channel_closed
    reason = wait_channel_closed(ch)
    assert_closed(reason, 406, f"PRECONDITION_FAILED - user_id property set to 'someone-else' "
                               f"but authenticated user was '{broker.username}'")


def test_empty_body_round_trip(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    q = names("q")
    ch.queue_declare(q)
    pub.basic_publish("", q, b"")
    assert get_all(ch, q) == [b""]


def test_quorum_queue_declare(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("quorum")
    ok = ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
    assert ok.method.queue == q
    pub = confirmed_channel(broker)
    pub.basic_publish("", q, b"m", pika.BasicProperties(delivery_mode=2))
    assert ch.queue_declare(q, passive=True).method.message_count == 1
    expect_channel_error(
        lambda: ch.queue_declare(q, durable=True), 406,
        f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{q}' in vhost "
        f"'{broker.vhost}': received none but current is the value 'quorum' of type 'longstr'")
    ch = conn.channel()
    assert get_all(ch, q) == [b"m"]


def test_quorum_queue_must_be_durable_and_not_exclusive(broker, names):
    conn = broker.connect()
    q = names("quorum")
    expect_channel_error(
        lambda: conn.channel().queue_declare(q, durable=False,
                                             arguments={"x-queue-type": "quorum"}),
        406, f"PRECONDITION_FAILED - invalid property 'non-durable' for queue '{q}' in vhost "
             f"'{broker.vhost}'")
    expect_channel_error(
        lambda: conn.channel().queue_declare(q, durable=True, exclusive=True,
                                             arguments={"x-queue-type": "quorum"}),
        406, f"PRECONDITION_FAILED - invalid property 'exclusive-owner' for queue '{q}' in "
             f"vhost '{broker.vhost}'")

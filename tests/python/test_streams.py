"""Stream queues over AMQP 0-9-1 with pika, RabbitMQ's rules (STREAMS.md §1)."""

import datetime

import pika
import pytest
from pika.exceptions import ConnectionClosedByBroker

from helpers import (assert_closed, confirmed_channel, consume_n, drain_events,
                     expect_channel_error)

STREAM = {"x-queue-type": "stream"}


def _declare(broker, name, **extra):
    ch = broker.connect().channel()
    ch.queue_declare(name, durable=True, arguments={**STREAM, **extra})
    return ch


def _offsets(got):
    return [(props.headers["x-stream-offset"], body.decode()) for _m, props, body in got]


def test_declare_rules(broker, names):
    ch = broker.connect().channel()
    expect_channel_error(lambda: ch.queue_declare(names("s"), durable=False, arguments=STREAM),
                         406, "PRECONDITION_FAILED - invalid property 'non-durable'")
    ch = broker.connect().channel()
    expect_channel_error(
        lambda: ch.queue_declare(names("s"), durable=True,
                                 arguments={**STREAM, "x-max-age": "1A"}),
        406, "PRECONDITION_FAILED - invalid arg 'x-max-age'")
    ch = broker.connect().channel()
    expect_channel_error(
        lambda: ch.queue_declare(names("s"), durable=True,
                                 arguments={**STREAM, "x-single-active-consumer": True}),
        406, "PRECONDITION_FAILED - invalid arg 'x-single-active-consumer'")
    ch = broker.connect().channel()
    expect_channel_error(lambda: ch.queue_declare("", durable=True, arguments=STREAM), 406,
                         "PRECONDITION_FAILED")


def test_offsets_header_and_timestamp(broker, names):
    q = names("s")
    _declare(broker, q)
    pub = confirmed_channel(broker)
    for i in range(5):
        pub.basic_publish("", q, f"m{i}".encode())
    ch = broker.connect().channel()
    ch.basic_qos(prefetch_count=2)

    # A prefetch of 2: acks give the credit back (consume_n does not ack).
    got = []

    def on_msg(c, method, props, body):
        got.append((method, props, body))
        c.basic_ack(method.delivery_tag)

    tag = ch.basic_consume(q, on_msg, arguments={"x-stream-offset": "first"})
    assert drain_events([ch.connection], lambda: len(got) >= 5)
    ch.basic_cancel(tag)
    assert _offsets(got) == [(i, f"m{i}") for i in range(5)]
    ch.basic_qos(prefetch_count=10)
    got = consume_n(ch, q, 2, auto_ack=False, arguments={"x-stream-offset": 3})
    assert _offsets(got) == [(3, "m3"), (4, "m4")]
    # pika sends a datetime as an AMQP timestamp (seconds).
    an_hour_ago = datetime.datetime.now() - datetime.timedelta(hours=1)
    got = consume_n(ch, q, 5, auto_ack=False, arguments={"x-stream-offset": an_hour_ago})
    assert [o for o, _ in _offsets(got)] == list(range(5))


def test_get_and_auto_ack_are_540(broker, names):
    q = names("s")
    ch = _declare(broker, q)
    with pytest.raises(ConnectionClosedByBroker) as e:
        ch.basic_get(q)
    assert_closed(e.value, 540, "NOT_IMPLEMENTED", kind="connection")
    ch = broker.connect().channel()
    ch.basic_qos(prefetch_count=10)
    with pytest.raises(ConnectionClosedByBroker) as e:
        ch.basic_consume(q, lambda *a: None, auto_ack=True)
    assert_closed(e.value, 540, "NOT_IMPLEMENTED", kind="connection")


def test_consume_without_prefetch_is_406(broker, names):
    q = names("s")
    ch = _declare(broker, q)
    expect_channel_error(lambda: ch.basic_consume(q, lambda *a: None),
                         406, "PRECONDITION_FAILED - consumer prefetch count is not set")


def test_filtering(broker, names):
    q = names("s")
    _declare(broker, q)
    pub = confirmed_channel(broker)
    for body, value in [("a", "apple"), ("b", "banana"), ("p", None), ("a2", "apple")]:
        headers = {"x-stream-filter-value": value} if value else {}
        pub.basic_publish("", q, body.encode(), pika.BasicProperties(headers=headers))
    ch = broker.connect().channel()
    ch.basic_qos(prefetch_count=10)
    got = consume_n(ch, q, 2, auto_ack=False,
                    arguments={"x-stream-offset": "first", "x-stream-filter": "apple"})
    assert _offsets(got) == [(0, "a"), (3, "a2")]
    got = consume_n(ch, q, 2, auto_ack=False,
                    arguments={"x-stream-offset": "first", "x-stream-filter": ["banana"],
                               "x-stream-match-unfiltered": True})
    assert _offsets(got) == [(1, "b"), (2, "p")]

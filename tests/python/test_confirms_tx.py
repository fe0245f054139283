"""mandatory/basic.return, publisher confirms and transactions."""

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, UnroutableError

from helpers import (confirmed_channel, consume_n, drain_events, expect_channel_error, get_all,
                     quiet_period)


def test_mandatory_unroutable_returned(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    returned = []
    ch.add_on_return_callback(lambda c, method, props, body: returned.append((method, props, body)))
    x = names("x")
    ch.exchange_declare(x, "direct")
    ch.basic_publish(x, "nowhere", b"lost", pika.BasicProperties(message_id="m-1"),
                     mandatory=True)
    ch.basic_publish(x, "nowhere", b"not-mandatory")  # silently dropped
    assert drain_events([conn], lambda: returned)
    quiet_period([conn], 0.2)
    assert len(returned) == 1
    method, props, body = returned[0]
    assert isinstance(method, pika.spec.Basic.Return)
    assert (method.reply_code, method.reply_text) == (312, "NO_ROUTE")
    assert (method.exchange, method.routing_key) == (x, "nowhere")
    assert props.message_id == "m-1" and body == b"lost"


def test_mandatory_to_default_exchange_missing_queue(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    returned = []
    ch.add_on_return_callback(lambda c, m, p, b: returned.append(m))
    q = names("missing")
    ch.basic_publish("", q, b"x", mandatory=True)
    assert drain_events([conn], lambda: returned)
    assert (returned[0].reply_code, returned[0].reply_text) == (312, "NO_ROUTE")
    assert (returned[0].exchange, returned[0].routing_key) == ("", q)


def test_mandatory_routed_is_not_returned(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    returned = []
    ch.add_on_return_callback(lambda *a: returned.append(a))
    q = names("q")
    ch.queue_declare(q)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"ok", mandatory=True)
    quiet_period([conn], 0.2)
    assert returned == []
    assert get_all(ch, q) == [b"ok"]


def test_mandatory_with_confirms_raises_unroutable(broker, names):
    ch = confirmed_channel(broker)
    q = names("missing")
    with pytest.raises(UnroutableError) as ei:
        ch.basic_publish("", q, b"lost", mandatory=True)
    [msg] = ei.value.messages
    assert msg.method.reply_code == 312 and msg.method.reply_text == "NO_ROUTE"
    assert msg.body == b"lost"
    # the unroutable message is still confirmed (ack, not nack): the channel goes on
    ch.basic_publish("", q, b"not-mandatory")
    assert ch.is_open


def test_confirms_many_messages(broker, names):
    ch = confirmed_channel(broker)
    q = names("q")
    ch.queue_declare(q)
    for i in range(200):
        ch.basic_publish("", q, str(i).encode())  # each returns after its basic.ack
    ok = ch.queue_declare(q, passive=True)
    assert ok.method.message_count == 200
    got = consume_n(ch, q, 200)
    assert [b for _, _, b in got] == [str(i).encode() for i in range(200)]


def test_confirms_persistent_to_durable_queue(broker, names):
    ch = confirmed_channel(broker)
    q = names("durable")
    ch.queue_declare(q, durable=True)
    for i in range(20):
        ch.basic_publish("", q, b"p", pika.BasicProperties(delivery_mode=2))
    assert ch.queue_declare(q, durable=True, passive=True).method.message_count == 20


def test_confirm_for_unroutable_and_fanout(broker, names):
    ch = confirmed_channel(broker)
    x = names("fan")
    ch.exchange_declare(x, "fanout")
    ch.basic_publish(x, "", b"to-nobody")  # no queue bound: still acked
    qs = [names("q") for _ in range(3)]
    for q in qs:
        ch.queue_declare(q)
        ch.queue_bind(q, x)
    ch.basic_publish(x, "", b"to-three", pika.BasicProperties(delivery_mode=2))
    for q in qs:
        assert get_all(ch, q) == [b"to-three"]


def test_tx_commit_makes_publishes_visible(broker, names):
    tx = broker.connect().channel()
    ch = broker.connect().channel()
    q = names("q")
    ch.queue_declare(q)
    tx.tx_select()
    for i in range(3):
        tx.basic_publish("", q, f"t{i}".encode())
    # nothing is visible before commit (queue.declare is synchronous on the tx channel)
    tx.queue_declare(q, passive=True)
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    tx.tx_commit()
    assert ch.queue_declare(q, passive=True).method.message_count == 3
    assert get_all(ch, q) == [b"t0", b"t1", b"t2"]
    # the channel stays transactional
    tx.basic_publish("", q, b"t3")
    tx.tx_commit()
    assert get_all(ch, q) == [b"t3"]


def test_tx_rollback_discards_publishes(broker, names):
    tx = broker.connect().channel()
    ch = broker.connect().channel()
    q = names("q")
    ch.queue_declare(q)
    tx.tx_select()
    tx.basic_publish("", q, b"discarded")
    tx.tx_rollback()
    tx.tx_commit()  # empty commit
    assert get_all(ch, q) == []
    tx.basic_publish("", q, b"kept")
    tx.tx_commit()
    assert get_all(ch, q) == [b"kept"]


def test_tx_acks(broker, names):
    conn = broker.connect()
    tx = conn.channel()
    q = names("q")
    tx.queue_declare(q)
    pub = confirmed_channel(broker)
    for i in range(3):
        pub.basic_publish("", q, f"m{i}".encode())
    tx.tx_select()
    got = consume_n(tx, q, 3, auto_ack=False)
    for m, _, _ in got:
        tx.basic_ack(m.delivery_tag)
    tx.tx_rollback()  # the acks are forgotten; the messages stay unacked
    tx.close()  # so closing the channel requeues them
    ch = conn.channel()
    assert ch.queue_declare(q, passive=True).method.message_count == 3

    tx = conn.channel()
    tx.tx_select()
    got = consume_n(tx, q, 3, auto_ack=False)
    assert all(m.redelivered for m, _, _ in got)
    tx.basic_ack(got[-1][0].delivery_tag, multiple=True)
    tx.tx_commit()
    tx.close()
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_tx_commit_without_select(broker):
    ch = broker.connect().channel()
    expect_channel_error(ch.tx_commit, 406, "PRECONDITION_FAILED - channel is not transactional")


def test_tx_rollback_without_select(broker):
    ch = broker.connect().channel()
    expect_channel_error(ch.tx_rollback, 406,
                         "PRECONDITION_FAILED - channel is not transactional")


def test_confirm_select_on_tx_channel(broker):
    ch = broker.connect().channel()
    ch.tx_select()
    expect_channel_error(ch.confirm_delivery, 406,
                         "PRECONDITION_FAILED - cannot switch from tx to confirm mode")


def test_tx_select_on_confirm_channel(broker):
    ch = broker.connect().channel()
    ch.confirm_delivery()
    expect_channel_error(ch.tx_select, 406,
                         "PRECONDITION_FAILED - cannot switch from confirm to tx mode")

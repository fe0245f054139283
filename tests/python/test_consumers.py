"""Consumers: dispatch, prefetch, exclusive consumers, cancel notifications,
acks/nacks/rejects, redelivery, basic.get, basic.recover, basic.cancel."""

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from helpers import (assert_closed, confirmed_channel, consume_n, drain_events,
                     expect_channel_error, get_all, quiet_period, wait_channel_closed)


def _fill(broker, q, n, prefix="m"):
    pub = confirmed_channel(broker)
    for i in range(n):
        pub.basic_publish("", q, f"{prefix}{i}".encode())
    pub.connection.close()


class Recorder:
    def __init__(self):
        self.msgs = []

    def __call__(self, ch, method, props, body):
        self.msgs.append((method, props, body))

    @property
    def bodies(self):
        return [b for _, _, b in self.msgs]

    @property
    def tags(self):
        return [m.delivery_tag for m, _, _ in self.msgs]


def test_round_robin_across_consumers(broker, names):
    q = names("q")
    conns, recs = [], []
    for _ in range(3):
        conn = broker.connect()
        ch = conn.channel()
        ch.queue_declare(q)
        r = Recorder()
        ch.basic_consume(q, r, auto_ack=True)
        conns.append(conn)
        recs.append(r)
    _fill(broker, q, 30)
    assert drain_events(conns, lambda: sum(len(r.msgs) for r in recs) == 30)
    quiet_period(conns, 0.2)
    assert [len(r.msgs) for r in recs] == [10, 10, 10]
    # strictly alternating: each consumer sees every third message
    firsts = sorted(recs, key=lambda r: r.bodies[0])
    for offset, r in enumerate(firsts):
        assert r.bodies == [f"m{i}".encode() for i in range(offset, 30, 3)]


def test_consumer_tags_and_delivery_fields(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    r = Recorder()
    tag = ch.basic_consume(q, r, consumer_tag="my-tag")
    assert tag == "my-tag"
    _fill(broker, q, 3)
    assert drain_events([conn], lambda: len(r.msgs) == 3)
    for i, (m, _, body) in enumerate(r.msgs):
        assert m.consumer_tag == "my-tag"
        assert m.delivery_tag == i + 1  # per channel, starting at 1
        assert m.exchange == "" and m.routing_key == q and m.redelivered is False
        ch.basic_ack(m.delivery_tag)


def test_prefetch_per_consumer(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    ch.basic_qos(prefetch_count=2)
    r = Recorder()
    ch.basic_consume(q, r)
    _fill(broker, q, 5)
    assert drain_events([conn], lambda: len(r.msgs) == 2)
    quiet_period([conn], 0.3)
    assert r.bodies == [b"m0", b"m1"]
    ch.basic_ack(r.tags[0])
    assert drain_events([conn], lambda: len(r.msgs) == 3)
    quiet_period([conn], 0.3)
    assert len(r.msgs) == 3
    ch.basic_ack(r.tags[2], multiple=True)  # acks m1, m2: two more may come
    assert drain_events([conn], lambda: len(r.msgs) == 5)
    assert r.bodies == [f"m{i}".encode() for i in range(5)]


def test_prefetch_applies_to_each_new_consumer(broker, names):
    """basic.qos(global=False) limits every consumer created afterwards on the channel
    separately (RabbitMQ's reinterpretation of the spec)."""
    conn = broker.connect()
    ch = conn.channel()
    q1, q2 = names("q"), names("q")
    ch.queue_declare(q1)
    ch.queue_declare(q2)
    ch.basic_qos(prefetch_count=2)
    r1, r2 = Recorder(), Recorder()
    ch.basic_consume(q1, r1)
    ch.basic_consume(q2, r2)
    _fill(broker, q1, 5)
    _fill(broker, q2, 5)
    assert drain_events([conn], lambda: len(r1.msgs) == 2 and len(r2.msgs) == 2)
    quiet_period([conn], 0.3)
    assert (len(r1.msgs), len(r2.msgs)) == (2, 2)


def test_prefetch_global_is_per_channel(broker, names):
    """basic.qos(global=True) is one limit shared by all consumers on the channel."""
    conn = broker.connect()
    ch = conn.channel()
    q1, q2 = names("q"), names("q")
    ch.queue_declare(q1)
    ch.queue_declare(q2)
    ch.basic_qos(prefetch_count=3, global_qos=True)
    r1, r2 = Recorder(), Recorder()
    ch.basic_consume(q1, r1)
    ch.basic_consume(q2, r2)
    _fill(broker, q1, 5, "a")
    _fill(broker, q2, 5, "b")
    assert drain_events([conn], lambda: len(r1.msgs) + len(r2.msgs) == 3)
    quiet_period([conn], 0.3)
    assert len(r1.msgs) + len(r2.msgs) == 3
    # acking everything lets the channel take 3 more in total
    ch.basic_ack(0, multiple=True)
    assert drain_events([conn], lambda: len(r1.msgs) + len(r2.msgs) == 6)
    quiet_period([conn], 0.3)
    assert len(r1.msgs) + len(r2.msgs) == 6


def _two_consumers_with_qos(broker, names, qos_calls):
    conn = broker.connect()
    ch = conn.channel()
    q1, q2 = names("q"), names("q")
    ch.queue_declare(q1)
    ch.queue_declare(q2)
    for prefetch, is_global in qos_calls:
        ch.basic_qos(prefetch_count=prefetch, global_qos=is_global)
    r1, r2 = Recorder(), Recorder()
    ch.basic_consume(q1, r1)
    _fill(broker, q1, 5, "a")
    assert drain_events([conn], lambda: len(r1.msgs) == 2)
    quiet_period([conn], 0.3)
    ch.basic_consume(q2, r2)
    _fill(broker, q2, 5, "b")
    quiet_period([conn], 0.5)
    return len(r1.msgs), len(r2.msgs)


def test_prefetch_global_and_per_consumer_combined(broker, names):
    """RabbitMQ's documented combination: basic.qos(2, global=False) then
    basic.qos(3, global=True): each consumer at most 2, the channel at most 3."""
    assert _two_consumers_with_qos(broker, names, [(2, False), (3, True)]) == (2, 1)


def test_prefetch_per_consumer_qos_clears_global_limit(broker, names):
    """RabbitMQ quirk (3.10): a basic.qos(global=False) issued after a global one
    lifts the channel-wide limit (rabbit_channel calls unlimit_prefetch), so only the
    per-consumer limit of 2 applies."""
    assert _two_consumers_with_qos(broker, names, [(3, True), (2, False)]) == (2, 2)


def test_prefetch_does_not_limit_auto_ack_consumers(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    ch.basic_qos(prefetch_count=1)
    r = Recorder()
    ch.basic_consume(q, r, auto_ack=True)
    _fill(broker, q, 20)
    assert drain_events([conn], lambda: len(r.msgs) == 20)


def test_exclusive_consumer(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    tag = ch.basic_consume(q, lambda *a: None, exclusive=True)
    in_use = f"ACCESS_REFUSED - queue '{q}' in vhost '{broker.vhost}' in exclusive use"
    other = broker.connect()
    expect_channel_error(lambda: other.channel().basic_consume(q, lambda *a: None), 403, in_use)
    # not even on the same channel
    expect_channel_error(lambda: ch.basic_consume(q, lambda *a: None), 403, in_use)
    # once cancelled, others may consume
    ch2 = conn.channel()
    ch2.basic_consume(q, lambda *a: None)


def test_exclusive_consume_refused_when_queue_has_consumers(broker, names):
    conn = broker.connect()
    q = names("q")
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_consume(q, lambda *a: None)
    other = broker.connect().channel()
    expect_channel_error(
        lambda: other.basic_consume(q, lambda *a: None, exclusive=True), 403,
        f"ACCESS_REFUSED - queue '{q}' in vhost '{broker.vhost}' in exclusive use")


def test_consumer_cancel_notification_on_queue_delete(broker, names):
    conn = broker.connect()
    assert conn.consumer_cancel_notify_supported
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method))
    tag = ch.basic_consume(q, lambda *a: None)
    broker.connect().channel().queue_delete(q)
    assert drain_events([conn], lambda: cancelled)
    assert cancelled[0].consumer_tag == tag
    assert ch.is_open
    assert tag not in ch.consumer_tags
    # the channel is still usable
    ch.queue_declare(names("q2"), exclusive=True)


def test_consume_generator_ends_on_cancel(broker, names):
    """BlockingChannel.consume() ends when the broker cancels its consumer."""
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    _fill(broker, q, 1)
    it = ch.consume(q, inactivity_timeout=5)
    method, _, body = next(it)
    assert body == b"m0"
    ch.basic_ack(method.delivery_tag)
    broker.connect().channel().queue_delete(q)
    assert list(it) == []  # no (None, None, None) either: the cancel came before 5 s


@pytest.mark.parametrize("how", ["channel", "connection"])
def test_unacked_messages_redelivered_on_close(broker, names, how):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 4)
    got = consume_n(ch, q, 4, auto_ack=False)
    ch.basic_ack(got[0][0].delivery_tag)  # ack m0 only
    if how == "channel":
        ch.close()
    else:
        conn.close()
    ch2 = broker.connect().channel()
    again = consume_n(ch2, q, 3, auto_ack=False)
    assert [b for _, _, b in again] == [b"m1", b"m2", b"m3"]  # original order
    assert all(m.redelivered for m, _, _ in again)
    quiet_period([ch2.connection], 0.2)


def test_ack_multiple(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 5)
    got = consume_n(ch, q, 5, auto_ack=False)
    ch.basic_ack(got[2][0].delivery_tag, multiple=True)  # m0..m2
    ch.close()
    ch = conn.channel()
    assert get_all(ch, q) == [b"m3", b"m4"]


def test_nack_multiple_requeue(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 4)
    got = consume_n(ch, q, 4, auto_ack=False)
    ch.basic_nack(got[1][0].delivery_tag, multiple=True, requeue=True)  # m0, m1 back
    ch.basic_ack(got[3][0].delivery_tag)  # m3 done, m2 stays unacked
    ch2 = conn.channel()
    again = []
    while True:
        m, _, b = ch2.basic_get(q, auto_ack=True)
        if m is None:
            break
        again.append((b, m.redelivered))
    assert again == [(b"m0", True), (b"m1", True)]


def test_nack_without_requeue_drops(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 3)
    got = consume_n(ch, q, 3, auto_ack=False)
    ch.basic_nack(got[2][0].delivery_tag, multiple=True, requeue=False)
    ch.close()
    assert conn.channel().queue_declare(q, passive=True).method.message_count == 0


def test_nack_multiple_zero_means_all(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 3)
    consume_n(ch, q, 3, auto_ack=False)
    ch.basic_nack(0, multiple=True, requeue=True)
    ch2 = conn.channel()
    assert get_all(ch2, q) == [b"m0", b"m1", b"m2"]


def test_reject(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 2)
    got = consume_n(ch, q, 2, auto_ack=False)
    ch.basic_reject(got[0][0].delivery_tag, requeue=True)
    ch.basic_reject(got[1][0].delivery_tag, requeue=False)
    ch2 = conn.channel()
    m, _, body = ch2.basic_get(q, auto_ack=True)
    assert body == b"m0" and m.redelivered is True
    assert ch2.basic_get(q) == (None, None, None)


def test_requeued_message_goes_to_another_consumer(broker, names):
    q = names("q")
    c1, c2 = broker.connect(), broker.connect()
    ch1, ch2 = c1.channel(), c2.channel()
    ch1.queue_declare(q)
    ch1.basic_qos(prefetch_count=1)
    ch2.basic_qos(prefetch_count=1)
    r1, r2 = Recorder(), Recorder()
    ch1.basic_consume(q, r1)
    _fill(broker, q, 1)
    assert drain_events([c1], lambda: r1.msgs)
    ch2.basic_consume(q, r2)
    ch1.basic_reject(r1.tags[0], requeue=True)
    # ch1 has credit again too, so either may get it; it must arrive once, redelivered
    assert drain_events([c1, c2], lambda: len(r1.msgs) + len(r2.msgs) == 2)
    quiet_period([c1, c2], 0.2)
    redelivered = (r1.msgs[1:] + r2.msgs)[0]
    assert redelivered[2] == b"m0" and redelivered[0].redelivered is True


def test_basic_get(broker, names):
    q = names("q")
    ch = broker.connect().channel()
    ch.queue_declare(q)
    assert ch.basic_get(q) == (None, None, None)  # get-empty
    _fill(broker, q, 3)
    counts = []
    for i in range(3):
        m, props, body = ch.basic_get(q, auto_ack=True)
        assert isinstance(m, pika.spec.Basic.GetOk)
        assert body == f"m{i}".encode()
        assert m.exchange == "" and m.routing_key == q and m.redelivered is False
        counts.append(m.message_count)
    assert counts == [2, 1, 0]  # messages left after this one
    assert ch.basic_get(q) == (None, None, None)


def test_basic_get_manual_ack_and_requeue(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 2)
    m1, _, b1 = ch.basic_get(q, auto_ack=False)
    m2, _, b2 = ch.basic_get(q, auto_ack=False)
    assert (b1, b2) == (b"m0", b"m1")
    assert (m1.delivery_tag, m2.delivery_tag) == (1, 2)
    assert ch.basic_get(q) == (None, None, None)  # both unacked
    ch.basic_reject(m1.delivery_tag, requeue=True)
    m3, _, b3 = ch.basic_get(q, auto_ack=False)
    assert b3 == b"m0" and m3.redelivered is True and m3.delivery_tag == 3
    ch.basic_ack(m3.delivery_tag)
    ch.basic_ack(m2.delivery_tag)
    ch.close()
    assert conn.channel().queue_declare(q, passive=True).method.message_count == 0


def test_basic_recover_requeue(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 2)
    r = Recorder()
    ch.basic_consume(q, r)
    assert drain_events([conn], lambda: len(r.msgs) == 2)
    ch.basic_recover(requeue=True)
    assert drain_events([conn], lambda: len(r.msgs) == 4)
    quiet_period([conn], 0.2)
    assert r.bodies == [b"m0", b"m1", b"m0", b"m1"]
    assert [m.redelivered for m, _, _ in r.msgs] == [False, False, True, True]
    ch.basic_ack(0, multiple=True)
    ch.close()
    assert conn.channel().queue_declare(q, passive=True).method.message_count == 0


def test_ack_unknown_delivery_tag(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    ch.basic_ack(42)
    reason = wait_channel_closed(ch)
    assert_closed(reason, 406, "PRECONDITION_FAILED - unknown delivery tag 42")
    conn.channel().queue_declare("", exclusive=True)  # the connection is fine


def test_double_ack(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 1)
    m, _, _ = ch.basic_get(q, auto_ack=False)
    ch.basic_ack(m.delivery_tag)
    ch.basic_ack(m.delivery_tag)
    reason = wait_channel_closed(ch)
    assert_closed(reason, 406, f"PRECONDITION_FAILED - unknown delivery tag {m.delivery_tag}")


def test_ack_of_auto_acked_delivery(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 1)
    m, _, _ = ch.basic_get(q, auto_ack=True)
    ch.basic_reject(m.delivery_tag)
    reason = wait_channel_closed(ch)
    assert_closed(reason, 406, f"PRECONDITION_FAILED - unknown delivery tag {m.delivery_tag}")


def test_basic_cancel(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    r = Recorder()
    tag = ch.basic_consume(q, r, auto_ack=True)
    _fill(broker, q, 2)
    assert drain_events([conn], lambda: len(r.msgs) == 2)
    assert ch.queue_declare(q, passive=True).method.consumer_count == 1
    ch.basic_cancel(tag)
    assert ch.consumer_tags == []
    assert ch.queue_declare(q, passive=True).method.consumer_count == 0
    _fill(broker, q, 3, "after")
    quiet_period([conn], 0.2)
    assert len(r.msgs) == 2
    assert ch.queue_declare(q, passive=True).method.message_count == 3


def test_cancel_keeps_unacked_until_acked(broker, names):
    """After basic.cancel, unacked deliveries stay with the channel and can be acked."""
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    _fill(broker, q, 2)
    r = Recorder()
    tag = ch.basic_consume(q, r)
    assert drain_events([conn], lambda: len(r.msgs) == 2)
    ch.basic_cancel(tag)
    ch.basic_ack(r.tags[0])
    ch.basic_reject(r.tags[1], requeue=True)
    assert get_all(ch, q) == [b"m1"]


def test_consume_missing_queue(broker, names):
    ch = broker.connect().channel()
    q = names("missing")
    expect_channel_error(lambda: ch.basic_consume(q, lambda *a: None), 404,
                         f"NOT_FOUND - no queue '{q}' in vhost '{broker.vhost}'")

"""Queue policies over pika, as RabbitMQ 3.10 does them: message and queue TTL,
queue expiry, length limits with every overflow mode, priorities, single active
consumer, quorum delivery limits, delayed messages (Switchyard only: RabbitMQ needs
a plugin) and policies (config.toml here; ``rabbitmqctl set_policy`` in external
mode).

Time-dependent tests use TTLs of 50-200 ms and wait for what a client can observe
(a dead-lettered message arriving, a queue disappearing) with deadlines; none
asserts on elapsed time. Where a test shows that something has *not* happened yet
(a message behind the head has not expired), it waits several times the TTL first.
"""

import json
import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, NackError

from helpers import (EXTERNAL_URL, assert_closed, confirmed_channel, consume_n, drain_events,
                     get_all, quiet_period, rabbitmqctl, rabbitmqctl_path, toml_str, uniq)


def declare_dlq(ch, names):
    """A dead-letter queue behind the default exchange; returns its name and the
    arguments that dead-letter into it."""
    dlq = names("dlq")
    ch.queue_declare(dlq)
    return dlq, {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq}


def one_death(props):
    deaths = props.headers["x-death"]
    assert len(deaths) == 1, deaths
    return deaths[0]


def wait_queue_gone(broker, q, every, timeout=5.0):
    """Passive-declare until 404 (expiry happens on the broker's own timer). A
    passive declare counts as use and restarts the countdown (RabbitMQ does so too),
    so ``every`` must be longer than the queue's x-expires."""
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
        conn.process_data_events(time_limit=every)


# ------------------------------------------------------------------------------- TTL


def test_queue_ttl_dead_letters_with_reason_expired(broker, names):
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, arguments={**dl, "x-message-ttl": 100})
    pub.basic_publish("", q, b"order-1", pika.BasicProperties(message_id="m1"))
    (_m, props, body), = consume_n(broker.connect().channel(), dlq, 1)
    assert body == b"order-1" and props.message_id == "m1"
    death = one_death(props)
    assert death["reason"] == "expired"
    assert death["queue"] == q
    assert death["count"] == 1
    assert death["exchange"] == ""
    assert death["routing-keys"] == [q]
    assert "original-expiration" not in death
    assert props.headers["x-first-death-reason"] == "expired"
    assert props.headers["x-first-death-queue"] == q


def test_per_message_ttl_keeps_original_expiration_in_x_death(broker, names):
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, arguments=dl)
    pub.basic_publish("", q, b"x", pika.BasicProperties(expiration="50"))
    (_m, props, _b), = consume_n(broker.connect().channel(), dlq, 1)
    assert props.expiration is None
    death = one_death(props)
    assert death["reason"] == "expired"
    assert death["original-expiration"] == "50"


def test_the_lower_of_queue_and_message_ttl_applies(broker, names):
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, arguments={**dl, "x-message-ttl": 60000})
    pub.basic_publish("", q, b"short", pika.BasicProperties(expiration="50"))
    (_m, _p, body), = consume_n(broker.connect().channel(), dlq, 1)
    assert body == b"short"


def test_only_the_head_of_the_queue_expires(broker, names):
    """RabbitMQ expires messages only at the head: a short-lived message behind a
    long-lived one stays until the head leaves (then it expires at once)."""
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, arguments=dl)
    pub.basic_publish("", q, b"long", pika.BasicProperties(expiration="60000"))
    pub.basic_publish("", q, b"short", pika.BasicProperties(expiration="50"))
    quiet_period([pub.connection], 0.4)  # 8x the short TTL
    assert pub.queue_declare(q, passive=True).method.message_count == 2
    assert get_all(pub, q) == [b"long"]  # "short" expired on reaching the head
    (_m, props, body), = consume_n(broker.connect().channel(), dlq, 1)
    assert body == b"short" and one_death(props)["reason"] == "expired"


def test_ttl_zero_delivers_to_a_waiting_consumer_or_expires(broker, names):
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, arguments={**dl, "x-message-ttl": 0})
    pub.basic_publish("", q, b"nobody-there")
    (_m, _p, body), = consume_n(broker.connect().channel(), dlq, 1)
    assert body == b"nobody-there"

    cons = broker.connect().channel()
    got = []
    cons.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    pub.basic_publish("", q, b"taken")
    assert drain_events([cons.connection], lambda: got, timeout=5)
    assert got == [b"taken"]


def test_a_requeued_message_keeps_its_expiry(broker, names):
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, arguments={**dl, "x-message-ttl": 150})
    pub.basic_publish("", q, b"m")
    ch = broker.connect().channel()
    method, _p, _b = ch.basic_get(q, auto_ack=False)
    assert method is not None
    ch.basic_nack(method.delivery_tag, requeue=True)
    (_m, props, body), = consume_n(broker.connect().channel(), dlq, 1)
    assert body == b"m" and one_death(props)["reason"] == "expired"


# --------------------------------------------------------------------- queue expiry


def test_an_unused_queue_expires(broker, names):
    ch = broker.connect().channel()
    q = names("q")
    ch.queue_declare(q, arguments={"x-expires": 100})
    wait_queue_gone(broker, q, every=0.3)


def test_a_queue_with_a_consumer_does_not_expire_until_it_leaves(broker, names):
    ch = broker.connect().channel()
    q = names("q")
    ch.queue_declare(q, arguments={"x-expires": 100})
    tag = ch.basic_consume(q, lambda *a: None)
    quiet_period([ch.connection], 0.5)
    assert ch.queue_declare(q, passive=True).method.consumer_count == 1
    ch.basic_cancel(tag)
    wait_queue_gone(broker, q, every=0.3)


# ------------------------------------------------------------------ length limits


def test_max_length_drop_head_dead_letters_the_oldest_as_maxlen(broker, names):
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, arguments={**dl, "x-max-length": 2})
    for b in (b"1", b"2", b"3"):
        pub.basic_publish("", q, b)
    assert get_all(pub, q) == [b"2", b"3"]
    (_m, props, body), = consume_n(broker.connect().channel(), dlq, 1)
    assert body == b"1"
    assert one_death(props)["reason"] == "maxlen"


def test_max_length_bytes_counts_message_bodies(broker, names):
    pub = confirmed_channel(broker)
    q = names("q")
    pub.queue_declare(q, arguments={"x-max-length-bytes": 5})
    for b in (b"abc", b"de", b"f"):
        pub.basic_publish("", q, b)
    assert get_all(pub, q) == [b"de", b"f"]


def test_reject_publish_nacks_confirms_and_drops_silently_otherwise(broker, names):
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, arguments={**dl, "x-max-length": 1, "x-overflow": "reject-publish"})
    pub.basic_publish("", q, b"1")
    with pytest.raises(NackError):
        pub.basic_publish("", q, b"2")
    plain = broker.connect().channel()
    plain.basic_publish("", q, b"3")  # no confirm mode: dropped without a word
    assert get_all(plain, q) == [b"1"]
    # Room again: accepted (and acked).
    pub.basic_publish("", q, b"4")
    assert get_all(pub, q) == [b"4"]
    assert pub.queue_declare(dlq, passive=True).method.message_count == 0


def test_reject_publish_counts_ready_messages_only(broker, names):
    pub = confirmed_channel(broker)
    q = names("q")
    pub.queue_declare(q, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    pub.basic_publish("", q, b"1")
    ch = broker.connect().channel()
    method, _p, _b = ch.basic_get(q, auto_ack=False)  # now unacked, not ready
    assert method is not None
    pub.basic_publish("", q, b"2")


def test_reject_publish_dlx_nacks_and_dead_letters(broker, names):
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, arguments={**dl, "x-max-length": 1,
                                    "x-overflow": "reject-publish-dlx"})
    pub.basic_publish("", q, b"1")
    with pytest.raises(NackError):
        pub.basic_publish("", q, b"2")
    (_m, props, body), = consume_n(broker.connect().channel(), dlq, 1)
    assert body == b"2" and one_death(props)["reason"] == "maxlen"
    assert get_all(pub, q) == [b"1"]


def test_nacks_and_acks_keep_their_sequence_numbers(broker, names):
    """With several publishes in flight, only the refused one is nacked."""
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    results = []
    for b in (b"1", b"2", b"3", b"4"):
        try:
            ch.basic_publish("", q, b)
            results.append("ack")
        except NackError:
            results.append("nack")
    assert results == ["ack", "ack", "nack", "nack"]


# ------------------------------------------------------------------------ priorities


def test_priority_queue_serves_higher_first_fifo_within_a_priority(broker, names):
    pub = confirmed_channel(broker)
    q = names("q")
    pub.queue_declare(q, arguments={"x-max-priority": 5})
    for body, prio in ((b"none", None), (b"p1", 1), (b"p5a", 5), (b"p9", 9), (b"p5b", 5)):
        pub.basic_publish("", q, body, pika.BasicProperties(priority=prio))
    # A priority above the maximum counts as the maximum.
    ch = broker.connect().channel()
    method, _p, body = ch.basic_get(q, auto_ack=False)
    assert body == b"p5a"
    ch.basic_nack(method.delivery_tag, requeue=True)  # keeps its place
    assert get_all(ch, q) == [b"p5a", b"p9", b"p5b", b"p1", b"none"]


def test_max_priority_above_255_is_refused(broker, names):
    ch = broker.connect().channel()
    q = names("q")
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.queue_declare(q, arguments={"x-max-priority": 256})
    assert_closed(ei.value, 406,
                  f"PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue '{q}' in "
                  "vhost '/': {max_value_exceeded,256}")


# --------------------------------------------------------- single active consumer


def test_single_active_consumer_gets_everything_until_it_goes(broker, names):
    pub = confirmed_channel(broker)
    q = names("q")
    pub.queue_declare(q, arguments={"x-single-active-consumer": True})
    a, b = broker.connect().channel(), broker.connect().channel()
    got_a, got_b = [], []
    tag_a = a.basic_consume(q, lambda c, m, p, body: got_a.append(body), auto_ack=True)
    b.basic_consume(q, lambda c, m, p, body: got_b.append(body), auto_ack=True)
    for i in range(4):
        pub.basic_publish("", q, str(i).encode())
    assert drain_events([a.connection, b.connection], lambda: len(got_a) == 4)
    quiet_period([b.connection], 0.2)
    assert got_b == []
    a.basic_cancel(tag_a)
    pub.basic_publish("", q, b"after")
    assert drain_events([b.connection], lambda: got_b == [b"after"])


def test_single_active_consumer_hands_unacked_messages_to_the_next(broker, names):
    pub = confirmed_channel(broker)
    q = names("q")
    pub.queue_declare(q, arguments={"x-single-active-consumer": True})
    for i in range(3):
        pub.basic_publish("", q, str(i).encode())
    a_conn = broker.connect()
    a = a_conn.channel()
    a.basic_qos(prefetch_count=1)
    got_a = []
    a.basic_consume(q, lambda c, m, p, body: got_a.append(body))
    assert drain_events([a_conn], lambda: got_a == [b"0"])
    b = broker.connect().channel()
    got_b = []
    b.basic_consume(q, lambda c, m, p, body: got_b.append((m.redelivered, body)),
                    auto_ack=True)
    quiet_period([b.connection], 0.2)
    assert got_b == []
    a_conn.close()  # its unacked message goes back, and b takes over
    assert drain_events([b.connection], lambda: len(got_b) == 3)
    assert got_b == [(True, b"0"), (False, b"1"), (False, b"2")]


# ------------------------------------------------------------- quorum delivery limit


def test_quorum_delivery_limit_dead_letters_with_reason_delivery_limit(broker, names):
    pub = confirmed_channel(broker)
    dlq, dl = declare_dlq(pub, names)
    q = names("q")
    pub.queue_declare(q, durable=True,
                      arguments={**dl, "x-queue-type": "quorum", "x-delivery-limit": 1})
    pub.basic_publish("", q, b"poison")
    ch = broker.connect().channel()
    method, props, _b = ch.basic_get(q, auto_ack=False)
    assert not method.redelivered
    assert not (props.headers or {}).get("x-delivery-count")
    ch.basic_nack(method.delivery_tag, requeue=True)
    method, props, _b = ch.basic_get(q, auto_ack=False)
    assert method.redelivered
    assert props.headers["x-delivery-count"] == 1
    ch.basic_nack(method.delivery_tag, requeue=True)  # second return: over the limit
    (_m, props, body), = consume_n(broker.connect().channel(), dlq, 1)
    assert body == b"poison"
    assert one_death(props)["reason"] == "delivery_limit"
    assert ch.basic_get(q, auto_ack=True)[0] is None
    pub.queue_delete(q)


# ------------------------------------------------------------------ delayed messages


switchyard_only = pytest.mark.skipif(
    bool(EXTERNAL_URL), reason="x-delay needs RabbitMQ's delayed-message plugin")


@switchyard_only
def test_delayed_message_arrives_after_its_delay(broker, names):
    pub = confirmed_channel(broker)
    q = names("q")
    pub.queue_declare(q)
    pub.basic_publish("", q, b"later", pika.BasicProperties(headers={"x-delay": 200}))
    pub.basic_publish("", q, b"now")
    # Not counted (nor consumable) until due.
    assert pub.queue_declare(q, passive=True).method.message_count == 1
    ch = broker.connect().channel()
    got = consume_n(ch, q, 2)
    assert [b for _m, _p, b in got] == [b"now", b"later"]
    # Released with the delay negated, so publishing it again as it is does not delay it.
    assert got[1][1].headers["x-delay"] == -200


@switchyard_only
def test_delayed_retry_with_dead_lettering_keeps_order_of_due_times(broker, names):
    pub = confirmed_channel(broker)
    q = names("q")
    pub.queue_declare(q)
    for body, delay in ((b"c", 300), (b"a", 100), (b"b", 200)):
        pub.basic_publish("", q, body, pika.BasicProperties(headers={"x-delay": delay}))
    got = consume_n(broker.connect().channel(), q, 3)
    assert [b for _m, _p, b in got] == [b"a", b"b", b"c"]


# ------------------------------------------------------------------------- policies


@pytest.fixture
def policy_broker(broker_factory):
    """``policy_broker([dict(name=, pattern=, definition={...}, priority=0)])``: a broker
    with those policies (config.toml, or rabbitmqctl set_policy in external mode)."""
    created = []

    def make(policies):
        if not EXTERNAL_URL:
            lines = []
            for p in policies:
                definition = ", ".join(f"{toml_str(k)} = {json.dumps(v)}"
                                       for k, v in p["definition"].items())
                lines += ["[[policies]]", f"name = {toml_str(p['name'])}",
                          f"pattern = {toml_str(p['pattern'])}",
                          f"priority = {p.get('priority', 0)}",
                          'apply_to = "queues"',
                          f"definition = {{ {definition} }}", ""]
            return broker_factory(extra_toml="\n".join(lines))
        if not rabbitmqctl_path():
            pytest.skip("external mode without rabbitmqctl: cannot set policies")
        for p in policies:
            rabbitmqctl("set_policy", "--priority", str(p.get("priority", 0)),
                        "--apply-to", "queues", p["name"], p["pattern"],
                        json.dumps(p["definition"]))
            created.append(p["name"])
        return broker_factory()

    yield make
    for name in created:
        try:
            rabbitmqctl("clear_policy", name)
        except Exception:
            pass


def test_a_policy_applies_ttl_and_dead_lettering_to_matching_queues(policy_broker):
    prefix = uniq("pol")
    dlq = f"{prefix}-dlq"
    broker = policy_broker([dict(name=f"{prefix}-ttl", pattern=f"^{prefix}\\.",
                                 definition={"message-ttl": 100,
                                             "dead-letter-exchange": "",
                                             "dead-letter-routing-key": dlq})])
    pub = confirmed_channel(broker)
    pub.queue_declare(dlq)
    q = f"{prefix}.orders"
    pub.queue_declare(q)  # no arguments: the policy supplies them
    pub.basic_publish("", q, b"x")
    (_m, props, body), = consume_n(broker.connect().channel(), dlq, 1)
    assert body == b"x" and one_death(props)["reason"] == "expired"
    # A queue the pattern does not match keeps its message.
    other = f"{prefix}-other"
    pub.queue_declare(other)
    pub.basic_publish("", other, b"kept")
    quiet_period([pub.connection], 0.3)
    assert get_all(pub, other) == [b"kept"]
    for name in (q, other, dlq):
        pub.queue_delete(name)


def test_the_lower_limit_wins_between_policy_and_argument(policy_broker):
    prefix = uniq("pol")
    broker = policy_broker([dict(name=f"{prefix}-len", pattern=f"^{prefix}\\.",
                                 definition={"max-length": 1})])
    pub = confirmed_channel(broker)
    q1, q2 = f"{prefix}.policy-lower", f"{prefix}.arg-lower"
    pub.queue_declare(q1, arguments={"x-max-length": 5})
    pub.queue_declare(q2, arguments={"x-max-length": 0})
    for b in (b"1", b"2", b"3"):
        pub.basic_publish("", q1, b)
        pub.basic_publish("", q2, b)
    assert get_all(pub, q1) == [b"3"]
    assert get_all(pub, q2) == []
    pub.queue_delete(q1)
    pub.queue_delete(q2)


def test_the_argument_wins_for_overflow_and_dead_letter_exchange(policy_broker):
    prefix = uniq("pol")
    broker = policy_broker([dict(name=f"{prefix}-ovf", pattern=f"^{prefix}\\.",
                                 definition={"max-length": 1, "overflow": "reject-publish"})])
    pub = confirmed_channel(broker)
    by_policy, by_arg = f"{prefix}.policy", f"{prefix}.arg"
    pub.queue_declare(by_policy)
    pub.queue_declare(by_arg, arguments={"x-overflow": "drop-head"})
    pub.basic_publish("", by_policy, b"1")
    with pytest.raises(NackError):
        pub.basic_publish("", by_policy, b"2")
    pub.basic_publish("", by_arg, b"1")
    pub.basic_publish("", by_arg, b"2")  # drop-head: accepted
    assert get_all(pub, by_arg) == [b"2"]
    pub.queue_delete(by_policy)
    pub.queue_delete(by_arg)


def test_the_highest_priority_policy_is_the_only_one_applied(policy_broker):
    prefix = uniq("pol")
    broker = policy_broker([
        dict(name=f"{prefix}-low", pattern=f"^{prefix}", priority=1,
             definition={"max-length": 1}),
        dict(name=f"{prefix}-high", pattern=f"^{prefix}\\.special", priority=5,
             definition={"max-length-bytes": 1000}),
    ])
    pub = confirmed_channel(broker)
    special, plain = f"{prefix}.special", f"{prefix}.plain"
    pub.queue_declare(special)
    pub.queue_declare(plain)
    for b in (b"1", b"2"):
        pub.basic_publish("", special, b)
        pub.basic_publish("", plain, b)
    assert get_all(pub, special) == [b"1", b"2"], "max-length of the lower policy not merged"
    assert get_all(pub, plain) == [b"2"]
    pub.queue_delete(special)
    pub.queue_delete(plain)

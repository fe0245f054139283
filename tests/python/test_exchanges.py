"""Exchange types, exchange-to-exchange bindings, alternate/internal/auto-delete
exchanges and exchange.declare/delete rules, as RabbitMQ does them."""

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from helpers import (assert_closed, confirmed_channel, expect_channel_error, get_all,
                     wait_channel_closed)


def _queue(ch, names, exchange, key="", arguments=None):
    q = names("q")
    ch.queue_declare(q)
    ch.queue_bind(q, exchange, routing_key=key, arguments=arguments)
    return q


def test_predeclared_exchanges_exist(broker):
    ch = broker.connect().channel()
    for name, kind in [("amq.direct", "direct"), ("amq.fanout", "fanout"),
                       ("amq.topic", "topic"), ("amq.headers", "headers"),
                       ("amq.match", "headers")]:
        ch.exchange_declare(name, exchange_type=kind, passive=True)
        # a durable non-auto-delete exchange of that type: binding to it works
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, name, routing_key="k", arguments={"x-match": "any", "k": "v"})


def test_default_exchange_routes_by_queue_name(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    q = names("q")
    ch.queue_declare(q)
    pub.basic_publish("", q, b"to-q")
    pub.basic_publish("", names("nobody"), b"dropped")  # no such queue: silently dropped
    assert get_all(ch, q) == [b"to-q"]


def test_default_exchange_cannot_be_bound_or_deleted(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    expect_channel_error(lambda: ch.queue_bind(q, "", routing_key="x"), 403,
                         "ACCESS_REFUSED - operation not permitted on the default exchange")
    ch = conn.channel()
    expect_channel_error(lambda: ch.exchange_delete(""), 403,
                         "ACCESS_REFUSED - operation not permitted on the default exchange")


def test_direct_exchange(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x = names("direct")
    ch.exchange_declare(x, "direct")
    q1 = _queue(ch, names, x, "k1")
    q2 = _queue(ch, names, x, "k2")
    ch.queue_bind(q2, x, routing_key="k1")  # q2 bound twice
    for key in ("k1", "k2", "k3", ""):
        pub.basic_publish(x, key, key.encode())
    assert get_all(ch, q1) == [b"k1"]
    assert get_all(ch, q2) == [b"k1", b"k2"]


def test_fanout_exchange_ignores_routing_key(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x = names("fanout")
    ch.exchange_declare(x, "fanout")
    q1 = _queue(ch, names, x, "")
    q2 = _queue(ch, names, x, "whatever")
    pub.basic_publish(x, "any.key", b"a")
    pub.basic_publish(x, "", b"b")
    assert get_all(ch, q1) == [b"a", b"b"]
    assert get_all(ch, q2) == [b"a", b"b"]


TOPIC_KEYS = ["", "a", "b", "a.b", "a.c", "a.b.c", "a.x.y.b", "a.b.b", "x.a.b", "a..b", ".b",
              "a.", "#", "*"]

# binding pattern -> routing keys (from TOPIC_KEYS) it matches, as RabbitMQ routes them
TOPIC_CASES = {
    "#": TOPIC_KEYS,                                   # everything, including ""
    "": [""],                                          # only the empty key
    "*": ["a", "b", "#", "*"],                         # "" is zero words, not one empty word
    "a": ["a"],
    "a.#": ["a", "a.b", "a.c", "a.b.c", "a.x.y.b", "a.b.b", "a..b", "a."],  # zero words ok
    "a.*": ["a.b", "a.c", "a."],                       # exactly one word (may be empty)
    "a.#.b": ["a.b", "a.x.y.b", "a.b.b", "a..b"],
    "a.*.b": ["a.b.b", "a..b"],
    "#.b": ["b", "a.b", "a.x.y.b", "a.b.b", "x.a.b", "a..b", ".b"],
    "*.b": ["a.b", ".b"],
    "#.#": TOPIC_KEYS,
    "*.#": TOPIC_KEYS[1:],                             # all but "" ("a." and ".b" have an empty word)
    "a.b.c": ["a.b.c"],
}


def test_topic_exchange_patterns(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x = names("topic")
    ch.exchange_declare(x, "topic")
    queues = {pattern: _queue(ch, names, x, pattern) for pattern in TOPIC_CASES}
    for key in TOPIC_KEYS:
        pub.basic_publish(x, key, key.encode())
    for pattern, want in TOPIC_CASES.items():
        got = [b.decode() for b in get_all(ch, queues[pattern])]
        assert got == want, f"binding {pattern!r}"


def test_topic_queue_bound_by_overlapping_patterns_gets_one_copy(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x = names("topic")
    ch.exchange_declare(x, "topic")
    q = _queue(ch, names, x, "#")
    for pattern in ("a.*", "*.b", "a.b", "#.b"):
        ch.queue_bind(q, x, routing_key=pattern)
    pub.basic_publish(x, "a.b", b"once")
    assert get_all(ch, q) == [b"once"]


def _headers_publish(pub, x, headers, body):
    pub.basic_publish(x, "", body, pika.BasicProperties(headers=headers))


def test_headers_exchange_all_and_any(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x = names("headers")
    ch.exchange_declare(x, "headers")
    q_all = _queue(ch, names, x, arguments={"x-match": "all", "format": "pdf", "type": "report"})
    q_any = _queue(ch, names, x, arguments={"x-match": "any", "format": "pdf", "type": "report"})
    q_default = _queue(ch, names, x, arguments={"format": "pdf", "type": "report"})  # all
    q_empty = _queue(ch, names, x, arguments={"x-match": "all"})  # all of nothing
    q_void = _queue(ch, names, x, arguments={"x-match": "all", "format": None})  # any value

    _headers_publish(pub, x, {"format": "pdf", "type": "report", "extra": 1}, b"both")
    _headers_publish(pub, x, {"format": "pdf"}, b"format-only")
    _headers_publish(pub, x, {"type": "log"}, b"other-type")
    _headers_publish(pub, x, {}, b"none")
    _headers_publish(pub, x, None, b"no-table")
    _headers_publish(pub, x, {"format": "zip"}, b"zip")

    assert get_all(ch, q_all) == [b"both"]
    assert get_all(ch, q_default) == [b"both"]
    assert get_all(ch, q_any) == [b"both", b"format-only"]
    assert get_all(ch, q_empty) == [b"both", b"format-only", b"other-type", b"none",
                                    b"no-table", b"zip"]
    assert get_all(ch, q_void) == [b"both", b"format-only", b"zip"]


def test_headers_exchange_value_types_must_match(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x = names("headers")
    ch.exchange_declare(x, "headers")
    q = _queue(ch, names, x, arguments={"x-match": "all", "n": 1})
    _headers_publish(pub, x, {"n": 1}, b"int")
    _headers_publish(pub, x, {"n": "1"}, b"str")
    _headers_publish(pub, x, {"n": 2}, b"other")
    assert get_all(ch, q) == [b"int"]


def test_headers_exchange_x_prefixed_headers(broker, names):
    """all/any ignore binding arguments starting with 'x-'; all-with-x/any-with-x
    (RabbitMQ 3.10+) take them into account."""
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x = names("headers")
    ch.exchange_declare(x, "headers")
    q_all = _queue(ch, names, x, arguments={"x-match": "all", "x-tenant": "t1"})
    q_all_x = _queue(ch, names, x, arguments={"x-match": "all-with-x", "x-tenant": "t1",
                                              "kind": "a"})
    q_any_x = _queue(ch, names, x, arguments={"x-match": "any-with-x", "x-tenant": "t1",
                                              "kind": "a"})
    q_any = _queue(ch, names, x, arguments={"x-match": "any", "x-tenant": "t1", "kind": "a"})

    _headers_publish(pub, x, {"x-tenant": "t1", "kind": "a"}, b"t1-a")
    _headers_publish(pub, x, {"x-tenant": "t1"}, b"t1")
    _headers_publish(pub, x, {"kind": "a"}, b"a")
    _headers_publish(pub, x, {"x-tenant": "t2", "kind": "b"}, b"t2-b")

    assert get_all(ch, q_all) == [b"t1-a", b"t1", b"a", b"t2-b"]  # x-tenant ignored
    assert get_all(ch, q_all_x) == [b"t1-a"]
    assert get_all(ch, q_any_x) == [b"t1-a", b"t1", b"a"]
    assert get_all(ch, q_any) == [b"t1-a", b"a"]


def test_headers_exchange_invalid_x_match(broker, names):
    ch = broker.connect().channel()
    x = names("headers")
    ch.exchange_declare(x, "headers")
    q = names("q")
    ch.queue_declare(q)
    expect_channel_error(lambda: ch.queue_bind(q, x, arguments={"x-match": "some"}), 406,
                         "PRECONDITION_FAILED - Invalid x-match field value <<\"some\">>; "
                         "expected all, any, all-with-x, or any-with-x")


def test_exchange_to_exchange_binding(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    src, dst = names("src"), names("dst")
    ch.exchange_declare(src, "topic")
    ch.exchange_declare(dst, "fanout")
    ch.exchange_bind(destination=dst, source=src, routing_key="orders.*")
    q = _queue(ch, names, dst)
    q_src = _queue(ch, names, src, "orders.new")

    pub.basic_publish(src, "orders.new", b"new")
    pub.basic_publish(src, "orders.paid", b"paid")
    pub.basic_publish(src, "users.new", b"user")
    assert get_all(ch, q) == [b"new", b"paid"]
    assert get_all(ch, q_src) == [b"new"]

    ch.exchange_unbind(destination=dst, source=src, routing_key="orders.*")
    pub.basic_publish(src, "orders.new", b"after-unbind")
    assert get_all(ch, q) == []
    assert get_all(ch, q_src) == [b"after-unbind"]


def test_exchange_binding_cycle_delivers_once(broker, names):
    pub = confirmed_channel(broker)
    ch = broker.connect().channel()
    x1, x2 = names("x1"), names("x2")
    ch.exchange_declare(x1, "fanout")
    ch.exchange_declare(x2, "fanout")
    ch.exchange_bind(destination=x2, source=x1)
    ch.exchange_bind(destination=x1, source=x2)
    q1 = _queue(ch, names, x1)
    q2 = _queue(ch, names, x2)
    pub.basic_publish(x1, "", b"m")
    assert get_all(ch, q1) == [b"m"]
    assert get_all(ch, q2) == [b"m"]


def test_alternate_exchange(broker, names):
    pub = confirmed_channel(broker)
    returned = []
    pub.add_on_return_callback(lambda *a: returned.append(a))
    ch = broker.connect().channel()
    main, ae = names("main"), names("ae")
    ch.exchange_declare(ae, "fanout")
    ch.exchange_declare(main, "direct", arguments={"alternate-exchange": ae})
    q_routed = _queue(ch, names, main, "known")
    q_unrouted = _queue(ch, names, ae)

    pub.basic_publish(main, "known", b"routed")
    pub.basic_publish(main, "unknown", b"unrouted")
    # mandatory is satisfied by the alternate exchange: no basic.return
    pub.basic_publish(main, "unknown2", b"unrouted-mandatory", mandatory=True)
    assert get_all(ch, q_routed) == [b"routed"]
    assert get_all(ch, q_unrouted) == [b"unrouted", b"unrouted-mandatory"]
    assert returned == []


def test_internal_exchange(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    public, internal = names("public"), names("internal")
    ch.exchange_declare(internal, "fanout", internal=True)
    ch.exchange_declare(public, "direct")
    ch.exchange_bind(destination=internal, source=public, routing_key="k")
    q = _queue(ch, names, internal)

    pub = confirmed_channel(broker)
    pub.basic_publish(public, "k", b"via-public")  # routing through it is fine
    assert get_all(ch, q) == [b"via-public"]

    pub = broker.connect().channel()
    pub.basic_publish(internal, "k", b"direct")  # publishing to it is not
    reason = wait_channel_closed(pub)
    assert_closed(reason, 403, f"ACCESS_REFUSED - cannot publish to internal exchange "
                               f"'{internal}' in vhost '{broker.vhost}'")
    # the connection survives a channel error
    ch2 = pub.connection.channel()
    ch2.exchange_declare(internal, passive=True)


def test_auto_delete_exchange_goes_with_last_binding(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    x = names("autodel")
    ch.exchange_declare(x, "direct", auto_delete=True)
    ch.exchange_declare(x, passive=True)  # never bound: stays
    q1, q2 = names("q"), names("q")
    ch.queue_declare(q1)
    ch.queue_declare(q2)
    ch.queue_bind(q1, x, "a")
    ch.queue_bind(q2, x, "b")
    ch.queue_unbind(q1, x, "a")
    ch.exchange_declare(x, passive=True)  # one binding left
    ch.queue_unbind(q2, x, "b")
    expect_channel_error(lambda: ch.exchange_declare(x, passive=True), 404,
                         f"NOT_FOUND - no exchange '{x}' in vhost '{broker.vhost}'")


def test_auto_delete_exchange_goes_when_bound_queue_is_deleted(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    x = names("autodel")
    q = names("q")
    ch.exchange_declare(x, "fanout", auto_delete=True)
    ch.queue_declare(q)
    ch.queue_bind(q, x)
    ch.queue_delete(q)
    expect_channel_error(lambda: ch.exchange_declare(x, passive=True), 404,
                         f"NOT_FOUND - no exchange '{x}' in vhost '{broker.vhost}'")


def test_exchange_declare_is_idempotent(broker, names):
    ch = broker.connect().channel()
    x = names("x")
    for _ in range(3):
        ch.exchange_declare(x, "topic", durable=True)
    # passive ignores the other fields
    ch.exchange_declare(x, "fanout", passive=True)


@pytest.mark.parametrize("first,second,arg,received,current", [
    (dict(exchange_type="direct"), dict(exchange_type="fanout"), "type", "fanout", "direct"),
    (dict(exchange_type="direct", durable=True), dict(exchange_type="direct", durable=False),
     "durable", "false", "true"),
    (dict(exchange_type="direct"), dict(exchange_type="direct", auto_delete=True),
     "auto_delete", "true", "false"),
    (dict(exchange_type="direct"), dict(exchange_type="direct", internal=True),
     "internal", "true", "false"),
])
def test_exchange_declare_equivalence(broker, names, first, second, arg, received, current):
    conn = broker.connect()
    ch = conn.channel()
    x = names("x")
    ch.exchange_declare(x, **first)
    expect_channel_error(
        lambda: ch.exchange_declare(x, **second), 406,
        f"PRECONDITION_FAILED - inequivalent arg '{arg}' for exchange '{x}' in vhost "
        f"'{broker.vhost}': received '{received}' but current is '{current}'")
    conn.channel().exchange_declare(x, passive=True)  # unchanged, still there


def test_exchange_declare_passive_missing(broker, names):
    ch = broker.connect().channel()
    x = names("missing")
    expect_channel_error(lambda: ch.exchange_declare(x, passive=True), 404,
                         f"NOT_FOUND - no exchange '{x}' in vhost '{broker.vhost}'")


def test_exchange_declare_amq_prefix_refused(broker, names):
    ch = broker.connect().channel()
    name = "amq." + names("mine")
    expect_channel_error(lambda: ch.exchange_declare(name, "direct", durable=True), 403,
                         f"ACCESS_REFUSED - exchange name '{name}' contains reserved prefix "
                         f"'amq.*'")


def test_exchange_declare_existing_amq_exchange(broker):
    """Re-declaring a pre-declared amq.* exchange with its own properties is fine
    (equivalence is checked before the reserved-prefix rule); otherwise it is a 406."""
    conn = broker.connect()
    ch = conn.channel()
    ch.exchange_declare("amq.direct", "direct", durable=True)
    ch.exchange_declare("amq.topic", "topic", durable=True)
    expect_channel_error(
        lambda: ch.exchange_declare("amq.direct", "fanout", durable=True), 406,
        f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'amq.direct' in vhost "
        f"'{broker.vhost}': received 'fanout' but current is 'direct'")


def test_exchange_delete_if_unused(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    x = names("x")
    q = names("q")
    ch.exchange_declare(x, "direct")
    ch.queue_declare(q)
    ch.queue_bind(q, x, "k")
    expect_channel_error(lambda: ch.exchange_delete(x, if_unused=True), 406,
                         f"PRECONDITION_FAILED - exchange '{x}' in vhost '{broker.vhost}' "
                         f"in use")
    ch = conn.channel()
    ch.exchange_declare(x, passive=True)
    ch.queue_unbind(q, x, "k")
    ch.exchange_delete(x, if_unused=True)
    expect_channel_error(lambda: ch.exchange_declare(x, passive=True), 404, "NOT_FOUND")


def test_exchange_delete_removes_bindings_and_missing_is_ok(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    x = names("x")
    q = names("q")
    ch.exchange_declare(x, "fanout")
    ch.queue_declare(q)
    ch.queue_bind(q, x)
    ch.exchange_delete(x)
    ch.exchange_delete(x)  # deleting a missing exchange is not an error
    ch.exchange_declare(x, "fanout")  # re-created without the old binding
    pub = confirmed_channel(broker)
    pub.basic_publish(x, "", b"m")
    assert get_all(ch, q) == []


def test_unknown_exchange_type_closes_the_channel_only(broker, names):
    # RabbitMQ 4 (rabbitmq-server#11214): 406 on the channel; 3.x closed the connection with 503.
    conn = broker.connect()
    ch = conn.channel()
    other = conn.channel()
    x = names("x")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.exchange_declare(x, exchange_type="ZZwwInvalid")
    assert_closed(ei.value, 406, "PRECONDITION_FAILED - unknown exchange type 'ZZwwInvalid'")
    # The connection and its other channels go on, and nothing was declared.
    assert conn.is_open and other.is_open
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        other.exchange_declare(x, passive=True)
    assert_closed(ei.value, 404, f"NOT_FOUND - no exchange '{x}' in vhost '{broker.vhost}'")
    conn.channel().exchange_declare(x, "fanout")


def test_publish_to_missing_exchange(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    x = names("missing")
    ch.basic_publish(x, "k", b"m")
    reason = wait_channel_closed(ch)
    assert_closed(reason, 404, f"NOT_FOUND - no exchange '{x}' in vhost '{broker.vhost}'")
    assert isinstance(reason, ChannelClosedByBroker)
    conn.channel().queue_declare("", exclusive=True)  # connection still fine

"""Channel and connection errors with RabbitMQ's reply codes and texts, and that a
channel error leaves the connection (and its other channels) working."""

import pika
import pika.frame
import pika.spec
import pytest
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker

from helpers import (assert_closed, confirmed_channel, consume_n, drain_events,
                     expect_channel_error, get_all, parse_wrapped_close, uniq)


def _after_channel_error_connection_works(conn):
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    ch.basic_publish("", q, b"ok")
    assert get_all(ch, q) == [b"ok"]


@pytest.mark.parametrize("op", ["passive", "consume", "get", "purge", "bind"])
def test_no_queue_404(broker, names, op):
    conn = broker.connect()
    ch = conn.channel()
    q = names("missing")
    action = {
        "passive": lambda: ch.queue_declare(q, passive=True),
        "consume": lambda: ch.basic_consume(q, lambda *a: None),
        "get": lambda: ch.basic_get(q),
        "purge": lambda: ch.queue_purge(q),
        "bind": lambda: ch.queue_bind(q, "amq.direct", routing_key="k"),
    }[op]
    expect_channel_error(action, 404, f"NOT_FOUND - no queue '{q}' in vhost '{broker.vhost}'")
    assert ch.is_closed
    _after_channel_error_connection_works(conn)


@pytest.mark.parametrize("op", ["passive", "bind-queue", "bind-source", "bind-destination",
                                "publish-confirm"])
def test_no_exchange_404(broker, names, op):
    conn = broker.connect()
    ch = conn.channel()
    x = names("missing")
    q = names("q")
    ch.queue_declare(q)
    action = {
        "passive": lambda: ch.exchange_declare(x, passive=True),
        "bind-queue": lambda: ch.queue_bind(q, x, routing_key="k"),
        "bind-source": lambda: ch.exchange_bind(destination="amq.fanout", source=x),
        "bind-destination": lambda: ch.exchange_bind(destination=x, source="amq.fanout"),
        "publish-confirm": lambda: (ch.confirm_delivery(), ch.basic_publish(x, "k", b"m")),
    }[op]
    expect_channel_error(action, 404, f"NOT_FOUND - no exchange '{x}' in vhost '{broker.vhost}'")
    _after_channel_error_connection_works(conn)


def test_unbind_missing_binding_queue_or_exchange_is_ok(broker, names):
    """RabbitMQ answers unbind-ok when the binding, the queue or the exchange is missing."""
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    ch.queue_unbind(q, "amq.direct", routing_key="never-bound")
    ch.queue_unbind(names("missing"), "amq.direct", routing_key="k")
    ch.queue_unbind(q, names("missing"), routing_key="k")
    ch.exchange_unbind(destination="amq.fanout", source=names("missing"))
    assert ch.is_open


def test_channel_error_leaves_other_channels_alone(broker, names):
    conn = broker.connect()
    q = names("q")
    good = conn.channel()
    good.queue_declare(q)
    got = []
    good.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    bad = conn.channel()
    expect_channel_error(lambda: bad.queue_declare(names("missing"), passive=True), 404,
                         "NOT_FOUND - no queue")
    assert good.is_open and conn.is_open
    pub = confirmed_channel(broker)
    pub.basic_publish("", q, b"after")
    assert drain_events([conn], lambda: got == [b"after"])


def test_vhost_not_found_530(broker):
    vhost = uniq("no-such-vhost")
    with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
        broker.connect(vhost=vhost)
    # pika reports the broker's connection.close during connection.open as
    # ProbableAccessDeniedError wrapping "ConnectionClosedByBroker: (530) '<text>'"
    assert isinstance(ei.value, pika.exceptions.ProbableAccessDeniedError), repr(ei.value)
    assert_closed(parse_wrapped_close(ei.value), 530, f"NOT_ALLOWED - vhost {vhost} not found",
                  kind="connection")


def _raw_send_method(conn, channel_number, method):
    conn._impl._send_method(channel_number, method)


def _expect_connection_close(conn, code, text_prefix):
    with pytest.raises(ConnectionClosedByBroker) as ei:
        for _ in range(100):
            conn.process_data_events(time_limit=0.05)
    assert_closed(ei.value, code, text_prefix, kind="connection")


def test_method_on_unopened_channel_504(broker):
    conn = broker.connect()
    _raw_send_method(conn, 99, pika.spec.Queue.Declare(queue="", exclusive=True))
    _expect_connection_close(conn, 504, "CHANNEL_ERROR - expected 'channel.open'")


def test_second_channel_open_504(broker):
    conn = broker.connect()
    ch = conn.channel()
    _raw_send_method(conn, ch.channel_number, pika.spec.Channel.Open())
    _expect_connection_close(conn, 504, "CHANNEL_ERROR - second 'channel.open' seen")


def test_content_header_without_method_505(broker):
    conn = broker.connect()
    ch = conn.channel()
    conn._impl._send_frame(pika.frame.Header(ch.channel_number, 3, pika.BasicProperties()))
    _expect_connection_close(conn, 505, "UNEXPECTED_FRAME - expected method frame, got non "
                                        "method frame instead")


def test_prefetch_size_not_implemented_540(broker):
    conn = broker.connect()
    ch = conn.channel()
    with pytest.raises(ConnectionClosedByBroker) as ei:
        ch.basic_qos(prefetch_size=1, prefetch_count=0)
    assert_closed(ei.value, 540, "NOT_IMPLEMENTED - prefetch_size!=0 (1)", kind="connection")


def test_publish_immediate_not_implemented_540(broker, names):
    # pika's basic_publish has no `immediate`; older clients and ports of them send it.
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    conn._impl._send_message(
        ch.channel_number,
        pika.spec.Basic.Publish(exchange="", routing_key=q, immediate=True),
        (pika.BasicProperties(), b"m"))
    _expect_connection_close(conn, 540, "NOT_IMPLEMENTED - immediate=true")
    # Nothing was routed.
    check = broker.connect().channel()
    assert check.queue_declare(q, passive=True).method.message_count == 0


@pytest.mark.parametrize("args,detail", [
    ({"x-max-length": "ten"}, '"expected integer, got longstr"'),
    ({"x-max-length": -1}, "{value_negative,-1}"),
    ({"x-message-ttl": -5}, "{value_negative,-5}"),
    ({"x-expires": 0}, "{value_zero,0}"),
    ({"x-overflow": "explode"}, "invalid_overflow"),
    ({"x-queue-type": "nonsense"}, "\"unsupported queue type 'nonsense'\""),
])
def test_invalid_queue_arguments_406(broker, names, args, detail):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    [(arg, _)] = args.items()
    # the part after ': ' is an Erlang term printed as RabbitMQ 3.10 does
    prefix = (f"PRECONDITION_FAILED - invalid arg '{arg}' for queue '{q}' in vhost "
              f"'{broker.vhost}': {detail}")
    expect_channel_error(lambda: ch.queue_declare(q, arguments=args), 406, prefix)
    _after_channel_error_connection_works(conn)
    with pytest.raises(ChannelClosedByBroker):
        conn.channel().queue_declare(q, passive=True)  # nothing was created


def test_access_refused_403_keeps_connection(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = "amq." + names("q")
    expect_channel_error(lambda: ch.queue_declare(q), 403,
                         f"ACCESS_REFUSED - queue name '{q}' contains reserved prefix 'amq.*'")
    _after_channel_error_connection_works(conn)


def test_resource_locked_405_keeps_connection(broker, names):
    owner = broker.connect()
    q = names("excl")
    owner.channel().queue_declare(q, exclusive=True)
    conn = broker.connect()
    expect_channel_error(
        lambda: conn.channel().basic_consume(q, lambda *a: None), 405,
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost "
        f"'{broker.vhost}'. It could be originally declared on another connection or the "
        f"exclusive property value does not match that of the original declaration.")
    _after_channel_error_connection_works(conn)


def test_many_channel_errors_in_a_row(broker, names):
    conn = broker.connect()
    for _ in range(20):
        ch = conn.channel()
        with pytest.raises(ChannelClosedByBroker):
            ch.queue_declare(names("missing"), passive=True)
    _after_channel_error_connection_works(conn)


def test_unacked_messages_requeued_after_channel_error(broker, names):
    conn = broker.connect()
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    pub = confirmed_channel(broker)
    pub.basic_publish("", q, b"m")
    consume_n(ch, q, 1, auto_ack=False)
    with pytest.raises(ChannelClosedByBroker):
        ch.queue_declare(names("missing"), passive=True)
    ch = conn.channel()
    m, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"m" and m.redelivered is True

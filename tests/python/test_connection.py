"""Connection-level behaviour: server properties, tuning (frame_max, channel_max,
heartbeats), large messages, vhost selection, many channels."""

import hashlib
import os

import pika
import pika.frame
import pytest

from helpers import assert_closed, confirmed_channel, consume_n, get_all, uniq

BROKER_FRAME_MAX = 131072  # RabbitMQ's and Switchyard's default
BROKER_CHANNEL_MAX = 2047


def test_server_capabilities(broker):
    conn = broker.connect()
    props = conn._impl.server_properties
    caps = props["capabilities"]
    for cap in ("publisher_confirms", "exchange_exchange_bindings", "basic.nack",
                "consumer_cancel_notify", "connection.blocked", "authentication_failure_close",
                "per_consumer_qos", "direct_reply_to"):
        assert caps.get(cap) is True, cap
    for key in ("product", "version", "platform"):
        assert key in props, key
    assert conn.basic_nack_supported and conn.publisher_confirms_supported
    assert conn.exchange_exchange_bindings_supported


def test_tune_defaults(broker):
    conn = broker.connect(frame_max=131072, channel_max=65535)  # pika caps frame_max at 131072
    params = conn._impl.params
    assert params.frame_max == BROKER_FRAME_MAX
    assert params.channel_max == BROKER_CHANNEL_MAX


def test_client_frame_max_smaller_than_broker(broker, names, monkeypatch):
    """pika asks for frame_max 4096 (the minimum); the broker must send no frame larger
    than that, so a 100 kB body arrives in many body frames."""
    sizes = []
    real_decode = pika.frame.decode_frame

    def recording_decode(data):
        consumed, frame = real_decode(data)
        if frame is not None:
            sizes.append(consumed)
        return consumed, frame

    monkeypatch.setattr(pika.frame, "decode_frame", recording_decode)
    conn = broker.connect(frame_max=4096)
    assert conn._impl.params.frame_max == 4096
    ch = conn.channel()
    ch.confirm_delivery()
    q = names("q")
    ch.queue_declare(q)
    body = os.urandom(100_000)
    ch.basic_publish("", q, body)  # pika splits it into 4088-byte body frames
    sizes.clear()
    [(m, _, got)] = consume_n(ch, q, 1)
    assert got == body
    assert max(sizes) <= 4096
    assert len(sizes) >= 100_000 // 4088


def test_large_message_round_trip(broker, names):
    """A 10 MB body, published with confirms and consumed back intact."""
    pub = confirmed_channel(broker)
    q = names("big")
    pub.queue_declare(q)
    body = os.urandom(10 * 1024 * 1024)
    pub.basic_publish("", q, body, pika.BasicProperties(content_type="application/octet-stream"))
    ch = broker.connect().channel()
    [(m, props, got)] = consume_n(ch, q, 1, timeout=10)
    assert len(got) == len(body)
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
    assert props.content_type == "application/octet-stream"


def test_body_exactly_at_frame_boundaries(broker, names):
    """Bodies of size frame_max-8 (one full body frame) and around it."""
    pub = confirmed_channel(broker)
    q = names("q")
    pub.queue_declare(q)
    payload = BROKER_FRAME_MAX - 8
    bodies = [os.urandom(n) for n in (payload - 1, payload, payload + 1, 2 * payload)]
    for b in bodies:
        pub.basic_publish("", q, b)
    assert get_all(pub, q) == bodies


def test_heartbeat_keeps_idle_connection_open(broker, names):
    conn = broker.connect(heartbeat=1)
    assert conn._impl.params.heartbeat == 1
    ch = conn.channel()
    q = names("q")
    ch.queue_declare(q)
    conn.process_data_events(time_limit=3.2)  # idle: only heartbeats flow
    assert conn.is_open
    ch.confirm_delivery()
    ch.basic_publish("", q, b"still here")
    assert get_all(ch, q) == [b"still here"]


def test_heartbeat_broker_value_accepted(broker):
    """With heartbeat=None pika takes the broker's proposal (RabbitMQ: 60 s)."""
    conn = broker.connect(heartbeat=None)
    assert conn._impl.params.heartbeat == 60


def test_heartbeat_disabled_by_client(broker):
    conn = broker.connect(heartbeat=0)
    assert conn._impl.params.heartbeat == 0
    conn.process_data_events(time_limit=0.5)
    assert conn.is_open


def test_default_vhost_from_url(broker, names):
    """amqp://host:port (no path) and .../%2F both mean vhost '/'."""
    base = f"amqp://{broker.username}:{broker.password}@{broker.host}:{broker.port}"
    if broker.vhost != "/":
        pytest.skip("external broker URL names another vhost")
    q = names("q")
    for url in (base, base + "/", base + "/%2F"):
        params = pika.URLParameters(url + "?connection_attempts=1&socket_timeout=5")
        conn = pika.BlockingConnection(params)
        try:
            assert params.virtual_host == "/"
            ch = conn.channel()
            ch.queue_declare(q)  # the same queue each time: the same vhost
            assert ch.queue_declare(q, passive=True).method.queue == q
        finally:
            conn.close()


def test_many_channels(broker, names):
    conn = broker.connect()
    q = names("q")
    chans = [conn.channel() for _ in range(50)]
    chans[0].queue_declare(q)
    for i, ch in enumerate(chans):
        ch.confirm_delivery()
        ch.basic_publish("", q, str(i).encode())
    assert sorted(int(b) for b in get_all(chans[-1], q)) == list(range(50))
    for ch in chans[::2]:
        ch.close()
    for ch in chans[1::2]:
        assert ch.is_open
    # channel numbers can be reused after close
    again = conn.channel()
    again.queue_declare(q, passive=True)


def test_channel_close_and_reopen_same_number(broker):
    conn = broker.connect()
    ch = conn.channel(channel_number=7)
    ch.close()
    ch = conn.channel(channel_number=7)
    ch.queue_declare("", exclusive=True)


def test_connection_close_is_clean(broker):
    conn = pika.BlockingConnection(broker.params())
    conn.channel()
    conn.close()
    assert conn.is_closed


def test_publish_blocked_callbacks_registered(broker):
    """The connection.blocked capability lets pika register callbacks (no alarm here)."""
    conn = broker.connect()
    events = []
    conn.add_on_connection_blocked_callback(lambda *a: events.append("blocked"))
    conn.add_on_connection_unblocked_callback(lambda *a: events.append("unblocked"))
    conn.process_data_events(time_limit=0.2)
    assert events == []


# ------------------------------------------------------------- non-default broker config


@pytest.mark.broker_config
def test_configured_frame_max(broker_factory):
    broker = broker_factory(limits={"frame_max": 8192})
    conn = broker.connect(frame_max=131072)
    assert conn._impl.params.frame_max == 8192
    ch = conn.channel()
    ch.confirm_delivery()
    q = uniq("framemax")
    ch.queue_declare(q)
    body = os.urandom(50_000)
    ch.basic_publish("", q, body)
    assert get_all(ch, q) == [body]


@pytest.mark.broker_config
def test_configured_channel_max(broker_factory):
    broker = broker_factory(limits={"channel_max": 10})
    conn = broker.connect(channel_max=65535)
    assert conn._impl.params.channel_max == 10
    for _ in range(10):
        conn.channel()
    with pytest.raises(pika.exceptions.NoFreeChannels):
        conn.channel()


@pytest.mark.broker_config
def test_configured_heartbeat(broker_factory):
    broker = broker_factory(limits={"heartbeat_secs": 5})
    conn = broker.connect(heartbeat=None)
    assert conn._impl.params.heartbeat == 5


@pytest.mark.broker_config
def test_configured_max_message_size(broker_factory):
    broker = broker_factory(limits={"max_message_size": 4096})
    conn = broker.connect()
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    ch.basic_publish("", q, os.urandom(4096))  # at the limit: fine
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.basic_publish("", q, os.urandom(4097))
    assert_closed(ei.value, 406,
                  "PRECONDITION_FAILED - message size 4097 is larger than configured max size "
                  "4096")
    assert conn.channel().queue_declare(q, passive=True).method.message_count == 1

"""Direct reply-to: the pseudo-queue amq.rabbitmq.reply-to."""

import uuid

import pika

from helpers import assert_closed, consume_n, drain_events, expect_channel_error, wait_channel_closed

REPLY_TO = "amq.rabbitmq.reply-to"


def test_direct_reply_to_rpc(broker, names):
    rpc_queue = names("rpc")

    server_conn = broker.connect()
    server = server_conn.channel()
    server.queue_declare(rpc_queue)
    seen_reply_to = []

    def on_request(ch, method, props, body):
        seen_reply_to.append(props.reply_to)
        ch.basic_publish("", props.reply_to, body.upper(),
                         pika.BasicProperties(correlation_id=props.correlation_id))
        ch.basic_ack(method.delivery_tag)

    server.basic_consume(rpc_queue, on_request)

    client_conn = broker.connect()
    client = client_conn.channel()
    replies = []
    client.basic_consume(REPLY_TO, lambda c, m, p, b: replies.append((m, p, b)), auto_ack=True)
    corr = [str(uuid.uuid4()) for _ in range(3)]
    for i, c in enumerate(corr):
        client.basic_publish("", rpc_queue, f"hello {i}".encode(),
                             pika.BasicProperties(reply_to=REPLY_TO, correlation_id=c))
    assert drain_events([client_conn, server_conn], lambda: len(replies) == 3)
    assert [b for _, _, b in replies] == [b"HELLO 0", b"HELLO 1", b"HELLO 2"]
    assert [p.correlation_id for _, p, _ in replies] == corr
    # the responder sees a generated name, not the pseudo-queue's
    for name in seen_reply_to:
        assert name.startswith(REPLY_TO + ".") and len(name) > len(REPLY_TO) + 1
    assert len(set(seen_reply_to)) == 1  # one per channel
    m = replies[0][0]
    assert m.exchange == "" and m.routing_key == seen_reply_to[0]


def test_direct_reply_to_needs_auto_ack(broker):
    ch = broker.connect().channel()
    expect_channel_error(lambda: ch.basic_consume(REPLY_TO, lambda *a: None, auto_ack=False),
                         406, "PRECONDITION_FAILED - reply consumer cannot acknowledge")


def test_direct_reply_to_publish_without_consumer(broker, names):
    q = names("q")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"x", pika.BasicProperties(reply_to=REPLY_TO))
    reason = wait_channel_closed(ch)
    assert_closed(reason, 406, "PRECONDITION_FAILED - fast reply consumer does not exist")


def test_direct_reply_to_passive_declare(broker):
    """The pseudo-queue can be passively declared; RabbitMQ answers message_count 0 and
    consumer_count 1 (hard-coded), so clients that check for a consumer are happy."""
    ch = broker.connect().channel()
    ok = ch.queue_declare(REPLY_TO, passive=True)
    assert ok.method.queue == REPLY_TO
    assert (ok.method.message_count, ok.method.consumer_count) == (0, 1)


def test_direct_reply_to_reply_after_requester_gone_is_dropped(broker, names):
    rpc_queue = names("rpc")
    server_conn = broker.connect()
    server = server_conn.channel()
    server.queue_declare(rpc_queue)
    client_conn = broker.connect()
    client = client_conn.channel()
    client.basic_consume(REPLY_TO, lambda *a: None, auto_ack=True)
    client.basic_publish("", rpc_queue, b"q", pika.BasicProperties(reply_to=REPLY_TO))
    server.confirm_delivery()
    [(_, props, _)] = consume_n(server, rpc_queue, 1)
    client_conn.close()
    # replying to a channel that is gone does not fail the responder
    server.basic_publish("", props.reply_to, b"late")
    assert server.is_open

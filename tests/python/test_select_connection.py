"""pika's asynchronous SelectConnection: callbacks all the way, ioloop stops itself."""

import pika
import pika.spec

from helpers import uniq

GUARD_SECONDS = 8


class AsyncRoundTrip:
    """Declare a queue, consume it, publish N messages with confirms, ack what arrives,
    then close the connection and stop the ioloop."""

    def __init__(self, params, queue, count=20):
        self.params = params
        self.queue = queue
        self.count = count
        self.confirmed = set()
        self.nacked = set()
        self.received = []
        self.closed_reason = None
        self.timed_out = False
        self.channel = None
        self.conn = pika.SelectConnection(
            params,
            on_open_callback=self.on_open,
            on_open_error_callback=self.on_open_error,
            on_close_callback=self.on_close)

    def run(self):
        self.conn.ioloop.call_later(GUARD_SECONDS, self.on_guard)
        self.conn.ioloop.start()

    def on_guard(self):
        self.timed_out = True
        if self.conn.is_open:
            self.conn.close()
        else:
            self.conn.ioloop.stop()

    def on_open_error(self, conn, err):
        self.closed_reason = err
        conn.ioloop.stop()

    def on_open(self, conn):
        conn.channel(on_open_callback=self.on_channel)

    def on_channel(self, ch):
        self.channel = ch
        ch.queue_declare(self.queue, exclusive=True, callback=self.on_declared)

    def on_declared(self, frame):
        assert frame.method.queue == self.queue
        self.channel.basic_qos(prefetch_count=5, callback=self.on_qos)

    def on_qos(self, _frame):
        self.channel.basic_consume(self.queue, self.on_message, callback=self.on_consume_ok)

    def on_consume_ok(self, _frame):
        self.channel.confirm_delivery(self.on_confirm, callback=self.on_confirm_selected)

    def on_confirm_selected(self, _frame):
        for i in range(self.count):
            self.channel.basic_publish("", self.queue, f"msg {i}".encode(),
                                       pika.BasicProperties(message_id=str(i)))

    def on_confirm(self, frame):
        m = frame.method
        tags = set(range(1, m.delivery_tag + 1)) if m.multiple else {m.delivery_tag}
        if isinstance(m, pika.spec.Basic.Ack):
            self.confirmed |= tags
        else:
            self.nacked |= tags
        self.maybe_done()

    def on_message(self, ch, method, props, body):
        self.received.append((method.delivery_tag, props.message_id, body))
        ch.basic_ack(method.delivery_tag)
        self.maybe_done()

    def maybe_done(self):
        if len(self.received) == self.count and len(self.confirmed) == self.count:
            self.conn.close()

    def on_close(self, conn, reason):
        self.closed_reason = reason
        conn.ioloop.stop()


def test_select_connection_round_trip(broker):
    rt = AsyncRoundTrip(broker.params(), uniq("async"))
    rt.run()
    assert not rt.timed_out, (len(rt.received), len(rt.confirmed))
    assert isinstance(rt.closed_reason, pika.exceptions.ConnectionClosedByClient)
    assert rt.confirmed == set(range(1, rt.count + 1)) and not rt.nacked
    assert [b for _, _, b in rt.received] == [f"msg {i}".encode() for i in range(rt.count)]
    assert [t for t, _, _ in rt.received] == list(range(1, rt.count + 1))


def test_select_connection_channel_close_callback(broker):
    """An async client sees the broker's channel.close (404) in on_close, and can open
    another channel on the same connection."""
    state = {"reason": None, "second_ok": False, "timed_out": False}
    missing = uniq("missing")

    def on_open(conn):
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch):
        ch.add_on_close_callback(on_channel_closed)
        ch.queue_declare(missing, passive=True)

    def on_channel_closed(ch, reason):
        state["reason"] = reason
        ch.connection.channel(on_open_callback=on_second)

    def on_second(ch):
        ch.queue_declare("", exclusive=True, callback=lambda f: on_declared(ch, f))

    def on_declared(ch, frame):
        state["second_ok"] = frame.method.queue.startswith("amq.gen-")
        ch.connection.close()

    def guard():
        state["timed_out"] = True
        conn.ioloop.stop()

    conn = pika.SelectConnection(broker.params(), on_open_callback=on_open,
                                 on_open_error_callback=lambda c, e: c.ioloop.stop(),
                                 on_close_callback=lambda c, r: c.ioloop.stop())
    conn.ioloop.call_later(GUARD_SECONDS, guard)
    conn.ioloop.start()
    assert not state["timed_out"]
    reason = state["reason"]
    assert isinstance(reason, pika.exceptions.ChannelClosedByBroker)
    assert reason.reply_code == 404
    assert reason.reply_text.startswith(f"NOT_FOUND - no queue '{missing}' in vhost '")
    assert state["second_ok"]


def test_select_connection_mandatory_return(broker):
    state = {"returned": None, "timed_out": False}
    missing = uniq("missing")

    def on_open(conn):
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch):
        ch.add_on_return_callback(on_return)
        ch.basic_publish("", missing, b"nowhere", mandatory=True)

    def on_return(ch, method, props, body):
        state["returned"] = (method.reply_code, method.reply_text, method.routing_key, body)
        ch.connection.close()

    def guard():
        state["timed_out"] = True
        conn.ioloop.stop()

    conn = pika.SelectConnection(broker.params(), on_open_callback=on_open,
                                 on_open_error_callback=lambda c, e: c.ioloop.stop(),
                                 on_close_callback=lambda c, r: c.ioloop.stop())
    conn.ioloop.call_later(GUARD_SECONDS, guard)
    conn.ioloop.start()
    assert not state["timed_out"]
    assert state["returned"] == (312, "NO_ROUTE", missing, b"nowhere")

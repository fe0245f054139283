"""Resource alarms: over the memory watermark or under the disk free limit, publishing
connections get connection.blocked and are not read from until the alarm clears
(RabbitMQ's behaviour); consumers keep working, so a queue can drain."""
import time

import pytest


def _blocked_recorder(conn):
    events = []
    conn.add_on_connection_blocked_callback(lambda _c, m: events.append("blocked"))
    conn.add_on_connection_unblocked_callback(lambda _c, m: events.append("unblocked"))
    return events


def _pump(conn, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    return until()


@pytest.mark.broker_config
def test_memory_alarm_blocks_publishers_until_consumers_drain(broker_factory, names):
    # The alarm measures the broker's resident memory: 128 MiB is well above an
    # idle debug broker (~35 MB) plus what handling the messages leaves in use
    # (buffers, allocator fragmentation), so the alarm stays clear once the queue
    # is drained; a flood of 8 KiB messages reaches it.
    broker = broker_factory(limits={"memory_high_watermark_bytes": 128 * 1024 * 1024})
    q = names("q")
    pub_conn = broker.connect()
    events = _blocked_recorder(pub_conn)
    pub = pub_conn.channel()
    pub.queue_declare(q)
    # No confirms while flooding: the broker stops reading a blocked connection
    # wherever it is, often inside a message, so a confirm for that message only
    # comes once the alarm clears. pika returns from a publish once the kernel
    # took all of it: the few messages written before connection.blocked is seen
    # must fit in the socket buffers the broker no longer reads, so they are small.
    body = b"x" * (8 * 1024)
    sent = 0
    while "blocked" not in events and sent < 50000:
        pub.basic_publish("", q, body)
        sent += 1
        pub_conn.process_data_events(time_limit=0)
    # The client is told it is blocked (and the broker stops reading from it).
    assert _pump(pub_conn, lambda: "blocked" in events), events
    assert sent < 50000, "never blocked"

    # A consumer on another connection still works and drains the queue.
    cons_conn = broker.connect()
    cons = cons_conn.channel()
    got = 0
    for method, _props, _body in cons.consume(q, auto_ack=True, inactivity_timeout=5):
        # What the broker had not read of the publisher's messages is read as
        # soon as the alarm clears (it may clear and set again meanwhile).
        pub_conn.process_data_events(time_limit=0)
        if method is None:
            break
        got += 1
        if got == sent:
            break
    assert got == sent
    assert _pump(pub_conn, lambda: "unblocked" in events), events
    confirmed = pub_conn.channel()
    confirmed.confirm_delivery()
    confirmed.basic_publish("", q, b"after")  # confirmed again once unblocked


@pytest.mark.broker_config
def test_disk_alarm_blocks_publishers(broker_factory, names):
    # A limit no disk can meet: the alarm is set as soon as the broker starts.
    broker = broker_factory(limits={"disk_free_limit_bytes": 2**62})
    q = names("q")
    conn = broker.connect()
    events = _blocked_recorder(conn)
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_publish("", q, b"first")
    assert _pump(conn, lambda: "blocked" in events), events

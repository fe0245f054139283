"""STOMP with stomp.py over TCP (and its WebSocket transport) against Switchyard:
versions, destinations, acks, transactions, receipts, heart-beats, errors."""

from __future__ import annotations

import socket
import time

import pytest
import stomp

from stomp_helpers import connect, subscribe


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_each_version_sends_and_receives(stomp_broker, version):
    conn, lst = connect(stomp_broker, version)
    if version == "1.0":
        conn.subscribe("/queue/v10", ack="auto", receipt="s")
    else:
        conn.subscribe("/queue/v" + version, id="s1", ack="auto", receipt="s")
    lst.receipt("s")
    dest = "/queue/v10" if version == "1.0" else "/queue/v" + version
    conn.send(dest, "hello " + version)
    m = lst.message()
    assert m.body == "hello " + version
    assert m.headers["destination"] == dest
    conn.disconnect()


def test_queue_ack_nack_and_redelivery(stomp_broker):
    conn, lst = connect(stomp_broker)
    subscribe(conn, lst, "/queue/jobs", "s", ack="client-individual")
    for i in range(3):
        conn.send("/queue/jobs", f"job {i}")
    m = [lst.message() for _ in range(3)]
    conn.ack(m[1].headers["ack"])
    conn.nack(m[0].headers["ack"])  # requeue by default
    again = lst.message()
    assert again.body == "job 0"
    assert again.headers.get("redelivered") == "true"
    conn.ack(again.headers["ack"])
    conn.ack(m[2].headers["ack"], receipt="acked")
    lst.receipt("acked")
    conn.disconnect()


def test_client_ack_is_cumulative(stomp_broker):
    conn, lst = connect(stomp_broker)
    for i in range(3):
        conn.send("/queue/cumulative", f"m{i}")
    subscribe(conn, lst, "/queue/cumulative", "s", ack="client")
    m = [lst.message() for _ in range(3)]
    conn.ack(m[2].headers["ack"], receipt="all")
    lst.receipt("all")
    conn.disconnect()
    # Nothing left to redeliver.
    conn, lst = connect(stomp_broker)
    subscribe(conn, lst, "/queue/cumulative", "s2")
    lst.quiet()


def test_topic_wildcards_and_the_concrete_destination(stomp_broker):
    sub, lst = connect(stomp_broker)
    subscribe(sub, lst, "/topic/sensors.*.temp", "t")
    pub, _ = connect(stomp_broker)
    pub.send("/topic/sensors.room1.temp", "21.5")
    pub.send("/topic/sensors.room1.humidity", "40")
    m = lst.message()
    assert (m.headers["destination"], m.body) == ("/topic/sensors.room1.temp", "21.5")
    assert m.headers["subscription"] == "t"
    lst.quiet()


def test_durable_topic_subscription_resumes(stomp_broker):
    sub, lst = connect(stomp_broker)
    subscribe(sub, lst, "/topic/news.#", "d1", ack="client", durable="true",
              **{"auto-delete": "false"})
    sub.disconnect()
    pub, plst = connect(stomp_broker)
    pub.send("/topic/news.local", "while you were away", persistent="true", receipt="p")
    plst.receipt("p")
    sub, lst = connect(stomp_broker)
    subscribe(sub, lst, "/topic/news.#", "d1", ack="client", durable="true",
              **{"auto-delete": "false"})
    m = lst.message()
    assert m.body == "while you were away"
    sub.ack(m.headers["ack"])


def test_transactions(stomp_broker):
    sub, lst = connect(stomp_broker)
    subscribe(sub, lst, "/queue/tx", "s")
    pub, plst = connect(stomp_broker)
    tx = pub.begin()
    pub.send("/queue/tx", "committed", transaction=tx)
    lst.quiet()
    pub.commit(tx)
    assert lst.message().body == "committed"
    tx = pub.begin()
    pub.send("/queue/tx", "aborted", transaction=tx)
    pub.abort(tx)
    pub.send("/queue/tx", "after", receipt="r")
    plst.receipt("r")
    assert lst.message().body == "after"


def test_disconnect_receipt_then_close(stomp_broker):
    conn, lst = connect(stomp_broker)
    conn.send("/queue/q", "x", persistent="true", receipt="sent")
    lst.receipt("sent")
    conn.disconnect(receipt="bye")
    assert not conn.is_connected()


def test_binary_body_with_nul(stomp_broker):
    conn, lst = connect(stomp_broker, auto_decode=False)
    subscribe(conn, lst, "/queue/bin", "s")
    payload = bytes(range(256)) * 10
    conn.send("/queue/bin", payload)
    m = lst.message()
    assert m.body == payload
    assert m.headers["content-length"] == str(len(payload))


def test_heartbeats_keep_an_idle_connection_alive(stomp_broker):
    conn, lst = connect(stomp_broker, heartbeats=(1000, 1000))
    subscribe(conn, lst, "/queue/hb", "s")
    time.sleep(3.5)  # several heart-beat intervals with no frames either way
    assert conn.is_connected()
    conn.send("/queue/hb", "still alive")
    assert lst.message().body == "still alive"


def test_a_silent_client_that_promised_heartbeats_is_dropped(stomp_broker):
    s = socket.create_connection(stomp_broker.stomp)
    s.sendall(b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n"
              b"heart-beat:1000,0\n\n\0")
    s.settimeout(10)
    got = b""
    while b"\0" not in got:
        got += s.recv(4096)
    assert got.startswith(b"CONNECTED\n")
    assert b"heart-beat:0,1000" in got
    started = time.monotonic()
    while True:  # nothing sent: the broker gives up after two intervals
        chunk = s.recv(4096)
        if not chunk:
            break
    assert 1.5 < time.monotonic() - started < 6


def test_errors_close_only_the_offending_connection(stomp_broker):
    bystander, blst = connect(stomp_broker)
    subscribe(bystander, blst, "/queue/by", "s")
    conn, lst = connect(stomp_broker)
    conn.send("/nowhere/x", "x", receipt="bad")
    e = lst.error()
    assert e.headers["message"] == "invalid destination"
    assert e.headers.get("receipt-id") == "bad"
    assert "/nowhere/x" in e.body
    lst.wait_disconnected()
    # Raw garbage on another connection.
    s = socket.create_connection(stomp_broker.stomp)
    s.sendall(b"HELLO\n\n\0")
    s.settimeout(10)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"ERROR\n") and b"message:not connected" in data or \
        b"message:unknown command" in data, data
    bystander.send("/queue/by", "fine")
    assert blst.message().body == "fine"


def test_bad_login_is_refused(stomp_broker):
    conn = stomp.Connection12([stomp_broker.stomp])
    with pytest.raises(stomp.exception.ConnectFailedException):
        conn.connect("guest", "nope", wait=True)


def test_stomp_py_over_websocket(stomp_broker):
    conn, lst = connect(stomp_broker, ws=True)
    subscribe(conn, lst, "/topic/ws.#", "w")
    tcp, _ = connect(stomp_broker)
    tcp.send("/topic/ws.hello", "from tcp")
    m = lst.message()
    assert (m.body, m.headers["destination"]) == ("from tcp", "/topic/ws.hello")
    conn.send("/queue/from-ws", "from ws", receipt="w1")
    lst.receipt("w1")
    conn.disconnect()

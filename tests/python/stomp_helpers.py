"""Helpers for the stomp.py tests: a listener that collects frames in a queue,
and connection helpers bound to the ``stomp_broker`` fixture."""

from __future__ import annotations

import queue
import time
from typing import Optional

import stomp

WAIT = 10.0


class Collector(stomp.ConnectionListener):
    """Keeps every frame the broker sends (MESSAGE, RECEIPT, ERROR) in arrival
    order, and whether the connection was lost."""

    def __init__(self):
        self.frames: "queue.Queue" = queue.Queue()
        self.disconnected = False

    def on_message(self, frame):
        self.frames.put(("MESSAGE", frame))

    def on_receipt(self, frame):
        self.frames.put(("RECEIPT", frame))

    def on_error(self, frame):
        self.frames.put(("ERROR", frame))

    def on_disconnected(self):
        self.disconnected = True

    def next(self, timeout: float = WAIT):
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no STOMP frame within {timeout}s") from None

    def message(self, timeout: float = WAIT):
        kind, frame = self.next(timeout)
        assert kind == "MESSAGE", f"expected MESSAGE, got {kind}: {frame.headers} {frame.body!r}"
        return frame

    def receipt(self, receipt_id: str, timeout: float = WAIT):
        """Waits for a RECEIPT; messages that come first are kept for later."""
        held = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                kind, frame = self.next(max(0.01, deadline - time.monotonic()))
                if kind == "RECEIPT" and frame.headers.get("receipt-id") == receipt_id:
                    return frame
                assert kind != "ERROR", f"ERROR instead of RECEIPT: {frame.headers} {frame.body}"
                held.append((kind, frame))
        finally:
            rest = []
            while not self.frames.empty():
                rest.append(self.frames.get_nowait())
            for item in held + rest:
                self.frames.put(item)

    def error(self, timeout: float = WAIT):
        kind, frame = self.next(timeout)
        assert kind == "ERROR", f"expected ERROR, got {kind}: {frame.headers}"
        return frame

    def quiet(self, seconds: float = 0.3) -> None:
        """Asserts that nothing arrives for a while."""
        try:
            kind, frame = self.frames.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected {kind}: {frame.headers} {frame.body!r}")

    def wait_disconnected(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not self.disconnected:
            assert time.monotonic() < deadline, "the broker did not close the connection"
            time.sleep(0.02)


_CONNECTIONS = {"1.0": stomp.Connection10, "1.1": stomp.Connection11, "1.2": stomp.Connection12}


def connect(broker, version: str = "1.2", heartbeats=(0, 0), login: str = "guest",
            passcode: str = "guest", auto_decode: bool = True, ws: bool = False,
            vhost: Optional[str] = None):
    """A connected stomp.py connection and its Collector."""
    if ws:
        conn = stomp.WSStompConnection([broker.stomp_ws], ws_path="/ws", heartbeats=heartbeats,
                                       auto_decode=auto_decode, vhost=vhost,
                                       header=["Sec-WebSocket-Protocol: v12.stomp"])
    elif version == "1.0":
        conn = stomp.Connection10([broker.stomp], auto_decode=auto_decode)
    else:
        conn = _CONNECTIONS[version]([broker.stomp], heartbeats=heartbeats,
                                     auto_decode=auto_decode, vhost=vhost)
    listener = Collector()
    conn.set_listener("collector", listener)
    conn.connect(login, passcode, wait=True)
    return conn, listener


def subscribe(conn, listener, destination: str, sub_id: str, ack: str = "auto", **headers):
    """SUBSCRIBE and wait for its receipt (so the subscription exists)."""
    receipt = f"sub-{sub_id}"
    conn.subscribe(destination, sub_id, ack=ack, headers=headers, receipt=receipt)
    listener.receipt(receipt)

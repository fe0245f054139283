"""A small synchronous wrapper around paho-mqtt (2.x) for the MQTT tests: every
callback lands in a queue, so a test can wait for exactly what it expects."""

from __future__ import annotations

import queue
import time
from typing import Optional

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

WAIT = 10

VERSIONS = {3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}


def props(kind=PacketTypes.PUBLISH, **values) -> Properties:
    """``props(ResponseTopic="x", CorrelationData=b"1")``."""
    p = Properties(kind)
    for k, v in values.items():
        setattr(p, k, v)
    return p


class Client:
    """A connected paho client (TCP or WebSocket) whose events are queued."""

    def __init__(self, addr, client_id: str, version: int = 4, transport: str = "tcp",
                 clean: bool = True, username: Optional[str] = "guest",
                 password: Optional[str] = "guest", will: Optional[dict] = None,
                 connect_props: Optional[Properties] = None, keepalive: int = 30,
                 expect_rc: int = 0, max_inflight: Optional[int] = None):
        self.version = version
        kwargs = {}
        if version != 5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=VERSIONS[version], transport=transport, **kwargs)
        if transport == "websockets":
            self.c.ws_set_options(path="/ws")
        self.messages: queue.Queue = queue.Queue()
        self.connacks: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.unsubacks: queue.Queue = queue.Queue()
        self.published: queue.Queue = queue.Queue()
        self.disconnects: queue.Queue = queue.Queue()
        self.c.on_connect = lambda c, u, flags, rc, p: self.connacks.put((rc, flags, p))
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put((mid, rcs))
        self.c.on_unsubscribe = lambda c, u, mid, rcs, p: self.unsubacks.put((mid, rcs))
        self.c.on_publish = lambda c, u, mid, rc, p: self.published.put((mid, rc))
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        if username is not None:
            self.c.username_pw_set(username, password)
        if will:
            self.c.will_set(**will)
        if max_inflight is not None:
            # paho's own limit of unacknowledged QoS 1/2 PUBLISHes (0 = none).
            self.c.max_inflight_messages_set(max_inflight)
        host, port = addr
        if version == 5:
            self.c.connect(host, port, keepalive, clean_start=clean, properties=connect_props)
        else:
            self.c.connect(host, port, keepalive)
        self.c.loop_start()
        rc, flags, p = self.connacks.get(timeout=WAIT)
        self.rc, self.session_present, self.connack_props = rc, flags.session_present, p
        if expect_rc == 0:
            assert rc == 0, f"CONNACK {rc}"
        else:
            assert rc.value == expect_rc, f"CONNACK {rc} != {expect_rc}"
            self.stop()

    def subscribe(self, topic: str, qos: int = 0, options: Optional[SubscribeOptions] = None,
                  properties: Optional[Properties] = None) -> list:
        if self.version == 5:
            _, mid = self.c.subscribe(topic, options=options or SubscribeOptions(qos=qos),
                                      properties=properties)
        else:
            _, mid = self.c.subscribe(topic, qos)
        got_mid, rcs = self.subacks.get(timeout=WAIT)
        assert got_mid == mid
        return [rc.value if hasattr(rc, "value") else rc for rc in rcs]

    def unsubscribe(self, topic: str) -> list:
        _, mid = self.c.unsubscribe(topic)
        got_mid, rcs = self.unsubacks.get(timeout=WAIT)
        assert got_mid == mid
        return [rc.value if hasattr(rc, "value") else rc for rc in (rcs or [])]

    def publish(self, topic: str, payload, qos: int = 0, retain: bool = False,
                properties: Optional[Properties] = None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0:
            # The PUBACK / PUBCOMP came back.
            # on_publish also fires for earlier QoS 0 publishes: skip those.
            while True:
                mid, rc = self.published.get(timeout=WAIT)
                if mid == info.mid:
                    return rc.value if hasattr(rc, "value") else rc
        info.wait_for_publish(WAIT)
        return None

    def next(self, timeout: float = WAIT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def nothing_within(self, seconds: float) -> bool:
        try:
            m = self.messages.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected message on {m.topic}: {m.payload!r}")

    def kill(self):
        """Drops the connection without DISCONNECT (as a crash would)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.close()

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


def wait_for(pred, timeout: float = WAIT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout}s")

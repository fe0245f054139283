"""Clients of the matrix: publishers with confirms (pika, asynchronous, a window
of unconfirmed messages, each message carrying its producer id and sequence
number; on a lost connection, a nack or a confirm that takes too long the
publisher moves to the next node and resends everything unconfirmed), consumers
that ack (pika; reconnect to the next node on failure), an optional MQTT QoS 1
publisher (paho), a Rust lapin publisher (a child process, same rules as the
pika ones), and the final drain. Every thread records what it saw with
time.monotonic() timestamps; the checker (checker.py) reads those records."""

import collections
import json
import threading
import time

import pika

CREDS = pika.PlainCredentials("guest", "guest")


def params(addr, heartbeat=5):
    host, port = addr
    return pika.ConnectionParameters(host=host, port=port, credentials=CREDS, heartbeat=heartbeat,
                                     socket_timeout=3, stack_timeout=6, blocked_connection_timeout=10,
                                     connection_attempts=1)


def body_of(pid, seq):
    return json.dumps({"p": pid, "s": seq}).encode()


def parse(body):
    try:
        d = json.loads(body)
        return (d["p"], int(d["s"]))
    except Exception:
        return ("?", body[:60])


class Publisher(threading.Thread):
    def __init__(self, pid, addrs, queue, rate, window=10, confirm_timeout=5.0, start_node=0):
        super().__init__(daemon=True, name=f"pub-{pid}")
        self.pid, self.addrs, self.queue = pid, addrs, queue
        self.rate, self.window, self.confirm_timeout = rate, window, confirm_timeout
        self.node = start_node % len(addrs)
        self.attempted = set()
        self.confirmed = {}  # seq -> monotonic time of the first confirm
        self.nacks = 0
        self.next_seq = 0
        self.resend = collections.deque()
        self.outstanding = {}  # delivery tag -> (seq, sent at)
        self.events = []  # (t, text)
        self.stopping = threading.Event()
        self.conn = None
        self.ch = None

    def stop(self):
        self.stopping.set()

    def run(self):
        while not self.stopping.is_set():
            addr = self.addrs[self.node]
            try:
                self.session(addr)
            except Exception as e:  # pika raises many kinds; all mean "try elsewhere"
                self.events.append((time.monotonic(), f"session on {addr[0]}: {type(e).__name__} {e}"))
            # Whatever was not confirmed goes again, in order, on the next node.
            pending = sorted(s for s, _ in self.outstanding.values())
            self.outstanding.clear()
            self.resend = collections.deque(sorted(set(pending) | set(self.resend)))
            if self.stopping.is_set():
                break
            self.node = (self.node + 1) % len(self.addrs)
            time.sleep(0.3)

    def session(self, addr):
        self.ch = None
        self.tag = 0
        self.tokens = 0.0
        self.last = time.monotonic()
        self.closing_since = None
        conn = pika.SelectConnection(params(addr), on_open_callback=self.on_open,
                                     on_open_error_callback=lambda c, e: self.abort(c, f"open error {e}"),
                                     on_close_callback=lambda c, e: self.abort(c, f"closed {e}"))
        self.conn = conn
        conn.ioloop.call_later(0.05, self.tick)
        conn.ioloop.start()

    def abort(self, conn, why):
        self.events.append((time.monotonic(), why))
        try:
            conn.ioloop.stop()
        except Exception:
            pass

    def drop(self, why):
        """Gives up on this connection at once: a stalled peer never answers a close."""
        self.events.append((time.monotonic(), why))
        self.ch = None
        try:
            self.conn._adapter_disconnect_stream()
        except Exception:
            pass
        self.conn.ioloop.stop()

    def on_open(self, conn):
        conn.channel(on_open_callback=self.on_channel)

    def on_channel(self, ch):
        ch.add_on_close_callback(lambda c, reason: self.drop(f"channel closed {reason}"))
        ch.confirm_delivery(self.on_confirm, callback=lambda frame: self.on_select_ok(ch))

    def on_select_ok(self, ch):
        self.ch = ch
        self.events.append((time.monotonic(), f"publishing via {self.addrs[self.node][0]}"))

    def on_confirm(self, frame):
        m = frame.method
        now = time.monotonic()
        tags = [t for t in self.outstanding if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        for t in tags:
            entry = self.outstanding.pop(t, None)
            if entry is None:
                continue
            seq = entry[0]
            if isinstance(m, pika.spec.Basic.Ack):
                self.confirmed.setdefault(seq, now)
            else:
                self.nacks += 1
                self.resend.append(seq)

    def tick(self):
        now = time.monotonic()
        if self.stopping.is_set():
            self.drop("stopped")
            return
        if self.outstanding:
            oldest = min(t for _, t in self.outstanding.values())
            if now - oldest > self.confirm_timeout:
                self.drop(f"no confirm for {now - oldest:.1f} s")
                return
        if self.ch is not None:
            self.tokens = min(self.tokens + (now - self.last) * self.rate, self.window)
            while self.tokens >= 1 and len(self.outstanding) < self.window:
                seq = self.resend.popleft() if self.resend else self.next_seq
                if seq == self.next_seq:
                    self.next_seq += 1
                props = pika.BasicProperties(delivery_mode=2, headers={"p": self.pid, "s": seq})
                self.ch.basic_publish("", self.queue, body_of(self.pid, seq), props)
                self.tag += 1
                self.outstanding[self.tag] = (seq, now)
                self.attempted.add(seq)
                self.tokens -= 1
        self.last = now
        self.conn.ioloop.call_later(0.01, self.tick)


class Consumer(threading.Thread):
    def __init__(self, cid, addrs, queue, deliveries, start_node=0, prefetch=50):
        super().__init__(daemon=True, name=f"cons-{cid}")
        self.cid, self.addrs, self.queue = cid, addrs, queue
        self.deliveries = deliveries  # shared list of (t, (p, s), redelivered, who)
        self.node = start_node % len(addrs)
        self.prefetch = prefetch
        self.events = []
        self.stopping = threading.Event()

    def stop(self):
        self.stopping.set()

    def run(self):
        while not self.stopping.is_set():
            addr = self.addrs[self.node]
            conn = None
            try:
                conn = pika.BlockingConnection(params(addr))
                ch = conn.channel()
                ch.basic_qos(prefetch_count=self.prefetch)

                def on_msg(ch, method, props, body):
                    self.deliveries.append((time.monotonic(), parse(body), method.redelivered, f"c{self.cid}"))
                    ch.basic_ack(method.delivery_tag)

                ch.basic_consume(self.queue, on_msg)
                self.events.append((time.monotonic(), f"consuming via {addr[0]}"))
                while not self.stopping.is_set():
                    conn.process_data_events(time_limit=0.3)
                try:
                    conn.close()
                except Exception:
                    pass
                return
            except Exception as e:
                self.events.append((time.monotonic(), f"consumer on {addr[0]}: {type(e).__name__} {e}"))
                try:
                    if conn is not None and conn.is_open:
                        conn.close()
                except Exception:
                    pass
            self.node = (self.node + 1) % len(self.addrs)
            time.sleep(0.5)


class MqttPublisher(threading.Thread):
    """QoS 1 publisher to amq.topic (routing key bound to the queue); PUBACK = confirmed."""

    def __init__(self, pid, addrs, topic, rate, start_node=0):
        super().__init__(daemon=True, name=f"mqtt-{pid}")
        self.pid, self.addrs, self.topic, self.rate = pid, addrs, topic, rate
        self.node = start_node % len(addrs)
        self.attempted, self.confirmed = set(), {}
        self.events = []
        self.stopping = threading.Event()
        self.next_seq = 0

    def stop(self):
        self.stopping.set()

    def run(self):
        import paho.mqtt.client as mqtt
        while not self.stopping.is_set():
            host = self.addrs[self.node][0]
            inflight = {}  # mid -> seq
            lost = threading.Event()
            try:
                c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cf-{self.pid}-{time.time_ns()}",
                                clean_session=True)
                c.username_pw_set("guest", "guest")

                def on_publish(client, userdata, mid, rc, props):
                    seq = inflight.pop(mid, None)
                    if seq is not None:
                        self.confirmed.setdefault(seq, time.monotonic())

                c.on_publish = on_publish
                c.on_disconnect = lambda *a: lost.set()
                c.connect(host, 1883, keepalive=5)
                c.loop_start()
                self.events.append((time.monotonic(), f"mqtt via {host}"))
                resend = sorted(s for s in self.attempted if s not in self.confirmed)
                while not self.stopping.is_set() and not lost.is_set():
                    if resend:
                        seq = resend.pop(0)
                    elif len(inflight) < 10:
                        seq = self.next_seq
                        self.next_seq += 1
                    else:
                        time.sleep(0.01)
                        continue
                    self.attempted.add(seq)
                    info = c.publish(self.topic, body_of(self.pid, seq), qos=1)
                    inflight[info.mid] = seq
                    time.sleep(1.0 / self.rate)
                c.loop_stop()
                c.disconnect()
            except Exception as e:
                self.events.append((time.monotonic(), f"mqtt on {host}: {type(e).__name__} {e}"))
            if self.stopping.is_set():
                break
            self.node = (self.node + 1) % len(self.addrs)
            time.sleep(0.5)


class LapinPublisher(threading.Thread):
    """The Rust lapin 4 publisher (examples/fault_publisher_lapin.rs) as a child process:
    the same confirms, window, body and resend-on-the-next-node rules as Publisher. It
    reports one line per event on stdout (`A seq` published, `C seq` acked, `N seq`
    nacked, `E text`); a confirm's time is when its line is read here. Closing its
    stdin stops it."""

    def __init__(self, pid, addrs, queue, rate, binary, window=10, confirm_timeout=5.0, start_node=0):
        super().__init__(daemon=True, name=f"lapin-{pid}")
        self.pid, self.addrs, self.queue, self.binary = pid, addrs, queue, binary
        self.rate, self.window, self.confirm_timeout = rate, window, confirm_timeout
        self.start_node = start_node % len(addrs)
        self.attempted = set()
        self.confirmed = {}
        self.nacks = 0
        self.events = []
        self.stopping = threading.Event()
        self.proc = None
        self.lock = threading.Lock()

    def stop(self):
        self.stopping.set()
        with self.lock:
            if self.proc is not None and self.proc.stdin and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass

    def run(self):
        import subprocess
        cmd = [self.binary, "--pid", str(self.pid), "--queue", self.queue, "--rate", str(self.rate),
               "--window", str(self.window), "--confirm-timeout", str(self.confirm_timeout),
               "--start-node", str(self.start_node),
               "--addrs", ",".join(f"{h}:{p}" for h, p in self.addrs)]
        with self.lock:
            if self.stopping.is_set():
                return
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=self.read_stderr, daemon=True).start()
        for line in iter(self.proc.stdout.readline, ""):
            now = time.monotonic()
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "C":
                self.confirmed.setdefault(int(rest), now)
            elif kind == "A":
                self.attempted.add(int(rest))
            elif kind == "N":
                self.nacks += 1
            elif kind == "E":
                self.events.append((now, "lapin: " + rest))
        try:
            rc = self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            rc = self.proc.wait()
        if rc != 0 or not self.stopping.is_set():
            self.events.append((time.monotonic(), f"lapin publisher exited with status {rc}"))

    def read_stderr(self):
        for line in iter(self.proc.stderr.readline, ""):
            self.events.append((time.monotonic(), "lapin stderr: " + line.rstrip()[:200]))

    def join(self, timeout=None):
        super().join(timeout)
        if self.is_alive() and self.proc is not None:
            self.proc.kill()
            super().join(5)


def drain(addrs, queue, deliveries, quiet=2.0, timeout=60.0):
    """basic.get (then ack) through any node until the queue stays empty for `quiet` s.
    Returns (ok, remaining message count or None, notes)."""
    notes = []
    deadline = time.monotonic() + timeout
    node = 0
    while time.monotonic() < deadline:
        addr = addrs[node % len(addrs)]
        node += 1
        try:
            conn = pika.BlockingConnection(params(addr))
            ch = conn.channel()
            empty_since = None
            while time.monotonic() < deadline:
                method, props, body = ch.basic_get(queue, auto_ack=False)
                if method is None:
                    now = time.monotonic()
                    empty_since = empty_since or now
                    if now - empty_since >= quiet:
                        count = ch.queue_declare(queue, passive=True).method.message_count
                        conn.close()
                        return (count == 0, count, notes)
                    conn.process_data_events(time_limit=0.2)
                    continue
                empty_since = None
                deliveries.append((time.monotonic(), parse(body), method.redelivered, "drain"))
                ch.basic_ack(method.delivery_tag)
        except Exception as e:
            notes.append(f"drain via {addr[0]}: {type(e).__name__} {e}")
            time.sleep(1)
    return (False, None, notes)

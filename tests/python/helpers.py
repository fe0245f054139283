"""Helpers for Switchyard's Python end-to-end suite (fixtures live in conftest.py).

Two modes:

* managed (default): every test gets a fresh broker process, started as
  ``$SWITCHYARD_BIN --config <tmp>/config.toml --ready-file <tmp>/ready.json``
  (``SWITCHYARD_BIN`` defaults to ``<repo>/target/debug/switchyard``), listening on
  ``127.0.0.1:0``. The broker writes the ready file (JSON, e.g.
  ``{"amqp": "127.0.0.1:40123"}``) once its listeners are bound.
* external: if ``SWITCHYARD_TEST_AMQP_URL`` is set (e.g.
  ``amqp://guest:guest@127.0.0.1:5672/%2F``), every test uses that broker. Tests that
  need extra users/vhosts/permissions set them up with ``rabbitmqctl`` (path from
  ``SWITCHYARD_TEST_RABBITMQCTL`` or found on PATH) and are skipped when it is not
  available; tests that need other broker config (marked ``broker_config``) are skipped.

All names used by tests carry a uuid suffix so that external mode works on a shared
broker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import pika
import pytest

REPO = Path(__file__).resolve().parents[2]
EXTERNAL_URL = os.environ.get("SWITCHYARD_TEST_AMQP_URL", "").strip()
READY_TIMEOUT = 20.0
STOP_GRACE = 5.0

GUEST_HASH = "kI3GCrswBLNZQzHJJ95QLoyfAVooYhnvf7jbqiW9BjOYUloe"


# --------------------------------------------------------------------------- helpers


def password_hash(password: str, salt: Optional[bytes] = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256 format: base64(salt ++ sha256(salt ++ pw))."""
    salt = os.urandom(4) if salt is None else salt
    assert len(salt) == 4
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def uniq(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class User:
    name: str
    password: str
    tags: list = field(default_factory=list)
    loopback_only: bool = False


@dataclass
class Permission:
    user: str
    vhost: str = "/"
    configure: str = ".*"
    write: str = ".*"
    read: str = ".*"


def rabbitmqctl_path() -> Optional[str]:
    return os.environ.get("SWITCHYARD_TEST_RABBITMQCTL") or shutil.which("rabbitmqctl")


def rabbitmqctl(*args: str) -> str:
    ctl = rabbitmqctl_path()
    assert ctl, "rabbitmqctl not available"
    res = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {res.stdout}{res.stderr}")
    return res.stdout


class Broker:
    """Where a broker listens, plus helpers to connect to it.

    Connections made through :meth:`connect` are closed when the test ends.
    """

    def __init__(self, host: str, port: int, vhost: str = "/", username: str = "guest",
                 password: str = "guest", external: bool = False,
                 log_path: Optional[Path] = None):
        self.host = host
        self.port = port
        self.vhost = vhost
        self.username = username
        self.password = password
        self.external = external
        self.log_path = log_path
        self._connections: list = []

    # URLs ------------------------------------------------------------------
    def url(self, username: Optional[str] = None, password: Optional[str] = None,
            vhost: Optional[str] = None) -> str:
        u = urllib.parse.quote(username or self.username, safe="")
        p = urllib.parse.quote(password or self.password, safe="")
        v = urllib.parse.quote(self.vhost if vhost is None else vhost, safe="")
        return f"amqp://{u}:{p}@{self.host}:{self.port}/{v}"

    @property
    def amqp_url(self) -> str:
        return self.url()

    # pika ------------------------------------------------------------------
    def params(self, username: Optional[str] = None, password: Optional[str] = None,
               vhost: Optional[str] = None, **kw) -> pika.ConnectionParameters:
        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", 5)
        kw.setdefault("stack_timeout", 10)
        kw.setdefault("blocked_connection_timeout", 10)
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost if vhost is None else vhost,
            credentials=pika.PlainCredentials(username or self.username,
                                              password or self.password),
            **kw,
        )

    def connect(self, **kw) -> pika.BlockingConnection:
        conn = pika.BlockingConnection(self.params(**kw))
        self._connections.append(conn)
        return conn

    def channel(self, **kw):
        """A fresh connection's channel (one connection per call)."""
        return self.connect(**kw).channel()

    def close_all(self) -> None:
        for conn in self._connections:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass
        self._connections.clear()


# ---------------------------------------------------------------------- config / process


def render_config(data_dir: Path, users: Iterable[User] = (), vhosts: Iterable[str] = (),
                  permissions: Iterable[Permission] = (), limits: Optional[dict] = None,
                  extra_toml: str = "", listeners: Iterable[str] = ()) -> str:
    """``listeners``: extra listener names (e.g. ``"stomp"``) to run on port 0."""
    lines = [
        f"data_dir = {toml_str(str(data_dir))}",
        "",
        "[listeners]",
        'amqp = "127.0.0.1:0"',
        *[f'{name} = "127.0.0.1:0"' for name in listeners],
        "",
    ]
    if limits:
        lines.append("[limits]")
        for k, v in limits.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, str):
                v = toml_str(v)
            lines.append(f"{k} = {v}")
        lines.append("")
    for vh in ["/", *[v for v in vhosts if v != "/"]]:
        lines += ["[[vhosts]]", f"name = {toml_str(vh)}", ""]
    all_users = [User("guest", "guest", ["administrator"], True), *users]
    for u in all_users:
        h = GUEST_HASH if u.name == "guest" and u.password == "guest" else password_hash(u.password)
        lines += [
            "[[users]]",
            f"name = {toml_str(u.name)}",
            f"password_hash = {toml_str(h)}",
            "tags = [" + ", ".join(toml_str(t) for t in u.tags) + "]",
            f"loopback_only = {'true' if u.loopback_only else 'false'}",
            "",
        ]
    all_perms = [Permission("guest", "/"), *permissions]
    for p in all_perms:
        lines += [
            "[[permissions]]",
            f"user = {toml_str(p.user)}",
            f"vhost = {toml_str(p.vhost)}",
            f"configure = {toml_str(p.configure)}",
            f"write = {toml_str(p.write)}",
            f"read = {toml_str(p.read)}",
            "",
        ]
    if extra_toml:
        lines += [extra_toml, ""]
    return "\n".join(lines)


class BrokerProcess:
    def __init__(self, workdir: Path, config_text: str):
        self.workdir = workdir
        self.config_path = workdir / "config.toml"
        self.ready_path = workdir / "ready.json"
        self.log_path = workdir / "switchyard.log"
        self.config_path.write_text(config_text)
        self.proc: Optional[subprocess.Popen] = None
        # The ready file's listener name -> "host:port" once started.
        self.ready: dict = {}

    @staticmethod
    def binary() -> Path:
        return Path(os.environ.get("SWITCHYARD_BIN") or REPO / "target" / "debug" / "switchyard")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"

    def start(self) -> tuple:
        binary = self.binary()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            pytest.fail(
                f"Switchyard binary not found at {binary}: run 'cargo build', set "
                "SWITCHYARD_BIN, or set SWITCHYARD_TEST_AMQP_URL to use a running broker",
                pytrace=False)
        logf = open(self.log_path, "wb")
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        self.proc = subprocess.Popen(
            [str(binary), "--config", str(self.config_path), "--ready-file", str(self.ready_path)],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            env=env)
        logf.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.ready_path.exists():
                try:
                    ready = json.loads(self.ready_path.read_text())
                    addr = ready["amqp"]
                    self.ready = ready
                    host, _, port = addr.rpartition(":")
                    return host.strip("[]"), int(port)
                except (ValueError, KeyError):
                    pass  # written atomically per contract; tolerate a partial read anyway
            rc = self.proc.poll()
            if rc is not None:
                pytest.fail(f"switchyard exited with {rc} before writing the ready file.\n"
                            f"config:\n{self.config_path.read_text()}\nlog:\n{self.log()}",
                            pytrace=False)
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"switchyard did not write {self.ready_path} within {READY_TIMEOUT}s."
                            f"\nlog:\n{self.log()}", pytrace=False)
            time.sleep(0.02)

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL after 5 s. Returns the exit code seen before SIGTERM, if any."""
        if self.proc is None:
            return None
        early = self.proc.poll()
        if early is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return early


# ------------------------------------------------------------------- assertion helpers

REPLY_LOG = os.environ.get("SWITCHYARD_TEST_RECORD_REPLIES")


def record_reply(kind: str, code: int, text: str) -> None:
    """With SWITCHYARD_TEST_RECORD_REPLIES=<file>, every close seen is appended there."""
    if REPLY_LOG:
        with open(REPLY_LOG, "a") as f:
            f.write(json.dumps({"kind": kind, "code": code, "text": text,
                                "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\n")


def assert_closed(exc, code: int, text_prefix, kind: str = "channel") -> None:
    """exc: a pika ChannelClosedByBroker / ConnectionClosedByBroker (or anything with
    reply_code/reply_text). text_prefix: a string, or a tuple of accepted prefixes where
    RabbitMQ versions differ."""
    record_reply(kind, exc.reply_code, exc.reply_text)
    assert exc.reply_code == code, f"reply code {exc.reply_code} ({exc.reply_text!r}), want {code}"
    assert exc.reply_text.startswith(text_prefix), \
        f"reply text {exc.reply_text!r} does not start with {text_prefix!r}"


def wait_channel_closed(ch, timeout: float = 5.0):
    """Drive the connection until the broker closes ``ch``; returns the close reason
    (pika.exceptions.ChannelClosedByBroker)."""
    deadline = time.monotonic() + timeout
    while not ch.is_closed:
        if time.monotonic() > deadline:
            raise AssertionError(f"channel not closed by the broker within {timeout}s")
        ch.connection.process_data_events(time_limit=0.05)
    return ch._closing_reason  # pika keeps the broker's Channel.Close here


def consume_n(ch, queue: str, n: int, timeout: float = 5.0, auto_ack: bool = True,
              **consume_kw) -> list:
    """Consume exactly n messages (or fail after timeout); returns (method, props, body)."""
    got: list = []
    deadline = time.monotonic() + timeout

    def on_msg(c, method, props, body):
        got.append((method, props, body))

    tag = ch.basic_consume(queue, on_msg, auto_ack=auto_ack, **consume_kw)
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ch.connection.process_data_events(time_limit=min(left, 0.25))
    ch.basic_cancel(tag)
    assert len(got) >= n, f"got {len(got)} of {n} messages from {queue} within {timeout}s"
    return got


def drain_events(conns: Iterable, until: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Process events on several BlockingConnections until ``until()`` or timeout."""
    conns = list(conns)
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            return False
        for c in conns:
            c.process_data_events(time_limit=0.02)
    return True


def quiet_period(conns: Iterable, seconds: float = 0.5) -> None:
    """Process events for a while (to show that nothing more arrives)."""
    conns = list(conns)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for c in conns:
            c.process_data_events(time_limit=0.02)


def get_all(ch, queue: str, limit: int = 10000) -> list:
    """basic.get (auto-ack) until get-empty; returns the bodies."""
    bodies = []
    for _ in range(limit):
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)
    raise AssertionError(f"more than {limit} messages in {queue}")


def confirmed_channel(broker):
    """A channel (on its own connection) in confirm mode: each basic_publish returns
    once the broker has acked it, so the message is in its queues."""
    ch = broker.connect().channel()
    ch.confirm_delivery()
    return ch


def expect_channel_error(fn, code: int, text_prefix: str):
    """Call fn(), which must make the broker close the channel; checks code/text."""
    import pytest as _pytest
    with _pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        fn()
    assert_closed(ei.value, code, text_prefix)
    return ei.value


class _Close:
    def __init__(self, code, text):
        self.reply_code, self.reply_text = code, text

    def __repr__(self):
        return f"<close {self.reply_code} {self.reply_text!r}>"


def parse_wrapped_close(exc) -> "_Close":
    """pika wraps a connection.close received during the handshake in
    ProbableAccessDeniedError/ProbableAuthenticationError as a string like
    "ConnectionClosedByBroker: (530) 'NOT_ALLOWED - ...'"; dig the code and text out."""
    import ast
    import re
    text = " ".join(str(a) for a in exc.args)
    m = re.search(r"ConnectionClosedByBroker: \((\d+)\) ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")",
                  text)
    assert m, f"no broker connection.close in {exc!r}"
    return _Close(int(m.group(1)), ast.literal_eval(m.group(2)))

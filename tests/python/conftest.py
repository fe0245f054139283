"""Fixtures for Switchyard's Python end-to-end suite; see helpers.py for the modes
(managed broker per test, or SWITCHYARD_TEST_AMQP_URL for an external one)."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Iterable, Optional

import pika
import pytest

from helpers import (EXTERNAL_URL, Broker, BrokerProcess, Permission, User, rabbitmqctl,
                     rabbitmqctl_path, render_config, uniq)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "broker_config: needs non-default broker config (skipped in external mode)")
    config.addinivalue_line(
        "markers", "rabbitmqctl: needs extra users/vhosts; in external mode made with rabbitmqctl")


def _attach_logs(request, proc: BrokerProcess) -> None:
    request.node.__dict__.setdefault("switchyard_logs", []).append(proc)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for proc in item.__dict__.get("switchyard_logs", []):
            rep.sections.append((f"switchyard log ({proc.log_path})", proc.log()))


# ------------------------------------------------------------------------------ fixtures


def _external_broker() -> Broker:
    u = urllib.parse.urlparse(EXTERNAL_URL)
    vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
    return Broker(u.hostname or "127.0.0.1", u.port or 5672, vhost,
                  urllib.parse.unquote(u.username or "guest"),
                  urllib.parse.unquote(u.password or "guest"), external=True)


@pytest.fixture
def broker_factory(request, tmp_path):
    """Start a broker with extra config: ``broker_factory(users=[User(...)],
    vhosts=[...], permissions=[Permission(...)], limits={...}, extra_toml="...")``.

    In external mode users/vhosts/permissions are created with rabbitmqctl (and removed
    afterwards); limits/extra_toml cannot be applied there, so the test is skipped.
    """
    started: list = []
    created_users: list = []
    created_vhosts: list = []
    brokers: list = []

    def factory(users: Iterable[User] = (), vhosts: Iterable[str] = (),
                permissions: Iterable[Permission] = (), limits: Optional[dict] = None,
                extra_toml: str = "") -> Broker:
        users, vhosts, permissions = list(users), list(vhosts), list(permissions)
        if EXTERNAL_URL:
            if limits or extra_toml:
                pytest.skip("needs broker config that cannot be applied to an external broker")
            if (users or vhosts or permissions) and not rabbitmqctl_path():
                pytest.skip("external mode without rabbitmqctl: cannot create users/vhosts")
            for vh in vhosts:
                rabbitmqctl("add_vhost", vh)
                created_vhosts.append(vh)
            for u in users:
                rabbitmqctl("add_user", u.name, u.password)
                created_users.append(u.name)
                if u.tags:
                    rabbitmqctl("set_user_tags", u.name, *u.tags)
            for p in permissions:
                rabbitmqctl("set_permissions", "-p", p.vhost, p.user, p.configure, p.write,
                            p.read)
            b = _external_broker()
        else:
            workdir = tmp_path / f"broker{len(started)}"
            (workdir / "data").mkdir(parents=True)
            proc = BrokerProcess(workdir, render_config(workdir / "data", users, vhosts,
                                                        permissions, limits, extra_toml))
            started.append(proc)
            _attach_logs(request, proc)
            try:
                host, port = proc.start()
            except BaseException:
                started.remove(proc)  # already reported with its log; just make sure it is gone
                proc.stop()
                raise
            b = Broker(host, port, log_path=proc.log_path)
        brokers.append(b)
        return b

    yield factory

    for b in brokers:
        b.close_all()
    crashed = []
    for proc in started:
        early = proc.stop()
        if early is not None:
            crashed.append((proc, early))
    for u in created_users:
        try:
            rabbitmqctl("delete_user", u)
        except Exception:
            pass
    for vh in created_vhosts:
        try:
            rabbitmqctl("delete_vhost", vh)
        except Exception:
            pass
    if crashed:
        proc, rc = crashed[0]
        pytest.fail(f"switchyard exited by itself (code {rc}) during the test.\nlog:\n{proc.log()}",
                    pytrace=False)


@pytest.fixture
def stomp_broker(request, tmp_path) -> Broker:
    """A fresh managed broker with STOMP over TCP and over WebSocket on port 0
    besides AMQP: ``.stomp`` and ``.stomp_ws`` are ``(host, port)``. STOMP tests
    always start their own broker, so they are skipped in external mode."""
    if EXTERNAL_URL:
        pytest.skip("STOMP tests start their own broker")
    workdir = tmp_path / "stomp-broker"
    (workdir / "data").mkdir(parents=True)
    proc = BrokerProcess(workdir, render_config(workdir / "data",
                                                listeners=("stomp", "stomp_ws")))
    _attach_logs(request, proc)
    host, port = proc.start()
    b = Broker(host, port, log_path=proc.log_path)

    def addr(name: str) -> tuple:
        h, _, p = proc.ready[name].rpartition(":")
        return h.strip("[]"), int(p)

    b.stomp = addr("stomp")
    b.stomp_ws = addr("stomp_ws")
    yield b
    b.close_all()
    early = proc.stop()
    if early is not None:
        pytest.fail(f"switchyard exited by itself (code {early}) during the test.\n"
                    f"log:\n{proc.log()}", pytrace=False)


@pytest.fixture
def mqtt_broker_factory(request, tmp_path):
    """Start a managed broker with MQTT over TCP and WebSocket (and STOMP) on port 0
    besides AMQP: ``mqtt_broker_factory(users=..., permissions=..., vhosts=...,
    extra_toml=...)``. The broker has ``.mqtt``, ``.mqtt_ws`` and ``.stomp`` as
    ``(host, port)``. MQTT tests always start their own broker, so they are skipped
    in external mode."""
    if EXTERNAL_URL:
        pytest.skip("MQTT tests start their own broker")
    procs: list = []
    brokers: list = []

    def factory(users=(), vhosts=(), permissions=(), extra_toml: str = "") -> Broker:
        workdir = tmp_path / f"mqtt-broker{len(procs)}"
        (workdir / "data").mkdir(parents=True)
        proc = BrokerProcess(workdir, render_config(
            workdir / "data", users, vhosts, permissions, extra_toml=extra_toml,
            listeners=("mqtt", "mqtt_ws", "stomp")))
        procs.append(proc)
        _attach_logs(request, proc)
        host, port = proc.start()
        b = Broker(host, port, log_path=proc.log_path)

        def addr(name: str) -> tuple:
            h, _, p = proc.ready[name].rpartition(":")
            return h.strip("[]"), int(p)

        b.mqtt = addr("mqtt")
        b.mqtt_ws = addr("mqtt_ws")
        b.stomp = addr("stomp")
        brokers.append(b)
        return b

    yield factory
    for b in brokers:
        b.close_all()
    for proc in procs:
        early = proc.stop()
        if early is not None:
            pytest.fail(f"switchyard exited by itself (code {early}) during the test.\n"
                        f"log:\n{proc.log()}", pytrace=False)


@pytest.fixture
def mqtt_broker(mqtt_broker_factory) -> Broker:
    """A fresh broker with MQTT (TCP and WebSocket), STOMP and AMQP listeners."""
    return mqtt_broker_factory()


@pytest.fixture
def broker(broker_factory) -> Broker:
    """A broker with the default config (fresh per test), or the external one."""
    return broker_factory()


@pytest.fixture
def names(broker):
    """``names("q")`` gives a unique name; in external mode queues/exchanges made with
    it are deleted after the test (a managed broker is thrown away anyway)."""
    made: list = []

    def make(prefix: str = "t") -> str:
        n = uniq(prefix)
        made.append(n)
        return n

    yield make

    if broker.external and made:
        try:
            conn = pika.BlockingConnection(broker.params())
            for n in made:
                for op in ("queue_delete", "exchange_delete"):
                    try:
                        ch = conn.channel()
                        getattr(ch, op)(n)
                        ch.close()
                    except Exception:
                        pass
            conn.close()
        except Exception:
            pass




class Management:
    """A managed broker with its HTTP management listener: ``api`` is
    ``http://host:port/api``; ``broker`` is the AMQP side (a :class:`Broker`)."""

    def __init__(self, proc: BrokerProcess, broker: Broker):
        self.proc = proc
        self.broker = broker
        self.host, _, port = proc.ready["management"].rpartition(":")
        self.port = int(port)
        self.api = f"http://{self.host}:{self.port}/api"


@pytest.fixture
def mgmt(request, tmp_path):
    """A fresh broker with the management API on port 0 (managed mode only: the
    tests create users and vhosts over HTTP)."""
    if EXTERNAL_URL:
        pytest.skip("management tests start their own broker")
    workdir = tmp_path / "mgmt"
    (workdir / "data").mkdir(parents=True)
    proc = BrokerProcess(workdir, render_config(workdir / "data", listeners=["management"]))
    _attach_logs(request, proc)
    try:
        host, port = proc.start()
        m = Management(proc, Broker(host, port, log_path=proc.log_path))
        yield m
        m.broker.close_all()
    finally:
        proc.stop()

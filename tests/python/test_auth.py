"""Authentication and authorisation: wrong passwords, per-vhost permissions given as
configure/write/read regular expressions, vhost isolation.

Users and vhosts come from the broker config in managed mode, from rabbitmqctl in
external mode (skipped if it is not available)."""

import logging

import amqp
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from helpers import (Permission, User, assert_closed, expect_channel_error, parse_wrapped_close,
                     uniq, wait_channel_closed)

LOGIN_REFUSED_FMT = ("ACCESS_REFUSED - Login was refused using authentication mechanism {}. "
                     "For details see the broker logfile.")
LOGIN_REFUSED = LOGIN_REFUSED_FMT.format("PLAIN")


@pytest.fixture(autouse=True)
def _quiet_pika():
    # pika logs every refused handshake at ERROR level; the tests expect them
    logger = logging.getLogger("pika")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(old)


@pytest.mark.parametrize("user,password", [("guest", "wrong"), ("no-such-user", "guest")])
def test_wrong_credentials_pika(broker, user, password):
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as ei:
        broker.connect(username=user, password=password)
    # pika announces authentication_failure_close, so the broker says why before closing
    assert_closed(parse_wrapped_close(ei.value), 403, LOGIN_REFUSED, kind="connection")


@pytest.mark.parametrize("mechanism", ["AMQPLAIN", "PLAIN"])  # py-amqp's default: AMQPLAIN
def test_wrong_credentials_py_amqp(broker, mechanism):
    conn = amqp.Connection(f"{broker.host}:{broker.port}", userid=broker.username,
                           password="wrong", virtual_host=broker.vhost, connect_timeout=5,
                           login_method=mechanism)
    with pytest.raises(amqp.exceptions.AccessRefused) as ei:
        conn.connect()
    assert_closed(ei.value, 403, LOGIN_REFUSED_FMT.format(mechanism), kind="connection")


def test_amqplain_mechanism_py_amqp(broker):
    """py-amqp can log in with AMQPLAIN as well as PLAIN (RabbitMQ offers both)."""
    conn = amqp.Connection(f"{broker.host}:{broker.port}", userid=broker.username,
                           password=broker.password, virtual_host=broker.vhost,
                           login_method="AMQPLAIN", connect_timeout=5)
    conn.connect()
    try:
        ch = conn.channel()
        q, _, _ = ch.queue_declare("", exclusive=True)
        assert q.startswith("amq.gen-")
    finally:
        conn.close()


def test_server_offers_plain_and_amqplain(broker):
    conn = amqp.Connection(f"{broker.host}:{broker.port}", userid=broker.username,
                           password=broker.password, virtual_host=broker.vhost,
                           connect_timeout=5)
    conn.connect()
    try:
        mechs = conn.mechanisms
        mechs = [m.decode() if isinstance(m, bytes) else m for m in mechs]
        assert "PLAIN" in mechs and "AMQPLAIN" in mechs
        assert conn.locales == ["en_US"] or "en_US" in conn.locales
    finally:
        conn.close()


def _restricted(broker_factory):
    """A user whose permissions on '/' are limited to names with its own prefix."""
    p = uniq("perm")
    user = User(p + "-user", "s3cret-" + p)
    perm = Permission(user.name, "/",
                      configure=f"^{p}-own-.*",
                      write=f"^({p}-own-.*|amq\\.topic)$",
                      read=f"^({p}-own-.*|{p}-ro-.*|amq\\.direct)$")
    broker = broker_factory(users=[user], permissions=[perm])
    admin = broker.connect().channel()  # guest
    conn = broker.connect(username=user.name, password=user.password, vhost="/")
    return broker, p, user, admin, conn


@pytest.mark.rabbitmqctl
def test_restricted_permissions(broker_factory):
    broker, p, user, admin, conn = _restricted(broker_factory)
    vhost = "/"

    def refused(perm, kind, name):
        # RabbitMQ 3.10 leaves the permission out; later versions name it first
        rest = f"access to {kind} '{name}' in vhost '{vhost}' refused for user '{user.name}'"
        return (f"ACCESS_REFUSED - {rest}", f"ACCESS_REFUSED - {perm} {rest}")

    own_q, own_x = f"{p}-own-q", f"{p}-own-x"
    other_q, ro_q = f"{p}-other-q", f"{p}-ro-q"
    try:
        admin.queue_declare(other_q)
        admin.queue_declare(ro_q)

        ch = conn.channel()
        ch.queue_declare(own_q)                      # configure ok
        ch.exchange_declare(own_x, "fanout")
        ch.queue_bind(own_q, own_x)                  # write on queue, read on exchange
        ch.queue_bind(own_q, "amq.direct", "k")      # read on amq.direct granted
        ch.confirm_delivery()
        ch.basic_publish(own_x, "", b"via-own-x")     # write on own exchange
        ch.basic_publish("amq.topic", "t", b"to-topic")  # write on amq.topic granted
        m, _, body = ch.basic_get(own_q, auto_ack=True)  # read on own queue
        assert body == b"via-own-x"
        ch.queue_declare(other_q, passive=True)       # passive declare needs no permission

        cases = [
            ("declare other queue", lambda c: c.queue_declare(f"{p}-nope"),
             refused("configure", "queue", f"{p}-nope")),
            ("declare other exchange", lambda c: c.exchange_declare(f"{p}-nope-x", "direct"),
             refused("configure", "exchange", f"{p}-nope-x")),
            ("delete other queue", lambda c: c.queue_delete(other_q),
             refused("configure", "queue", other_q)),
            ("consume other queue", lambda c: c.basic_consume(other_q, lambda *a: None),
             refused("read", "queue", other_q)),
            ("get other queue", lambda c: c.basic_get(other_q),
             refused("read", "queue", other_q)),
            ("purge other queue", lambda c: c.queue_purge(other_q),
             refused("read", "queue", other_q)),
            # bind needs read on the exchange: amq.fanout is not readable
            ("bind from amq.fanout", lambda c: c.queue_bind(own_q, "amq.fanout"),
             refused("read", "exchange", "amq.fanout")),
            # ... and write on the queue: ro queue is readable only
            ("bind ro queue", lambda c: c.queue_bind(ro_q, "amq.direct", "k"),
             refused("write", "queue", ro_q)),
            # the default exchange is checked under the name amq.default
            ("publish default exchange",
             lambda c: (c.confirm_delivery(), c.basic_publish("", own_q, b"x")),
             refused("write", "exchange", "amq.default")),
            ("publish amq.direct",
             lambda c: (c.confirm_delivery(), c.basic_publish("amq.direct", "k", b"x")),
             refused("write", "exchange", "amq.direct")),
            ("server-named queue", lambda c: c.queue_declare(""), None),
        ]
        for what, op, text in cases:
            c = conn.channel()
            with pytest.raises(ChannelClosedByBroker) as ei:
                op(c)
            if text is None:  # the generated name is in the text
                assert_closed(ei.value, 403, ("ACCESS_REFUSED - access to queue 'amq.gen-",
                                              "ACCESS_REFUSED - configure access to queue "
                                              "'amq.gen-"))
                assert ei.value.reply_text.endswith(
                    f"' in vhost '{vhost}' refused for user '{user.name}'")
            else:
                assert_closed(ei.value, 403, text)
            assert conn.is_open, what

        # reading a queue named by the read regex is fine
        admin.confirm_delivery()
        admin.basic_publish("", ro_q, b"readable")
        m, _, body = conn.channel().basic_get(ro_q, auto_ack=True)
        assert body == b"readable"
    finally:
        for q in (own_q, other_q, ro_q):
            admin.queue_delete(q)
        admin.exchange_delete(own_x)


@pytest.mark.rabbitmqctl
def test_user_without_permissions_on_vhost(broker_factory):
    p = uniq("noperm")
    user = User(p, "pw-" + p)
    broker = broker_factory(users=[user])  # no permissions at all
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as ei:
        broker.connect(username=user.name, password=user.password, vhost="/")
    assert_closed(parse_wrapped_close(ei.value), 530,
                  f"NOT_ALLOWED - access to vhost '/' refused for user '{user.name}'",
                  kind="connection")


@pytest.mark.rabbitmqctl
def test_empty_permission_grants_nothing(broker_factory):
    p = uniq("empty")
    user = User(p, "pw-" + p)
    broker = broker_factory(users=[user], permissions=[
        Permission(user.name, "/", configure="", write="", read="")])
    conn = broker.connect(username=user.name, password=user.password, vhost="/")
    rest = f"access to queue '{p}-q' in vhost '/' refused for user '{user.name}'"
    expect_channel_error(lambda: conn.channel().queue_declare(f"{p}-q"), 403,
                         (f"ACCESS_REFUSED - {rest}", f"ACCESS_REFUSED - configure {rest}"))
    ch = conn.channel()
    ch.basic_publish("amq.direct", "k", b"x")
    rest = f"access to exchange 'amq.direct' in vhost '/' refused for user '{user.name}'"
    assert_closed(wait_channel_closed(ch), 403,
                  (f"ACCESS_REFUSED - {rest}", f"ACCESS_REFUSED - write {rest}"))


@pytest.mark.rabbitmqctl
def test_vhost_isolation(broker_factory):
    p = uniq("vh")
    vhost = p + "-vhost"
    user = User(p, "pw-" + p)
    broker = broker_factory(users=[user], vhosts=[vhost],
                            permissions=[Permission(user.name, vhost)])
    conn = broker.connect(username=user.name, password=user.password, vhost=vhost)
    ch = conn.channel()
    q = f"{p}-q"
    ch.queue_declare(q)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"in-vhost")
    # the same name in '/' is another queue (here: none)
    guest = broker.connect(vhost="/")
    expect_channel_error(lambda: guest.channel().queue_declare(q, passive=True), 404,
                         f"NOT_FOUND - no queue '{q}' in vhost '/'")
    # every vhost has its own amq.* exchanges
    ch.exchange_declare("amq.topic", passive=True)
    m, _, body = ch.basic_get(q, auto_ack=True)
    assert body == b"in-vhost"
    # the user has no permission on '/'
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as ei:
        broker.connect(username=user.name, password=user.password, vhost="/")
    assert_closed(parse_wrapped_close(ei.value), 530,
                  f"NOT_ALLOWED - access to vhost '/' refused for user '{user.name}'",
                  kind="connection")
    ch.queue_delete(q)


@pytest.mark.rabbitmqctl
def test_user_id_checked_against_user(broker_factory):
    p = uniq("uid")
    user = User(p, "pw-" + p)
    broker = broker_factory(users=[user], permissions=[Permission(user.name, "/")])
    conn = broker.connect(username=user.name, password=user.password, vhost="/")
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    ch.basic_publish("", q, b"ok", pika.BasicProperties(user_id=user.name))
    m, props, _ = ch.basic_get(q, auto_ack=True)
    assert props.user_id == user.name
    expect_channel_error(
        lambda: ch.basic_publish("", q, b"x", pika.BasicProperties(user_id="guest")), 406,
        f"PRECONDITION_FAILED - user_id property set to 'guest' but authenticated user was "
        f"'{user.name}'")

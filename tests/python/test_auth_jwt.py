"""`[auth] backends = ["jwt", "internal"]`: OAuth 2.0 access tokens as passwords, as
RabbitMQ's rabbitmq_auth_backend_oauth2 takes them. Tokens are signed here with PyJWT
(HS256 with a shared secret, RS256 with a key pair made by `cryptography`); their scopes
are the user's permissions over AMQP (pika), MQTT (paho) and STOMP (stomp.py); an MQTT 5
connection is closed with DISCONNECT 0xA0 when its token expires."""

import time

import jwt
import pika
import pytest
import stomp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from helpers import Broker, BrokerProcess, render_config, uniq
from mqtt_helpers import Client, wait_for
import stomp_helpers

SECRET = "a-shared-secret-for-hs256-tokens"


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwt_broker(tmp_path, rsa_key):
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_file = tmp_path / "jwt-public.pem"
    key_file.write_bytes(pem)
    extra = "\n".join([
        "[auth]",
        'backends = ["jwt", "internal"]',
        "[auth.jwt]",
        'resource_server_id = "rabbitmq"',
        'default_key = "shared"',
        "[auth.jwt.signing_keys]",
        f'rsa1 = "{key_file}"',
        "[auth.jwt.hmac_keys]",
        f'shared = "{SECRET}"',
    ])
    workdir = tmp_path / "broker"
    (workdir / "data").mkdir(parents=True)
    proc = BrokerProcess(workdir, render_config(
        workdir / "data", extra_toml=extra, listeners=("mqtt", "stomp", "management")))
    host, port = proc.start()
    b = Broker(host, port, log_path=proc.log_path)

    def addr(name):
        h, _, p = proc.ready[name].rpartition(":")
        return h.strip("[]"), int(p)

    b.mqtt, b.stomp = addr("mqtt"), addr("stomp")
    yield b
    b.close_all()
    proc.stop()


def token(scope, sub="svc-orders", ttl=60, aud="rabbitmq", key=SECRET, alg="HS256", kid=None):
    claims = {"sub": sub, "aud": aud, "exp": int(time.time()) + ttl, "scope": scope}
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


SCOPES = (
    "rabbitmq.read:*/* rabbitmq.write:%2F/amq.topic rabbitmq.write:%2F/orders-*"
    " rabbitmq.configure:%2F/orders-*"
)


def test_amqp_token_scopes_are_the_permissions(jwt_broker):
    params = jwt_broker.params(username="ignored", password=token(SCOPES))
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare("orders-in")
    ch.queue_bind("orders-in", "amq.topic", "orders.#")
    ch.basic_publish("amq.topic", "orders.new", b"o1")
    assert wait_for(lambda: ch.basic_get("orders-in", auto_ack=True)[2] == b"o1",
                    what="the published message")
    # Configure outside orders-*: refused with RabbitMQ's 403 text for the token's user.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare("billing")
    assert e.value.reply_code == 403
    assert "queue 'billing' in vhost '/' refused for user 'svc-orders'" in e.value.reply_text
    conn.close()


def test_rs256_tokens_pick_their_key_by_kid(jwt_broker, rsa_key):
    t = token(SCOPES, alg="RS256", kid="rsa1", key=rsa_key)
    pika.BlockingConnection(jwt_broker.params(username="", password=t)).close()
    # An RS256 token claiming the HMAC key is refused (no algorithm confusion).
    bad = token(SCOPES, alg="HS256", kid="rsa1", key=SECRET)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(jwt_broker.params(username="", password=bad))


@pytest.mark.parametrize("why", ["signature", "expired", "audience", "internal user"])
def test_bad_tokens_are_refused(jwt_broker, why):
    t = {
        "signature": token(SCOPES, key="another-secret-of-enough-length"),
        "expired": token(SCOPES, ttl=-10),
        "audience": token(SCOPES, aud="billing"),
        # A token may not speak for an internal user (its scopes would become guest's rights).
        "internal user": token(SCOPES, sub="guest"),
    }[why]
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(jwt_broker.params(username="svc-orders", password=t))
    # The chain goes on to the internal database: guest still logs in.
    pika.BlockingConnection(jwt_broker.params()).close()


def test_mqtt_and_stomp_log_in_with_tokens(jwt_broker):
    scope = "rabbitmq.read:*/* rabbitmq.write:*/* rabbitmq.configure:*/*"
    c = Client(jwt_broker.mqtt, uniq("dev"), 5, username="", password=token(scope, sub="dev-1"))
    assert c.subscribe("sensors/+", 1) == [1]
    conn, listener = stomp_helpers.connect(jwt_broker, login="x", passcode=token(scope))
    conn.send("/topic/sensors.t1", "21.5")
    assert c.next().payload == b"21.5"
    conn.disconnect()
    c.stop()
    with pytest.raises(stomp.exception.ConnectFailedException):
        stomp_helpers.connect(jwt_broker, login="x", passcode=token(scope, ttl=-5))


def test_mqtt_connection_ends_with_0xa0_when_its_token_expires(jwt_broker):
    scope = "rabbitmq.read:*/* rabbitmq.write:*/* rabbitmq.configure:*/*"
    c = Client(jwt_broker.mqtt, uniq("dev"), 5, username="", password=token(scope, ttl=2))
    assert c.subscribe("a/b", 0) == [0]
    rc = c.disconnects.get(timeout=10)
    assert rc == 0xA0, rc


def test_routing_key_scopes_authorise_topics(jwt_broker):
    """A scope's third part limits the routing keys of a topic exchange (RabbitMQ's topic
    authorisation by scope): this device may publish under sensors.* only."""
    scope = ("rabbitmq.read:*/* rabbitmq.configure:*/* rabbitmq.write:*/mqtt-subscription-*"
             " rabbitmq.write:*/amq.topic/sensors.*")
    c = Client(jwt_broker.mqtt, uniq("dev"), 5, username="", password=token(scope, sub="dev-2"))
    assert c.publish("sensors/t1", "ok", qos=1) == 0x10  # allowed: "no matching subscribers"
    rc = c.publish("alarms/t1", "no", qos=1)
    assert rc == 0x87, rc
    c.stop()


def test_amqp_token_expiry_refuses_operations_until_update_secret(jwt_broker):
    """AMQP 0-9-1 as RabbitMQ: once the token expires, operations are refused (403) but the
    connection stays; `connection.update-secret` with a fresh token renews it; a refused
    secret closes the connection with 530."""
    conn = pika.BlockingConnection(jwt_broker.params(password=token(SCOPES, ttl=2)))
    ch = conn.channel()
    ch.queue_declare("orders-a")
    conn.update_secret(token(SCOPES, ttl=60), "refresh")
    time.sleep(2.5)
    ch.queue_declare("orders-b")  # the renewed token allows it
    conn.close()

    short = pika.BlockingConnection(jwt_broker.params(password=token(SCOPES, ttl=2)))
    sch = short.channel()
    time.sleep(2.5)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        sch.queue_declare("orders-c")
    assert e.value.reply_code == 403
    assert short.is_open, "an expired token refuses operations, not the connection"
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as e:
        short.update_secret(token(SCOPES, key="another-secret-of-enough-length"), "bad")
        short.channel()
    assert e.value.reply_code == 530

"""`[auth] backends = ["http", "internal"]`: RabbitMQ's HTTP authentication backend, served
by the test itself (http.server), asked first for every login over AMQP (pika), MQTT 3.1.1
and 5 (paho-mqtt), STOMP (stomp.py) and the management API; a refusal falls through to
the internal database, as RabbitMQ's auth_backends chain does. With vhost_path,
resource_path and topic_path set, the users it lets in are authorised by it too."""

import base64
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
import pytest
import stomp

from helpers import (Broker, BrokerProcess, Permission, User, render_config, uniq)
from mqtt_helpers import Client
import stomp_helpers

# alice's password for the HTTP service; her internal password is different, so a
# login with this one succeeds only through the HTTP backend.
HTTP_PASSWORD = "from-http"


def login_only(path, params):
    """RabbitMQ's user_path: allow alice/from-http (tags administrator), deny the rest."""
    ok = params.get("username") == "alice" and params.get("password") == HTTP_PASSWORD
    return "allow administrator" if ok else "deny"


class AuthService:
    """Answers RabbitMQ's HTTP backend requests with `decide(path, params)`; records
    every request."""

    def __init__(self, decide=login_only):
        self.requests = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, params):
                path = self.path.split("?")[0]
                service.requests.append((self.command, path, params))
                body = decide(path, params).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                q = urllib.parse.urlsplit(self.path).query
                self._answer(dict(urllib.parse.parse_qsl(q)))

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                self._answer(dict(urllib.parse.parse_qsl(self.rfile.read(n).decode())))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["post", "get"])
def http_auth(request, tmp_path):
    """A broker whose first backend is the test's AuthService (http_method from the
    param, no cache), with AMQP, MQTT, STOMP and management listeners."""
    service = AuthService()
    extra = "\n".join([
        "[auth]",
        'backends = ["http", "internal"]',
        "[auth.http]",
        f'user_path = "http://127.0.0.1:{service.port}/auth/user"',
        f'http_method = "{request.param}"',
        "cache_ttl_secs = 0",
    ])
    workdir = tmp_path / "broker"
    (workdir / "data").mkdir(parents=True)
    proc = BrokerProcess(workdir, render_config(
        workdir / "data", users=[User("alice", "internal-pw")],
        permissions=[Permission("alice")], extra_toml=extra,
        listeners=("mqtt", "stomp", "management")))
    host, port = proc.start()
    b = Broker(host, port, log_path=proc.log_path)

    def addr(name):
        h, _, p = proc.ready[name].rpartition(":")
        return h.strip("[]"), int(p)

    b.mqtt, b.stomp, b.management = addr("mqtt"), addr("stomp"), addr("management")
    b.service, b.method = service, request.param.upper()
    yield b
    b.close_all()
    proc.stop()
    service.stop()


def test_amqp_login_through_the_http_backend(http_auth):
    conn = pika.BlockingConnection(http_auth.params(username="alice", password=HTTP_PASSWORD))
    ch = conn.channel()
    ch.queue_declare("", exclusive=True)
    conn.close()
    method, path, params = http_auth.service.requests[-1]
    assert (method, path) == (http_auth.method, "/auth/user")
    assert params == {"username": "alice", "password": HTTP_PASSWORD}


def test_refused_by_http_then_allowed_or_refused_by_internal(http_auth):
    # The HTTP service denies guest; the internal database allows it.
    pika.BlockingConnection(http_auth.params()).close()
    assert http_auth.service.requests[-1][2]["username"] == "guest"
    # Denied by both: refused, as a wrong password is.
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(http_auth.params(username="alice", password="wrong"))
    # alice's internal password still works (internal is second in the chain).
    pika.BlockingConnection(http_auth.params(username="alice", password="internal-pw")).close()


@pytest.mark.parametrize("version", [4, 5])
def test_mqtt_login_sends_vhost_and_client_id(http_auth, version):
    cid = uniq("dev")
    c = Client(http_auth.mqtt, cid, version, username="alice", password=HTTP_PASSWORD)
    # Packets sent right behind CONNECT wait for the login, then run in order.
    assert c.subscribe("a/b", 1) == [1]
    assert c.publish("a/b", "x", qos=1) in (0, None)
    assert c.next().payload == b"x"
    c.stop()
    params = http_auth.service.requests[-1][2]
    assert params["client_id"] == cid and params["vhost"] == "/"
    bad = 0x86  # paho reports 3.1.1 return code 4 as 0x86 too
    Client(http_auth.mqtt, uniq("dev"), version, username="alice", password="nope",
           expect_rc=bad)


def test_stomp_login_through_the_http_backend(http_auth):
    conn, listener = stomp_helpers.connect(http_auth, login="alice", passcode=HTTP_PASSWORD)
    stomp_helpers.subscribe(conn, listener, "/topic/t", "s1")
    conn.send("/topic/t", "hello")
    assert listener.message().body == "hello"
    conn.disconnect()
    with pytest.raises(stomp.exception.ConnectFailedException):
        stomp_helpers.connect(http_auth, login="alice", passcode="nope")


def test_management_api_login_uses_the_same_chain(http_auth):
    host, port = http_auth.management

    def get(user, password):
        req = urllib.request.Request(f"http://{host}:{port}/api/whoami")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    # The tag comes from the HTTP answer ("allow administrator"): alice has none
    # in the internal database.
    assert get("alice", HTTP_PASSWORD) == 200
    assert get("alice", "nope") == 401


# ------------------------------------------------------------- authorisation paths
# dave exists only in the HTTP service: his vhost, resource and topic permissions come
# from it. eve logs in but may use no vhost.

def dave_service(path, params):
    user = params.get("username")
    if path == "/auth/user":
        ok = user in ("dave", "eve") and params.get("password") == HTTP_PASSWORD
        return "allow monitoring" if ok else "deny"
    if path == "/auth/vhost":
        return "allow" if (user, params["vhost"]) == ("dave", "/") else "deny no vhost for you"
    if path == "/auth/resource":
        return "deny secret" if "secret" in params["name"] else "allow"
    if path == "/auth/topic":
        key, mine = params["routing_key"], ("dave.", params.get("client_id", "dave") + ".")
        if params["permission"] == "read":
            mine += ("public.",)
        return "allow" if key.startswith(mine) else "deny"
    return "deny"


@pytest.fixture
def http_authz(tmp_path):
    service = AuthService(dave_service)
    base = f"http://127.0.0.1:{service.port}/auth"
    extra = "\n".join([
        "[auth]",
        'backends = ["http", "internal"]',
        "[auth.http]",
        f'user_path = "{base}/user"',
        f'vhost_path = "{base}/vhost"',
        f'resource_path = "{base}/resource"',
        f'topic_path = "{base}/topic"',
        'http_method = "post"',
        "cache_ttl_secs = 60",
    ])
    workdir = tmp_path / "broker"
    (workdir / "data").mkdir(parents=True)
    proc = BrokerProcess(workdir, render_config(
        workdir / "data", extra_toml=extra, listeners=("mqtt", "stomp")))
    host, port = proc.start()
    b = Broker(host, port, log_path=proc.log_path)

    def addr(name):
        h, _, p = proc.ready[name].rpartition(":")
        return h.strip("[]"), int(p)

    b.mqtt, b.stomp = addr("mqtt"), addr("stomp")
    b.service = service
    yield b
    b.close_all()
    proc.stop()
    service.stop()


def asked(service, path, **match):
    """The requests to `path` whose parameters include `match`."""
    return [p for _, got, p in service.requests
            if got == path and all(p.get(k) == v for k, v in match.items())]


def test_http_authorises_amqp_vhost_resources_and_topics(http_authz):
    conn = pika.BlockingConnection(http_authz.params(username="dave", password=HTTP_PASSWORD))
    assert asked(http_authz.service, "/auth/vhost", username="dave", vhost="/",
                 ip="127.0.0.1", tags="monitoring")
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("dave-q")
    ch.queue_bind("dave-q", "amq.topic", "public.#")
    ch.basic_publish("amq.topic", "dave.t", b"ok")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.queue_declare("secret-q")
    assert ei.value.reply_code == 403
    assert ei.value.reply_text == ("ACCESS_REFUSED - access to queue 'secret-q' in vhost '/' "
                                   "refused for user 'dave'")
    assert asked(http_authz.service, "/auth/resource", username="dave", vhost="/",
                 resource="queue", name="secret-q", permission="configure", tags="monitoring")
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.basic_publish("amq.topic", "other.t", b"no")
    assert ei.value.reply_code == 403
    assert ei.value.reply_text == ("ACCESS_REFUSED - write access to topic 'other.t' in exchange "
                                   "'amq.topic' in vhost '/' refused for user 'dave'")
    assert asked(http_authz.service, "/auth/topic", resource="topic", name="amq.topic",
                 permission="write", routing_key="other.t")
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.queue_bind("dave-q", "amq.topic", "other.#")
    assert "read access to topic 'other.#'" in ei.value.reply_text
    conn.close()


def test_http_answers_are_cached_for_the_ttl(http_authz):
    for _ in range(3):
        conn = pika.BlockingConnection(
            http_authz.params(username="dave", password=HTTP_PASSWORD))
        conn.channel().queue_declare("dave-cached", passive=False)
        conn.close()
    assert len(asked(http_authz.service, "/auth/resource", name="dave-cached")) == 1
    assert len(asked(http_authz.service, "/auth/vhost", username="dave")) == 1


def test_http_vhost_refusal_closes_every_protocol(http_authz):
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as ei:
        pika.BlockingConnection(http_authz.params(username="eve", password=HTTP_PASSWORD))
    assert "access to vhost '/' refused for user 'eve'" in str(ei.value)
    for version in (4, 5):
        # paho reports 3.1.1's return code 5 as 0x87 too.
        Client(http_authz.mqtt, uniq("eve"), version, username="eve", password=HTTP_PASSWORD,
               expect_rc=0x87)
    with pytest.raises(stomp.exception.ConnectFailedException):
        stomp_helpers.connect(http_authz, login="eve", passcode=HTTP_PASSWORD)


def test_http_authorises_mqtt_topics_with_the_client_id(http_authz):
    c = Client(http_authz.mqtt, "sensor-1", 5, username="dave", password=HTTP_PASSWORD)
    assert c.subscribe("sensor-1/#", 1) == [1]
    assert c.subscribe("other/#", 1) == [0x87]
    assert c.publish("sensor-1/t", "ok", qos=1) == 0
    assert c.next().topic == "sensor-1/t"
    assert c.publish("sensor-2/t", "no", qos=1) == 0x87
    c.stop()
    assert asked(http_authz.service, "/auth/topic", permission="write",
                 routing_key="sensor-2.t", client_id="sensor-1")


def test_http_authorises_stomp_send(http_authz):
    conn, listener = stomp_helpers.connect(http_authz, login="dave", passcode=HTTP_PASSWORD)
    stomp_helpers.subscribe(conn, listener, "/topic/dave.#", "s1")
    conn.send("/topic/dave.a", "ok")
    assert listener.message().body == "ok"
    conn.send("/topic/other.a", "no")
    err = listener.error()
    assert err.headers["message"] == "ACCESS_REFUSED"
    assert "write access to topic 'other.a' in exchange 'amq.topic'" in err.body

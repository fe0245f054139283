"""TLS listeners and certificate login (issue 10 items 2 and 3) with real clients:
pika over amqps with SASL EXTERNAL, paho-mqtt tls_set over mqtts and wss, stomp.py
over TLS, mosquitto_pub/mosquitto_sub with --cafile/--cert/--key, openssl s_client
for protocol versions, and certificate reload on SIGHUP. Certificates are made in
the test with the openssl command. Each test starts its own broker."""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pika
import pytest
import stomp

from conftest import _attach_logs
from helpers import EXTERNAL_URL, BrokerProcess, Permission, User, render_config

pytestmark = [
    pytest.mark.skipif(bool(EXTERNAL_URL), reason="TLS tests start their own broker"),
    pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed"),
]

ALICE_DN = "O=client,CN=alice"  # RabbitMQ's string for subject /CN=alice/O=client
TLS_LISTENERS = ("amqps", "mqtts", "stomps", "mqtt_wss", "stomp_wss", "streams")


def _openssl(*args, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _leaf(d: Path, name: str, subj: str, ext: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
             cwd=d)


def make_certs(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=switchyard test CA",
             "-days", "2", cwd=d)
    server_server(d, "switchyard")
    _leaf(d, "alice", "/CN=alice/O=client", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "mallory", "/CN=mallory", "extendedKeyUsage=clientAuth\n")
    return d


def server_server(d: Path, cn: str) -> None:
    _leaf(d, "server", f"/CN={cn}",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")


@pytest.fixture
def tls_broker(request, tmp_path):
    certs = make_certs(tmp_path / "certs")
    workdir = tmp_path / "broker"
    (workdir / "data").mkdir(parents=True)
    extra = "\n".join([
        "[tls]",
        f'certfile = "{certs / "server.pem"}"',
        f'keyfile = "{certs / "server.key"}"',
        f'cacertfile = "{certs / "ca.pem"}"',
        "verify_peer = true",
        "fail_if_no_peer_cert = false",
        "reload_interval_secs = 0",
        "[mqtt]",
        "allow_anonymous = false",
        "[stomp]",
        'default_user = ""',
    ])
    proc = BrokerProcess(workdir, render_config(
        workdir / "data", users=[User(ALICE_DN, "not-used", [], False)],
        permissions=[Permission(ALICE_DN, "/")], extra_toml=extra, listeners=TLS_LISTENERS))
    _attach_logs(request, proc)
    proc.start()

    def addr(name):
        h, _, p = proc.ready[name].rpartition(":")
        return h.strip("[]"), int(p)

    proc.addr = addr
    proc.certs = certs
    yield proc
    proc.stop()


def client_ctx(certs: Path, who: str | None = "alice") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if who:
        ctx.load_cert_chain(str(certs / f"{who}.pem"), str(certs / f"{who}.key"))
    return ctx


def test_pika_logs_in_with_external_over_amqps(tls_broker):
    host, port = tls_broker.addr("amqps")
    params = pika.ConnectionParameters(
        host="localhost", port=port,
        ssl_options=pika.SSLOptions(client_ctx(tls_broker.certs), "localhost"),
        credentials=pika.credentials.ExternalCredentials())
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q, b"over tls")
        deadline = time.monotonic() + 5
        body = None
        while body is None and time.monotonic() < deadline:
            _, _, body = ch.basic_get(q, auto_ack=True)
        assert body == b"over tls"
    finally:
        conn.close()


def test_pika_external_without_a_certificate_is_refused(tls_broker):
    _, port = tls_broker.addr("amqps")
    params = pika.ConnectionParameters(
        host="localhost", port=port,
        ssl_options=pika.SSLOptions(client_ctx(tls_broker.certs, None), "localhost"),
        credentials=pika.credentials.ExternalCredentials(), connection_attempts=1)
    with pytest.raises((pika.exceptions.ProbableAuthenticationError,
                        pika.exceptions.AMQPConnectionError)):
        pika.BlockingConnection(params)


def _paho_round_trip(client: mqtt.Client, host: str, port: int) -> None:
    got = threading.Event()
    connected = threading.Event()
    topic = f"tls/{uuid.uuid4().hex[:8]}"
    result = {}

    def on_connect(c, userdata, flags, rc, properties=None):
        result["rc"] = rc
        connected.set()
        c.subscribe(topic, qos=1)

    def on_subscribe(c, *args):
        c.publish(topic, b"hello", qos=1)

    def on_message(c, userdata, msg):
        result["payload"] = msg.payload
        got.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    try:
        assert connected.wait(10), "no CONNACK"
        assert result["rc"] == 0, result
        assert got.wait(10), "no message back"
        assert result["payload"] == b"hello"
    finally:
        client.disconnect()
        client.loop_stop()


def test_paho_mqtts_certificate_login(tls_broker):
    c = tls_broker.certs
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-tls")
    client.tls_set(ca_certs=str(c / "ca.pem"), certfile=str(c / "alice.pem"),
                   keyfile=str(c / "alice.key"))
    _paho_round_trip(client, "localhost", tls_broker.addr("mqtts")[1])


def test_paho_mqtt_over_wss_certificate_login(tls_broker):
    c = tls_broker.certs
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-wss",
                         transport="websockets")
    client.ws_set_options(path="/ws")
    client.tls_set(ca_certs=str(c / "ca.pem"), certfile=str(c / "alice.pem"),
                   keyfile=str(c / "alice.key"))
    _paho_round_trip(client, "localhost", tls_broker.addr("mqtt_wss")[1])


def test_paho_mqtts_unknown_certificate_user_is_refused(tls_broker):
    c = tls_broker.certs
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-mallory")
    client.tls_set(ca_certs=str(c / "ca.pem"), certfile=str(c / "mallory.pem"),
                   keyfile=str(c / "mallory.key"))
    done = threading.Event()
    result = {}

    def on_connect(cl, userdata, flags, rc, properties=None):
        result["rc"] = rc
        done.set()

    client.on_connect = on_connect
    client.connect("localhost", tls_broker.addr("mqtts")[1])
    client.loop_start()
    try:
        assert done.wait(10)
        assert result["rc"] != 0
    finally:
        client.loop_stop()


def test_stomp_py_over_tls_certificate_login(tls_broker):
    host, port = tls_broker.addr("stomps")
    c = tls_broker.certs
    conn = stomp.Connection([("localhost", port)])
    conn.set_ssl(for_hosts=[("localhost", port)], key_file=str(c / "alice.key"),
                 cert_file=str(c / "alice.pem"), ca_certs=str(c / "ca.pem"))
    got = threading.Event()
    bodies = []

    class Listener(stomp.ConnectionListener):
        def on_message(self, frame):
            bodies.append(frame.body)
            got.set()

    conn.set_listener("l", Listener())
    conn.connect(wait=True)  # no login: the certificate names the user
    try:
        conn.subscribe("/queue/tls-stomp", id="1", ack="auto")
        conn.send("/queue/tls-stomp", "over tls")
        assert got.wait(10)
        assert bodies == ["over tls"]
    finally:
        conn.disconnect()


@pytest.mark.skipif(not shutil.which("mosquitto_pub"), reason="mosquitto-clients not installed")
def test_mosquitto_pub_sub_with_client_certificates(tls_broker):
    c = tls_broker.certs
    port = str(tls_broker.addr("mqtts")[1])
    tls = ["-h", "localhost", "-p", port, "--cafile", str(c / "ca.pem"),
           "--cert", str(c / "alice.pem"), "--key", str(c / "alice.key")]
    sub = subprocess.Popen(["mosquitto_sub", *tls, "-i", "sub-tls", "-q", "1", "-t", "tls/m",
                            "-C", "1", "-W", "15"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Publish until the subscriber has its subscription (QoS 1, retried).
        deadline = time.monotonic() + 10
        while sub.poll() is None and time.monotonic() < deadline:
            subprocess.run(["mosquitto_pub", *tls, "-i", "pub-tls", "-q", "1", "-t", "tls/m",
                            "-m", "from mosquitto"], check=True, capture_output=True, timeout=10)
            try:
                sub.wait(0.3)
            except subprocess.TimeoutExpired:
                pass
        out, err = sub.communicate(timeout=15)
        assert sub.returncode == 0, err
        assert out.strip() == "from mosquitto"
    finally:
        if sub.poll() is None:
            sub.kill()


def s_client(port: int, certs: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-CAfile", str(certs / "ca.pem"), *args],
        input="", capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("listener", ["amqps", "mqtts", "stomps"])
def test_openssl_versions_only_1_2_and_1_3(tls_broker, listener):
    port = tls_broker.addr(listener)[1]
    for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        r = s_client(port, tls_broker.certs, flag)
        assert r.returncode == 0, r.stderr
        assert f"Protocol  : {version}" in r.stdout or f"New, {version}" in r.stdout, r.stdout
        assert "Verify return code: 0 (ok)" in r.stdout
    for flag in ("-tls1", "-tls1_1"):
        r = s_client(port, tls_broker.certs, flag)
        assert r.returncode != 0, r.stdout
        assert "Cipher is (NONE)" in r.stdout or "no protocols available" in r.stderr \
            or "alert" in r.stderr, r.stdout + r.stderr


def _server_subject(port: int, certs: Path) -> str:
    r = subprocess.run(
        f"openssl s_client -connect 127.0.0.1:{port} -servername localhost -CAfile "
        f"{certs / 'ca.pem'} </dev/null 2>/dev/null | openssl x509 -noout -subject",
        shell=True, capture_output=True, text=True, timeout=20)
    return r.stdout.strip()


def test_sighup_reloads_certificates_and_a_broken_file_keeps_the_old_ones(tls_broker):
    port = tls_broker.addr("mqtts")[1]
    certs = tls_broker.certs
    assert "CN = switchyard" in _server_subject(port, certs)
    server_server(certs, "renewed")
    tls_broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in tls_broker.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "CN = renewed" in _server_subject(port, certs)

    (certs / "server.key").write_text("broken\n")
    tls_broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "keeping the previous" not in tls_broker.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "keeping the previous" in tls_broker.log()
    assert "CN = renewed" in _server_subject(port, certs)


def test_rstream_over_tls_with_external_and_plain(tls_broker):
    """The Stream protocol's TLS listener (`streams`, RabbitMQ's 5551): rstream
    publishes with certificate login (SASL EXTERNAL) and reads back with PLAIN;
    the metadata it follows to the stream's leader must name the TLS port."""
    import asyncio

    from rstream import (AMQPMessage, Consumer, ConsumerOffsetSpecification, OffsetType,
                         Producer, SlasMechanism, amqp_decoder)

    host, port = tls_broker.addr("streams")
    name = f"tls-{uuid.uuid4().hex[:8]}"

    async def run():
        async with Producer("localhost", port=port, ssl_context=client_ctx(tls_broker.certs),
                            username="", password="",
                            sasl_configuration_mechanism=SlasMechanism.MechanismExternal
                            ) as producer:
            await producer.create_stream(name)
            for i in range(3):
                await producer.send_wait(name, AMQPMessage(body=f"tls {i}".encode()))
        got = []
        done = asyncio.Event()

        async def on_message(msg, ctx):
            got.append(bytes(msg.body) if not isinstance(msg.body, list) else b"".join(msg.body))
            if len(got) == 3:
                done.set()

        consumer = Consumer("localhost", port=port,
                            ssl_context=client_ctx(tls_broker.certs, None),
                            username="guest", password="guest")
        await consumer.start()
        try:
            await consumer.subscribe(name, on_message, decoder=amqp_decoder,
                                     offset_specification=ConsumerOffsetSpecification(
                                         OffsetType.FIRST, None))
            await asyncio.wait_for(done.wait(), 15)
        finally:
            await consumer.close()
        assert got == [b"tls 0", b"tls 1", b"tls 2"]

    asyncio.run(run())

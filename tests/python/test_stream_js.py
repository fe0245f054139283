"""The Node RabbitMQ Stream client: runs tests/streamjs/stream.test.mjs (node's test runner)
against a fresh Switchyard with its Stream protocol listener, after publishing three
messages over AMQP 0-9-1 (pika) into a stream the Node test reads (string headers: the
Node client reads no AMQP 1.0 long, which is what 0-9-1 integers become, as in RabbitMQ).
scripts/install-test-deps installs the npm packages (npm ci)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pika
import pytest

from helpers import Broker, BrokerProcess, render_config, uniq

STREAMJS = Path(__file__).resolve().parent.parent / "streamjs"


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
def test_rabbitmq_stream_js_client(tmp_path):
    if not (STREAMJS / "node_modules" / "rabbitmq-stream-js-client").is_dir():
        pytest.fail("tests/streamjs/node_modules is missing: run scripts/install-test-deps")
    workdir = tmp_path / "broker"
    (workdir / "data").mkdir(parents=True)
    proc = BrokerProcess(workdir, render_config(workdir / "data", listeners=("stream",)))
    host, port = proc.start()
    try:
        b = Broker(host, port, log_path=proc.log_path)
        name = uniq("from-amqp")
        ch = b.connect().channel()
        ch.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
        ch.confirm_delivery()
        for i in range(3):
            ch.basic_publish("", name, f"a{i}".encode(),
                             pika.BasicProperties(content_type="text/plain", headers={"n": f"v{i}"}))
        b.close_all()
        shost, _, sport = proc.ready["stream"].rpartition(":")
        env = dict(os.environ, STREAM_HOST=shost.strip("[]"), STREAM_PORT=sport, FROM_AMQP=name)
        r = subprocess.run(["node", "--test", "--test-concurrency=1", "stream.test.mjs"],
                           cwd=STREAMJS, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr + "\nbroker log:\n" + proc.log()[-3000:]
        assert "# fail 0" in r.stdout, r.stdout
    finally:
        proc.stop()

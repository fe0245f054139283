"""MQTT.js over WebSocket: runs tests/mqttjs/mqtt_ws.test.mjs (node's test runner)
against a fresh Switchyard whose MQTT-over-WebSocket address it passes in
MQTT_WS_URL. scripts/install-test-deps installs the npm packages (npm ci)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

MQTTJS = Path(__file__).resolve().parent.parent / "mqttjs"


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
def test_mqtt_js_over_websocket(mqtt_broker):
    if not (MQTTJS / "node_modules" / "mqtt").is_dir():
        pytest.fail("tests/mqttjs/node_modules is missing: run scripts/install-test-deps")
    host, port = mqtt_broker.mqtt_ws
    env = dict(os.environ, MQTT_WS_URL=f"ws://{host}:{port}/ws")
    r = subprocess.run(["node", "--test", "--test-concurrency=1", "mqtt_ws.test.mjs"],
                       cwd=MQTTJS, env=env, capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "# fail 0" in r.stdout, r.stdout

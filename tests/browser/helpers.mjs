// Shared by the browser tests: start the built broker on port 0, connect MQTT,
// launch Debian's headless Chromium through playwright-core.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import mqtt from 'mqtt';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repo = path.resolve(here, '..', '..');

export function binary() {
  const bin = process.env.SWITCHYARD_BIN || path.join(repo, 'target', 'debug', 'switchyard');
  if (!fs.existsSync(bin)) {
    throw new Error(`broker binary not found at ${bin}: run 'cargo build' or set SWITCHYARD_BIN`);
  }
  return bin;
}

/** Starts the broker with the given listeners on port 0; resolves to its ready-file map. */
export async function startBroker(dir, listeners) {
  const config = path.join(dir, 'config.toml');
  fs.writeFileSync(
    config,
    `data_dir = ${JSON.stringify(path.join(dir, 'data'))}\n[listeners]\n` +
      listeners.map((l) => `${l} = "127.0.0.1:0"\n`).join(''),
  );
  const ready = path.join(dir, `ready-${listeners.length}.json`);
  const log = fs.openSync(path.join(dir, `broker-${listeners.length}.log`), 'w');
  const child = spawn(binary(), ['--config', config, '--ready-file', ready], {
    stdio: ['ignore', log, log],
  });
  let exited = null;
  child.on('exit', (code) => { exited = code; });
  const deadline = Date.now() + 20000;
  while (Date.now() < deadline) {
    if (fs.existsSync(ready)) {
      try {
        return { child, addrs: JSON.parse(fs.readFileSync(ready, 'utf8')) };
      } catch { /* written atomically; tolerate a partial read anyway */ }
    }
    if (exited !== null) {
      return { child: null, log: fs.readFileSync(path.join(dir, `broker-${listeners.length}.log`), 'utf8') };
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  child.kill('SIGKILL');
  throw new Error('the broker did not write its ready file');
}

export function mqttConnect(port) {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
      username: 'guest', password: 'guest', protocolVersion: 4, reconnectPeriod: 0,
    });
    c.once('connect', () => resolve(c));
    c.once('error', reject);
  });
}

export async function launchChromium() {
  const userData = fs.mkdtempSync(path.join(os.tmpdir(), 'switchyard-chromium-'));
  const context = await chromium.launchPersistentContext(userData, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  return { context, userData };
}

// A real browser against Switchyard: Debian's headless Chromium, driven by
// playwright-core, loads page/index.html, which uses @stomp/stompjs over
// ws://127.0.0.1:<port>/ws. An AMQP client (amqplib) and, when the broker has the
// MQTT adapter, an MQTT client (mqtt) publish to it; the test asserts on what the
// page shows and on what the page's form sends back.
//
// Every test run starts its own broker (the built binary, $SWITCHYARD_BIN or
// target/debug/switchyard) on port 0 and serves the page itself. Run with
// scripts/test-browser, which installs Chromium and the npm packages.

import test from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import amqp from 'amqplib';

import { repo, startBroker, mqttConnect, launchChromium } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const WAIT = 15000;

/** Serves `html` at / and the stompjs bundle on a free port. */
function servePage(html = path.join(here, 'page', 'index.html')) {
  const files = {
    '/': [html, 'text/html'],
    '/stompjs.js': [path.join(here, 'node_modules', '@stomp', 'stompjs', 'bundles', 'stomp.umd.js'), 'text/javascript'],
  };
  const server = http.createServer((req, res) => {
    const file = files[new URL(req.url, 'http://x').pathname];
    if (!file) { res.writeHead(404).end(); return; }
    res.writeHead(200, { 'content-type': file[1] });
    res.end(fs.readFileSync(file[0]));
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

/** Resolves with the next message of `queue` (amqplib), or rejects after WAIT. */
function nextAmqpMessage(ch, queue) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`nothing on ${queue} within ${WAIT} ms`)), WAIT);
    ch.consume(queue, (msg) => {
      clearTimeout(timer);
      ch.cancel(msg.fields.consumerTag).catch(() => {});
      resolve(msg);
    }, { noAck: true }).catch(reject);
  });
}

/** A broker with MQTT when this build has the adapter, else without. */
async function startBrokerMaybeMqtt(dir, listeners) {
  let broker = await startBroker(dir, [...listeners, 'mqtt']);
  if (!broker.child) {
    assert.match(broker.log, /mqtt/, `the broker failed to start:\n${broker.log}`);
    broker = await startBroker(dir, listeners);
    assert.ok(broker.child, `the broker failed to start:\n${broker.log}`);
  }
  return broker;
}

test('a page using @stomp/stompjs in Chromium talks to AMQP and MQTT clients', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchyard-browser-'));
  // With the MQTT adapter when this build has it; without, the MQTT parts skip.
  const broker = await startBrokerMaybeMqtt(dir, ['amqp', 'stomp_ws']);
  const { addrs } = broker;
  const hasMqtt = Boolean(addrs.mqtt);
  const server = await servePage();
  const { context, userData } = await launchChromium();
  const conn = await amqp.connect(`amqp://guest:guest@${addrs.amqp}/%2F`);
  let mqttClient = null;
  t.after(async () => {
    if (mqttClient) mqttClient.end(true);
    await conn.close().catch(() => {});
    await context.close().catch(() => {});
    server.close();
    broker.child.kill('SIGTERM');
    fs.rmSync(userData, { recursive: true, force: true });
  });

  const ch = await conn.createChannel();
  await ch.assertQueue('page-ready');
  await ch.assertQueue('cmds');
  await ch.bindQueue('cmds', 'amq.topic', 'cmd.*');
  const ready = nextAmqpMessage(ch, 'page-ready');

  const page = context.pages()[0] ?? (await context.newPage());
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  const wsUrl = `ws://${addrs.stomp_ws}/ws`;
  const subscribe = encodeURIComponent('/topic/sensors.#,/queue/browser-inbox');
  await page.goto(`http://127.0.0.1:${server.address().port}/?ws=${encodeURIComponent(wsUrl)}&subscribe=${subscribe}`);

  // The page's SUBSCRIBEs precede its "ready" SEND on one connection, so once
  // "ready" is routed the subscriptions exist.
  assert.equal((await ready).content.toString(), 'ready');
  await page.locator('#status', { hasText: 'connected' }).waitFor({ timeout: WAIT });
  assert.equal(await page.locator('#version').textContent(), 'STOMP 1.2');

  await t.test('AMQP -> page: a persistent topic publish shows with its concrete destination', async () => {
    ch.publish('amq.topic', 'sensors.room1.temp', Buffer.from('21.5'), { persistent: true });
    const li = page.locator('li[data-destination="/topic/sensors.room1.temp"]');
    await li.waitFor({ timeout: WAIT });
    assert.equal(await li.getAttribute('data-body'), '21.5');
    assert.equal(await li.getAttribute('data-persistent'), 'true');
  });

  await t.test('AMQP -> page: a message to a queue the page consumes', async () => {
    ch.sendToQueue('browser-inbox', Buffer.from('hello page'));
    const li = page.locator('li[data-destination="/queue/browser-inbox"]');
    await li.waitFor({ timeout: WAIT });
    assert.equal(await li.getAttribute('data-body'), 'hello page');
  });

  await t.test('page -> AMQP: the form sends to /topic/cmd.dev42', async () => {
    const got = nextAmqpMessage(ch, 'cmds');
    await page.fill('#destination', '/topic/cmd.dev42');
    await page.fill('#body', 'reboot');
    await page.click('#send-button');
    const msg = await got;
    assert.equal(msg.content.toString(), 'reboot');
    assert.equal(msg.fields.routingKey, 'cmd.dev42');
    assert.equal(msg.fields.exchange, 'amq.topic');
  });

  await t.test('MQTT -> page (INTEROP example 1): sensors/room2/temp QoS 1', { skip: !hasMqtt && 'no MQTT listener in this build' }, async () => {
    mqttClient = await mqttConnect(addrs.mqtt.split(':').pop());
    await mqttClient.publishAsync('sensors/room2/temp', '19.0', { qos: 1 });
    const li = page.locator('li[data-destination="/topic/sensors.room2.temp"]');
    await li.waitFor({ timeout: WAIT });
    assert.equal(await li.getAttribute('data-body'), '19.0');
    assert.equal(await li.getAttribute('data-persistent'), 'true');
  });

  await t.test('page -> MQTT (INTEROP example 2): /topic/cmd.dev42 reaches a cmd/+ subscriber at QoS 0', { skip: !hasMqtt && 'no MQTT listener in this build' }, async () => {
    const sub = await mqttConnect(addrs.mqtt.split(':').pop());
    try {
      await sub.subscribeAsync('cmd/+', { qos: 1 });
      const got = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no MQTT message')), WAIT);
        sub.on('message', (topic, payload, packet) => {
          clearTimeout(timer);
          resolve({ topic, payload: payload.toString(), qos: packet.qos });
        });
      });
      await page.fill('#destination', '/topic/cmd.dev42');
      await page.fill('#body', 'blink');
      await page.click('#send-button');
      assert.deepEqual(await got, { topic: 'cmd/dev42', payload: 'blink', qos: 0 });
    } finally {
      sub.end(true);
    }
  });

  const shot = process.env.SWITCHYARD_BROWSER_SCREENSHOT;
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  assert.deepEqual(await page.locator('#errors li').allTextContents(), []);
  assert.deepEqual(pageErrors, []);
});

test('@stomp/stompjs features in Chromium: acks, transactions, receipts, durable and temp queues', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchyard-features-'));
  const broker = await startBroker(dir, ['stomp_ws']);
  assert.ok(broker.child, `the broker failed to start:\n${broker.log}`);
  const server = await servePage(path.join(here, 'page', 'features.html'));
  const { context, userData } = await launchChromium();
  t.after(async () => {
    await context.close().catch(() => {});
    server.close();
    broker.child.kill('SIGTERM');
    fs.rmSync(userData, { recursive: true, force: true });
  });
  const page = context.pages()[0] ?? (await context.newPage());
  await page.goto(`http://127.0.0.1:${server.address().port}/?ws=${encodeURIComponent(`ws://${broker.addrs.stomp_ws}/ws`)}`);
  await page.locator('#done', { hasText: 'done' }).waitFor({ timeout: 60000 });
  const checks = await page.locator('#checks li').evaluateAll((lis) =>
    lis.map((li) => ({ check: li.dataset.check, ok: li.dataset.ok, text: li.textContent })));
  const shot = process.env.SWITCHYARD_FEATURES_SCREENSHOT;
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  assert.deepEqual(checks.map((c) => c.check), [
    'receipt', 'client-individual ack and nack', 'client ack is cumulative',
    'transaction commit and abort', 'durable topic subscription resumes', 'temp-queue reply',
    'binary body with NULs', 'heart-beats keep an idle connection open',
    'ERROR for a bad destination, then close',
  ]);
  for (const c of checks) assert.equal(c.ok, 'true', c.text);
});

test('the example dashboard (examples/dashboard) shows sensor readings live', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchyard-dashboard-'));
  const broker = await startBrokerMaybeMqtt(dir, ['amqp', 'stomp_ws']);
  const { addrs } = broker;
  const server = await servePage(path.join(repo, 'examples', 'dashboard', 'index.html'));
  const { context, userData } = await launchChromium();
  const conn = await amqp.connect(`amqp://guest:guest@${addrs.amqp}/%2F`);
  let sensor = null;
  t.after(async () => {
    if (sensor) sensor.end(true);
    await conn.close().catch(() => {});
    await context.close().catch(() => {});
    server.close();
    broker.child.kill('SIGTERM');
    fs.rmSync(userData, { recursive: true, force: true });
  });
  const page = context.pages()[0] ?? (await context.newPage());
  await page.goto(`http://127.0.0.1:${server.address().port}/?ws=${encodeURIComponent(`ws://${addrs.stomp_ws}/ws`)}`);
  await page.locator('#status.connected').waitFor({ timeout: WAIT });
  // The page subscribes right after CONNECTED; publish until its table shows
  // the reading (a reading published before the SUBSCRIBE is not kept: topics
  // have no memory, which is what a live dashboard expects).
  let publish;
  if (addrs.mqtt) {
    sensor = await mqttConnect(addrs.mqtt.split(':').pop());
    publish = (topic, value) => sensor.publishAsync(topic.replaceAll('.', '/'), value, { qos: 1 });
  } else {
    const ch = await conn.createChannel();
    publish = async (topic, value) => ch.publish('amq.topic', topic, Buffer.from(value));
  }
  const cell = page.locator('#room-kitchen .temp');
  const deadline = Date.now() + WAIT;
  while (!(await cell.count()) && Date.now() < deadline) {
    await publish('sensors.kitchen.temp', '21.3');
    await new Promise((r) => setTimeout(r, 100));
  }
  await publish('sensors.kitchen.humidity', '47');
  await publish('sensors.lab.temp', '23.9');
  await page.locator('#room-lab .temp', { hasText: '23.9' }).waitFor({ timeout: WAIT });
  await page.locator('#room-kitchen .humidity', { hasText: '47' }).waitFor({ timeout: WAIT });
  assert.equal(await cell.textContent(), '21.3');
  const shot = process.env.SWITCHYARD_DASHBOARD_SCREENSHOT;
  if (shot) await page.screenshot({ path: shot, fullPage: true });
});

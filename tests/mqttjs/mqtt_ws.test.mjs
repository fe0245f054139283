// MQTT.js (the `mqtt` npm package, as browsers and Node use it) over WebSocket
// against Switchyard, for MQTT 3.1.1 and 5.0: QoS 0/1/2, retained messages,
// MQTT 5 properties and subscription identifiers, and wills.
//
// The broker is started by tests/python/test_mqtt_js.py, which passes
// MQTT_WS_URL (ws://127.0.0.1:<port>/ws); run it through scripts/test-python.

import test, { after } from 'node:test';
import assert from 'node:assert/strict';

import mqtt from 'mqtt';

const URL = process.env.MQTT_WS_URL;
const WAIT = 10000;

if (!URL) {
  throw new Error('MQTT_WS_URL is not set: run through tests/python/test_mqtt_js.py');
}

let n = 0;
const clients = [];
// A failed assertion leaves clients open; close them all so the run ends.
after(() => clients.forEach((c) => c.end(true)));

async function connect(protocolVersion, extra = {}) {
  n += 1;
  const c = await mqtt.connectAsync(URL, {
    protocolVersion,
    clientId: `js-${protocolVersion}-${process.pid}-${n}`,
    username: 'guest',
    password: 'guest',
    reconnectPeriod: 0,
    connectTimeout: WAIT,
    ...extra,
  });
  clients.push(c);
  return c;
}

/** Resolves with the next `count` messages the client receives. */
function messages(client, count) {
  return new Promise((resolve, reject) => {
    const got = [];
    const timer = setTimeout(() => reject(new Error(`only ${got.length}/${count} messages`)), WAIT);
    const on = (topic, payload, packet) => {
      got.push({ topic, payload: payload.toString(), packet });
      if (got.length === count) {
        clearTimeout(timer);
        client.removeListener('message', on);
        resolve(got);
      }
    };
    client.on('message', on);
  });
}

for (const version of [4, 5]) {
  test(`MQTT ${version === 5 ? '5.0' : '3.1.1'} over WebSocket: QoS 0, 1 and 2`, async () => {
    const sub = await connect(version);
    const granted = await sub.subscribeAsync('js/qos', { qos: 2 });
    assert.equal(granted[0].qos, 2);
    const pub = await connect(version);
    const wanted = messages(sub, 3);
    for (const qos of [0, 1, 2]) {
      await pub.publishAsync('js/qos', `m${qos}`, { qos });
    }
    const got = await wanted;
    assert.deepEqual(got.map((m) => [m.topic, m.payload, m.packet.qos]),
      [['js/qos', 'm0', 0], ['js/qos', 'm1', 1], ['js/qos', 'm2', 2]]);
    await sub.endAsync();
    await pub.endAsync();
  });

  test(`MQTT ${version === 5 ? '5.0' : '3.1.1'} over WebSocket: retained with a wildcard`, async () => {
    const pub = await connect(version);
    await pub.publishAsync(`js/${version}/retained`, 'kept', { qos: 1, retain: true });
    const sub = await connect(version);
    const wanted = messages(sub, 1);
    await sub.subscribeAsync(`js/${version}/+`, { qos: 1 });
    const [m] = await wanted;
    assert.equal(m.payload, 'kept');
    assert.equal(m.packet.retain, true);
    await pub.publishAsync(`js/${version}/retained`, '', { qos: 1, retain: true });
    await sub.endAsync();
    await pub.endAsync();
  });

  test(`MQTT ${version === 5 ? '5.0' : '3.1.1'} over WebSocket: will on a dropped connection`, async () => {
    const watcher = await connect(version);
    await watcher.subscribeAsync('js/wills/#', { qos: 1 });
    const dev = await connect(version, {
      will: { topic: `js/wills/${version}`, payload: 'lost', qos: 1, retain: false },
    });
    const wanted = messages(watcher, 1);
    dev.stream.destroy();
    const [m] = await wanted;
    assert.equal(m.topic, `js/wills/${version}`);
    assert.equal(m.payload, 'lost');
    dev.end(true);
    await watcher.endAsync();
  });
}

test('MQTT 5.0 over WebSocket: properties and subscription identifiers', async () => {
  const sub = await connect(5);
  await sub.subscribeAsync('js/props/#', { qos: 1, properties: { subscriptionIdentifier: 5 } });
  const pub = await connect(5);
  const wanted = messages(sub, 1);
  await pub.publishAsync('js/props/a', '{"v":1}', {
    qos: 1,
    properties: {
      contentType: 'application/json',
      responseTopic: 'js/reply',
      correlationData: Buffer.from('corr-1'),
      userProperties: { origin: 'mqtt.js' },
      messageExpiryInterval: 60,
    },
  });
  const [m] = await wanted;
  const p = m.packet.properties;
  assert.equal(p.contentType, 'application/json');
  assert.equal(p.responseTopic, 'js/reply');
  assert.equal(p.correlationData.toString(), 'corr-1');
  assert.equal(p.userProperties.origin, 'mqtt.js');
  assert.deepEqual([].concat(p.subscriptionIdentifier), [5]);
  assert.ok(p.messageExpiryInterval > 0 && p.messageExpiryInterval <= 60);
  await sub.endAsync();
  await pub.endAsync();
});

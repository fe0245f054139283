// The management UI shows a clustered quorum queue's leader and members (issue 14):
// "n2 +2" in the queue list (as RabbitMQ's list shows a quorum queue's node and
// online members), and Leader / Members on the queue page.
//
// The broker here is one node, so the API's answers for one queue get the fields
// a cluster adds (`leader`, `members`, `node` = the leader) through Playwright's
// request routing; that a cluster's /api/queues has them is checked with three real
// nodes in tests/cluster.rs. The screenshots go under target/mgmt-ui-screenshots/.

import test from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { repo, startBroker, launchChromium } from './helpers.mjs';

const WAIT = 20000;
const shots = process.env.SWITCHYARD_UI_SCREENSHOTS || path.join(repo, 'target', 'mgmt-ui-screenshots');
const AUTH = `Basic ${Buffer.from('guest:guest').toString('base64')}`;

/** What a member of a 3-node cluster answers for the queue (`leader` null: no majority). */
function clustered(q, leader) {
  if (q?.name !== 'orders' && q?.name !== 'stalled') return q;
  const l = q.name === 'stalled' ? null : leader;
  return { ...q, type: 'quorum', leader: l ?? undefined, node: l ?? q.node, members: ['n1', 'n2', 'n3'] };
}

test('a quorum queue shows its leader and members', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchyard-mgmt-ui-quorum-'));
  const broker = await startBroker(dir, ['amqp', 'management']);
  assert.ok(broker.child, `the broker failed to start:\n${broker.log}`);
  const base = `http://${broker.addrs.management}`;
  for (const name of ['orders', 'stalled', 'plain']) {
    const r = await fetch(`${base}/api/queues/%2F/${name}`, {
      method: 'PUT', headers: { authorization: AUTH, 'content-type': 'application/json' }, body: '{"durable":true}',
    });
    assert.ok(r.status === 201 || r.status === 204, `declare ${name}: ${r.status}`);
  }
  const { context, userData } = await launchChromium();
  t.after(async () => {
    await context.close().catch(() => {});
    broker.child.kill('SIGTERM');
    fs.rmSync(userData, { recursive: true, force: true });
  });
  const page = context.pages()[0] ?? (await context.newPage());
  await page.setViewportSize({ width: 1360, height: 900 });
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  await page.route(/\/api\/queues(\/|\?|$)/, async (route) => {
    const response = await route.fetch();
    let json = await response.json();
    if (Array.isArray(json)) json = json.map((q) => clustered(q, 'n2'));
    else if (Array.isArray(json?.items)) json = { ...json, items: json.items.map((q) => clustered(q, 'n2')) };
    else json = clustered(json, 'n2');
    await route.fulfill({ response, json });
  });

  await page.goto(`${base}/`);
  await page.locator('#login-form').waitFor({ timeout: WAIT });
  await page.fill('#login-username', 'guest');
  await page.fill('#login-password', 'guest');
  await page.click('#login-submit');
  await page.locator('#total-queues .stat-value').waitFor({ timeout: WAIT });

  await page.goto(`${base}/#/queues`);
  const row = (name) => page.locator(`#queues-list tr.queue-row[data-name="${name}"]`);
  await row('orders').waitFor({ timeout: WAIT });
  const cell = row('orders').locator('.queue-node');
  assert.equal(await cell.getAttribute('data-leader'), 'n2');
  assert.equal((await cell.textContent()).replace(/\s+/g, ''), 'n2+2');
  assert.equal(await cell.locator('.tag').getAttribute('title'), 'Members: n1, n2, n3');
  // Without a majority there is no leader, and the list says so.
  assert.equal((await row('stalled').locator('.queue-node').textContent()).replace(/\s+/g, ''), 'noleader+3');
  // A queue that is not replicated shows the node it lives on, no member count.
  assert.equal(await row('plain').locator('.queue-node').count(), 0);
  fs.mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: path.join(shots, 'quorum-queues.png'), fullPage: true });

  await row('orders').locator('a').click();
  const members = page.locator('.queue-members');
  await members.waitFor({ timeout: WAIT });
  assert.deepEqual(await members.locator('.tag').allTextContents(), ['n1', 'n2 (leader)', 'n3']);
  const leaderFact = page.locator('dt', { hasText: /^Leader$/ }).locator('xpath=following-sibling::dd[1]');
  assert.equal((await leaderFact.textContent()).trim(), 'n2');
  await page.screenshot({ path: path.join(shots, 'quorum-queue.png'), fullPage: true });
  assert.deepEqual(pageErrors, []);
});

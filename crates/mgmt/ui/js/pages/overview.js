// Overview: totals, the queued-messages and message-rates charts, nodes (memory,
// disk, alarms), listeners, and definitions export / import.

import { get, request } from '../api.js';
import { h, fill, num, bytes, duration, table, section, errorBox, toast, act } from '../dom.js';
import { lineChart, feedRates, feedCounts } from '../chart.js';
import { field, form, vhostSelect, val } from '../forms.js';

export const RATE_SERIES = [
  { key: 'publish', label: 'Publish' },
  { key: 'confirm', label: 'Confirm' },
  { key: 'deliver_get', label: 'Deliver / get' },
  { key: 'ack', label: 'Ack' },
  { key: 'redeliver', label: 'Redeliver' },
  { key: 'return_unroutable', label: 'Returned' },
  { key: 'drop_unroutable', label: 'Dropped' },
];
export const LENGTH_SERIES = [
  { key: 'messages_ready', label: 'Ready' },
  { key: 'messages_unacknowledged', label: 'Unacked' },
  { key: 'messages', label: 'Total' },
];

// Kept across visits, so coming back to the overview shows the recent past.
let charts = null;
function overviewCharts() {
  if (!charts) {
    charts = {
      lengths: lineChart({ title: 'Queued messages', series: LENGTH_SERIES, kind: 'count', id: 'chart-queued' }),
      rates: lineChart({ title: 'Message rates', series: RATE_SERIES, kind: 'rate', id: 'chart-rates' }),
    };
  }
  return charts;
}

function stat(label, value, id) {
  return h('div', { class: 'stat', id: id || null }, h('div', { class: 'stat-value' }, value), h('div', { class: 'stat-label' }, label));
}

function meter(used, limit, { danger } = {}) {
  if (!limit) return bytes(used);
  const pct = Math.min(100, (used / limit) * 100);
  return h('div', { class: `meter${danger ? ' danger' : ''}`, title: `${bytes(used)} of ${bytes(limit)}` },
    h('div', { class: 'meter-bar', style: { width: `${pct.toFixed(1)}%` } }),
    h('span', { class: 'meter-text' }, `${bytes(used)} / ${bytes(limit)}`));
}

function alarmsOf(node) {
  const a = [];
  if (node.mem_alarm) a.push(h('span', { class: 'tag danger' }, 'memory alarm'));
  if (node.disk_free_alarm) a.push(h('span', { class: 'tag danger' }, 'disk alarm'));
  return a.length ? a : h('span', { class: 'tag ok' }, 'none');
}

export async function render(main) {
  const { lengths, rates } = overviewCharts();
  const head = h('div', { class: 'page-head' }, h('h1', {}, 'Overview'), h('span', { class: 'muted', id: 'overview-version' }));
  const totals = h('div', { class: 'stats', id: 'totals' });
  const messages = h('div', { class: 'stats', id: 'message-totals' });
  const nodes = h('div', { id: 'nodes' });
  const listeners = h('div', { id: 'listeners' });
  const alarms = h('div', { id: 'alarms' });

  // Definitions export: a download of GET /api/definitions[/{vhost}].
  const exportForm = form({
    id: 'export-form',
    submit: 'Download definitions',
    fields: [field('Virtual host', withAll(vhostSelect('vhost')))],
    onSubmit: async (f) => {
      const v = val(f, 'vhost');
      await act(async () => {
        const path = v ? `definitions/${encodeURIComponent(v)}` : 'definitions';
        const { text } = await request('GET', path, { raw: true });
        const stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, '-');
        const name = `switchyard-definitions${v ? `-${v.replace(/[^A-Za-z0-9_.-]/g, '_')}` : ''}-${stamp}.json`;
        const blob = new Blob([text], { type: 'application/json' });
        const a = h('a', { href: URL.createObjectURL(blob), download: name });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(a.href), 10000);
      }, 'Definitions downloaded');
    },
  });
  const file = h('input', { type: 'file', name: 'file', accept: '.json,application/json', required: true, id: 'import-file' });
  const importForm = form({
    id: 'import-form',
    submit: 'Upload definitions',
    fields: [field('Definitions file (JSON)', file), field('Into virtual host', withAll(vhostSelect('vhost')))],
    onSubmit: async (f) => {
      const chosen = file.files?.[0];
      if (!chosen) { toast('Choose a file first', 'error'); return; }
      const textBody = await chosen.text();
      try { JSON.parse(textBody); } catch { toast(`${chosen.name} is not valid JSON`, 'error'); return; }
      const v = val(f, 'vhost');
      const ok = await act(() => request('POST', v ? `definitions/${encodeURIComponent(v)}` : 'definitions', { body: textBody }),
        `Imported ${chosen.name}`);
      if (ok) f.reset();
    },
  });

  fill(main, head,
    alarms,
    h('div', { class: 'grid-2' }, section('Totals', totals), section('Messages', messages)),
    h('div', { class: 'grid-2 charts' }, section(null, lengths.el), section(null, rates.el)),
    section('Nodes', nodes),
    section('Listeners', listeners),
    h('div', { class: 'grid-2' }, section('Export definitions', exportForm), section('Import definitions', importForm)));

  async function refresh() {
    const ov = await get('overview', { lengths_age: 600, lengths_incr: 5, msg_rates_age: 600, msg_rates_incr: 5 });
    const now = Date.now();
    const ver = [ov.product_name || 'Switchyard', ov.product_version || ov.rabbitmq_version].filter(Boolean).join(' ');
    const where = [...new Set([ov.cluster_name, ov.node].filter(Boolean))];
    fill(document.getElementById('overview-version') || h('span'), [ver, ...where].join(' · '));
    const o = ov.object_totals || {};
    fill(totals,
      stat('Connections', num(o.connections), 'total-connections'),
      stat('Channels', num(o.channels), 'total-channels'),
      stat('Exchanges', num(o.exchanges), 'total-exchanges'),
      stat('Queues', num(o.queues), 'total-queues'),
      stat('Consumers', num(o.consumers), 'total-consumers'));
    const q = ov.queue_totals || {};
    fill(messages,
      stat('Ready', num(q.messages_ready ?? 0), 'total-ready'),
      stat('Unacked', num(q.messages_unacknowledged ?? 0), 'total-unacked'),
      stat('Total', num(q.messages ?? 0), 'total-messages'));
    feedCounts(lengths, q, LENGTH_SERIES.map((s) => s.key), now);
    feedRates(rates, ov.message_stats || {}, RATE_SERIES.map((s) => s.key), now);
    fill(listeners, table([
      { label: 'Protocol', key: 'protocol' },
      { label: 'Interface', key: 'ip_address' },
      { label: 'Port', key: 'port', num: true },
      { label: 'Node', key: 'node' },
    ], ov.listeners || [], { empty: 'No listeners reported.' }));

    try {
      const ns = await get('nodes');
      const list = Array.isArray(ns) ? ns : [];
      const anyAlarm = list.some((n) => n.mem_alarm || n.disk_free_alarm);
      fill(alarms, anyAlarm
        ? h('div', { class: 'error-box', role: 'alert', id: 'alarm-banner' }, h('strong', {}, 'Resource alarm: '),
          'publishers are blocked until memory use or free disk space is back within limits.')
        : null);
      fill(nodes, table([
        { label: 'Name', key: 'name' },
        { label: 'Uptime', value: (n) => duration(n.uptime) },
        { label: 'Memory', render: (n) => meter(n.mem_used, n.mem_limit, { danger: n.mem_alarm }) },
        { label: 'Disk free', render: (n) => h('span', { class: n.disk_free_alarm ? 'danger-text' : '' }, `${bytes(n.disk_free)} (limit ${bytes(n.disk_free_limit)})`) },
        { label: 'File descriptors', value: (n) => (n.fd_total ? `${num(n.fd_used)} / ${num(n.fd_total)}` : num(n.fd_used)) },
        { label: 'Cores', key: 'processors', num: true },
        { label: 'Alarms', render: alarmsOf },
      ], list, { empty: 'No node information.' }));
    } catch (e) {
      fill(nodes, e.status === 401 || e.status === 403
        ? h('p', { class: 'muted' }, 'Node details need the monitoring or administrator tag.')
        : errorBox(e));
    }
  }

  return { refresh };
}

/** Adds an "All (cluster)" choice in front of a vhost select. */
function withAll(sel) {
  sel.prepend(h('option', { value: '', selected: true }, 'All virtual hosts'));
  sel.value = '';
  const obs = new MutationObserver(() => {
    if (!sel.querySelector('option[value=""]')) {
      sel.prepend(h('option', { value: '' }, 'All virtual hosts'));
      sel.value = '';
    }
  });
  obs.observe(sel, { childList: true });
  return sel;
}


// Queues: a server-paged, sorted, filtered list (fast with 10,000 queues), add, and
// a detail page with charts, consumers, bindings, publish, get, peek, purge, delete.

import { get, put, post, del, enc, request } from '../api.js';
import { h, fill, num, rate, bytes, table, section, facts, link, route, act, confirmed, errorBox, args, badge, pick, toast } from '../dom.js';
import { pagedList } from '../list.js';
import { lineChart, feedRates, feedCounts } from '../chart.js';
import { field, text, number, select, checkbox, vhostSelect, argumentsEditor, form, val, collapsible } from '../forms.js';
import { bindingsTable, publishForm, xname, feature } from './exchanges.js';

const QUEUE_ARGS = [
  ['x-message-ttl', 'number', 'Messages expire after this many ms'],
  ['x-expires', 'number', 'The queue is deleted after this many ms unused'],
  ['x-max-length', 'number', 'At most this many ready messages'],
  ['x-max-length-bytes', 'number', 'At most this many bytes of ready messages'],
  ['x-overflow', 'string', 'drop-head, reject-publish or reject-publish-dlx'],
  ['x-dead-letter-exchange', 'string', 'Where expired or rejected messages go'],
  ['x-dead-letter-routing-key', 'string', 'Routing key for dead-lettered messages'],
  ['x-max-priority', 'number', 'Priority levels (classic queues)'],
  ['x-single-active-consumer', 'boolean', 'Only one consumer receives at a time'],
  ['x-delivery-limit', 'number', 'Quorum queues: dead-letter after N redeliveries'],
];

function features(q) {
  return [
    q.durable ? feature('D', 'durable') : null,
    q.auto_delete ? feature('AD', 'auto delete') : null,
    q.exclusive ? feature('Excl', 'exclusive') : null,
    args(Object.fromEntries(Object.entries(q.arguments || {}).filter(([k]) => k !== 'x-queue-type'))),
    q.policy ? badge(q.policy, 'policy') : null,
  ];
}

const msgRate = (q, k) => rate(pick(q, `message_stats.${k}_details.rate`) ?? 0);

// Where a queue lives. A clustered quorum queue (the API gives `members`) shows
// its leader and "+N" for its other members, as RabbitMQ's queue list does; the
// full member list is the badge's tooltip. No leader (no majority): said so.
export function nodeCell(q) {
  if (!Array.isArray(q.members)) return q.node || '';
  const others = q.members.filter((m) => m !== q.leader);
  return h('span', { class: 'queue-node', dataset: { leader: q.leader || '', members: q.members.join(',') } },
    q.leader ? q.leader : h('span', { class: 'tag warn', title: 'No leader: fewer than a majority of its members answer' }, 'no leader'),
    others.length ? [' ', h('span', { class: 'tag', title: `Members: ${q.members.join(', ')}` }, `+${others.length}`)] : null);
}

// The queue page: every member, the leader marked.
function membersCell(q) {
  return h('span', { class: 'queue-members' },
    q.members.map((m) => h('span', { class: m === q.leader ? 'tag ok' : 'tag', title: m === q.leader ? 'leader' : 'follower' },
      m === q.leader ? `${m} (leader)` : m)));
}

export async function list(main, { vhost }) {
  const l = pagedList({
    id: 'queues-list',
    noun: 'queues',
    path: () => (vhost ? `queues/${enc(vhost)}` : 'queues'),
    columns: [
      { label: 'Vhost', key: 'vhost', sort: 'vhost' },
      { label: 'Name', sort: 'name', render: (q) => link(route('queues', q.vhost, q.name), q.name) },
      { label: 'Type', key: 'type', sort: 'type' },
      { label: 'Features', render: features },
      { label: 'Node', render: nodeCell },
      { label: 'State', render: (q) => h('span', { class: `state ${q.state || ''}` }, q.state || '') },
      { label: 'Ready', value: (q) => num(q.messages_ready ?? 0), sort: 'messages_ready', num: true, cls: 'ready' },
      { label: 'Unacked', value: (q) => num(q.messages_unacknowledged ?? 0), sort: 'messages_unacknowledged', num: true, cls: 'unacked' },
      { label: 'Total', value: (q) => num(q.messages ?? 0), sort: 'messages', num: true, cls: 'messages' },
      { label: 'Incoming', value: (q) => msgRate(q, 'publish'), num: true, sort: 'message_stats.publish_details.rate' },
      { label: 'Deliver / get', value: (q) => msgRate(q, 'deliver_get'), num: true, sort: 'message_stats.deliver_get_details.rate' },
      { label: 'Ack', value: (q) => msgRate(q, 'ack'), num: true },
      { label: 'Consumers', value: (q) => num(q.consumers ?? 0), sort: 'consumers', num: true },
    ],
    rowAttrs: (q) => ({ class: 'queue-row', dataset: { name: q.name, vhost: q.vhost, messages: String(q.messages ?? 0) } }),
  });

  const argsEd = argumentsEditor(QUEUE_ARGS);
  const add = form({
    id: 'add-queue',
    submit: 'Add queue',
    fields: [
      field('Virtual host', vhostSelect('vhost', vhost || '/')),
      field('Type', select('type', [['classic', 'Classic'], ['quorum', 'Quorum'], ['stream', 'Stream']], 'classic')),
      field('Name', text('name', { required: true })),
      field('Durable', checkbox('durable', true)),
      field('Auto delete', checkbox('auto_delete')),
      argsEd.el,
    ],
    onSubmit: async (f) => {
      let a;
      try { a = argsEd.value(); } catch (e) { toast(e.message, 'error'); return; }
      const type = val(f, 'type');
      if (type !== 'classic') a['x-queue-type'] = type;
      const name = val(f, 'name').trim();
      const ok = await act(() => put(`queues/${enc(val(f, 'vhost'))}/${enc(name)}`, {
        durable: val(f, 'durable'), auto_delete: val(f, 'auto_delete'), arguments: a,
      }), `Queue ${name} declared`);
      if (ok) { f.elements.namedItem('name').value = ''; argsEd.set({}); l.refresh(); }
    },
  });

  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Queues'), vhost ? h('span', { class: 'muted' }, `in ${vhost}`) : null),
    section(null, l.el), collapsible('Add a new queue', add));
  return { refresh: l.refresh };
}

/** Message cards for get / peek results. */
function messages(list, { peek }) {
  if (!list.length) return h('p', { class: 'muted' }, 'The queue is empty.');
  return h('ol', { class: 'messages' }, list.map((m, i) => h('li', { class: 'message', dataset: { payload: m.payload ?? '' } },
    h('div', { class: 'message-head' },
      h('strong', {}, `Message ${i + 1}`),
      m.exchange !== undefined ? h('span', {}, 'Exchange ', h('code', {}, m.exchange === '' ? '(AMQP default)' : m.exchange)) : null,
      m.routing_key !== undefined ? h('span', {}, 'Routing key ', h('code', {}, m.routing_key)) : null,
      m.redelivered ? badge('redelivered', 'warn') : null,
      peek ? badge('peeked: still in the queue') : null,
      !peek && m.message_count !== undefined ? h('span', { class: 'muted' }, `${num(m.message_count)} left in the queue`) : null),
    Object.keys(m.properties || {}).length ? h('div', { class: 'message-props' }, args(m.properties)) : null,
    h('div', { class: 'muted small' }, `${bytes(m.payload_bytes ?? (m.payload || '').length)}, encoding ${m.payload_encoding || 'string'}`),
    h('pre', { class: 'payload' }, m.payload ?? ''))));
}

export async function detail(main, vhost, name) {
  const base = `queues/${enc(vhost)}/${enc(name)}`;
  const info = h('div', { id: 'queue-info' });
  const consumers = h('div', { id: 'queue-consumers' });
  const bindings = h('div', { id: 'queue-bindings' });
  const lengths = lineChart({ title: 'Queued messages', id: 'queue-chart-lengths', series: [
    { key: 'messages_ready', label: 'Ready' }, { key: 'messages_unacknowledged', label: 'Unacked' }, { key: 'messages', label: 'Total' },
  ] });
  const rates = lineChart({ title: 'Message rates', kind: 'rate', id: 'queue-chart-rates', series: [
    { key: 'publish', label: 'Publish' }, { key: 'deliver_get', label: 'Deliver / get' }, { key: 'ack', label: 'Ack' }, { key: 'redeliver', label: 'Redeliver' },
  ] });

  // Get (consumes, with the chosen ack mode) and peek (reads without consuming).
  const got = h('div', { id: 'get-result' });
  const getForm = form({
    id: 'get-form',
    submit: 'Get messages',
    fields: [
      field('Ack mode', select('ackmode', [
        ['ack_requeue_true', 'Nack, requeue (keeps them)'], ['ack_requeue_false', 'Ack (removes them)'],
        ['reject_requeue_true', 'Reject, requeue'], ['reject_requeue_false', 'Reject (removes them, dead-letters)'],
      ], 'ack_requeue_true')),
      field('Encoding', select('encoding', [['auto', 'Auto (string or base64)'], ['base64', 'Base64']], 'auto')),
      field('Messages', number('count', { value: 1, min: 1, max: 1000 })),
    ],
    onSubmit: async (f) => {
      const r = await act(() => post(`${base}/get`, {
        count: Number(val(f, 'count')) || 1, ackmode: val(f, 'ackmode'), encoding: val(f, 'encoding'), truncate: 50000,
      }));
      if (r) { fill(got, messages(Array.isArray(r) ? r : [], { peek: false })); refresh(); }
    },
  });
  const peeked = h('div', { id: 'peek-result' });
  const peekForm = form({
    id: 'peek-form',
    submit: 'Peek',
    fields: [field('Messages', number('count', { value: 10, min: 1, max: 1000 }))],
    onSubmit: async (f) => {
      const r = await act(() => get(`${base}/peek`, { count: Number(val(f, 'count')) || 10 }));
      if (r) fill(peeked, messages(Array.isArray(r) ? r : r.items || r.messages || [], { peek: true }));
    },
  });

  const argsEd = argumentsEditor([], { label: 'Arguments' });
  const bindForm = form({
    id: 'add-queue-binding',
    submit: 'Bind',
    fields: [field('From exchange', text('source', { required: true })), field('Routing key', text('routing_key')), argsEd.el],
    onSubmit: async (f) => {
      let a;
      try { a = argsEd.value(); } catch (e) { toast(e.message, 'error'); return; }
      const ok = await act(() => post(`bindings/${enc(vhost)}/e/${enc(xname(val(f, 'source').trim()))}/q/${enc(name)}`, {
        routing_key: val(f, 'routing_key'), arguments: a,
      }), 'Binding added');
      if (ok) { f.reset(); argsEd.set({}); refresh(); }
    },
  });

  const purge = h('button', {
    type: 'button', class: 'warn', id: 'purge-queue',
    onclick: async () => {
      if (!confirmed(`Remove every ready message from ${name}?`)) return;
      if (await act(() => del(`${base}/contents`), 'Queue purged')) refresh();
    },
  }, 'Purge messages');
  const ifUnused = checkbox('if_unused');
  const ifEmpty = checkbox('if_empty');
  const remove = h('div', { class: 'inline-form' },
    h('label', { class: 'check' }, ifUnused, ' only if unused'),
    h('label', { class: 'check' }, ifEmpty, ' only if empty'),
    h('button', {
      type: 'button', class: 'danger', id: 'delete-queue',
      onclick: async () => {
        if (!confirmed(`Delete queue ${name} and its messages?`)) return;
        const params = {};
        if (ifUnused.checked) params['if-unused'] = 'true';
        if (ifEmpty.checked) params['if-empty'] = 'true';
        if (await act(() => request('DELETE', base, { params }), 'Queue deleted')) location.hash = '#/queues';
      },
    }, 'Delete queue'));

  fill(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'Queue'), h('code', { class: 'title-code', id: 'queue-name' }, name), h('span', { class: 'muted' }, `in ${vhost}`)),
    section('Details', info),
    h('div', { class: 'grid-2 charts' }, section(null, lengths.el), section(null, rates.el)),
    section('Consumers', consumers),
    section('Bindings', bindings, collapsible('Add a binding to this queue', bindForm)),
    h('div', { class: 'grid-2' },
      section('Get messages', h('p', { class: 'muted small' }, 'Get consumes messages; with a requeue mode they go back to the queue marked redelivered.'), getForm, got),
      section('Peek', h('p', { class: 'muted small' }, 'Reads messages without consuming or requeueing them.'), peekForm, peeked)),
    section('Publish a message to this queue', publishForm(vhost, '', { routingKey: name, id: 'queue-publish' })),
    section('Purge and delete', h('div', { class: 'inline-form' }, purge), remove));

  async function refresh() {
    let q;
    try {
      q = await get(base, { lengths_age: 600, lengths_incr: 5, msg_rates_age: 600, msg_rates_incr: 5 });
    } catch (e) {
      fill(info, e.status === 404 ? h('p', { class: 'muted' }, `Queue ${name} does not exist (any more).`) : errorBox(e));
      return;
    }
    const now = Date.now();
    feedCounts(lengths, q, ['messages_ready', 'messages_unacknowledged', 'messages'], now);
    feedRates(rates, q.message_stats || {}, ['publish', 'deliver_get', 'ack', 'redeliver'], now);
    fill(info, h('div', { class: 'grid-3' },
      facts([['Type', q.type], ['State', q.state], ['Features', features(q)], ['Policy', q.policy], ['Operator policy', q.operator_policy],
        ['Effective policy', args(q.effective_policy_definition)]]),
      facts([['Ready', h('span', { id: 'queue-ready' }, num(q.messages_ready ?? 0))],
        ['Unacked', h('span', { id: 'queue-unacked' }, num(q.messages_unacknowledged ?? 0))],
        ['Total', h('span', { id: 'queue-messages' }, num(q.messages ?? 0))],
        ['Bytes', bytes(q.message_bytes)], ['Consumers', num(q.consumers ?? 0)],
        ['Consumer utilisation', q.consumer_utilisation !== undefined && q.consumer_utilisation !== null ? `${Math.round(q.consumer_utilisation * 100)}%` : '']]),
      facts([['Durable', q.durable ? 'yes' : 'no'], ['Auto delete', q.auto_delete ? 'yes' : 'no'], ['Exclusive', q.exclusive ? 'yes' : 'no'],
        ['Arguments', args(q.arguments)],
        ...(Array.isArray(q.members)
          ? [['Leader', nodeCell({ ...q, members: [] })], ['Members', membersCell(q)]]
          : [['Node', q.node]]),
        ['Memory', bytes(q.memory)]])));
    const cs = q.consumer_details || [];
    fill(consumers, table([
      { label: 'Consumer tag', render: (c) => h('code', {}, c.consumer_tag) },
      { label: 'Channel', render: (c) => (c.channel_details?.connection_name ? link(route('connections', c.channel_details.connection_name), c.channel_details.name || c.channel_details.connection_name) : (c.channel_details?.name || '')) },
      { label: 'Ack required', value: (c) => (c.ack_required ? 'yes' : 'no') },
      { label: 'Exclusive', value: (c) => (c.exclusive ? 'yes' : 'no') },
      { label: 'Prefetch', key: 'prefetch_count', num: true },
      { label: 'Active', value: (c) => (c.active === false ? 'no' : 'yes') },
      { label: 'Arguments', render: (c) => args(c.arguments) },
    ], cs, { empty: 'No consumers.' }));
    try {
      const bs = await get(`${base}/bindings`);
      fill(bindings, bindingsTable(bs, vhost, refresh, { showDestination: false }));
    } catch (e) { fill(bindings, errorBox(e)); }
  }
  return { refresh };
}

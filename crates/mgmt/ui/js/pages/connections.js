// Connections (every protocol, with close) and channels.

import { get, del, enc } from '../api.js';
import { h, fill, num, rate, bytes, timestamp, table, section, facts, link, route, act, confirmed, errorBox, pick } from '../dom.js';
import { pagedList } from '../list.js';

function vhostPath(base, vhost) {
  return vhost ? `vhosts/${enc(vhost)}/${base}` : base;
}

function protocolTag(p) {
  const kind = /^MQTT/i.test(p || '') ? 'mqtt' : /^STOMP/i.test(p || '') ? 'stomp' : 'amqp';
  return h('span', { class: `tag proto ${kind}` }, p || '?');
}

function peer(c) {
  return c.peer_host ? `${c.peer_host}:${c.peer_port}` : '';
}

async function closeConnection(name) {
  if (!confirmed(`Close connection ${name}?`)) return false;
  return act(() => del(`connections/${enc(name)}`, { headers: { 'X-Reason': 'Closed from the management UI' } }), 'Connection closed');
}

export async function list(main, { vhost }) {
  const l = pagedList({
    id: 'connections-list',
    noun: 'connections',
    path: () => vhostPath('connections', vhost),
    columns: [
      { label: 'Name', sort: 'name', render: (c) => link(route('connections', c.name), c.name) },
      { label: 'Protocol', sort: 'protocol', render: (c) => protocolTag(c.protocol) },
      { label: 'User', key: 'user', sort: 'user' },
      { label: 'Vhost', key: 'vhost', sort: 'vhost' },
      { label: 'Client', value: (c) => pick(c, 'client_properties.connection_name') || pick(c, 'client_properties.product') || pick(c, 'client_properties.client_id') || '' },
      { label: 'State', render: (c) => h('span', { class: `state ${c.state || ''}` }, c.state || '') },
      { label: 'Channels', key: 'channels', sort: 'channels', num: true },
      { label: 'From client', value: (c) => rate(pick(c, 'recv_oct_details.rate') ?? 0).replace('/s', ' B/s'), num: true, sort: 'recv_oct' },
      { label: 'To client', value: (c) => rate(pick(c, 'send_oct_details.rate') ?? 0).replace('/s', ' B/s'), num: true, sort: 'send_oct' },
      { label: 'Connected', value: (c) => timestamp(c.connected_at), sort: 'connected_at' },
      { label: '', render: (c) => h('button', { type: 'button', class: 'danger small', onclick: async () => { if (await closeConnection(c.name)) l.refresh(); } }, 'Close') },
    ],
    rowAttrs: (c) => ({ dataset: { name: c.name, protocol: c.protocol || '' } }),
  });
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Connections'), vhost ? h('span', { class: 'muted' }, `in ${vhost}`) : null), section(null, l.el));
  return { refresh: l.refresh };
}

export async function detail(main, name) {
  const info = h('div');
  const chans = h('div');
  const closeBtn = h('button', {
    type: 'button', class: 'danger', id: 'close-connection',
    onclick: async () => { if (await closeConnection(name)) location.hash = '#/connections'; },
  }, 'Close this connection');
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Connection'), h('code', { class: 'title-code' }, name), h('span', { class: 'spacer' }), closeBtn),
    section('Details', info), section('Channels', chans));
  async function refresh() {
    let c;
    try {
      c = await get(`connections/${enc(name)}`);
    } catch (e) {
      fill(info, e.status === 404 ? h('p', { class: 'muted' }, 'This connection is closed.') : errorBox(e));
      fill(chans);
      return;
    }
    const cp = c.client_properties || {};
    fill(info, h('div', { class: 'grid-2' },
      facts([
        ['Protocol', protocolTag(c.protocol)], ['User', c.user], ['Virtual host', c.vhost], ['State', c.state],
        ['Client', peer(c)], ['Server', c.host ? `${c.host}:${c.port}` : ''], ['Connected at', timestamp(c.connected_at)],
        ['Heartbeat', c.timeout !== undefined ? `${c.timeout} s` : ''], ['Frame max', c.frame_max ? bytes(c.frame_max) : ''],
        ['Channel max', c.channel_max ? num(c.channel_max) : ''], ['TLS', c.ssl ? 'yes' : 'no'],
        ['Authentication', c.auth_mechanism],
      ]),
      facts([
        ['Client product', cp.product], ['Client version', cp.version], ['Platform', cp.platform],
        ['Connection name', cp.connection_name], cp.client_id !== undefined && ['MQTT client id', cp.client_id], ['Received', `${bytes(c.recv_oct)} (${rate(pick(c, 'recv_oct_details.rate') ?? 0).replace('/s', ' B/s')})`],
        ['Sent', `${bytes(c.send_oct)} (${rate(pick(c, 'send_oct_details.rate') ?? 0).replace('/s', ' B/s')})`],
      ])));
    try {
      const cs = await get(`connections/${enc(name)}/channels`);
      fill(chans, channelTable(Array.isArray(cs) ? cs : cs.items || []));
    } catch (e) {
      fill(chans, errorBox(e));
    }
  }
  return { refresh };
}

const channelColumns = [
  { label: 'Channel', sort: 'name', render: (c) => c.connection_details?.name ? h('span', {}, link(route('connections', c.connection_details.name), c.name || `${c.number}`)) : (c.name || String(c.number)) },
  { label: 'User', key: 'user', sort: 'user' },
  { label: 'Vhost', key: 'vhost', sort: 'vhost' },
  { label: 'Mode', value: (c) => [c.confirm ? 'confirm' : '', c.transactional ? 'tx' : ''].filter(Boolean).join(', ') },
  { label: 'State', render: (c) => h('span', { class: `state ${c.state || ''}` }, c.state || '') },
  { label: 'Prefetch', key: 'prefetch_count', num: true },
  { label: 'Consumers', key: 'consumer_count', sort: 'consumer_count', num: true },
  { label: 'Unacked', key: 'messages_unacknowledged', sort: 'messages_unacknowledged', num: true },
  { label: 'Unconfirmed', key: 'messages_unconfirmed', num: true },
  { label: 'Publish', value: (c) => rate(pick(c, 'message_stats.publish_details.rate') ?? 0), num: true },
  { label: 'Deliver / get', value: (c) => rate(pick(c, 'message_stats.deliver_get_details.rate') ?? 0), num: true },
  { label: 'Ack', value: (c) => rate(pick(c, 'message_stats.ack_details.rate') ?? 0), num: true },
];

function channelTable(rows) {
  return table(channelColumns, rows, { empty: 'No channels open.' });
}

export async function channels(main, { vhost }) {
  const l = pagedList({
    id: 'channels-list',
    noun: 'channels',
    path: () => vhostPath('channels', vhost),
    columns: channelColumns,
  });
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Channels'), vhost ? h('span', { class: 'muted' }, `in ${vhost}`) : null), section(null, l.el));
  return { refresh: l.refresh };
}

// MQTT: sessions (clean or persistent, expiry, subscriptions, queued and in-flight
// counts) and retained messages (list, read, delete), from `/api/mqtt/...`.

import { get, del, enc } from '../api.js';
import { h, fill, num, duration, table, section, act, confirmed, errorBox, badge, bytes } from '../dom.js';

/** A 404 here means the broker's API has no MQTT view (no MQTT adapter). */
function unavailable(e, what) {
  return e.status === 404
    ? h('p', { class: 'muted' }, `This broker does not report MQTT ${what} (is the MQTT listener on?).`)
    : errorBox(e);
}

function items(r) {
  return Array.isArray(r) ? r : r?.items || [];
}

function expiry(s) {
  const v = s.expiry_interval ?? s.session_expiry_interval;
  if (!s.connected && s.expires_in_ms !== undefined && s.expires_in_ms !== null) return `in ${duration(s.expires_in_ms)}`;
  if (v === undefined || v === null) return '';
  if (v === 0) return 'at disconnect';
  if (v >= 4294967295) return 'never';
  return `${duration(v * 1000)} after disconnect`;
}

function subscriptions(s) {
  const subs = s.subscriptions || [];
  if (!subs.length) return h('span', { class: 'muted' }, 'none');
  return subs.map((x) => (typeof x === 'string'
    ? badge(x, 'arg')
    : h('span', { class: 'tag arg', title: JSON.stringify(x) }, `${x.share ? `$share/${x.share}/` : ''}${x.filter ?? x.topic} · QoS ${x.qos ?? 0}`)));
}

export async function render(main, { vhost }) {
  const sessions = h('div', { id: 'mqtt-sessions' });
  const retained = h('div', { id: 'mqtt-retained' });
  const shown = h('div', { id: 'mqtt-retained-message' });
  const scoped = (base) => (vhost ? `${base}/${enc(vhost)}` : base);
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'MQTT'), vhost ? h('span', { class: 'muted' }, `in ${vhost}`) : null),
    section('Sessions', sessions),
    section('Retained messages', retained, shown));

  async function show(m) {
    try {
      const full = await get(`mqtt/retained/${enc(m.vhost)}/${enc(m.topic)}`);
      const payload = full.payload ?? '';
      fill(shown, h('div', { class: 'message' },
        h('div', { class: 'message-head' }, h('strong', {}, 'Topic '), h('code', {}, m.topic), full.properties?.content_type ? h('span', {}, full.properties.content_type) : null,
          h('span', { class: 'muted' }, `${full.payload_encoding || 'string'}`)),
        h('pre', { class: 'payload', id: 'retained-payload' }, payload)));
    } catch (e) { fill(shown, errorBox(e)); }
  }

  async function refresh() {
    try {
      const ss = items(await get(scoped('mqtt/sessions')));
      fill(sessions, table([
        { label: 'Client id', render: (s) => h('code', {}, s.client_id) },
        { label: 'Vhost', key: 'vhost' },
        { label: 'Connected', render: (s) => (s.connected ? badge('online', 'ok') : badge('offline')) },
        { label: 'Kind', value: (s) => ((s.persistent ?? !(s.clean_session ?? s.clean_start)) ? 'persistent' : 'clean') },
        { label: 'Protocol', key: 'protocol' },
        { label: 'Expiry', value: expiry },
        { label: 'Subscriptions', render: subscriptions },
        { label: 'Queued', value: (s) => num(s.messages_queued ?? s.queued ?? 0), num: true },
        { label: 'In flight', value: (s) => num(s.messages_in_flight ?? s.in_flight ?? 0), num: true },
      ], ss, { empty: 'No MQTT sessions.', rowAttrs: (s) => ({ dataset: { clientId: s.client_id } }) }));
    } catch (e) {
      fill(sessions, unavailable(e, 'sessions'));
    }
    try {
      const rs = items(await get(scoped('mqtt/retained')));
      fill(retained, table([
        { label: 'Topic', render: (m) => h('button', { type: 'button', class: 'link', onclick: () => show(m) }, m.topic) },
        { label: 'Vhost', key: 'vhost' },
        { label: 'Content type', value: (m) => m.properties?.content_type ?? '' },
        { label: 'Size', value: (m) => bytes(m.payload_bytes ?? m.size), num: true },
        {
          label: '',
          render: (m) => h('button', {
            type: 'button', class: 'small danger',
            onclick: async () => {
              if (!confirmed(`Delete the retained message of ${m.topic}?`)) return;
              if (await act(() => del(`mqtt/retained/${enc(m.vhost)}/${enc(m.topic)}`), 'Retained message deleted')) { fill(shown); refresh(); }
            },
          }, 'Delete'),
        },
      ], rs, { empty: 'No retained messages.', rowAttrs: (m) => ({ dataset: { topic: m.topic } }) }));
    } catch (e) {
      fill(retained, unavailable(e, 'retained messages'));
    }
  }
  return { refresh };
}

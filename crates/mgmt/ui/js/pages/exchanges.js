// Exchanges: list, add, detail with bindings (add / remove), publish, delete.

import { get, put, post, del, enc } from '../api.js';
import { h, fill, rate, table, section, facts, link, route, act, confirmed, errorBox, args, badge, pick, toast } from '../dom.js';
import { pagedList } from '../list.js';
import { field, text, textarea, select, checkbox, vhostSelect, argumentsEditor, form, val, collapsible } from '../forms.js';

/** The URL name of an exchange: the default exchange "" is `amq.default`. */
export const xname = (name) => (name === '' ? 'amq.default' : name);
const display = (name) => (name === '' ? '(AMQP default)' : name);

export function feature(text, title) {
  return h('span', { class: 'tag feature', title }, text);
}

function features(x) {
  return [
    x.durable ? feature('D', 'durable') : null,
    x.auto_delete ? feature('AD', 'auto delete') : null,
    x.internal ? feature('I', 'internal') : null,
    args(x.arguments),
    x.policy ? badge(`policy: ${x.policy}`, 'policy') : null,
  ];
}

export async function list(main, { vhost }) {
  const l = pagedList({
    id: 'exchanges-list',
    noun: 'exchanges',
    path: () => (vhost ? `exchanges/${enc(vhost)}` : 'exchanges'),
    columns: [
      { label: 'Vhost', key: 'vhost', sort: 'vhost' },
      { label: 'Name', sort: 'name', render: (x) => link(route('exchanges', x.vhost, xname(x.name)), display(x.name)) },
      { label: 'Type', key: 'type', sort: 'type' },
      { label: 'Features', render: features },
      { label: 'Rate in', value: (x) => rate(pick(x, 'message_stats.publish_in_details.rate') ?? 0), num: true },
      { label: 'Rate out', value: (x) => rate(pick(x, 'message_stats.publish_out_details.rate') ?? 0), num: true },
    ],
    rowAttrs: (x) => ({ dataset: { name: x.name, vhost: x.vhost } }),
  });

  const argsEd = argumentsEditor([['alternate-exchange', 'string', 'Where unroutable messages go']]);
  const add = form({
    id: 'add-exchange',
    submit: 'Add exchange',
    fields: [
      field('Virtual host', vhostSelect('vhost', vhost || '/')),
      field('Name', text('name', { required: true })),
      field('Type', select('type', ['direct', 'fanout', 'topic', 'headers'], 'direct')),
      field('Durable', checkbox('durable', true)),
      field('Auto delete', checkbox('auto_delete')),
      field('Internal', checkbox('internal')),
      argsEd.el,
    ],
    onSubmit: async (f) => {
      let a;
      try { a = argsEd.value(); } catch (e) { toast(e.message, 'error'); return; }
      const name = val(f, 'name').trim();
      const ok = await act(() => put(`exchanges/${enc(val(f, 'vhost'))}/${enc(name)}`, {
        type: val(f, 'type'), durable: val(f, 'durable'), auto_delete: val(f, 'auto_delete'), internal: val(f, 'internal'), arguments: a,
      }), `Exchange ${name} declared`);
      if (ok) { f.elements.namedItem('name').value = ''; argsEd.set({}); l.refresh(); }
    },
  });

  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Exchanges'), vhost ? h('span', { class: 'muted' }, `in ${vhost}`) : null),
    section(null, l.el), collapsible('Add a new exchange', add));
  return { refresh: l.refresh };
}

/** A bindings table with "Unbind" buttons; `side` is 'source' or 'destination'. */
export function bindingsTable(rows, vhost, onChange, { showSource = true, showDestination = true } = {}) {
  return table([
    showSource ? { label: 'From', render: (b) => link(route('exchanges', vhost, xname(b.source)), display(b.source)) } : null,
    showDestination ? {
      label: 'To',
      render: (b) => (b.destination_type === 'queue'
        ? h('span', {}, badge('queue'), ' ', link(route('queues', vhost, b.destination), b.destination))
        : h('span', {}, badge('exchange'), ' ', link(route('exchanges', vhost, xname(b.destination)), display(b.destination)))),
    } : null,
    { label: 'Routing key', render: (b) => h('code', {}, b.routing_key) },
    { label: 'Arguments', render: (b) => args(b.arguments) },
    {
      label: '',
      render: (b) => (b.source === ''
        ? h('span', { class: 'muted' }, 'implicit')
        : h('button', {
          type: 'button', class: 'small danger',
          onclick: async () => {
            if (!confirmed(`Remove the binding from ${display(b.source)} to ${b.destination} (${b.routing_key || 'no key'})?`)) return;
            const kind = b.destination_type === 'queue' ? 'q' : 'e';
            const ok = await act(() => del(`bindings/${enc(vhost)}/e/${enc(xname(b.source))}/${kind}/${enc(b.destination)}/${enc(b.properties_key ?? '~')}`), 'Binding removed');
            if (ok) onChange();
          },
        }, 'Unbind')),
    },
  ].filter(Boolean), rows, { empty: 'No bindings.', rowAttrs: (b) => ({ class: 'binding', dataset: { source: b.source, destination: b.destination, key: b.routing_key } }) });
}

/** A publish form posting to /api/exchanges/{vhost}/{exchange}/publish. */
export function publishForm(vhost, exchange, { routingKey = '', id = 'publish-form' } = {}) {
  const headers = argumentsEditor([], { label: 'Headers' });
  const props = argumentsEditor([
    ['content_type', 'string'], ['correlation_id', 'string'], ['reply_to', 'string'], ['expiration', 'string'],
    ['message_id', 'string'], ['priority', 'number'], ['type', 'string'], ['app_id', 'string'],
  ], { label: 'Properties' });
  const result = h('div', { class: 'publish-result', id: `${id}-result`, 'aria-live': 'polite' });
  const f = form({
    id,
    submit: 'Publish message',
    fields: [
      field('Routing key', text('routing_key', { value: routingKey })),
      field('Delivery mode', select('delivery_mode', [['1', '1 – non-persistent'], ['2', '2 – persistent']], '1')),
      field('Payload encoding', select('payload_encoding', [['string', 'String'], ['base64', 'Base64']], 'string')),
      h('div', { class: 'field wide' }, h('label', { for: `${id}-payload` }, 'Payload'), textarea('payload', { id: `${id}-payload`, rows: 5 })),
      headers.el,
      props.el,
    ],
    onSubmit: async (fm) => {
      let hdrs;
      let p;
      try { hdrs = headers.value(); p = props.value(); } catch (e) { toast(e.message, 'error'); return; }
      const properties = { ...p, delivery_mode: Number(val(fm, 'delivery_mode')) };
      if (Object.keys(hdrs).length) properties.headers = hdrs;
      const r = await act(() => post(`exchanges/${enc(vhost)}/${enc(xname(exchange))}/publish`, {
        routing_key: val(fm, 'routing_key'), payload: val(fm, 'payload'), payload_encoding: val(fm, 'payload_encoding'), properties,
      }));
      if (r && typeof r === 'object') {
        fill(result, r.routed
          ? h('span', { class: 'ok-text', dataset: { routed: 'true' } }, 'Message published.')
          : h('span', { class: 'warn-text', dataset: { routed: 'false' } }, 'Message published, but not routed: no binding matched.'));
      }
    },
  });
  return h('div', {}, f, result);
}

export async function detail(main, vhost, name) {
  const exchange = name === 'amq.default' ? '' : name;
  const info = h('div');
  const out = h('div', { id: 'bindings-source' });
  const inn = h('div', { id: 'bindings-destination' });
  const argsEd = argumentsEditor([], { label: 'Arguments' });
  const addBinding = form({
    id: 'add-binding',
    submit: 'Bind',
    fields: [
      field('To', select('dest_type', [['q', 'Queue'], ['e', 'Exchange']], 'q')),
      field('Name', text('destination', { required: true })),
      field('Routing key', text('routing_key')),
      argsEd.el,
    ],
    onSubmit: async (f) => {
      let a;
      try { a = argsEd.value(); } catch (e) { toast(e.message, 'error'); return; }
      const ok = await act(() => post(`bindings/${enc(vhost)}/e/${enc(name)}/${val(f, 'dest_type')}/${enc(val(f, 'destination').trim())}`, {
        routing_key: val(f, 'routing_key'), arguments: a,
      }), 'Binding added');
      if (ok) { f.reset(); argsEd.set({}); refresh(); }
    },
  });
  const deleteBtn = h('button', {
    type: 'button', class: 'danger', id: 'delete-exchange',
    onclick: async () => {
      if (!confirmed(`Delete exchange ${display(exchange)} in ${vhost}?`)) return;
      if (await act(() => del(`exchanges/${enc(vhost)}/${enc(name)}`), 'Exchange deleted')) location.hash = '#/exchanges';
    },
  }, 'Delete exchange');
  const system = exchange === '' || exchange.startsWith('amq.');
  fill(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'Exchange'), h('code', { class: 'title-code' }, display(exchange)), h('span', { class: 'muted' }, `in ${vhost}`), h('span', { class: 'spacer' }), system ? null : deleteBtn),
    section('Details', info),
    exchange === '' ? null : section('Bindings from this exchange', out, collapsible('Add a binding from this exchange', addBinding)),
    section('Bindings to this exchange', inn),
    section('Publish a message', publishForm(vhost, exchange)));

  async function refresh() {
    let x;
    try {
      x = await get(`exchanges/${enc(vhost)}/${enc(name)}`);
    } catch (e) {
      fill(info, errorBox(e));
      return;
    }
    fill(info, h('div', { class: 'grid-2' },
      facts([['Type', x.type], ['Durable', x.durable ? 'yes' : 'no'], ['Auto delete', x.auto_delete ? 'yes' : 'no'], ['Internal', x.internal ? 'yes' : 'no']]),
      facts([['Policy', x.policy], ['Arguments', args(x.arguments)],
        ['Rate in', rate(pick(x, 'message_stats.publish_in_details.rate') ?? 0)], ['Rate out', rate(pick(x, 'message_stats.publish_out_details.rate') ?? 0)]])));
    if (exchange !== '') {
      try {
        const bs = await get(`exchanges/${enc(vhost)}/${enc(name)}/bindings/source`);
        fill(out, bindingsTable(bs, vhost, refresh, { showSource: false }));
      } catch (e) { fill(out, errorBox(e)); }
    }
    try {
      const bd = await get(`exchanges/${enc(vhost)}/${enc(name)}/bindings/destination`);
      fill(inn, bindingsTable(bd, vhost, refresh, { showDestination: false }));
    } catch (e) { fill(inn, errorBox(e)); }
  }
  return { refresh };
}

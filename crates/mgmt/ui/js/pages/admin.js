// Admin: users (tags, permissions, topic permissions), virtual hosts, policies and
// operator policies, vhost and user limits.

import { get, put, del, enc } from '../api.js';
import { h, fill, num, table, section, facts, link, route, act, confirmed, errorBox, args, badge, toast } from '../dom.js';
import { field, text, number, select, vhostSelect, argumentsEditor, form, val, collapsible } from '../forms.js';

const TAGS = ['administrator', 'monitoring', 'policymaker', 'management', 'impersonator'];

function subnav(active) {
  const items = [['users', 'Users'], ['vhosts', 'Virtual hosts'], ['policies', 'Policies'], ['limits', 'Limits']];
  return h('nav', { class: 'subnav' }, items.map(([k, label]) => h('a', { href: `#/admin/${k}`, class: k === active ? 'active' : null }, label)));
}

const list = (r) => (Array.isArray(r) ? r : r?.items || []);
const tagList = (t) => (Array.isArray(t) ? t : String(t || '').split(',').map((s) => s.trim()).filter(Boolean));

function tagsInput(value = '') {
  const input = text('tags', { value, placeholder: 'administrator, monitoring' });
  const quick = h('div', { class: 'quick-args' }, h('span', { class: 'hint' }, 'Set: '),
    TAGS.map((t) => h('button', {
      type: 'button', class: 'link',
      onclick: () => {
        const have = tagList(input.value);
        if (!have.includes(t)) input.value = [...have, t].join(', ');
      },
    }, t)));
  return h('div', {}, input, quick);
}

// ---- users --------------------------------------------------------------------------

export async function users(main) {
  const body = h('div', { id: 'users' });
  const add = form({
    id: 'add-user',
    submit: 'Add user',
    fields: [
      field('Username', text('name', { required: true })),
      field('Password', h('input', { type: 'password', name: 'password', autocomplete: 'new-password' }), 'Leave empty for a user that cannot log in with a password'),
      field('Tags', tagsInput()),
      field('Grant full access to', h('select', { name: 'grant' }, h('option', { value: '' }, '(no vhost)'), h('option', { value: '/', selected: true }, '/'))),
    ],
    onSubmit: async (f) => {
      const name = val(f, 'name').trim();
      const password = val(f, 'password');
      const userBody = { tags: tagList(val(f, 'tags')).join(',') };
      if (password) userBody.password = password;
      else userBody.password_hash = '';
      const ok = await act(async () => {
        await put(`users/${enc(name)}`, userBody);
        const grant = val(f, 'grant');
        if (grant) await put(`permissions/${enc(grant)}/${enc(name)}`, { configure: '.*', write: '.*', read: '.*' });
      }, `User ${name} created`);
      if (ok) { f.reset(); refresh(); }
    },
  });
  // Fill the "grant" choice with the real vhosts.
  get('vhosts').then((vs) => {
    const sel = add.elements.namedItem('grant');
    fill(sel, h('option', { value: '' }, '(no vhost)'), list(vs).map((v) => h('option', { value: v.name, selected: v.name === '/' }, v.name)));
  }).catch(() => {});

  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Admin')), subnav('users'), section('Users', body), collapsible('Add a user', add, true));
  async function refresh() {
    try {
      const [us, perms] = await Promise.all([get('users'), get('permissions').catch(() => [])]);
      const byUser = new Map();
      for (const p of list(perms)) byUser.set(p.user, [...(byUser.get(p.user) || []), p.vhost]);
      fill(body, table([
        { label: 'Name', render: (u) => link(route('admin', 'users', u.name), u.name) },
        { label: 'Tags', render: (u) => tagList(u.tags).map((t) => badge(t, t === 'administrator' ? 'admin' : '')) },
        { label: 'Can access vhosts', value: (u) => (byUser.get(u.name) || []).join(', ') || '(none)' },
        { label: 'Password', value: (u) => (u.password_hash ? 'yes' : 'no') },
      ], list(us), { rowAttrs: (u) => ({ dataset: { name: u.name } }) }));
    } catch (e) { fill(body, errorBox(e)); }
  }
  return { refresh };
}

export async function user(main, name) {
  const info = h('div');
  const perms = h('div', { id: 'user-permissions' });
  const topic = h('div', { id: 'user-topic-permissions' });
  const update = form({
    id: 'update-user',
    submit: 'Update user',
    fields: [
      field('New password', h('input', { type: 'password', name: 'password', autocomplete: 'new-password' }), 'Leave empty to keep the current one'),
      field('Tags', tagsInput()),
    ],
    onSubmit: async (f) => {
      const u = await get(`users/${enc(name)}`);
      const b = { tags: tagList(val(f, 'tags')).join(',') };
      const pw = val(f, 'password');
      if (pw) b.password = pw;
      else { b.password_hash = u.password_hash || ''; if (u.hashing_algorithm) b.hashing_algorithm = u.hashing_algorithm; }
      if (await act(() => put(`users/${enc(name)}`, b), 'User updated')) refresh();
    },
  });
  const setPerm = form({
    id: 'set-permission',
    submit: 'Set permission',
    fields: [
      field('Virtual host', vhostSelect('vhost')),
      field('Configure regexp', text('configure', { value: '.*' })),
      field('Write regexp', text('write', { value: '.*' })),
      field('Read regexp', text('read', { value: '.*' })),
    ],
    onSubmit: async (f) => {
      if (await act(() => put(`permissions/${enc(val(f, 'vhost'))}/${enc(name)}`, {
        configure: val(f, 'configure'), write: val(f, 'write'), read: val(f, 'read'),
      }), 'Permission set')) refresh();
    },
  });
  const setTopic = form({
    id: 'set-topic-permission',
    submit: 'Set topic permission',
    fields: [
      field('Virtual host', vhostSelect('vhost')),
      field('Exchange', text('exchange', { value: 'amq.topic' })),
      field('Write regexp', text('write', { value: '.*' })),
      field('Read regexp', text('read', { value: '.*' })),
    ],
    onSubmit: async (f) => {
      if (await act(() => put(`topic-permissions/${enc(val(f, 'vhost'))}/${enc(name)}`, {
        exchange: val(f, 'exchange'), write: val(f, 'write'), read: val(f, 'read'),
      }), 'Topic permission set')) refresh();
    },
  });
  const delBtn = h('button', {
    type: 'button', class: 'danger', id: 'delete-user',
    onclick: async () => {
      if (!confirmed(`Delete user ${name}? Its connections are closed.`)) return;
      if (await act(() => del(`users/${enc(name)}`), 'User deleted')) location.hash = '#/admin/users';
    },
  }, 'Delete user');
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'User'), h('code', { class: 'title-code' }, name), h('span', { class: 'spacer' }), delBtn),
    subnav('users'), section('Details', info, collapsible('Change password or tags', update)),
    section('Permissions', perms, collapsible('Set a permission', setPerm)),
    section('Topic permissions', topic, collapsible('Set a topic permission', setTopic)));
  let filled = false;
  async function refresh() {
    let u;
    try { u = await get(`users/${enc(name)}`); } catch (e) { fill(info, errorBox(e)); return; }
    if (!filled) { update.elements.namedItem('tags').value = tagList(u.tags).join(', '); filled = true; }
    fill(info, facts([['Tags', tagList(u.tags).map((t) => badge(t))], ['Password', u.password_hash ? 'set' : 'none (cannot log in with a password)'],
      ['Hashing', u.hashing_algorithm], ['Limits', args(u.limits)]]));
    try {
      const ps = list(await get(`users/${enc(name)}/permissions`));
      fill(perms, table([
        { label: 'Virtual host', key: 'vhost' }, { label: 'Configure', render: (p) => h('code', {}, p.configure) },
        { label: 'Write', render: (p) => h('code', {}, p.write) }, { label: 'Read', render: (p) => h('code', {}, p.read) },
        { label: '', render: (p) => h('button', { type: 'button', class: 'small danger', onclick: async () => { if (await act(() => del(`permissions/${enc(p.vhost)}/${enc(name)}`), 'Permission cleared')) refresh(); } }, 'Clear') },
      ], ps, { empty: 'No permissions: this user cannot use any vhost.' }));
    } catch (e) { fill(perms, errorBox(e)); }
    try {
      const ts = list(await get(`users/${enc(name)}/topic-permissions`));
      fill(topic, table([
        { label: 'Virtual host', key: 'vhost' }, { label: 'Exchange', key: 'exchange' },
        { label: 'Write', render: (p) => h('code', {}, p.write) }, { label: 'Read', render: (p) => h('code', {}, p.read) },
        { label: '', render: (p) => h('button', { type: 'button', class: 'small danger', onclick: async () => { if (await act(() => del(`topic-permissions/${enc(p.vhost)}/${enc(name)}`), 'Topic permissions cleared')) refresh(); } }, 'Clear') },
      ], ts, { empty: 'No topic permissions: topic publishing is not restricted.' }));
    } catch (e) { fill(topic, errorBox(e)); }
  }
  return { refresh };
}

// ---- vhosts ---------------------------------------------------------------------------

export async function vhosts(main) {
  const body = h('div', { id: 'vhosts' });
  const add = form({
    id: 'add-vhost',
    submit: 'Add virtual host',
    fields: [
      field('Name', text('name', { required: true })),
      field('Description', text('description')),
      field('Tags', text('tags', { placeholder: 'comma separated' })),
      field('Default queue type', select('default_queue_type', ['classic', 'quorum', 'stream'], 'classic')),
    ],
    onSubmit: async (f) => {
      const name = val(f, 'name').trim();
      const ok = await act(() => put(`vhosts/${enc(name)}`, {
        description: val(f, 'description'), tags: tagList(val(f, 'tags')), default_queue_type: val(f, 'default_queue_type'),
      }), `Virtual host ${name} created`);
      if (ok) { f.reset(); refresh(); }
    },
  });
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Admin')), subnav('vhosts'), section('Virtual hosts', body), collapsible('Add a virtual host', add));
  async function refresh() {
    try {
      const vs = list(await get('vhosts'));
      fill(body, table([
        { label: 'Name', render: (v) => link(route('admin', 'vhosts', v.name), v.name) },
        { label: 'Description', value: (v) => v.description ?? v.metadata?.description ?? '' },
        { label: 'Tags', render: (v) => tagList(v.tags ?? v.metadata?.tags).map((t) => badge(t)) },
        { label: 'Default queue type', value: (v) => v.default_queue_type ?? v.metadata?.default_queue_type ?? '' },
        { label: 'Ready', value: (v) => num(v.messages_ready ?? 0), num: true },
        { label: 'Unacked', value: (v) => num(v.messages_unacknowledged ?? 0), num: true },
        { label: 'Total', value: (v) => num(v.messages ?? 0), num: true },
      ], vs, { rowAttrs: (v) => ({ dataset: { name: v.name } }) }));
    } catch (e) { fill(body, errorBox(e)); }
  }
  return { refresh };
}

export async function vhost(main, name) {
  const info = h('div');
  const perms = h('div');
  const delBtn = h('button', {
    type: 'button', class: 'danger', id: 'delete-vhost',
    onclick: async () => {
      if (!confirmed(`Delete virtual host ${name}? Everything in it is deleted and its connections are closed.`)) return;
      if (await act(() => del(`vhosts/${enc(name)}`), 'Virtual host deleted')) location.hash = '#/admin/vhosts';
    },
  }, 'Delete virtual host');
  const grant = form({
    id: 'vhost-set-permission',
    submit: 'Set permission',
    fields: [field('User', text('user', { required: true })), field('Configure', text('configure', { value: '.*' })),
      field('Write', text('write', { value: '.*' })), field('Read', text('read', { value: '.*' }))],
    onSubmit: async (f) => {
      if (await act(() => put(`permissions/${enc(name)}/${enc(val(f, 'user').trim())}`, {
        configure: val(f, 'configure'), write: val(f, 'write'), read: val(f, 'read'),
      }), 'Permission set')) refresh();
    },
  });
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Virtual host'), h('code', { class: 'title-code' }, name), h('span', { class: 'spacer' }), delBtn),
    subnav('vhosts'), section('Details', info), section('Permissions', perms, collapsible('Set a permission', grant)));
  async function refresh() {
    try {
      const v = await get(`vhosts/${enc(name)}`);
      fill(info, facts([['Description', v.description ?? v.metadata?.description], ['Tags', tagList(v.tags ?? v.metadata?.tags).map((t) => badge(t))],
        ['Default queue type', v.default_queue_type ?? v.metadata?.default_queue_type], ['Messages', num(v.messages ?? 0)], ['Tracing', v.tracing ? 'on' : 'off']]));
    } catch (e) { fill(info, errorBox(e)); return; }
    try {
      const ps = list(await get(`vhosts/${enc(name)}/permissions`));
      fill(perms, table([
        { label: 'User', render: (p) => link(route('admin', 'users', p.user), p.user) }, { label: 'Configure', render: (p) => h('code', {}, p.configure) },
        { label: 'Write', render: (p) => h('code', {}, p.write) }, { label: 'Read', render: (p) => h('code', {}, p.read) },
        { label: '', render: (p) => h('button', { type: 'button', class: 'small danger', onclick: async () => { if (await act(() => del(`permissions/${enc(name)}/${enc(p.user)}`), 'Permission cleared')) refresh(); } }, 'Clear') },
      ], ps, { empty: 'No user may use this vhost.' }));
    } catch (e) { fill(perms, errorBox(e)); }
  }
  return { refresh };
}

// ---- policies -------------------------------------------------------------------------

const POLICY_KEYS = [
  ['max-length', 'number', 'Ready messages kept at most'], ['max-length-bytes', 'number'], ['message-ttl', 'number', 'ms'],
  ['expires', 'number', 'ms unused before the queue is deleted'], ['overflow', 'string', 'drop-head, reject-publish, reject-publish-dlx'],
  ['dead-letter-exchange', 'string'], ['dead-letter-routing-key', 'string'], ['delivery-limit', 'number'],
  ['queue-mode', 'string'], ['alternate-exchange', 'string'],
];

function policyForm(kind, onDone) {
  const def = argumentsEditor(POLICY_KEYS, { label: 'Definition' });
  const f = form({
    id: kind === 'policies' ? 'add-policy' : 'add-operator-policy',
    submit: kind === 'policies' ? 'Add / update policy' : 'Add / update operator policy',
    fields: [
      field('Virtual host', vhostSelect('vhost')),
      field('Name', text('name', { required: true })),
      field('Pattern', text('pattern', { required: true, placeholder: '^orders\\.' }), 'A regular expression matched against queue or exchange names'),
      field('Apply to', select('apply-to', kind === 'policies'
        ? [['queues', 'Queues'], ['classic_queues', 'Classic queues'], ['quorum_queues', 'Quorum queues'], ['streams', 'Streams'], ['exchanges', 'Exchanges'], ['all', 'Exchanges and queues']]
        : [['queues', 'Queues'], ['classic_queues', 'Classic queues'], ['quorum_queues', 'Quorum queues'], ['streams', 'Streams']], 'queues')),
      field('Priority', number('priority', { value: 0 })),
      def.el,
    ],
    onSubmit: async (fm) => {
      let definition;
      try { definition = def.value(); } catch (e) { toast(e.message, 'error'); return; }
      if (!Object.keys(definition).length) { toast('A policy needs at least one definition key', 'error'); return; }
      const name = val(fm, 'name').trim();
      const ok = await act(() => put(`${kind}/${enc(val(fm, 'vhost'))}/${enc(name)}`, {
        pattern: val(fm, 'pattern'), 'apply-to': val(fm, 'apply-to'), priority: Number(val(fm, 'priority')) || 0, definition,
      }), `Policy ${name} saved`);
      if (ok) { fm.reset(); def.set({}); onDone(); }
    },
  });
  return { f, def };
}

function policyTable(kind, rows, onChange, edit) {
  return table([
    { label: 'Vhost', key: 'vhost' },
    { label: 'Name', key: 'name' },
    { label: 'Pattern', render: (p) => h('code', {}, p.pattern) },
    { label: 'Apply to', key: 'apply-to' },
    { label: 'Definition', render: (p) => args(p.definition) },
    { label: 'Priority', key: 'priority', num: true },
    {
      label: '',
      render: (p) => h('span', { class: 'row-actions' },
        h('button', { type: 'button', class: 'small', onclick: () => edit(p) }, 'Edit'),
        h('button', {
          type: 'button', class: 'small danger',
          onclick: async () => {
            if (!confirmed(`Delete policy ${p.name}?`)) return;
            if (await act(() => del(`${kind}/${enc(p.vhost)}/${enc(p.name)}`), 'Policy deleted')) onChange();
          },
        }, 'Delete')),
    },
  ], rows, { empty: 'No policies.', rowAttrs: (p) => ({ dataset: { name: p.name } }) });
}

export async function policies(main, { vhost: vh }) {
  const user = h('div', { id: 'policies' });
  const op = h('div', { id: 'operator-policies' });
  const userForm = policyForm('policies', () => refresh());
  const opForm = policyForm('operator-policies', () => refresh());
  const edit = (pf, box) => (p) => {
    const f = pf.f;
    f.elements.namedItem('vhost').value = p.vhost;
    f.elements.namedItem('name').value = p.name;
    f.elements.namedItem('pattern').value = p.pattern;
    f.elements.namedItem('apply-to').value = p['apply-to'];
    f.elements.namedItem('priority').value = p.priority;
    pf.def.set(p.definition);
    box.open = true;
    f.scrollIntoView({ behavior: 'smooth' });
  };
  const userBox = collapsible('Add or update a policy', userForm.f, true);
  const opBox = collapsible('Add or update an operator policy', opForm.f);
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Admin')), subnav('policies'),
    section('Policies', h('p', { class: 'muted small' }, 'A policy applies to every matching queue or exchange at once, existing ones included; the highest priority wins.'), user, userBox),
    section('Operator policies', h('p', { class: 'muted small' }, 'Operator policies cap what users\u2019 policies and queue arguments ask for; the stricter value wins.'), op, opBox));
  const params = vh ? `/${enc(vh)}` : '';
  async function refresh() {
    try { fill(user, policyTable('policies', list(await get(`policies${params}`)), refresh, edit(userForm, userBox))); } catch (e) { fill(user, errorBox(e)); }
    try { fill(op, policyTable('operator-policies', list(await get(`operator-policies${params}`)), refresh, edit(opForm, opBox))); } catch (e) { fill(op, errorBox(e)); }
  }
  return { refresh };
}

// ---- limits ---------------------------------------------------------------------------

export async function limits(main) {
  const vl = h('div', { id: 'vhost-limits' });
  const ul = h('div', { id: 'user-limits' });
  const vForm = form({
    id: 'set-vhost-limit',
    submit: 'Set limit',
    fields: [field('Virtual host', vhostSelect('vhost')), field('Limit', select('limit', [['max-connections', 'Max connections'], ['max-queues', 'Max queues']], 'max-connections')),
      field('Value', number('value', { required: true, min: -1 }), '-1 means no limit')],
    onSubmit: async (f) => {
      if (await act(() => put(`vhost-limits/${enc(val(f, 'vhost'))}/${enc(val(f, 'limit'))}`, { value: Number(val(f, 'value')) }), 'Limit set')) refresh();
    },
  });
  const uForm = form({
    id: 'set-user-limit',
    submit: 'Set limit',
    fields: [field('User', text('user', { required: true })), field('Limit', select('limit', [['max-connections', 'Max connections'], ['max-channels', 'Max channels']], 'max-connections')),
      field('Value', number('value', { required: true, min: -1 }), '-1 means no limit')],
    onSubmit: async (f) => {
      if (await act(() => put(`user-limits/${enc(val(f, 'user').trim())}/${enc(val(f, 'limit'))}`, { value: Number(val(f, 'value')) }), 'Limit set')) refresh();
    },
  });
  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'Admin')), subnav('limits'),
    section('Virtual host limits', vl, collapsible('Set a virtual host limit', vForm, true)),
    section('User limits', ul, collapsible('Set a user limit', uForm)));

  const limitRows = (rows, key) => rows.flatMap((r) => Object.entries(r.value || {}).map(([limit, value]) => ({ owner: r[key], limit, value })));
  function limitTable(rows, key, pathBase) {
    return table([
      { label: key === 'vhost' ? 'Virtual host' : 'User', key: 'owner' },
      { label: 'Limit', key: 'limit' },
      { label: 'Value', value: (r) => num(r.value), num: true },
      { label: '', render: (r) => h('button', { type: 'button', class: 'small danger', onclick: async () => { if (await act(() => del(`${pathBase}/${enc(r.owner)}/${enc(r.limit)}`), 'Limit cleared')) refresh(); } }, 'Clear') },
    ], limitRows(rows, key), { empty: 'No limits set.' });
  }
  async function refresh() {
    try { fill(vl, limitTable(list(await get('vhost-limits')), 'vhost', 'vhost-limits')); } catch (e) { fill(vl, errorBox(e)); }
    try { fill(ul, limitTable(list(await get('user-limits')), 'user', 'user-limits')); } catch (e) { fill(ul, errorBox(e)); }
  }
  return { refresh };
}


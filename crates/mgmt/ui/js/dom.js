// Small DOM helpers: an element builder, number/time formatting, tables, notices.

/**
 * h('div', {class: 'x', onclick: fn, dataset: {k: v}}, child, [children], 'text')
 * Children may be nodes, strings, numbers, arrays, null/undefined/false (skipped).
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'style' && typeof v === 'object') Object.assign(el.style, v);
    // Set the defaults too, so form.reset() returns to these values.
    else if (k === 'value') { el.value = v; if ('defaultValue' in el) el.defaultValue = v; }
    else if (k === 'checked') { el.checked = v; el.defaultChecked = v; }
    else if (k === 'selected') { el.selected = v; el.defaultSelected = v; }
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  clear(el);
  return append(el, children);
}

// ---- formatting ----------------------------------------------------------

const nf = new Intl.NumberFormat('en-US');
export function num(n) {
  if (n === undefined || n === null || Number.isNaN(n)) return '–';
  return nf.format(n);
}

export function rate(r) {
  if (r === undefined || r === null || Number.isNaN(r)) return '–';
  if (r === 0) return '0.0/s';
  if (r < 10) return `${r.toFixed(1)}/s`;
  return `${nf.format(Math.round(r))}/s`;
}

export function bytes(n) {
  if (n === undefined || n === null || Number.isNaN(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function duration(ms) {
  if (ms === undefined || ms === null) return '–';
  let s = Math.floor(ms / 1000);
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const hh = Math.floor(s / 3600);
  s -= hh * 3600;
  const mm = Math.floor(s / 60);
  s -= mm * 60;
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${mm}m`;
  if (mm) return `${mm}m ${s}s`;
  return `${s}s`;
}

export function timestamp(ms) {
  if (!ms) return '–';
  const d = new Date(ms);
  const pad = (x) => String(x).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** `obj.a.b.c` for the path 'a.b.c', or undefined. */
export function pick(obj, path) {
  let v = obj;
  for (const k of path.split('.')) {
    if (v === undefined || v === null) return undefined;
    v = v[k];
  }
  return v;
}

/** The display name of a vhost-scoped object's vhost ("/" stays "/"). */
export const vhostName = (v) => (v === undefined ? '' : v);

/** "key: value" badges for an arguments / definition map. */
export function args(map) {
  const entries = Object.entries(map || {});
  if (!entries.length) return '';
  return entries.map(([k, v]) => h('span', { class: 'tag arg', title: `${k}: ${JSON.stringify(v)}` }, `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`));
}

export function badge(text, kind = '') {
  return h('span', { class: `tag ${kind}` }, text);
}

// ---- notices ---------------------------------------------------------------

let toastBox = null;
/** A short notice at the bottom right: kind is 'ok' or 'error'. */
export function toast(message, kind = 'ok') {
  if (!toastBox) {
    toastBox = h('div', { class: 'toasts', role: 'status', 'aria-live': 'polite' });
    document.body.append(toastBox);
  }
  const t = h('div', { class: `toast ${kind}` }, message);
  toastBox.append(t);
  setTimeout(() => t.remove(), kind === 'error' ? 8000 : 4000);
}

/** An inline error panel for a section that failed to load. */
export function errorBox(err) {
  return h('div', { class: 'error-box', role: 'alert' },
    h('strong', {}, err.status ? `${err.status} ${err.error || ''}` : 'Error'), ' ', err.message);
}

/** Runs `fn`, showing success `ok` or the error as a toast; returns fn's result or undefined. */
export async function act(fn, ok) {
  try {
    const r = await fn();
    if (ok) toast(typeof ok === 'function' ? ok(r) : ok, 'ok');
    return r ?? true;
  } catch (e) {
    toast(e.message || String(e), 'error');
    return undefined;
  }
}

/** Asks before a destructive action (the browser's confirm: keyboard friendly, testable). */
export function confirmed(text) {
  return window.confirm(text);
}

// ---- tables -----------------------------------------------------------------

/**
 * A static table. columns: [{label, key?, value?(row), render?(row), num?, cls?}].
 * `value` is used for the text; `render` for a node.
 */
export function table(columns, rows, { empty = 'Nothing here yet.', rowAttrs } = {}) {
  const thead = h('thead', {}, h('tr', {}, columns.map((c) => h('th', { class: c.num ? 'num' : '' }, c.label))));
  const tbody = h('tbody');
  if (!rows.length) {
    tbody.append(h('tr', { class: 'empty' }, h('td', { colspan: columns.length }, empty)));
  }
  for (const row of rows) {
    tbody.append(h('tr', rowAttrs ? rowAttrs(row) : {}, columns.map((c) => cell(c, row))));
  }
  return h('div', { class: 'table-wrap' }, h('table', {}, thead, tbody));
}

export function cell(c, row) {
  let content;
  if (c.render) content = c.render(row);
  else if (c.value) content = c.value(row);
  else content = pick(row, c.key);
  if (content === undefined || content === null || content === '') content = c.num ? '–' : '';
  return h('td', { class: [c.num ? 'num' : '', c.cls || ''].join(' ').trim() || null }, content);
}

/** A link inside the app. */
export function link(hash, text) {
  return h('a', { href: hash }, text);
}

/** `#/a/b/c` with each segment percent-encoded. */
export function route(...segments) {
  return `#/${segments.map((s) => encodeURIComponent(s)).join('/')}`;
}

/** A titled panel. */
export function section(title, ...children) {
  return h('section', { class: 'panel' }, title ? h('h2', {}, title) : null, ...children);
}

/** Key/value facts. */
export function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v === undefined || v === null || v === '' ? '–' : v)]));
}

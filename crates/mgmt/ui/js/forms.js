// Form building blocks: labelled fields, a vhost picker, an arguments editor.

import { get } from './api.js';
import { h, fill } from './dom.js';

let fieldSeq = 0;

/** A labelled field wrapping `input` (which gets an id for the label). */
export function field(label, input, hint) {
  fieldSeq += 1;
  if (!input.id) input.id = `f${fieldSeq}`;
  return h('div', { class: 'field' }, h('label', { for: input.id }, label), input, hint ? h('small', { class: 'hint' }, hint) : null);
}

export const text = (name, attrs = {}) => h('input', { type: 'text', name, autocomplete: 'off', ...attrs });
export const textarea = (name, attrs = {}) => h('textarea', { name, rows: 4, ...attrs });
export const number = (name, attrs = {}) => h('input', { type: 'number', name, ...attrs });
export const checkbox = (name, checked = false) => h('input', { type: 'checkbox', name, checked });
export function select(name, options, value) {
  return h('select', { name }, options.map((o) => {
    const [v, label] = Array.isArray(o) ? o : [o, o];
    return h('option', { value: v, selected: v === value }, label);
  }));
}

/** A select of the vhosts, filled asynchronously; `value` preselected. */
export function vhostSelect(name = 'vhost', value) {
  const sel = h('select', { name }, h('option', { value: value ?? '/' }, value ?? '/'));
  get('vhosts').then((vhosts) => {
    const names = (Array.isArray(vhosts) ? vhosts : vhosts.items || []).map((v) => v.name);
    const current = sel.value;
    fill(sel, names.map((n) => h('option', { value: n, selected: n === current }, n)));
  }).catch(() => { /* keep the default; the submit shows any real error */ });
  return sel;
}

/**
 * An editor for an `arguments`-style map: rows of key, value and type.
 * Returns {el, value(), set(map)}; `suggestions` are [key, type, hint] quick-adds.
 */
export function argumentsEditor(suggestions = [], { label = 'Arguments' } = {}) {
  const rows = h('div', { class: 'arg-rows' });
  function addRow(key = '', val = '', type = 'string') {
    const k = h('input', { type: 'text', class: 'arg-key', placeholder: 'key', value: key, 'aria-label': 'argument key' });
    const v = h('input', { type: 'text', class: 'arg-value', placeholder: 'value', value: val, 'aria-label': 'argument value' });
    const t = select('type', [['string', 'String'], ['number', 'Number'], ['boolean', 'Boolean'], ['list', 'List (JSON)']], type);
    t.classList.add('arg-type');
    t.setAttribute('aria-label', 'argument type');
    const row = h('div', { class: 'arg-row' }, k, h('span', {}, '='), v, t,
      h('button', { type: 'button', class: 'icon', title: 'Remove', onclick: () => { row.remove(); ensureBlank(); } }, '×'));
    k.addEventListener('input', ensureBlank);
    rows.append(row);
    return row;
  }
  function ensureBlank() {
    const all = [...rows.querySelectorAll('.arg-row')];
    if (!all.length || all[all.length - 1].querySelector('.arg-key').value) addRow();
  }
  function value() {
    const out = {};
    for (const row of rows.querySelectorAll('.arg-row')) {
      const k = row.querySelector('.arg-key').value.trim();
      if (!k) continue;
      const raw = row.querySelector('.arg-value').value;
      const type = row.querySelector('.arg-type').value;
      if (type === 'number') {
        const n = Number(raw);
        if (raw.trim() === '' || Number.isNaN(n)) throw new Error(`${k}: “${raw}” is not a number`);
        out[k] = n;
      } else if (type === 'boolean') {
        out[k] = raw.trim() === 'true';
      } else if (type === 'list') {
        try { out[k] = JSON.parse(raw); } catch { throw new Error(`${k}: not valid JSON`); }
      } else {
        out[k] = raw;
      }
    }
    return out;
  }
  function set(map) {
    fill(rows);
    for (const [k, v] of Object.entries(map || {})) {
      const type = typeof v === 'number' ? 'number' : typeof v === 'boolean' ? 'boolean' : typeof v === 'string' ? 'string' : 'list';
      addRow(k, type === 'list' ? JSON.stringify(v) : String(v), type);
    }
    ensureBlank();
  }
  const quick = suggestions.length
    ? h('div', { class: 'quick-args' }, h('span', { class: 'hint' }, 'Add: '),
      suggestions.map(([key, type, hint]) => h('button', {
        type: 'button', class: 'link', title: hint || key,
        onclick: () => {
          const blank = [...rows.querySelectorAll('.arg-row')].find((r) => !r.querySelector('.arg-key').value) || addRow();
          blank.querySelector('.arg-key').value = key;
          blank.querySelector('.arg-type').value = type;
          blank.querySelector('.arg-value').focus();
          ensureBlank();
        },
      }, key)))
    : null;
  ensureBlank();
  const el = h('div', { class: 'field wide' }, h('label', {}, label), rows, quick);
  return { el, value, set };
}

/**
 * A form: `fields` are nodes; on submit `onSubmit(form)` runs; the submit button is
 * disabled while it runs. Returns the form element.
 */
export function form({ id, fields, submit = 'Add', onSubmit, cls = '' }) {
  const button = h('button', { type: 'submit', class: 'primary' }, submit);
  const f = h('form', { class: `form ${cls}`, id: id || null }, h('div', { class: 'fields' }, fields), h('div', { class: 'form-actions' }, button));
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    try {
      await onSubmit(f);
    } finally {
      button.disabled = false;
    }
  });
  return f;
}

/** The value of the named control of `form` (checkboxes give booleans). */
export function val(form, name) {
  const el = form.elements.namedItem(name);
  if (!el) return undefined;
  if (el.type === 'checkbox') return el.checked;
  return el.value;
}

/** A collapsible block ("Add a new queue"), closed unless `open`. */
export function collapsible(title, body, open = false) {
  return h('details', { class: 'panel collapsible', open: open || null }, h('summary', {}, title), body);
}

// The app shell: login, navigation (hash routes), the vhost picker and the 5-second
// refresh of whatever page is shown.

import * as api from './api.js';
import { h, fill, errorBox, toast } from './dom.js';
import * as overview from './pages/overview.js';
import * as connections from './pages/connections.js';
import * as exchanges from './pages/exchanges.js';
import * as queues from './pages/queues.js';
import * as mqtt from './pages/mqtt.js';
import * as admin from './pages/admin.js';

const REFRESH_MS = 5000;

// [pattern, page module function, nav key]
const ROUTES = [
  [/^$/, overview.render, 'overview'],
  [/^overview$/, overview.render, 'overview'],
  [/^connections$/, connections.list, 'connections'],
  [/^connections\/([^/]+)$/, connections.detail, 'connections'],
  [/^channels$/, connections.channels, 'channels'],
  [/^exchanges$/, exchanges.list, 'exchanges'],
  [/^exchanges\/([^/]+)\/([^/]*)$/, exchanges.detail, 'exchanges'],
  [/^queues$/, queues.list, 'queues'],
  [/^queues\/([^/]+)\/([^/]+)$/, queues.detail, 'queues'],
  [/^mqtt$/, mqtt.render, 'mqtt'],
  [/^admin$/, admin.users, 'admin'],
  [/^admin\/users$/, admin.users, 'admin'],
  [/^admin\/users\/([^/]+)$/, admin.user, 'admin'],
  [/^admin\/vhosts$/, admin.vhosts, 'admin'],
  [/^admin\/vhosts\/([^/]+)$/, admin.vhost, 'admin'],
  [/^admin\/policies$/, admin.policies, 'admin'],
  [/^admin\/limits$/, admin.limits, 'admin'],
];

const NAV = [
  ['overview', 'Overview'],
  ['connections', 'Connections'],
  ['channels', 'Channels'],
  ['exchanges', 'Exchanges'],
  ['queues', 'Queues'],
  ['mqtt', 'MQTT'],
  ['admin', 'Admin'],
];

const app = document.getElementById('app');
let current = null; // {refresh?, dispose?}
let timer = null;
let me = null;

/** The vhost the lists are narrowed to ('' = all). */
export function selectedVhost() {
  return localStorage.getItem('switchyard.vhost') || '';
}

function header() {
  const vhostPicker = h('select', { id: 'vhost-picker', 'aria-label': 'Virtual host' },
    h('option', { value: '' }, 'All vhosts'));
  api.get('vhosts').then((vs) => {
    const names = (Array.isArray(vs) ? vs : vs.items || []).map((v) => v.name);
    const sel = selectedVhost();
    fill(vhostPicker, h('option', { value: '' }, 'All vhosts'),
      names.map((n) => h('option', { value: n, selected: n === sel }, n)));
  }).catch(() => {});
  vhostPicker.addEventListener('change', () => {
    localStorage.setItem('switchyard.vhost', vhostPicker.value);
    navigate();
  });
  const status = h('span', { id: 'refresh-status', class: 'refresh-status', title: 'Pages refresh every 5 seconds' });
  return h('header', { class: 'top' },
    h('a', { class: 'brand', href: '#/overview' }, h('img', { src: 'favicon.svg', alt: '', width: 22, height: 22 }), 'Switchyard'),
    h('nav', { class: 'main-nav' }, NAV.map(([key, label]) => h('a', { href: `#/${key}`, dataset: { nav: key } }, label))),
    h('div', { class: 'top-right' },
      status,
      h('label', { class: 'vhost-label' }, 'Vhost ', vhostPicker),
      h('span', { class: 'user', id: 'current-user', title: (me?.tags || []).join(', ') }, me?.name || ''),
      h('button', { type: 'button', class: 'ghost', id: 'logout', onclick: logout }, 'Log out')));
}

function setStatus(text, error = false) {
  const el = document.getElementById('refresh-status');
  if (!el) return;
  el.textContent = text;
  el.classList.toggle('error', error);
}

async function refreshCurrent() {
  if (!current || !current.refresh || document.hidden) return;
  try {
    await current.refresh();
    setStatus(`Updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  for (const [re, fn, key] of ROUTES) {
    const m = raw.match(re);
    if (m) return { fn, key, params: m.slice(1).map((s) => decodeURIComponent(s)) };
  }
  return null;
}

async function navigate() {
  if (!me) return;
  if (current?.dispose) current.dispose();
  current = null;
  clearInterval(timer);
  const route = parseHash();
  for (const a of document.querySelectorAll('.main-nav a')) {
    a.classList.toggle('active', route && a.dataset.nav === route.key);
  }
  const main = h('main', { class: 'page' });
  fill(app, header(), main);
  for (const a of document.querySelectorAll('.main-nav a')) {
    a.classList.toggle('active', Boolean(route) && a.dataset.nav === route.key);
  }
  if (!route) {
    fill(main, h('h1', {}, 'Not found'), h('p', {}, 'No page at this address. ', h('a', { href: '#/overview' }, 'Back to the overview')));
    return;
  }
  try {
    current = (await route.fn(main, ...route.params, { me, vhost: selectedVhost() })) || null;
  } catch (e) {
    fill(main, errorBox(e));
    return;
  }
  await refreshCurrent();
  timer = setInterval(refreshCurrent, REFRESH_MS);
}

function loginPage(message) {
  clearInterval(timer);
  me = null;
  const user = h('input', { type: 'text', id: 'login-username', name: 'username', autocomplete: 'username', required: true, autofocus: true });
  const pass = h('input', { type: 'password', id: 'login-password', name: 'password', autocomplete: 'current-password' });
  const remember = h('input', { type: 'checkbox', id: 'login-remember' });
  const err = h('div', { class: 'login-error', id: 'login-error', role: 'alert' }, message || '');
  const button = h('button', { type: 'submit', class: 'primary', id: 'login-submit' }, 'Log in');
  const f = h('form', { class: 'login-card', id: 'login-form' },
    h('div', { class: 'login-brand' }, h('img', { src: 'favicon.svg', alt: '', width: 36, height: 36 }), h('h1', {}, 'Switchyard')),
    h('p', { class: 'muted' }, 'Management'),
    h('div', { class: 'field' }, h('label', { for: 'login-username' }, 'Username'), user),
    h('div', { class: 'field' }, h('label', { for: 'login-password' }, 'Password'), pass),
    h('label', { class: 'check' }, remember, ' Keep me logged in on this computer'),
    err,
    button);
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    err.textContent = '';
    const token = api.encodeCredentials(user.value, pass.value);
    try {
      const who = await api.request('GET', 'whoami', { token });
      api.saveCredentials(token, remember.checked);
      me = who;
      if (!location.hash || location.hash === '#' || location.hash === '#/') location.hash = '#/overview';
      await navigate();
    } catch (e) {
      err.textContent = e.status === 401 ? 'Wrong username or password, or this user may not use the management UI.' : e.message;
    } finally {
      button.disabled = false;
    }
  });
  fill(app, h('div', { class: 'login-wrap' }, f));
  user.focus();
}

function logout() {
  api.forgetCredentials();
  current?.dispose?.();
  current = null;
  loginPage('You are logged out.');
}

api.setUnauthorizedHandler(() => {
  api.forgetCredentials();
  loginPage('Your session is no longer valid: log in again.');
});

window.addEventListener('hashchange', navigate);
document.addEventListener('visibilitychange', () => { if (!document.hidden) refreshCurrent(); });

async function start() {
  if (!api.credentials()) {
    loginPage();
    return;
  }
  try {
    me = await api.get('whoami');
  } catch (e) {
    if (e.status !== 401) {
      loginPage(e.message);
      toast(e.message, 'error');
    }
    return;
  }
  await navigate();
}

start();

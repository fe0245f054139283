// The HTTP API client of the UI: relative URLs (`api/...`, so the UI works behind a
// path prefix), HTTP Basic credentials on every request, errors as ApiError.
//
// Credentials live in sessionStorage (this tab) or, with "remember me", in
// localStorage, as RabbitMQ's UI keeps them; they are sent per request and never as
// a cookie. `credentials: 'omit'` keeps the browser from showing its own login box
// when the server answers 401 with WWW-Authenticate.

const KEY = 'switchyard.auth';

export class ApiError extends Error {
  constructor(status, error, reason) {
    super(reason || error || `HTTP ${status}`);
    this.status = status;
    this.error = error;
    this.reason = reason;
  }
}

export function encodeCredentials(user, password) {
  const bytes = new TextEncoder().encode(`${user}:${password}`);
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

export function credentials() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY);
}

export function username() {
  const c = credentials();
  if (!c) return '';
  try {
    const bin = atob(c);
    const bytes = Uint8Array.from(bin, (ch) => ch.charCodeAt(0));
    return new TextDecoder().decode(bytes).split(':')[0];
  } catch {
    return '';
  }
}

export function saveCredentials(token, remember) {
  sessionStorage.setItem(KEY, token);
  if (remember) localStorage.setItem(KEY, token);
  else localStorage.removeItem(KEY);
}

export function forgetCredentials() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

/** Called with the ApiError when a request is refused for bad credentials. */
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

/** Percent-encodes one path segment (the vhost `/` becomes `%2F`). */
export const enc = (s) => encodeURIComponent(s);

/** `api/<path>` with the query `params` (undefined and '' values left out). */
export function url(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const qs = q.toString();
  return `api/${path}${qs ? `?${qs}` : ''}`;
}

/**
 * One request. `body` is sent as JSON unless it is a string (sent as is).
 * Resolves to the parsed JSON, the text, or null for an empty answer.
 */
export async function request(method, path, { body, params, headers, token, raw } = {}) {
  const h = { Accept: 'application/json', ...(headers || {}) };
  const auth = token || credentials();
  if (auth) h.Authorization = `Basic ${auth}`;
  let payload;
  if (body !== undefined) {
    h['Content-Type'] = 'application/json';
    payload = typeof body === 'string' ? body : JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(url(path, params), { method, headers: h, body: payload, credentials: 'omit', cache: 'no-store' });
  } catch (e) {
    throw new ApiError(0, 'network', `Cannot reach the broker (${e.message})`);
  }
  const text = await res.text();
  if (!res.ok) {
    let error = '';
    let reason = '';
    try {
      const j = JSON.parse(text);
      error = j.error || '';
      reason = j.reason || '';
    } catch {
      reason = text.trim();
    }
    if (!reason) reason = res.status === 401 ? 'Login failed' : `${res.status} ${res.statusText}`;
    const err = new ApiError(res.status, error, typeof reason === 'string' ? reason : JSON.stringify(reason));
    if (res.status === 401 && !token) onUnauthorized(err);
    throw err;
  }
  if (raw) return { text, headers: res.headers, status: res.status };
  if (!text) return null;
  const type = res.headers.get('content-type') || '';
  if (type.includes('json')) return JSON.parse(text);
  return text;
}

export const get = (path, params) => request('GET', path, { params });
export const put = (path, body) => request('PUT', path, { body: body ?? {} });
export const post = (path, body) => request('POST', path, { body: body ?? {} });
export const del = (path, opts) => request('DELETE', path, opts);

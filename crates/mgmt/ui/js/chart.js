// A small live line chart drawn as inline SVG (no library).
//
// The broker keeps rates in 5-second rings; when it returns `samples` with a
// `*_details` object (RabbitMQ's `lengths_age`/`msg_rates_age` parameters) the chart
// draws them, otherwise it keeps its own history of what each poll returned.

import { h, fill, num, rate } from './dom.js';

const NS = 'http://www.w3.org/2000/svg';
const W = 600;
const H = 180;
const PAD = { l: 48, r: 8, t: 10, b: 22 };
export const WINDOW_MS = 10 * 60 * 1000;
const COLORS = ['#2f6fde', '#e07b00', '#1a9b5a', '#c23b5a', '#7a4fc9', '#0f8fa3', '#8a8a8a'];

function svg(tag, attrs) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

/** The y axis: a "nice" step (1, 2, 2.5 or 5 times a power of ten) and 1-4 ticks above 0. */
function axis(max) {
  if (max <= 0) return { step: 0.25, ticks: 4 };
  const raw = max / 4;
  const p = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * p).find((s) => s >= raw) ?? 10 * p;
  return { step, ticks: Math.max(1, Math.ceil(max / step - 1e-9)) };
}

/**
 * A chart of named series. `kind` is 'rate' (values per second) or 'count'.
 * Returns {el, push(now, values), setHistory(map)}.
 */
export function lineChart({ title, series, kind = 'count', id }) {
  const history = new Map(series.map((s) => [s.key, []]));
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart-svg', role: 'img', 'aria-label': title });
  const legend = h('ul', { class: 'legend' });
  const el = h('figure', { class: 'chart', id: id || null, dataset: { kind } }, h('figcaption', {}, title), root, legend);
  const fmt = kind === 'rate' ? rate : num;

  function draw() {
    const now = Date.now();
    const from = now - WINDOW_MS;
    let max = 0;
    for (const pts of history.values()) for (const p of pts) if (p.t >= from && p.v > max) max = p.v;
    const { step, ticks } = axis(max);
    const top = step * ticks;
    const x = (t) => PAD.l + ((t - from) / WINDOW_MS) * (W - PAD.l - PAD.r);
    const y = (v) => H - PAD.b - (v / top) * (H - PAD.t - PAD.b);
    while (root.firstChild) root.removeChild(root.firstChild);
    for (let i = 0; i <= ticks; i += 1) {
      const v = step * i;
      root.append(svg('line', { x1: PAD.l, x2: W - PAD.r, y1: y(v), y2: y(v), class: 'grid' }));
      const label = svg('text', { x: PAD.l - 6, y: y(v) + 4, class: 'axis', 'text-anchor': 'end' });
      label.textContent = compact(v);
      root.append(label);
    }
    for (const m of [10, 5, 0]) {
      const t = now - m * 60000;
      const label = svg('text', { x: x(t), y: H - 6, class: 'axis', 'text-anchor': m === 0 ? 'end' : 'middle' });
      label.textContent = m === 0 ? 'now' : `-${m}m`;
      root.append(label);
    }
    series.forEach((s, i) => {
      const pts = (history.get(s.key) || []).filter((p) => p.t >= from);
      if (!pts.length) return;
      const color = s.color || COLORS[i % COLORS.length];
      if (pts.length === 1) {
        root.append(svg('circle', { cx: x(pts[0].t), cy: y(pts[0].v), r: 3, fill: color, 'data-series': s.key }));
        return;
      }
      const d = pts.map((p, j) => `${j ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join('');
      root.append(svg('path', { d, class: 'line', stroke: color, 'data-series': s.key }));
    });
    fill(legend, series.map((s, i) => {
      const pts = history.get(s.key) || [];
      const last = pts.length ? pts[pts.length - 1].v : undefined;
      return h('li', { dataset: { series: s.key, value: last === undefined ? '' : String(last) } },
        h('span', { class: 'swatch', style: { background: s.color || COLORS[i % COLORS.length] } }),
        h('span', { class: 'legend-label' }, s.label),
        h('span', { class: 'legend-value' }, fmt(last)));
    }));
  }

  function trim(pts) {
    const from = Date.now() - WINDOW_MS - 10000;
    while (pts.length && pts[0].t < from) pts.shift();
  }

  /** Appends one value per series (undefined values are skipped). */
  function push(t, values) {
    for (const s of series) {
      const v = values[s.key];
      if (v === undefined || v === null || Number.isNaN(v)) continue;
      const pts = history.get(s.key);
      pts.push({ t, v });
      trim(pts);
    }
    draw();
  }

  /** Replaces the history of the series the server keeps ({key: [{t, v}]}). */
  function setHistory(map) {
    for (const s of series) if (map[s.key]) history.set(s.key, map[s.key]);
  }

  draw();
  return { el, push, setHistory };
}

function compact(v) {
  if (v >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (v >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return String(+v.toPrecision(2));
}

/**
 * The history the server keeps for a `*_details` object, as [{t, v}] oldest first:
 * RabbitMQ's `samples` ([{sample, timestamp}], newest first; counters for message
 * stats, values for lengths) or a LavinMQ-style `log` of values 5 s apart.
 */
function serverHistory(details, counter, now) {
  if (Array.isArray(details?.samples) && details.samples.length > 1) {
    const pts = details.samples.map((p) => ({ t: p.timestamp, v: p.sample })).sort((a, b) => a.t - b.t);
    if (!counter) return pts;
    const out = [];
    for (let i = 1; i < pts.length; i += 1) {
      const dt = (pts[i].t - pts[i - 1].t) / 1000;
      if (dt > 0) out.push({ t: pts[i].t, v: Math.max(0, (pts[i].v - pts[i - 1].v) / dt) });
    }
    return out;
  }
  if (Array.isArray(details?.log) && details.log.length > 1) {
    const n = details.log.length;
    return details.log.map((v, i) => ({ t: now - (n - 1 - i) * 5000, v }));
  }
  return null;
}

function feed(chart, source, keys, counter, now) {
  const values = {};
  const histories = {};
  for (const k of keys) {
    const details = source?.[`${k}_details`];
    const hist = serverHistory(details, counter, now);
    if (hist) histories[k] = hist;
    else values[k] = counter ? details?.rate ?? 0 : source?.[k] ?? 0;
  }
  if (Object.keys(histories).length) chart.setHistory(histories);
  chart.push(now, values);
}

/** Feeds a rates chart from a `message_stats` object. */
export function feedRates(chart, stats, keys, now = Date.now()) {
  feed(chart, stats || {}, keys, true, now);
}

/** Feeds a counts chart from fields of `obj` (e.g. messages_ready). */
export function feedCounts(chart, obj, keys, now = Date.now()) {
  feed(chart, obj || {}, keys, false, now);
}

// A server-paged, sorted and filtered list (queues, exchanges, connections, channels).
//
// Only one page is ever fetched: `page`, `page_size`, `name`, `use_regex`, `sort` and
// `sort_reverse` go to the API (MANAGEMENT.md §1), so a broker with 10,000 queues
// costs the browser one page of rows. The controls are built once; each refresh only
// replaces the table body and the pager, so typing in the filter is never disturbed.

import { get } from './api.js';
import { h, fill, cell, num, errorBox } from './dom.js';

const PAGE_SIZES = [20, 50, 100, 500];

/**
 * options: {
 *   id, path(): string (e.g. 'queues' or 'queues/%2F'),
 *   columns: [{label, key?, sort?, num?, render?, value?}],
 *   defaultSort, defaultReverse, noun ('queues'), rowAttrs(row),
 *   actions?: Node (put to the right of the filter)
 * }
 * Returns {el, refresh()}.
 */
export function pagedList(opts) {
  const stateKey = `switchyard.list.${opts.id}`;
  let saved = {};
  try {
    saved = JSON.parse(sessionStorage.getItem(stateKey) || '{}');
  } catch { /* a bad saved state is ignored */ }
  const state = {
    page: saved.page || 1,
    pageSize: saved.pageSize || 50,
    name: saved.name || '',
    regex: Boolean(saved.regex),
    sort: saved.sort ?? opts.defaultSort ?? 'name',
    reverse: saved.reverse ?? Boolean(opts.defaultReverse),
  };
  const persist = () => sessionStorage.setItem(stateKey, JSON.stringify(state));

  const filter = h('input', {
    type: 'search', placeholder: `Filter ${opts.noun} by name`, value: state.name,
    class: 'filter', 'aria-label': `Filter ${opts.noun}`, id: `${opts.id}-filter`,
  });
  const regex = h('input', { type: 'checkbox', checked: state.regex, id: `${opts.id}-regex` });
  const size = h('select', { 'aria-label': 'Page size', id: `${opts.id}-page-size` },
    PAGE_SIZES.map((n) => h('option', { value: String(n), selected: n === state.pageSize }, `${n} per page`)));
  const summary = h('span', { class: 'list-summary' });
  const pager = h('div', { class: 'pager' });
  const headRow = h('tr');
  const tbody = h('tbody');
  const errorSlot = h('div');
  const el = h('div', { class: 'paged-list', id: opts.id },
    h('div', { class: 'list-controls' },
      filter,
      h('label', { class: 'check' }, regex, ' Regex'),
      size,
      summary,
      h('span', { class: 'spacer' }),
      opts.actions || null),
    errorSlot,
    h('div', { class: 'table-wrap' }, h('table', { class: 'list' }, h('thead', {}, headRow), tbody)),
    pager);

  let timer = null;
  filter.addEventListener('input', () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.name = filter.value; state.page = 1; refresh(); }, 250);
  });
  regex.addEventListener('change', () => { state.regex = regex.checked; state.page = 1; refresh(); });
  size.addEventListener('change', () => { state.pageSize = Number(size.value); state.page = 1; refresh(); });

  function drawHead() {
    fill(headRow, opts.columns.map((c) => {
      if (!c.sort) return h('th', { class: c.num ? 'num' : '' }, c.label);
      const active = state.sort === c.sort;
      const arrow = active ? (state.reverse ? ' ▼' : ' ▲') : '';
      return h('th', { class: `${c.num ? 'num ' : ''}sortable${active ? ' sorted' : ''}`, 'aria-sort': active ? (state.reverse ? 'descending' : 'ascending') : 'none' },
        h('button', {
          type: 'button', class: 'sort',
          onclick: () => {
            if (state.sort === c.sort) state.reverse = !state.reverse;
            else { state.sort = c.sort; state.reverse = Boolean(c.num); }
            state.page = 1;
            refresh();
          },
        }, c.label, arrow));
    }));
  }

  function drawPager(data) {
    const pages = Math.max(1, data.page_count || 1);
    const go = (p) => { state.page = p; refresh(); };
    const btn = (label, p, disabled, cls = '') => h('button', { type: 'button', class: `page ${cls}`, disabled: disabled || null, onclick: () => go(p) }, label);
    const nums = [];
    const from = Math.max(1, state.page - 2);
    const to = Math.min(pages, state.page + 2);
    if (from > 1) nums.push(btn('1', 1, false), from > 2 ? h('span', { class: 'gap' }, '…') : null);
    for (let p = from; p <= to; p += 1) nums.push(btn(String(p), p, p === state.page, p === state.page ? 'current' : ''));
    if (to < pages) nums.push(to < pages - 1 ? h('span', { class: 'gap' }, '…') : null, btn(String(pages), pages, false));
    fill(pager, btn('‹ Prev', state.page - 1, state.page <= 1), nums, btn('Next ›', state.page + 1, state.page >= pages));
    const shown = data.item_count ?? (data.items || []).length;
    const filtered = data.filtered_count ?? shown;
    const total = data.total_count ?? filtered;
    const noun = (n) => (n === 1 ? opts.noun.replace(/s$/, '') : opts.noun);
    fill(summary, filtered === total
      ? `${num(total)} ${noun(total)}`
      : `${num(filtered)} of ${num(total)} ${noun(total)} match${filtered === 1 ? 'es' : ''}`);
  }

  async function refresh() {
    persist();
    drawHead();
    let data;
    try {
      data = await get(opts.path(), {
        page: state.page,
        page_size: state.pageSize,
        name: state.name,
        use_regex: state.regex ? 'true' : undefined,
        sort: state.sort,
        sort_reverse: state.reverse ? 'true' : undefined,
      });
    } catch (e) {
      fill(errorSlot, errorBox(e));
      return;
    }
    fill(errorSlot);
    // A filter that shrank the list can leave us past the last page.
    if (data.page_count && state.page > data.page_count) {
      state.page = data.page_count;
      await refresh();
      return;
    }
    const rows = Array.isArray(data) ? data : data.items || [];
    const nodes = rows.map((row) => h('tr', opts.rowAttrs ? opts.rowAttrs(row) : {}, opts.columns.map((c) => cell(c, row))));
    if (!nodes.length) {
      nodes.push(h('tr', { class: 'empty' }, h('td', { colspan: opts.columns.length },
        state.name ? `No ${opts.noun} match “${state.name}”.` : `No ${opts.noun} yet.`)));
    }
    fill(tbody, nodes);
    drawPager(Array.isArray(data) ? { items: data, page_count: 1 } : data);
  }

  drawHead();
  return { el, refresh };
}

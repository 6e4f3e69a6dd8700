// mcp-orchestrator console: one page over the server's /console/api and
// POST /orchestrate. Plain DOM code, no framework, no build step. Every text
// from the server goes in through textContent; the only markup inserted as
// is, is the SVG the server draws for /console/api/graph.
'use strict';

(() => {
  const KEY_STORAGE = 'mcpo-console-key';
  const MAX_TURNS = 500;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 10000;
  const STALL_MS = 45000; // the server sends a keep-alive every 15 s

  const state = {
    status: null,
    turns: [], // TurnSummary, oldest first, at most MAX_TURNS
    byId: new Map(),
    routes: new Set(),
    intents: new Set(),
    users: new Set(),
    selectedId: null,
    trace: null, // TurnTrace of the selected turn
    tab: 'steps',
    graphKey: null, // what #graph holds: flow@generation
    sessionAuto: true, // the session id follows <user>:<channel>
    testNameFor: null, // the session the test name was prefilled for
    downloadUrl: null,
  };

  // --- helpers

  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k === 'dataset') Object.assign(node.dataset, v);
      else if (k === 'style') Object.assign(node.style, v);
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid == null || kid === false) continue;
      node.append(kid instanceof Node ? kid : String(kid));
    }
    return node;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function fmtMs(ms) {
    if (ms == null || Number.isNaN(Number(ms))) return '—';
    const n = Number(ms);
    if (n < 10) return `${n.toFixed(2)} ms`;
    if (n < 100) return `${n.toFixed(1)} ms`;
    return `${Math.round(n)} ms`;
  }

  function fmtTime(iso, withMs) {
    const d = new Date(iso);
    if (!iso || Number.isNaN(d.getTime())) return iso || '—';
    const t = d.toLocaleTimeString([], { hour12: false });
    return withMs ? `${t}.${String(d.getMilliseconds()).padStart(3, '0')}` : t;
  }

  function truncate(text, max) {
    const s = String(text ?? '');
    return s.length > max ? `${s.slice(0, max - 1)}…` : s;
  }

  const isError = (t) => t.decision === 'error' || t.error != null || (t.failed_calls || 0) > 0;

  function chip(text, cls) {
    return el('span', { class: `chip ${cls || ''}`.trim(), text });
  }

  function setOptions(select, values, first) {
    const current = select.value;
    select.replaceChildren(...(first ? [el('option', { value: first.value, text: first.text })] : []),
      ...values.map((v) => el('option', { value: v, text: v })));
    if ([...select.options].some((o) => o.value === current)) select.value = current;
  }

  // --- API, auth

  class ProblemError extends Error {
    constructor(status, problem) {
      super(problem.detail || problem.title || `HTTP ${status}`);
      this.status = status;
      this.code = problem.code || `http_${status}`;
      this.problem = problem;
    }
  }

  let memoryKey = ''; // when sessionStorage is disabled

  function storedKey() {
    try { return sessionStorage.getItem(KEY_STORAGE) || ''; } catch { return memoryKey; }
  }

  function storeKey(key) {
    memoryKey = key;
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch { /* storage disabled: memoryKey holds it for this page */ }
    $('key-forget').hidden = !key;
  }

  let keyPrompt = null;

  // Shows the key form and resolves once a key is entered. Calls that fail
  // at the same time share one prompt.
  function askForKey(status, problem) {
    if (keyPrompt) return keyPrompt;
    const had = storedKey();
    if (had) storeKey('');
    const why = status === 403
      ? 'The key was refused for this (forbidden). Enter a key that may use the console.'
      : had ? 'The stored key was not accepted. Enter a caller key.' : 'This server asks for a caller key.';
    $('key-message').textContent = problem && problem.detail ? `${why} (${problem.detail})` : why;
    $('key-overlay').hidden = false;
    const input = $('key-input');
    input.value = '';
    input.focus();
    keyPrompt = new Promise((resolve) => {
      const form = $('key-form');
      form.addEventListener('submit', function onSubmit(ev) {
        ev.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        form.removeEventListener('submit', onSubmit);
        storeKey(key);
        $('key-overlay').hidden = true;
        keyPrompt = null;
        resolve(key);
      });
    });
    return keyPrompt;
  }

  async function readProblem(res) {
    const text = await res.text().catch(() => '');
    try {
      const p = JSON.parse(text);
      if (p && typeof p === 'object') return p;
    } catch { /* not JSON */ }
    return { status: res.status, title: res.statusText || `HTTP ${res.status}`, detail: truncate(text, 300) };
  }

  // fetch with the stored key; on 401 (and 403 unless keyOn403 is false
  // while a key is stored) asks for a key and tries again.
  // Where the server is mounted: '' for /console, '/t/<tenant>' for a
  // tenant's console (/t/<tenant>/console); every path below is under it.
  const BASE = location.pathname.replace(/\/console\/?$/, '');

  async function request(path, opts = {}) {
    const { method = 'GET', body, accept = 'application/json', signal, keyOn403 = true } = opts;
    for (;;) {
      const headers = { Accept: accept };
      if (body !== undefined) headers['Content-Type'] = 'application/json';
      const key = storedKey();
      if (key) headers.Authorization = `Bearer ${key}`;
      const res = await fetch(BASE + path, {
        method, headers, signal, cache: 'no-store',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const needsKey = res.status === 401 || (res.status === 403 && (keyOn403 || !key));
      if (!needsKey) return res;
      if (storedKey() !== key) continue; // a new key came in meanwhile: try it
      await askForKey(res.status, await readProblem(res));
    }
  }

  async function api(path, opts = {}) {
    const res = await request(path, opts);
    if (!res.ok) throw new ProblemError(res.status, await readProblem(res));
    return opts.accept && !opts.accept.includes('json') ? res.text() : res.json();
  }

  // --- status

  function applyStatus(s) {
    if (!s || typeof s !== 'object') return;
    const previous = state.status;
    state.status = s;
    $('status-env').textContent = s.environment || '—';
    const gen = $('status-generation');
    gen.textContent = String(s.generation ?? '—');
    gen.dataset.generation = String(s.generation ?? '');
    const loaded = $('status-loaded');
    loaded.textContent = fmtTime(s.loaded_at);
    loaded.title = s.loaded_at || '';

    renderReload(s.reload || {});

    const channels = Array.isArray(s.channels) && s.channels.length ? s.channels : ['web'];
    setOptions($('chat-channel'), channels);
    setOptions($('graph-flow'), s.flows || [], { value: '', text: 'whole project' });
    for (const i of s.intents || []) state.intents.add(i);
    refreshFilterOptions();
    followSession();

    if (previous && previous.generation !== s.generation && state.tab === 'graph') loadGraph();
  }

  function renderReload(reload) {
    const badge = $('reload-status');
    const panel = $('diagnostics');
    const err = reload.last_error;
    badge.className = `badge ${err ? 'bad' : 'good'}`;
    badge.textContent = err ? 'reload failed' : 'reload ok';
    badge.title = err
      ? `${err.message || ''} at ${err.at || '?'}`
      : `${reload.attempts ?? 0} reload attempts; last success ${reload.last_success_at || 'never'}`;
    if (!err) {
      panel.hidden = true;
      panel.replaceChildren();
      return;
    }
    const gen = state.status ? state.status.generation : '?';
    const items = (err.diagnostics || []).map((d) => {
      const loc = d.file ? [d.file, d.line, d.column ?? d.col].filter((x) => x != null && x !== '').join(':') : '';
      return el('li', { class: `diag ${d.severity || 'error'}` },
        el('span', { class: 'diag-loc', text: loc }), '  ',
        el('span', { class: 'diag-code', text: d.code || '' }), '  ',
        el('span', { class: 'diag-msg', text: d.message || '' }),
        d.hint ? el('div', { class: 'diag-hint', text: `hint: ${d.hint}` }) : null);
    });
    panel.replaceChildren(
      el('p', { class: 'diag-title' },
        el('strong', { text: 'The project on disk does not load. ' }),
        `${err.message || ''} (${fmtTime(err.at)}). Generation ${gen}, the last good one, still serves.`),
      el('ul', {}, items));
    panel.hidden = false;
  }

  // --- event stream

  function setLive(live, note) {
    const badge = $('live-status');
    badge.className = `live ${live ? 'on' : 'off'}`;
    badge.textContent = live ? 'live' : 'disconnected';
    badge.title = note || '';
  }

  // Reads a text/event-stream body, calling onEvent(type, data) per frame.
  async function readEvents(body, onEvent, onChunk) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      onChunk();
      let text = buf + decoder.decode(value, { stream: true });
      let tail = '';
      if (text.endsWith('\r')) { tail = '\r'; text = text.slice(0, -1); } // \r\n split across chunks
      buf = text.replace(/\r\n?/g, '\n') + tail;
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const frame = buf.slice(0, end);
        buf = buf.slice(end + 2);
        dispatchFrame(frame, onEvent);
      }
    }
  }

  function dispatchFrame(frame, onEvent) {
    let type = 'message';
    const data = [];
    for (const line of frame.split('\n')) {
      if (line === '' || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
    if (data.length) onEvent(type, data.join('\n'));
  }

  function onServerEvent(type, data) {
    let payload;
    try { payload = JSON.parse(data); } catch { return; }
    if (type === 'turn') addTurn(payload);
    else if (type === 'status') applyStatus(payload);
    else if (type === 'lagged') refreshTurns();
  }

  async function eventsLoop() {
    let backoff = BACKOFF_MIN_MS;
    for (;;) {
      const abort = new AbortController();
      let watchdog = null;
      const feed = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => abort.abort(), STALL_MS);
      };
      let why = 'stream ended';
      try {
        const res = await request('/console/api/events', { accept: 'text/event-stream', signal: abort.signal });
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        feed();
        setLive(true);
        backoff = BACKOFF_MIN_MS;
        refreshAll(); // catch up on what happened while we were away
        await readEvents(res.body, onServerEvent, feed);
      } catch (e) {
        why = abort.signal.aborted ? 'no data for a while' : String(e && e.message ? e.message : e);
      } finally {
        clearTimeout(watchdog);
        abort.abort();
      }
      setLive(false, `${why}; retrying in ${backoff / 1000} s`);
      await sleep(backoff);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  }

  async function refreshStatus() {
    try { applyStatus(await api('/console/api/status')); } catch { /* shown as disconnected */ }
  }

  async function refreshTurns() {
    try {
      const body = await api('/console/api/turns');
      mergeTurns(body.turns || []);
    } catch { /* the next reconnect tries again */ }
  }

  function refreshAll() {
    return Promise.all([refreshStatus(), refreshTurns()]);
  }

  // --- turn list

  function remember(t) {
    state.byId.set(t.id, t);
    if (t.route) state.routes.add(t.route);
    if (t.intent) state.intents.add(t.intent);
    if (t.user_id) state.users.add(t.user_id);
  }

  function trimTurns() {
    while (state.turns.length > MAX_TURNS) state.byId.delete(state.turns.shift().id);
  }

  // A known id with another trace: the server restarted and counts from 1
  // again, so what we hold is stale.
  function isKnown(t) {
    const old = state.byId.get(t.id);
    if (!old) return false;
    if (old.trace_id === t.trace_id) return true;
    state.turns = [];
    state.byId.clear();
    $('turn-list').replaceChildren();
    return false;
  }

  function addTurn(t) {
    if (!t || t.id == null || isKnown(t)) return;
    const last = state.turns[state.turns.length - 1];
    remember(t);
    if (last && t.id < last.id) { // out of order: rebuild
      state.turns.push(t);
      state.turns.sort((a, b) => a.id - b.id);
      trimTurns();
      renderTurnList();
    } else {
      state.turns.push(t);
      trimTurns();
      const list = $('turn-list');
      const row = turnRow(t);
      row.hidden = !matchesFilters(t);
      list.prepend(row);
      while (list.children.length > MAX_TURNS) list.lastElementChild.remove();
      updateTurnCount();
    }
    refreshFilterOptions();
    if (state.trace && t.session_id === state.trace.session_id) renderTestPanel();
  }

  function mergeTurns(list) {
    let added = 0;
    for (const t of list) {
      if (t && t.id != null && !isKnown(t)) { remember(t); state.turns.push(t); added += 1; }
    }
    if (!added && state.turns.length) return;
    state.turns.sort((a, b) => a.id - b.id);
    trimTurns();
    renderTurnList();
    refreshFilterOptions();
  }

  function turnRow(t) {
    const err = isError(t);
    const errText = t.error ? t.error.code : t.failed_calls ? `${t.failed_calls} failed call(s)` : 'error';
    return el('li', {
      class: `turn-row${err ? ' has-error' : ''}${t.id === state.selectedId ? ' selected' : ''}`,
      tabindex: 0,
      'aria-current': t.id === state.selectedId ? 'true' : null,
      dataset: { id: String(t.id), trace: t.trace_id || '' },
    },
    el('div', { class: 'tr-line' },
      el('time', { class: 'tr-time', datetime: t.at, title: t.at, text: fmtTime(t.at) }),
      chip(t.channel || '?', 'channel'),
      el('span', { class: 'tr-user', title: `session ${t.session_id || ''}`, text: t.user_id || '' }),
      el('span', { class: 'tr-ms', text: fmtMs(t.duration_ms) }),
      err ? el('span', { class: 'tr-err', title: errText, text: '!' }, el('span', { class: 'sr-only', text: ` ${errText}` })) : null),
    el('div', { class: 'tr-text', title: t.text || '', text: truncate(t.text, 160) }),
    el('div', { class: 'tr-line tr-meta' },
      chip(t.intent || 'no intent', 'intent'),
      el('span', { class: 'arrow', text: '→' }),
      chip(t.route || 'no route', 'route'),
      chip(t.decision || '?', `decision ${t.decision === 'error' ? 'bad' : ''}`)));
  }

  function renderTurnList() {
    const rows = state.turns.slice().reverse().map((t) => {
      const row = turnRow(t);
      row.hidden = !matchesFilters(t);
      return row;
    });
    $('turn-list').replaceChildren(...rows);
    updateTurnCount();
  }

  function filters() {
    return {
      text: $('filter-text').value.trim().toLowerCase(),
      route: $('filter-route').value,
      intent: $('filter-intent').value,
      user: $('filter-user').value.trim().toLowerCase(),
      errors: $('filter-errors').checked,
    };
  }

  function matchesFilters(t, f = filters()) {
    if (f.errors && !isError(t)) return false;
    if (f.route && t.route !== f.route) return false;
    if (f.intent && t.intent !== f.intent) return false;
    if (f.user && !String(t.user_id || '').toLowerCase().includes(f.user)) return false;
    if (f.text) {
      const hay = [t.text, t.reply_text, t.user_id, t.session_id].join('\n').toLowerCase();
      if (!hay.includes(f.text)) return false;
    }
    return true;
  }

  function applyFilters() {
    const f = filters();
    for (const row of $('turn-list').children) {
      const t = state.byId.get(Number(row.dataset.id));
      row.hidden = !t || !matchesFilters(t, f);
    }
    updateTurnCount();
  }

  function updateTurnCount() {
    const rows = [...$('turn-list').children];
    const shown = rows.filter((r) => !r.hidden).length;
    $('turn-count').textContent = shown === rows.length ? `(${rows.length})` : `(${shown} of ${rows.length})`;
    $('turn-empty').hidden = rows.length > 0;
  }

  function refreshFilterOptions() {
    const sorted = (set) => [...set].sort((a, b) => a.localeCompare(b));
    const any = { value: '', text: 'any' };
    if ($('filter-route').options.length !== state.routes.size + 1) setOptions($('filter-route'), sorted(state.routes), any);
    if ($('filter-intent').options.length !== state.intents.size + 1) setOptions($('filter-intent'), sorted(state.intents), any);
    const users = $('filter-user-list');
    if (users.children.length !== state.users.size) {
      users.replaceChildren(...sorted(state.users).map((u) => el('option', { value: u })));
    }
  }

  function onTurnListKey(ev) {
    const row = ev.target.closest('.turn-row');
    if (!row) return;
    if (ev.key === 'Enter' || ev.key === ' ') {
      ev.preventDefault();
      selectTurn(Number(row.dataset.id));
    } else if (ev.key === 'ArrowDown' || ev.key === 'ArrowUp') {
      ev.preventDefault();
      let next = row;
      do {
        next = ev.key === 'ArrowDown' ? next.nextElementSibling : next.previousElementSibling;
      } while (next && next.hidden);
      if (next) next.focus();
    }
  }

  // --- turn view

  async function selectTurn(id, tab) {
    state.selectedId = id;
    for (const row of $('turn-list').children) {
      const on = Number(row.dataset.id) === id;
      row.classList.toggle('selected', on);
      if (on) row.setAttribute('aria-current', 'true');
      else row.removeAttribute('aria-current');
    }
    const summary = state.byId.get(id);
    $('turn-title').textContent = summary ? `Turn #${id} · ${fmtTime(summary.at, true)}` : `Turn #${id}`;
    state.trace = null;
    $('save-test').disabled = true;
    $('turn-detail').hidden = true;
    $('steps-empty').hidden = false;
    $('steps-empty').textContent = 'Loading…';
    if (tab) showTab(tab);
    let trace;
    try {
      trace = await api(`/console/api/turns/${encodeURIComponent(id)}`);
    } catch (e) {
      if (state.selectedId !== id) return;
      $('steps-empty').textContent = e.code === 'not_found'
        ? `Turn #${id} is no longer recorded (it left the ring).`
        : `Could not load turn #${id}: ${e.code || ''} ${e.message}`;
      renderTestPanel();
      return;
    }
    if (state.selectedId !== id) return; // another turn was picked meanwhile
    state.trace = trace;
    renderTurn(trace);
    renderTestPanel();
    $('save-test').disabled = !trace.session_id;
    if (trace.flow && [...$('graph-flow').options].some((o) => o.value === trace.flow)) {
      $('graph-flow').value = trace.flow;
    }
    if (state.tab === 'graph') loadGraph();
  }

  async function openTurnByTrace(traceId, bubble) {
    const find = () => state.turns.find((t) => t.trace_id === traceId);
    let t = find();
    if (!t) { await refreshTurns(); t = find(); }
    if (t) {
      await selectTurn(t.id, 'steps');
      return;
    }
    const meta = bubble.querySelector('.bubble-meta');
    if (meta) meta.textContent = `${meta.textContent.split(' · not recorded')[0]} · not recorded (yet)`;
  }

  function renderTurn(tr) {
    const turnMs = Number(tr.duration_ms) || 0;
    const cls = tr.classification || {};
    const calls = Array.isArray(tr.calls) ? tr.calls : [];
    const blocks = [
      renderSummary(tr, cls),
      el('h3', { text: 'Timeline' }),
      renderTimeline(Array.isArray(tr.steps) ? tr.steps : [], calls, turnMs),
      el('h3', { text: `Service calls (${calls.length})` }),
      calls.length
        ? el('div', { id: 'calls', class: 'calls' }, calls.map(renderCall))
        : el('p', { class: 'muted', text: 'No service was called.' }),
      el('h3', { text: 'Data' }),
      section('Input', tr.input, 'input', true),
      section('Classification', cls, 'classification', false),
      section('Session before', tr.session_before, 'session-before', false),
      section('Session after', tr.session_after, 'session-after', true),
      section('Reply data', tr.reply ? tr.reply.data : null, 'reply-data', true),
    ];
    const detail = $('turn-detail');
    detail.replaceChildren(...blocks);
    detail.hidden = false;
    $('steps-empty').hidden = true;
    $('panel-steps').scrollTop = 0;
  }

  function renderSummary(tr, cls) {
    const rows = [];
    const add = (label, ...value) => rows.push(el('dt', { text: label }), el('dd', {}, ...value));
    add('Text', el('span', { class: 'pre', text: tr.text || '' }));
    add('Reply', tr.reply_text != null
      ? el('span', { class: 'pre reply', text: tr.reply_text })
      : el('span', { class: 'muted', text: 'no reply' }));
    if (tr.error) add('Error', chip(tr.error.code || 'error', 'bad'), ' ', tr.error.message || '');
    const confidence = cls.confidence ?? tr.confidence;
    add('Intent',
      el('strong', { text: tr.intent || cls.intent || '—' }),
      ' · ', chip(cls.source || tr.intent_source || '?', 'source'),
      confidence != null ? ` · ${Number(confidence).toFixed(2)}` : '',
      cls.evidence ? el('div', { class: 'evidence', text: cls.evidence }) : null,
      cls.fallback_reason ? el('div', { class: 'evidence warn', text: `fallback: ${cls.fallback_reason}` }) : null);
    add('Path', 'flow ', el('strong', { text: tr.flow || '—' }), ' → route ', el('strong', { text: tr.route || '—' }), ' · ',
      chip(tr.decision || '?', `decision ${tr.decision === 'error' ? 'bad' : ''}`));
    add('Who', `${tr.channel || '?'} · ${tr.user_id || '?'} · session `, el('code', { text: tr.session_id || '—' }));
    add('Trace id', el('code', { text: tr.trace_id || '—' }));
    const callCount = Array.isArray(tr.calls) ? tr.calls.length : tr.call_count || 0;
    add('Total', `${fmtMs(tr.duration_ms)} · ${callCount} call(s)`,
      (tr.failed_calls || 0) > 0 ? el('span', { class: 'bad-text', text: ` · ${tr.failed_calls} failed` }) : '',
      tr.generation != null ? ` · generation ${tr.generation}` : '');
    return el('dl', { class: 'summary', id: 'turn-summary' }, rows);
  }

  function callsByStep(calls) {
    const map = new Map();
    for (const c of calls) {
      if (!map.has(c.step)) map.set(c.step, []);
      map.get(c.step).push(c);
    }
    return map;
  }

  function renderTimeline(steps, calls, turnMs) {
    const byStep = callsByStep(calls);
    const end = Math.max(turnMs, ...steps.map((s) => (Number(s.started_ms) || 0) + (Number(s.duration_ms) || 0)), 0.001);
    const pct = (ms) => Math.max(0, Math.min(100, (ms / end) * 100));
    const rows = steps.map((s) => {
      const stepCalls = byStep.get(s.index) || [];
      const failed = stepCalls.some((c) => c.error);
      const unfinished = s.duration_ms == null;
      const left = pct(Number(s.started_ms) || 0);
      const width = unfinished ? 100 - left : pct(Number(s.duration_ms) || 0);
      // the duration goes after the bar, inside it when wide, else before it
      const labelAt = left + width < 72 ? 'after' : width > 22 ? 'inside' : 'before';
      const labelStyle = {
        after: { left: `calc(${left + width}% + 4px)` },
        inside: { right: `calc(${100 - left - width}% + 6px)` },
        before: { right: `calc(${100 - left}% + 4px)` },
      }[labelAt];
      const file = s.file ? `${s.file}:${s.line ?? '?'}` : '';
      const classes = ['step', `kind-${s.kind}`];
      if (failed || unfinished) classes.push('failed');
      if (s.skipped) classes.push('skipped');
      return el('div', {
        class: classes.join(' '),
        dataset: { index: String(s.index), kind: s.kind || '', service: stepCalls.map((c) => c.service).join(' ') },
      },
      el('div', { class: 'step-label' },
        el('span', { class: `kind k-${s.kind}`, text: s.kind || '?' }),
        el('span', { class: 'step-id', title: s.id || '', text: s.id || `#${s.index}` }),
        s.skipped ? el('span', { class: 'chip skip-chip', title: 'its `if` was false', text: 'skipped' }) : null,
        el('span', { class: 'loc', title: s.column ? `${file}:${s.column}` : file, text: file }),
        stepCalls.length ? el('div', { class: 'step-calls' }, stepCalls.map((c) => el('span', {
          class: `step-call${c.error ? ' bad' : ''}`,
          text: `→ ${c.service} · ${c.error ? `${c.error.code}${c.status ? ` (${c.status})` : ''}` : c.status ?? '—'}`,
        }))) : null,
        unfinished ? el('div', { class: 'step-note bad-text', text: 'the turn failed in this step' }) : null),
      el('div', { class: 'step-track' },
        el('div', { class: 'bar', style: { left: `${left}%`, width: `${width}%` } }),
        el('span', {
          class: `bar-label ${labelAt}`,
          style: labelStyle,
          text: unfinished ? 'failed' : fmtMs(s.duration_ms),
        })));
    });
    return el('div', { id: 'timeline', class: 'timeline' },
      el('div', { class: 'tl-axis', 'aria-hidden': 'true' },
        el('span', {}), el('span', { class: 'tl-scale' }, el('span', { text: '0' }), el('span', { text: fmtMs(end) }))),
      rows.length ? rows : el('p', { class: 'muted', text: 'No step ran (the turn ended before its flow).' }));
  }

  function renderCall(c) {
    const head = el('div', { class: 'call-head' },
      el('strong', { class: 'call-service', text: c.service }),
      chip(c.status != null ? String(c.status) : 'no status', `status ${c.error ? 'bad' : 'good'}`),
      c.mock ? chip('mock', 'mock') : null,
      el('span', { class: 'muted', text: `step ${c.step} · ${c.attempts ?? 1} attempt${c.attempts === 1 ? '' : 's'} · ${fmtMs(c.duration_ms)}` }));
    return el('div', { class: `call${c.error ? ' failed' : ''}`, dataset: { service: c.service, step: String(c.step) } },
      head,
      c.error ? el('p', { class: 'call-error' }, el('code', { text: c.error.code }), ' ', c.error.message || '') : null,
      el('details', { class: 'call-part call-request', open: true },
        el('summary', { text: 'Request' }), c.request == null ? el('p', { class: 'muted', text: 'none' }) : jsonTree(c.request)),
      el('details', { class: 'call-part call-response', open: true },
        el('summary', { text: 'Response' }), c.response == null ? el('p', { class: 'muted', text: 'none' }) : jsonTree(c.response)));
  }

  function section(title, value, id, open) {
    const empty = value == null || (typeof value === 'object' && Object.keys(value).length === 0);
    return el('details', { class: 'section', id: `data-${id}`, open: open && !empty },
      el('summary', {}, title, empty ? el('span', { class: 'muted', text: value == null ? ' — none' : ' — empty' }) : null),
      empty ? null : jsonTree(value));
  }

  // --- JSON tree

  function jsonTree(value, openDepth = 2) {
    const root = el('div', { class: 'json-root' }, jsonNode(null, value, 0, openDepth));
    const setAll = (open) => root.querySelectorAll('details').forEach((d) => { d.open = open; });
    const bar = typeof value === 'object' && value !== null
      ? el('div', { class: 'json-tools' },
        el('button', { type: 'button', class: 'link tree-expand', text: 'Expand all', onclick: () => setAll(true) }),
        el('button', { type: 'button', class: 'link tree-collapse', text: 'Collapse all', onclick: () => setAll(false) }))
      : null;
    return el('div', { class: 'json-tree' }, bar, root);
  }

  function jsonKey(key) {
    if (key == null) return [];
    return [el('span', { class: typeof key === 'number' ? 'jk idx' : 'jk', text: String(key) }), el('span', { class: 'jp', text: ': ' })];
  }

  function jsonLeaf(value) {
    if (value === null) return el('span', { class: 'jv null', text: 'null' });
    switch (typeof value) {
      case 'string':
        return value === '[REDACTED]'
          ? el('span', { class: 'jv redacted', title: 'redacted by the server', text: value })
          : el('span', { class: 'jv str', text: value });
      case 'number': return el('span', { class: 'jv num', text: String(value) });
      case 'boolean': return el('span', { class: 'jv bool', text: String(value) });
      default: return el('span', { class: 'jv', text: String(value) });
    }
  }

  function jsonNode(key, value, depth, openDepth) {
    const isObj = value !== null && typeof value === 'object';
    const entries = isObj ? (Array.isArray(value) ? value.map((v, i) => [i, v]) : Object.entries(value)) : [];
    if (!isObj || entries.length === 0) {
      const leaf = isObj ? el('span', { class: 'jv empty', text: Array.isArray(value) ? '[]' : '{}' }) : jsonLeaf(value);
      return el('div', { class: 'jn leaf' }, jsonKey(key), leaf);
    }
    const arr = Array.isArray(value);
    const count = arr ? `[${entries.length}]` : `{${entries.length}}`;
    const shown = entries.slice(0, 500);
    return el('details', { class: 'jn', open: depth < openDepth },
      el('summary', {}, jsonKey(key), el('span', { class: 'jcount', text: count })),
      el('div', { class: 'jchildren' },
        shown.map(([k, v]) => jsonNode(k, v, depth + 1, openDepth)),
        entries.length > shown.length ? el('div', { class: 'muted', text: `… ${entries.length - shown.length} more` }) : null));
  }

  // --- graph

  async function loadGraph() {
    const flow = $('graph-flow').value;
    const gen = state.status ? state.status.generation : '';
    const key = `${flow}@${gen}`;
    const box = $('graph');
    if (state.graphKey !== key) {
      box.replaceChildren(el('p', { class: 'muted', text: 'Drawing…' }));
      state.graphKey = key;
      try {
        const svg = await api(`/console/api/graph${flow ? `?flow=${encodeURIComponent(flow)}` : ''}`, { accept: 'image/svg+xml' });
        if (state.graphKey !== key) return;
        box.innerHTML = svg; // drawn by the server: trusted markup
      } catch (e) {
        if (state.graphKey !== key) return;
        state.graphKey = null;
        box.replaceChildren(el('p', { class: 'error-text', text: `Could not draw the graph: ${e.code || ''} ${e.message}` }));
        return;
      }
    }
    highlightGraph();
  }

  function highlightGraph() {
    const box = $('graph');
    const svg = box.querySelector('svg');
    for (const node of box.querySelectorAll('.visited, .failed, .skipped')) node.classList.remove('visited', 'failed', 'skipped');
    const tr = state.trace;
    const flow = $('graph-flow').value;
    const note = $('graph-note');
    if (!svg || !tr) { note.textContent = tr ? '' : 'Select a turn to highlight its path.'; return; }
    if (flow && flow !== tr.flow) { note.textContent = `Turn #${tr.id} ran flow ${tr.flow || 'none'}.`; return; }
    const byStep = callsByStep(Array.isArray(tr.calls) ? tr.calls : []);
    const mark = (id, ...cls) => {
      const node = svg.querySelector(`#${CSS.escape(id)}`);
      if (node) node.classList.add(...cls);
      return node;
    };
    let found = 0;
    let failed = 0;
    for (const s of tr.steps || []) {
      const bad = (byStep.get(s.index) || []).some((c) => c.error) || s.duration_ms == null;
      const cls = ['visited'];
      if (bad) { cls.push('failed'); failed += 1; }
      if (s.skipped) cls.push('skipped');
      if (mark(`step-${s.index}`, ...cls)) found += 1;
    }
    if (tr.intent) mark(`intent-${tr.intent}`, 'visited');
    if (tr.flow) mark(`flow-${tr.flow}`, 'visited');
    note.textContent = `Turn #${tr.id}: ${found} step(s) highlighted${failed ? `, ${failed} failed` : ''}.`;
  }

  // --- tabs

  const TABS = ['steps', 'graph', 'test'];

  function showTab(name) {
    state.tab = name;
    for (const t of TABS) {
      const on = t === name;
      const tab = $(`tab-${t}`);
      tab.setAttribute('aria-selected', on ? 'true' : 'false');
      tab.tabIndex = on ? 0 : -1;
      $(`panel-${t}`).hidden = !on;
    }
    if (name === 'graph') loadGraph();
  }

  function onTabKey(ev) {
    const i = TABS.indexOf(state.tab);
    let next = null;
    if (ev.key === 'ArrowRight') next = TABS[(i + 1) % TABS.length];
    else if (ev.key === 'ArrowLeft') next = TABS[(i + TABS.length - 1) % TABS.length];
    if (!next) return;
    ev.preventDefault();
    showTab(next);
    $(`tab-${next}`).focus();
  }

  // --- save as test

  function sessionTurns(sessionId) {
    return state.turns.filter((t) => t.session_id === sessionId);
  }

  function renderTestPanel() {
    const tr = state.trace;
    const form = $('test-form');
    $('test-empty').hidden = !!tr;
    form.hidden = !tr;
    if (!tr) return;
    const turns = sessionTurns(tr.session_id);
    $('test-session').textContent = tr.session_id || '—';
    $('test-turns').textContent = turns.length
      ? `${turns.length} turn(s) in the list: ${turns.map((t) => `“${truncate(t.text, 40)}”`).join(' → ')}`
      : 'no turn of it in the list';
    if (state.testNameFor !== tr.session_id) {
      state.testNameFor = tr.session_id;
      $('test-name').value = truncate((turns[0] || tr).text || 'console turn', 60);
      $('test-result').hidden = true;
    }
  }

  function openSaveTest() {
    if (!state.trace) return;
    showTab('test');
    renderTestPanel();
    $('test-name').focus();
    $('test-name').select();
  }

  async function saveTest(ev) {
    ev.preventDefault();
    const tr = state.trace;
    const name = $('test-name').value.trim();
    if (!tr || !name) return;
    const out = $('test-result');
    const button = $('test-save-confirm');
    button.disabled = true;
    out.hidden = false;
    out.className = 'test-result';
    out.replaceChildren(el('p', { class: 'muted', text: 'Saving…' }));
    try {
      const res = await api('/console/api/tests', { method: 'POST', body: { session_id: tr.session_id, name } });
      const yaml = String(res.yaml || '');
      if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
      state.downloadUrl = URL.createObjectURL(new Blob([yaml], { type: 'application/yaml' }));
      const file = res.path ? res.path.split('/').pop() : `console-${name.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '') || 'test'}.yaml`;
      out.replaceChildren(
        el('p', {},
          res.path ? 'Written to ' : 'Not written (the server only returned the text). ',
          res.path ? el('code', { id: 'test-path', text: res.path }) : null, ' ',
          el('a', { id: 'test-download', href: state.downloadUrl, download: file, text: `Download ${file}` })),
        el('pre', { id: 'test-yaml', class: 'yaml', text: yaml }));
    } catch (e) {
      out.className = 'test-result error';
      out.replaceChildren(el('p', {}, el('code', { text: e.code || 'error' }), ' ', e.message));
    } finally {
      button.disabled = false;
    }
  }

  // --- chat

  function followSession() {
    if (!state.sessionAuto) return;
    $('chat-session').value = `${$('chat-user').value.trim() || 'console-user'}:${$('chat-channel').value || 'web'}`;
  }

  function newSession() {
    const base = `${$('chat-user').value.trim() || 'console-user'}:${$('chat-channel').value || 'web'}`;
    state.sessionAuto = false;
    $('chat-session').value = `${base}:${Date.now().toString(36)}`;
    $('chat-log').append(el('li', { class: 'divider', text: `new session ${$('chat-session').value}` }));
    $('chat-text').focus();
  }

  function chatBubble(kind, ...content) {
    const li = el('li', { class: `bubble ${kind}` }, content);
    const log = $('chat-log');
    log.append(li);
    log.scrollTop = log.scrollHeight;
    return li;
  }

  function botBubble(res) {
    const conf = res.intent_confidence != null ? ` (${Number(res.intent_confidence).toFixed(2)})` : '';
    const bubble = chatBubble('bot',
      el('div', { class: 'bubble-text', text: res.reply_text ?? '(no reply text)' }),
      el('div', { class: 'bubble-meta', text: `route ${res.route || '—'} · intent ${res.intent || '—'}${conf}${res.decision && res.decision !== 'reply' ? ` · ${res.decision}` : ''}` }));
    if (res.trace_id) {
      bubble.dataset.trace = res.trace_id;
      bubble.tabIndex = 0;
      bubble.setAttribute('role', 'button');
      bubble.title = 'Open this turn';
      const open = () => openTurnByTrace(res.trace_id, bubble);
      bubble.addEventListener('click', open);
      bubble.addEventListener('keydown', (ev) => {
        if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); open(); }
      });
    }
    return bubble;
  }

  async function sendChat(ev) {
    ev.preventDefault();
    const input = $('chat-text');
    const text = input.value.trim();
    if (!text) return;
    const body = {
      text,
      user_id: $('chat-user').value.trim() || 'console-user',
      channel: $('chat-channel').value || 'web',
      session_id: $('chat-session').value.trim() || undefined,
    };
    chatBubble('user', el('div', { class: 'bubble-text', text }));
    input.value = '';
    const pending = chatBubble('bot pending', el('div', { class: 'bubble-text', text: '…' }));
    const send = $('chat-send');
    send.disabled = true;
    try {
      const res = await request('/orchestrate', { method: 'POST', body, keyOn403: false });
      pending.remove();
      if (res.ok) {
        botBubble(await res.json());
      } else {
        const p = await readProblem(res);
        chatBubble('error',
          el('div', { class: 'bubble-text' }, el('code', { text: p.code || `http_${res.status}` }), ' ', p.detail || p.title || ''),
          el('div', { class: 'bubble-meta', text: `HTTP ${res.status}` }));
      }
    } catch (e) {
      pending.remove();
      chatBubble('error', el('div', { class: 'bubble-text' }, el('code', { text: 'network' }), ' ', String(e.message || e)));
    } finally {
      send.disabled = false;
      input.focus();
    }
  }

  // --- init

  function init() {
    storeKey(storedKey()); // shows "Forget key" when one is kept
    $('key-forget').addEventListener('click', () => { storeKey(''); location.reload(); });

    followSession();
    $('chat-user').addEventListener('input', followSession);
    $('chat-channel').addEventListener('change', followSession);
    $('chat-session').addEventListener('input', () => {
      state.sessionAuto = $('chat-session').value.trim() === '';
    });
    $('chat-new-session').addEventListener('click', newSession);
    $('chat-form').addEventListener('submit', sendChat);

    for (const id of ['filter-text', 'filter-user']) $(id).addEventListener('input', applyFilters);
    for (const id of ['filter-route', 'filter-intent', 'filter-errors']) $(id).addEventListener('change', applyFilters);

    const list = $('turn-list');
    list.addEventListener('click', (ev) => {
      const row = ev.target.closest('.turn-row');
      if (row) selectTurn(Number(row.dataset.id));
    });
    list.addEventListener('keydown', onTurnListKey);

    for (const t of TABS) $(`tab-${t}`).addEventListener('click', () => showTab(t));
    document.querySelector('.tabs').addEventListener('keydown', onTabKey);

    $('graph-flow').addEventListener('change', loadGraph);
    $('graph-fit').addEventListener('change', () => $('graph').classList.toggle('fit', $('graph-fit').checked));
    $('graph').classList.toggle('fit', $('graph-fit').checked);

    $('save-test').addEventListener('click', openSaveTest);
    $('test-form').addEventListener('submit', saveTest);

    setLive(false, 'connecting');
    updateTurnCount();
    refreshAll();
    eventsLoop();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();

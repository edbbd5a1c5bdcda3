// Fleet Manager's web console. It calls FM's REST API with the session
// cookie and the session's CSRF token, and nothing else: what it shows and
// what it may change are what the API answers to the signed-in key.
//
// Everything it shows is written as text (textContent through h()), never
// as markup: labels, descriptions, tags and what agents report are data.
'use strict';

const API = '/api/public/tenants/main/';
let session = null; // {who, keyId, role, csrf, expires}
const ROLES = { viewer: 1, operator: 2, admin: 3 };
const may = (role) => session && ROLES[session.role] >= ROLES[role];
const STATES = ['created', 'provisioning', 'starting', 'running', 'stopping', 'stopped',
  'deprovisioning', 'deprovisioned', 'deleting', 'failed'];
const NODE_TYPES = ['design', 'automation', 'deployer', 'govern', 'event'];
const SETUP_ACTION_TYPES = ['ADD_AUTHORIZED_KEY', 'ADD_SSH_KEY', 'ADD_ENV_VARIABLES', 'ADD_PROPERTIES', 'SETUP_PROXY',
  'SETUP_ADVANCED_SECURITY', 'ADD_CA_TO_TRUSTSTORE', 'INSTALL_JDBC_DRIVER', 'UPDATE_DSS_PORT', 'INSTALL_SYSTEM_PACKAGES',
  'RUN_ANSIBLE_TASKS', 'INSTALL_DEPRECATED_PYTHON', 'SETUP_K8S_AND_SPARK', 'SETUP_NONE_K8S_AND_SPARK',
  'INSTALL_DSS_PLUGINS_FROM_STORE', 'SETUP_RUNTIME_DATABASE', 'SETUP_MUS_AUTOCREATE', 'SETUP_UI_CUSTOMIZATION',
  'SETUP_MEMORY_SETTINGS', 'SETUP_GRAPHICS_EXPORT', 'SETUP_INSTANCE_NAME', 'SETUP_SECURE_COOKIES',
  'INSTALL_CODE_ENV_WITH_PRESET'];

// ---- DOM ----

// h makes an element. props: class, text, on<event> (a function), and any
// attribute; value, checked, disabled, hidden and selected are set as
// properties. Children are nodes or strings (as text).
function h(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'text') e.textContent = String(v);
    else if (k === 'class') e.className = v;
    else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
    else if (['value', 'checked', 'disabled', 'hidden', 'selected'].includes(k)) e[k] = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === undefined || kid === null || kid === false) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}
const $ = (sel) => document.querySelector(sel);
const fill = (node, ...kids) => { node.replaceChildren(); for (const k of kids.flat(Infinity)) if (k) node.append(k instanceof Node ? k : String(k)); return node; };
let uid = 0;
const nextID = (p) => `${p}-${++uid}`;

// field is a labelled control.
function field(labelText, control) {
  if (!control.id) control.id = nextID('f');
  return [h('label', { for: control.id, text: labelText }), control];
}
function select(name, options, value, props) {
  return h('select', { name, ...props }, options.map((o) => {
    const [v, t] = Array.isArray(o) ? o : [o, o];
    return h('option', { value: v, text: t, selected: v === value });
  }));
}
function input(name, value, props) {
  return h('input', { type: 'text', name, value: value ?? '', ...props });
}

// safeURL keeps http(s) addresses only: an instance's URL comes from its
// machine, and a javascript: link must never be made of it.
function safeURL(u) {
  return typeof u === 'string' && /^https?:\/\/[^\s]+$/i.test(u) ? u : null;
}
function when(t) {
  if (!t) return '';
  const d = new Date(t);
  return isNaN(d) ? String(t) : d.toLocaleString();
}
function stateBadge(state) {
  const known = STATES.includes(state) ? state : 'unknown';
  return h('span', { class: `state state-${known}`, text: state || 'unknown' });
}
function flash(msg, isError) {
  const f = $('#flash');
  fill(f, isError ? h('span', { class: 'bad', text: msg }) : msg);
}
function errorBox(err) {
  return h('div', { class: 'error', role: 'alert', text: err.message || String(err) });
}

// redraw draws node again with draw(), keeping what the person typed,
// ticked or chose in its controls (by name) and where the focus was: a
// live reload must not undo a half-filled form.
function redraw(node, draw) {
  const kept = {};
  for (const c of node.querySelectorAll('input[name], select[name], textarea[name]')) {
    kept[c.name] = c.type === 'checkbox' ? c.checked : c.value;
  }
  const focused = node.contains(document.activeElement) ? document.activeElement : null;
  const focusKey = focused && (focused.name || focused.textContent);
  draw();
  for (const c of node.querySelectorAll('input[name], select[name], textarea[name]')) {
    if (!(c.name in kept)) continue;
    if (c.type === 'checkbox') c.checked = kept[c.name]; else c.value = kept[c.name];
  }
  if (focusKey) {
    const again = [...node.querySelectorAll('input, select, textarea, button, a')].find((c) => (c.name || c.textContent) === focusKey);
    if (again) again.focus({ preventScroll: true });
  }
}

// filterForm is a page's filters: on submit, route with each control's
// value under its name, the empty ones left out.
function filterForm(title, route, fields, ...extra) {
  const form = h('form', { class: 'inline', role: 'search', 'aria-label': title },
    fields.map(([text, c]) => h('div', {}, field(text, c))), h('button', { type: 'submit', text: 'Filter' }), extra);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [, c] of fields) if (c.value) q.set(c.name, c.value);
    location.hash = `${route}?${q}`;
  });
  return form;
}

// ---- API ----

class APIError extends Error {
  constructor(status, body) {
    const detail = body && (body.detailedMessage || body.message);
    super(body && body.message && detail && body.message !== detail ? `${body.message}: ${detail}` : (detail || `HTTP ${status}`));
    this.status = status;
    this.body = body;
  }
}

async function call(method, path, body, raw) {
  const mine = session;
  const headers = { 'Accept': 'application/json', 'X-FM-CSRF': session ? session.csrf : '' };
  const opts = { method, headers, credentials: 'same-origin', cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path.startsWith('/') ? path : API + path, opts);
  if (raw && r.ok) return r;
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { message: text }; }
  if (r.status === 401 && path !== '/console/session') {
    // Only the session the call was made with has ended: a call still
    // under way at a sign-out must not sign the next person out.
    if (mine && session === mine) signedOut('Your session ended: sign in again.');
    throw new APIError(r.status, data);
  }
  if (!r.ok) throw new APIError(r.status, data);
  return data;
}
const get = (p) => call('GET', p);
const enc = encodeURIComponent;

// ---- live updates ----

// One event stream per page (server-sent events, fed by FM's bus): a
// change names the instance (or kind of object) that changed, and the page
// reads again what it shows of it. A stream says hello when it opens, and
// again when the browser reconnects it: the page then reads everything
// again (changes may have been missed). A stream the server refused (signed out elsewhere, too
// many streams) is asked for again later, after a look at the session.
const live = {
  source: null, logsFor: null, handler: null, hellos: 0, retry: 1000,
  open(logsFor) {
    if (this.source && this.source.readyState !== EventSource.CLOSED && this.logsFor === logsFor) return;
    this.close();
    this.logsFor = logsFor;
    this.hellos = 0;
    const src = new EventSource('/console/events' + (logsFor ? '?logs=' + enc(logsFor) : ''));
    this.source = src;
    const tell = (ev) => { if (this.source === src && this.handler) this.handler(ev); };
    src.addEventListener('change', (e) => tell(JSON.parse(e.data)));
    src.addEventListener('resync', () => tell({ kind: 'resync' }));
    src.addEventListener('ended', () => { this.close(); signedOut('Your session ended: sign in again.'); });
    // Every hello, the first too: the page read what it shows before its
    // stream opened, and may have missed a change in between.
    src.addEventListener('hello', () => {
      document.body.dataset.live = 'on';
      this.retry = 1000;
      this.hellos++;
      tell({ kind: 'resync' });
    });
    src.addEventListener('error', () => {
      document.body.dataset.live = 'off';
      if (src.readyState !== EventSource.CLOSED || this.source !== src) return; // the browser reconnects by itself
      this.retry = Math.min(this.retry * 2, 30000);
      setTimeout(async () => {
        if (this.source !== src) return;
        try {
          await call('GET', '/console/session');
        } catch (e) {
          if (e.status === 401) { signedOut('Your session ended: sign in again.'); return; }
        }
        if (this.source !== src) return;
        this.source = null;
        this.open(this.logsFor);
      }, this.retry);
    });
  },
  close() {
    if (this.source) this.source.close();
    this.source = null;
    document.body.dataset.live = 'off';
  },
};

// generation counts the pages shown: a page still loading when another
// is asked for must neither draw nor follow anything.
let generation = 0;

// follow makes the page of generation gen follow the stream (and an
// instance's logs), if it is still the page shown.
function follow(gen, logsFor, handler) {
  if (gen !== generation) return;
  live.open(logsFor);
  live.handler = handler;
}

// throttled runs fn (which returns a promise) at most once per wait,
// within wait of the first call, while the page of generation gen is
// shown; and never twice at once. A call while fn runs runs it once more
// after: two reads in flight could end in either order, and the earlier
// read, drawn last, would show what was true before the last change (an
// operation left "running" for good).
function throttled(gen, fn, wait) {
  let timer = null, running = false, again = false;
  const schedule = () => {
    if (timer) return;
    timer = setTimeout(async () => {
      timer = null;
      if (gen !== generation) return;
      running = true;
      try {
        await fn();
      } finally {
        running = false;
        if (again) { again = false; schedule(); }
      }
    }, wait);
  };
  return () => {
    if (running) again = true; else schedule();
  };
}

// ---- confirmation ----

function confirmAction(title, lines, okLabel) {
  const d = $('#confirm');
  fill($('#confirm-title'), title);
  fill($('#confirm-body'), lines.filter(Boolean).map((l) => (l instanceof Node ? l : h('p', { text: l }))));
  $('#confirm-ok').textContent = okLabel || 'Confirm';
  return new Promise((resolve) => {
    d.addEventListener('close', () => resolve(d.returnValue === 'ok'), { once: true });
    d.returnValue = '';
    d.showModal();
    $('#confirm-cancel').focus();
  });
}

// act runs a change after its confirmation, and says what came of it.
async function act(button, title, lines, okLabel, fn) {
  if (!(await confirmAction(title, lines, okLabel))) return null;
  if (button) button.disabled = true;
  try {
    const out = await fn();
    flash(out && out.jobId ? `${title}: started (operation ${out.jobId}).` : `${title}: done.`);
    return out;
  } catch (e) {
    flash(`${title}: ${e.message}`, true);
    return null;
  } finally {
    if (button) button.disabled = false;
  }
}

// ---- sign-in ----

function signedOut(msg) {
  session = null;
  generation++;
  live.close();
  $('#nav').hidden = true;
  $('#who').hidden = true;
  renderSignIn(msg);
}

function renderSignIn(msg) {
  const errs = h('div', { id: 'signin-error', role: 'alert' });
  if (msg) errs.append(h('p', { class: 'muted', text: msg }));
  const id = input('keyId', '', { autocomplete: 'username', required: true, spellcheck: 'false' });
  const secret = h('input', { type: 'password', name: 'secret', autocomplete: 'current-password', required: true });
  const form = h('form', { class: 'grid', 'aria-labelledby': 'signin-title' },
    field('API key id', id), field('Secret', secret),
    h('span'), h('button', { class: 'primary', type: 'submit', text: 'Sign in' }));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      session = await call('POST', '/console/session', { keyId: id.value, secret: secret.value });
      secret.value = '';
      started();
    } catch (e) {
      fill(errs, errorBox(e));
    }
  });
  const sso = h('div');
  fill($('#main'), h('h1', { id: 'signin-title', text: 'Sign in to Fleet Manager' }), sso,
    h('p', { class: 'muted', text: 'Use an API key: its id and secret (fm apikey create makes one).' }), errs, form);
  id.focus();
  // Single sign-on, when FM's SSO settings turn it on.
  fetch('/console/sso', { credentials: 'same-origin' }).then((r) => r.json()).then((s) => {
    if (s.enabled) fill(sso, h('p', {}, h('a', { href: '/console/sso/start', class: 'primary', id: 'sso', text: 'Sign in with single sign-on' })));
  }).catch(() => {});
}

function started() {
  const nav = $('#nav');
  const links = [['#/', 'Fleet'], ['#/networks', 'Networks'], ['#/templates', 'Templates'], ['#/images', 'Images']];
  if (may('admin')) links.push(['#/keys', 'API keys'], ['#/audit', 'Audit trail']);
  fill(nav, links.map(([href, text]) => h('a', { href, text })));
  nav.hidden = false;
  const out = h('button', { type: 'button', text: 'Sign out' });
  out.addEventListener('click', async () => {
    if (!session) return; // a second click while the first one is under way
    // The page stops at once (nothing of it goes on while the session
    // ends), then, once FM has ended the session, loads afresh: nothing the
    // person saw stays in the tab's memory for the next one.
    const mine = session;
    session = null;
    generation++;
    live.close();
    let ended = false;
    try {
      const r = await fetch('/console/session', { method: 'DELETE', headers: { 'X-FM-CSRF': mine.csrf }, credentials: 'same-origin', cache: 'no-store' });
      ended = r.ok || r.status === 401; // 401: it had ended already
    } catch (e) { /* FM out of reach */ }
    if (ended) {
      location.replace('/?signed-out');
      return;
    }
    // Still signed in: the page comes back, and says so.
    session = mine;
    started();
    flash('Sign-out failed: you are still signed in. Try again.', true);
  });
  fill($('#who'), h('span', { text: `${session.who} (${session.role})` }), out);
  $('#who').hidden = false;
  render();
}

// ---- routing ----

// routes are the pages (defined in fleet.js, instance.js and objects.js,
// which load after this file).
const routes = () => [
  [/^\/$/, dashboard],
  [/^\/instances\/([^/]+)$/, instancePage],
  [/^\/networks$/, networksPage],
  [/^\/templates$/, templatesPage],
  [/^\/templates\/([^/]+)$/, templatePage],
  [/^\/images$/, imagesPage],
  [/^\/keys$/, keysPage],
  [/^\/audit$/, auditPage],
];

function hashRoute() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, query] = raw.split('?');
  return { path, query: new URLSearchParams(query || '') };
}

async function render() {
  if (!session) return;
  const { path, query } = hashRoute();
  for (const a of document.querySelectorAll('#nav a')) {
    const target = a.getAttribute('href').slice(1);
    if ((target === '/' && (path === '/' || path.startsWith('/instances'))) || (target !== '/' && path.startsWith(target))) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  live.handler = null;
  const gen = ++generation;
  const main = $('#main');
  delete main.dataset.route;
  for (const [re, page] of routes()) {
    const m = path.match(re);
    if (m) {
      fill(main, h('p', { text: 'Loading…' }));
      try {
        await page(main, query, ...m.slice(1).map(decodeURIComponent));
      } catch (e) {
        if (gen === generation && e.status !== 401) fill(main, h('h1', { text: 'Something went wrong' }), errorBox(e));
      }
      if (gen === generation) main.dataset.route = location.hash; // drawn (the browser tests wait for it)
      return;
    }
  }
  fill(main, h('h1', { text: 'Not found' }), h('p', {}, 'No page here. ', h('a', { href: '#/', text: 'Back to the fleet' })));
}

// ---- start ----

const SSO_ERRORS = {
  off: 'Single sign-on is not enabled on this Fleet Manager: sign in with an API key.',
  unreachable: 'The identity provider could not be reached; try again shortly.',
  stale: 'This sign-in was not started from this browser, or took too long: sign in again.',
  refused: "The identity provider's answer was refused (FM's log says why): sign in again.",
  'no-role': 'You are signed in at the identity provider, but Fleet Manager gives you no role, or your groups may not sign in: ask an administrator.',
  denied: 'The identity provider did not sign you in.',
  unavailable: 'Fleet Manager could not start the session; try again shortly.',
};

window.addEventListener('hashchange', () => { render(); $('#main').focus({ preventScroll: true }); });
// The skip link moves the focus to the page, without changing the route.
document.addEventListener('click', (ev) => {
  if (ev.target.closest && ev.target.closest('a.skip')) { ev.preventDefault(); $('#main').focus(); }
});
document.addEventListener('DOMContentLoaded', async () => {
  // An SSO sign-in that failed comes back with a code, worded here (a
  // link to FM cannot make this page say anything else).
  let msg;
  if (location.search === '?signed-out') {
    msg = 'Signed out.';
    history.replaceState(null, '', '/');
  }
  if (location.hash.startsWith('#sso-error=')) {
    msg = SSO_ERRORS[location.hash.slice('#sso-error='.length)] || 'The single sign-on did not complete: sign in again.';
    history.replaceState(null, '', '/');
  }
  try {
    session = await call('GET', '/console/session');
    started();
  } catch (e) {
    renderSignIn(msg);
  }
});


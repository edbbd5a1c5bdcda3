// The fleet dashboard and the new instance form (console/assets/core.js has
// the helpers every page uses).
'use strict';

// ---- fleet dashboard ----

function countList(title, counts, filterKey) {
  const entries = Object.entries(counts || {}).sort((a, b) => b[1] - a[1]);
  return h('section', { class: 'card', 'aria-label': title }, h('h2', { text: title }),
    entries.length ? h('ul', {}, entries.map(([k, n]) => h('li', {},
      filterKey ? h('a', { href: `#/?${filterKey}=${enc(k)}`, text: k || '(none)' }) : (k || '(none)'), `: ${n}`))) : h('p', { class: 'muted', text: 'none' }));
}

async function dashboard(main, query) {
  const filters = { label: query.get('label') || '', state: query.get('state') || '', tag: query.get('tag') || '' };
  const after = query.get('after') || '';
  const label = input('label', filters.label, { type: 'search', placeholder: 'part of a label' });
  const state = select('state', [['', 'any state'], ...STATES], filters.state);
  const tag = input('tag', filters.tag, { placeholder: 'tag, or key=value' });
  const form = filterForm('Filter the fleet', '#/', [['Label', label], ['State', state], ['Tag', tag]], h('a', { href: '#/', text: 'Clear' }));
  const summary = h('div', { id: 'summary' });
  const ops = h('div', { id: 'ops' });
  const rows = h('div', { id: 'rows' });
  fill(main, h('h1', { text: 'Fleet' }), may('operator') ? h('p', {}, h('a', { href: '#/instances/new', text: 'Create an instance' })) : null,
    form, summary, ops, rows);

  const base = new URLSearchParams();
  for (const [k, v] of Object.entries(filters)) if (v) base.set(k, v);
  async function load() {
    const q = new URLSearchParams(base);
    q.set('limit', '50');
    if (after) q.set('after', after);
    const [fleet, running, failed] = await Promise.all([get('fleet?' + q),
      get('futures?state=running&limit=20'), get('futures?state=failed&limit=10')]);
    const s = fleet.summary;
    fill(summary, h('div', { class: 'cards' },
      h('section', { class: 'card', 'aria-label': 'Instances' }, h('h2', { text: 'Instances' }), h('div', { class: 'big', text: s.instances })),
      countList('By state', s.byState, 'state'), countList('By DSS version', s.byDSSVersion), countList('By node type', s.byNodeType),
      h('section', { class: 'card', 'aria-label': 'Health' }, h('h2', { text: 'Health' }), h('ul', {},
        h('li', { class: s.agentsNotResponding ? 'bad' : '', text: `Agents not responding: ${s.agentsNotResponding}` }),
        h('li', { class: s.dssDown ? 'bad' : '', text: `DSS down: ${s.dssDown}` }),
        h('li', { class: s.volumesAbove80Percent ? 'warn' : '', text: `Data volumes over 80% full: ${s.volumesAbove80Percent}` }),
        h('li', { class: s.failedInstances ? 'bad' : '', text: `Failed instances: ${s.failedInstances}` }),
        h('li', { text: `Operations running: ${s.operationsRunning}` }))),
      h('section', { class: 'card', 'aria-label': 'Snapshots' }, h('h2', { text: 'Snapshots' }), h('ul', {},
        h('li', { class: s.snapshotsOverdue ? 'warn' : '', text: `Automated snapshot overdue: ${s.snapshotsOverdue || 0}` }),
        h('li', { class: s.snapshotsFailed ? 'bad' : '', text: `Last snapshot failed: ${s.snapshotsFailed || 0}` }),
        h('li', { text: `No snapshot yet: ${s.snapshotsNeverTaken || 0}` })))));
    fill(ops, h('h2', { text: 'Operations' }), opsTable('Running', running), opsTable('Failed lately', failed));
    const table = h('table', { 'aria-label': 'Instances' }, h('thead', {}, h('tr', {},
      ['Label', 'State', 'DSS', 'Version', 'Agent', 'Data volume', 'Operation', 'URL'].map((t) => h('th', { scope: 'col', text: t })))),
    h('tbody', {}, (fleet.instances || []).map((r) => {
      const url = safeURL(r.publicURL);
      return h('tr', {},
        h('td', {}, h('a', { href: '#/instances/' + enc(r.id), text: r.label || r.id })),
        h('td', {}, stateBadge(r.state)), h('td', { text: r.dssState || '' }), h('td', { text: r.dssVersion || '' }),
        h('td', { class: r.lastSeen && !r.agentResponding ? 'bad' : '', text: !r.lastSeen ? 'not heard from' : r.agentResponding ? 'responding' : 'not responding' }),
        h('td', { class: r.volumeUsedRatio > 0.8 ? 'warn' : '', text: r.volumeUsedRatio != null ? `${Math.round(r.volumeUsedRatio * 100)}% used` : '' }),
        h('td', { text: r.operation ? `${r.operation.kind} (${r.operation.state})` : '' }),
        h('td', {}, url ? h('a', { href: url, target: '_blank', rel: 'noopener noreferrer', text: 'open DSS' }) : ''));
    })));
    const list = fleet.instances || [];
    const nav = h('p', { class: 'actions' });
    if (after) nav.append(h('a', { href: '#/?' + base.toString(), text: 'First page' }));
    if (list.length === 50) {
      const q = new URLSearchParams(base);
      q.set('after', list[list.length - 1].id);
      nav.append(h('a', { href: '#/?' + q.toString(), text: 'Next page' }));
    }
    fill(rows, h('h2', { text: `Instances (${s.instances} match)` }), list.length ? table : h('p', { class: 'muted', text: 'No instance matches.' }), nav);
    main.dataset.loaded = String(Date.now());
  }
  const gen = generation;
  await load();
  // Every open dashboard counts the whole fleet again on a change (about
  // 50 ms of the server at 10,000 instances): at most once in 2 s.
  const reload = throttled(gen, () => load().catch((e) => flash(e.message, true)), 2000);
  follow(gen, null, (ev) => {
    if (ev.kind === 'instance' || ev.kind === 'resync' || (ev.kind === 'fleet' && ev.id === 'alerts')) reload();
  });
}

function opsTable(caption, ops) {
  if (!ops || !ops.length) return h('p', { class: 'muted', text: `${caption}: none.` });
  return h('table', {}, h('caption', { text: caption }), h('thead', {}, h('tr', {},
    ['Operation', 'On', 'State', 'Started', 'By', 'Error'].map((t) => h('th', { scope: 'col', text: t })))),
  h('tbody', {}, ops.map((o) => h('tr', {},
    h('td', { text: o.kind }),
    h('td', {}, o.targetKind === 'instance' ? h('a', { href: '#/instances/' + enc(o.targetId), text: o.targetId }) : `${o.targetKind} ${o.targetId}`),
    h('td', { text: o.state }), h('td', { text: when(o.startedAt) }), h('td', { text: o.startedBy || '' }),
    h('td', { class: 'bad', text: o.error ? o.error.detailedMessage || o.error.message : '' })))));
}

// ---- instance creation ----

async function newInstancePage(main) {
  const gen = generation;
  const [nets, tpls, imgs] = await Promise.all([get('virtual-networks'), get('instance-settings-templates'), get('images')]);
  if (gen !== generation) return;
  const errs = h('div', { role: 'alert' });
  const f = {
    label: input('label', '', { required: true }),
    description: input('description', ''),
    virtualNetworkId: select('virtualNetworkId', nets.map((n) => [n.id, n.label])),
    instanceSettingsTemplateId: select('instanceSettingsTemplateId', tpls.map((t) => [t.id, t.label])),
    imageId: select('imageId', imgs.map((i) => [i.id, imageName(i)])),
    dssNodeType: select('dssNodeType', NODE_TYPES, 'design'),
    cloudInstanceType: input('cloudInstanceType', ''),
    dataVolumeSizeGB: h('input', { type: 'number', name: 'dataVolumeSizeGB', min: 1 }),
    fmTags: input('fmTags', '', { placeholder: 'comma-separated' }),
  };
  const form = h('form', { class: 'grid', 'aria-label': 'New instance' },
    field('Label', f.label), field('Description', f.description), field('Virtual network', f.virtualNetworkId),
    field('Template', f.instanceSettingsTemplateId), field('Image', f.imageId), field('Node type', f.dssNodeType),
    field('Cloud instance type', f.cloudInstanceType), field('Data volume size (GB)', f.dataVolumeSizeGB),
    field('FM tags', f.fmTags), h('span'), h('button', { class: 'primary', type: 'submit', text: 'Create' }));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = {};
    for (const [k, c] of Object.entries(f)) if (c.value !== '') body[k] = c.value;
    if (body.dataVolumeSizeGB) body.dataVolumeSizeGB = Number(body.dataVolumeSizeGB);
    if (body.fmTags) body.fmTags = body.fmTags.split(',').map((t) => t.trim()).filter(Boolean);
    try {
      const inst = await call('POST', 'instances', body);
      flash(`Instance ${inst.label} created: provision it to make its machine.`);
      location.hash = '#/instances/' + enc(inst.id);
    } catch (e) { fill(errs, errorBox(e)); }
  });
  fill(main, h('h1', { text: 'New instance' }), errs, form);
}


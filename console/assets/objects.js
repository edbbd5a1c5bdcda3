// Networks, images, templates (the setup actions editor), API keys and the
// audit trail.
'use strict';

// ---- networks, templates, images ----

// objectList renders a list of objects with a delete button each (admin).
function objectList(caption, rows, columns, path, linkOf) {
  if (!rows.length) return h('p', { class: 'muted', text: `No ${caption.toLowerCase()}.` });
  return h('table', { 'aria-label': caption }, h('thead', {}, h('tr', {},
    columns.map(([t]) => h('th', { scope: 'col', text: t })), may('admin') ? h('th', { scope: 'col', text: '' }) : null)),
  h('tbody', {}, rows.map((o) => {
    let del = null;
    if (may('admin')) {
      del = h('button', { type: 'button', text: 'Delete' });
      del.addEventListener('click', () => act(del, `Delete ${o.label}`, [`Deletes ${caption.toLowerCase().replace(/s$/, '')} ${o.label}; FM refuses while something uses it.`], 'Delete',
        () => call('DELETE', `${path}/${enc(o.id)}`)));
    }
    return h('tr', {}, columns.map(([, fn], i) => h('td', {}, i === 0 && linkOf ? h('a', { href: linkOf(o), text: fn(o) }) : String(fn(o) ?? ''))),
      del ? h('td', {}, del) : null);
  })));
}

async function listPage(main, title, path, columns, kind, createForm, linkOf) {
  const gen = generation;
  const body = h('div');
  async function load() {
    const rows = await get(path);
    fill(body, objectList(title, rows, columns, path, linkOf));
  }
  fill(main, h('h1', { text: title }), may('admin') && createForm ? createForm(load) : null, body);
  await load();
  const reload = throttled(gen, () => load().catch((e) => flash(e.message, true)), 300);
  follow(gen, null, (ev) => { if ((ev.kind === 'fleet' && ev.id === kind) || ev.kind === 'resync') reload(); });
}

function createForm(title, fields, submit) {
  return (reload) => {
    const errs = h('div', { role: 'alert' });
    const form = h('form', { class: 'grid', 'aria-label': title }, fields.map(([t, c]) => field(t, c)),
      h('span'), h('button', { class: 'primary', type: 'submit', text: title }));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      try {
        const out = await submit();
        fill(errs);
        flash(`${title}: ${out && out.label ? out.label : 'done'}.`);
        form.reset();
        await reload();
      } catch (e) { fill(errs, errorBox(e)); }
    });
    return h('details', {}, h('summary', { text: title }), errs, form);
  };
}

function networksPage(main) {
  const label = input('label', '', { required: true }), region = input('awsRegion', ''), vpc = input('awsVpcId', ''), subnet = input('awsSubnetId', '');
  const defaults = h('input', { type: 'checkbox', name: 'useDefaultValues' });
  const form = createForm('Create a network', [['Label', label], ["Use FM's own VPC and subnet", defaults], ['AWS region', region], ['VPC', vpc], ['Subnet', subnet]],
    () => call('POST', `virtual-networks?useDefaultValues=${defaults.checked ? 'True' : 'False'}`,
      Object.fromEntries(Object.entries({ label: label.value, awsRegion: region.value, awsVpcId: vpc.value, awsSubnetId: subnet.value }).filter(([, v]) => v))));
  return listPage(main, 'Networks', 'virtual-networks', [['Label', (o) => o.label], ['Id', (o) => o.id], ['Region', (o) => o.awsRegion],
    ['VPC', (o) => o.awsVpcId], ['Subnet', (o) => o.awsSubnetId], ['HTTPS', (o) => o.httpsStrategy]], 'virtual-networks', form);
}

function imagesPage(main) {
  const id = input('id', '', { placeholder: 'dss-14.0.0-default' }), label = input('label', ''), version = input('dssVersion', '', { required: true });
  const url = input('kitURL', ''), sha = input('kitSHA256', ''), region = input('amiRegion', ''), ami = input('ami', '');
  const form = createForm('Add an image', [['Id', id], ['Label', label], ['DSS version', version], ['Kit URL', url], ['Kit SHA-256', sha], ['AMI region', region], ['AMI', ami]], () => {
    const body = { dssVersion: version.value };
    if (id.value) body.id = id.value;
    if (label.value) body.label = label.value;
    if (url.value) body.kit = { url: url.value, sha256: sha.value };
    if (region.value) body.amis = { [region.value]: ami.value };
    return call('POST', 'images', body);
  });
  return listPage(main, 'Images', 'images', [['Label', (o) => o.label], ['Id', (o) => o.id], ['DSS version', (o) => o.dssVersion],
    ['AMIs', (o) => Object.entries(o.amis || {}).map(([r, a]) => `${r}: ${a}`).join(', ')]], 'images', form);
}

function templatesPage(main) {
  const label = input('label', '', { required: true });
  const form = createForm('Create a template', [['Label', label]], () => call('POST', 'instance-settings-templates', { label: label.value, setupActions: [] }));
  return listPage(main, 'Templates', 'instance-settings-templates', [['Label', (o) => o.label], ['Id', (o) => o.id],
    ['Setup actions', (o) => (o.setupActions || []).length], ['Key pair', (o) => o.awsKeyPairName]],
  'instance-settings-templates', form, (o) => '#/templates/' + enc(o.id));
}

// templatePage edits a template's setup actions: add, reorder, enable or
// disable, and each action's parameters (JSON, checked by FM on save).
async function templatePage(main, query, id) {
  const gen = generation;
  let tpl = await get('instance-settings-templates/' + enc(id));
  if (gen !== generation) return;
  const ro = !may('admin');
  const errs = h('div', { role: 'alert' });
  const list = h('div', { id: 'setup-actions' });
  let actions = (tpl.setupActions || []).map((a) => ({ type: a.type, enabled: a.enabled !== false, params: JSON.stringify(a.params || {}, null, 2) }));
  function draw() {
    fill(list, actions.length ? actions.map((a, i) => {
      const type = select(`type-${i}`, SETUP_ACTION_TYPES.includes(a.type) ? SETUP_ACTION_TYPES : [a.type, ...SETUP_ACTION_TYPES], a.type, { disabled: ro });
      type.addEventListener('change', () => { a.type = type.value; });
      const enabled = h('input', { type: 'checkbox', checked: a.enabled, disabled: ro });
      enabled.addEventListener('change', () => { a.enabled = enabled.checked; });
      const params = h('textarea', { disabled: ro, spellcheck: 'false' });
      params.value = a.params;
      params.addEventListener('input', () => { a.params = params.value; });
      const move = (d) => { const j = i + d; if (j < 0 || j >= actions.length) return; [actions[i], actions[j]] = [actions[j], actions[i]]; draw(); list.querySelectorAll('.action-row')[j].querySelector('select').focus(); };
      const up = h('button', { type: 'button', text: 'Move up', disabled: ro || i === 0, 'aria-label': `Move action ${i + 1} up` });
      up.addEventListener('click', () => move(-1));
      const down = h('button', { type: 'button', text: 'Move down', disabled: ro || i === actions.length - 1, 'aria-label': `Move action ${i + 1} down` });
      down.addEventListener('click', () => move(1));
      const remove = h('button', { type: 'button', text: 'Remove', disabled: ro, 'aria-label': `Remove action ${i + 1}` });
      remove.addEventListener('click', () => { actions.splice(i, 1); draw(); });
      return h('fieldset', { class: 'action-row' }, h('legend', { text: `Action ${i + 1}` }),
        h('div', { class: 'inline' }, field('Type', type), ' ', field('Enabled', enabled)),
        field('Parameters (JSON)', params), ro ? null : h('div', { class: 'actions' }, up, down, remove));
    }) : h('p', { class: 'muted', text: 'No setup action.' }));
  }
  draw();
  const add = h('button', { type: 'button', text: 'Add a setup action' });
  add.addEventListener('click', () => { actions.push({ type: 'ADD_ENV_VARIABLES', enabled: true, params: '{}' }); draw(); });
  const save = h('button', { type: 'button', class: 'primary', text: 'Save the template' });
  save.addEventListener('click', async () => {
    try {
      const setupActions = actions.map((a, i) => {
        let params;
        try { params = JSON.parse(a.params || '{}'); } catch (e) { throw new Error(`Action ${i + 1} (${a.type}): its parameters are not JSON: ${e.message}`); }
        return { type: a.type, enabled: a.enabled, params };
      });
      tpl = await call('PUT', 'instance-settings-templates/' + enc(id), { ...tpl, setupActions });
      fill(errs);
      flash(`Template ${tpl.label} saved.`);
    } catch (e) { fill(errs, errorBox(e)); }
  });
  const replay = h('button', { type: 'button', text: 'Replay on every instance' });
  replay.addEventListener('click', () => act(replay, 'Replay setup actions', [`Replays template ${tpl.label}'s setup actions on every running instance that uses it.`], 'Replay',
    () => call('POST', `instance-settings-templates/${enc(id)}/actions/replay-setup-actions`)));
  fill(main, h('p', {}, h('a', { href: '#/templates', text: '← Templates' })), h('h1', { text: `Template ${tpl.label}` }),
    h('h2', { text: 'Setup actions' }), errs, list, ro ? null : h('div', { class: 'actions' }, add, save),
    may('operator') ? h('div', { class: 'actions' }, replay) : null);
}

// ---- API keys, audit ----

async function keysPage(main) {
  const body = h('div'), secretBox = h('div', { role: 'status' });
  async function load() {
    const keys = await get('api-keys');
    fill(body, h('table', { 'aria-label': 'API keys' }, h('thead', {}, h('tr', {},
      ['Id', 'Label', 'Role', 'Created', 'By', 'Revoked', ''].map((t) => h('th', { scope: 'col', text: t })))),
    h('tbody', {}, keys.map((k) => {
      let revoke = null;
      if (!k.revokedAt) {
        revoke = h('button', { type: 'button', text: 'Revoke' });
        revoke.addEventListener('click', async () => {
          await act(revoke, 'Revoke the key', [`Revokes key ${k.id} (${k.label}): every client and console session using it is refused from now on.`], 'Revoke',
            () => call('DELETE', 'api-keys/' + enc(k.id)));
          load();
        });
      }
      return h('tr', {}, h('td', { text: k.id }), h('td', { text: k.label }), h('td', { text: k.role }), h('td', { text: when(k.createdAt) }),
        h('td', { text: k.createdBy }), h('td', { text: when(k.revokedAt) }), h('td', {}, revoke));
    }))));
  }
  const label = input('label', '', { required: true }), role = select('role', ['viewer', 'operator', 'admin'], 'viewer');
  const form = createForm('Create a key', [['Label', label], ['Role', role]], async () => {
    const kf = await call('POST', 'api-keys', { label: label.value, role: role.value });
    fill(secretBox, h('p', { text: 'The key\'s secret is shown once: keep it now.' }),
      h('div', { class: 'secret', text: JSON.stringify({ id: kf.id, secret: kf.secret }) }));
    return { label: label.value };
  })(load);
  fill(main, h('h1', { text: 'API keys' }), form, secretBox, body);
  await load();
}

async function auditPage(main, query) {
  const object = select('object', [['', 'any'], 'instances', 'virtual-networks', 'instance-settings-templates', 'images', 'api-keys',
    'snapshots', 'futures', 'cloud-credentials', 'load-balancers', 'server'], query.get('object') || '');
  const who = input('who', query.get('who') || '', { placeholder: 'key:<id> or sso:<user>' });
  const since = h('input', { type: 'datetime-local', name: 'since', value: query.get('since') || '' });
  const form = filterForm('Filter the audit trail', '#/audit', [['Object', object], ['Actor', who], ['Since', since]]);
  const q = new URLSearchParams({ limit: '200' });
  if (query.get('object')) q.set('object', query.get('object'));
  if (query.get('who')) q.set('who', query.get('who'));
  if (query.get('since')) {
    const t = new Date(query.get('since'));
    if (!isNaN(t)) q.set('since', t.toISOString());
  }
  let rows;
  const gen = generation;
  try {
    rows = await get('audit?' + q);
  } catch (e) {
    if (gen === generation) fill(main, h('h1', { text: 'Audit trail' }), form, errorBox(e));
    return;
  }
  if (gen !== generation) return;
  fill(main, h('h1', { text: 'Audit trail' }), form, rows.length ? h('table', { 'aria-label': 'Audit records' }, h('thead', {}, h('tr', {},
    ['Time', 'Who', 'Role', 'Action', 'Object', 'Outcome', 'From'].map((t) => h('th', { scope: 'col', text: t })))),
  h('tbody', {}, rows.slice().reverse().map((r) => h('tr', {}, h('td', { text: when(r.time) }), h('td', { text: r.who }), h('td', { text: r.role || '' }),
    h('td', { text: r.action }), h('td', { text: `${r.object || ''} ${r.objectId || ''}` }),
    h('td', { class: r.outcome === 'ok' ? '' : 'bad', text: `${r.outcome}${r.error ? ': ' + (r.error.message || '') : ''}` }), h('td', { text: r.from || '' }))))) :
    h('p', { class: 'muted', text: 'No record matches.' }));
}


// An instance's page: status, actions, operations, snapshots, settings,
// logs, diagnoses.
'use strict';

// ---- instance page ----

// compareVersions orders DSS versions (13.4.0 < 14.0.0 < 14.0.10).
function compareVersions(a, b) {
  const pa = String(a).split(/[.-]/), pb = String(b).split(/[.-]/);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = parseInt(pa[i] || '0', 10), y = parseInt(pb[i] || '0', 10);
    if (isNaN(x) || isNaN(y)) return String(pa[i] || '').localeCompare(String(pb[i] || ''));
    if (x !== y) return x < y ? -1 : 1;
  }
  return 0;
}

async function instancePage(main, query, id) {
  if (id === 'new') return newInstancePage(main);
  const head = h('div'), status = h('section', { 'aria-labelledby': 'st-h' }), actions = h('section', { 'aria-labelledby': 'ac-h' });
  const ops = h('section', { 'aria-labelledby': 'op-h' }), snaps = h('section', { 'aria-labelledby': 'sn-h' });
  const settings = h('section', { 'aria-labelledby': 'se-h' }), logs = h('section', { 'aria-labelledby': 'lg-h' });
  const diag = h('section', { 'aria-labelledby': 'dg-h' });
  fill(main, head, status, actions, ops, snaps, settings, may('operator') ? [logs, diag] : null);
  const gen = generation;
  let inst, st, images, form;
  // One read at a time, in the order asked: the live reloads and the
  // actions' own reads would otherwise race, and the earlier read, drawn
  // last, show what was true before the last change.
  let reads = Promise.resolve();
  function load(first) {
    const p = reads.then(() => read(first));
    reads = p.catch(() => {});
    return p;
  }

  async function read(first) {
    const r = await Promise.all([get('instances/' + enc(id)), get(`instances/${enc(id)}/status`),
      get(`instances/${enc(id)}/snapshots`), get(`futures?targetId=${enc(id)}&limit=20`), images ? images : get('images')]);
    let sn, fu;
    [inst, st, sn, fu, images] = r;
    const url = safeURL(st.publicURL);
    fill(head, h('p', {}, h('a', { href: '#/', text: '← Fleet' })), h('h1', {}, inst.label, ' ', stateBadge(st.state)),
      inst.description ? h('p', { class: 'muted', text: inst.description }) : null,
      url ? h('p', {}, h('a', { href: url, target: '_blank', rel: 'noopener noreferrer', id: 'open-dss', text: `Open DSS (${url})` })) : null);
    renderStatus(status, inst, st);
    renderOps(ops, fu);
    redraw(snaps, () => renderSnapshots(snaps, inst, st, sn, images));
    if (may('operator')) redraw(actions, () => renderActions(actions, inst, st, images, load));
    // The settings as saved, unless the person is editing them.
    if (first || (form && form.revision !== inst.revision && !form.dirty())) form = renderSettings(settings, inst, images, load);
    if (!first && may('operator')) renderDiagnoses(diag, id);
    main.dataset.loaded = String(Date.now());
  }
  await load(true);
  if (gen !== generation) return;
  if (may('operator')) {
    renderLogs(logs, id);
    renderDiagnoses(diag, id);
  }
  const reload = throttled(gen, () => load(false).catch((e) => {
    if (e.status === 404) location.hash = '#/'; else flash(e.message, true);
  }), 300);
  follow(gen, may('operator') ? id : null, (ev) => {
    if ((ev.kind === 'instance' && ev.id === id) || ev.kind === 'resync') reload();
    if ((ev.kind === 'log' && ev.id === id) || ev.kind === 'resync') logs.follow && logs.follow();
  });
}

function renderStatus(node, inst, st) {
  const dss = st.dss || {};
  const vol = st.dataVolume;
  const rows = [
    ['Id', inst.id], ['State', st.state], ['Since', when(st.since)],
    ['Agent', !st.lastSeen ? 'not heard from' : st.agentResponding ? 'responding' : 'not responding'], ['Last seen', when(st.lastSeen)],
    ['Agent version', st.agent ? `${st.agent.version}${st.agent.current === false ? ' (not the one Fleet Manager serves: upgrade it)' : ''}` : ''],
    ['DSS', dss.state ? `${dss.state}${dss.version ? ' ' + dss.version : ''}` : 'not installed'],
    ['Image', inst.imageId], ['Node type', inst.dssNodeType], ['Network', inst.virtualNetworkLabel || inst.virtualNetworkId],
    ['Template', inst.instanceSettingsTemplateLabel || inst.instanceSettingsTemplateId],
    ['Machine', st.hasPhysicalInstance ? (st.cloudMachineIsUp ? 'up' : 'down') : 'none'],
    ['Private IP', st.privateIP], ['Public IP', st.publicIP],
    ['Data volume', vol ? `${Math.round(vol.usedBytes / 1e9 * 10) / 10} of ${Math.round(vol.sizeBytes / 1e9 * 10) / 10} GB used` : ''],
    ['Tags', (inst.fmTags || []).join(', ')],
    ['Last error', st.lastError ? st.lastError.detailedMessage || st.lastError.message : ''],
  ];
  fill(node, h('h2', { id: 'st-h', text: 'Status' }), h('table', { 'aria-label': 'Status' }, h('tbody', {},
    rows.filter(([, v]) => v !== '' && v != null).map(([k, v]) => h('tr', {}, h('th', { scope: 'row', text: k }),
      h('td', { class: k === 'Last error' ? 'bad' : '', text: v }))))));
}

function renderOps(node, futures) {
  fill(node, h('h2', { id: 'op-h', text: 'Operations' }), futures.length ? h('div', { id: 'op-list' }, futures.map((o) =>
    h('details', { open: o.state === 'running' || undefined, 'data-job': o.jobId },
      h('summary', { text: `${o.kind} — ${o.state} — ${when(o.startedAt)}${o.startedBy ? ' by ' + o.startedBy : ''}` }),
      o.error ? h('p', { class: 'bad', text: o.error.detailedMessage || o.error.message }) : null,
      h('ol', { class: 'steps' }, ((o.progress && o.progress.steps) || []).map((s) =>
        h('li', { class: s.status === 'failed' ? 'bad' : '', text: `${s.name}: ${s.status}${s.message ? ' — ' + s.message : ''} (${when(s.time)})` })))))) :
    h('p', { class: 'muted', text: 'No operation yet.' }));
}

// imageName names an image for a choice: its label, with its DSS version
// unless the label says it.
function imageName(i) {
  return i.label && i.label.includes(i.dssVersion) ? i.label : `${i.label || i.id} (DSS ${i.dssVersion})`;
}

function imageVersion(images, id) {
  const img = images.find((i) => i.id === id);
  return img ? img.dssVersion : '';
}

// changeLines says what a (re)provision onto image does.
// installedVersion is the DSS version the data volume holds (FM's
// record, whether the machine runs or not).
function installedVersion(st) {
  return st.dssVersion || (st.dss && st.dss.version) || '';
}

function changeLines(inst, st, images, imageId) {
  const to = imageVersion(images, imageId);
  const from = installedVersion(st);
  if (!st.hasPhysicalInstance && !from) return { lines: [`Provision makes the machine and installs DSS ${to}.`], downgrade: false };
  const lines = ['Reprovision replaces the machine; the data volume is kept.'];
  let downgrade = false;
  if (from && to && from !== to) {
    lines[0] = `Reprovision replaces the machine; the data volume is kept; a snapshot is taken first because DSS changes from ${from} to ${to}.`;
    if (compareVersions(to, from) < 0) {
      downgrade = true;
      lines.push(h('p', { class: 'bad', role: 'alert', text: `Warning: this is a downgrade, from DSS ${from} to ${to}. DSS's data may not open with an older version; its installer decides, and may refuse.` }));
    }
  }
  return { lines, downgrade };
}

function renderActions(node, inst, st, images, reload) {
  const id = enc(inst.id);
  const op = st.operation && st.operation.state === 'running' ? st.operation : null;
  const btn = (text, props) => h('button', { type: 'button', text, ...props });
  // What the instance's state allows: the rest is shown disabled (FM
  // refuses them anyway, saying why).
  const running = st.state === 'running', machine = st.hasPhysicalInstance;
  const allowed = {
    stop: running, start: machine && ['stopped', 'failed'].includes(st.state), 'restart-dss': running,
    'replay-setup-actions': running, deprovision: machine, 'collect-diagnosis': running,
    'upgrade-agent': running && !!st.agent && st.agent.current === false,
  };
  const action = (kind, title, lines, ok, qs) => {
    const b = btn(title, { disabled: !!op || !allowed[kind] });
    b.addEventListener('click', () => act(b, title, lines(), ok, () => get(`instances/${id}/actions/${kind}${qs ? '?' + qs() : ''}`)));
    return b;
  };
  const provision = btn(st.hasPhysicalInstance ? 'Reprovision' : 'Provision', { class: 'primary', disabled: !!op });
  provision.addEventListener('click', () => {
    const c = changeLines(inst, st, images, inst.imageId);
    act(provision, provision.textContent, c.lines, provision.textContent,
      () => get(`instances/${id}/actions/reprovision${c.downgrade ? '?allowDowngrade=True' : ''}`));
  });
  const imageSel = select('upgradeImage', images.map((i) => [i.id, imageName(i)]), inst.imageId);
  const upgrade = btn('Change image and reprovision');
  upgrade.addEventListener('click', async () => {
    const c = changeLines(inst, st, images, imageSel.value);
    await act(upgrade, 'Upgrade', [`The instance's image becomes ${imageSel.value}.`, ...c.lines], c.downgrade ? 'Downgrade' : 'Upgrade', async () => {
      const cur = await get('instances/' + id);
      if (cur.imageId !== imageSel.value) await call('PUT', 'instances/' + id, { ...cur, imageId: imageSel.value });
      return get(`instances/${id}/actions/reprovision${c.downgrade ? '?allowDowngrade=True' : ''}`);
    });
    reload(false).catch((e) => flash(e.message, true));
  });
  const user = input('userName', 'admin'), pass = h('input', { type: 'password', name: 'password', autocomplete: 'new-password' });
  const reset = btn('Reset password');
  reset.addEventListener('click', async () => {
    const out = await act(reset, 'Reset password', [`Sets the DSS password of user ${user.value}.`], 'Reset',
      () => call('POST', `instances/${id}/actions/reset-user-password`, { userName: user.value, password: pass.value }));
    if (out) pass.value = '';
  });
  const force = h('input', { type: 'checkbox', name: 'force', checked: true }), keep = h('input', { type: 'checkbox', name: 'keepVolume' });
  const del = btn('Delete', { class: 'danger' });
  del.addEventListener('click', async () => {
    const out = await act(del, 'Delete', [
      `Delete removes the instance ${inst.label}${st.hasPhysicalInstance && force.checked ? ' and tears its machine down first' : ''}.`,
      keep.checked ? 'Its data volume is kept, for an operator to recover.' : 'Its data volume is deleted with it.',
      'Its snapshots are kept.'], 'Delete',
    () => get(`instances/${id}/actions/delete?force=${force.checked ? 'True' : 'False'}&keepVolume=${keep.checked ? 'True' : 'False'}`));
    if (out) location.hash = '#/';
  });
  fill(node, h('h2', { id: 'ac-h', text: 'Actions' }),
    op ? h('p', { class: 'warn', text: `Operation ${op.kind} is running: other actions wait for it.` }) : null,
    h('div', { class: 'actions' }, provision,
      action('stop', 'Stop', () => ['Stop shuts the machine down: DSS is unavailable until started. The data volume is kept.'], 'Stop'),
      action('start', 'Start', () => ['Start boots the machine and DSS.'], 'Start'),
      action('restart-dss', 'Restart DSS', () => ['Restart DSS stops and starts DSS on its machine: DSS is unavailable for a minute.'], 'Restart'),
      action('replay-setup-actions', 'Replay setup actions', () => [`Replays the setup actions of template ${inst.instanceSettingsTemplateLabel || inst.instanceSettingsTemplateId} on the machine.`], 'Replay'),
      action('deprovision', 'Deprovision', () => ['Deprovision tears the machine down. The data volume is kept; provision again to get a new machine on it.'], 'Deprovision'),
      action('collect-diagnosis', 'Collect diagnosis', () => ['Collects a diagnosis bundle (logs, settings) from the machine; it is listed below once ready.'], 'Collect'),
      action('upgrade-agent', 'Upgrade agent', () => ['Replaces the machine\'s agent with the one Fleet Manager serves, in place; DSS keeps running (its HTTPS front pauses for a second). An agent that does not report within 5 minutes goes back to the previous one.'], 'Upgrade')),
    h('form', { class: 'inline', 'aria-label': 'Upgrade' }, h('div', {}, field('New image', imageSel)), upgrade),
    h('form', { class: 'inline', 'aria-label': 'Reset a DSS password' }, h('div', {}, field('DSS user', user)), h('div', {}, field('New password', pass)), reset),
    h('form', { class: 'inline', 'aria-label': 'Delete' }, h('div', {}, field('Tear the machine down', force)), h('div', {}, field('Keep the data volume', keep)), del));
}

function renderSnapshots(node, inst, st, list, images) {
  const id = enc(inst.id);
  const kids = [h('h2', { id: 'sn-h', text: 'Snapshots' })];
  if (may('operator')) {
    const reason = input('reasonForSnapshot', '', { placeholder: 'why' });
    const take = h('button', { type: 'button', text: 'Take a snapshot' });
    take.addEventListener('click', () => act(take, 'Take a snapshot', ['Takes a snapshot of the data volume; DSS keeps running.'], 'Take',
      () => call('POST', `instances/${id}/snapshots?reasonForSnapshot=${enc(reason.value)}`)));
    kids.push(h('form', { class: 'inline', 'aria-label': 'Take a snapshot' }, h('div', {}, field('Reason', reason)), take));
  }
  if (!list.length) kids.push(h('p', { class: 'muted', text: 'No snapshot.' }));
  else {
    kids.push(h('table', { 'aria-label': 'Snapshots' }, h('thead', {}, h('tr', {},
      ['Taken', 'State', 'DSS', 'Reason', 'Size', ''].map((t) => h('th', { scope: 'col', text: t })))),
    h('tbody', {}, list.slice().sort((a, b) => String(b.createdAt).localeCompare(String(a.createdAt))).map((s) => {
      const cell = h('td', { class: 'actions' });
      if (may('operator') && s.state === 'AVAILABLE') {
        const restore = h('button', { type: 'button', text: 'Restore' });
        // The machine installs the instance's image on the volume the
        // snapshot gives: older than the snapshot's DSS is a downgrade.
        const to = imageVersion(images, inst.imageId);
        const downgrade = to && s.dssVersion && compareVersions(to, s.dssVersion) < 0;
        restore.addEventListener('click', () => act(restore, 'Restore', [
          `Restore replaces the machine and brings back the data volume as it was at ${when(s.createdAt)} (DSS ${s.dssVersion}).`,
          'What changed on the data volume since is not in the snapshot.',
          downgrade ? h('p', { class: 'bad', role: 'alert', text: `Warning: the snapshot holds DSS ${s.dssVersion}, newer than the image's ${to}: a downgrade, which DSS's installer may refuse.` }) : null],
        downgrade ? 'Restore and downgrade' : 'Restore',
        () => call('POST', `instances/${id}/snapshots/${enc(s.id)}/reprovision${downgrade ? '?allowDowngrade=True' : ''}`)));
        const del = h('button', { type: 'button', text: 'Delete' });
        del.addEventListener('click', () => act(del, 'Delete the snapshot', [`Deletes the snapshot taken at ${when(s.createdAt)}; it cannot be restored after.`], 'Delete',
          () => call('DELETE', `instances/${id}/snapshots/${enc(s.id)}`)));
        cell.append(restore, del);
      }
      return h('tr', {}, h('td', { text: when(s.createdAt) }), h('td', { class: s.state === 'FAILED' ? 'bad' : '', text: s.state }),
        h('td', { text: s.dssVersion }), h('td', { text: s.reasonForSnapshot || (s.automated ? 'automated' : '') }),
        h('td', { text: s.sizeBytes ? `${Math.round(s.sizeBytes / 1e6)} MB` : '' }), cell);
    }))));
  }
  fill(node, kids);
}

function renderSettings(node, inst, images, reload) {
  const ro = !may('operator');
  const errs = h('div', { role: 'alert' });
  const num = (name, v) => h('input', { type: 'number', name, value: v ?? '', disabled: ro });
  const f = {
    label: input('label', inst.label, { disabled: ro }),
    description: input('description', inst.description, { disabled: ro }),
    imageId: select('imageId', images.map((i) => [i.id, imageName(i)]), inst.imageId, { disabled: ro }),
    cloudInstanceType: input('cloudInstanceType', inst.cloudInstanceType, { disabled: ro }),
    dataVolumeSizeGB: num('dataVolumeSizeGB', inst.dataVolumeSizeGB),
    dataVolumeSizeMaxGB: num('dataVolumeSizeMaxGB', inst.dataVolumeSizeMaxGB),
    fmTags: input('fmTags', (inst.fmTags || []).join(', '), { disabled: ro }),
    enableAutomatedSnapshot: h('input', { type: 'checkbox', name: 'enableAutomatedSnapshot', checked: inst.enableAutomatedSnapshot, disabled: ro }),
    automatedSnapshotPeriod: num('automatedSnapshotPeriod', inst.automatedSnapshotPeriod),
    automatedSnapshotRetention: num('automatedSnapshotRetention', inst.automatedSnapshotRetention),
  };
  const labels = { label: 'Label', description: 'Description', imageId: 'Image', cloudInstanceType: 'Cloud instance type',
    dataVolumeSizeGB: 'Data volume size (GB)', dataVolumeSizeMaxGB: 'Data volume maximum size (GB)', fmTags: 'FM tags',
    enableAutomatedSnapshot: 'Automated snapshots', automatedSnapshotPeriod: 'Snapshot period (hours)', automatedSnapshotRetention: 'Snapshots kept' };
  const form = h('form', { class: 'grid', 'aria-labelledby': 'se-h' }, Object.entries(f).map(([k, c]) => field(labels[k], c)),
    ro ? null : [h('span'), h('button', { class: 'primary', type: 'submit', text: 'Save settings' })]);
  let dirty = false;
  form.addEventListener('input', () => { dirty = true; });
  form.addEventListener('change', () => { dirty = true; });
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    // What was shown, with the fields changed, at the revision shown: FM
    // refuses it (409, saying so) if someone saved meanwhile.
    const body = { ...inst, label: f.label.value, description: f.description.value, imageId: f.imageId.value,
      cloudInstanceType: f.cloudInstanceType.value, enableAutomatedSnapshot: f.enableAutomatedSnapshot.checked,
      fmTags: f.fmTags.value.split(',').map((t) => t.trim()).filter(Boolean) };
    for (const k of ['dataVolumeSizeGB', 'dataVolumeSizeMaxGB', 'automatedSnapshotPeriod', 'automatedSnapshotRetention']) {
      body[k] = f[k].value === '' ? null : Number(f[k].value);
    }
    try {
      await call('PUT', 'instances/' + enc(inst.id), body);
      fill(errs);
      dirty = false;
      flash('Settings saved. A reprovision applies those the machine is made with.');
      reload(false).catch((e) => flash(e.message, true));
    } catch (e) {
      fill(errs, errorBox(e));
      if (e.status === 409) {
        // Saved by someone else meanwhile: show theirs (what was typed
        // here is dropped).
        const fresh = h('button', { type: 'button', text: 'Show the settings as saved' });
        fresh.addEventListener('click', () => { dirty = false; reload(true).catch((err) => flash(err.message, true)); });
        errs.append(fresh);
      }
    }
  });
  fill(node, h('h2', { id: 'se-h', text: 'Settings' }), errs, form);
  return { revision: inst.revision, dirty: () => dirty };
}

function renderLogs(node, id) {
  const source = select('source', [['', 'agent and DSS'], 'agent', 'dss'], '');
  const follow = h('input', { type: 'checkbox', name: 'follow', checked: true });
  const pre = h('pre', { class: 'logs', 'aria-live': 'off', tabindex: '0', 'aria-label': 'Log lines' });
  let next = null, busy = false, again = null;
  const lines = [];
  // One read at a time; what is asked meanwhile (a nudge, a new source)
  // is read when it ends, so that no line waits for the next nudge.
  async function fetchLogs(reset) {
    if (busy) { again = again === null ? reset : again || reset; return; }
    busy = true;
    try {
      if (reset) { next = null; lines.length = 0; }
      const q = new URLSearchParams({ limit: '500' });
      if (source.value) q.set('source', source.value);
      if (next !== null) q.set('after', String(next)); else q.set('since', '30m');
      const out = await get(`instances/${enc(id)}/logs?${q}`);
      next = out.next;
      for (const e of out.entries) lines.push(`${when(e.time)} [${e.source}] ${e.text.replace(/\n$/, '')}`);
      if (lines.length > 2000) lines.splice(0, lines.length - 2000);
      pre.textContent = lines.join('\n');
      pre.scrollTop = pre.scrollHeight;
      if (out.more && again === null) again = false;
    } catch (e) {
      pre.textContent = e.message;
    } finally {
      busy = false;
      if (again !== null) { const r = again; again = null; fetchLogs(r); }
    }
  }
  source.addEventListener('change', () => fetchLogs(true));
  node.follow = () => { if (follow.checked) fetchLogs(false); };
  fill(node, h('h2', { id: 'lg-h', text: 'Logs' }), h('form', { class: 'inline', 'aria-label': 'Logs' },
    h('div', {}, field('Source', source)), h('div', {}, field('Follow live', follow))), pre);
  fetchLogs(true);
}

async function renderDiagnoses(node, id) {
  const list = await get(`instances/${enc(id)}/diagnoses`).catch(() => []);
  fill(node, h('h2', { id: 'dg-h', text: 'Diagnoses' }), list.length ? h('ul', {}, list.map((d) => {
    const b = h('button', { type: 'button', text: `Download ${d.name}` });
    b.addEventListener('click', async () => {
      try {
        const r = await call('GET', `instances/${enc(id)}/diagnoses/${enc(d.name)}`, undefined, true);
        const url = URL.createObjectURL(await r.blob());
        const a = h('a', { href: url, download: d.name });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      } catch (e) { flash(e.message, true); }
    });
    return h('li', {}, b, ` ${Math.round(d.sizeBytes / 1024)} KiB, ${when(d.createdAt)}`);
  })) : h('p', { class: 'muted', text: 'No diagnosis collected.' }));
}


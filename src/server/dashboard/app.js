// sqlferry's dashboard. It asks this server's JSON API for every replica's summary
// (GET /api/replicas) every few seconds, shows each with a health colour, lists a
// replica's versions when asked (GET /api/replicas/<path>/versions), and asks a
// replica's subscribers to sync now (POST /api/replicas/<path>/sync).
//
// The admin key is kept in sessionStorage (this tab only, gone when it closes) and
// sent in the Authorization header; never in a URL, never in localStorage. Text from
// the server is only ever set as textContent, never parsed as HTML.
'use strict';

(function () {
  const KEY_ITEM = 'sqlferry.key';
  const LATE_AFTER_ITEM = 'sqlferry.lateAfter';
  const DEFAULT_LATE_AFTER_S = 86400;
  // How far past its announced time a push, or behind the latest version a follower,
  // may be before the replica is late.
  const LATE_MARGIN_S = 300;
  const REFRESH_MS = 5000;
  const VERSIONS_SHOWN = 50;
  const RANK = { failing: 0, late: 1, fresh: 2 };

  const $ = (id) => document.getElementById(id);
  const cards = new Map();
  let timer = null;
  let inFlight = false;
  let lastList = null;

  // ---- small helpers ---------------------------------------------------------------

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  function now() {
    return Math.floor(Date.now() / 1000);
  }

  function plural(n, one, many) {
    return n + ' ' + (n === 1 ? one : many || one + 's');
  }

  // A duration in seconds, short: "45 s", "12 min", "3 h 20 min", "4 days".
  function span(s) {
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + ' s';
    const m = Math.floor(s / 60);
    if (m < 60) return m + ' min';
    const h = Math.floor(m / 60);
    if (h < 10) return h + ' h' + (m % 60 ? ' ' + (m % 60) + ' min' : '');
    if (h < 48) return h + ' h';
    const d = Math.floor(h / 24);
    if (d < 10) return d + ' days' + (h % 24 ? ' ' + (h % 24) + ' h' : '');
    return d + ' days';
  }

  function ago(t) {
    return span(now() - t) + ' ago';
  }

  function localTime(t) {
    const d = new Date(t * 1000);
    const pad = (n) => String(n).padStart(2, '0');
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
      pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }

  function bytes(n) {
    if (n === null || n === undefined) return '—';
    const units = ['B', 'kB', 'MB', 'GB', 'TB', 'PB'];
    let i = 0;
    let v = n;
    while (v >= 1000 && i < units.length - 1) {
      v /= 1000;
      i += 1;
    }
    return (i === 0 || v >= 10 ? Math.round(v) : v.toFixed(1)) + ' ' + units[i];
  }

  // The "Late after" setting in seconds (0: never), kept in localStorage: it is no
  // secret, and a user keeps it across sessions.
  function lateAfter() {
    const saved = localStorage.getItem(LATE_AFTER_ITEM);
    const v = Number(saved);
    return saved !== null && Number.isFinite(v) && v >= 0 ? v : DEFAULT_LATE_AFTER_S;
  }

  function replicaUrl(replica, rest) {
    return '/api/replicas/' + replica.split('/').map(encodeURIComponent).join('/') + (rest || '');
  }

  // ---- the API -------------------------------------------------------------------

  // Calls the API with `key` (the saved one by default). Resolves to
  // {status, body, message}: message is what to tell the user when it failed.
  async function api(path, options) {
    const key = (options && options.key) || sessionStorage.getItem(KEY_ITEM) || '';
    let response;
    try {
      response = await fetch(path, {
        method: (options && options.method) || 'GET',
        headers: { Authorization: 'Bearer ' + key },
        cache: 'no-store',
        credentials: 'omit',
        redirect: 'error',
      });
    } catch (e) {
      return { status: 0, body: null, message: 'Cannot reach the server (' + e.message + ').' };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (response.ok) return { status: response.status, body, message: null };
    const said = body && typeof body.error === 'string' ? body.error : response.statusText;
    let message;
    switch (response.status) {
      case 401:
        message = 'The server refused this key: ' + said + '.';
        break;
      case 403:
        message = 'This key may not do that: ' + said + '.';
        break;
      case 429:
        message = said + '.';
        break;
      default:
        message = 'The server answered ' + response.status + ': ' + said;
    }
    return { status: response.status, body, message };
  }

  // ---- health ----------------------------------------------------------------------

  // The replica's health and why: failing, late or fresh (the rule the page shows
  // under "How the colours are decided", and docs/server.md).
  function health(r, t, limit) {
    const failing = [];
    if (r.error) failing.push("Cannot read the replica's file");
    if (r.failure) {
      failing.push('Pushes failing for ' + span(t - r.failure.failing_since) + ' (' +
        plural(r.failure.attempts, 'attempt') + ')');
    }
    if (r.last_drill && r.last_drill.ok === false) failing.push('The last restore drill failed');
    if (failing.length) return { level: 'failing', why: failing };
    const late = [];
    if (r.latest_version === null || r.latest_version === undefined) {
      late.push('No version yet');
    } else if (limit > 0 && t - r.latest_at > limit) {
      late.push('Latest version older than ' + span(limit));
    }
    if (r.expected_push_at && t > r.expected_push_at + LATE_MARGIN_S) {
      late.push('Announced push overdue by ' + span(t - r.expected_push_at));
    }
    const lagging = (r.followers || []).filter((f) => f.lag_seconds > LATE_MARGIN_S);
    if (lagging.length) late.push(plural(lagging.length, 'follower') + ' lagging');
    if (late.length) return { level: 'late', why: late };
    return { level: 'fresh', why: [] };
  }

  // ---- one card per replica ----------------------------------------------------------

  function fact(list, label, className) {
    const wrap = el('div');
    wrap.append(el('dt', null, label));
    const dd = el('dd', className);
    wrap.append(dd);
    list.append(wrap);
    return dd;
  }

  function makeCard(name) {
    const card = el('article', 'card');
    card.dataset.replica = name;
    const head = el('header', 'card-head');
    head.append(el('h2', 'name', name));
    const badge = el('span', 'badge');
    head.append(badge);
    card.append(head);

    const ageRow = el('div', 'age-row');
    const age = el('span', 'age');
    const ageLabel = el('span', 'age-label');
    ageRow.append(age, ageLabel);
    card.append(ageRow);
    const why = el('p', 'why');
    card.append(why);

    const facts = el('dl', 'facts');
    const parts = {
      card, badge, age, ageLabel, why,
      count: fact(facts, 'Versions', 'version-count'),
      size: fact(facts, 'Size', 'size'),
      stored: fact(facts, 'Stored', 'stored'),
      subscribers: fact(facts, 'Subscribers', 'subscribers'),
      nextPush: fact(facts, 'Next push', 'next-push'),
      drill: fact(facts, 'Last drill', 'drill'),
    };
    card.append(facts);

    parts.failure = el('div', 'failure');
    parts.failure.hidden = true;
    card.append(parts.failure);

    parts.followers = el('div', 'followers');
    parts.followers.hidden = true;
    card.append(parts.followers);

    const actions = el('div', 'actions');
    parts.sync = el('button', 'sync-now', 'Sync now');
    parts.sync.type = 'button';
    parts.sync.title = 'Ask every subscriber of ' + name + ' to sync at once';
    parts.toggle = el('button', 'show-versions', 'Versions');
    parts.toggle.type = 'button';
    parts.toggle.setAttribute('aria-expanded', 'false');
    parts.result = el('span', 'sync-result');
    parts.result.setAttribute('role', 'status');
    actions.append(parts.sync, parts.toggle, parts.result);
    card.append(actions);

    parts.versions = el('div', 'versions');
    parts.versions.hidden = true;
    card.append(parts.versions);

    parts.sync.addEventListener('click', () => syncNow(name, parts));
    parts.toggle.addEventListener('click', () => toggleVersions(name, parts));
    parts.shownVersion = null;
    return parts;
  }

  function updateCard(parts, r, h, t) {
    parts.card.className = 'card ' + h.level;
    parts.card.dataset.health = h.level;
    parts.badge.textContent = h.level;
    if (r.latest_at !== null && r.latest_at !== undefined) {
      parts.age.textContent = span(t - r.latest_at);
      parts.age.title = localTime(r.latest_at);
      parts.ageLabel.textContent = 'since version ' + r.latest_version;
    } else {
      parts.age.textContent = '—';
      parts.age.title = '';
      parts.ageLabel.textContent = r.error ? 'its versions cannot be read' : 'no version yet';
    }
    parts.why.textContent = h.why.join(' · ');
    parts.why.hidden = h.why.length === 0;

    parts.count.textContent = String(r.version_count);
    parts.size.textContent = bytes(r.size_bytes);
    parts.size.title = r.digest ? 'digest ' + r.digest : '';
    parts.stored.textContent = bytes(r.stored_bytes);
    const subscribers = [];
    if (r.push_subscribers) subscribers.push(r.push_subscribers + ' push');
    if (r.pull_subscribers) subscribers.push(r.pull_subscribers + ' pull');
    parts.subscribers.textContent = subscribers.join(' · ') || 'none';
    if (r.expected_push_at) {
      const d = r.expected_push_at - t;
      parts.nextPush.textContent = d >= 0 ? 'in ' + span(d) : 'overdue ' + span(-d);
      parts.nextPush.title = localTime(r.expected_push_at);
    } else {
      parts.nextPush.textContent = '—';
      parts.nextPush.title = 'no push announced';
    }
    const drill = r.last_drill;
    if (drill) {
      parts.drill.textContent = (drill.ok ? 'passed ' : 'FAILED ') + ago(drill.at);
      parts.drill.title = 'version ' + drill.version +
        (drill.seconds !== undefined && drill.seconds !== null ? ', ' + drill.seconds + ' s' : '') +
        (drill.error ? ': ' + drill.error : '');
    } else {
      parts.drill.textContent = '—';
      parts.drill.title = 'no restore drill yet (serve --drill-every)';
    }

    parts.failure.replaceChildren();
    if (r.failure) {
      parts.failure.append(el('b', null, 'Failing since ' + localTime(r.failure.failing_since) +
        ', ' + plural(r.failure.attempts, 'attempt') + ', reported ' + ago(r.failure.reported_at)));
      parts.failure.append(el('pre', null, r.failure.error));
    } else if (r.error) {
      parts.failure.append(el('pre', null, r.error));
    }
    parts.failure.hidden = !r.failure && !r.error;

    const followers = r.followers || [];
    parts.followers.replaceChildren();
    if (followers.length) {
      parts.followers.append(el('h3', null, 'Followers'));
      const ul = el('ul');
      for (const f of followers) {
        const text = f.applied_version === null || f.applied_version === undefined
          ? 'has not reported a version (an older sqlferry)'
          : 'v' + f.applied_version + ' · lag ' + span(f.lag_seconds || 0);
        const li = el('li', f.lag_seconds > LATE_MARGIN_S ? 'lagging' : null, text);
        if (f.applied_at) li.title = 'applied ' + localTime(f.applied_at);
        ul.append(li);
      }
      parts.followers.append(ul);
    }
    parts.followers.hidden = followers.length === 0;

    // An open versions list follows new versions.
    if (!parts.versions.hidden && parts.shownVersion !== r.latest_version) {
      loadVersions(r.replica, parts, r.latest_version);
    }
  }

  async function syncNow(name, parts) {
    parts.sync.disabled = true;
    parts.result.className = 'sync-result muted';
    parts.result.textContent = 'Asking…';
    const res = await api(replicaUrl(name, '/sync'), { method: 'POST' });
    parts.sync.disabled = false;
    if (res.message) {
      parts.result.className = 'sync-result error';
      parts.result.textContent = res.message;
      if (res.status === 401) signOut(res.message);
      return;
    }
    const n = res.body.reached;
    parts.result.className = 'sync-result' + (n === 0 ? ' muted' : '');
    parts.result.textContent = n === 0
      ? 'No subscriber connected: nobody to sync'
      : 'Reached ' + plural(n, 'subscriber');
    refresh();
  }

  function toggleVersions(name, parts) {
    const open = parts.versions.hidden;
    parts.versions.hidden = !open;
    parts.toggle.setAttribute('aria-expanded', String(open));
    parts.toggle.textContent = open ? 'Hide versions' : 'Versions';
    if (open) {
      const r = lastList && lastList.find((x) => x.replica === name);
      loadVersions(name, parts, r ? r.latest_version : null);
    }
  }

  async function loadVersions(name, parts, latest) {
    parts.shownVersion = latest;
    if (!parts.versions.firstChild) parts.versions.append(el('p', 'muted', 'Loading…'));
    const res = await api(replicaUrl(name, '/versions'));
    if (res.message) {
      if (res.status === 404) {
        parts.versions.replaceChildren(el('p', 'muted', 'No version yet.'));
      } else {
        parts.versions.replaceChildren(el('p', 'error', res.message));
        parts.shownVersion = null;
      }
      return;
    }
    const versions = res.body.slice().reverse();
    const table = el('table');
    const head = el('tr');
    head.append(el('th', 'num', '#'), el('th', null, 'Time'), el('th', null, 'Message'),
      el('th', 'num', 'Size'));
    const thead = el('thead');
    thead.append(head);
    const tbody = el('tbody');
    for (const v of versions.slice(0, VERSIONS_SHOWN)) {
      const tr = el('tr');
      tr.dataset.version = String(v.number);
      const when = el('td', 'when', localTime(v.created_at));
      when.title = ago(v.created_at) + (v.client_id ? ' · from ' + v.client_id : '');
      const msg = el('td', 'msg', v.message);
      if (!v.message) msg.classList.add('muted');
      const size = el('td', 'num', bytes(v.size));
      size.title = 'digest ' + v.digest;
      tr.append(el('td', 'num', String(v.number)), when, msg, size);
      tbody.append(tr);
    }
    table.append(thead, tbody);
    const nodes = [el('h3', null, plural(versions.length, 'version')), table];
    if (versions.length > VERSIONS_SHOWN) {
      nodes.push(el('p', 'more muted', 'and ' + (versions.length - VERSIONS_SHOWN) +
        ' older (sqlferry versions ' + name + ' lists them all)'));
    }
    parts.versions.replaceChildren(...nodes);
  }

  // ---- the whole board -----------------------------------------------------------

  function render(list) {
    lastList = list;
    const t = now();
    const limit = lateAfter();
    const rows = list.map((r) => ({ r, h: health(r, t, limit) }));
    rows.sort((a, b) => RANK[a.h.level] - RANK[b.h.level] || a.r.replica.localeCompare(b.r.replica));

    const counts = { failing: 0, late: 0, fresh: 0 };
    let oldest = null;
    for (const { r, h } of rows) {
      counts[h.level] += 1;
      if (r.latest_at !== null && r.latest_at !== undefined && (!oldest || r.latest_at < oldest.latest_at)) {
        oldest = r;
      }
    }
    for (const level of Object.keys(counts)) {
      $('count-' + level).textContent = String(counts[level]);
      $('tile-' + level).classList.toggle('some', counts[level] > 0);
    }
    if (oldest) {
      $('oldest-age').textContent = span(t - oldest.latest_at);
      $('oldest-label').textContent = 'oldest latest version: ' + oldest.replica;
    } else {
      $('oldest-age').textContent = '—';
      $('oldest-label').textContent = 'oldest latest version';
    }
    document.title = (counts.failing ? '(' + counts.failing + ' failing) ' : '') + 'sqlferry';

    const container = $('replicas');
    const seen = new Set();
    rows.forEach(({ r, h }, i) => {
      seen.add(r.replica);
      let parts = cards.get(r.replica);
      if (!parts) {
        parts = makeCard(r.replica);
        cards.set(r.replica, parts);
      }
      updateCard(parts, r, h, t);
      // Moved only when out of place, so a card being clicked is not re-inserted.
      if (container.children[i] !== parts.card) container.insertBefore(parts.card, container.children[i] || null);
    });
    for (const [name, parts] of cards) {
      if (!seen.has(name)) {
        parts.card.remove();
        cards.delete(name);
      }
    }
    $('empty').hidden = list.length > 0;
  }

  async function refresh() {
    clearTimeout(timer);
    timer = null;
    if (!sessionStorage.getItem(KEY_ITEM)) return;
    if (inFlight) return;
    inFlight = true;
    const res = await api('/api/replicas');
    inFlight = false;
    if (!sessionStorage.getItem(KEY_ITEM)) return; // signed out meanwhile
    if (res.status === 401 || res.status === 403) {
      signOut(res.message);
      return;
    }
    if (res.message) {
      $('banner').textContent = res.message + ' Showing what it said last; trying again.';
      $('banner').hidden = false;
    } else {
      $('banner').hidden = true;
      render(res.body.replicas);
      $('updated').textContent = 'Updated ' + localTime(now()).slice(11);
    }
    // A hidden tab asks nothing; it refreshes when shown again (visibilitychange).
    if (!document.hidden) timer = setTimeout(refresh, REFRESH_MS);
  }

  function showBoard() {
    $('login').hidden = true;
    $('board').hidden = false;
    $('session-bar').hidden = false;
    $('sign-out').hidden = false;
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_ITEM);
    clearTimeout(timer);
    timer = null;
    for (const parts of cards.values()) parts.card.remove();
    cards.clear();
    lastList = null;
    $('board').hidden = true;
    $('session-bar').hidden = true;
    $('sign-out').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    $('login-error').hidden = !message;
    $('key').focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const key = $('key').value.trim();
    if (!key) return;
    $('sign-in').disabled = true;
    $('login-error').hidden = true;
    const res = await api('/api/replicas', { key });
    $('sign-in').disabled = false;
    if (res.message) {
      $('login-error').textContent = res.message;
      $('login-error').hidden = false;
      return;
    }
    sessionStorage.setItem(KEY_ITEM, key);
    $('key').value = '';
    showBoard();
    render(res.body.replicas);
    $('updated').textContent = 'Updated ' + localTime(now()).slice(11);
    timer = setTimeout(refresh, REFRESH_MS);
  }

  async function showServerVersion() {
    try {
      const r = await fetch('/api/health', { cache: 'no-store', credentials: 'omit' });
      const body = await r.json();
      if (body.version) $('server-version').textContent = 'v' + body.version;
    } catch (e) {
      // The version is a nicety; the board says when the server cannot be reached.
    }
  }

  function start() {
    const select = $('late-after');
    select.value = String(lateAfter());
    if (select.value === '') select.value = String(DEFAULT_LATE_AFTER_S);
    select.addEventListener('change', () => {
      localStorage.setItem(LATE_AFTER_ITEM, select.value);
      if (lastList) render(lastList);
    });
    $('login-form').addEventListener('submit', signIn);
    $('sign-out').addEventListener('click', () => signOut(null));
    $('empty-command').textContent = 'sqlferry push app.db acme/app.db --server ' +
      (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host;
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && sessionStorage.getItem(KEY_ITEM)) refresh();
    });
    showServerVersion();
    if (sessionStorage.getItem(KEY_ITEM)) {
      showBoard();
      refresh();
    } else {
      signOut(null);
    }
  }

  start();
})();

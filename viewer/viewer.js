// The loupe atlas viewer: a static page that reads an atlas (docs/atlas-format.md) by
// relative path from where it is served. No build step, no dependencies, no requests
// outside the atlas. Every view is a URL hash:
//   #/                                     the atlas
//   #/layer/<segment>?technique=T&sort=S   a layer's units (sort: unit, a statistic: mean,
//                                          std, max, frac_positive, or a trust indicator:
//                                          above_dataset, convergence, diversity,
//                                          dead_on_dataset, dead_on_start; order=asc for
//                                          lowest first)
//   #/layer/<segment>/unit/<n>             one unit (keeps the layer's query for "back")
// <segment> is the layer's path segment from atlas.json (`layers[].path`), as it is.
// The search box in the page header finds units by number (in the layer on screen, or in
// every layer on the atlas page) and by their labels (labels.json, every layer).
'use strict';

(function () {
  const STATS = ['max', 'mean', 'std', 'frac_positive'];
  // The trust indicators of a unit (layer.json's `trust`), in the order the unit page
  // shows them, each with how to read it.
  const TRUST = ['above_dataset', 'convergence', 'diversity', 'dead_on_dataset', 'dead_on_start'];
  const TRUST_HOW = {
    above_dataset: 'Dataset standard deviations by which the channel image beats the best real image: above 0, no real input drives the unit as hard.',
    convergence: 'Change of the objective over the second half of the steps, relative to its end: near 0, the image had settled.',
    diversity: 'Mean RMS pixel difference between the diversity images (0: identical): near 0, they all show one thing.',
    dead_on_dataset: 'Never above 0 at any position of any dataset image: if yes, its images show what the dataset never does.',
    dead_on_start: 'No start image excited the unit: if yes, its optimisation began without a gradient to follow.',
  };
  const SORT_LABEL = {
    unit: 'unit',
    max: 'max',
    mean: 'mean',
    std: 'std',
    frac_positive: 'fraction positive',
    above_dataset: 'σ above dataset',
    convergence: 'convergence',
    diversity: 'diversity',
    dead_on_dataset: 'dead on dataset',
    dead_on_start: 'dead on start',
  };
  const SEARCH_RESULTS = 50; // the most results the search box lists
  const FRESH_MS = 15000; // how long a fetched atlas.json / layer.json is reused
  const PREVIEW_UNITS = 16;
  // Per-unit techniques, in the order a unit page shows them (others the atlas names come
  // after), and the per-layer ones, whose images are the layer's `items`.
  const UNIT_TECHNIQUES = ['channel', 'neuron', 'negative', 'diversity'];
  const LAYER_TECHNIQUES = ['deepdream', 'caricature', 'direction'];
  const ITEM_HEADING = { deepdream: 'DeepDream', caricature: 'Caricatures', direction: 'Directions' };
  const DEAD_NOTE = 'dead unit: no start image excited it';
  // A failed image (its optimisation diverged) has no image, only the reason.
  const failedNote = (reason) => `failed: ${reason} (the optimisation diverged)`;

  const app = document.getElementById('app');
  const crumbs = document.getElementById('crumbs');

  // ---------------------------------------------------------------- small helpers

  // Builds an element. Text always goes in as text, never as HTML: names, ids and paths
  // come from the atlas, which need not be trusted.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'data') Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c == null || c === false) continue;
      el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }

  function fmt(v) {
    if (v == null || typeof v !== 'number' || !isFinite(v)) return '—';
    const a = Math.abs(v);
    if (a === 0) return '0';
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
    return v.toFixed(a >= 100 ? 1 : a >= 10 ? 2 : 3);
  }
  function pct(v) {
    return v == null || typeof v !== 'number' || !isFinite(v) ? '—' : (v * 100).toFixed(1) + '%';
  }
  function fmtStat(stat, v) {
    return stat === 'frac_positive' ? pct(v) : fmt(v);
  }
  // A trust indicator as the unit page and the grid show it: the booleans as yes / no.
  function fmtTrust(name, v) {
    if (typeof v === 'boolean') return v ? 'yes' : 'no';
    if (name === 'above_dataset') return v == null ? '—' : `${v > 0 ? '+' : ''}${fmt(v)} σ`;
    if (name === 'convergence') return pct(v);
    return fmt(v);
  }
  function fmtSort(key, v) {
    return TRUST.includes(key) ? fmtTrust(key, v) : fmtStat(key, v);
  }
  // A connection's score with its sign written out (a minus sign, not only a colour).
  function fmtScore(v) {
    if (typeof v !== 'number' || !isFinite(v)) return '—';
    return (v < 0 ? '\u2212' : '+') + fmt(Math.abs(v));
  }
  function plural(n, one, many) {
    return `${n.toLocaleString()} ${n === 1 ? one : many || one + 's'}`;
  }

  // The URL of a layer directory. Segments are already percent-escaped names, so their
  // `%` is escaped once more: the server decodes once and finds the literal directory.
  function layerDir(seg) {
    return 'layers/' + encodeURIComponent(seg) + '/';
  }

  // A path from layer.json (relative to the layer directory), or null if it could point
  // anywhere else: absolute, with a scheme, or with `.`/`..`/empty segments.
  function inLayer(seg, rel) {
    if (typeof rel !== 'string' || rel === '' || /[\\?#]/.test(rel)) return null;
    const parts = rel.split('/');
    if (parts.some((p) => p === '' || p === '.' || p === '..')) return null;
    if (/^[a-z][a-z0-9+.-]*:/i.test(rel)) return null;
    return layerDir(seg) + parts.map(encodeURIComponent).join('/');
  }

  // A layer name's path segment (docs/atlas-format.md), for an atlas.json whose layer
  // lacks a usable `path`: bytes outside A-Z a-z 0-9 _ - . as %XX, a dots-only name all
  // %2E; empty or over 200 bytes: none.
  function segmentOf(name) {
    const bytes = new TextEncoder().encode(name);
    if (bytes.length === 0 || bytes.length > 200) return '';
    const dotsOnly = bytes.every((b) => b === 0x2e);
    let out = '';
    for (const b of bytes) {
      const c = String.fromCharCode(b);
      out += !dotsOnly && /[A-Za-z0-9_.-]/.test(c) ? c : '%' + b.toString(16).toUpperCase().padStart(2, '0');
    }
    return out;
  }

  // A unit's image where loupe writes it (diversity: its first image, `diversity-0`).
  function unitImage(seg, unit, technique) {
    const name = technique === 'diversity' ? 'diversity-0' : technique;
    return layerDir(seg) + `units/${unit}/${encodeURIComponent(name)}.png`;
  }

  // The per-unit techniques among `list`: channel, neuron, negative, diversity first, in
  // that order, then any others; the per-layer techniques left out.
  function orderTechniques(list) {
    const ts = [...new Set(list.filter((t) => typeof t === 'string' && t && !LAYER_TECHNIQUES.includes(t)))];
    return [...UNIT_TECHNIQUES.filter((t) => ts.includes(t)), ...ts.filter((t) => !UNIT_TECHNIQUES.includes(t))];
  }
  function unitTechniques(atlas) {
    return orderTechniques(atlas.techniques);
  }

  // A technique's entry (layer.json) or item, as URLs: `images` (every final image: one,
  // or diversity's N), `snapshots` ([{ step, images }] in step order), `dead`, and
  // `failed` (the reason, or null). Paths that leave the layer directory are dropped.
  function imagesOf(seg, entry) {
    if (!entry || typeof entry !== 'object') return { images: [], snapshots: [], dead: false, failed: null };
    if (typeof entry.failed === 'string') return { images: [], snapshots: [], dead: false, failed: entry.failed };
    const paths = Array.isArray(entry.images) && entry.images.length ? entry.images : [entry.image];
    const images = paths.map((p) => inLayer(seg, p)).filter(Boolean);
    const snapshots = (Array.isArray(entry.snapshots) ? entry.snapshots : [])
      .filter((s) => s && Number.isInteger(s.step) && Array.isArray(s.images))
      .map((s) => ({ step: s.step, images: s.images.map((p) => inLayer(seg, p)).filter(Boolean) }))
      .filter((s) => s.images.length)
      .sort((a, b) => a.step - b.step);
    return { images, snapshots, dead: entry.dead === true, failed: null };
  }

  // A unit record (`units/<unit>/<technique>.json`) in layer.json's terms: its file names
  // are beside it, so they become paths under the unit's directory.
  function recordAsEntry(unit, rec) {
    const beside = (name) => (typeof name === 'string' && !name.includes('/') ? `units/${unit}/${name}` : null);
    return {
      image: beside(rec.image),
      images: Array.isArray(rec.images) ? rec.images.map(beside) : [],
      snapshots: Array.isArray(rec.snapshots)
        ? rec.snapshots.map((s) => s && { step: s.step, images: Array.isArray(s.images) ? s.images.map(beside) : [] })
        : [],
      objective: rec.objective,
      dead: rec.dead === true,
      failed: typeof rec.failed === 'string' ? rec.failed : undefined,
    };
  }

  // Fetches JSON; null when the file is not there (yet). S3 website hosting answers 403
  // for a missing key of a bucket it may not list.
  async function getJSON(path) {
    let r;
    try {
      r = await fetch(path, { cache: 'no-cache' });
    } catch (e) {
      throw new Error(`${path}: ${e.message}`);
    }
    if (r.status === 404 || r.status === 403) return null;
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    try {
      return await r.json();
    } catch (e) {
      throw new Error(`${path}: not JSON (${e.message})`);
    }
  }

  // ---------------------------------------------------------------- routing

  function parseHash() {
    let s = location.hash.replace(/^#/, '');
    if (!s.startsWith('/')) s = '/' + s;
    const q = s.indexOf('?');
    const path = q < 0 ? s : s.slice(0, q);
    const params = new URLSearchParams(q < 0 ? '' : s.slice(q + 1));
    const parts = path.split('/').filter(Boolean);
    if (parts.length === 0) return { view: 'atlas', params };
    if (parts[0] === 'layer' && parts.length === 2) return { view: 'layer', seg: parts[1], params };
    if (parts[0] === 'layer' && parts.length === 4 && parts[2] === 'unit' && /^\d+$/.test(parts[3])) {
      return { view: 'unit', seg: parts[1], unit: parseInt(parts[3], 10), params };
    }
    return { view: 'unknown', params };
  }

  function query(params) {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) if (v != null && v !== '') p.set(k, v);
    const s = p.toString();
    return s ? '?' + s : '';
  }
  function atlasHref() {
    return '#/';
  }
  function layerHref(seg, params) {
    return `#/layer/${seg}${query(params)}`;
  }
  function unitHref(seg, unit, params) {
    return `#/layer/${seg}/unit/${unit}${query(params)}`;
  }
  // The layer view's own query (technique, sort, order), carried to and from unit pages.
  function layerParams(params) {
    return { technique: params.get('technique'), sort: params.get('sort'), order: params.get('order') };
  }

  // ---------------------------------------------------------------- data

  const cache = { atlas: null, atlasAt: 0, layers: new Map(), labels: null, labelsAt: 0 };

  async function loadAtlas() {
    if (cache.atlas && Date.now() - cache.atlasAt < FRESH_MS) return cache.atlas;
    const atlas = await getJSON('atlas.json');
    if (atlas) {
      if (!Array.isArray(atlas.layers)) atlas.layers = [];
      atlas.layers = atlas.layers.filter((l) => l && typeof l === 'object');
      for (const l of atlas.layers) {
        if (typeof l.path !== 'string' || !/^[A-Za-z0-9_.%-]+$/.test(l.path) || /^\.+$/.test(l.path)) l.path = segmentOf(String(l.name ?? ''));
      }
      atlas.layers = atlas.layers.filter((l) => l.path);
      if (!Array.isArray(atlas.techniques)) atlas.techniques = [];
      atlas.settings = atlas.settings || {};
      atlas.model = atlas.model || {};
      cache.atlas = atlas;
      cache.atlasAt = Date.now();
    }
    return atlas;
  }

  function findLayer(atlas, seg) {
    let info = atlas.layers.find((l) => l.path === seg);
    if (!info) {
      let name = null;
      try {
        name = decodeURIComponent(seg);
      } catch (e) {
        /* not an escaped name */
      }
      info = atlas.layers.find((l) => l.name === name || l.name === seg);
    }
    return info || null;
  }

  // A layer as far as it is written: layer.json when there is one, else examples.json for
  // the dataset statistics, else nothing (the images are then probed one by one).
  async function loadLayer(info) {
    const seg = info.path;
    const hit = cache.layers.get(seg);
    if (hit && Date.now() - hit.at < FRESH_MS) return hit.data;
    const dir = layerDir(seg);
    const json = await getJSON(dir + 'layer.json');
    const units = new Map(); // unit -> { techniques: {t: {image, objective, ...}}, dataset, trust }
    const items = new Map(); // per-layer technique -> [{ item, image, objective, snapshots }]
    let dataset = null;
    if (json && Array.isArray(json.units)) {
      for (const u of json.units) {
        if (!u || !Number.isInteger(u.unit)) continue;
        const trust = u.trust && typeof u.trust === 'object' ? u.trust : null;
        units.set(u.unit, { techniques: u.techniques || {}, dataset: u.dataset || null, trust });
      }
      dataset = json.dataset || null;
    }
    if (json && json.items && typeof json.items === 'object') {
      const order = [...LAYER_TECHNIQUES, ...Object.keys(json.items).filter((t) => !LAYER_TECHNIQUES.includes(t))];
      for (const t of order) {
        const shown = (it) => it && typeof it === 'object' && (typeof it.image === 'string' || typeof it.failed === 'string');
        const list = Array.isArray(json.items[t]) ? json.items[t].filter(shown) : [];
        if (list.length) items.set(t, list);
      }
    }
    const hasDataset = [...units.values()].some((u) => u.dataset);
    if (!hasDataset) {
      // The dataset pass writes examples.json before the job's end writes layer.json.
      const ex = await getJSON(dir + 'examples.json').catch(() => null);
      if (ex && Array.isArray(ex.units)) {
        dataset = {
          examples: 'examples.json',
          stats: ex.stats,
          receptive_field: ex.receptive_field,
          images: ex.dataset && ex.dataset.images,
          images_skipped: ex.dataset && ex.dataset.images_skipped,
        };
        for (const d of ex.units) {
          if (!d || !Number.isInteger(d.unit)) continue;
          const u = units.get(d.unit) || { techniques: {}, dataset: null, trust: null };
          u.dataset = d;
          units.set(d.unit, u);
        }
      }
    }
    const data = { info, json, units, items, dataset };
    data.hasStats = [...units.values()].some((u) => u.dataset && STATS.some((s) => typeof u.dataset[s] === 'number'));
    // The trust indicators some unit of the layer has: the grid can sort by those.
    data.trust = TRUST.filter((t) => [...units.values()].some((u) => u.trust && trustValue(u.trust[t]) != null));
    data.listed = [...units.values()].filter((u) => Object.keys(u.techniques).length > 0).length;
    cache.layers.set(seg, { data, at: Date.now() });
    return data;
  }

  // labels.json (researchers' labels, `loupe label`) as layer name -> unit -> text; empty
  // when there is none (a 404) or it cannot be read: labels never keep a page from showing.
  async function loadLabels() {
    if (cache.labels && Date.now() - cache.labelsAt < FRESH_MS) return cache.labels;
    const labels = new Map();
    let json = null;
    try {
      json = await getJSON('labels.json');
    } catch (e) {
      console.warn(`labels not shown: ${e.message}`);
    }
    const byLayer = json && json.labels && typeof json.labels === 'object' ? json.labels : {};
    for (const [layer, units] of Object.entries(byLayer)) {
      if (!units || typeof units !== 'object') continue;
      const m = new Map();
      for (const [unit, text] of Object.entries(units)) {
        if (/^\d+$/.test(unit) && typeof text === 'string' && text) m.set(parseInt(unit, 10), text);
      }
      if (m.size) labels.set(layer, m);
    }
    cache.labels = labels;
    cache.labelsAt = Date.now();
    return labels;
  }
  function labelOf(labels, info, unit) {
    const m = labels.get(info.name ?? info.path);
    return (m && m.get(unit)) || null;
  }

  function unitCount(info) {
    return Number.isInteger(info.units) && info.units >= 0 ? info.units : 0;
  }

  // ---------------------------------------------------------------- lazy images

  // Thumbnails get their src only when they come near the viewport, so a layer of 4,096
  // units asks for the few hundred on screen. `loading="lazy"` is set as well.
  let observer = null;
  function lazy(img, src) {
    img.setAttribute('loading', 'lazy');
    img.setAttribute('decoding', 'async');
    if (!('IntersectionObserver' in window)) {
      img.src = src;
      return img;
    }
    img.dataset.src = src;
    if (!observer) {
      observer = new IntersectionObserver(
        (entries) => {
          for (const e of entries) {
            if (!e.isIntersecting) continue;
            const el = e.target;
            observer.unobserve(el);
            if (el.dataset.src) {
              el.src = el.dataset.src;
              delete el.dataset.src;
            }
          }
        },
        { rootMargin: '600px 0px' }
      );
    }
    observer.observe(img);
    return img;
  }
  function resetLazy() {
    if (observer) observer.disconnect();
    observer = null;
  }

  // ---------------------------------------------------------------- page frame

  let renderToken = 0;

  function setCrumbs(items) {
    crumbs.replaceChildren(
      ...items
        .flatMap((it, i) => [
          i ? h('span', { class: 'sep', 'aria-hidden': 'true', text: '/' }) : null,
          it.href ? h('a', { href: it.href, text: it.text }) : h('span', { 'aria-current': 'page', text: it.text }),
        ])
        .filter(Boolean)
    );
  }

  function show(...nodes) {
    app.replaceChildren(...nodes.flat().filter(Boolean));
  }

  function message(title, text, extra) {
    return h('section', { class: 'message' }, h('h1', { text: title }), text ? h('p', { text }) : null, extra || null);
  }

  function noAtlas() {
    setCrumbs([]);
    document.title = 'loupe atlas';
    show(
      message(
        'No atlas here yet',
        'There is no atlas.json next to this page. A loupe job writes it when it starts; this page shows the atlas from then on.',
        h('p', {}, h('button', { type: 'button', onclick: () => route(true), text: 'Look again' }))
      )
    );
  }

  // ---------------------------------------------------------------- atlas page

  function completenessText(data, info) {
    const n = unitCount(info);
    if (!data.json) return { text: 'in progress', title: 'layer.json is written when the job ends', done: 0, n };
    const withImage = data.listed;
    return {
      text: withImage === n ? `${n.toLocaleString()} / ${n.toLocaleString()}` : `${withImage.toLocaleString()} / ${n.toLocaleString()}`,
      title: 'units with images / units',
      done: withImage,
      n,
    };
  }

  // atlas.json's settings.param in words. An atlas written before it existed was
  // rendered with lucid's FFT parameterisation (atlas-format.md).
  function paramText(p) {
    if (!p) return 'fft';
    const parts = [p.kind === 'pixel' ? 'pixel' : p.maco ? 'MACO' : 'fft'];
    if (p.maco) parts.push(p.magnitude ? 'own magnitude' : p.decay === 1 ? 'magnitude 1/f' : `magnitude 1/f^${p.decay}`);
    else if (p.kind !== 'pixel' && p.decay !== 1) parts.push(`decay ${p.decay}`);
    if (p.channels !== 3) parts.push(p.channels === 1 ? '1 channel' : `${p.channels} channels`);
    else if (!p.decorrelate) parts.push('colour not decorrelated');
    else if (p.color_matrix) parts.push('own colour matrix');
    return parts.join(', ');
  }

  // atlas.json's settings.transforms in words, in the order they are applied; an atlas
  // written before they were listed used lucid's standard set (atlas-format.md).
  function transformsText(t) {
    if (!t) return "lucid's standard set";
    const span = (v, unit) => (v.length === 1 ? `${v[0]}${unit}` : `${Math.min(...v)} to ${Math.max(...v)}${unit}`);
    const parts = [];
    if (t.crop) parts.push(`crop ${t.crop.start} to ${t.crop.end}`);
    if (t.pad) parts.push(`pad ${t.pad} px`);
    if (t.jitter) parts.push(`jitter ${t.jitter} px`);
    if (t.scales.length !== 1 || t.scales[0] !== 1) parts.push(`scale ${span(t.scales, '')}`);
    if (t.angles.length !== 1 || t.angles[0] !== 0) parts.push(`rotate ${span(t.angles, '°')}`);
    if (t.jitter_after) parts.push(`jitter ${t.jitter_after} px`);
    if (t.noise) parts.push(`noise ${t.noise}`);
    return parts.join(', ') || 'none';
  }

  async function renderAtlas(token) {
    const atlas = await loadAtlas();
    if (token !== renderToken) return;
    if (!atlas) return noAtlas();
    const model = atlas.model;
    const s = atlas.settings;
    setCrumbs([]);
    document.title = `${model.name || 'model'} · loupe atlas`;

    const sha = typeof model.sha256 === 'string' ? model.sha256 : '';
    const head = h(
      'header',
      { class: 'page-head' },
      h('h1', { text: model.name || 'unnamed model' }),
      h(
        'p',
        { class: 'meta' },
        sha ? h('span', { class: 'sha', title: `sha256 ${sha}` }, 'sha256 ', h('code', { text: sha.slice(0, 12) })) : null,
        atlas.loupe_version ? h('span', { text: `loupe ${atlas.loupe_version}` }) : null,
        atlas.created ? h('span', { text: `created ${atlas.created}` }) : null,
        h('span', { text: `format ${atlas.format_version ?? '?'}` })
      )
    );

    const fact = (k, v, attrs) => h('div', attrs || {}, h('dt', { text: k }), h('dd', { text: v == null ? '—' : String(v) }));
    const settings = h(
      'section',
      { class: 'panel' },
      h('h2', { text: 'Render settings' }),
      h(
        'dl',
        { class: 'facts' },
        fact('steps', s.steps),
        fact('image size', s.size != null ? `${s.size} px` : null),
        fact('input size', s.input_size != null ? `${s.input_size} px` : null),
        fact('seed', s.seed),
        fact('learning rate', s.learning_rate),
        fact('precision', s.precision || 'fp32'),
        fact('parameterisation', paramText(s.param), { class: 'wide2', id: 'param' }),
        fact('transforms', transformsText(s.transforms), { class: 'wide', id: 'transforms' }),
        fact('techniques', atlas.techniques.join(', ') || null, { class: 'wide2' })
      )
    );

    let datasetBox = null;
    if (atlas.dataset) {
      const d = atlas.dataset;
      datasetBox = h(
        'section',
        { class: 'panel' },
        h('h2', { text: 'Dataset' }),
        h(
          'dl',
          { class: 'facts' },
          fact('images', d.images != null ? Number(d.images).toLocaleString() : null),
          fact('skipped', d.images_skipped, { title: 'images that could not be decoded' }),
          fact('examples', d.examples != null ? `${d.examples} top, ${d.examples} bottom` : null),
          d.uri != null ? h('div', { class: 'wide' }, h('dt', { text: 'source' }), h('dd', {}, h('code', { text: String(d.uri) }))) : null
        )
      );
    }

    const total = atlas.layers.reduce((a, l) => a + unitCount(l), 0);
    const overall = h('span', { class: 'muted', id: 'completeness', text: '' });

    // The previews show the first per-unit technique; none for an atlas of per-layer
    // techniques only.
    const unitTechs = unitTechniques(atlas);
    const technique = unitTechs[0] || (atlas.techniques.length ? null : 'channel');
    const rows = atlas.layers.map((info) => {
      const seg = info.path;
      const n = unitCount(info);
      const status = h('span', { class: 'status', text: '…' });
      const bar = h('span', { class: 'bar' }, h('span', { class: 'fill' }));
      const previews = h(
        'div',
        { class: 'preview' },
        Array.from({ length: technique ? Math.min(n, PREVIEW_UNITS) : 0 }, (_, u) =>
          h(
            'a',
            { href: unitHref(seg, u), title: `unit ${u}`, tabindex: '-1' },
            lazy(
              h('img', {
                alt: '',
                width: 64,
                height: 64,
                onerror: (e) => e.target.parentNode.classList.add('missing'),
              }),
              unitImage(seg, u, technique)
            )
          )
        )
      );
      const shape = Array.isArray(info.shape) ? info.shape.join(' × ') : '';
      const row = h(
        'li',
        { class: 'layer', data: { layer: seg } },
        h(
          'div',
          { class: 'layer-head' },
          h('a', { class: 'layer-name', href: layerHref(seg), text: info.name ?? seg }),
          h('span', { class: 'muted', text: plural(n, 'unit') }),
          shape ? h('span', { class: 'muted shape', text: shape }) : null,
          h('span', { class: 'grow' }),
          bar,
          status
        ),
        previews
      );
      return { info, row, status, bar };
    });

    show(
      head,
      h('div', { class: 'panels' }, settings, datasetBox),
      h(
        'section',
        { class: 'layers' },
        h('div', { class: 'section-head' }, h('h2', { text: `${plural(atlas.layers.length, 'layer')} · ${plural(total, 'unit')}` }), overall),
        h('ol', { class: 'layer-list' }, rows.map((r) => r.row))
      )
    );

    // Completeness per layer, filled in as each layer.json arrives.
    let done = 0;
    let known = 0;
    await Promise.all(
      rows.map(async (r) => {
        let data;
        try {
          data = await loadLayer(r.info);
        } catch (e) {
          r.status.textContent = 'unreadable';
          r.status.title = e.message;
          return;
        }
        if (token !== renderToken) return;
        const c = completenessText(data, r.info);
        r.status.textContent = c.text;
        r.status.title = c.title;
        r.bar.firstChild.style.width = c.n ? `${(100 * c.done) / c.n}%` : '0';
        if (!data.json) r.row.classList.add('partial');
        if (data.json) known += c.n;
        done += c.done;
        const nItems = [...data.items.values()].reduce((a, l) => a + l.length, 0);
        if (nItems && !r.row.querySelector('.items-count')) {
          r.row.querySelector('.layer-head .grow')?.before(
            h('span', { class: 'muted items-count', title: [...data.items.keys()].join(', '), text: plural(nItems, 'layer image') })
          );
        }
        if (data.dataset && data.dataset.receptive_field && !r.row.querySelector('.rf')) {
          r.row.querySelector('.layer-head .shape')?.after(
            h('span', { class: 'muted rf', title: 'receptive field (input pixels)', text: `rf ${data.dataset.receptive_field} px` })
          );
        }
      })
    );
    if (token !== renderToken) return;
    overall.textContent =
      known === total
        ? done === total
          ? 'complete'
          : `${done.toLocaleString()} of ${total.toLocaleString()} units have images`
        : `in progress: ${done.toLocaleString()} of ${total.toLocaleString()} units listed so far`;
    overall.title = 'units with at least one image, as the layers\' layer.json list them';
  }

  // ---------------------------------------------------------------- snapshots, items

  function eager(img, src) {
    img.src = src;
    return img;
  }

  // The images kept during the optimisation (the job's thresholds), oldest first, each
  // with its step: a strip shown before the final image. An empty one keeps the final
  // images of a row level when only some techniques have snapshots.
  function snapshotStrip(snapshots, alt, load) {
    if (!snapshots.length) return h('div', { class: 'snapshots none', 'aria-hidden': 'true' });
    return h(
      'ol',
      { class: 'snapshots', 'aria-label': 'during the optimisation' },
      snapshots.map((s) =>
        h(
          'li',
          { class: 'snapshot', data: { step: String(s.step) } },
          h(
            'span',
            { class: 'snap-imgs' },
            s.images.map((src, i) => {
              const img = h('img', { alt: `${alt}, step ${s.step}${s.images.length > 1 ? ` (${i + 1})` : ''}`, width: 64, height: 64 });
              img.addEventListener('error', () => img.replaceWith(h('span', { class: 'placeholder', title: 'not there' })), { once: true });
              return load(img, src);
            })
          ),
          h('span', { class: 'step', text: `step ${s.step}` })
        )
      )
    );
  }

  // A layer's per-layer techniques (DeepDream, caricatures, directions): a section each,
  // every item with its name, objective and snapshots.
  function itemSections(seg, data, layerName) {
    return [...data.items].map(([t, list]) =>
      h(
        'section',
        { class: 'items', data: { technique: t } },
        h('h2', { text: ITEM_HEADING[t] || t }),
        h(
          'ol',
          { class: 'item-row' },
          list.map((it) => {
            const name = typeof it.item === 'string' ? it.item : '';
            const { images, snapshots, failed } = imagesOf(seg, it);
            const card = h('li', { class: 'item', data: { item: name } });
            const frame = h('div', { class: 'final' });
            if (failed) {
              card.classList.add('failed');
              frame.append(h('span', { class: 'placeholder', title: failedNote(failed), text: 'failed' }));
            } else if (images.length) {
              const img = h('img', { alt: `${layerName}, ${t} ${name}`, width: 256, height: 256 });
              img.addEventListener(
                'error',
                () => {
                  card.classList.add('missing');
                  img.replaceWith(h('span', { class: 'placeholder', text: 'not there' }));
                },
                { once: true }
              );
              frame.append(lazy(img, images[0]));
            } else {
              card.classList.add('missing');
              frame.append(h('span', { class: 'placeholder', text: '—' }));
            }
            card.append(
              snapshotStrip(snapshots, `${layerName}, ${t} ${name}`, lazy),
              frame,
              h(
                'div',
                { class: 'caption' },
                h('span', { class: 'iname', title: name, text: name }),
                h('span', { class: 'objective', title: 'the objective on the final image', text: typeof it.objective === 'number' ? `objective ${fmt(it.objective)}` : '' })
              ),
              failed ? h('p', { class: 'failed-note', role: 'note', text: failedNote(failed) }) : null
            );
            return card;
          })
        )
      )
    );
  }

  // ---------------------------------------------------------------- layer page

  function stat(data, unit, name) {
    const u = data.units.get(unit);
    const v = u && u.dataset ? u.dataset[name] : null;
    return typeof v === 'number' && isFinite(v) ? v : null;
  }

  // A trust indicator's value, or null when it is not a finite number or a boolean.
  function trustValue(v) {
    return typeof v === 'boolean' || (typeof v === 'number' && isFinite(v)) ? v : null;
  }
  function trustOf(data, unit, name) {
    const u = data.units.get(unit);
    return u && u.trust ? trustValue(u.trust[name]) : null;
  }
  // The value a grid sorted by `key` orders by and shows: a statistic or a trust indicator.
  function sortValue(data, unit, key) {
    return TRUST.includes(key) ? trustOf(data, unit, key) : stat(data, unit, key);
  }

  function sortedUnits(data, n, sort, asc) {
    const units = Array.from({ length: n }, (_, u) => u);
    if (!STATS.includes(sort) && !TRUST.includes(sort)) return asc === false ? units.reverse() : units;
    return units.sort((a, b) => {
      const va = sortValue(data, a, sort);
      const vb = sortValue(data, b, sort);
      if (va == null && vb == null) return a - b;
      if (va == null) return 1; // units without the value last either way
      if (vb == null) return -1;
      return (asc ? va - vb : vb - va) || a - b;
    });
  }

  function techniqueOf(atlas, params) {
    const techs = unitTechniques(atlas);
    const t = params.get('technique');
    if (t && techs.includes(t)) return t;
    return techs[0] || 'channel';
  }

  function markMissing(card, unit) {
    if (card.classList.contains('missing')) return;
    card.classList.add('missing');
    const img = card.querySelector('img');
    const ph = h('span', { class: 'placeholder', title: `unit ${unit}: no image yet`, text: String(unit) });
    if (img) img.replaceWith(ph);
    const label = card.querySelector('.label');
    if (label) label.append(h('span', { class: 'tag', text: 'missing' }));
  }

  // The atlas, the route's layer and its index, or null once a message stands in for
  // the page (no atlas, no such layer, an unreadable layer, or a newer route).
  async function openLayer(route_, token) {
    const atlas = await loadAtlas();
    if (token !== renderToken) return null;
    if (!atlas) {
      noAtlas();
      return null;
    }
    const info = findLayer(atlas, route_.seg);
    if (!info) {
      setCrumbs([{ text: atlas.model.name || 'atlas', href: atlasHref() }]);
      show(message('No such layer', `This atlas has no layer “${route_.seg}”.`, h('p', {}, h('a', { href: atlasHref(), text: 'All layers' }))));
      return null;
    }
    let data;
    try {
      data = await loadLayer(info);
    } catch (e) {
      if (token === renderToken) show(message('Could not read the layer', e.message));
      return null;
    }
    if (token !== renderToken) return null;
    return { atlas, info, seg: info.path, data };
  }

  // What a layer rendered with settings of its own (atlas.json's layers[].settings: steps,
  // param, transforms) does differently from the atlas, in the atlas page's words:
  // "steps 100; parameterisation MACO, magnitude 1/f". Semicolons part the settings,
  // since their words hold commas.
  function ownSettings(own, atlasSettings) {
    const words = (k, v) => {
      if (k === 'param') return `parameterisation ${paramText(v)}`;
      if (k === 'transforms') return `transforms ${transformsText(v)}`;
      return `${k} ${v}`;
    };
    return Object.keys(own)
      .filter((k) => JSON.stringify(own[k]) !== JSON.stringify(atlasSettings[k]))
      .map((k) => words(k, own[k]))
      .join('; ');
  }

  async function renderLayer(route_, token) {
    const [opened, labels] = await Promise.all([openLayer(route_, token), loadLabels()]);
    if (!opened || token !== renderToken) return;
    const { atlas, info, seg, data } = opened;

    const params = route_.params;
    const unitTechs = unitTechniques(atlas);
    // An atlas of per-layer techniques only has no unit images to show.
    const noUnitImages = unitTechs.length === 0 && atlas.techniques.length > 0;
    const technique = techniqueOf(atlas, params);
    const sortKeys = [...(data.hasStats ? STATS : []), ...data.trust];
    const sort = sortKeys.includes(params.get('sort')) ? params.get('sort') : 'unit';
    const asc = params.get('order') === 'asc' ? true : params.get('order') === 'desc' ? false : sort === 'unit';
    const keep = { technique: params.get('technique'), sort: sort === 'unit' ? null : sort, order: params.get('order') };
    const n = unitCount(info);

    setCrumbs([{ text: atlas.model.name || 'atlas', href: atlasHref() }, { text: info.name ?? seg }]);
    document.title = `${info.name ?? seg} · ${atlas.model.name || 'loupe atlas'}`;

    // Toolbar: technique, sort, jump.
    const techniques = noUnitImages ? null : h(
      'div',
      { class: 'segmented', role: 'group', 'aria-label': 'Technique' },
      unitTechs.map((t) =>
        h('a', { href: layerHref(seg, { ...keep, technique: t }), class: t === technique ? 'on' : null, 'aria-current': t === technique ? 'true' : null, text: t })
      )
    );
    let sorter = null;
    if (sortKeys.length) {
      const option = (s) => h('option', { value: s, selected: s === sort, text: SORT_LABEL[s] });
      const select = h(
        'select',
        {
          id: 'sort',
          'aria-label': 'Sort units by',
          onchange: (e) => {
            location.hash = layerHref(seg, { ...keep, sort: e.target.value === 'unit' ? null : e.target.value, order: null });
          },
        },
        option('unit'),
        data.hasStats ? h('optgroup', { label: 'on the dataset' }, STATS.map(option)) : null,
        data.trust.length ? h('optgroup', { label: 'trust' }, data.trust.map(option)) : null
      );
      const flip = h('a', {
        class: 'order',
        href: layerHref(seg, { ...keep, order: asc ? 'desc' : 'asc' }),
        title: asc ? 'lowest first (click for highest first)' : 'highest first (click for lowest first)',
        text: asc ? '↑ low first' : '↓ high first',
      });
      sorter = h('label', { class: 'field' }, h('span', { text: 'sort' }), select, sort === 'unit' ? null : flip);
    }
    const jumpInput = h('input', {
      id: 'jump',
      type: 'number',
      inputmode: 'numeric',
      min: 0,
      max: Math.max(0, n - 1),
      placeholder: `0–${Math.max(0, n - 1)}`,
      'aria-label': 'Jump to unit',
    });
    const jump = h(
      'form',
      {
        class: 'field jump',
        onsubmit: (e) => {
          e.preventDefault();
          const u = parseInt(jumpInput.value, 10);
          if (Number.isInteger(u) && u >= 0 && u < n) {
            location.hash = unitHref(seg, u, keep);
          } else {
            jumpInput.setCustomValidity(`a unit from 0 to ${n - 1}`);
            jumpInput.reportValidity();
          }
        },
      },
      h('label', { for: 'jump', text: 'unit' }),
      jumpInput,
      h('button', { type: 'submit', text: 'Go' })
    );
    jumpInput.addEventListener('input', () => jumpInput.setCustomValidity(''));

    const shape = Array.isArray(info.shape) ? info.shape.join(' × ') : '';
    const notes = [];
    if (!data.json) notes.push('This layer is still being written (no layer.json yet): showing the images there are so far.');
    else if (data.listed < n) notes.push(`layer.json lists ${data.listed} of ${n} units; the others are looked for one by one.`);
    const ds = data.dataset;
    const head = h(
      'header',
      { class: 'page-head' },
      h('h1', { text: info.name ?? seg }),
      h(
        'p',
        { class: 'meta' },
        h('span', { text: plural(n, 'unit') }),
        shape ? h('span', { text: `activation ${shape}` }) : null,
        ds && ds.receptive_field ? h('span', { text: `receptive field ${ds.receptive_field} px` }) : null,
        ds && ds.images != null ? h('span', { text: `${Number(ds.images).toLocaleString()} dataset images` }) : null,
        info.settings ? h('span', { class: 'own-settings', text: `own settings: ${ownSettings(info.settings, atlas.settings)}` }) : null
      ),
      notes.map((t) => h('p', { class: 'notice', text: t }))
    );
    const toolbar = h('div', { class: 'toolbar' }, techniques, sorter, h('span', { class: 'grow' }), jump);

    const order = sortedUnits(data, n, sort, asc);
    const grid = h('ol', { class: 'grid', id: 'grid', 'aria-label': `units of ${info.name ?? seg}` });
    const frag = document.createDocumentFragment();
    for (const u of order) {
      const entry = data.units.get(u);
      const listed = entry && entry.techniques[technique];
      const failed = listed && typeof listed.failed === 'string' ? listed.failed : null;
      const src = (listed && inLayer(seg, listed.image)) || unitImage(seg, u, technique);
      const card = h('li', { class: 'unit', data: { unit: String(u) } });
      let img = h('img', { alt: '', width: 128, height: 128 });
      if (failed) {
        card.classList.add('failed');
        img = h('span', { class: 'placeholder', text: String(u) });
      } else {
        img.addEventListener('error', () => markMissing(card, u), { once: true });
        lazy(img, src);
      }
      const label = h('span', { class: 'label' }, h('span', { class: 'num', text: String(u) }));
      if (failed) label.append(h('span', { class: 'tag failed', title: failedNote(failed), text: 'failed' }));
      if (sort !== 'unit') label.append(h('span', { class: 'val', title: SORT_LABEL[sort], text: fmtSort(sort, sortValue(data, u, sort)) }));
      if (listed && listed.dead === true) label.append(h('span', { class: 'tag dead', title: DEAD_NOTE, text: 'dead' }));
      const text = labelOf(labels, info, u);
      const labelled = text ? h('span', { class: 'ulabel', title: text, text }) : null;
      const title = text ? `unit ${u}: ${text}` : `unit ${u}`;
      card.append(h('a', { href: unitHref(seg, u, keep), title, 'aria-label': title }, img, label, labelled));
      frag.append(card);
    }
    grid.append(frag);

    const items = itemSections(seg, data, info.name ?? seg);
    const unitsHead = items.length ? h('h2', { class: 'units-head', text: plural(n, 'unit') }) : null;
    const itemBox = items.length ? h('div', { class: 'layer-items', id: 'items' }, items) : null;
    show(head, itemBox, unitsHead, toolbar, noUnitImages ? null : grid);
  }

  // ---------------------------------------------------------------- unit page

  function ordinal(n) {
    const s = ['th', 'st', 'nd', 'rd'];
    const v = n % 100;
    return n + (s[(v - 20) % 10] || s[v] || s[0]);
  }

  // The receptive-field square of an example on the whole image, as fractions of its
  // side: the same box loupe cropped (dataset::crop_box), for feature maps [C, H, W].
  function cropBox(atlas, info, rf, ex) {
    const size = atlas.settings.input_size;
    if (!Array.isArray(info.shape) || info.shape.length !== 3 || !size || !rf || rf >= size) return null;
    if (!Number.isInteger(ex.y) || !Number.isInteger(ex.x)) return null;
    const [, hh, ww] = info.shape;
    const side = Math.min(rf, size);
    const start = (pos, len) => {
      const c = ((pos + 0.5) * size) / Math.max(1, len);
      return Math.min(Math.max(Math.round(c - side / 2), 0), size - side);
    };
    return { top: start(ex.y, hh) / size, left: start(ex.x, ww) / size, side: side / size };
  }

  function exampleFigure(atlas, info, seg, rf, ex, kind, rank) {
    const crop = inLayer(seg, ex.crop);
    const whole = inLayer(seg, ex.image);
    const fullImg = h('img', { class: 'whole', alt: '' });
    const box = cropBox(atlas, info, rf, ex);
    const frame = h(
      'button',
      {
        type: 'button',
        class: 'example-img',
        title: whole ? 'hover or tap: the whole image' : null,
        'aria-pressed': 'false',
        onclick: (e) => {
          const on = frame.classList.toggle('show-whole');
          frame.setAttribute('aria-pressed', String(on));
          loadWhole();
          e.preventDefault();
        },
        onmouseenter: () => loadWhole(),
        onfocus: () => loadWhole(),
      },
      crop ? h('img', { class: 'crop', src: crop, alt: `${kind} ${rank + 1}: ${ex.id}`, loading: 'lazy', width: 128, height: 128 }) : h('span', { class: 'placeholder', text: '—' }),
      whole ? fullImg : null,
      whole && box
        ? h('span', {
            class: 'rf-box',
            style: `top:${(box.top * 100).toFixed(2)}%;left:${(box.left * 100).toFixed(2)}%;width:${(box.side * 100).toFixed(2)}%;height:${(box.side * 100).toFixed(2)}%`,
          })
        : null
    );
    function loadWhole() {
      if (whole && !fullImg.getAttribute('src')) fullImg.src = whole;
    }
    if (!whole) frame.disabled = true;
    const pos = Number.isInteger(ex.y) && Number.isInteger(ex.x) ? `at (${ex.y}, ${ex.x})` : '';
    return h(
      'figure',
      { class: `example ${kind}` },
      frame,
      h(
        'figcaption',
        {},
        h('span', { class: 'val', text: fmt(ex.value) }),
        h('span', { class: 'id', title: `${ex.id} ${pos}`.trim(), text: String(ex.id ?? '') })
      )
    );
  }

  function rankOf(data, n, unit, name) {
    const mine = stat(data, unit, name);
    if (mine == null) return null;
    let higher = 0;
    let counted = 0;
    for (let u = 0; u < n; u++) {
      const v = stat(data, u, name);
      if (v == null) continue;
      counted++;
      if (v > mine || (v === mine && u < unit)) higher++;
    }
    return { rank: higher + 1, of: counted };
  }

  async function renderUnit(route_, token) {
    const [opened, labels] = await Promise.all([openLayer(route_, token), loadLabels()]);
    if (!opened || token !== renderToken) return;
    const { atlas, info, seg, data } = opened;
    const n = unitCount(info);
    const unit = route_.unit;
    const keep = layerParams(route_.params);
    const name = info.name ?? seg;
    setCrumbs([{ text: atlas.model.name || 'atlas', href: atlasHref() }, { text: name, href: layerHref(seg, keep) }, { text: `unit ${unit}` }]);
    document.title = `${name} unit ${unit} · ${atlas.model.name || 'loupe atlas'}`;

    if (unit >= n) {
      return show(message(`No unit ${unit}`, `${name} has units 0 to ${n - 1}.`, h('p', {}, h('a', { href: layerHref(seg, keep), text: `Back to ${name}` }))));
    }

    const entry = data.units.get(unit) || { techniques: {}, dataset: null, trust: null };
    const label = labelOf(labels, info, unit);
    const prev = unit > 0 ? unitHref(seg, unit - 1, keep) : null;
    const next = unit < n - 1 ? unitHref(seg, unit + 1, keep) : null;
    const nav = h(
      'nav',
      { class: 'unit-nav', 'aria-label': 'Units' },
      prev ? h('a', { href: prev, rel: 'prev', id: 'prev', title: 'previous unit (←)', text: `← ${unit - 1}` }) : h('span', { class: 'disabled', text: '←' }),
      h('a', { href: layerHref(seg, keep), id: 'back', text: `all ${n} units` }),
      next ? h('a', { href: next, rel: 'next', id: 'next', title: 'next unit (→)', text: `${unit + 1} →` }) : h('span', { class: 'disabled', text: '→' })
    );
    const head = h(
      'header',
      { class: 'page-head unit-head' },
      h('div', {}, h('h1', { text: `${name} · unit ${unit}` }), label ? h('p', { class: 'unit-label', title: 'its label (loupe label)', text: label }) : null),
      nav
    );

    // Every per-unit technique of the atlas (and any other the layer lists for the unit),
    // in the order channel, neuron, negative, diversity.
    const techs = orderTechniques([...atlas.techniques, ...Object.keys(entry.techniques)]);
    const size = atlas.settings.size || 256;
    // The images, then how far to trust them.
    const main = h('div', { class: 'main' });
    const figures = techs.map((t) => {
      const listed = entry.techniques[t];
      const fig = h('figure', { class: 'technique', data: { technique: t } });
      const objective = h('span', {
        class: 'objective',
        title: t === 'diversity' ? 'the mean of its images’ objectives' : 'the objective on the final image',
        text: listed && typeof listed.objective === 'number' ? `objective ${fmt(listed.objective)}` : '',
      });
      // Snapshots, the final image (diversity: its N side by side), the caption and, for
      // a dead unit, a note saying so.
      const draw = (e) => {
        const { images, snapshots, dead, failed } = imagesOf(seg, e);
        if (failed) {
          fig.classList.add('failed');
          return fig.replaceChildren(
            h('div', { class: 'final' }, h('span', { class: 'placeholder', text: 'failed' })),
            h('figcaption', {}, h('span', { class: 'tname', text: t }), objective),
            h('p', { class: 'failed-note', role: 'note', text: failedNote(failed) })
          );
        }
        if (!images.length) images.push(unitImage(seg, unit, t));
        const group = images.length > 1 || t === 'diversity';
        fig.classList.toggle('group', group);
        fig.classList.toggle('dead', dead);
        fig.classList.remove('missing');
        const alt = `${name} unit ${unit}, ${t}`;
        const final = h(
          'div',
          { class: 'final', style: group ? `--n:${images.length}` : null },
          images.map((src, i) => {
            const img = h('img', { src, alt: group ? `${alt} ${i + 1} of ${images.length}` : alt, width: size, height: size });
            img.addEventListener(
              'error',
              () => {
                if (i === 0) fig.classList.add('missing');
                img.replaceWith(h('span', { class: 'placeholder', text: 'not rendered yet' }));
              },
              { once: true }
            );
            return img;
          })
        );
        fig.replaceChildren(
          snapshotStrip(snapshots, alt, eager),
          final,
          h(
            'figcaption',
            {},
            h('span', { class: 'tname', text: t }),
            group ? h('span', { class: 'count', text: plural(images.length, 'image') }) : null,
            objective
          ),
          ...(dead ? [h('p', { class: 'dead-note', role: 'note', text: DEAD_NOTE })] : [])
        );
      };
      draw(listed);
      if (!listed || (typeof listed.objective !== 'number' && typeof listed.failed !== 'string')) {
        // Not in layer.json (yet): the unit record has the objective, and the images
        // beyond the first, the snapshots and `dead`.
        getJSON(layerDir(seg) + `units/${unit}/${encodeURIComponent(t)}.json`)
          .then((rec) => {
            if (!rec || typeof rec !== 'object' || token !== renderToken) return;
            if (typeof rec.objective === 'number') objective.textContent = `objective ${fmt(rec.objective)}`;
            const more =
              (Array.isArray(rec.images) && rec.images.length > 1) || (Array.isArray(rec.snapshots) && rec.snapshots.length) || rec.dead === true || typeof rec.failed === 'string';
            if (!listed && more) draw(recordAsEntry(unit, rec));
            // A layer without layer.json yet: the channel curve comes from the record.
            if (t === 'channel' && !main.querySelector('#curve')) {
              const curve = curvePanel(rec);
              if (curve) {
                main.querySelector('#trust')?.remove();
                main.append(trustPanel(entry.trust, curve));
              }
            }
          })
          .catch(() => {});
      }
      return fig;
    });
    const images = h('section', { class: 'techniques' }, figures);

    const d = entry.dataset;
    let statsPanel = null;
    const below = [];
    if (d) {
      const rows = STATS.map((s) => {
        const r = rankOf(data, n, unit, s);
        return h(
          'div',
          {},
          h('dt', { text: SORT_LABEL[s] }),
          h(
            'dd',
            {},
            h('span', { class: 'v', text: fmtStat(s, typeof d[s] === 'number' ? d[s] : null) }),
            r ? h('span', { class: 'rank', title: `among the ${r.of} units of the layer`, text: `${ordinal(r.rank)} highest of ${r.of}` }) : null
          )
        );
      });
      const ds = data.dataset || {};
      statsPanel = h(
        'section',
        { class: 'panel stats' },
        h('h2', { text: 'Activations on the dataset' }),
        h('dl', { class: 'facts' }, rows),
        ds.images != null ? h('p', { class: 'muted small', text: `over ${Number(ds.images).toLocaleString()} images, every position` }) : null
      );
      const rf = ds.receptive_field;
      const list = (kind, title, items) =>
        Array.isArray(items) && items.length
          ? h(
              'section',
              { class: `examples ${kind}`, data: { kind } },
              h('h2', { text: title }),
              h('div', { class: 'example-row' }, items.map((ex, i) => exampleFigure(atlas, info, seg, rf, ex || {}, kind, i)))
            )
          : null;
      const top = list('top', 'Top dataset examples', d.top);
      const bottom = list('bottom', 'Bottom dataset examples', d.bottom);
      if (top || bottom) {
        below.push(
          h('div', { class: 'example-groups' }, top, bottom),
          h(
            'p',
            { class: 'muted explain' },
            rf ? `Each crop is the ${rf} px receptive field around where the unit responds most on that image. ` : '',
            'Hover or tap a crop for the whole image. Values are the unit’s maximum over the image.'
          )
        );
      }
    } else if (data.dataset || atlas.dataset) {
      statsPanel = h('section', { class: 'panel stats' }, h('p', { class: 'muted', text: 'No dataset statistics for this unit yet.' }));
    }
    const curve = curvePanel(entry.techniques.channel);
    const trust = trustPanel(entry.trust, curve);
    const connections = connectionsSection(atlas, labels, entry.dataset, token);
    main.append(...[images, trust].filter(Boolean));
    show(head, h('div', { class: 'unit-body' }, main, statsPanel), connections, below);
  }

  // ---------------------------------------------------------------- unit page: trust, connections

  // The trust indicators the unit has, each with how to read it, and the channel
  // objective's curve; null when there is neither.
  function trustPanel(trust, curve) {
    const known = TRUST.filter((t) => trust && trustValue(trust[t]) != null);
    if (!known.length && !curve) return null;
    const rows = known.map((t) => {
      const v = trust[t];
      return h(
        'div',
        { class: v === true ? 'warn' : null, data: { trust: t } },
        h('dt', { text: SORT_LABEL[t] }),
        h('dd', {}, h('span', { class: 'v', text: fmtTrust(t, v) }), h('p', { class: 'how', text: TRUST_HOW[t] }))
      );
    });
    return h(
      'section',
      { class: 'panel trust', id: 'trust' },
      h('h2', { text: 'How far to trust the images' }),
      h('div', { class: 'trust-body' }, known.length ? h('dl', { class: 'trust-list' }, rows) : null, curve)
    );
  }

  // The channel objective after each step the curve has (docs/atlas-format.md): a small
  // chart (log steps, since they double) and the same numbers as a list.
  function curvePanel(channel) {
    const points = (channel && Array.isArray(channel.curve) ? channel.curve : [])
      .filter((p) => p && Number.isInteger(p.step) && p.step > 0 && typeof p.objective === 'number' && isFinite(p.objective))
      .sort((a, b) => a.step - b.step);
    if (!points.length) return null;
    const W = 240;
    const H = 64;
    const pad = 4;
    const xs = points.map((p) => Math.log2(p.step));
    const ys = points.map((p) => p.objective);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    const px = (x) => pad + (x1 > x0 ? ((x - x0) / (x1 - x0)) * (W - 2 * pad) : (W - 2 * pad) / 2);
    const py = (y) => H - pad - (y1 > y0 ? ((y - y0) / (y1 - y0)) * (H - 2 * pad) : (H - 2 * pad) / 2);
    const svgNS = 'http://www.w3.org/2000/svg';
    const svg = (tag, attrs, ...kids) => {
      const el = document.createElementNS(svgNS, tag);
      for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
      el.append(...kids);
      return el;
    };
    const coords = points.map((p, i) => `${px(xs[i]).toFixed(1)},${py(ys[i]).toFixed(1)}`);
    const chart = svg(
      'svg',
      { class: 'curve-chart', viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': 'the channel objective by step' },
      svg('polyline', { points: coords.join(' '), fill: 'none' }),
      ...points.map((p, i) => svg('circle', { cx: px(xs[i]).toFixed(1), cy: py(ys[i]).toFixed(1), r: 2.5 }, svg('title', {}, `step ${p.step}: ${fmt(p.objective)}`)))
    );
    return h(
      'div',
      { class: 'curve', id: 'curve' },
      h('h3', { text: 'Channel objective by step' }),
      chart,
      h(
        'ol',
        { class: 'curve-points' },
        points.map((p) => h('li', { data: { step: String(p.step) } }, h('span', { class: 'step', text: `step ${p.step}` }), h('span', { class: 'v', text: fmt(p.objective) })))
      )
    );
  }

  // A unit's image for a link to it: its channel image if its layer rendered channel for
  // it, else its first technique's (layer.json); for a layer still without layer.json, the
  // atlas's first per-unit technique, where loupe writes it.
  function thumbnailOf(atlas, seg, data, unit) {
    const entry = data && data.units.get(unit);
    if (entry && Object.keys(entry.techniques).length) {
      for (const t of orderTechniques(Object.keys(entry.techniques))) {
        const { images } = imagesOf(seg, entry.techniques[t]);
        if (images.length) return images[0];
      }
      return null;
    }
    if (data && data.json) return null; // layer.json lists no image of it
    const techs = unitTechniques(atlas);
    return unitImage(seg, unit, techs.includes('channel') ? 'channel' : techs[0] || 'channel');
  }

  // The unit's strongest inputs (from the previous layer of the job) and outputs (to the
  // next one), each a link to that unit with its image and signed score.
  function connectionsSection(atlas, labels, dataset, token) {
    const lists = { inputs: dataset && dataset.inputs, outputs: dataset && dataset.outputs };
    const shown = (l) => Array.isArray(l) && l.some((c) => c && typeof c.layer === 'string' && Number.isInteger(c.unit));
    if (!shown(lists.inputs) && !shown(lists.outputs)) return null;
    const part = (kind, title, none) => {
      const list = Array.isArray(lists[kind]) ? lists[kind].filter((c) => c && typeof c.layer === 'string' && Number.isInteger(c.unit)) : [];
      const most = Math.max(0, ...list.map((c) => (typeof c.score === 'number' && isFinite(c.score) ? Math.abs(c.score) : 0)));
      return h(
        'section',
        { class: `connections ${kind}`, id: kind, data: { kind } },
        h('h2', { text: title }),
        list.length
          ? h('ol', { class: 'conn-row' }, list.map((c) => connectionCard(atlas, labels, c, most, token)))
          : h('p', { class: 'muted small', text: none })
      );
    };
    return h(
      'div',
      { class: 'connection-groups' },
      part('inputs', 'Inputs', 'None: the job’s first layer, or no unit of the layer before it contributes.'),
      part('outputs', 'Outputs', 'None: the job’s last layer, or it contributes to no unit of the layer after it.'),
      h(
        'p',
        { class: 'muted explain' },
        'Score: over the dataset’s images, the mean of activation × gradient summed over positions, from the input unit to the output unit’s spatial mean. ',
        '+ excites (more of the input, more of the output), − inhibits. Strongest first.'
      )
    );
  }

  function connectionCard(atlas, labels, c, most, token) {
    const info = atlas.layers.find((l) => l.name === c.layer) || null;
    const score = typeof c.score === 'number' && isFinite(c.score) ? c.score : null;
    const sign = score == null ? null : score < 0 ? 'inhibitory' : 'excitatory';
    const text = info ? labelOf(labels, info, c.unit) : null;
    const frame = h('span', { class: 'thumb' });
    const body = [
      frame,
      h(
        'span',
        { class: 'conn-caption' },
        h('span', { class: 'who', text: `${c.layer} · ${c.unit}` }),
        h('span', { class: 'score', title: sign ? `${sign}: ${score}` : null, text: fmtScore(score) }),
        h('span', { class: 'bar', 'aria-hidden': 'true' }, h('span', { style: `width:${most && score != null ? ((100 * Math.abs(score)) / most).toFixed(1) : 0}%` })),
        text ? h('span', { class: 'ulabel', title: text, text }) : null
      ),
    ];
    const card = h(
      'li',
      { class: `conn ${sign || ''}`.trim(), data: { layer: c.layer, unit: String(c.unit), score: score == null ? '' : String(score) } },
      info ? h('a', { href: unitHref(info.path, c.unit), title: `${c.layer} unit ${c.unit}${text ? `: ${text}` : ''}` }, body) : h('span', { title: 'a layer this atlas does not list' }, body)
    );
    const placeholder = () => frame.replaceChildren(h('span', { class: 'placeholder', text: String(c.unit) }));
    if (!info) {
      placeholder();
      return card;
    }
    loadLayer(info)
      .catch(() => null)
      .then((data) => {
        if (token !== renderToken) return;
        const src = thumbnailOf(atlas, info.path, data, c.unit);
        if (!src) return placeholder();
        const img = h('img', { src, alt: `${c.layer} unit ${c.unit}`, width: 96, height: 96 });
        img.addEventListener('error', placeholder, { once: true });
        frame.replaceChildren(img);
      });
    return card;
  }

  // ---------------------------------------------------------------- search

  // The search box in the page header: a number is a unit of the layer on screen (on the
  // atlas page, of every layer that has it); anything else is looked for in the labels of
  // every layer (case-insensitive). Results are links to the units; Enter opens the first.
  const searchForm = document.getElementById('search');
  const searchInput = document.getElementById('q');
  const searchResults = document.getElementById('search-results');

  async function searchHits(q) {
    const atlas = await loadAtlas();
    if (!atlas) return { hits: [], note: 'No atlas here yet.' };
    const labels = await loadLabels();
    const hit = (info, unit) => ({ info, unit, label: labelOf(labels, info, unit) });
    const number = /^#?\s*(\d+)$/.exec(q);
    if (number) {
      const unit = parseInt(number[1], 10);
      const r = parseHash();
      const here = r.view === 'layer' || r.view === 'unit' ? findLayer(atlas, r.seg) : null;
      const layers = here ? [here] : atlas.layers;
      const hits = layers.filter((info) => unit < unitCount(info)).map((info) => hit(info, unit));
      const where = here ? here.name ?? here.path : 'any layer';
      return { hits, note: hits.length ? null : here ? `${where} has units 0 to ${unitCount(here) - 1}.` : `No layer has a unit ${unit}.` };
    }
    const needle = q.toLocaleLowerCase();
    const hits = [];
    for (const info of atlas.layers) {
      const m = labels.get(info.name ?? info.path);
      if (!m) continue;
      for (const [unit, text] of [...m].sort((a, b) => a[0] - b[0])) {
        if (text.toLocaleLowerCase().includes(needle) && unit < unitCount(info)) hits.push(hit(info, unit));
      }
    }
    return { hits, note: hits.length ? null : labels.size ? `No label contains “${q}”.` : 'This atlas has no labels yet (loupe label).' };
  }

  let searchToken = 0;
  async function runSearch() {
    const q = searchInput.value.trim();
    const mine = ++searchToken;
    if (!q) return closeSearch();
    let found;
    try {
      found = await searchHits(q);
    } catch (e) {
      found = { hits: [], note: e.message };
    }
    if (mine !== searchToken) return;
    const { hits, note } = found;
    const items = hits.slice(0, SEARCH_RESULTS).map(({ info, unit, label }) =>
      h(
        'li',
        { class: 'hit', data: { layer: info.path, unit: String(unit) } },
        h(
          'a',
          { href: unitHref(info.path, unit) },
          h('span', { class: 'who', text: `${info.name ?? info.path} · unit ${unit}` }),
          label ? h('span', { class: 'ulabel', text: label }) : null
        )
      )
    );
    if (hits.length > SEARCH_RESULTS) items.push(h('li', { class: 'more muted', text: `and ${hits.length - SEARCH_RESULTS} more` }));
    if (note) items.push(h('li', { class: 'none muted', text: note }));
    searchResults.replaceChildren(...items);
    searchResults.hidden = false;
    searchForm.classList.add('open');
  }

  function closeSearch() {
    searchToken++;
    searchResults.hidden = true;
    searchResults.replaceChildren();
    searchForm.classList.remove('open');
  }

  searchInput.addEventListener('input', runSearch);
  searchInput.addEventListener('focus', () => {
    if (searchInput.value.trim()) runSearch();
  });
  searchForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    await runSearch();
    const first = searchResults.querySelector('.hit a');
    if (first) {
      location.hash = first.getAttribute('href');
      closeSearch();
    }
  });
  searchForm.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') {
      closeSearch();
      searchInput.focus();
    }
  });
  // Clicking a result or anywhere outside the box closes it.
  searchResults.addEventListener('click', (e) => {
    if (e.target.closest('a')) closeSearch();
  });
  document.addEventListener('click', (e) => {
    if (!searchForm.contains(e.target)) closeSearch();
  });

  // ---------------------------------------------------------------- driver

  const scrollAt = new Map();
  let current = null; // { hash, view, seg }
  if ('scrollRestoration' in history) history.scrollRestoration = 'manual';

  async function route(force) {
    const r = parseHash();
    const rendered = location.hash;
    const hash = rendered || '#/';
    if (force) {
      cache.atlasAt = 0;
      cache.labelsAt = 0;
      cache.layers.clear();
    }
    if (current) scrollAt.set(current.hash, window.scrollY);
    // Switching the technique or the sort of the same layer keeps the place on the page.
    const sameLayer = current && current.view === 'layer' && r.view === 'layer' && current.seg === r.seg;
    const y = scrollAt.has(hash) ? scrollAt.get(hash) : sameLayer ? window.scrollY : 0;
    current = { hash, view: r.view, seg: r.seg };
    const token = ++renderToken;
    resetLazy(); // before the view observes its own images
    document.body.dataset.view = r.view;
    try {
      if (r.view === 'atlas') await renderAtlas(token);
      else if (r.view === 'layer') await renderLayer(r, token);
      else if (r.view === 'unit') await renderUnit(r, token);
      else {
        setCrumbs([]);
        show(message('Nothing here', 'This link names no view of the atlas.', h('p', {}, h('a', { href: atlasHref(), text: 'The atlas' }))));
      }
    } catch (e) {
      if (token !== renderToken) return;
      show(message('Something went wrong', e && e.message ? e.message : String(e), h('p', {}, h('button', { type: 'button', onclick: () => route(true), text: 'Try again' }))));
    }
    if (token === renderToken) {
      window.scrollTo(0, y);
      // For tests and scripts: which view is drawn, and for which hash.
      document.body.dataset.ready = r.view;
      document.body.dataset.rendered = rendered;
    }
  }

  window.addEventListener('hashchange', () => {
    delete document.body.dataset.ready;
    closeSearch();
    route(false);
  });

  // Left and right arrows step through the units on a unit page.
  document.addEventListener('keydown', (e) => {
    if (e.defaultPrevented || e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) return;
    const t = e.target;
    if (t && (t.isContentEditable || /^(INPUT|SELECT|TEXTAREA)$/.test(t.tagName))) return;
    if (!current || current.view !== 'unit') return;
    const link = e.key === 'ArrowLeft' ? document.getElementById('prev') : e.key === 'ArrowRight' ? document.getElementById('next') : null;
    if (link) {
      e.preventDefault();
      location.hash = link.getAttribute('href');
    }
  });

  route(false);
})();

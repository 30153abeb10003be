// The hsae feature browser. Every piece of corpus text or label is set with textContent (or as a text
// node), never parsed as HTML: a document holding <script> shows as those characters. The same page
// works against the server's JSON API and against a static export (data/*.json, hash links).
"use strict";

const STATIC_SITE = document.querySelector('meta[name="hsae-static"]') !== null;
const PAGE = 200; // children loaded at a time
const state = { models: [], key: null, model: null, current: null, searchCache: null };

// ---- DOM helpers --------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  return node;
}

const enc = encodeURIComponent;
const pct = (d) => (d === null || d === undefined ? "–" : d >= 0.001 ? (100 * d).toFixed(2) + "%" : (100 * d).toExponential(1) + "%");
const num = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

// ---- data: the JSON API, or the files of a static export -----------------------------------------

async function getJSON(url) {
  const response = await fetch(url);
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : `${response.status} ${response.statusText}`;
    throw new Error(detail);
  }
  return body;
}

const files = new Map();
function cachedJSON(url) {
  if (!files.has(url)) files.set(url, getJSON(url));
  return files.get(url);
}

const data = STATIC_SITE
  ? {
      models: () => cachedJSON("data/models.json"),
      model: (key) => cachedJSON(`data/${enc(key)}/model.json`),
      async children(key, parent, offset, limit) {
        const all = await cachedJSON(`data/${enc(key)}/children/${parent}.json`);
        return { parent, total: all.length, offset, items: all.slice(offset, offset + limit) };
      },
      async feature(key, id) {
        const model = await data.model(key);
        if (!(id >= 0 && id < model.n_latents)) {
          throw new Error(`feature ${id} does not exist: this model has ${model.n_latents} features (0..${model.n_latents - 1})`);
        }
        return cachedJSON(`data/${enc(key)}/features/${id}.json`);
      },
      async search(key, q) {
        const index = await cachedJSON(`data/${enc(key)}/search.json`);
        const needle = q.trim().toLowerCase();
        const found = new Map();
        if (/^\d+$/.test(needle) && Number(needle) < index.summaries.length) found.set(Number(needle), "id");
        if (needle) {
          index.summaries.forEach((s) => {
            if (s.label && s.label.toLowerCase().includes(needle) && !found.has(s.id)) found.set(s.id, "label");
          });
          for (const id of index.tokens[needle] || []) if (!found.has(id)) found.set(id, "token");
        }
        const items = [...found].slice(0, 50).map(([id, match]) => ({ ...index.summaries[id], match }));
        return { query: q, total: found.size, items };
      },
      steer: null,
      imageSrc: (key, id) => `images/${enc(key)}/${Number(id)}.png`,
    }
  : {
      models: () => getJSON("api/models"),
      model: (key) => getJSON(`api/model?model=${enc(key)}`),
      children: (key, parent, offset, limit) =>
        getJSON(`api/features?parent=${parent}&offset=${offset}&limit=${limit}&model=${enc(key)}`),
      feature: (key, id) => getJSON(`api/features/${id}?model=${enc(key)}`),
      search: (key, q) => getJSON(`api/search?q=${enc(q)}&model=${enc(key)}`),
      steer: (key, id, scale, text) =>
        getJSON(`api/steer?feature=${id}&scale=${enc(scale)}&text=${enc(text)}&model=${enc(key)}`),
      imageSrc: (key, id) => `api/images/${Number(id)}?model=${enc(key)}`,
    };

// ---- routing: /features/ID?model=KEY (server) or #/features/ID?model=KEY (static) ----------------

function featureHref(id) {
  const query = `?model=${enc(state.key)}`;
  return STATIC_SITE ? `#/features/${id}${query}` : `features/${id}${query}`;
}

function homeHref() {
  return STATIC_SITE ? `#/?model=${enc(state.key)}` : `./?model=${enc(state.key)}`;
}

function readRoute() {
  const source = STATIC_SITE ? location.hash.replace(/^#/, "") || "/" : location.pathname + location.search;
  const url = new URL(source, "http://x");
  const match = url.pathname.match(/\/features\/([^/]+)$/);
  return { feature: match ? match[1] : null, model: url.searchParams.get("model") };
}

function go(href) {
  if (STATIC_SITE) {
    location.hash = href.replace(/^#/, "");
  } else {
    history.pushState(null, "", href);
    route();
  }
}

function link(summary, attrs) {
  const label = summary.label || "(no label)";
  return el(
    "a",
    {
      class: "flink",
      href: featureHref(summary.id),
      "data-id": summary.id,
      title: `feature ${summary.id}: ${label}`,
      onclick: (event) => {
        if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
        event.preventDefault();
        go(featureHref(summary.id));
      },
      ...(attrs || {}),
    },
    el("span", { class: "fid", text: `#${summary.id}` }),
    label,
  );
}

function badges(summary) {
  // an image model named by concepts.json alone has no examples pass, so no densities to show
  const densities = !(state.model && state.model.images && !state.model.examples);
  const parts = densities ? [pct(summary.density)] : [];
  if (summary.score !== null && summary.score !== undefined) parts.push(`AUROC ${num(summary.score, 2)}`);
  if (summary.children) parts.push(`${summary.children} children`);
  return el("span", { class: "badge", text: parts.join(" · ") });
}

// ---- the forest ---------------------------------------------------------------------------------

function treeNode(summary) {
  const kids = el("ul", { class: "kids", hidden: true });
  const toggle = el("button", {
    class: "toggle",
    type: "button",
    "aria-expanded": "false",
    "aria-label": `expand feature ${summary.id}`,
    "data-testid": `toggle-${summary.id}`,
    disabled: summary.children ? null : true,
    text: summary.children ? "▸" : "·",
  });
  const node = el("li", { class: "node", "data-id": summary.id }, toggle, link(summary), badges(summary), kids);
  let loaded = false;
  toggle.addEventListener("click", async () => {
    const open = toggle.getAttribute("aria-expanded") === "true";
    toggle.setAttribute("aria-expanded", open ? "false" : "true");
    toggle.textContent = open ? "▸" : "▾";
    kids.hidden = open;
    if (!open && !loaded) {
      loaded = true;
      await loadChildren(kids, summary.id, 0);
    }
  });
  return node;
}

async function loadChildren(list, parent, offset) {
  const page = await data.children(state.key, parent, offset, PAGE);
  for (const item of page.items) list.append(treeNode(item));
  if (state.current !== null) markCurrent(state.current);
  const shown = offset + page.items.length;
  if (shown < page.total) {
    const more = el("button", { class: "more", type: "button", text: `${page.total - shown} more…` });
    more.addEventListener("click", async () => {
      more.remove();
      await loadChildren(list, parent, shown);
    });
    list.append(el("li", {}, more));
  }
}

async function renderTree() {
  const tree = document.getElementById("tree");
  tree.replaceChildren(el("div", { class: "muted", text: "feature forest (families first, then by density)" }));
  const roots = el("ul", { class: "roots", "data-testid": "roots" });
  tree.append(roots);
  await loadChildren(roots, -1, 0);
}

function markCurrent(id) {
  for (const a of document.querySelectorAll("#tree a.flink.current")) a.classList.remove("current");
  for (const a of document.querySelectorAll(`#tree a.flink[data-id="${Number(id)}"]`)) a.classList.add("current");
}

// ---- charts -------------------------------------------------------------------------------------

function histogram(counts, labels, opts) {
  // Bars on a log1p scale (a few huge bins would hide the rest); `labels` are the bins' tooltips,
  // `opts.ticks` the [index, text] pairs written under the axis.
  const width = 520, height = 110, pad = 16;
  const chart = svg("svg", { class: "hist", viewBox: `0 0 ${width} ${height + pad}`, role: "img" });
  const top = Math.max(1, ...counts);
  const w = width / Math.max(1, counts.length);
  counts.forEach((c, i) => {
    const h = c ? Math.max(1, (height * Math.log1p(c)) / Math.log1p(top)) : 0;
    const cls = "bar" + (opts.neg && opts.neg(i) ? " neg" : "") + (opts.mark === i ? " mark" : "");
    const bar = svg("rect", { class: cls, x: i * w, y: height - h, width: Math.max(1, w - 1), height: h });
    const tip = svg("title", {});
    tip.textContent = `${labels[i]}: ${c}`;
    bar.append(tip);
    chart.append(bar);
  });
  for (const [i, label] of opts.ticks || []) {
    const anchor = i === 0 ? "start" : i >= counts.length - 1 ? "end" : "middle";
    const x = i === 0 ? 0 : i >= counts.length - 1 ? width : (i + 0.5) * w;
    const text = svg("text", { x, y: height + 12, "text-anchor": anchor });
    text.textContent = label;
    chart.append(text);
  }
  return chart;
}

function activationHistogram(hist) {
  if (!hist || !hist.counts) return null;
  const edges = hist.edges, bins = edges.length - 1, counts = hist.counts;
  const fmt = (x) => (x >= 0.01 && x < 1000 ? Number(x.toPrecision(2)).toString() : x.toExponential(0));
  const shown = [], labels = [], negative = [], ticks = [];
  for (let i = bins - 1; i >= 0; i--) {
    if (counts[bins + i]) {
      if (!shown.length) ticks.push([0, `-${fmt(edges[i + 1])}`]);
      shown.push(counts[bins + i]);
      labels.push(`-${fmt(edges[i])}…-${fmt(edges[i + 1])}`);
      negative.push(true);
    }
  }
  const first = counts.slice(0, bins).findIndex((c) => c > 0);
  const last = bins - 1 - [...counts.slice(0, bins)].reverse().findIndex((c) => c > 0);
  if (first >= 0) {
    ticks.push([shown.length, fmt(edges[first])]);
    for (let i = first; i <= last; i++) {
      shown.push(counts[i]);
      labels.push(`${fmt(edges[i])}…${fmt(edges[i + 1])}`);
      negative.push(false);
    }
    ticks.push([shown.length - 1, fmt(edges[last + 1])]);
  }
  if (!shown.length) return el("p", { class: "muted", text: "never fired in the examples pass" });
  return histogram(shown, labels, { neg: (i) => negative[i], ticks });
}

function densityHistogram(model, density) {
  const h = model.density_histogram;
  if (!h) return null;
  let mark = null;
  if (density > 0) {
    const at = Math.floor((Math.log10(density) - h.low) / h.step);
    mark = Math.max(0, Math.min(h.counts.length - 1, at));
  }
  const n = h.counts.length;
  const edge = (i) => `1e${(h.low + i * h.step).toFixed(1).replace(/\.0$/, "")}`;
  const labels = h.counts.map((_, i) => `density ${edge(i)}…${edge(i + 1)}`);
  const ticks = [[0, edge(0)], [Math.floor(n / 2), edge(Math.floor(n / 2))], [n - 1, edge(n)]];
  return histogram(h.counts, labels, { mark, ticks });
}

// ---- contexts -----------------------------------------------------------------------------------

function context(example, peakAbs) {
  const row = el("div", { class: "ctx", "data-testid": "context" }, el("span", { class: "val", text: num(example.value, 2) }));
  example.tokens.forEach((text, i) => {
    const act = example.acts[i];
    // The leading space stays outside the highlight, so marks sit on the word itself.
    const word = text.trimStart();
    if (word.length < text.length) row.append(text.slice(0, text.length - word.length));
    const span = el("span", { class: "tok" + (act !== 0 ? " active" : "") + (i === example.peak ? " peak" : ""), text: word });
    if (act !== 0) {
      const alpha = Math.min(1, Math.abs(act) / (peakAbs || 1));
      span.style.backgroundColor = act > 0 ? `rgba(234, 88, 12, ${alpha.toFixed(3)})` : `rgba(37, 99, 235, ${alpha.toFixed(3)})`;
      span.title = `activation ${num(act, 3)}`;
    }
    row.append(span);
  });
  return row;
}

function contextList(examples, peakAbs, testid) {
  const box = el("div", { "data-testid": testid });
  for (const e of examples) box.append(context(e, peakAbs));
  return box;
}

// ---- images (image models): top images with the feature's heatmap over the patch grid ------------

const CARD = 168; // CSS pixels of a card's square canvas

// A heatmap's colour ramp (jet-like, as CAM overlays are drawn): dark blue where the feature is off,
// through cyan and yellow, to red at the feature's peak over its shown images.
const RAMP = [[0, 0, 140], [0, 90, 255], [0, 230, 230], [255, 230, 0], [255, 60, 0], [170, 0, 0]];
const HEAT_ALPHA = 0.5;

function heatColour(value, peak) {
  // null: no example window reached the cell, left clear
  if (value === null) return [0, 0, 0, 0];
  const t = Math.min(1, Math.max(0, value) / (peak || 1)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(t)), f = t - i;
  const [a, b] = [RAMP[i], RAMP[i + 1]];
  return [0, 1, 2].map((c) => Math.round(a[c] + (b[c] - a[c]) * f)).concat([HEAT_ALPHA]);
}

function pictureBox(picture, size, padSquare) {
  // Where the picture lies in the square canvas and the rectangle the grid covers. With pad_square
  // the model saw the picture centred on a white square (hsae.sources.images.pad_to_square): the
  // grid covers that square. Otherwise the processor resized the picture itself: the grid covers it.
  const w = picture.naturalWidth, h = picture.naturalHeight, side = Math.max(w, h);
  const scale = size / side;
  const x = Math.floor((side - w) / 2) * scale, y = Math.floor((side - h) / 2) * scale;
  const image = { x, y, w: w * scale, h: h * scale };
  return { image, grid: padSquare ? { x: 0, y: 0, w: size, h: size } : image };
}

function drawCard(canvas, picture, item, layout, peak, showHeat) {
  const size = canvas.width;
  const ctx = canvas.getContext("2d");
  const box = pictureBox(picture, size, layout.pad_square);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, size, size);
  ctx.drawImage(picture, box.image.x, box.image.y, box.image.w, box.image.h);
  const [gh, gw] = layout.grid || [0, 0];
  if (showHeat && item.heatmap && item.heatmap.length === gh * gw) {
    // one pixel per grid cell, upsampled bilinearly over the grid's rectangle
    const cells = document.createElement("canvas");
    cells.width = gw;
    cells.height = gh;
    const pixels = cells.getContext("2d").createImageData(gw, gh);
    item.heatmap.forEach((v, i) => {
      const [r, g, b, a] = heatColour(v, peak);
      pixels.data.set([r, g, b, Math.round(255 * a)], 4 * i);
    });
    cells.getContext("2d").putImageData(pixels, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "low"; // bilinear: each cell's own value at its centre, no ringing
    ctx.drawImage(cells, box.grid.x, box.grid.y, box.grid.w, box.grid.h);
  }
  if (item.cell !== null && item.cell !== undefined && gw) {
    // the example's own cell (examples file): outlined
    const cw = box.grid.w / gw, ch = box.grid.h / gh;
    ctx.strokeStyle = "#1d232b";
    ctx.lineWidth = 2 * (window.devicePixelRatio || 1);
    ctx.strokeRect(box.grid.x + (item.cell % gw) * cw, box.grid.y + Math.floor(item.cell / gw) * ch, cw, ch);
  }
  canvas.dataset.drawn = showHeat && item.heatmap ? "heatmap" : "picture";
}

function imageCard(item, layout, peak, toggle) {
  const ratio = window.devicePixelRatio || 1;
  const canvas = el("canvas", { width: Math.round(CARD * ratio), height: Math.round(CARD * ratio), "data-testid": "image-canvas", "data-image": item.id });
  canvas.style.width = canvas.style.height = `${CARD}px`;
  const picture = new Image();
  const draw = () => drawCard(canvas, picture, item, layout, peak, toggle.checked);
  picture.addEventListener("load", () => {
    draw();
    toggle.addEventListener("change", draw);
  });
  const note = el("div", { class: "muted" });
  picture.addEventListener("error", () => {
    canvas.dataset.drawn = "missing";
    note.textContent = "picture unavailable";
  });
  picture.src = data.imageSrc(state.key, item.id);
  const title = [item.name, item.caption].filter(Boolean).join(" — ");
  return el(
    "figure",
    { class: "imcard", "data-testid": "image-card", title },
    canvas,
    el("figcaption", {},
      el("span", { class: "val", text: num(item.value, 2) }), " ",
      el("span", { class: "fid", text: `image ${item.id}` }),
      el("div", { class: "imlabel", text: item.label || "(no label)" }),
      item.caption ? el("div", { class: "muted imlabel", text: item.caption }) : null,
      item.heatmap ? null : el("div", { class: "muted", text: "no heatmap recorded" }),
      note),
  );
}

function conceptTable(concept) {
  if (!concept) return null;
  const named = concept.name
    ? `${concept.name} (${concept.source} cosine ${num(concept.score, 3)})`
    : concept.best ? `unnamed: nearest ${concept.best} at ${num(concept.score, 3)}, below the threshold` : null;
  return kvTable([
    ["concept", named],
    ["caption word", concept.word ? `${concept.word} (${num(concept.word_score, 3)})` : null],
    ["label", concept.label ? `${concept.label} (${num(concept.label_score, 3)})` : null],
  ]);
}

function imageSection(images) {
  const parts = [el("h3", { text: "Top images" })];
  if (images.problem) parts.push(el("p", { class: "banner", "data-testid": "images-problem", text: images.problem }));
  const table = conceptTable(images.concept);
  if (table) parts.push(table);
  if (!images.items.length) {
    if (!images.problem) {
      const why = images.source === null && !images.concept ? "this feature fired on none of the images" : "no images recorded";
      parts.push(el("p", { class: "muted", text: why }));
    }
    return parts;
  }
  const peak = Math.max(...images.items.flatMap((it) => (it.heatmap || []).map((v) => Math.abs(v || 0))), 0) || 1;
  const toggle = el("input", { type: "checkbox", checked: true, "data-testid": "heatmap-toggle" });
  const layout = { grid: images.grid, pad_square: images.pad_square };
  const source = images.source === "concepts" ? "hsae concepts (concepts.json)" : "the examples file (the windows around each top cell, outlined)";
  const grid = images.grid
    ? `the feature's activation on each cell of the ${images.grid[0]} × ${images.grid[1]} grid${images.pad_square ? " (the picture padded to a white square, as the model saw it)" : ""}, blue where off to red at its peak`
    : "the store has no grid rows";
  parts.push(
    el("p", { class: "muted" },
      el("label", {}, toggle, " heatmap"),
      `: ${grid}; from ${source}`),
    el("div", { class: "imgrid", "data-testid": "top-images" }, ...images.items.map((it) => imageCard(it, layout, peak, toggle))),
  );
  return parts;
}

// ---- pages --------------------------------------------------------------------------------------

function flist(items, extra) {
  const list = el("ul", { class: "flist" });
  for (const s of items) list.append(el("li", {}, link(s), extra ? el("span", { class: "badge", text: extra(s) }) : badges(s)));
  return list;
}

function kvTable(rows) {
  const table = el("table", { class: "kv" });
  for (const [k, v] of rows) if (v !== null && v !== undefined) table.append(el("tr", {}, el("td", { text: k }), el("td", {}, v)));
  return table;
}

function steerBox(f) {
  if (!data.steer) return el("p", { class: "muted", text: "Steering needs the server: run `hsae serve` on the model folder." });
  const first = f.examples && f.examples.top && f.examples.top[0];
  const text = el("textarea", { rows: 2, maxlength: 2000, "aria-label": "text to steer" });
  text.value = first ? first.tokens.join("").trim() : "a small dog barked at the mailman";
  const scale = el("input", { type: "number", step: "any", value: num((f.stats && f.stats.max_act) || 5, 2), "aria-label": "scale" });
  const out = el("div", { "data-testid": "steer-result" });
  const run = el("button", { type: "button", text: "steer", "data-testid": "steer" });
  run.addEventListener("click", async () => {
    out.replaceChildren(el("p", { class: "muted", text: "running the model…" }));
    try {
      const r = await data.steer(state.key, f.id, scale.value, text.value);
      if (r.kind === "generation") {
        out.replaceChildren(kvTable([["without", r.plain], ["with", r.steered_text]]));
      } else {
        const glosses = (list) => el("ol", {}, ...list.map((g) => el("li", {}, el("b", { text: g.synset }), ` ${g.gloss} (${num(g.cosine, 3)})`)));
        out.replaceChildren(
          el("p", { text: `sentence-embedding cosine before/after: ${num(r.cosine, 3)}` }),
          el("div", { class: "grid2" },
            el("div", {}, el("b", { text: "nearest WordNet glosses before" }), glosses(r.before)),
            el("div", {}, el("b", { text: "after" }), glosses(r.after))),
        );
      }
    } catch (err) {
      out.replaceChildren(el("p", { class: "error", text: err.message }));
    }
  });
  return el("div", { class: "steer" }, text, el("div", {}, "scale ", scale, " ", run), out);
}

function renderFeature(f) {
  const model = state.model;
  const content = document.getElementById("content");
  const crumbs = el("div", { class: "crumbs" }, el("a", { href: homeHref(), text: model.name, onclick: (e) => { e.preventDefault(); go(homeHref()); } }));
  for (const a of f.ancestors) crumbs.append(" › ", link(a));
  const peakAbs = Math.max(Math.abs((f.stats && f.stats.max_act) || 0), Math.abs((f.stats && f.stats.min_act) || 0)) || 1;
  const parts = [
    crumbs,
    el("h2", { "data-testid": "feature-title" }, `Feature ${f.id}`),
    el("div", { class: "label", "data-testid": "feature-label", text: f.label || "(no label yet: run hsae label)" }),
  ];
  const labels = Object.entries(f.labels || {}).filter(([, v]) => v && v.label);
  const scores = Object.entries(f.scores_detail || {}).filter(([, v]) => v);
  const describeScore = (v) =>
    Object.entries(v)
      .filter(([k, x]) => typeof x === "number" || (x && typeof x === "object"))
      .map(([k, x]) => (typeof x === "number" ? `${k} ${num(x, 3)}` : `${k}: F1 ${num(x.f1, 2)}, AUC ${num(x.auc, 2)}`))
      .join("; ");
  parts.push(
    kvTable([
      ["density", f.images && !f.stats ? null : pct(f.density)],
      ["fires", f.stats ? String(f.stats.fires) : null],
      ["max activation", f.stats ? num(f.stats.max_act) : null],
      ["min activation", f.stats && f.stats.min_act !== null ? num(f.stats.min_act) : null],
      ...labels.map(([name, v]) => [`${name} label`, v.label]),
      ...scores.map(([name, v]) => [`${name} score`, describeScore(v)]),
    ]),
  );
  if (f.images) parts.push(...imageSection(f.images));
  if (f.missing_examples) {
    parts.push(el("p", { class: "banner" }, "No examples for this model yet. Build them with ", el("code", { text: f.missing_examples })));
  } else if (f.examples) {
    // an image model's rows are grid cells, not tokens: its top images stand for the contexts
    if (!f.images) parts.push(el("h3", { text: "Top activations" }), contextList(f.examples.top, peakAbs, "top-contexts"));
    if (!f.images && f.examples.bottom && f.examples.bottom.length) {
      parts.push(el("h3", { text: "Most negative activations" }), contextList(f.examples.bottom, peakAbs, "bottom-contexts"));
    }
    const byQuantile = new Map();
    for (const e of f.examples.quantile) {
      if (!byQuantile.has(e.quantile)) byQuantile.set(e.quantile, []);
      byQuantile.get(e.quantile).push(e);
    }
    if (!f.images) {
      parts.push(el("h3", { text: "Examples by activation quantile (highest first)" }));
      for (const [q, list] of byQuantile) parts.push(el("div", { class: "muted", text: `quantile ${q}` }), contextList(list, peakAbs, `quantile-${q}`));
    }
    parts.push(
      el("div", { class: "grid2" },
        el("div", {}, el("h3", { text: "Activation histogram (log bins)" }), activationHistogram(f.histogram)),
        el("div", {}, el("h3", { text: "Density among all features" }), densityHistogram(model, f.density))),
    );
  }
  const family = el("div", { class: "grid2" });
  family.append(el("div", {}, el("h3", { text: "Parent" }), f.parent_summary ? flist([f.parent_summary]) : el("p", { class: "muted", text: "a root" })));
  const kids = f.children_list;
  family.append(
    el("div", {}, el("h3", { text: `Children (${kids.total})` }),
      kids.total ? flist(kids.items) : el("p", { class: "muted", text: "none" }),
      kids.total > kids.items.length ? el("p", { class: "muted", text: `and ${kids.total - kids.items.length} more (expand it in the forest)` }) : null),
  );
  family.append(el("div", {}, el("h3", { text: `Siblings (${Math.max(0, f.siblings.total)})` }), f.siblings.items.length ? flist(f.siblings.items) : el("p", { class: "muted", text: "none" })));
  family.append(el("div", {}, el("h3", { text: "Decoder-cosine neighbours" }), flist(f.neighbours, (s) => `cos ${num(s.cosine, 3)}`)));
  if (f.cofire) family.append(el("div", {}, el("h3", { text: "Co-firing" }), flist(f.cofire, (s) => `P(on | this) ${num(s.p, 2)} · lift ${num(s.lift, 1)}`)));
  if (f.promoted) {
    const tokens = (list) => el("div", { class: "ctx" }, ...list.map((t) => el("span", { class: "tok active", title: `logit ${num(t.logit, 3)}`, text: `${t.token} ` })));
    family.append(el("div", {}, el("h3", { text: "Promoted tokens" }), tokens(f.promoted), el("h3", { text: "Suppressed tokens" }), tokens(f.suppressed)));
  }
  parts.push(family);
  if (!f.images) parts.push(el("h3", { text: "Steering" }), steerBox(f)); // steering runs text through the model
  content.replaceChildren(...parts);
  content.scrollTop = 0;
}

function renderModel() {
  const m = state.model;
  const content = document.getElementById("content");
  const parts = [
    el("h2", { text: m.name }),
    kvTable([
      ["architecture", m.arch],
      ["features", String(m.n_latents)],
      ["base model", m.model],
      ["hook", m.hook],
      ["corpus", m.corpus],
      ["forest", `${m.roots} roots, ${m.edges} parent→child edges`],
      ["examples", m.examples ? `${m.examples.tokens} tokens (${m.examples.created})` : null],
      ["labels", m.labellers.length ? m.labellers.join(", ") : "none yet"],
      ["images", m.images ? `${m.images.images} (${m.images.collection}: ${m.images.path})` : null],
      ["patch grid", m.images && m.images.grid ? `${m.images.grid[0]} × ${m.images.grid[1]}${m.images.pad_square ? ", over the picture padded to a white square" : ""}` : null],
      ["concepts", m.concepts ? `${m.concepts.named} of ${m.concepts.firing} firing features named (${m.concepts.source}, threshold ${num(m.concepts.threshold, 3)})` : null],
    ]),
  ];
  if (m.images_problem) parts.push(el("p", { class: "banner", text: m.images_problem }));
  if (m.missing_examples) parts.push(el("p", { class: "banner" }, "No examples for this model yet. Build them with ", el("code", { text: m.missing_examples })));
  const scorers = Object.entries(m.scores || {}).filter(([, v]) => v);
  if (scorers.length) {
    parts.push(el("h3", { text: "Interpretability scores" }));
    for (const [name, summary] of scorers) {
      const rows = Object.entries(summary).map(([k, v]) => [k, typeof v === "object" && v ? Object.entries(v).map(([a, b]) => `${a} ${num(b, 3)}`).join(", ") : String(v)]);
      parts.push(el("b", { text: name }), kvTable(rows));
    }
  }
  if (m.density_histogram) parts.push(el("h3", { text: "Feature densities" }), densityHistogram(m, 0));
  if (m.report) {
    parts.push(el("h3", { text: "Evaluation" }));
    if (m.has_report_html) parts.push(el("p", {}, el("a", { href: STATIC_SITE ? "report.html" : `report?model=${enc(state.key)}`, text: "the full eval report" })));
    for (const [name, section] of Object.entries(m.report.sections || {})) {
      if (!section || typeof section !== "object") continue;
      if (section.skipped) {
        parts.push(el("div", { class: "muted", text: `${name}: skipped (${section.skipped})` }));
        continue;
      }
      const rows = Object.entries(section).filter(([, v]) => typeof v === "number" || typeof v === "string").map(([k, v]) => [k, typeof v === "number" ? (Number.isInteger(v) ? String(v) : num(v, 4)) : v]);
      parts.push(el("b", { text: name }), kvTable(rows));
    }
  }
  content.replaceChildren(...parts);
}

async function renderSearch(q) {
  const content = document.getElementById("content");
  content.replaceChildren(el("p", { class: "muted", text: "searching…" }));
  try {
    const found = await data.search(state.key, q);
    content.replaceChildren(
      el("h2", {}, "Search: ", el("span", { text: found.query })),
      el("p", { class: "muted", text: `${found.total} features by id, label or token` }),
      flist(found.items, (s) => `${s.match} · ${pct(s.density)}`),
    );
    content.querySelector("ul.flist").setAttribute("data-testid", "search-results");
  } catch (err) {
    content.replaceChildren(el("p", { class: "error", text: err.message }));
  }
}

// ---- start --------------------------------------------------------------------------------------

async function selectModel(key) {
  if (state.key === key && state.model) return;
  state.key = key;
  state.model = await data.model(key);
  const m = state.model;
  document.getElementById("model-facts").textContent = `${m.arch} · ${m.n_latents} features · ${m.model || ""} ${m.hook || ""}`;
  const banner = document.getElementById("banner");
  banner.hidden = !m.missing_examples;
  banner.replaceChildren(...(m.missing_examples ? ["No examples for this model yet. Build them with ", el("code", { text: m.missing_examples })] : []));
  await renderTree();
}

async function route() {
  const { feature, model } = readRoute();
  const key = state.models.some((m) => m.key === model) ? model : state.models[0].key;
  const select = document.getElementById("model");
  select.value = key;
  await selectModel(key);
  const content = document.getElementById("content");
  if (feature === null) {
    state.current = null;
    renderModel();
    return;
  }
  if (!/^\d+$/.test(feature)) {
    content.replaceChildren(el("p", { class: "error", text: `feature ${feature} does not exist: ids are whole numbers` }));
    return;
  }
  content.replaceChildren(el("p", { class: "muted", text: "loading…" }));
  try {
    const f = await data.feature(key, Number(feature));
    state.current = f.id;
    renderFeature(f);
    markCurrent(f.id);
    document.title = `#${f.id} ${f.label || ""} · hsae`;
  } catch (err) {
    content.replaceChildren(el("p", { class: "error", "data-testid": "error", text: err.message }));
  }
}

async function start() {
  state.models = await data.models();
  const select = document.getElementById("model");
  for (const m of state.models) select.append(el("option", { value: m.key, text: `${m.name} (${m.arch}, ${m.n_latents})` }));
  select.hidden = state.models.length < 2;
  select.addEventListener("change", () => {
    state.model = null;
    go(homeHref().replace(/model=[^&]*/, `model=${enc(select.value)}`));
  });
  document.getElementById("home").addEventListener("click", (e) => { e.preventDefault(); go(homeHref()); });
  document.getElementById("search").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = document.getElementById("q").value;
    if (q.trim()) renderSearch(q);
  });
  window.addEventListener(STATIC_SITE ? "hashchange" : "popstate", route);
  await route();
}

start().catch((err) => {
  document.getElementById("content").replaceChildren(el("p", { class: "error", text: `could not load: ${err.message}` }));
});

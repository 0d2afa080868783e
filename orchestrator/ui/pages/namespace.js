// Namespace: the Unified Namespace as a tree (topic levels as folders, as MQTT Explorer shows
// it), live from GET /api/v1/namespace/stream (server-sent events: a `snapshot`, then `update`
// batches every 250 ms; docs/control.md, "Live namespace").
//
// Built for tens of thousands of topics changing every second:
// - events only change the model (a tree of levels, each topic's last entry and its rate);
// - the list is virtual: one scroll container, fixed row height, a pool of row elements for
//   the visible rows of the flattened tree only; a row's text is written only when it changed;
// - drawing happens at most once per animation frame, whatever number of events came.

import { api } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { liveUrl, formatValue, formatRate, formatAge, qualityTone, rate, ServerClock } from "../lib/live.js";

export const title = "Namespace";

const ROW_H = 28;
/** Rows drawn above and below the visible ones, so a small scroll shows drawn rows. */
const OVERSCAN = 6;
const collator = new Intl.Collator(undefined, { numeric: true });

class Node {
  constructor(name, path, depth, parent) {
    this.name = name;
    this.path = path;
    this.depth = depth;
    this.parent = parent;
    /** Map of child level name -> Node, or null. */
    this.children = null;
    /** The children sorted, until one is added or removed. */
    this.sorted = null;
    /** The topic's last entry when this level is a topic. */
    this.entry = null;
    /** The entry's previous `n` and `at`, for the rate. */
    this.prevN = 0;
    this.prevAt = 0;
    /** Topics at or below this level. */
    this.count = 0;
    this.open = false;
    /** Matches of the search at or below this level, valid when `mgen` is the search's. */
    this.matches = 0;
    this.mgen = 0;
  }

  sortedChildren() {
    if (!this.children) return [];
    if (!this.sorted) this.sorted = [...this.children.values()].sort((a, b) => collator.compare(a.name, b.name));
    return this.sorted;
  }
}

/** The topics of one filter as a tree; no DOM here. */
class Model {
  constructor() {
    this.root = new Node("", "", -1, null);
    this.byTopic = new Map();
    /** Topics added or removed since the last flatten. */
    this.structureChanged = true;
  }

  /** Take one entry of a snapshot or a batch. */
  apply(e) {
    if (e.gone) { this.remove(e.topic); return; }
    let node = this.byTopic.get(e.topic);
    if (!node) {
      node = this.path(e.topic);
      this.byTopic.set(e.topic, node);
      for (let p = node; p; p = p.parent) p.count++;
      this.structureChanged = true;
      node.prevN = e.n;
      node.prevAt = e.at;
    } else if (node.entry && e.n !== node.entry.n) {
      node.prevN = node.entry.n;
      node.prevAt = node.entry.at;
    }
    node.entry = e;
  }

  /** The node of `topic`, made with its parents when missing. */
  path(topic) {
    let node = this.root;
    const levels = topic.split("/");
    for (let i = 0; i < levels.length; i++) {
      const name = levels[i];
      if (!node.children) node.children = new Map();
      let next = node.children.get(name);
      if (!next) {
        next = new Node(name, levels.slice(0, i + 1).join("/"), i, node);
        node.children.set(name, next);
        node.sorted = null;
      }
      node = next;
    }
    return node;
  }

  remove(topic) {
    const node = this.byTopic.get(topic);
    if (!node) return;
    this.byTopic.delete(topic);
    node.entry = null;
    for (let p = node; p; p = p.parent) p.count--;
    // Levels with nothing left below them go too.
    for (let p = node; p.parent && p.count === 0; p = p.parent) {
      p.parent.children.delete(p.name);
      p.parent.sorted = null;
    }
    this.structureChanged = true;
  }

  /** A whole snapshot: topics it does not name are gone. */
  replaceAll(entries) {
    const seen = new Set();
    for (const e of entries) { seen.add(e.topic); this.apply(e); }
    for (const t of [...this.byTopic.keys()]) if (!seen.has(t)) this.remove(t);
  }

  /** Open the chain of single folders from the top, so a lone device shows its tags. */
  openSingles() {
    let node = this.root;
    while (node.children && node.children.size === 1) {
      node = node.children.values().next().value;
      if (!node.children) break;
      node.open = true;
    }
  }

  setAll(open) {
    const walk = (n) => {
      if (!n.children) return;
      if (n !== this.root) n.open = open;
      for (const c of n.children.values()) walk(c);
    };
    walk(this.root);
  }

  /** Count the matches of `needle` (lowercase) at every level; returns how many topics match. */
  search(needle, gen) {
    let total = 0;
    for (const [topic, node] of this.byTopic) {
      if (!topic.toLowerCase().includes(needle)) continue;
      total++;
      for (let p = node; p; p = p.parent) {
        if (p.mgen !== gen) { p.mgen = gen; p.matches = 0; }
        p.matches++;
      }
    }
    return total;
  }

  /** The rows to show: open folders' children, or with a search every level holding a match. */
  flatten(gen) {
    const rows = [];
    const walk = (n) => {
      for (const c of n.sortedChildren()) {
        if (gen && c.mgen !== gen) continue;
        rows.push(c);
        if (c.children && (gen || c.open)) walk(c);
      }
    };
    walk(this.root);
    return rows;
  }
}

export function render(view, ctx) {
  const query = ctx.params.query || new URLSearchParams();
  let filter = query.get("filter") || "#";

  const filterInput = h("input", {
    id: "ns-filter", class: "mono", value: filter, spellcheck: "false", autocomplete: "off",
    "aria-label": "MQTT filter", title: "An MQTT filter (+ one level, # everything below); Enter applies it",
  });
  const searchInput = h("input", {
    id: "ns-search", type: "search", placeholder: "Search topics", autocomplete: "off",
    "aria-label": "Search topics", value: query.get("search") || "",
  });
  const summary = h("span", { class: "muted", id: "ns-summary", dataset: { topics: "0", state: "connecting" } }, "connecting…");
  const banner = h("p", { class: "banner error", id: "ns-error", role: "alert", hidden: true });
  const spacer = h("div", { class: "ns-spacer" });
  const scroller = h("div", {
    class: "ns-scroll", id: "ns-tree", role: "tree", tabindex: "0", "aria-label": "Topics",
  }, spacer);
  const empty = h("p", { class: "muted ns-empty", id: "ns-empty", hidden: true });

  view.append(h("section", { class: "page page-wide" },
    h("div", { class: "page-head" }, h("h1", {}, "Namespace"), summary),
    banner,
    h("div", { class: "card ns-card" },
      h("form", {
        class: "ns-tools", onsubmit: (e) => { e.preventDefault(); reopen(filterInput.value.trim() || "#"); },
      },
        h("label", { class: "ns-tool" }, h("span", {}, "Filter"), filterInput),
        h("button", { type: "submit", class: "btn small", id: "ns-apply" }, "Apply"),
        h("label", { class: "ns-tool grow" }, h("span", {}, "Search"), searchInput),
        h("button", { type: "button", class: "btn small", id: "ns-expand", onclick: () => setAll(true) }, "Expand all"),
        h("button", { type: "button", class: "btn small", id: "ns-collapse", onclick: () => setAll(false) }, "Collapse all")),
      h("div", { class: "ns-row ns-header", "aria-hidden": "true" },
        h("span", {}, "Topic"), h("span", {}, "Value"), h("span", {}, "Quality"),
        h("span", {}, "Unit"), h("span", { class: "num" }, "Rate"), h("span", { class: "num" }, "Age")),
      scroller,
      empty)));

  let model = new Model();
  let rows = [];
  let source = null;
  let needle = searchInput.value.trim().toLowerCase();
  let searchGen = 0;
  let searchHits = 0;
  let frame = 0;
  let first = true;
  const clock = new ServerClock();
  const pool = [];
  let viewportH = scroller.clientHeight || 600;

  function schedule() {
    if (!frame) frame = requestAnimationFrame(draw);
  }

  function reopen(f) {
    filter = f;
    filterInput.value = f;
    remember();
    model = new Model();
    rows = [];
    first = true;
    open();
    schedule();
  }

  /** The filter and search in the address, so a reload or a shared link shows the same. */
  function remember() {
    const q = new URLSearchParams();
    if (filter !== "#") q.set("filter", filter);
    if (needle) q.set("search", searchInput.value.trim());
    const s = q.toString();
    history.replaceState(null, "", `#/namespace${s ? `?${s}` : ""}`);
  }

  function open() {
    if (source) source.close();
    summary.dataset.state = "connecting";
    replace(summary, "connecting…");
    const es = new EventSource(liveUrl(filter));
    source = es;
    es.addEventListener("snapshot", (ev) => {
      if (es !== source) return;
      const entries = JSON.parse(ev.data);
      clock.observe(entries);
      model.replaceAll(entries);
      if (first) { model.openSingles(); first = false; }
      banner.hidden = true;
      summary.dataset.state = "live";
      schedule();
    });
    es.addEventListener("update", (ev) => {
      if (es !== source) return;
      const entries = JSON.parse(ev.data);
      clock.observe(entries);
      for (const e of entries) model.apply(e);
      schedule();
    });
    es.onerror = () => {
      if (es !== source) return;
      if (es.readyState === EventSource.CLOSED) {
        summary.dataset.state = "closed";
        explainFailure(es);
      } else {
        summary.dataset.state = "reconnecting";
        replace(summary, "reconnecting…");
      }
    };
  }

  /** The stream was refused: the snapshot route says why (a bad filter, no session, ...). */
  async function explainFailure(es) {
    let why = "the server refused the stream";
    try {
      await api("GET", `/api/v1/namespace?filter=${encodeURIComponent(filter)}`);
    } catch (e) {
      if (e.status === 401) return;
      why = e.message;
    }
    if (es !== source || !ctx.alive()) return;
    replace(banner, `The live namespace could not be opened: ${why}`);
    banner.hidden = false;
    replace(summary, "stopped");
  }

  function setAll(openAll) {
    model.setAll(openAll);
    model.structureChanged = true;
    schedule();
  }

  let searchTimer = null;
  searchInput.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      needle = searchInput.value.trim().toLowerCase();
      model.structureChanged = true;
      remember();
      schedule();
    }, 120);
  });

  scroller.addEventListener("scroll", schedule, { passive: true });
  const resize = new ResizeObserver(() => { viewportH = scroller.clientHeight; schedule(); });
  resize.observe(scroller);

  // A folder's row opens and closes it; a topic's row opens its tag view (its name is a link).
  scroller.addEventListener("click", (e) => {
    const row = e.target.closest(".ns-row");
    if (!row || !row.node || e.target.closest("a[href]")) return;
    if (row.node.children) toggle(row.node);
    else if (row.node.entry) ctx.navigate(`#/tag/${encodeURIComponent(row.node.path)}`);
  });
  scroller.addEventListener("keydown", (e) => {
    const row = e.target.closest(".ns-row");
    if (!row || !row.node) return;
    const n = row.node;
    if ((e.key === "ArrowRight" && n.children && !n.open) || (e.key === "ArrowLeft" && n.children && n.open)) {
      e.preventDefault();
      toggle(n);
    }
  });

  function toggle(node) {
    if (needle) return; // a search shows every level holding a match
    node.open = !node.open;
    model.structureChanged = true;
    schedule();
  }

  function draw() {
    frame = 0;
    if (!ctx.alive()) return;
    if (model.structureChanged) {
      if (needle) {
        searchGen++;
        searchHits = model.search(needle, searchGen);
      }
      rows = model.flatten(needle ? searchGen : 0);
      spacer.style.height = `${rows.length * ROW_H}px`;
      model.structureChanged = false;
    }
    const total = model.byTopic.size;
    if (summary.dataset.state === "live") {
      const text = needle
        ? `${searchHits.toLocaleString()} of ${total.toLocaleString()} topics`
        : `${total.toLocaleString()} topic${total === 1 ? "" : "s"}`;
      if (summary.textContent !== text) summary.textContent = text;
    }
    if (summary.dataset.topics !== String(total)) summary.dataset.topics = String(total);
    const emptyText = summary.dataset.state !== "live" ? ""
      : total === 0 ? `No topic matches ${filter} yet.`
        : rows.length === 0 ? "No topic matches the search." : "";
    if (empty.textContent !== emptyText) empty.textContent = emptyText;
    empty.hidden = !emptyText;

    const top = scroller.scrollTop;
    const from = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    const to = Math.min(rows.length, Math.ceil((top + viewportH) / ROW_H) + OVERSCAN);
    while (pool.length < to - from) {
      const r = makeRow();
      pool.push(r);
      scroller.append(r.el);
    }
    const now = clock.now();
    for (let i = 0; i < pool.length; i++) {
      const r = pool[i];
      if (from + i < to) bind(r, rows[from + i], from + i, now, needle ? searchGen : 0);
      else if (!r.el.hidden) { r.el.hidden = true; r.node = null; r.el.node = null; }
    }
  }

  // Ages tick and rates decay: redraw the visible rows every second.
  const ticker = setInterval(schedule, 1000);

  if (needle) model.structureChanged = true;
  open();
  schedule();

  return () => {
    clearInterval(ticker);
    clearTimeout(searchTimer);
    if (frame) cancelAnimationFrame(frame);
    resize.disconnect();
    if (source) source.close();
    source = null;
  };
}

/** One pooled row: its elements and what they show, so unchanged text is not written. */
function makeRow() {
  const twist = h("span", { class: "ns-twist", "aria-hidden": "true" });
  const name = h("a", { class: "ns-name" });
  const label = h("span", { class: "ns-label" }, twist, name);
  const value = h("span", { class: "ns-value mono" });
  const quality = h("span", { class: "ns-q" });
  const unit = h("span", { class: "ns-unit muted" });
  const rateEl = h("span", { class: "ns-rate num muted" });
  const age = h("span", { class: "ns-age num muted" });
  const el = h("div", { class: "ns-row", role: "treeitem" }, label, value, quality, unit, rateEl, age);
  return { el, twist, name, label, value, quality, unit, rate: rateEl, age, node: null, shown: {} };
}

function set(r, key, el, text) {
  if (r.shown[key] !== text) { r.shown[key] = text; el.textContent = text; }
}

/** Show `node` in pooled row `r` at `index`; `gen`: the search's generation, 0 without one. */
function bind(r, node, index, now, gen) {
  const el = r.el;
  if (el.hidden) el.hidden = false;
  const s = r.shown;
  if (s.y !== index) { s.y = index; el.style.transform = `translateY(${index * ROW_H}px)`; }
  const kind = (node.entry ? 1 : 0) | (node.children ? 2 : 0);
  if (r.node !== node || s.kind !== kind) {
    r.node = node;
    el.node = node;
    s.kind = kind;
    label(r, node);
  }
  const folder = !!node.children;
  // A search shows every level holding a match: its folders are open.
  const open = folder ? String(!!gen || node.open) : null;
  if (s.open !== open) {
    s.open = open;
    if (open === null) el.removeAttribute("aria-expanded"); else el.setAttribute("aria-expanded", open);
    r.twist.textContent = folder ? (open === "true" ? "▾" : "▸") : "";
  }
  const e = node.entry;
  if (e) {
    const tone = qualityTone(e.q);
    set(r, "value", r.value, formatValue(e.v));
    set(r, "q", r.quality, e.q ? e.q.replaceAll("_", " ") : "");
    if (s.tone !== tone) { s.tone = tone; r.quality.className = `ns-q q-${tone}`; el.classList.toggle("bad", tone === "bad"); }
    set(r, "unit", r.unit, e.u || "");
    set(r, "rate", r.rate, formatRate(rate(node, now)));
    set(r, "age", r.age, formatAge(now - e.at));
  } else {
    const n = node.count;
    const all = `${n.toLocaleString()} topic${n === 1 ? "" : "s"}`;
    set(r, "value", r.value, gen && node.mgen === gen ? `${node.matches.toLocaleString()} of ${all}` : all);
    set(r, "q", r.quality, "");
    if (s.tone !== "none") { s.tone = "none"; r.quality.className = "ns-q"; el.classList.remove("bad"); }
    set(r, "unit", r.unit, "");
    set(r, "rate", r.rate, "");
    set(r, "age", r.age, "");
  }
}

/** What does not change while a pooled row shows the same node. */
function label(r, node) {
  const folder = !!node.children;
  r.name.textContent = node.name === "" ? "(empty)" : node.name;
  r.name.title = node.path;
  if (node.entry) r.name.href = `#/tag/${encodeURIComponent(node.path)}`;
  else r.name.removeAttribute("href");
  r.label.style.paddingLeft = `${node.depth * 16}px`;
  r.el.setAttribute("aria-level", String(node.depth + 1));
  r.el.classList.toggle("folder", folder);
  r.el.classList.toggle("topic", !!node.entry);
  r.el.dataset.topic = node.path;
  r.value.classList.toggle("muted", !node.entry);
}

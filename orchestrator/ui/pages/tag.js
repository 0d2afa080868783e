// Tag view (#/tag/<topic>): one topic's live value from the namespace stream (filter = the
// topic), and its history from GET /api/v1/history (docs/ingestion.md, "History API") drawn
// with uPlot, loaded only when this page is first shown. Ranges from 15 minutes to 30 days;
// dragging across the chart zooms in (a new query: `agg=auto` picks raw points or the finest
// aggregate that fits). Points of bad or uncertain quality are marked; aggregates show their
// min-max band. A range back from now is read again every 10 s (or its 360th part, when
// longer), so the chart follows the live value; a zoomed range stays as it is.
// When the topic is a tag of a configured device with `access: write` or `readwrite`
// (`<uns_prefix>/<device id>/<tag id>` in GET /api/v1/devices), operators and admins get a
// form writing it through POST /api/v1/commands/{device}/{tag} (docs/control.md, "Writing a
// value"); viewers are not offered it, and the API refuses them anyway.

import { api } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { may } from "../lib/session.js";
import { liveUrl, formatValue, formatAge, formatRate, qualityTone, rate, ServerClock } from "../lib/live.js";

export const title = "Tag";

const MIN = 60_000;
const RANGES = [
  ["15 min", 15 * MIN], ["1 h", 60 * MIN], ["6 h", 360 * MIN],
  ["24 h", 1440 * MIN], ["7 d", 7 * 1440 * MIN], ["30 d", 30 * 1440 * MIN],
];

let uplotCss = null;
/** uPlot and its style sheet, fetched the first time a chart is drawn. */
async function loadUplot() {
  if (!uplotCss) {
    uplotCss = h("link", { rel: "stylesheet", href: "/ui/vendor/uplot/uPlot.min.css" });
    document.head.append(uplotCss);
  }
  return (await import("../vendor/uplot/uPlot.esm.js")).default;
}

export function render(view, ctx) {
  const topic = ctx.params.topic;
  const levels = topic.split("/");
  document.title = `${levels[levels.length - 1]} · Nexus`;

  const value = h("span", { class: "tag-value mono", id: "tag-value" }, "…");
  const unit = h("span", { class: "tag-unit muted", id: "tag-unit" });
  const quality = h("span", { id: "tag-quality" });
  const age = h("dd", { id: "tag-age" }, "");
  const srcTime = h("dd", { id: "tag-src-ts" }, "");
  const rateEl = h("dd", { id: "tag-rate" }, "");
  const count = h("dd", { id: "tag-count" }, "");
  const liveState = h("p", { class: "muted", id: "tag-live-state" }, "connecting…");

  const rangeButtons = RANGES.map(([label, ms]) => h("button", {
    type: "button", class: "btn small", dataset: { range: label },
    onclick: () => setRange({ label, span: ms }),
  }, label));
  const zoomOut = h("button", { type: "button", class: "btn small", id: "history-reset", hidden: true, onclick: () => setRange(base) });
  const rangeText = h("span", { class: "muted small", id: "history-range" });
  const message = h("p", { class: "banner", id: "history-message", role: "status", hidden: true });
  const notes = h("p", { class: "muted small", id: "history-notes" });
  const chartBox = h("div", { class: "chart", id: "history-chart" });

  // data-write says what was decided: "form", "none" (not a writable tag of a device) or
  // "not-offered" (the role may not write).
  const writeBox = h("div", { class: "tag-write-box", id: "tag-write-box" });

  view.append(h("section", { class: "page" },
    h("p", { class: "crumbs" }, crumbs(levels)),
    h("div", { class: "page-head" }, h("h1", { class: "mono tag-title", title: topic }, topic)),
    h("div", { class: "grid-tag" },
      h("div", { class: "tag-side" },
      h("section", { class: "card", id: "tag-live" },
        h("h2", {}, "Live value"),
        h("div", { class: "tag-reading" }, value, unit, quality),
        h("dl", { class: "facts" },
          h("dt", {}, "Age"), age,
          h("dt", {}, "Source time"), srcTime,
          h("dt", {}, "Rate"), rateEl,
          h("dt", {}, "Messages"), count),
        liveState),
      writeBox),
      h("section", { class: "card", id: "tag-history" },
        h("div", { class: "history-head" },
          h("h2", {}, "History"),
          h("div", { class: "ranges", role: "group", "aria-label": "Time range" }, rangeButtons, zoomOut),
          rangeText),
        message,
        chartBox,
        notes))));

  // ---- live value ----
  const node = { entry: null, prevN: 0, prevAt: 0 };
  const clock = new ServerClock();
  const es = new EventSource(liveUrl(topic));
  function take(entries) {
    clock.observe(entries);
    for (const e of entries) {
      if (e.topic !== topic) continue;
      if (e.gone) { node.entry = null; continue; }
      if (node.entry && e.n !== node.entry.n) { node.prevN = node.entry.n; node.prevAt = node.entry.at; }
      if (!node.entry) { node.prevN = e.n; node.prevAt = e.at; }
      node.entry = e;
    }
    drawLive();
  }
  es.addEventListener("snapshot", (ev) => {
    const entries = JSON.parse(ev.data);
    if (!entries.some((e) => e.topic === topic)) node.entry = null;
    take(entries);
  });
  es.addEventListener("update", (ev) => take(JSON.parse(ev.data)));
  es.onerror = () => {
    liveState.textContent = es.readyState === EventSource.CLOSED ? "The live value could not be followed." : "reconnecting…";
  };

  function drawLive() {
    const e = node.entry;
    if (!e) {
      value.textContent = "no value";
      replace(unit); replace(quality);
      age.textContent = srcTime.textContent = rateEl.textContent = count.textContent = "";
      liveState.textContent = "Nexus holds no value of this topic now.";
      return;
    }
    const now = clock.now();
    value.textContent = formatValue(e.v);
    unit.textContent = e.u || "";
    const tone = qualityTone(e.q);
    replace(quality, e.q ? h("span", { class: `pill ${tone === "none" ? "off" : tone}` }, e.q.replaceAll("_", " ")) : null);
    value.classList.toggle("bad", tone === "bad");
    const a = formatAge(now - e.at);
    age.textContent = a.startsWith("<") ? a : `${a} ago`;
    srcTime.textContent = typeof e.ts === "number" ? new Date(e.ts).toLocaleString() : "not given";
    rateEl.textContent = formatRate(rate(node, now)) || "–";
    count.textContent = e.n.toLocaleString();
    liveState.textContent = "live";
  }
  const ticker = setInterval(() => { if (node.entry) drawLive(); }, 1000);

  // ---- history ----
  let base = { label: "1 h", span: 60 * MIN };
  /** The range shown: relative (`span` back from now) or absolute (`from`, `to`) when zoomed. */
  let range = base;
  let chart = null;
  /** "raw" or "agg": what the chart was made for (a new kind needs a new chart). */
  let chartKind = null;
  /** The x range drawn (ms), read by the chart's scale. */
  const shown = { from: 0, to: 0 };
  let seq = 0;
  let refresh = null;

  function setRange(r) {
    if (r.span) base = r;
    range = r;
    for (const b of rangeButtons) b.setAttribute("aria-pressed", String(!range.from && b.dataset.range === base.label));
    zoomOut.hidden = !range.from;
    zoomOut.textContent = `Back to ${base.label}`;
    load();
  }

  async function load() {
    const mine = ++seq;
    clearTimeout(refresh);
    if (range.span) refresh = setTimeout(load, Math.max(10_000, range.span / 360));
    const to = range.to ?? Date.now();
    const from = range.from ?? to - range.span;
    rangeText.textContent = `${new Date(from).toLocaleString()} – ${new Date(to).toLocaleString()}`;
    const q = new URLSearchParams({ topic, from: String(Math.floor(from)), to: String(Math.ceil(to)), agg: "auto" });
    let answer;
    try {
      answer = await api("GET", `/api/v1/history?${q}`);
    } catch (e) {
      if (mine !== seq || !ctx.alive() || e.status === 401) return;
      showMessage(historyError(e), e.status === 404 ? "info" : "error");
      clearChart();
      return;
    }
    if (mine !== seq || !ctx.alive()) return;
    const points = Array.isArray(answer.points) ? answer.points : [];
    if (points.length === 0) {
      showMessage("No point of this topic in this range.", "info");
      clearChart();
      return;
    }
    const data = toSeries(answer.agg, points, from, to);
    if (!data.numeric) {
      showMessage(`The stored values of this topic are not numbers (the last: ${formatValue(points[points.length - 1].v)}); the chart draws numbers only.`, "info");
      clearChart();
      return;
    }
    message.hidden = true;
    const facts = [answer.agg === "raw" ? `${points.length.toLocaleString()} point${points.length === 1 ? "" : "s"}` : `${points.length.toLocaleString()} buckets of ${answer.agg} (average, min–max band)`];
    if (data.marked) facts.push(`${data.marked} of bad or uncertain quality, marked`);
    if (answer.truncated) facts.push("more points than one answer holds: zoom in to see them all");
    if (answer.incomplete) facts.push(`may lack recent points (${(answer.incomplete_reasons || []).join(", ") || "the historian is behind"})`);
    notes.textContent = facts.join(" · ");
    chartBox.dataset.points = String(points.length);
    chartBox.dataset.agg = answer.agg || "";
    await draw(data);
  }

  function showMessage(text, kind) {
    replace(message, text);
    message.className = `banner ${kind}`;
    message.hidden = false;
    notes.textContent = "";
  }

  function clearChart() {
    if (chart) { chart.destroy(); chart = null; }
    chartKind = null;
    replace(chartBox);
    chartBox.dataset.points = "0";
  }

  async function draw(data) {
    let uPlot;
    try {
      uPlot = await loadUplot();
    } catch (e) {
      showMessage(`The chart could not be loaded: ${e.message}`, "error");
      return;
    }
    if (!ctx.alive()) return;
    shown.from = data.from;
    shown.to = data.to;
    const kind = data.agg ? "agg" : "raw";
    if (chart && chartKind === kind) {
      chart.setData(data.series);
      return;
    }
    if (chart) chart.destroy();
    replace(chartBox);
    chart = new uPlot(options(data), data.series, chartBox);
    chartKind = kind;
  }

  function options(data) {
    const c = colors();
    const axis = { stroke: c.muted, grid: { stroke: c.line, width: 1 }, ticks: { stroke: c.line, width: 1 } };
    const series = [{}];
    if (data.agg) {
      series.push(
        { label: "average", stroke: c.accent, width: 1.5 },
        { label: "min", stroke: c.band, width: 1 },
        { label: "max", stroke: c.band, width: 1 },
      );
    } else {
      series.push(
        { label: "value", stroke: c.accent, width: 1.5, points: { size: 4 } },
        { label: "bad quality", stroke: c.bad, fill: c.bad, paths: () => null, points: { show: true, size: 8, stroke: c.bad, fill: c.bad } },
        { label: "uncertain", stroke: c.warn, fill: c.warn, paths: () => null, points: { show: true, size: 7, stroke: c.warn, fill: c.warn } },
      );
    }
    return {
      width: Math.max(300, chartBox.clientWidth),
      height: 320,
      series,
      bands: data.agg ? [{ series: [3, 2], fill: c.bandFill }] : [],
      scales: { x: { time: true, range: () => [shown.from / 1000, shown.to / 1000] } },
      axes: [axis, { ...axis, size: 60 }],
      legend: { show: true },
      cursor: { drag: { x: true, y: false, setScale: false } },
      hooks: {
        setSelect: [(u) => {
          if (u.select.width < 4) return;
          const from = u.posToVal(u.select.left, "x") * 1000;
          const to = u.posToVal(u.select.left + u.select.width, "x") * 1000;
          u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
          if (to - from >= 1000) setRange({ from, to });
        }],
      },
    };
  }

  const resize = new ResizeObserver(() => {
    if (chart && chartBox.clientWidth) chart.setSize({ width: chartBox.clientWidth, height: 320 });
  });
  resize.observe(chartBox);

  setRange(base);
  if (may("operator")) {
    writable(topic).then((found) => {
      if (!ctx.alive()) return;
      if (found) writeBox.append(writeForm(found, ctx));
      writeBox.dataset.write = found ? "form" : "none";
    });
  } else {
    writeBox.dataset.write = "not-offered";
  }

  return () => {
    es.close();
    clearInterval(ticker);
    clearTimeout(refresh);
    resize.disconnect();
    seq++;
    if (chart) chart.destroy();
  };
}

/**
 * `{device, tag}` (their configs) when `topic` is a writable tag of a configured device, else
 * null (not a device's tag, read-only, or the devices could not be read).
 */
async function writable(topic) {
  let list;
  try {
    list = await api("GET", "/api/v1/devices");
  } catch {
    return null;
  }
  for (const d of Array.isArray(list.devices) ? list.devices : []) {
    const c = d.config || {};
    const prefix = `${c.uns_prefix}/${c.id}/`;
    if (!topic.startsWith(prefix)) continue;
    const tag = (c.tags || []).find((t) => `${prefix}${t.id}` === topic);
    if (tag && (tag.access === "write" || tag.access === "readwrite")) return { device: c, tag };
  }
  return null;
}

/** The write form of a writable tag: a value input typed by its data type, confirm, Write. */
function writeForm({ device, tag }, ctx) {
  const type = tag.data_type || "";
  const kind = type === "bool" ? "bool" : type === "string" ? "text" : "number";
  const input = kind === "bool"
    ? h("input", { type: "checkbox", id: "write-value", class: "toggle", role: "switch" })
    : h("input", {
      type: kind === "number" ? "number" : "text", id: "write-value", class: "mono",
      step: kind === "number" ? "any" : null, autocomplete: "off",
    });
  const boolText = h("span", { class: "mono", id: "write-bool-text" }, "false");
  if (kind === "bool") input.addEventListener("change", () => { boolText.textContent = String(input.checked); });
  const confirm = h("input", { type: "checkbox", id: "write-confirm" });
  const submit = h("button", { type: "submit", class: "btn primary", id: "write-submit" }, "Write");
  const result = h("div", { id: "write-result", role: "status", "aria-live": "polite" });
  const limits = [];
  if (typeof tag.min === "number") limits.push(`min ${tag.min}`);
  if (typeof tag.max === "number") limits.push(`max ${tag.max}`);

  async function send(ev) {
    ev.preventDefault();
    let value;
    if (kind === "bool") value = input.checked;
    else if (kind === "text") value = input.value;
    else {
      value = Number(input.value);
      if (input.value.trim() === "" || !Number.isFinite(value)) {
        show("error", "Enter a number.");
        return;
      }
    }
    submit.disabled = true;
    show("info", "Writing…");
    try {
      const path = `/api/v1/commands/${encodeURIComponent(device.id)}/${encodeURIComponent(tag.id)}`;
      const answer = await api("POST", path, { body: { value, confirm: confirm.checked } });
      if (!ctx.alive()) return;
      if (answer && answer.success === true) {
        const facts = [`Written: ${formatValue(answer.value ?? value)}`];
        if ("old_value" in answer) facts.push(`was ${formatValue(answer.old_value)}`);
        if ("read_back" in answer) facts.push(`read back ${formatValue(answer.read_back)}`);
        if (typeof answer.duration_ms === "number") facts.push(`${+answer.duration_ms.toPrecision(3)} ms`);
        show("good", facts.join(" · "));
      } else {
        show("error", `Refused: ${(answer && answer.error) || "the command handler gave no reason"}`);
      }
    } catch (e) {
      if (!ctx.alive() || e.status === 401) return;
      show("error", writeError(e));
    } finally {
      submit.disabled = false;
    }
  }

  function show(kind, text) {
    result.className = `banner ${kind}`;
    result.dataset.outcome = kind;
    replace(result, text);
  }

  return h("form", { class: "card", id: "tag-write", onsubmit: send },
    h("h2", {}, "Write"),
    h("p", { class: "muted small" }, "Tag ", h("code", {}, tag.id), " of device ", h("code", {}, device.id), ` (${type}${tag.unit ? `, ${tag.unit}` : ""})`),
    h("div", { class: "field" },
      h("label", { for: "write-value" }, "Value"),
      kind === "bool" ? h("div", { class: "toggle-row" }, input, boolText) : input,
      limits.length ? h("p", { class: "muted small hint", id: "write-limits" }, limits.join(" · "), tag.unit ? ` ${tag.unit}` : "") : null),
    h("div", { class: "field check" },
      confirm, h("label", { for: "write-confirm" }, "confirm (read back)")),
    h("div", { class: "actions" }, submit),
    result);
}

/** A write's refusal by the orchestrator in words. */
function writeError(e) {
  if (e.status === 403) return `Not allowed: ${e.message}`;
  if (e.status === 504) return `No answer from the command handler: ${e.message}`;
  if (e.status === 503) return `Cannot write now: ${e.message}`;
  if (e.status === 0) return e.message;
  return `The write was refused: ${e.message}`;
}

/** The history's refusal in words. */
function historyError(e) {
  const why = e.message.replace(/\.$/, "");
  if (e.status === 404) return `No stored history for this topic (${why}).`;
  if (e.status === 503) return `The history is unavailable: ${why}. The live value above still updates.`;
  if (e.status === 0) return e.message;
  return `The history could not be read: ${e.message}`;
}

/**
 * uPlot's columns: raw points -> [x, value, bad, uncertain] (the marked points repeat their
 * value, others are null); aggregates -> [x, avg, min, max]. x in seconds.
 */
function toSeries(agg, points, from, to) {
  const x = points.map((p) => p.ts / 1000);
  if (agg && agg !== "raw") {
    const col = (k) => points.map((p) => (typeof p[k] === "number" ? p[k] : null));
    return { agg, from, to, numeric: true, marked: 0, series: [x, col("avg"), col("min"), col("max")] };
  }
  const num = (v) => (typeof v === "number" ? v : typeof v === "boolean" ? Number(v) : null);
  const y = points.map((p) => num(p.v));
  const bad = points.map((p, i) => (qualityTone(p.q) === "bad" ? y[i] : null));
  const unsure = points.map((p, i) => (qualityTone(p.q) === "warn" ? y[i] : null));
  const marked = points.filter((p) => ["bad", "warn"].includes(qualityTone(p.q))).length;
  return { agg: null, from, to, numeric: y.some((v) => v !== null), marked, series: [x, y, bad, unsure] };
}

/** The page's colours (light or dark, as the style sheet chose them) for the canvas. */
function colors() {
  const s = getComputedStyle(document.documentElement);
  const v = (name) => s.getPropertyValue(name).trim();
  const accent = v("--accent");
  return {
    accent, muted: v("--muted"), line: v("--line"), bad: v("--bad"), warn: v("--warn"),
    band: alpha(accent, 0.45),
    bandFill: alpha(accent, 0.18),
  };
}

/** `#rrggbb` with an opacity, as a canvas takes it. */
function alpha(hex, a) {
  if (!/^#[0-9a-f]{6}$/i.test(hex)) return hex;
  return hex + Math.round(a * 255).toString(16).padStart(2, "0");
}

/** test / plant / line-1 / ...: each level a link to the namespace below it. */
function crumbs(levels) {
  const out = [h("a", { href: "#/namespace" }, "Namespace")];
  for (let i = 0; i < levels.length - 1; i++) {
    const prefix = levels.slice(0, i + 1).join("/");
    out.push(" / ", h("a", { href: `#/namespace?filter=${encodeURIComponent(`${prefix}/#`)}` }, levels[i] || "(empty)"));
  }
  return out;
}

// Overview: every service and every configured device with its state, live from the status
// stream (GET /api/v1/status/stream: the status whenever it changed); each device links to its
// topics in the namespace (its prefix from GET /api/v1/devices, read once). The active alarms are
// counted from GET /api/v1/alarms, again whenever the stream says an alarm changed. Ingestion's
// status carries its figures
// (WAL use, database up, points per second), the devices' status their poll statistics; both are
// republished every few seconds (docs/contract.md, "Status topics").

import { api } from "../lib/api.js";
import { h, replace, ago, pill } from "../lib/dom.js";
import { followStatus } from "../lib/live.js";

export const title = "Overview";

export function render(view, ctx) {
  const stamp = h("span", { class: "muted", id: "overview-updated" }, "loading…");
  const banner = h("p", { class: "banner error", role: "alert", hidden: true });
  const summary = h("div", { class: "tiles", id: "overview-tiles" });
  const services = h("tbody", { id: "services-body" });
  const devices = h("tbody", { id: "devices-body" });
  const platform = h("dl", { class: "facts", id: "platform" });

  view.append(h("section", { class: "page" },
    h("div", { class: "page-head" }, h("h1", {}, "Overview"), stamp),
    banner,
    summary,
    h("div", { class: "stack" },
      h("section", { class: "card" },
        h("h2", {}, "Devices"),
        h("table", { class: "table", id: "overview-devices" },
          h("thead", {}, h("tr", {},
            h("th", {}, "Device"), h("th", {}, "State"), h("th", {}, "Breaker"),
            h("th", { title: "polls that read the device / that failed / skipped (the previous poll was still running)" }, "Polls ok/failed/skipped"),
            h("th", { title: "how long the last poll took" }, "Last poll"),
            h("th", {}, "Last error"), h("th", {}, "Updated"))),
          devices)),
      h("section", { class: "card" },
        h("h2", {}, "Services"),
        h("table", { class: "table", id: "overview-services" },
          h("thead", {}, h("tr", {},
            h("th", {}, "Service"), h("th", {}, "Instance"), h("th", {}, "State"),
            h("th", {}, "Version"), h("th", {}, "Reported"))),
          services),
        h("h2", {}, "Platform"),
        platform)),
  ));

  let last = null;
  let alarmCount = null;
  /** Device id -> its topics' MQTT filter, for devices of the devices file. */
  const topics = new Map();
  api("GET", "/api/v1/devices").then((list) => {
    for (const d of (list && list.devices) || []) {
      const prefix = d.config && d.config.uns_prefix;
      if (prefix) topics.set(d.id, `${prefix}/${d.id}/#`);
    }
    if (last && ctx.alive()) draw(last);
  }, () => { /* without the prefixes the devices are listed without their topics' link */ });
  async function countAlarms() {
    try {
      const a = await api("GET", "/api/v1/alarms");
      // The count is left out (not shown as 0) when the alarms cannot be read.
      alarmCount = a && Array.isArray(a.alarms) ? a.alarms.length : null;
    } catch (e) {
      if (e.status === 401) return;
      alarmCount = null;
    }
    if (last && ctx.alive()) draw(last);
  }
  /** The stream was refused: the status route says why (the session ended: the login page). */
  async function explain() {
    let why = "the server refused the live status";
    try {
      await api("GET", "/api/v1/status");
    } catch (e) {
      if (e.status === 401) return;
      why = e.message;
    }
    if (!ctx.alive()) return;
    replace(banner, `${why}; trying again`, last ? " (showing the last status)" : "");
    banner.hidden = false;
  }
  const close = followStatus({
    onStatus(status) {
      last = status;
      banner.hidden = true;
      draw(last);
      replace(stamp, `live · updated ${new Date().toLocaleTimeString()}`);
    },
    onAlarms: countAlarms,
    onState(state) {
      stamp.dataset.state = state;
      if (state === "reconnecting") replace(stamp, "reconnecting…");
      if (state === "closed") explain();
    },
  });

  function draw(s) {
    const devs = Object.entries(s.devices || {}).sort(([a], [b]) => a.localeCompare(b));
    const svcs = Object.entries(s.services || {}).sort(([a], [b]) => a.localeCompare(b));
    const count = (list, state) => list.filter(([, v]) => v && v.state === state).length;
    const ingest = svcs.filter(([k]) => k.startsWith("ingest/"));
    // Disabled devices are listed, not counted.
    const polled = devs.length - count(devs, "disabled");
    replace(summary,
      tile("Devices online", `${count(devs, "online")} / ${polled}`, count(devs, "online") === polled ? "good" : "warn"),
      tile("Devices offline", count(devs, "offline"), count(devs, "offline") ? "bad" : "good"),
      tile("Services online", `${count(svcs, "online")} / ${svcs.length}`, count(svcs, "online") === svcs.length ? "good" : "warn"),
      alarmCount === null ? null : h("a", { class: "tile-link", href: "#/alarms", id: "tile-alarms" },
        tile("Active alarms", alarmCount, alarmCount ? "bad" : "good")),
      ingest.length ? tile(ingest.length === 1 ? "Ingestion" : "Ingestion instances online",
        ingest.length === 1 ? (ingest[0][1] && ingest[0][1].state) || "unknown" : `${count(ingest, "online")} / ${ingest.length}`,
        count(ingest, "online") === ingest.length ? "good" : "bad", "tile-ingest") : null,
      ...ingestTiles(ingest),
    );
    replace(devices, devs.length ? devs.map(([id, v]) => {
      const st = typeof v === "object" && v ? v : { state: "unknown", last_error: String(v) };
      return h("tr", { dataset: { device: id } },
        h("td", { class: "device-id" }, h("a", { href: `#/devices/${encodeURIComponent(id)}` }, id),
          topics.has(id) ? h("a", {
            class: "small topics-link", href: `#/namespace?filter=${encodeURIComponent(topics.get(id))}`,
            title: `the topics of ${id} in the namespace`,
          }, "topics") : null),
        h("td", { class: "state" }, pill(st.state)),
        h("td", { class: "breaker" }, pill(st.breaker)),
        h("td", { class: "polls num" }, st.polls
          ? [h("span", {}, String(st.polls.ok)), " / ",
            h("span", { class: st.polls.failed ? "err-text" : "" }, String(st.polls.failed)), " / ",
            h("span", { class: "muted" }, String(st.polls.skipped))]
          : h("span", { class: "muted" }, "–")),
        h("td", { class: "last-poll num" }, typeof st.last_poll_ms === "number" ? `${st.last_poll_ms} ms` : h("span", { class: "muted" }, "–")),
        h("td", { class: "last-error" }, st.last_error ? h("span", { class: "err-text", title: st.last_error }, st.last_error) : h("span", { class: "muted" }, "none")),
        h("td", { class: "muted" }, ago(st.ts)));
    }) : h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No device is configured.")));
    replace(services, svcs.length ? svcs.map(([key, v]) => {
      const [name, ...inst] = key.split("/");
      const st = typeof v === "object" && v ? v : { state: String(v) };
      return h("tr", { dataset: { service: key } },
        h("td", {}, name), h("td", { class: "muted" }, inst.join("/")),
        h("td", { class: "state" }, pill(st.state)),
        h("td", { class: "muted" }, st.version || ""),
        h("td", { class: "muted" }, ago(st.ts)));
    }) : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No service has reported yet.")));
    const p = s.platform || {};
    replace(platform, Object.entries(p).flatMap(([k, v]) => [
      h("dt", {}, k.replaceAll("_", " ")),
      h("dd", {}, fact(v)),
    ]));
  }

  return close;
}

/** Ingestion's figures over its online instances: the fullest WAL, the database as the
 * instances see it, points received per second in all. Nothing when no instance reports them. */
function ingestTiles(ingest) {
  const stats = ingest.map(([, v]) => v && v.state === "online" && v.stats).filter((x) => x && typeof x === "object");
  if (!stats.length) return [];
  const wal = Math.max(...stats.map((x) => Number(x.wal_used_ratio) || 0));
  const dbUp = stats.filter((x) => x.db_up === true).length;
  const rate = stats.reduce((a, x) => a + (Number(x.points_received_per_s) || 0), 0);
  const oldest = Math.max(...stats.map((x) => Number(x.oldest_unwritten_s) || 0));
  return [
    tile("WAL used", `${(wal * 100).toFixed(wal < 0.01 ? 2 : 1)} %`, wal < 0.5 ? "good" : wal < 0.8 ? "warn" : "bad", "tile-wal"),
    tile("Database", dbUp === stats.length ? "up" : stats.length === 1 ? "down" : `up ${dbUp} / ${stats.length}`,
      dbUp === stats.length ? "good" : "bad", "tile-db"),
    tile("Points/s received", rate >= 100 ? Math.round(rate).toLocaleString() : String(rate), "good", "tile-rate"),
    oldest > 10 ? tile("Oldest not yet stored", `${Math.round(oldest)} s`, "warn", "tile-oldest") : null,
  ];
}

function tile(label, value, tone, id) {
  return h("div", { class: `tile ${tone}`, id }, h("div", { class: "tile-value" }, String(value)), h("div", { class: "tile-label" }, label));
}

/** A platform fact in words: `{tcp: "0.0.0.0:1883", tls: null}` -> "tcp 0.0.0.0:1883". */
function fact(v) {
  if (v === null || v === undefined) return "none";
  if (typeof v === "boolean") return v ? "on" : "off";
  if (typeof v !== "object") return String(v);
  const parts = Object.entries(v).filter(([, x]) => x !== null && x !== undefined && x !== false)
    .map(([k, x]) => `${k} ${typeof x === "object" ? JSON.stringify(x) : x}`);
  return parts.length ? parts.join(" · ") : "none";
}

// Alarms (#/alarms): the alert service's alarms through this origin (docs/control.md, "One
// origin"; docs/alerts.md): the active ones from GET /api/v1/alarms, read again whenever the
// status stream says an alarm changed (GET /api/v1/status/stream), sortable by priority or time; for operators the ISA-18.2 actions (acknowledge with a comment,
// shelve for a while, unshelve, out of service, in service) as
// POST /api/v1/alarms/{rule id:topic}/{op}; the rules (GET /api/v1/rules); and the journal
// (GET /api/v1/alarms/journal: the alarm_events table, filtered). Viewers see no action.

import { api } from "../lib/api.js";
import { h, replace, toast } from "../lib/dom.js";
import { may } from "../lib/session.js";
import { formatValue, followStatus } from "../lib/live.js";

export const title = "Alarms";

const STATES = {
  active_unacked: ["active, unacknowledged", "bad"],
  active_acked: ["active, acknowledged", "warn"],
  rtn_unacked: ["returned, unacknowledged", "warn"],
  normal: ["normal", "good"],
};
const KINDS = ["activated", "cleared", "acknowledged", "shelved", "unshelved", "suppressed", "unsuppressed", "out_of_service", "in_service"];
const DONE = {
  ack: "Acknowledged", shelve: "Shelved", unshelve: "Unshelved",
  out_of_service: "Out of service", in_service: "In service",
};
const SHELVE_CHOICES = [["15 min", 15 * 60], ["1 h", 3600], ["8 h", 8 * 3600]];

/**
 * A severity (1-1000) as a priority name, by the bands of the names a rule may use
 * (low 250, medium 500, high 750, critical 1000; docs/alerts.md).
 */
export function priority(sev) {
  if (sev > 875) return ["critical", "bad"];
  if (sev > 625) return ["high", "bad"];
  if (sev > 375) return ["medium", "warn"];
  return ["low", "off"];
}

export function render(view, ctx) {
  const operator = may("operator");
  const status = h("span", { class: "muted small", id: "alarms-updated" }, "loading…");
  const message = h("div", { id: "alarms-message" });
  const body = h("div", { id: "alarms-body" });
  const rulesBody = h("div", { id: "rules-body" }, h("p", { class: "muted" }, "loading…"));
  const rulesCount = h("span", { class: "muted", id: "rules-count" });

  view.append(h("section", { class: "page" },
    h("div", { class: "page-head" }, h("h1", {}, "Alarms"), h("div", { class: "head-state" }, status)),
    operator ? null : h("p", { class: "banner info", id: "read-only" }, "You can look at the alarms; acting on them needs the operator role."),
    message,
    h("section", { class: "card", id: "alarms-active" }, h("h2", {}, "Active alarms"), body),
    h("details", { class: "card", id: "rules" }, h("summary", {}, "Rules ", rulesCount), rulesBody),
    journal(ctx)));

  // ---- active alarms ----
  let sort = { key: "priority", desc: true };
  let alarms = [];
  let drawn = "";
  /** The last refusal of an action, per alarm id, shown in its row until the next action. */
  const refusals = new Map();
  async function load() {
    try {
      const answer = await api("GET", "/api/v1/alarms");
      if (!ctx.alive()) return;
      alarms = Array.isArray(answer && answer.alarms) ? answer.alarms : [];
      replace(message);
      status.textContent = `${alarms.length} alarm${alarms.length === 1 ? "" : "s"} · updated ${new Date().toLocaleTimeString()}`;
      draw();
    } catch (e) {
      if (!ctx.alive() || e.status === 401) return;
      replace(message, h("p", { class: "banner error", role: "alert" }, `The alarms could not be read: ${e.message}`));
      status.textContent = "not updated";
    }
  }

  function draw(force = false) {
    const key = JSON.stringify([alarms, sort, [...refusals]]);
    if (!force && key === drawn) return;
    drawn = key;
    if (alarms.length === 0) {
      replace(body, h("p", { class: "muted", id: "alarms-none" }, "No alarm is active."));
      return;
    }
    const sorted = [...alarms].sort(compare(sort));
    replace(body, h("table", { class: "table", id: "alarms-table" },
      h("thead", {}, h("tr", {},
        h("th", {}, sortButton("priority", "Priority")),
        h("th", {}, "State"),
        h("th", {}, "Alarm"),
        h("th", { class: "num" }, "Value"),
        h("th", {}, sortButton("time", "State since")),
        h("th", {}, ""),
        operator ? h("th", {}, h("span", { class: "sr-only" }, "Actions")) : null)),
      h("tbody", {}, sorted.map(row))));
  }

  function sortButton(key, label) {
    const on = sort.key === key;
    return h("button", {
      type: "button", class: "sort", dataset: { sort: key },
      "aria-sort": on ? (sort.desc ? "descending" : "ascending") : null,
      onclick: () => { sort = { key, desc: on ? !sort.desc : true }; draw(); },
    }, label, on ? (sort.desc ? " ▼" : " ▲") : "");
  }

  function row(a) {
    const [stateText, stateTone] = STATES[a.state] || [String(a.state), "off"];
    const [prio, prioTone] = priority(a.severity);
    const shelved = typeof a.shelved_until === "number";
    const flags = [];
    if (shelved) flags.push(h("span", { class: "pill off", dataset: { flag: "shelved" } }, `shelved until ${new Date(a.shelved_until).toLocaleTimeString()}`));
    if (a.out_of_service) flags.push(h("span", { class: "pill off", dataset: { flag: "out_of_service" } }, "out of service"));
    if (a.suppressed) flags.push(h("span", { class: "pill off", dataset: { flag: "suppressed" } }, "suppressed"));
    const refusal = refusals.get(a.id);
    return h("tr", { dataset: { alarm: a.id, state: a.state } },
      h("td", {}, h("span", { class: `pill prio ${prioTone}`, title: `severity ${a.severity}` }, prio), h("div", { class: "muted small" }, String(a.severity))),
      h("td", {}, h("span", { class: `pill state ${stateTone}` }, stateText)),
      h("td", { class: "alarm-topic" },
        h("div", {}, a.message || a.rule_id),
        h("div", { class: "muted small" }, h("code", {}, a.rule_id), " on ",
          h("a", { href: `#/tag/${encodeURIComponent(a.topic)}`, class: "mono" }, a.topic))),
      h("td", { class: "num mono" }, formatValue(a.value)),
      h("td", { class: "small" }, typeof a.since === "number" ? new Date(a.since).toLocaleString() : ""),
      h("td", { class: "alarm-flags" }, flags),
      operator ? h("td", { class: "alarm-actions" }, actions(a, shelved),
        refusal ? h("span", { class: "err-text small", dataset: { refusal: "" } }, refusal) : null) : null);
  }

  function actions(a, shelved) {
    const b = (op, label, onclick) => h("button", { type: "button", class: "btn small", dataset: { action: op }, onclick }, label);
    const out = [];
    if (a.state === "active_unacked" || a.state === "rtn_unacked") out.push(b("ack", "Acknowledge", () => ack(a)));
    out.push(shelved ? b("unshelve", "Unshelve", () => act(a, "unshelve", {})) : b("shelve", "Shelve", () => shelve(a)));
    out.push(a.out_of_service
      ? b("in_service", "In service", () => act(a, "in_service", {}))
      : b("out_of_service", "Out of service", () => act(a, "out_of_service", {})));
    return out;
  }

  async function ack(a) {
    const got = await ask({ title: "Acknowledge", alarm: a, confirmLabel: "Acknowledge" });
    if (got) act(a, "ack", { comment: got.comment });
  }

  async function shelve(a) {
    const got = await ask({ title: "Shelve", alarm: a, confirmLabel: "Shelve", shelve: true });
    if (got) act(a, "shelve", { duration_s: got.duration_s, comment: got.comment });
  }

  async function act(a, op, payload) {
    const body = {};
    if (payload.comment) body.comment = payload.comment;
    if (payload.duration_s !== undefined) body.duration_s = payload.duration_s;
    refusals.delete(a.id);
    try {
      await api("POST", `/api/v1/alarms/${encodeURIComponent(a.id)}/${op}`, { body });
      if (!ctx.alive()) return;
      toast(`${DONE[op]}: ${a.rule_id} on ${a.topic}`);
    } catch (e) {
      if (!ctx.alive() || e.status === 401) return;
      const why = e.status === 404 ? `Unknown alarm: ${e.message}`
        : e.status === 409 ? `Refused in this state: ${e.message}`
          : e.status === 403 ? `Not allowed: ${e.message}`
            : e.message;
      refusals.set(a.id, why);
      toast(why, "error");
    }
    load();
  }

  // ---- rules ----
  (async () => {
    try {
      const answer = await api("GET", "/api/v1/rules");
      if (!ctx.alive()) return;
      const rules = Array.isArray(answer && answer.rules) ? answer.rules : [];
      rulesCount.textContent = `(${rules.length})`;
      replace(rulesBody, rules.length === 0
        ? h("p", { class: "muted" }, "No alarm rule is configured (alerts.rules).")
        : h("table", { class: "table", id: "rules-table" },
          h("thead", {}, h("tr", {}, h("th", {}, "Rule"), h("th", {}, "Topic filter"), h("th", {}, "Priority"),
            h("th", {}, "Condition"), h("th", {}, "Message"), h("th", { class: "num" }, "On / off delay"))),
          h("tbody", {}, rules.map((r) => h("tr", { dataset: { rule: r.id } },
            h("td", {}, h("code", {}, r.id)),
            h("td", { class: "mono" }, r.topic),
            h("td", {}, `${priority(r.severity)[0]} (${r.severity})`),
            h("td", { class: "mono small" }, r.condition),
            h("td", {}, r.message),
            h("td", { class: "num" }, `${(r.on_delay_ms ?? 0) / 1000} s / ${(r.off_delay_ms ?? 0) / 1000} s`))))));
    } catch (e) {
      if (!ctx.alive() || e.status === 401) return;
      replace(rulesBody, h("p", { class: "banner error" }, `The rules could not be read: ${e.message}`));
    }
  })();

  // Read now, and again whenever an alarm changes (the stream also says so when it opens).
  load();
  return followStatus({ onAlarms: load });
}

function compare(sort) {
  const dir = sort.desc ? -1 : 1;
  const time = (a) => (typeof a.since === "number" ? a.since : 0);
  return (a, b) => {
    const primary = sort.key === "priority" ? (a.severity - b.severity) || (time(a) - time(b)) : (time(a) - time(b)) || (a.severity - b.severity);
    return dir * primary || String(a.id).localeCompare(String(b.id));
  };
}

/**
 * The action's dialog: a comment, and for shelving a duration (15 min, 1 h, 8 h, or minutes
 * entered). Resolves `{comment, duration_s}` or null when cancelled.
 */
function ask({ title, alarm, confirmLabel, shelve = false }) {
  return new Promise((resolve) => {
    const dlg = h("dialog", { class: "dialog", id: "alarm-dialog", "aria-labelledby": "dlg-title" });
    const comment = h("textarea", { id: "action-comment", rows: 2, maxlength: 1000 });
    const minutes = h("input", { type: "number", id: "shelve-minutes", min: 1, step: 1, placeholder: "minutes" });
    const error = h("p", { class: "err-text small", id: "dialog-error", hidden: true });
    let chosen = null;
    const choiceButtons = SHELVE_CHOICES.map(([label, s]) => h("button", {
      type: "button", class: "btn small", dataset: { duration: String(s) }, "aria-pressed": "false",
      onclick: () => { chosen = s; minutes.value = ""; mark(); },
    }, label));
    const mark = () => choiceButtons.forEach((b) => b.setAttribute("aria-pressed", String(Number(b.dataset.duration) === chosen)));
    minutes.addEventListener("input", () => { chosen = null; mark(); });
    const done = (v) => { dlg.close(); dlg.remove(); resolve(v); };
    const ok = () => {
      let duration_s;
      if (shelve) {
        const m = Number(minutes.value);
        duration_s = chosen ?? (minutes.value.trim() !== "" && Number.isInteger(m) && m > 0 ? m * 60 : null);
        if (!duration_s) {
          error.textContent = "Choose how long, or enter a whole number of minutes.";
          error.hidden = false;
          return;
        }
      }
      done({ comment: comment.value.trim(), duration_s });
    };
    replace(dlg,
      h("h2", { id: "dlg-title" }, title),
      h("p", {}, h("code", {}, alarm.rule_id), " on ", h("span", { class: "mono" }, alarm.topic)),
      shelve ? h("div", { class: "field" }, h("label", { for: "shelve-minutes" }, "For"),
        h("div", { class: "shelve-choices" }, choiceButtons, minutes)) : null,
      h("div", { class: "field" }, h("label", { for: "action-comment" }, "Comment"), comment),
      error,
      h("div", { class: "actions" },
        h("button", { type: "button", class: "btn", onclick: () => done(null) }, "Cancel"),
        h("button", { type: "button", class: "btn primary", id: "dialog-ok", onclick: ok }, confirmLabel)));
    dlg.addEventListener("cancel", (e) => { e.preventDefault(); done(null); });
    document.body.append(dlg);
    dlg.showModal();
  });
}

/** The journal: GET /api/v1/alarms/journal with its filters, newest first. */
function journal(ctx) {
  const local = (ms) => {
    const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60_000);
    return d.toISOString().slice(0, 16);
  };
  const now = Date.now();
  const field = (id, label, input) => h("div", { class: "field" }, h("label", { for: id }, label), input);
  const from = h("input", { type: "datetime-local", id: "journal-from", value: local(now - 24 * 3600_000) });
  const to = h("input", { type: "datetime-local", id: "journal-to" });
  const rule = h("input", { type: "text", id: "journal-rule", placeholder: "any" });
  const topic = h("input", { type: "text", id: "journal-topic", placeholder: "MQTT filter, e.g. plant/#" });
  const user = h("input", { type: "text", id: "journal-user", placeholder: "any" });
  const kind = h("select", { id: "journal-kind" }, h("option", { value: "" }, "any"), KINDS.map((k) => h("option", { value: k }, k.replaceAll("_", " "))));
  const limit = h("input", { type: "number", id: "journal-limit", min: 1, max: 10000, value: "200" });
  const out = h("div", { id: "journal-body" });
  const note = h("p", { class: "muted small", id: "journal-note" });

  async function search(ev) {
    if (ev) ev.preventDefault();
    const q = new URLSearchParams();
    const f = from.value ? new Date(from.value).getTime() : null;
    const t = to.value ? new Date(to.value).getTime() : null;
    if (Number.isFinite(f)) q.set("from", String(f));
    if (Number.isFinite(t)) q.set("to", String(t));
    for (const [k, el] of [["rule", rule], ["topic", topic], ["user", user], ["kind", kind], ["limit", limit]]) {
      if (el.value.trim() !== "") q.set(k, el.value.trim());
    }
    replace(out, h("p", { class: "muted" }, "loading…"));
    note.textContent = "";
    let answer;
    try {
      answer = await api("GET", `/api/v1/alarms/journal?${q}`);
    } catch (e) {
      if (!ctx.alive() || e.status === 401) return;
      const why = e.status === 503 ? `The journal is unavailable: ${e.message}` : `The journal could not be read: ${e.message}`;
      replace(out, h("p", { class: "banner error", id: "journal-error", role: "alert" }, why));
      return;
    }
    if (!ctx.alive()) return;
    const events = Array.isArray(answer && answer.events) ? answer.events : [];
    note.textContent = `${events.length} event${events.length === 1 ? "" : "s"}, newest first${answer.truncated ? " · more matched than the limit: narrow the filters or raise it" : ""}`;
    replace(out, events.length === 0
      ? h("p", { class: "muted", id: "journal-none" }, "No event matches.")
      : h("table", { class: "table", id: "journal-table" },
        h("thead", {}, h("tr", {}, ["Time", "Event", "State", "Priority", "Rule", "Topic", "Value", "User", "Comment"].map((c) => h("th", {}, c)))),
        h("tbody", {}, events.map((e) => h("tr", { dataset: { kind: e.kind } },
          h("td", { class: "small nowrap" }, typeof e.time === "number" ? new Date(e.time).toLocaleString() : String(e.time ?? "")),
          h("td", {}, String(e.kind ?? "").replaceAll("_", " ")),
          h("td", {}, (STATES[e.state] || [e.state ?? ""])[0]),
          h("td", { class: "nowrap" }, typeof e.severity === "number" ? `${priority(e.severity)[0]} (${e.severity})` : ""),
          h("td", {}, h("code", {}, e.rule_id ?? "")),
          h("td", { class: "mono alarm-topic" }, e.topic ?? ""),
          h("td", { class: "num mono" }, formatValue(e.value)),
          h("td", {}, e.user ?? ""),
          h("td", {}, e.comment ?? ""))))));
  }

  const form = h("form", { class: "journal-filters", id: "journal-form", onsubmit: search },
    field("journal-from", "From", from), field("journal-to", "To (empty: now)", to),
    field("journal-rule", "Rule", rule), field("journal-topic", "Topic", topic),
    field("journal-user", "User", user), field("journal-kind", "Event", kind),
    field("journal-limit", "At most", limit),
    h("div", { class: "field" }, h("button", { type: "submit", class: "btn primary", id: "journal-search" }, "Search")));
  search();
  return h("section", { class: "card", id: "journal" }, h("h2", {}, "Journal"), form, note, out);
}

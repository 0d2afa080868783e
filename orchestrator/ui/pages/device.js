// One device: #/devices/new adds one, #/devices/<id> shows it (and edits it, for an admin).
// Modbus devices get a form (connection and tags); other protocols are edited as JSON.
// "Validate" asks the API for a dry run and shows each problem next to its field, as saving
// does: the problems' `field` is the path inside the device object (`tags[2].address`).
// "Test connection" sends the device as it would be saved to POST /api/v1/test-connection (each
// tag read once, on sessions apart from the running gateway's); for an OPC UA device a panel
// beside the JSON browses the server (POST /api/v1/browse) and adds a Variable to the tags.

import { api } from "../lib/api.js";
import { h, replace, pill, toast } from "../lib/dom.js";
import { may } from "../lib/session.js";
import { explain } from "./devices.js";

export const title = "Device";

const DATA_TYPES = ["bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"];
const ACCESS = ["read", "write", "readwrite"];

const TEMPLATES = {
  modbus: () => ({
    id: "", protocol: "modbus", uns_prefix: "", poll_interval: "1s",
    connection: { host: "", port: 502, unit_id: 1, timeout: "1s" },
    tags: [{ id: "", address: "HR:0", data_type: "uint16" }],
  }),
  opcua: () => ({
    id: "", protocol: "opcua", uns_prefix: "", poll_interval: "1s",
    connection: { endpoint: "opc.tcp://host:4840/" },
    tags: [{ id: "", node_id: "ns=2;s=...", data_type: "float64" }],
  }),
  s7: () => ({
    id: "", protocol: "s7", uns_prefix: "", poll_interval: "1s",
    connection: { host: "", rack: 0, slot: 1 },
    tags: [{ id: "", address: "DB1.DBW0", data_type: "int" }],
  }),
};

export function render(view, ctx) {
  const isNew = ctx.params.id === null;
  const page = h("section", { class: "page" }, h("p", { class: "muted" }, "Loading…"));
  view.append(page);

  (async () => {
    let config, status = null, version = null, editable = false, reason = null;
    try {
      const [one, list] = await Promise.all([
        isNew ? null : api("GET", `/api/v1/devices/${encodeURIComponent(ctx.params.id)}`),
        api("GET", "/api/v1/devices"),
      ]);
      editable = list.editable === true;
      reason = list.reason;
      version = isNew ? list.version : (one.version ?? list.version);
      config = isNew ? TEMPLATES.modbus() : one.config;
      status = isNew ? null : one.status;
    } catch (e) {
      if (!ctx.alive() || e.status === 401) return;
      replace(page, h("h1", {}, isNew ? "Add device" : ctx.params.id),
        h("p", { class: "banner error", role: "alert" }, e.status === 404 ? `There is no device ${ctx.params.id}.` : e.message),
        h("a", { href: "#/devices" }, "Back to the devices"));
      return;
    }
    if (!ctx.alive()) return;
    const readOnly = !may("admin") || !editable;
    if (isNew && readOnly) {
      replace(page, h("h1", {}, "Add device"),
        h("p", { class: "banner warn" }, !may("admin") ? "Adding a device needs the admin role." : `Devices cannot be changed here: ${reason || "the configuration is not editable."}`),
        h("a", { href: "#/devices" }, "Back to the devices"));
      return;
    }
    draw(page, ctx, { isNew, config, status, version, readOnly, reason });
  })();
}

function draw(page, ctx, st) {
  const { isNew, readOnly } = st;
  const summary = h("div", { class: "problems", id: "problems", role: "alert", hidden: true });
  const editorBox = h("div");
  let editor;

  const protocolSelect = h("select", { id: "protocol", name: "protocol" },
    Object.keys(TEMPLATES).map((p) => h("option", { value: p }, p)));
  protocolSelect.value = st.config.protocol || "modbus";
  protocolSelect.addEventListener("change", () => {
    st.config = TEMPLATES[protocolSelect.value]();
    mount();
  });

  function mount() {
    editor = st.config.protocol === "modbus" ? modbusEditor(st.config, readOnly) : jsonEditor(st.config, readOnly, ctx);
    testBox.hidden = true;
    replace(editorBox, editor.el);
    clearProblems();
  }

  function clearProblems() {
    summary.hidden = true;
    replace(summary);
    editor.clear();
  }

  function showProblems(headline, problems, tone = "error") {
    editor.clear();
    const unplaced = [];
    for (const p of problems) {
      if (!editor.place(String(p.field || ""), String(p.message || ""))) unplaced.push(p);
    }
    summary.className = `problems ${tone}`;
    replace(summary,
      h("p", { class: "problems-head" }, headline),
      problems.length ? h("ul", {}, problems.map((p) => h("li", {},
        p.field ? h("code", {}, p.field) : null, p.field ? ": " : null, p.message))) : null);
    summary.hidden = false;
    if (!unplaced.length) {
      const first = editor.el.querySelector("[aria-invalid=true]");
      if (first) first.focus();
    }
  }

  async function validate() {
    let body;
    try { body = editor.value(); } catch (e) { showProblems(e.message, []); return; }
    const url = isNew ? "/api/v1/devices?dry_run=true" : `/api/v1/devices/${encodeURIComponent(st.config.id)}?dry_run=true`;
    try {
      await api(isNew ? "POST" : "PUT", url, { body });
      editor.clear();
      summary.className = "problems ok";
      replace(summary, h("p", { class: "problems-head" }, "Valid: Nexus would accept this device."));
      summary.hidden = false;
    } catch (e) {
      refused(e);
    }
  }

  async function save() {
    let body;
    try { body = editor.value(); } catch (e) { showProblems(e.message, []); return; }
    saveBtn.disabled = true;
    try {
      if (isNew) {
        await api("POST", "/api/v1/devices", { body });
        toast(`${body.id} added.`);
      } else {
        await api("PUT", `/api/v1/devices/${encodeURIComponent(st.config.id)}`, {
          body, headers: st.version ? { "If-Match": st.version } : {},
        });
        toast(`${body.id} saved.`);
      }
      ctx.navigate("#/devices");
    } catch (e) {
      refused(e);
    } finally {
      saveBtn.disabled = false;
    }
  }

  // The device as the form would save it, opened by Nexus on pools of its own (the running
  // gateway is not touched): each tag read once, or why the device did not answer.
  const testBox = h("div", { class: "card test-result", id: "test-result", hidden: true, "aria-live": "polite" });
  async function testConnection() {
    let body;
    try { body = editor.value(); } catch (e) { showProblems(e.message, []); return; }
    clearProblems();
    testBtn.disabled = true;
    testBtn.setAttribute("aria-busy", "true");
    replace(testBtn, "Testing…");
    testBox.hidden = false;
    replace(testBox, h("p", { class: "muted" }, `Connecting to ${body.id || "the device"} and reading each tag once (up to 30 s)…`));
    try {
      const r = await api("POST", "/api/v1/test-connection", { body });
      if (!ctx.alive()) return;
      const tags = Array.isArray(r.tags) ? r.tags : [];
      const ms = typeof r.duration_ms === "number" ? `${Math.round(r.duration_ms)} ms` : "";
      replace(testBox,
        h("p", { class: `banner ${r.ok ? "good" : "error"}`, id: "test-verdict" },
          r.ok ? `Connected: every tag read with good quality (${ms}).`
            : r.error ? `Failed after ${ms}: ${r.error}` : `Connected, but not every tag read with good quality (${ms}).`),
        tags.length ? h("table", { class: "table", id: "test-tags" },
          h("thead", {}, h("tr", {}, h("th", {}, "Tag"), h("th", {}, "Value"), h("th", {}, "Quality"), h("th", {}, "Error"))),
          h("tbody", {}, tags.map((t) => h("tr", { dataset: { tag: String(t.tag ?? "") } },
            h("td", { class: "mono" }, String(t.tag ?? "")),
            h("td", { class: "mono value" }, t.v === undefined || t.v === null ? h("span", { class: "muted" }, "none") : typeof t.v === "object" ? JSON.stringify(t.v) : String(t.v)),
            h("td", {}, h("span", { class: `pill ${t.q === "good" ? "good" : t.q === "bad" ? "bad" : "warn"}` }, String(t.q ?? ""))),
            h("td", { class: "err-text" }, t.error ? String(t.error) : ""))))) : null);
    } catch (e) {
      if (!ctx.alive()) return;
      if (e.status === 422) {
        testBox.hidden = true;
        refused(e);
      } else if (e.status !== 401) {
        replace(testBox, h("p", { class: "banner error", id: "test-verdict" }, `Test refused: ${explain(e)}`));
      }
    } finally {
      testBtn.disabled = false;
      testBtn.removeAttribute("aria-busy");
      replace(testBtn, "Test connection");
    }
  }

  function refused(e) {
    if (e.status === 401) return;
    if (e.status === 422) {
      const n = e.problems.length;
      showProblems(n ? `${n} ${n === 1 ? "problem" : "problems"}: fix the marked ${n === 1 ? "field" : "fields"}.` : e.message, e.problems);
    } else if (e.status === 412) {
      showProblems("Someone else changed the devices since this page was opened.", []);
      summary.append(h("button", { type: "button", class: "btn small", onclick: () => ctx.navigate(location.hash) }, "Reload the device"));
    } else {
      showProblems(explain(e), []);
    }
  }

  const saveBtn = h("button", { type: "submit", class: "btn primary", id: "save" }, isNew ? "Add device" : "Save changes");
  const testBtn = h("button", { type: "button", class: "btn", id: "test-connection", onclick: testConnection }, "Test connection");
  const form = h("form", { class: "device-form", id: "device-form", novalidate: true },
    summary,
    isNew ? h("div", { class: "card" }, h("div", { class: "field inline" }, h("label", { for: "protocol" }, "Protocol"), protocolSelect)) : null,
    editorBox,
    readOnly ? null : testBox,
    readOnly ? null : h("div", { class: "form-actions" },
      h("button", { type: "button", class: "btn", id: "validate", onclick: validate }, "Validate"),
      testBtn,
      saveBtn,
      h("a", { class: "btn ghost", href: "#/devices" }, "Cancel")),
  );
  form.addEventListener("submit", (e) => { e.preventDefault(); save(); });

  const s = st.status;
  replace(page,
    h("div", { class: "page-head" },
      h("h1", {}, isNew ? "Add device" : st.config.id),
      !isNew && s ? h("span", { class: "head-state" }, pill(st.config.enabled === false ? "disabled" : s.state), " breaker ", pill(s.breaker)) : null),
    h("p", { class: "crumbs" }, h("a", { href: "#/devices" }, "Devices"), " / ", isNew ? "new" : st.config.id),
    !isNew && s && s.last_error ? h("p", { class: "banner error" }, "Last error: ", s.last_error) : null,
    readOnly ? h("p", { class: "banner info", id: "read-only" }, may("admin") ? `Devices cannot be changed here: ${st.reason || "the configuration is not editable."}` : "Read only: changing a device needs the admin role.") : null,
    form);
  mount();
}

// --- Modbus form -----------------------------------------------------------------------------

/** A field: label, input, and the place for its problem. Registered under `path`. */
function field(fields, path, label, input, hint) {
  const err = h("p", { class: "field-error", id: `err-${cssId(path)}`, hidden: true });
  input.dataset.field = path;
  input.id = input.id || `f-${cssId(path)}`;
  fields.set(path, { input, err });
  return h("div", { class: "field" }, h("label", { for: input.id }, label), input, hint ? h("p", { class: "hint" }, hint) : null, err);
}

function cssId(path) {
  return path.replace(/[^a-zA-Z0-9_-]/g, "-");
}

function text(name, value, attrs = {}) {
  return h("input", { name, value: value ?? "", autocomplete: "off", spellcheck: "false", ...attrs });
}

function select(name, options, value) {
  const s = h("select", { name }, options.map((o) => h("option", { value: o }, o)));
  if (value !== undefined && !options.includes(value)) s.append(h("option", { value }, value));
  s.value = value ?? options[0];
  return s;
}

/** "502" -> 502; "" -> undefined (left out: the default); anything else as typed (the API says why). */
function int(v) {
  const t = v.trim();
  if (t === "") return undefined;
  return /^-?\d+$/.test(t) ? Number(t) : t;
}

function setOrDelete(obj, key, value) {
  if (value === undefined || value === "") delete obj[key];
  else obj[key] = value;
}

function modbusEditor(config, readOnly) {
  const fields = new Map();
  const conn = config.connection || {};
  const f = {
    id: text("id", config.id),
    uns_prefix: text("uns_prefix", config.uns_prefix, { placeholder: "enterprise/site/area/line" }),
    poll_interval: text("poll_interval", config.poll_interval, { placeholder: "1s" }),
    enabled: h("input", { type: "checkbox", name: "enabled", checked: config.enabled !== false }),
    host: text("connection.host", conn.host, { placeholder: "192.168.1.10" }),
    port: text("connection.port", conn.port, { inputmode: "numeric", placeholder: "502" }),
    unit_id: text("connection.unit_id", conn.unit_id, { inputmode: "numeric", placeholder: "1" }),
    timeout: text("connection.timeout", conn.timeout, { placeholder: "1s" }),
  };
  const existing = !!config.id;
  if (existing) f.id.readOnly = true;
  const otherConn = Object.keys(conn).filter((k) => !["host", "port", "unit_id", "timeout"].includes(k));

  const tbody = h("tbody", { id: "tags-body" });
  const rows = [];
  function addRow(tag) {
    const r = {
      original: tag,
      id: text("tag-id", tag.id, { "aria-label": "Tag id" }),
      address: text("tag-address", tag.address, { "aria-label": "Address", placeholder: "HR:0" }),
      data_type: select("tag-data_type", DATA_TYPES, tag.data_type),
      unit: text("tag-unit", tag.unit, { "aria-label": "Unit", placeholder: "none" }),
      access: select("tag-access", ACCESS, tag.access ?? "read"),
    };
    r.data_type.setAttribute("aria-label", "Data type");
    r.access.setAttribute("aria-label", "Access");
    const extra = Object.keys(tag).filter((k) => !["id", "address", "data_type", "unit", "access"].includes(k));
    r.tr = h("tr", {},
      ["id", "address", "data_type", "unit", "access"].map((k) => h("td", {}, r[k], h("p", { class: "field-error", hidden: true }))),
      h("td", { class: "row-actions" },
        extra.length ? h("span", { class: "extra", title: "Also set, kept as they are:\n" + extra.map((k) => `${k}: ${JSON.stringify(tag[k])}`).join("\n") }, `+${extra.length} more`) : null,
        readOnly ? null : h("button", {
          type: "button", class: "btn small ghost", "aria-label": "Remove tag", title: "Remove tag",
          onclick: () => { rows.splice(rows.indexOf(r), 1); r.tr.remove(); renumber(); },
        }, "✕")));
    rows.push(r);
    tbody.append(r.tr);
    renumber();
  }
  // Each row's inputs are registered under tags[i].<key>, i its position now.
  function renumber() {
    for (const k of [...fields.keys()]) if (k.startsWith("tags[")) fields.delete(k);
    rows.forEach((r, i) => {
      for (const k of ["id", "address", "data_type", "unit", "access"]) {
        const path = `tags[${i}].${k}`;
        r[k].dataset.field = path;
        fields.set(path, { input: r[k], err: r[k].nextElementSibling });
      }
      fields.set(`tags[${i}]`, { input: r.id, err: r.id.nextElementSibling });
    });
  }
  (config.tags || []).forEach(addRow);

  const el = h("div", { class: "modbus" },
    h("div", { class: "grid2" },
      h("fieldset", { class: "card" }, h("legend", {}, "Device"),
        field(fields, "id", "Id", f.id, existing ? null : "letters, digits, - _ . (one topic level)"),
        field(fields, "uns_prefix", "Namespace prefix", f.uns_prefix, "values go to <prefix>/<id>/<tag>"),
        field(fields, "poll_interval", "Poll interval", f.poll_interval, "e.g. 500ms, 1s; at least 10ms"),
        field(fields, "enabled", "Enabled", f.enabled)),
      h("fieldset", { class: "card" }, h("legend", {}, "Modbus TCP connection"),
        field(fields, "connection.host", "Host", f.host),
        h("div", { class: "row2" },
          field(fields, "connection.port", "Port", f.port),
          field(fields, "connection.unit_id", "Unit id", f.unit_id)),
        field(fields, "connection.timeout", "Timeout", f.timeout, "e.g. 1s"),
        otherConn.length ? h("p", { class: "hint" }, "Also set in the file, kept as they are: ", otherConn.map((k) => `${k}: ${JSON.stringify(conn[k])}`).join(", ")) : null,
        h("p", { class: "field-error", hidden: true, id: "err-connection" }))),
    h("fieldset", { class: "card" }, h("legend", {}, "Tags"),
      h("p", { class: "field-error", hidden: true, id: "err-tags" }),
      h("table", { class: "table tags", id: "tags-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "Id"), h("th", {}, "Address"), h("th", {}, "Data type"),
          h("th", {}, "Unit"), h("th", {}, "Access"), h("th", {}, h("span", { class: "sr-only" }, "Remove")))),
        tbody),
      readOnly ? null : h("button", { type: "button", class: "btn small", id: "add-tag", onclick: () => { addRow({ id: "", address: "", data_type: "uint16" }); rows[rows.length - 1].id.focus(); } }, "Add tag"),
      h("p", { class: "hint" }, "Addresses: HR:100, IR:5, CO:1, DI:7, a bit of a register HR:100.3. Other tag settings (scale, deadband, min/max, ...) are kept as they are in the file.")));
  fields.set("connection", { input: f.host, err: el.querySelector("#err-connection") });
  fields.set("tags", { input: null, err: el.querySelector("#err-tags") });
  if (readOnly) {
    for (const i of el.querySelectorAll("input, select")) {
      i.disabled = true;
      i.removeAttribute("placeholder");
    }
    for (const hint of el.querySelectorAll(".hint")) hint.remove();
  }

  return {
    el,
    value() {
      const c = structuredClone(config);
      c.id = f.id.value.trim();
      c.protocol = "modbus";
      setOrDelete(c, "uns_prefix", f.uns_prefix.value.trim());
      setOrDelete(c, "poll_interval", f.poll_interval.value.trim());
      if (f.enabled.checked) delete c.enabled; else c.enabled = false;
      c.connection = { ...(config.connection || {}) };
      setOrDelete(c.connection, "host", f.host.value.trim());
      setOrDelete(c.connection, "port", int(f.port.value));
      setOrDelete(c.connection, "unit_id", int(f.unit_id.value));
      setOrDelete(c.connection, "timeout", f.timeout.value.trim());
      c.tags = rows.map((r) => {
        const t = { ...r.original };
        t.id = r.id.value.trim();
        t.address = r.address.value.trim();
        t.data_type = r.data_type.value;
        setOrDelete(t, "unit", r.unit.value.trim());
        if (r.access.value === "read" && r.original.access === undefined) delete t.access;
        else t.access = r.access.value;
        return t;
      });
      return c;
    },
    clear() {
      for (const { input, err } of fields.values()) {
        if (input) { input.removeAttribute("aria-invalid"); input.removeAttribute("aria-describedby"); }
        if (err) { err.hidden = true; replace(err); }
      }
    },
    /** Show `message` at `path` or the nearest enclosing field; false when none is shown. */
    place(path, message) {
      for (let p = path; p; p = parent(p)) {
        const target = fields.get(p);
        if (!target || !target.err) continue;
        const { input, err } = target;
        if (!err.id) err.id = `err-${cssId(p)}-${Math.random().toString(36).slice(2, 8)}`;
        if (err.childNodes.length) err.append(h("br"));
        err.append(p === path ? message : `${path.slice(p.length).replace(/^\./, "")}: ${message}`);
        err.hidden = false;
        if (input) { input.setAttribute("aria-invalid", "true"); input.setAttribute("aria-describedby", err.id); }
        return true;
      }
      return false;
    },
  };
}

/** "tags[2].address" -> "tags[2]" -> "tags" -> "". */
function parent(path) {
  const m = path.match(/^(.*)(\.[^.[\]]+|\[\d+\])$/);
  return m ? m[1] : "";
}

// --- Other protocols: the device object as JSON --------------------------------------------

function jsonEditor(config, readOnly, ctx) {
  const area = h("textarea", { id: "device-json", name: "device-json", class: "mono", rows: 22, spellcheck: "false", disabled: readOnly });
  area.value = JSON.stringify(config, null, 2);
  const err = h("div", { class: "field-error", hidden: true });
  const value = () => {
    try { return JSON.parse(area.value); } catch (e) { throw new Error(`This is not JSON: ${e.message}`); }
  };
  const card = h("fieldset", { class: "card" }, h("legend", {}, `Device (${config.protocol}), as in the devices file`),
    h("p", { class: "hint" }, "The keys are those of docs/configuration.md (devices)."),
    area, err);
  const browse = config.protocol === "opcua" && !readOnly ? browser(value, area, err, ctx) : null;
  return {
    el: browse ? h("div", { class: "grid2 json-browse" }, card, browse) : card,
    value,
    clear() { err.hidden = true; replace(err); area.removeAttribute("aria-invalid"); },
    place() { return false; },
  };
}

/** "Motor Speed (rpm)" -> "Motor_Speed_rpm": a tag id (letters, digits, - _ .). */
export function tagId(name) {
  const id = String(name).trim().replace(/[^A-Za-z0-9._-]+/g, "_").replace(/^_+|_+$/g, "");
  return id || "tag";
}

/**
 * The OPC UA server of the device in the editor, browsed from its Objects folder: an Object
 * opens, a breadcrumb goes back up, a Variable can be added to the device's tags.
 */
function browser(value, area, err, ctx) {
  const path = []; // [{node_id, name}] below Objects
  const crumbs = h("p", { class: "crumbs", id: "browse-crumbs" });
  const list = h("div", { id: "browse-list" });
  const status = h("p", { class: "muted", id: "browse-status" }, "Browse the server at the endpoint in the JSON to pick tags.");
  let seq = 0;

  async function open(depth) {
    path.length = depth;
    let body;
    try { body = value(); } catch (e) { replace(status, e.message); status.className = "field-error"; return; }
    const node = path.length ? path[path.length - 1].node_id : null;
    const mine = ++seq;
    drawCrumbs();
    status.className = "muted";
    replace(status, "Browsing… (up to 30 s)");
    list.setAttribute("aria-busy", "true");
    try {
      const r = await api("POST", `/api/v1/browse${node ? `?node=${encodeURIComponent(node)}` : ""}`, { body });
      if (mine !== seq || !ctx.alive()) return;
      const children = Array.isArray(r.children) ? r.children : [];
      replace(status, `${children.length} ${children.length === 1 ? "node" : "nodes"}${r.truncated ? " (the server has more; the list stops here)" : ""}.`);
      replace(list, children.length ? h("ul", { class: "browse-list" }, children.map(item)) : null);
    } catch (e) {
      if (mine !== seq || !ctx.alive() || e.status === 401) return;
      status.className = "field-error";
      // A 422 is about the device in the JSON (its tags too): say which fields.
      replace(status, `Browse failed: ${explain(e)}`, e.problems.length ? h("ul", {}, e.problems.map((p) => h("li", {},
        p.field ? h("code", {}, String(p.field)) : null, p.field ? ": " : null, String(p.message || "")))) : null);
      replace(list);
    } finally {
      if (mine === seq) list.removeAttribute("aria-busy");
    }
  }

  function drawCrumbs() {
    replace(crumbs,
      path.length ? h("a", { href: "#", onclick: (e) => { e.preventDefault(); open(0); } }, "Objects") : h("span", {}, "Objects"),
      path.map((p, i) => [" / ", i === path.length - 1 ? h("span", {}, p.name)
        : h("a", { href: "#", onclick: (e) => { e.preventDefault(); open(i + 1); } }, p.name)]));
  }

  function item(c) {
    const name = String(c.display_name || c.browse_name || c.node_id);
    const isVar = c.node_class === "Variable";
    return h("li", { dataset: { node: String(c.node_id), nodeClass: String(c.node_class || "") } },
      isVar ? h("span", { class: "browse-name" }, name)
        : h("a", { href: "#", class: "browse-name", onclick: (e) => { e.preventDefault(); path.push({ node_id: String(c.node_id), name }); open(path.length); } }, name),
      " ", h("span", { class: "muted small" }, String(c.node_class || "")),
      " ", h("code", { class: "small" }, String(c.node_id)),
      isVar ? h("button", { type: "button", class: "btn small add-as-tag", onclick: () => add(c, name) }, "Add as tag") : null);
  }

  function add(c, name) {
    let d;
    try { d = value(); } catch (e) { err.hidden = false; replace(err, e.message); return; }
    if (!Array.isArray(d.tags)) d.tags = [];
    const taken = new Set(d.tags.map((t) => t && t.id));
    let id = tagId(name);
    for (let n = 2; taken.has(id); n++) id = `${tagId(name)}_${n}`;
    d.tags.push({ id, node_id: String(c.node_id), data_type: "float64" });
    area.value = JSON.stringify(d, null, 2);
    toast(`${id} added to the tags; check its data type.`);
  }

  drawCrumbs();
  return h("section", { class: "card browse", id: "browse" },
    h("h2", {}, "OPC UA server"),
    h("button", { type: "button", class: "btn small", id: "browse-start", onclick: () => open(0) }, "Browse"),
    crumbs, status, list);
}

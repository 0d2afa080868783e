// Devices: the configured devices (GET /api/v1/devices) with their state; admins add, edit,
// disable and delete them when the devices are editable (a devices file Nexus may write).

import { api } from "../lib/api.js";
import { h, replace, pill, toast, confirmDialog } from "../lib/dom.js";
import { may } from "../lib/session.js";

export const title = "Devices";

export function render(view, ctx) {
  const head = h("div", { class: "page-head" }, h("h1", {}, "Devices"));
  const notice = h("div");
  const body = h("div", { class: "card" }, h("p", { class: "muted" }, "Loading…"));
  view.append(h("section", { class: "page" }, head, notice, body));

  async function load() {
    let list;
    try {
      list = await api("GET", "/api/v1/devices");
    } catch (e) {
      if (!ctx.alive() || e.status === 401) return;
      replace(body, h("p", { class: "banner error", role: "alert" }, `The devices could not be read: ${e.message}`));
      return;
    }
    if (!ctx.alive()) return;
    const admin = may("admin");
    const canEdit = admin && list.editable === true;
    replace(head, h("h1", {}, "Devices"),
      canEdit ? h("a", { class: "btn primary", href: "#/devices/new", id: "add-device" }, "Add device") : null);
    replace(notice,
      admin && !list.editable
        ? h("p", { class: "banner warn", id: "not-editable" }, "Devices cannot be changed here: ", list.reason || "the configuration is not editable.")
        : !admin
          ? h("p", { class: "banner info", id: "read-only" }, "You can look at the devices; changing them needs the admin role.")
          : null);
    const devices = Array.isArray(list.devices) ? list.devices : [];
    replace(body, devices.length === 0
      ? h("p", { class: "muted" }, "No device is configured.")
      : h("table", { class: "table", id: "devices-table" },
        h("thead", {}, h("tr", {},
          h("th", {}, "Device"), h("th", {}, "Protocol"), h("th", {}, "Namespace"),
          h("th", {}, "Endpoint"), h("th", { class: "num" }, "Tags"), h("th", {}, "State"),
          canEdit ? h("th", { class: "actions-col" }, h("span", { class: "sr-only" }, "Actions")) : null)),
        h("tbody", {}, devices.map((d) => row(d, canEdit, list.version)))));
  }

  function row(d, canEdit, version) {
    const c = d.config || {};
    const enabled = c.enabled !== false;
    const state = !enabled ? "disabled" : d.status && d.status.state;
    return h("tr", { dataset: { device: d.id } },
      h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id)),
      h("td", {}, c.protocol || ""),
      h("td", { class: "mono" }, c.uns_prefix || ""),
      h("td", { class: "mono" }, endpoint(c)),
      h("td", { class: "num" }, Array.isArray(c.tags) ? c.tags.length : 0),
      h("td", {}, pill(state || "unknown"),
        d.status && d.status.last_error && enabled ? h("div", { class: "err-text small" }, d.status.last_error) : null),
      canEdit ? h("td", { class: "actions-col" },
        h("a", { class: "btn small", href: `#/devices/${encodeURIComponent(d.id)}`, "data-action": "edit" }, "Edit"),
        h("button", {
          type: "button", class: "btn small", "data-action": enabled ? "disable" : "enable",
          onclick: () => setEnabled(d, !enabled, version),
        }, enabled ? "Disable" : "Enable"),
        h("button", {
          type: "button", class: "btn small danger", "data-action": "delete",
          onclick: () => remove(d, version),
        }, "Delete")) : null);
  }

  async function setEnabled(d, enabled, version) {
    const config = { ...d.config };
    if (enabled) delete config.enabled; else config.enabled = false;
    try {
      await api("PUT", `/api/v1/devices/${encodeURIComponent(d.id)}`, {
        body: config, headers: version ? { "If-Match": version } : {},
      });
      toast(`${d.id} ${enabled ? "enabled" : "disabled"}.`);
    } catch (e) {
      if (e.status !== 401) toast(`${d.id}: ${explain(e)}`, "error");
    }
    load();
  }

  async function remove(d, version) {
    const ok = await confirmDialog({
      title: `Delete ${d.id}?`,
      body: `Nexus stops polling ${d.id} and removes it from the devices file. Its history stays in the historian.`,
      confirmLabel: "Delete", danger: true,
    });
    if (!ok) return;
    try {
      await api("DELETE", `/api/v1/devices/${encodeURIComponent(d.id)}`, {
        headers: version ? { "If-Match": version } : {},
      });
      toast(`${d.id} deleted.`);
    } catch (e) {
      if (e.status !== 401) toast(`${d.id}: ${explain(e)}`, "error");
    }
    load();
  }

  load();
}

/** Where a device is reached, from its connection. */
export function endpoint(c) {
  const conn = c.connection || {};
  if (conn.endpoint) return conn.endpoint;
  if (conn.serial_port) return conn.serial_port;
  if (conn.host) return `${conn.host}:${conn.port ?? (c.protocol === "s7" ? 102 : 502)}`;
  return "";
}

/** A refusal in words, with what the status means for the user. */
export function explain(e) {
  if (e.status === 412) return "someone else changed the devices meanwhile; reload and try again.";
  if (e.status === 403) return `not allowed: ${e.message}`;
  return e.message;
}

// Small DOM helpers. Text always goes in as text nodes (never innerHTML), so a device id or an
// error message from the API cannot inject markup.

/**
 * h("button", {class: "btn", onclick: f}, "Save") -> <button class="btn">Save</button>
 * Attributes: `class`, `dataset` (object), `on<event>` (listener), booleans (true sets the
 * attribute, false/null/undefined leaves it out), anything else as a string attribute.
 * Children: nodes, strings, numbers, arrays of them; null/undefined/false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value" && "value" in el) el.value = v;
    else if (k === "checked") el.checked = !!v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

/** Replace the children of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** "3 s ago", "5 min ago", ... for a unix-millisecond timestamp. */
export function ago(ms, now = Date.now()) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleString();
}

/** A coloured state badge: online/closed green, degraded/half_open amber, offline/open red. */
export function pill(state) {
  const s = state == null ? "unknown" : String(state);
  const tone = {
    online: "good", closed: "good",
    degraded: "warn", half_open: "warn",
    offline: "bad", open: "bad",
    disabled: "off",
  }[s] || "off";
  return h("span", { class: `pill ${tone}` }, s.replace("_", " "));
}

let toastSeq = 0;
/** A short message in the corner; `kind` is "info" or "error". */
export function toast(text, kind = "info") {
  const box = document.getElementById("toasts");
  if (!box) return;
  const id = `toast-${++toastSeq}`;
  const t = h("div", { class: `toast ${kind}`, id }, text);
  box.append(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 4000);
}

/**
 * A modal question; resolves true when `confirmLabel` is pressed, false on Cancel or Escape.
 */
export function confirmDialog({ title, body, confirmLabel = "OK", danger = false }) {
  return new Promise((resolve) => {
    const dlg = h("dialog", { class: "dialog", "aria-labelledby": "dlg-title" });
    const done = (v) => { dlg.close(); dlg.remove(); resolve(v); };
    dlg.append(
      h("h2", { id: "dlg-title" }, title),
      h("p", {}, body),
      h("div", { class: "actions" },
        h("button", { type: "button", class: "btn", onclick: () => done(false) }, "Cancel"),
        h("button", {
          type: "button", class: danger ? "btn danger" : "btn primary",
          onclick: () => done(true),
        }, confirmLabel)),
    );
    dlg.addEventListener("cancel", (e) => { e.preventDefault(); done(false); });
    document.body.append(dlg);
    dlg.showModal();
  });
}

// The control center's shell: who is logged in, the navigation, and hash routing
// (#/overview, #/namespace[?filter=..&search=..], #/tag/<topic>, #/alarms, #/devices,
// #/devices/new, #/devices/<id>, #/login). Each page is an ES module
// loaded when first shown; `render(view, ctx)` draws it and may return a function that stops
// what it started (timers) when the page is left.

import { onUnauthorized } from "./lib/api.js";
import { h, replace, toast } from "./lib/dom.js";
import { session, whoami, logout } from "./lib/session.js";

const routes = [
  { re: /^\/login$/, page: "login", nav: null, open: true },
  { re: /^\/overview$/, page: "overview", nav: "overview" },
  { re: /^\/namespace(?:\?(.*))?$/, page: "namespace", nav: "namespace", params: (m) => ({ query: new URLSearchParams(m[1] || "") }) },
  { re: /^\/tag\/(.+)$/, page: "tag", nav: "namespace", params: (m) => ({ topic: decoded(m[1]) }) },
  { re: /^\/alarms$/, page: "alarms", nav: "alarms" },
  { re: /^\/devices$/, page: "devices", nav: "devices" },
  { re: /^\/devices\/new$/, page: "device", nav: "devices", params: () => ({ id: null }) },
  { re: /^\/devices\/([^/]+)$/, page: "device", nav: "devices", params: (m) => ({ id: decodeURIComponent(m[1]) }) },
];

/** A URL part decoded, or as it is when it is not valid percent-encoding. */
function decoded(s) {
  try { return decodeURIComponent(s); } catch { return s; }
}

const view = document.getElementById("view");
let cleanup = null;
/** Where to go after a login. */
let afterLogin = "#/overview";
/** Bumped on every navigation, so a page that loads late does not draw over a newer one. */
let generation = 0;

export function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function current() {
  return location.hash.replace(/^#/, "") || "/overview";
}

async function route() {
  const gen = ++generation;
  if (cleanup) { try { cleanup(); } catch { /* a page's cleanup must not stop the next */ } }
  cleanup = null;
  const path = current();
  const r = routes.find((x) => x.re.test(path));
  if (!r) {
    drawChrome(null);
    replace(view, h("section", { class: "page" },
      h("h1", {}, "Not found"),
      h("p", {}, "There is no page at ", h("code", {}, `#${path}`), ". ",
        h("a", { href: "#/overview" }, "Go to the overview"), ".")));
    return;
  }
  if (!r.open && !session.user) {
    afterLogin = `#${path}`;
    navigate("#/login");
    return;
  }
  drawChrome(r.nav);
  const params = r.params ? r.params(path.match(r.re)) : {};
  let mod;
  try {
    mod = await import(`./pages/${r.page}.js`);
  } catch (e) {
    replace(view, h("p", { class: "error" }, `This page could not be loaded: ${e.message}`));
    return;
  }
  if (gen !== generation) return;
  replace(view);
  document.title = `${mod.title || "Nexus"} · Nexus`;
  const ctx = {
    params,
    navigate,
    afterLogin: () => { const to = afterLogin; afterLogin = "#/overview"; return to; },
    /** True while this page is the one shown. */
    alive: () => gen === generation,
  };
  cleanup = mod.render(view, ctx) || null;
  view.focus({ preventScroll: true });
}

function drawChrome(active) {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  const u = session.user;
  nav.hidden = !u;
  for (const a of nav.querySelectorAll("a")) {
    if (a.dataset.nav === active) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  who.hidden = !u && active === null;
  if (!u) { replace(who); return; }
  const anonymous = u.via === "anonymous";
  replace(who,
    h("span", { class: "user", id: "user-name" }, anonymous ? "not logged in" : u.name),
    h("span", { class: `role role-${u.role}`, id: "user-role", title: "your role" }, u.role),
    anonymous
      ? h("a", { class: "btn small", href: "#/login", id: "login-link" }, "Log in")
      : h("button", { type: "button", class: "btn small", id: "logout", onclick: doLogout }, "Log out"),
  );
}

async function doLogout() {
  replace(document.getElementById("toasts"));
  try {
    await logout();
  } catch (e) {
    toast(`Logout: ${e.message}`, "error");
  }
  // On this machine Nexus may let anonymous viewers in (auth.anonymous): ask again.
  await whoami().catch(() => null);
  afterLogin = "#/overview";
  navigate(session.user ? "#/overview" : "#/login");
}

onUnauthorized(() => {
  if (current() === "/login") return;
  session.user = null;
  afterLogin = `#${current()}`;
  toast("Your session has ended: log in again.", "error");
  navigate("#/login");
});

window.addEventListener("hashchange", route);

async function boot() {
  try {
    await whoami();
  } catch (e) {
    replace(view, h("p", { class: "error" }, `Nexus did not answer: ${e.message}. Reload to try again.`));
    return;
  }
  if (!location.hash) history.replaceState(null, "", "#/overview");
  route();
}

boot();

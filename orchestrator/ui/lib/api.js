// Calls to Nexus's HTTP API on this origin. The session is the HttpOnly cookie the login sets;
// the browser sends it, and an Origin header on POST/PUT/DELETE, by itself (docs/security.md,
// Cross-site requests).

/** A refused or failed call: `status` (0 when the server was not reached) and the JSON body. */
export class ApiError extends Error {
  constructor(status, body, fallback) {
    super((body && typeof body.error === "string" && body.error) || fallback);
    this.status = status;
    this.body = body || {};
  }
  /** `[{field, message}]` of a 422, else []. */
  get problems() {
    return Array.isArray(this.body.problems) ? this.body.problems : [];
  }
}

const listeners = new Set();
/** `f(err)` runs when any call answers 401 (the session ended): the app shows the login. */
export function onUnauthorized(f) {
  listeners.add(f);
}

/**
 * `api("GET", "/api/v1/status")` -> the parsed JSON body (null for 204).
 * Options: `body` (sent as JSON), `headers`, `quiet401` (do not tell the listeners).
 */
export async function api(method, path, { body, headers = {}, quiet401 = false } = {}) {
  // X-Requested-With: this is a script that handles a 401 itself, so the server need not ask
  // the browser for Basic credentials (a challenge makes browsers open their own login dialog).
  const init = {
    method,
    headers: { Accept: "application/json", "X-Requested-With": "XMLHttpRequest", ...headers },
    credentials: "same-origin",
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, null, `Nexus did not answer (${e.message})`);
  }
  let data = null;
  const text = await res.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = { error: text.slice(0, 300) }; }
  }
  if (!res.ok) {
    const err = new ApiError(res.status, data, `${method} ${path}: ${res.status} ${res.statusText}`);
    if (res.status === 401 && !quiet401) listeners.forEach((f) => f(err));
    throw err;
  }
  return data;
}

// What the namespace and tag pages share about live values: the stream's address, the
// server's clock, and values, qualities, rates and ages in words.

/** The live namespace's server-sent events for an MQTT filter (same origin, session cookie). */
export function liveUrl(filter) {
  return `/api/v1/namespace/stream?filter=${encodeURIComponent(filter)}`;
}

/**
 * The server's clock as the browser can know it: entries carry the server's arrival time
 * (`at`) and a batch leaves within 250 ms of it, so the smallest `received - at` seen is the
 * clocks' offset (plus the network's delay). Ages count from the server's time, so a browser
 * whose clock is off does not show negative or inflated ages.
 */
export class ServerClock {
  constructor() { this.offset = null; }

  observe(entries) {
    let newest = -Infinity;
    for (const e of entries) if (e.at > newest) newest = e.at;
    if (!Number.isFinite(newest)) return;
    const d = Date.now() - newest;
    if (this.offset === null || d < this.offset) this.offset = d;
  }

  now() { return Date.now() - (this.offset || 0); }
}

/**
 * Messages per second of a node (`entry.n`, `prevN`, `prevAt`): the last interval's rate,
 * decaying as 1/quiet time once the topic has been quiet for longer than that interval.
 */
export function rate(node, now) {
  const e = node.entry;
  if (!e || e.n <= node.prevN || e.at <= node.prevAt) return null;
  const span = Math.max(e.at - node.prevAt, now - e.at);
  return ((e.n - node.prevN) * 1000) / span;
}

export function formatRate(r) {
  if (r === null || r === undefined) return "";
  if (r >= 100) return `${Math.round(r)}/s`;
  if (r >= 0.1) return `${+r.toFixed(1)}/s`;
  return `${+(r * 60).toFixed(1)}/min`;
}

/** "< 1 s", "12 s", "3 min", "2 h", "4 d". */
export function formatAge(ms) {
  if (!Number.isFinite(ms)) return "";
  if (ms < 1000) return "< 1 s";
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

/** A value as a short text: numbers as they are (6 significant digits for fractions). */
export function formatValue(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(+v.toPrecision(6));
  if (typeof v === "string") return v;
  if (typeof v === "boolean") return v ? "true" : "false";
  const s = JSON.stringify(v);
  return s.length > 200 ? `${s.slice(0, 200)}…` : s;
}

/** "good..." -> good, "bad..." -> bad, anything else named (uncertain...) -> warn, none -> none. */
export function qualityTone(q) {
  if (!q) return "none";
  if (q.startsWith("good")) return "good";
  if (q.startsWith("bad")) return "bad";
  return "warn";
}

/** How long to wait before opening a refused status stream again. */
const STATUS_RETRY_MS = 5000;

/**
 * The platform's status, live (GET /api/v1/status/stream): `onStatus(status)` with the answer of
 * GET /api/v1/status at once and whenever it changed, `onAlarms()` whenever an alarm changed and
 * when the stream (re)opens, `onState("live" | "reconnecting" | "closed")`. A stream the server
 * refused (too many open, the session ended) is opened again after a few seconds. Returns the
 * function that closes it.
 */
export function followStatus({ onStatus = () => {}, onAlarms = () => {}, onState = () => {} }) {
  let es = null;
  let timer = null;
  let stopped = false;
  function open() {
    const mine = new EventSource("/api/v1/status/stream");
    es = mine;
    let fresh = true;
    mine.addEventListener("status", (ev) => {
      if (stopped || mine !== es) return;
      onState("live");
      onStatus(JSON.parse(ev.data));
      // Alarms that changed while the stream was away.
      if (fresh) { fresh = false; onAlarms(); }
    });
    mine.addEventListener("alarms", () => { if (!stopped && mine === es) onAlarms(); });
    mine.onerror = () => {
      if (stopped || mine !== es) return;
      fresh = true;
      if (mine.readyState === EventSource.CLOSED) {
        onState("closed");
        timer = setTimeout(open, STATUS_RETRY_MS);
      } else {
        onState("reconnecting");
      }
    };
  }
  open();
  return () => {
    stopped = true;
    clearTimeout(timer);
    if (es) es.close();
  };
}

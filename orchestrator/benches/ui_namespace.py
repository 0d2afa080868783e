"""The namespace browser under load, in headless Chromium driven by Playwright.

Run by orchestrator/benches/ui_namespace.rs, which serves the control center on --url with
--topics retained topics under bench/ (each value the unix milliseconds of its publication)
and publishes every topic once a second while a phase asks for it: this script prints
`UPDATES <phase>` and reads `DONE` on stdin when the period is over.

Measures, from outside the page where it can (Playwright, the Chrome DevTools Protocol,
/proc) and with observers injected into it otherwise:
- navigation to the tree drawn with every topic counted (performance.now() in the page, from
  the navigation's start), and "Expand all" drawn;
- per phase of updates: frame intervals (requestAnimationFrame), long tasks
  (PerformanceObserver), the lag from publication to the value in the page, the page's
  main-thread busy time (DevTools Performance.getMetrics TaskDuration) and the CPU time of
  every process of the browser (/proc).
Phases: `baseline` (a bare consumer of the same stream: parse each event, keep the latest
entry per topic), `tree` (the namespace page, every level expanded, at rest) and
`tree-scrolling` (the same, scrolled continuously).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TICKS = os.sysconf("SC_CLK_TCK")

# Frames, long tasks and lags, recorded in the page from `window.__bench.start()`.
PROBE = """
(() => {
  const m = { frames: [], longtasks: [], lags: [], recording: false };
  window.__bench = m;
  new PerformanceObserver((l) => {
    if (m.recording) for (const e of l.getEntries()) m.longtasks.push(e.duration);
  }).observe({ type: "longtask" });
  let last = performance.now();
  const frame = (t) => {
    if (m.recording) m.frames.push(t - last);
    last = t;
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
  m.start = () => { m.frames = []; m.longtasks = []; m.lags = []; m.recording = true; };
  m.stop = () => { m.recording = false; return { frames: m.frames, longtasks: m.longtasks, lags: m.lags }; };
})();
"""

# The baseline: the stream parsed, the latest entry per topic kept, nothing drawn.
BASELINE = """
(filter) => new Promise((resolve) => {
  const model = new Map();
  const es = new EventSource(`/api/v1/namespace/stream?filter=${encodeURIComponent(filter)}`);
  es.addEventListener("snapshot", (ev) => {
    for (const e of JSON.parse(ev.data)) model.set(e.topic, e);
    resolve(model.size);
  });
  es.addEventListener("update", (ev) => {
    const now = Date.now();
    const m = window.__bench;
    for (const e of JSON.parse(ev.data)) {
      model.set(e.topic, e);
      if (m.recording) m.lags.push(now - e.v);
    }
  });
})
"""

# In the tree: the moment a shown value changes to a new publication time. A row element
# that scrolling moved to another topic shows that topic's current value, not an update:
# not counted.
TREE_LAGS = """
() => {
  const m = window.__bench;
  const showing = new WeakMap();
  new MutationObserver((records) => {
    if (!m.recording) return;
    const now = Date.now();
    for (const r of records) {
      const el = r.target;
      if (!el.classList || !el.classList.contains("ns-value")) continue;
      const topic = el.parentElement.dataset.topic;
      const same = showing.get(el) === topic;
      showing.set(el, topic);
      const v = Number(el.textContent);
      if (same && v > 1e12) m.lags.push(now - v);
    }
  }).observe(document.querySelector("#ns-tree"), { childList: true, subtree: true });
  for (const el of document.querySelectorAll("#ns-tree .ns-value")) showing.set(el, el.parentElement.dataset.topic);
}
"""


def browser_cpu(profile):
    """CPU seconds of every process of the browser started with `profile`."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            if profile.encode() not in cmd and not is_child_of_browser(pid, profile):
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
        except (OSError, IndexError, ValueError):
            continue
    return total


def is_child_of_browser(pid, profile):
    # Renderers and utilities name the profile through their parent, not always themselves.
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = f.read().rsplit(")", 1)[1].split()[1]
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            return profile.encode() in f.read()
    except (OSError, IndexError):
        return False


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def task_seconds(cdp):
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return metrics.get("TaskDuration", 0.0), metrics.get("ScriptDuration", 0.0), metrics.get("LayoutDuration", 0.0) + metrics.get("RecalcStyleDuration", 0.0)


def updates(phase, page, cdp, profile):
    """One period of updates, measured; the figures as a dict."""
    page.evaluate("window.__bench.start()")
    task0, script0, layout0 = task_seconds(cdp)
    cpu0 = browser_cpu(profile)
    t0 = time.monotonic()
    print(f"UPDATES {phase}", flush=True)
    line = sys.stdin.readline()
    assert line.strip() == "DONE", line
    wall = time.monotonic() - t0
    cpu = browser_cpu(profile) - cpu0
    task1, script1, layout1 = task_seconds(cdp)
    m = page.evaluate("window.__bench.stop()")
    frames, longtasks, lags = m["frames"], m["longtasks"], m["lags"]
    return {
        "phase": phase,
        "wall": wall,
        "frames": len(frames) / wall,
        "frame_p50": pct(frames, 50),
        "frame_p95": pct(frames, 95),
        "frame_p99": pct(frames, 99),
        "frame_max": max(frames) if frames else float("nan"),
        "frames_over_50ms": sum(1 for f in frames if f > 50),
        "longtasks": len(longtasks),
        "longtask_ms": sum(longtasks),
        "longtask_max": max(longtasks) if longtasks else 0.0,
        "lag_samples": len(lags),
        "lag_p50": pct(lags, 50),
        "lag_p95": pct(lags, 95),
        "lag_max": max(lags) if lags else float("nan"),
        "main_thread": (task1 - task0) / wall,
        "script": (script1 - script0) / wall,
        "style_layout": (layout1 - layout0) / wall,
        "cpu": cpu / wall,
    }


# Resolves with performance.now() (ms since the navigation started) once the page shows
# every topic counted and the tree's first row: polled every frame, from outside the page.
TREE_DRAWN = """
(topics) => new Promise((resolve) => {
  const check = () => {
    const s = document.querySelector("#ns-summary");
    if (s && s.dataset.topics === String(topics)
        && document.querySelector('#ns-tree .ns-row[data-topic="bench"]:not([hidden])')) {
      resolve(performance.now());
    } else requestAnimationFrame(check);
  };
  check();
})
"""

# "Expand all" pressed: resolves with the ms until the first topic's row is drawn.
EXPANDED = """
() => new Promise((resolve) => {
  const t0 = performance.now();
  document.querySelector("#ns-expand").click();
  const check = () => {
    if (document.querySelector('#ns-tree .ns-row[data-topic="bench/area-00/line-00/tag-000"]:not([hidden])')) {
      resolve(performance.now() - t0);
    } else requestAnimationFrame(check);
  };
  check();
})
"""


def open_tree(page, app, topics):
    """Navigate to the namespace of bench/# and expand it; ms to the tree drawn, then
    expanded, the row elements and the list's height."""
    page.goto(app + "#/namespace?filter=bench%2F%23", wait_until="commit")
    drawn = page.evaluate(TREE_DRAWN, topics)
    expanded = page.evaluate(EXPANDED)
    rows = page.evaluate("document.querySelectorAll('#ns-tree .ns-row').length")
    height = page.evaluate("document.querySelector('#ns-tree .ns-spacer').offsetHeight")
    return drawn, expanded, rows, height


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--topics", type=int, required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    base = args.url.rstrip("/")
    app = base + "/ui/"
    profile = tempfile.mkdtemp(prefix="nexus-ui-bench-")
    results = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                profile, executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900},
            )
            try:
                page = browser.pages[0] if browser.pages else browser.new_page()
                page.on("pageerror", lambda e: print(f"page error: {e}", file=sys.stderr))

                print("navigation to the tree drawn (all topics counted), then 'Expand all' drawn:")
                loads = []
                for run in range(3):
                    drawn, expanded, rows, height = open_tree(page, app, args.topics)
                    loads.append((drawn, expanded))
                    print(f"  run {run + 1} ({'cold' if run == 0 else 'warm'} cache): {drawn:.0f} ms, "
                          f"expand all {expanded:.0f} ms; {rows} row elements for a "
                          f"{height} px list", flush=True)
                    page.goto(base + "/ui/icon.svg")

                cdp = browser.new_cdp_session(page)
                cdp.send("Performance.enable")

                page.goto(base + "/ui/icon.svg")
                page.evaluate(PROBE)
                n = page.evaluate(BASELINE, "bench/#")
                assert n == args.topics, n
                results.append(updates("baseline", page, cdp, profile))

                open_tree(page, app, args.topics)
                page.evaluate(PROBE)
                page.evaluate(TREE_LAGS)
                results.append(updates("tree", page, cdp, profile))

                page.evaluate("""() => {
                    const t = document.querySelector("#ns-tree");
                    window.__scroller = setInterval(() => {
                        t.scrollTop = t.scrollTop + 280 >= t.scrollHeight - t.clientHeight ? 0 : t.scrollTop + 280;
                    }, 50);
                }""")
                results.append(updates("tree-scrolling", page, cdp, profile))
                page.evaluate("clearInterval(window.__scroller)")
                shots = os.path.join(os.path.dirname(__file__), "..", "..", "target", "ui-screenshots")
                os.makedirs(shots, exist_ok=True)
                page.screenshot(path=os.path.join(shots, "bench-namespace-10000.png"))
                rows = page.evaluate("document.querySelectorAll('#ns-tree .ns-row').length")
                print(f"  row elements after scrolling the whole list: {rows}")
            finally:
                browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)

    report(loads, results)


def report(loads, results):
    print()
    warm = [d for d, _ in loads[1:]] or [loads[0][0]]
    print(f"tree drawn: cold {loads[0][0]:.0f} ms, warm median {statistics.median(warm):.0f} ms; "
          f"expand all median {statistics.median([e for _, e in loads]):.0f} ms")
    cols = [
        ("phase", "phase", "{}"),
        ("frames/s", "frames", "{:.0f}"),
        ("frame p50", "frame_p50", "{:.1f}"),
        ("p95", "frame_p95", "{:.1f}"),
        ("p99", "frame_p99", "{:.1f}"),
        ("max ms", "frame_max", "{:.0f}"),
        (">50ms", "frames_over_50ms", "{}"),
        ("long tasks", "longtasks", "{}"),
        ("max ms", "longtask_max", "{:.0f}"),
        ("lag p50", "lag_p50", "{:.0f}"),
        ("p95", "lag_p95", "{:.0f}"),
        ("max ms", "lag_max", "{:.0f}"),
        ("samples", "lag_samples", "{}"),
        ("main thread", "main_thread", "{:.0%}"),
        ("script", "script", "{:.0%}"),
        ("style+layout", "style_layout", "{:.0%}"),
        ("browser CPU", "cpu", "{:.0%}"),
    ]
    print(" | ".join(c[0] for c in cols))
    for r in results:
        print(" | ".join(fmt.format(r[k]) for _, k, fmt in cols))
    base = results[0]
    for r in results[1:]:
        # While scrolling, rows change topics faster than topics change values: no lag samples.
        lag = f", lag p50 {r['lag_p50'] - base['lag_p50']:+.0f} ms" if r["lag_samples"] else ""
        print(f"{r['phase']} / baseline: main thread x{r['main_thread'] / max(base['main_thread'], 1e-9):.2f}, "
              f"browser CPU x{r['cpu'] / max(base['cpu'], 1e-9):.2f}{lag}")
    print("RESULTS " + json.dumps({"loads": loads, "phases": results}))


if __name__ == "__main__":
    main()

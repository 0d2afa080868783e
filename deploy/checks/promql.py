#!/usr/bin/env python3
"""Check the PromQL Nexus ships with promtool, Prometheus's own parser and rule evaluator.

    promql.py [--promtool BIN] [--out DIR] [--self-test]

Queries come from two places:
  adapter    the metricsQuery and seriesQuery of every rule of
             k8s/components/autoscaling/prometheus-adapter-rules.yaml, the HPAs' signals
             (docs/deploy.md, Autoscaling signals). metricsQuery is a Go template with << >>
             delimiters, expanded as prometheus-adapter expands it for an HPA's request for
             pods of a namespace: <<.Series>> is the series name (from seriesQuery),
             <<.LabelMatchers>> `namespace="nexus",pod="a"` for one pod or
             `namespace="nexus",pod=~"a|b"` for several, <<.GroupBy>> `pod`. Any other action
             (<<.GroupBySlice>>, <<range>>, ...) fails the check: we could not say what it
             expands to.
  dashboard  every query of every dashboard in deploy/grafana/dashboards whose datasource is
             Prometheus (uid nexus-prometheus, from
             deploy/grafana/provisioning/datasources/nexus.yaml): panel targets (rows
             included), query variables and annotations. Grafana's variables are expanded as
             Grafana expands them for Prometheus: $__interval (the dashboard's time range over
             the panel's width, rounded, at least the datasource's timeInterval),
             $__rate_interval (max($__interval + timeInterval, 4 * timeInterval)), $__range,
             and the dashboard's own variables (a multi-value or "All" selection becomes
             `(a|b)` with regex characters escaped; query variables get sample values). Any
             other variable fails the check.

Checks:
  syntax     every query above, as a recording rule of one generated rules file, passes
             `promtool check rules` (it parses; for the adapter, with one pod and with two)
  semantics  `promtool test rules` runs deploy/checks/promql-tests.yaml against the adapter's
             rules expanded for the requests that file names (the recording rule of each is
             the metric it serves, e.g. nexus_ingest_backlog_ratio): input series in, the
             served values out

--self-test breaks the rules in ways the checks must catch (the `== 1` that hides a pod whose
database is down, the division by the workers, the label matchers, an unknown template or
Grafana variable, a query that does not parse) and fails unless each is caught.

Generated files go to DIR (default target/deploy-check/promql). Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from typing import Any, Callable

import yaml

ADAPTER_RULES = "k8s/components/autoscaling/prometheus-adapter-rules.yaml"
DASHBOARDS = "deploy/grafana/dashboards"
DATASOURCES = "deploy/grafana/provisioning/datasources/nexus.yaml"
TESTS = "deploy/checks/promql-tests.yaml"
PROMETHEUS_UID = "nexus-prometheus"
# Pod and namespace of the adapter's request when only the syntax is checked.
SYNTAX_NAMESPACE = "nexus"
SYNTAX_PODS = (["nexus-0"], ["nexus-0", "nexus-1"])
# Values a query variable's query could return; one has a regex metacharacter, to check the
# escaping too. The dashboards' variables select "All" of them.
QUERY_VARIABLE_SAMPLES = ["nexus", "nexus.edge"]
# Width of the dashboard in pixels, for a panel's maxDataPoints when it sets none (Grafana uses
# the panel's width: its grid columns, of 24, times this over 24).
DASHBOARD_PIXELS = 1920


class CheckError(Exception):
    pass


# ---------------------------------------------------------------- prometheus-adapter templates

ACTION = re.compile(r"<<(.*?)>>", re.S)
ADAPTER_FIELDS = {".Series", ".LabelMatchers", ".GroupBy"}


def series_name(series_query: str) -> str:
    """The metric name a seriesQuery selects (`name{...}`); the adapter's .Series."""
    m = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*", series_query, re.S)
    if not m:
        raise CheckError(f"seriesQuery {series_query!r} does not select one metric by name")
    return m.group(1)


def label_matchers(namespace: str, pods: list[str]) -> str:
    # pkg/naming/metrics_query.go: the namespace's matcher, then the resource's: `=` for one
    # name, `=~` of the names joined by `|` for several; values quoted like Go's %q.
    pod = f'pod="{pods[0]}"' if len(pods) == 1 else f'pod=~"{"|".join(pods)}"'
    return f'namespace="{namespace}",{pod}'


def expand_adapter(template: str, series: str, namespace: str, pods: list[str]) -> str:
    values = {".Series": series, ".LabelMatchers": label_matchers(namespace, pods), ".GroupBy": "pod"}

    def action(m: re.Match) -> str:
        name = m.group(1).strip()
        if name not in ADAPTER_FIELDS:
            raise CheckError(f"template action <<{m.group(1)}>> is not one of "
                             f"{', '.join('<<' + f + '>>' for f in sorted(ADAPTER_FIELDS))}")
        return values[name]

    out = ACTION.sub(action, template)
    if "<<" in out or ">>" in out:
        raise CheckError(f"unbalanced template delimiters in {template!r}")
    return out.strip()


def load_adapter_rules(path: str) -> list[dict]:
    with open(path) as f:
        doc = yaml.safe_load(f)
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        doc = yaml.safe_load(doc["data"]["config.yaml"])
    rules = (doc or {}).get("rules") or []
    if not rules:
        raise CheckError(f"{path}: no rules")
    return rules


def adapter_metric(rule: dict) -> str:
    name = rule.get("name") or {}
    series = series_name(rule["seriesQuery"])
    if "as" not in name:
        return series
    return re.sub(name.get("matches", "(.*)"), name["as"], series, count=1)


# ----------------------------------------------------------------------- Grafana's variables

def duration_ms(text: str) -> int:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w|y)", text.strip())
    if not m:
        raise CheckError(f"duration {text!r} is not understood")
    unit = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
            "w": 604_800_000, "y": 31_536_000_000}[m.group(2)]
    return int(m.group(1)) * unit


def format_ms(ms: int) -> str:
    """A PromQL duration, in the largest unit that divides it."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


# Grafana's rangeutil.roundInterval: (below this many ms, round to this many ms).
ROUND_INTERVAL = [
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
    (3500, 2000), (7500, 5000), (12500, 10_000), (17500, 15_000), (25000, 20_000),
    (45000, 30_000), (90000, 60_000), (210_000, 120_000), (450_000, 300_000),
    (750_000, 600_000), (1_050_000, 900_000), (1_500_000, 1_200_000), (2_700_000, 1_800_000),
    (5_400_000, 3_600_000), (9_000_000, 7_200_000), (16_200_000, 10_800_000),
    (32_400_000, 21_600_000), (86_400_000, 43_200_000), (604_800_000, 86_400_000),
]


def round_interval(ms: float) -> int:
    for below, rounded in ROUND_INTERVAL:
        if ms < below:
            return rounded
    return 604_800_000


def dashboard_range_ms(dash: dict) -> int:
    t = dash.get("time") or {"from": "now-6h", "to": "now"}
    if t.get("to") != "now":
        raise CheckError(f"time range to {t.get('to')!r}: only `now` is understood")
    m = re.fullmatch(r"now-(\d+[smhdwy])", t.get("from", ""))
    if not m:
        raise CheckError(f"time range from {t.get('from')!r}: only now-<duration> is understood")
    return duration_ms(m.group(1))


def prometheus_regular_escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("'", "\\\\'")


def prometheus_regex_escape(v: str) -> str:
    # Grafana's prometheusSpecialRegexEscape: regex metacharacters escaped with a backslash,
    # itself escaped for the PromQL string the value lands in.
    v = v.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), v)


def variable_value(var: dict) -> str:
    """What Grafana's Prometheus datasource puts in a query for the variable's selection."""
    kind = var.get("type")
    if kind == "query":
        options = list(QUERY_VARIABLE_SAMPLES)
    elif kind == "custom":
        options = [o.strip() for o in str(var.get("query", "")).split(",") if o.strip()]
    elif kind in ("constant", "textbox"):
        options = [str(var.get("query", ""))]
    elif kind == "interval":
        current = (var.get("current") or {}).get("value")
        options = [current or str(var.get("query", "")).split(",")[0].strip()]
    else:
        raise CheckError(f"variable ${var.get('name')}: type {kind!r} is not understood")
    if not options or options == [""]:
        raise CheckError(f"variable ${var.get('name')}: no value to expand it with")
    current = (var.get("current") or {}).get("value")
    current = current if isinstance(current, list) else [current]
    if kind in ("query", "interval", "constant", "textbox") or "$__all" in current:
        selected = options
        if var.get("includeAll") and var.get("allValue"):
            return var["allValue"]  # a custom "All" value goes in as written
    else:
        selected = [c for c in current if c in options] or options[:1]
    if not var.get("multi") and not var.get("includeAll"):
        return prometheus_regular_escape(selected[0])
    escaped = [prometheus_regex_escape(s) for s in selected]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


VARIABLE = re.compile(r"\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)|\[\[([^\]]*)\]\]")


def expand_grafana(expr: str, builtins: dict[str, str], variables: dict[str, dict]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if name is None or ":" in name:
            raise CheckError(f"variable syntax {m.group(0)!r} is not understood "
                             f"(write $name or ${{name}})")
        if name in builtins:
            return builtins[name]
        if name in variables:
            return variable_value(variables[name])
        raise CheckError(f"unknown variable ${name} (known: "
                         f"{', '.join('$' + n for n in sorted(builtins) + sorted(variables))})")

    return VARIABLE.sub(repl, expr)


def datasources(path: str) -> tuple[dict[str, dict], str | None]:
    with open(path) as f:
        doc = yaml.safe_load(f)
    by_uid = {d["uid"]: d for d in doc.get("datasources") or []}
    default = next((d["uid"] for d in by_uid.values() if d.get("isDefault")), None)
    return by_uid, default


class Dashboard:
    """The Prometheus queries of one dashboard, with Grafana's variables expanded."""

    def __init__(self, path: str, ds_by_uid: dict[str, dict], default_uid: str | None):
        self.path = path
        with open(path) as f:
            self.doc = json.load(f)
        self.ds_by_uid = ds_by_uid
        self.default_uid = default_uid
        self.variables = {v["name"]: v for v in (self.doc.get("templating") or {}).get("list") or []}
        scrape = (ds_by_uid.get(PROMETHEUS_UID, {}).get("jsonData") or {}).get("timeInterval", "15s")
        self.scrape_ms = duration_ms(scrape)
        self.queries: list[tuple[str, str]] = []  # (where, expanded expression)
        self.errors: list[str] = []
        self.visited: set[int] = set()

    def is_prometheus(self, ds: Any, where: str) -> bool:
        uid = ds.get("uid") if isinstance(ds, dict) else ds
        kind = ds.get("type") if isinstance(ds, dict) else None
        if uid in (None, "", "default"):
            uid = self.default_uid
        if uid in ("-- Mixed --", "-- Grafana --", "-- Dashboard --"):
            return False
        if kind == "prometheus" or (uid in self.ds_by_uid and self.ds_by_uid[uid]["type"] == "prometheus"):
            if uid != PROMETHEUS_UID:
                self.errors.append(f"{where}: Prometheus datasource {uid!r} is not the provisioned {PROMETHEUS_UID}")
            return True
        if uid not in self.ds_by_uid:
            self.errors.append(f"{where}: datasource {uid!r} is not provisioned in {DATASOURCES}")
        return False

    def builtins(self, panel: dict | None) -> dict[str, str]:
        low = self.scrape_ms
        if panel and panel.get("interval"):
            low = max(low, duration_ms(panel["interval"]))
        width = (panel or {}).get("gridPos", {}).get("w", 24)
        points = (panel or {}).get("maxDataPoints") or max(1, round(DASHBOARD_PIXELS * width / 24))
        range_ms = dashboard_range_ms(self.doc)
        interval = max(low, round_interval(range_ms / points))
        return {
            "__interval": format_ms(interval),
            "__rate_interval": format_ms(max(interval + self.scrape_ms, 4 * self.scrape_ms)),
            "__range": f"{range_ms // 1000}s",
        }

    def add(self, where: str, expr: str, panel: dict | None) -> None:
        try:
            self.queries.append((where, expand_grafana(expr, self.builtins(panel), self.variables)))
        except CheckError as e:
            self.errors.append(f"{where}: {e}")

    def collect(self) -> "Dashboard":
        uid = self.doc.get("uid", os.path.basename(self.path))
        for v in self.variables.values():
            if v.get("type") == "query" and self.is_prometheus(v.get("datasource"), f"{uid} ${v['name']}"):
                self.visited.add(id(v))
                q = v.get("query")
                q = q.get("query", "") if isinstance(q, dict) else (q or "")
                self.visited.add(id(v.get("query")))
                expr = variable_query_expr(q)
                if expr:
                    self.add(f"{uid} variable ${v['name']}", expr, None)
        for a in (self.doc.get("annotations") or {}).get("list") or []:
            if a.get("expr") is not None:
                self.visited.add(id(a))
                if self.is_prometheus(a.get("datasource"), f"{uid} annotation {a.get('name')}"):
                    self.add(f"{uid} annotation {a.get('name')!r}", a["expr"], None)
        self.panels(uid, self.doc.get("panels") or [])
        self.unreached(self.doc, uid)
        return self

    def panels(self, uid: str, panels: list[dict]) -> None:
        for p in panels:
            self.panels(uid, p.get("panels") or [])
            pds = p.get("datasource")
            for t in p.get("targets") or []:
                self.visited.add(id(t))
                ds = t.get("datasource") if t.get("datasource") is not None else pds
                where = f"{uid} panel {p.get('id')} {p.get('title')!r} query {t.get('refId')}"
                if self.is_prometheus(ds, where) and not t.get("hide"):
                    if not t.get("expr"):
                        self.errors.append(f"{where}: a Prometheus query with no expr")
                        continue
                    self.add(where, t["expr"], p)

    def unreached(self, node: Any, uid: str) -> None:
        """A Prometheus-looking `expr` anywhere we did not look would go unchecked: fail on it."""
        if isinstance(node, dict):
            if "expr" in node and id(node) not in self.visited:
                self.errors.append(f"{uid}: an expr outside panels' targets, variables and annotations: {node['expr']!r}")
            for v in node.values():
                self.unreached(v, uid)
        elif isinstance(node, list):
            for v in node:
                self.unreached(v, uid)


def variable_query_expr(q: str) -> str | None:
    """The PromQL inside a Prometheus variable query (Grafana's query functions)."""
    q = q.strip()
    m = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)", q, re.S)
    if m:
        return m.group(1)
    if re.fullmatch(r"label_values\(\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)|label_names\(\)|metrics\(.*\)", q, re.S):
        return None
    m = re.fullmatch(r"query_result\((.*)\)", q, re.S)
    return m.group(1) if m else q


# ------------------------------------------------------------------------------------ checks

def record_name(*parts: str) -> str:
    return "nexus_promql_check:" + ":".join(re.sub(r"[^a-zA-Z0-9_]", "_", p) for p in parts)


def syntax_rules(adapter_rules: list[dict], dashboards: list[Dashboard]) -> tuple[dict, dict[str, str], list[str]]:
    """Every query as a recording rule; where each rule's query comes from, by rule name."""
    groups, origins, errors = [], {}, []
    rules = []
    for i, rule in enumerate(adapter_rules):
        metric = "?"
        try:
            metric = adapter_metric(rule)
            series = series_name(rule["seriesQuery"])
            name = record_name("adapter", metric, "seriesQuery")
            rules.append({"record": name, "expr": rule["seriesQuery"]})
            origins[name] = f"adapter rule {metric}: seriesQuery"
            for pods in SYNTAX_PODS:
                name = record_name("adapter", metric, f"pods{len(pods)}")
                expr = expand_adapter(rule["metricsQuery"], series, SYNTAX_NAMESPACE, pods)
                rules.append({"record": name, "expr": expr})
                origins[name] = f"adapter rule {metric}: metricsQuery for {len(pods)} pod(s)"
        except (CheckError, KeyError) as e:
            errors.append(f"adapter rule {i + 1} ({metric}): {e}")
    groups.append({"name": "prometheus-adapter", "rules": rules})
    for d in dashboards:
        errors += [f"{d.path}: {e}" for e in d.errors]
        rules = []
        for n, (where, expr) in enumerate(d.queries):
            name = record_name("dashboard", d.doc.get("uid", ""), str(n + 1))
            rules.append({"record": name, "expr": expr})
            origins[name] = f"{d.path}: {where}"
        if rules:
            groups.append({"name": f"dashboard {d.doc.get('uid')}", "rules": rules})
    return {"groups": groups}, origins, errors


def test_rules(adapter_rules: list[dict], requests: dict[str, dict]) -> dict:
    """The adapter's rules as recording rules named after the metrics they serve, expanded for
    the requests of the test file."""
    rules = []
    for rule in adapter_rules:
        metric = adapter_metric(rule)
        if metric not in requests:
            raise CheckError(f"{TESTS}: no request for the adapter's metric {metric} (requests:)")
        req = requests[metric]
        expr = expand_adapter(rule["metricsQuery"], series_name(rule["seriesQuery"]), req["namespace"], req["pods"])
        rules.append({"record": metric, "expr": expr})
    return {"groups": [{"name": "prometheus-adapter", "rules": rules}]}


def write_yaml(path: str, doc: Any) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False, width=1000)


def promtool(args: list[str], promtool_bin: str) -> tuple[int, str]:
    p = subprocess.run([promtool_bin, *args], capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr).strip()


def run(adapter_rules: list[dict], dashboards: list[Dashboard], tests: dict, out: str,
        promtool_bin: str, quiet: bool = False) -> list[str]:
    """All checks; the failures (empty when everything holds)."""
    os.makedirs(out, exist_ok=True)
    failures = []
    say = (lambda *a: None) if quiet else print

    rules, origins, errors = syntax_rules(adapter_rules, dashboards)
    failures += errors
    path = os.path.join(out, "queries.rules.yaml")
    write_yaml(path, rules)
    code, text = promtool(["check", "rules", path], promtool_bin)
    if code != 0:
        # promtool names the recording rule; say which query of which file it is.
        named = [f"  {n} is {o}" for n, o in origins.items() if f'"{n}"' in text]
        failures.append("\n".join([f"promtool check rules {path}:", text, *named]))
    else:
        n_adapter = sum(1 for o in origins.values() if o.startswith("adapter"))
        n_dash = sum(1 for d in dashboards if d.queries)
        say(f"  syntax: {len(origins)} queries parse ({n_adapter} from the adapter rules, "
            f"{len(origins) - n_adapter} from {n_dash} dashboard(s) on Prometheus) -> {path}")

    try:
        rules = test_rules(adapter_rules, tests.get("requests") or {})
    except (CheckError, KeyError) as e:
        return failures + [f"semantics: {e}"]
    rules_path = os.path.join(out, "adapter.rules.yaml")
    write_yaml(rules_path, rules)
    test = {k: v for k, v in tests.items() if k != "requests"}
    test["rule_files"] = [os.path.basename(rules_path)]
    test_path = os.path.join(out, "adapter.test.yaml")
    write_yaml(test_path, test)
    code, text = promtool(["test", "rules", test_path], promtool_bin)
    if code != 0:
        failures.append(f"promtool test rules {test_path}:\n{text}")
    else:
        say(f"  semantics: {len(tests.get('tests') or [])} tests of {TESTS} pass on "
            f"{', '.join(r['record'] for r in rules['groups'][0]['rules'])} -> {test_path}")
    return failures


# --------------------------------------------------------------------------------- self-test

def replace_in_rule(metric: str, old: str, new: str) -> Callable[[list[dict], list[Dashboard]], None]:
    def mutate(rules: list[dict], _dashboards: list[Dashboard]) -> None:
        rule = next(r for r in rules if adapter_metric(r) == metric)
        if old not in rule["metricsQuery"]:
            raise CheckError(f"self-test: {old!r} is not in the metricsQuery of {metric}")
        rule["metricsQuery"] = rule["metricsQuery"].replace(old, new, 1)
    return mutate


def break_dashboard(expr_edit: Callable[[str], str]) -> Callable[[list[dict], list[Dashboard]], None]:
    def mutate(_rules: list[dict], dashboards: list[Dashboard]) -> None:
        d = next(d for d in dashboards if d.queries)
        where, expr = d.queries[0]
        d.queries[0] = (where, expr_edit(expr))
    return mutate


def break_dashboard_variable(ds: tuple[dict, str | None]) -> Callable[[list[dict], list[Dashboard]], None]:
    def mutate(_rules: list[dict], dashboards: list[Dashboard]) -> None:
        d = next(d for d in dashboards if d.queries)
        # Re-collect with one target using a variable the dashboard does not define.
        target = next(t for p in d.doc.get("panels") or [] for t in p.get("targets") or [] if t.get("expr"))
        target["expr"] = target["expr"] + " * $__no_such_variable"
        fresh = Dashboard(d.path, *ds)
        fresh.doc = d.doc
        fresh.variables = d.variables
        dashboards[dashboards.index(d)] = fresh.collect()
    return mutate


# Which failure each kind of mutation must cause.
EXPECTED: dict[str, Callable[[str], bool]] = {
    "semantics": lambda f: f.startswith("promtool test rules"),
    "syntax": lambda f: f.startswith("promtool check rules"),
    "template": lambda f: "template action" in f,
    "variable": lambda f: "unknown variable" in f,
}


def gist(failure: str) -> str:
    """The line of a failure that says what went wrong (promtool prints headers first)."""
    lines = [l.strip() for l in failure.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("expr:"):
            return " ".join(lines[i:i + 3])
        if "error" in line:
            return line
    return lines[0]


def self_test(adapter_rules: list[dict], dashboards: list[Dashboard], tests: dict, out: str,
              promtool_bin: str, ds: tuple[dict, str | None]) -> int:
    if run(adapter_rules, dashboards, tests, os.path.join(out, "self-test", "unmutated"), promtool_bin, quiet=True):
        print("self-test: the unmutated rules do not pass")
        return 1
    ingest, gateway = "nexus_ingest_backlog_ratio", "nexus_gateway_worker_utilization"
    mutations = [
        ("ingestion without `== 1` (a pod whose database is down serves 0)", "semantics",
         replace_in_rule(ingest, " == 1", "")),
        ("ingestion without the database factor", "semantics",
         replace_in_rule(ingest, "* max by (<<.GroupBy>>) (nexus_ingest_db_up{<<.LabelMatchers>>} == 1)", "")),
        ("ingestion grouped by nothing (one value for every pod)", "semantics",
         replace_in_rule(ingest, "max by (<<.GroupBy>>) (nexus_ingest_buffer_usage_ratio", "max by () (nexus_ingest_buffer_usage_ratio")),
        ("ingestion without label matchers (other namespaces and pods count)", "semantics",
         replace_in_rule(ingest, "nexus_ingest_buffer_usage_ratio{<<.LabelMatchers>>}", "nexus_ingest_buffer_usage_ratio")),
        ("gateway not divided by the workers", "semantics",
         replace_in_rule(gateway, "/ max by (<<.GroupBy>>) (nexus_gateway_workers{<<.LabelMatchers>>})", "")),
        ("gateway with increase instead of rate", "semantics",
         replace_in_rule(gateway, "rate(", "increase(")),
        ("gateway over one device instead of their sum", "semantics",
         replace_in_rule(gateway, "sum by (<<.GroupBy>>)", "max by (<<.GroupBy>>)")),
        ("an unknown adapter template variable", "template",
         replace_in_rule(gateway, "<<.GroupBy>>", "<<.GroupBySlice>>")),
        ("a dashboard query that does not parse", "syntax",
         break_dashboard(lambda e: e + ")")),
        ("a dashboard query using an unknown variable", "variable",
         break_dashboard_variable(ds)),
    ]
    missed = 0
    for i, (desc, kind, mutate) in enumerate(mutations):
        rules, dash = copy.deepcopy(adapter_rules), copy.deepcopy(dashboards)
        mutate(rules, dash)
        failures = run(rules, dash, tests, os.path.join(out, "self-test", str(i + 1)), promtool_bin, quiet=True)
        caught = [f for f in failures if EXPECTED[kind](f)]
        if not caught:
            missed += 1
            print(f"self-test: NOT CAUGHT: {desc} (expected a {kind} failure; got "
                  f"{gist(failures[0]) if failures else 'none'})")
        else:
            print(f"self-test: caught ({kind}): {desc}: {gist(caught[0])}")
    print(f"self-test: {len(mutations) - missed} of {len(mutations)} mutations caught")
    return 1 if missed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--promtool", default="promtool")
    ap.add_argument("--out", default="target/deploy-check/promql")
    ap.add_argument("--adapter-rules", default=ADAPTER_RULES)
    ap.add_argument("--dashboards", default=DASHBOARDS)
    ap.add_argument("--datasources", default=DATASOURCES)
    ap.add_argument("--tests", default=TESTS)
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()

    try:
        adapter_rules = load_adapter_rules(args.adapter_rules)
        ds = datasources(args.datasources)
        if PROMETHEUS_UID not in ds[0]:
            raise CheckError(f"{args.datasources}: no datasource {PROMETHEUS_UID}")
        dashboards = [Dashboard(os.path.join(args.dashboards, f), *ds).collect()
                      for f in sorted(os.listdir(args.dashboards)) if f.endswith(".json")]
        with open(args.tests) as f:
            tests = yaml.safe_load(f)
    except (CheckError, OSError, KeyError, ValueError, yaml.YAMLError) as e:
        print(f"promql: {e}")
        return 1
    if args.self_test:
        return self_test(adapter_rules, dashboards, tests, args.out, args.promtool, ds)
    failures = run(adapter_rules, dashboards, tests, args.out, args.promtool)
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

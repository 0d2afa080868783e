#!/usr/bin/env python3
"""Invariants of Nexus's Kubernetes manifests, checked on the rendered output of an overlay.

    k8s_invariants.py [--adapter-rules FILE] [--grafana-datasources FILE] [--nexus BIN] NAME=RENDERED.yaml ...
    k8s_invariants.py --self-test [--adapter-rules FILE] [--grafana-datasources FILE] NAME=RENDERED.yaml ...

Each NAME=FILE is one rendering (`kubectl kustomize k8s/overlays/plant > FILE`). Every rule
below is checked on each; a failure names the rendering, the object and the rule:

    plant: StatefulSet/nexus-gateway: probes: container nexus has no readinessProbe

Rules (ids as printed):
  command-consumer  exactly one command consumer per platform: containers running `nexus
                    commands`, `nexus up`, or `nexus gateway` without
                    NEXUS_GATEWAY__COMMANDS=false, counted with their replicas; it runs as one
                    pod (replicas 1, no HPA, Recreate or a StatefulSet)
  single-broker     the broker (`nexus broker` or `nexus up`) runs as exactly one pod
  probes            startup, readiness and liveness probes on every container; Nexus's are
                    HTTP /healthz (startup, liveness) and /readyz on the service's HTTP port
  pdb               every workload is selected by a PodDisruptionBudget that allows a disruption
  security          the restricted Pod Security Standard on every pod and container (and the
                    namespace label); Nexus runs as 10001 with a read-only root filesystem and
                    every path it writes (working directory, /tmp, WAL, buffer, PKI) on a
                    writable volume
  headless          a StatefulSet's serviceName is a headless Service selecting its pods
  stateful-storage  the gateway's buffer and ingestion's WAL are on volumeClaimTemplates, kept
                    on scale-down (Retain); scaled gateways are sharded StatefulSets
  no-secrets        no secret value in a ConfigMap (password:, credentials in a URL), nor a
                    ConfigMap key named like a secret (..._PASSWORD, ..._TOKEN, ...: envFrom
                    makes it a variable) with a value, unless the key only points at a file
                    (..._FILE, with a path) or a variable (..._ENV); no literal env value or
                    configMapKeyRef for a secret; no Secret objects with data are shipped
  secret-env        every container using the database gets NEXUS_DATABASE_URL from a
                    secretKeyRef (and no other does); every password_env of the configuration
                    and NEXUS_MQTT__PASSWORD come from Secrets
  mqtt-tls          a Service exposes 8883 to a broker configured for TLS with its certificate
                    from the Secret nexus-broker-tls
  network-policy    a default deny of ingress, and the flows Nexus needs are allowed while
                    others (e.g. the gateway to the database, outsiders to plain MQTT) are not
  egress            every pod is selected by an egress policy, except those running
                    `nexus gateway`, `nexus commands` or `nexus up`, which talk to PLCs at
                    addresses only the plant knows and keep open egress (docs/deploy.md); every
                    pod reaches DNS (kube-system, UDP and TCP 53), the services the broker, the
                    database's users the database, the orchestrator its upstreams, the alert
                    service webhooks on 443; no other pod reaches a device, a webhook or the
                    database
  grafana           every variable of Grafana's datasources is in its environment; each
                    datasource names a Service of the rendering that Grafana may reach (egress
                    and ingress), or, for Prometheus, one of another namespace only when the
                    rendering ships ServiceMonitors; the historian's user is a role the
                    database's init scripts create, with the same Secret key for its password;
                    every dashboard reads provisioned datasources; with --grafana-datasources,
                    every datasource is the one of that file (the edge overlay leaves the
                    Prometheus one out)
  hpa               HPA metrics are served by the prometheus-adapter rules, targets exist and do
                    not set replicas, scale-down is stabilised
  monitoring        with ServiceMonitors, every Nexus HTTP port is scraped

--nexus BIN also runs `BIN config check` for every Nexus container, with its configuration file
(from the ConfigMap it mounts) and its environment (Secret values replaced by placeholders).

--self-test mutates each rendering in memory, one mutation at a time (several per rule), and
fails unless the unmutated rendering passes and every mutation is caught by the rule it breaks.
"""

from __future__ import annotations

import argparse
import copy
import functools
import ipaddress
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import yaml

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
NEXUS_UID = 10001
WORKDIR = "/var/lib/nexus"  # WORKDIR of deploy/Dockerfile
# Subcommand -> (config section of its HTTP port, default port); docs/configuration.md.
HTTP_PORTS = {
    "gateway": ("gateway", 4000),
    "commands": ("commands", 4100),
    "orchestrator": ("orchestrator", 5000),
    "broker": ("orchestrator", 5000),  # `nexus broker` serves health on orchestrator.http_listen
    "up": ("orchestrator", 5000),
    "alerts": ("alerts", 6000),
    "ingest": ("ingestion", 7000),
}
DATABASE_USERS = {"up", "ingest", "commands", "alerts"}
SUBCOMMANDS = set(HTTP_PORTS)
MONITORING_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}


# ---------------------------------------------------------------------------------------------
# The rendering

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=None)
def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError:
        return None


def parse(text: str) -> Any:
    """A ConfigMap value as YAML or JSON (None when it is neither); a copy, free to change."""
    return copy.deepcopy(_parse(text))


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=Loader) if d]


def ref(d: dict) -> str:
    return f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"


def pod_spec(w: dict) -> dict:
    if w["kind"] == "Pod":
        return w["spec"]
    if w["kind"] == "CronJob":
        return w["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return w["spec"]["template"]["spec"]


def pod_labels(w: dict) -> dict:
    if w["kind"] == "Pod":
        return w["metadata"].get("labels") or {}
    if w["kind"] == "CronJob":
        return w["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels") or {}
    return w["spec"]["template"].get("metadata", {}).get("labels") or {}


def matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions); an empty selector matches everything."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def service_selects(svc: dict, labels: dict) -> bool:
    sel = svc.get("spec", {}).get("selector")
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


@dataclass
class Container:
    workload: dict
    c: dict
    init: bool
    subcommand: str | None = None  # for Nexus containers
    env: dict = field(default_factory=dict)  # name -> env entry
    config: dict = field(default_factory=dict)  # parsed nexus.yaml, overrides applied
    config_text: str | None = None
    config_path: str | None = None

    @property
    def name(self) -> str:
        return self.c.get("name", "?")

    def literal(self, var: str) -> str | None:
        e = self.env.get(var)
        return None if e is None or "valueFrom" in e else str(e.get("value", ""))

    def from_secret(self, var: str) -> bool:
        e = self.env.get(var)
        return bool(e) and "secretKeyRef" in (e.get("valueFrom") or {})


class Rendering:
    def __init__(self, name: str, docs: list[dict], adapter_rules: list[dict] | None,
                 datasources: tuple[str, dict[str, dict]] | None = None):
        self.name = name
        self.docs = docs
        self.adapter_rules = adapter_rules
        # (file, uid -> datasource): the Grafana datasources every rendering's must equal.
        self.datasources = datasources
        self.failures: list[tuple[str, str, str]] = []  # (object, rule, message)
        self.by_kind: dict[str, list[dict]] = {}
        for d in docs:
            self.by_kind.setdefault(d.get("kind", ""), []).append(d)
        self.workloads = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
        self.containers: list[Container] = []
        for w in self.workloads:
            spec = pod_spec(w)
            for init, key in ((True, "initContainers"), (False, "containers")):
                for c in spec.get(key) or []:
                    self.containers.append(self._container(w, c, init))

    def kind(self, k: str) -> list[dict]:
        return self.by_kind.get(k, [])

    def fail(self, obj: dict | str, rule: str, message: str) -> None:
        self.failures.append((obj if isinstance(obj, str) else ref(obj), rule, message))

    def is_nexus_workload(self, w: dict) -> bool:
        return pod_labels(w).get("app.kubernetes.io/name") == "nexus"

    def nexus(self) -> list[Container]:
        return [c for c in self.containers if c.subcommand and not c.init]

    def _container(self, w: dict, c: dict, init: bool) -> Container:
        ct = Container(w, c, init)
        ct.env = {e["name"]: e for e in c.get("env") or [] if "name" in e}
        words = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
        if words and words[0].endswith("nexus"):
            words = words[1:]
        image = str(c.get("image", ""))
        nexus_image = "nexus" in image.rsplit("/", 1)[-1] or self.is_nexus_workload(w)
        if init or not nexus_image or not words or words[0].startswith("/"):
            return ct
        positional = []
        skip = False
        for wd in words:
            if skip:
                skip = False
            elif wd in ("--log-format", "--config", "-c"):
                skip = True
                if wd != "--log-format":
                    ct.config_path = None  # set below
            elif not wd.startswith("-"):
                positional.append(wd)
        if not positional or positional[0] not in SUBCOMMANDS:
            return ct
        ct.subcommand = positional[0]
        for i, wd in enumerate(words):
            if wd in ("--config", "-c") and i + 1 < len(words):
                ct.config_path = words[i + 1]
            elif wd.startswith("--config="):
                ct.config_path = wd.split("=", 1)[1]
        if ct.config_path is None and ct.literal("NEXUS_CONFIG"):
            ct.config_path = ct.literal("NEXUS_CONFIG")
        ct.config_text = self._mounted_file(w, c, ct.config_path or f"{WORKDIR}/nexus.yaml")
        cfg: dict = {}
        if ct.config_text:
            parsed = parse(ct.config_text)
            cfg = parsed if isinstance(parsed, dict) else {}
        ct.config = apply_env(cfg, ct)
        return ct

    def _mounted_file(self, w: dict, c: dict, path: str) -> str | None:
        """The text of `path` in container `c` when a ConfigMap of the rendering provides it."""
        vols = {v["name"]: v for v in pod_spec(w).get("volumes") or []}
        for m in c.get("volumeMounts") or []:
            mp = m["mountPath"].rstrip("/")
            v = vols.get(m["name"]) or {}
            cm = v.get("configMap")
            if not cm:
                continue
            if m.get("subPath"):
                key = m["subPath"] if path == mp else None
            elif path.startswith(mp + "/"):
                key = path[len(mp) + 1 :]
                for item in cm.get("items") or []:
                    if item.get("path") == key:
                        key = item["key"]
            else:
                key = None
            if key is None:
                continue
            for d in self.kind("ConfigMap"):
                if d["metadata"]["name"] == cm.get("name"):
                    return (d.get("data") or {}).get(key)
        return None

    def service_for(self, name: str) -> dict | None:
        for s in self.kind("Service"):
            if s["metadata"]["name"] == name:
                return s
        return None

    def hpa_targets(self) -> dict[tuple[str, str], dict]:
        out = {}
        for h in self.kind("HorizontalPodAutoscaler"):
            t = h["spec"]["scaleTargetRef"]
            out[(t["kind"], t["name"])] = h
        return out

    def replicas(self, w: dict) -> int | None:
        """Pods the workload may run: its replicas, the HPA's maximum, or None if unbounded."""
        h = self.hpa_targets().get((w["kind"], w["metadata"]["name"]))
        if h:
            return int(h["spec"]["maxReplicas"])
        if w["kind"] in ("Deployment", "StatefulSet", "ReplicaSet"):
            return int(w["spec"].get("replicas", 1))
        if w["kind"] == "Pod":
            return 1
        return None  # DaemonSet, Job, CronJob


def apply_env(cfg: dict, ct: Container) -> dict:
    """The configuration as the container sees it: NEXUS_<SECTION>__<KEY> literals applied."""
    cfg = copy.deepcopy(cfg)
    for var, e in ct.env.items():
        if not var.startswith("NEXUS_") or "__" not in var or "valueFrom" in e:
            continue
        path = [p.lower() for p in var[len("NEXUS_") :].split("__")]
        node = cfg
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        raw = str(e.get("value", ""))
        node[path[-1]] = raw if var.endswith(("PASSWORD", "URL")) else yaml.safe_load(raw or "null")
    return cfg


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def http_port(ct: Container) -> int:
    section, default = HTTP_PORTS[ct.subcommand or ""]
    listen = get(ct.config, f"{section}.http_listen")
    if isinstance(listen, str) and ":" in listen:
        return int(listen.rsplit(":", 1)[1])
    return default


def http_ports(ct: Container) -> list[int]:
    """Every HTTP port the container serves: `nexus up` serves one per service."""
    if ct.subcommand != "up":
        return [http_port(ct)]
    ports = []
    for sub in ("orchestrator", "gateway", "commands", "alerts", "ingest"):
        section, default = HTTP_PORTS[sub]
        listen = get(ct.config, f"{section}.http_listen")
        ports.append(int(listen.rsplit(":", 1)[1]) if isinstance(listen, str) and ":" in listen else default)
    return ports


def container_port(c: dict, port: Any) -> int | None:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in c.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    return None


def command_consumer(ct: Container) -> bool:
    if ct.subcommand in ("commands", "up"):
        return True
    if ct.subcommand == "gateway":
        return get(ct.config, "gateway.commands", True) is not False
    return False


# ---------------------------------------------------------------------------------------------
# Rules


def rule_command_consumer(r: Rendering) -> None:
    consumers = [ct for ct in r.nexus() if command_consumer(ct)]
    total = 0
    for ct in consumers:
        n = r.replicas(ct.workload)
        w = ct.workload
        if n is None or n != 1 or (w["kind"], w["metadata"]["name"]) in r.hpa_targets():
            r.fail(w, "command-consumer", f"`nexus {ct.subcommand}` consumes commands and may run "
                   f"{'an unbounded number of' if n is None else n} pods; it must run as exactly one")
        if w["kind"] == "Deployment" and (w["spec"].get("strategy") or {}).get("type") != "Recreate":
            r.fail(w, "command-consumer", "a rollout would run two command consumers at once: "
                   "use strategy Recreate")
        total += n or 2
    if total != 1:
        names = ", ".join(f"{ref(ct.workload)} ({ct.subcommand})" for ct in consumers) or "none"
        r.fail("platform", "command-consumer",
               f"exactly one command consumer is needed, found {total} pod(s): {names}")


def rule_single_broker(r: Rendering) -> None:
    brokers = [ct for ct in r.nexus() if ct.subcommand in ("broker", "up")
               and get(ct.config, "broker.enabled", True) is not False]
    for ct in brokers:
        w = ct.workload
        n = r.replicas(w)
        if n != 1 or (w["kind"], w["metadata"]["name"]) in r.hpa_targets():
            r.fail(w, "single-broker", "the embedded broker does not cluster: one pod, no HPA")
        if w["kind"] == "Deployment" and (w["spec"].get("strategy") or {}).get("type") != "Recreate":
            r.fail(w, "single-broker", "a rollout would run two brokers at once: use Recreate")
    if len(brokers) != 1:
        r.fail("platform", "single-broker", f"one broker expected, found {len(brokers)}")


def rule_probes(r: Rendering) -> None:
    for ct in r.containers:
        if ct.init:
            continue  # init containers cannot have probes
        for p in ("startupProbe", "readinessProbe", "livenessProbe"):
            if not ct.c.get(p):
                r.fail(ct.workload, "probes", f"container {ct.name} has no {p}")
        if not ct.subcommand:
            continue
        want = http_port(ct)
        for p, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
            h = (ct.c.get(p) or {}).get("httpGet")
            if not ct.c.get(p):
                continue
            if not h or h.get("path") != path:
                r.fail(ct.workload, "probes", f"container {ct.name}: {p} must be HTTP GET {path}")
            elif container_port(ct.c, h.get("port")) != want:
                r.fail(ct.workload, "probes", f"container {ct.name}: {p} must use port {want} "
                       f"(`nexus {ct.subcommand}`'s HTTP port), not {h.get('port')}")


def rule_pdb(r: Rendering) -> None:
    pdbs = r.kind("PodDisruptionBudget")
    for w in r.workloads:
        if w["kind"] in ("Job", "CronJob", "Pod"):
            continue
        labels = pod_labels(w)
        mine = [p for p in pdbs if matches(p["spec"].get("selector"), labels)
                and p["metadata"].get("namespace") == w["metadata"].get("namespace")]
        if not mine:
            r.fail(w, "pdb", "no PodDisruptionBudget selects its pods")
        for p in mine:
            s = p["spec"]
            n = r.replicas(w) or 1
            if "maxUnavailable" in s and str(s["maxUnavailable"]) in ("0", "0%"):
                r.fail(p, "pdb", f"maxUnavailable 0 blocks every node drain ({ref(w)})")
            if "minAvailable" in s and isinstance(s["minAvailable"], int) and s["minAvailable"] >= n:
                r.fail(p, "pdb", f"minAvailable {s['minAvailable']} of {n} blocks every node drain")


def writable_mounts(w: dict, c: dict) -> list[str]:
    vols = {v["name"]: v for v in pod_spec(w).get("volumes") or []}
    claims = {t["metadata"]["name"] for t in (w.get("spec", {}).get("volumeClaimTemplates") or [])}
    out = []
    for m in c.get("volumeMounts") or []:
        if m.get("readOnly"):
            continue
        v = vols.get(m["name"])
        if m["name"] in claims or (v and ("emptyDir" in v or "persistentVolumeClaim" in v
                                           or "ephemeral" in v)):
            out.append(m["mountPath"].rstrip("/") or "/")
    return out


def under(path: str, mounts: Iterable[str]) -> bool:
    return any(path == m or path.startswith(m + "/") for m in mounts)


def rule_security(r: Rendering) -> None:
    for ns in r.kind("Namespace"):
        if (ns["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce") != "restricted":
            r.fail(ns, "security", "label pod-security.kubernetes.io/enforce: restricted missing")
    for w in r.workloads:
        spec = pod_spec(w)
        psc = spec.get("securityContext") or {}
        for k in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(k):
                r.fail(w, "security", f"{k} is not allowed")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            r.fail(w, "security", "pod securityContext.seccompProfile.type must be RuntimeDefault")
        if psc.get("fsGroup") is None:
            r.fail(w, "security", "pod securityContext.fsGroup must be set (volumes writable by the pod's group)")
        for v in spec.get("volumes") or []:
            if "hostPath" in v:
                r.fail(w, "security", f"hostPath volume {v['name']} is not allowed")
    for ct in r.containers:
        w, c = ct.workload, ct.c
        psc = pod_spec(w).get("securityContext") or {}
        sc = c.get("securityContext") or {}
        who = f"container {ct.name}"
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            r.fail(w, "security", f"{who}: runAsNonRoot must be true")
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if uid == 0:
            r.fail(w, "security", f"{who}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            r.fail(w, "security", f"{who}: allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            r.fail(w, "security", f"{who}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            r.fail(w, "security", f"{who}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            r.fail(w, "security", f"{who}: adds capabilities {caps.get('add')}")
        if sc.get("readOnlyRootFilesystem") is not True:
            r.fail(w, "security", f"{who}: readOnlyRootFilesystem must be true")
        if sc.get("seccompProfile") and sc["seccompProfile"].get("type") not in ("RuntimeDefault", "Localhost"):
            r.fail(w, "security", f"{who}: seccompProfile {sc['seccompProfile']}")
        if ct.subcommand or (ct.init and r.is_nexus_workload(w)):
            if uid != NEXUS_UID:
                r.fail(w, "security", f"{who}: must run as {NEXUS_UID}, the image's user (deploy/Dockerfile)")
        if not ct.subcommand:
            continue
        mounts = writable_mounts(w, c)
        paths = {"working directory": WORKDIR, "/tmp": "/tmp"}
        if ct.subcommand in ("gateway", "up"):
            paths["gateway.buffer.dir"] = get(ct.config, "gateway.buffer.dir", "nexus-data/gateway-buffer")
        if ct.subcommand in ("gateway", "up", "commands"):
            paths["gateway.opcua.pki_dir"] = get(ct.config, "gateway.opcua.pki_dir", "nexus-data/pki")
        if ct.subcommand in ("ingest", "up"):
            paths["ingestion.wal_dir"] = get(ct.config, "ingestion.wal_dir", "nexus-data/ingest-wal")
        for what, p in paths.items():
            p = str(p)
            if not p.startswith("/"):
                p = f"{WORKDIR}/{p}"
            if not under(p.rstrip("/"), mounts):
                r.fail(w, "security", f"{who}: {what} ({p}) is not on a writable volume, and the "
                       "root filesystem is read-only")


def rule_headless(r: Rendering) -> None:
    for s in r.kind("StatefulSet"):
        name = s["spec"].get("serviceName")
        svc = r.service_for(name) if name else None
        if not svc:
            r.fail(s, "headless", f"serviceName {name!r} names no Service of the rendering")
        elif svc["spec"].get("clusterIP") != "None":
            r.fail(s, "headless", f"serviceName {name} is not headless (clusterIP: None)")
        elif not service_selects(svc, pod_labels(s)):
            r.fail(s, "headless", f"Service {name} does not select the StatefulSet's pods")


def claim_of(w: dict, c: dict, path: str) -> str | None:
    claims = {t["metadata"]["name"] for t in (w.get("spec", {}).get("volumeClaimTemplates") or [])}
    best = None
    for m in c.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best[0])):
            best = (mp, m["name"])
    return best[1] if best and best[1] in claims else None


def rule_stateful_storage(r: Rendering) -> None:
    for ct in r.nexus():
        w = ct.workload
        needs = []
        if ct.subcommand in ("gateway", "up"):
            needs.append(("gateway.buffer.dir", get(ct.config, "gateway.buffer.dir", "nexus-data/gateway-buffer")))
        if ct.subcommand in ("ingest", "up"):
            needs.append(("ingestion.wal_dir", get(ct.config, "ingestion.wal_dir", "nexus-data/ingest-wal")))
        for what, p in needs:
            p = str(p) if str(p).startswith("/") else f"{WORKDIR}/{p}"
            if w["kind"] != "StatefulSet" or not claim_of(w, ct.c, p):
                r.fail(w, "stateful-storage", f"{what} ({p}) must be on a volumeClaimTemplate of a StatefulSet")
        if needs and w["kind"] == "StatefulSet":
            pol = w["spec"].get("persistentVolumeClaimRetentionPolicy") or {}
            if pol.get("whenScaled", "Retain") != "Retain":
                r.fail(w, "stateful-storage", "persistentVolumeClaimRetentionPolicy.whenScaled must be "
                       "Retain: a volume scaled away still holds data to drain")
        if ct.subcommand == "gateway" and (r.replicas(w) or 2) > 1:
            if get(ct.config, "gateway.shard.enabled") is not True:
                r.fail(w, "stateful-storage", "several gateways without gateway.shard.enabled would "
                       "poll every device twice")
            inst = ct.env.get("NEXUS_TELEMETRY__INSTANCE", {})
            if w["kind"] != "StatefulSet" or ((inst.get("valueFrom") or {}).get("fieldRef") or {}).get(
                    "fieldPath") != "metadata.name":
                r.fail(w, "stateful-storage", "sharded gateways need stable member names: a StatefulSet "
                       "with NEXUS_TELEMETRY__INSTANCE from metadata.name")
        if ct.subcommand in ("gateway", "commands", "up"):
            vols = pod_spec(w).get("volumes") or []
            if not any((v.get("secret") or {}).get("secretName") == "nexus-opcua-pki" for v in vols):
                r.fail(w, "stateful-storage", "the OPC UA client identity (Secret nexus-opcua-pki) is "
                       "not given to this OPC UA client")


URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s/]+@", re.I)
SECRET_KEY = re.compile(r"(^|_)(password|passwd|secret|token)$", re.I)
# A reference to where the secret is, not the secret: ${VAR}, $VAR, Grafana's $__env{VAR} and
# $__file{/path}.
INDIRECT = re.compile(r"^\s*(\$\{[A-Za-z_][A-Za-z0-9_]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\$__(env|file)\{[^}]+\})\s*$")
# SQL's PASSWORD given as a psql variable (:'var', set with -v on the command line) in an init
# script: the value is not in the script.
PSQL_PASSWORD = re.compile(r"(?i)\bpassword\s+:'[A-Za-z_][A-Za-z0-9_]*'")
# A ConfigMap key, or an environment variable, whose name says it holds a secret: what envFrom
# turns into NEXUS_HISTORIAN_PASSWORD or GF_SECURITY_ADMIN_PASSWORD, a file api-token, ...
SECRET_NAME = re.compile(r"(?i)(^|[_.-])(password|passwd|secret|token|api_?key|private_?key|credentials?)([_.-]|$)")
# ...unless the name says it only points at one, and the value is such a pointer: a file
# (Grafana's GF_..._PASSWORD__FILE, the _FILE of many images) or a variable's name (_ENV).
POINTER = {re.compile(r"(?i)_(file|path)$"): re.compile(r"^/\S*$"),
           re.compile(r"(?i)_env$"): re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")}


def secret_named(name: str, value: Any) -> bool:
    """A name that says secret with a value that is not a reference or a pointer to one."""
    v = "" if value is None else str(value)
    if not SECRET_NAME.search(name) or not v.strip() or INDIRECT.match(v):
        return False
    return not any(k.search(name) and vr.match(v.strip()) for k, vr in POINTER.items())


def secret_keys(node: Any, path: str = "") -> Iterable[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}" if path else str(k)
            if SECRET_KEY.search(str(k)) and v not in (None, "") and not INDIRECT.match(str(v)):
                yield p
            yield from secret_keys(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from secret_keys(v, f"{path}[{i}]")
    elif isinstance(node, str) and URL_CREDENTIALS.search(node):
        yield f"{path} (credentials in a URL)"


def rule_no_secrets(r: Rendering) -> None:
    for cm in r.kind("ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            # The key itself: envFrom makes each key a variable of that name.
            if secret_named(key, text):
                r.fail(cm, "no-secrets", f"key {key} names a secret and holds its value; put it in a Secret "
                       "(secretKeyRef), or point at a mounted file (..._FILE)")
                continue
            parsed = _parse(str(text))
            found = list(secret_keys(parsed)) if isinstance(parsed, (dict, list)) else []
            if not found:
                for line in str(text).splitlines():
                    s = line.split("#", 1)[0]
                    if PSQL_PASSWORD.search(s):
                        continue
                    m = re.search(r"(?i)\bpassword\s*[:=]\s*(.*)", s)
                    if (m and m.group(1).strip() and not INDIRECT.match(m.group(1))) or URL_CREDENTIALS.search(s):
                        found.append(line.strip())
            for f in found:
                r.fail(cm, "no-secrets", f"{key}: a secret value in a ConfigMap: {f} "
                       "(use password_env / password_hash and a Secret)")
    for s in r.kind("Secret"):
        if s.get("data") or s.get("stringData"):
            r.fail(s, "no-secrets", "a Secret with values is shipped; create it in the cluster instead")
    for ct in r.containers:
        for var, e in ct.env.items():
            if "configMapKeyRef" in (e.get("valueFrom") or {}) and SECRET_NAME.search(var) \
                    and not any(k.search(var) for k in POINTER):
                r.fail(ct.workload, "no-secrets", f"container {ct.name}: {var} comes from a ConfigMap; "
                       "take it from a Secret (secretKeyRef)")
            if "valueFrom" in e:
                continue
            v = str(e.get("value", ""))
            if (re.search(r"(?i)(password|secret|token)$", var) and v) or URL_CREDENTIALS.search(v):
                r.fail(ct.workload, "no-secrets", f"container {ct.name}: {var} is a literal; take it "
                       "from a Secret (secretKeyRef)")


def rule_secret_env(r: Rendering) -> None:
    for ct in r.nexus():
        w, who = ct.workload, f"container {ct.name} (`nexus {ct.subcommand}`)"
        uses_db = ct.subcommand in DATABASE_USERS
        if uses_db and not ct.from_secret("NEXUS_DATABASE_URL"):
            r.fail(w, "secret-env", f"{who} uses the database: NEXUS_DATABASE_URL must come from a secretKeyRef")
        if "NEXUS_DATABASE__URL" in ct.env and not ct.from_secret("NEXUS_DATABASE__URL"):
            r.fail(w, "secret-env", f"{who}: NEXUS_DATABASE__URL must come from a secretKeyRef")
        if not uses_db and ("NEXUS_DATABASE_URL" in ct.env or "NEXUS_DATABASE__URL" in ct.env):
            r.fail(w, "secret-env", f"{who} uses no database and must not get its URL")
        auth = ct.config.get("auth") or {}
        for u in (auth.get("users") or []) + (auth.get("tokens") or []):
            var = (u or {}).get("password_env") or (u or {}).get("token_env")
            if var and not ct.from_secret(var):
                r.fail(w, "secret-env", f"{who}: {var} (password_env of {u.get('username') or u.get('name')}) "
                       "must come from a secretKeyRef, or the service does not start")
        mqtt = ct.config.get("mqtt") or {}
        if ct.subcommand not in ("up", "broker") and mqtt.get("username") and not ct.from_secret("NEXUS_MQTT__PASSWORD"):
            r.fail(w, "secret-env", f"{who}: mqtt.username is set, NEXUS_MQTT__PASSWORD must come from a secretKeyRef")


def rule_mqtt_tls(r: Rendering) -> None:
    ok = False
    for ct in r.nexus():
        if ct.subcommand not in ("broker", "up"):
            continue
        w = ct.workload
        tls = get(ct.config, "broker.tls")
        if not isinstance(tls, dict) or not tls.get("cert_file") or not tls.get("key_file"):
            r.fail(w, "mqtt-tls", "broker.tls (cert_file, key_file) is not configured")
            continue
        if int(tls.get("port", 8883)) != 8883:
            r.fail(w, "mqtt-tls", f"broker.tls.port is {tls.get('port')}, not 8883")
        vols = {v["name"]: v for v in pod_spec(w).get("volumes") or []}
        for f in ("cert_file", "key_file"):
            src = None
            for m in ct.c.get("volumeMounts") or []:
                if str(tls[f]).startswith(m["mountPath"].rstrip("/") + "/"):
                    src = (vols.get(m["name"]) or {}).get("secret", {}).get("secretName")
            if src != "nexus-broker-tls":
                r.fail(w, "mqtt-tls", f"broker.tls.{f} ({tls[f]}) is not mounted from the Secret nexus-broker-tls")
        if 8883 not in [int(p["containerPort"]) for p in ct.c.get("ports") or []]:
            r.fail(w, "mqtt-tls", "the container does not declare port 8883")
            continue
        for s in r.kind("Service"):
            if not service_selects(s, pod_labels(w)):
                continue
            for p in s["spec"].get("ports") or []:
                if p.get("port") == 8883 and container_port(ct.c, p.get("targetPort", 8883)) == 8883:
                    ok = True
    if not ok:
        r.fail("platform", "mqtt-tls", "no Service exposes MQTT over TLS (8883) of the broker")


# --- network policies: a small evaluator of ingress and egress rules -------------------------

@dataclass
class Peer:
    what: str
    labels: dict | None  # pod labels, None for a client outside the cluster
    namespace_labels: dict
    ip: str | None = None  # the address of a peer outside the cluster, for egress to an ipBlock


def allowed(r: Rendering, ns: str, dest: dict, dest_container: dict, port: int, src: Peer) -> bool:
    pols = [p for p in r.kind("NetworkPolicy") if p["metadata"].get("namespace") == ns
            and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])
            and matches(p["spec"].get("podSelector"), dest)]
    if not pols:
        return True  # not isolated
    own_ns = {"kubernetes.io/metadata.name": ns}
    for p in pols:
        for rule in p["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(container_port(dest_container, q.get("port")) == port for q in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    if src.labels is None and ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen == 0:
                        return True
                    continue
                if src.labels is None:
                    continue
                nsel, psel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = matches(nsel, src.namespace_labels) if nsel is not None else src.namespace_labels == own_ns
                pod_ok = matches(psel, src.labels) if psel is not None else True
                if ns_ok and pod_ok:
                    return True
    return False


def rule_network_policy(r: Rendering) -> None:
    namespaces = {w["metadata"].get("namespace") for w in r.workloads}
    for ns in namespaces:
        if not any(p["metadata"].get("namespace") == ns and p["spec"].get("podSelector") == {}
                   and "Ingress" in (p["spec"].get("policyTypes") or []) and not p["spec"].get("ingress")
                   for p in r.kind("NetworkPolicy")):
            r.fail(f"Namespace/{ns}", "network-policy", "no default-deny ingress NetworkPolicy (podSelector: {})")
    own = lambda w: {"kubernetes.io/metadata.name": w["metadata"].get("namespace")}  # noqa: E731
    outside = Peer("a client outside the cluster", None, {})
    prometheus = Peer("Prometheus (namespace monitoring)", {"app.kubernetes.io/name": "prometheus"},
                      MONITORING_NAMESPACE)
    nexus = [ct for ct in r.nexus()]
    stranger = Peer("another pod of the namespace", {"app.kubernetes.io/name": "something-else"}, {})
    db = [w for w in r.workloads if pod_labels(w).get("app.kubernetes.io/component") == "database"]

    def check(dest_w: dict, dest_c: dict, port: int, src: Peer, want: bool, why: str) -> None:
        got = allowed(r, dest_w["metadata"].get("namespace"), pod_labels(dest_w), dest_c, port, src)
        if got != want:
            r.fail(dest_w, "network-policy", f"{src.what} {'cannot' if want else 'can'} reach port {port}: {why}")

    for ct in nexus:
        w = ct.workload
        peer = Peer(f"{ref(w)} (`nexus {ct.subcommand}`)", pod_labels(w), own(w))
        stranger.namespace_labels = own(w)
        for port in http_ports(ct):
            check(w, ct.c, port, prometheus, True, "Prometheus scrapes every HTTP port")
        for b in [b for b in nexus if b.subcommand in ("broker", "up")]:
            if b.workload is not w:
                check(b.workload, b.c, 1883, peer, True, "services reach the broker")
        if ct.subcommand in ("broker", "up"):
            check(w, ct.c, 1883, stranger, False, "plain MQTT is for Nexus's own pods")
        for d in db:
            check(d, pod_spec(d)["containers"][0], 5432, peer, ct.subcommand in DATABASE_USERS,
                  "only ingest, commands, alerts and up use the database")
        if ct.subcommand in ("broker", "up"):
            check(w, ct.c, 8883, outside, True, "clients use MQTT over TLS")
            check(w, ct.c, 1883, outside, False, "plain MQTT stays inside the namespace")
        if ct.subcommand in ("orchestrator", "up"):
            check(w, ct.c, http_port(ct), outside, True, "clients use the status API")
    # The orchestrator forwards the control center's calls to the services it names in
    # orchestrator.upstreams: each names a Service in front of that workload, the orchestrator
    # reaches its port, and no other pod does.
    for ct in [c for c in nexus if c.subcommand == "orchestrator"]:
        w = ct.workload
        peer = Peer(f"{ref(w)} (`nexus orchestrator`)", pod_labels(w), own(w))
        stranger.namespace_labels = own(w)
        ups = get(ct.config, "orchestrator.upstreams") or {}
        for key, sub in (("ingestion", "ingest"), ("alerts", "alerts")):
            url = ups.get(key) if isinstance(ups, dict) else None
            m_url = re.match(r"https?://([^:/]+):(\d+)/?$", url or "")
            if not m_url:
                r.fail(w, "network-policy", f"orchestrator.upstreams.{key} is not http://<service>:<port> "
                       f"({url!r}): the control center cannot reach {sub}")
                continue
            host, port = m_url.group(1), int(m_url.group(2))
            targets = [t for t in nexus if t.subcommand == sub]
            svc = next((x for x in r.kind("Service") if x["metadata"]["name"] == host), None)
            for t in targets:
                sel = (svc or {}).get("spec", {}).get("selector") or {}
                if not svc or not sel or any(pod_labels(t.workload).get(k) != v for k, v in sel.items()) \
                        or port not in [int(p.get("port", 0)) for p in svc["spec"].get("ports") or []]:
                    r.fail(w, "network-policy", f"orchestrator.upstreams.{key} names {host}:{port}, "
                           f"which is no Service port in front of {ref(t.workload)}")
                check(t.workload, t.c, port, peer, True, "the orchestrator forwards the control center's calls")
                check(t.workload, t.c, port, stranger, False, "only the orchestrator calls the service APIs")
    grafana = Peer("Grafana", {"app.kubernetes.io/name": "grafana"}, {})
    for d in db:
        grafana.namespace_labels = stranger.namespace_labels = own(d)
        check(d, pod_spec(d)["containers"][0], 5432, grafana, True, "Grafana reads the history")
        check(d, pod_spec(d)["containers"][0], 5432, stranger, False, "only Nexus's database users")


# Egress. The pods that talk to PLCs keep open egress (docs/deploy.md, Network policies): the
# devices are at addresses and ports only the plant knows. Every other pod may reach only the
# flows Nexus uses.
OPEN_EGRESS = {"gateway", "commands", "up"}
DEVICE = Peer("a PLC outside the cluster", None, {}, ip="192.0.2.10")
DEVICE_PORTS = (502, 4840, 44818)  # Modbus TCP, OPC UA, EtherNet/IP
WEBHOOK = Peer("a webhook outside the cluster", None, {}, ip="203.0.113.10")
DNS = Peer("the cluster DNS (namespace kube-system)", {"k8s-app": "kube-dns"},
           {"kubernetes.io/metadata.name": "kube-system"})


def policy_types(p: dict) -> list[str]:
    """spec.policyTypes, or its default: Ingress, and Egress when the policy has egress rules."""
    spec = p.get("spec") or {}
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def egress_policies(r: Rendering, src: dict) -> list[dict]:
    ns = src["metadata"].get("namespace")
    return [p for p in r.kind("NetworkPolicy") if p["metadata"].get("namespace") == ns
            and "Egress" in policy_types(p) and matches(p["spec"].get("podSelector"), pod_labels(src))]


def port_matches(q: dict, port: int, protocol: str, dest_container: dict | None) -> bool:
    if q.get("protocol", "TCP") != protocol:
        return False
    if q.get("port") is None:
        return True
    want = container_port(dest_container or {}, q["port"])
    if want is None:
        return False
    return want == port or (q.get("endPort") is not None and want <= port <= int(q["endPort"]))


def egress_allowed(r: Rendering, src: dict, dest: Peer, port: int, protocol: str = "TCP",
                   dest_container: dict | None = None) -> bool:
    pols = egress_policies(r, src)
    if not pols:
        return True  # not isolated
    own_ns = {"kubernetes.io/metadata.name": src["metadata"].get("namespace")}
    for p in pols:
        for rule in p["spec"].get("egress") or []:
            ports = rule.get("ports")
            if ports and not any(port_matches(q, port, protocol, dest_container) for q in ports):
                continue
            peers = rule.get("to")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    if dest.ip is None:
                        continue  # pods are reached by their selectors, not by address
                    ip, blk = ipaddress.ip_address(dest.ip), peer["ipBlock"]
                    net = ipaddress.ip_network(blk["cidr"])
                    if ip.version == net.version and ip in net and not any(
                            ip.version == ipaddress.ip_network(x).version and ip in ipaddress.ip_network(x)
                            for x in blk.get("except") or []):
                        return True
                    continue
                if dest.labels is None:
                    continue
                nsel, psel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = matches(nsel, dest.namespace_labels) if nsel is not None else dest.namespace_labels == own_ns
                pod_ok = matches(psel, dest.labels) if psel is not None else True
                if ns_ok and pod_ok:
                    return True
    return False


def pod_peer(w: dict, what: str | None = None) -> Peer:
    return Peer(what or ref(w), pod_labels(w), {"kubernetes.io/metadata.name": w["metadata"].get("namespace")})


def rule_egress(r: Rendering) -> None:
    nexus = r.nexus()
    brokers = [b for b in nexus if b.subcommand in ("broker", "up")]
    db = [w for w in r.workloads if pod_labels(w).get("app.kubernetes.io/component") == "database"]
    for w in r.workloads:
        mine = [ct for ct in nexus if ct.workload is w]
        subs = {ct.subcommand for ct in mine}
        open_ok = bool(subs & OPEN_EGRESS)
        who = ", ".join(f"`nexus {x}`" for x in sorted(subs)) or "it"

        def expect(dest: Peer, port: int, want: bool, why: str, protocol: str = "TCP",
                   dest_container: dict | None = None) -> None:
            if egress_allowed(r, w, dest, port, protocol, dest_container) != want:
                r.fail(w, "egress", f"{'cannot' if want else 'can'} reach {dest.what} on {protocol} {port}: {why}")

        if not egress_policies(r, w) and not open_ok:
            r.fail(w, "egress", "no egress NetworkPolicy selects its pods, so they may reach anything; only "
                   "the pods that talk to PLCs (gateway, commands, up) keep open egress")
            continue
        for proto in ("UDP", "TCP"):
            expect(DNS, 53, True, "every pod resolves Service names", proto)
        for port in DEVICE_PORTS:
            expect(DEVICE, port, open_ok, f"{who} talks to PLCs at addresses only the plant knows" if open_ok
                   else "only the gateway, the command handler and `nexus up` keep open egress (PLCs)")
        if not open_ok:
            expect(WEBHOOK, 443, "alerts" in subs, "the alert service's webhooks (HTTPS)" if "alerts" in subs
                   else "only the alert service calls out (webhooks)")
        for ct in mine:
            for b in brokers:
                if b.workload is w:
                    continue
                port = int(get(ct.config, "mqtt.port", 1883) or 1883)
                expect(pod_peer(b.workload, f"the broker {ref(b.workload)}"), port, True,
                       f"`nexus {ct.subcommand}` connects to the broker", dest_container=b.c)
            for d in db:
                uses = ct.subcommand in DATABASE_USERS
                if uses or not open_ok:
                    expect(pod_peer(d, f"the database {ref(d)}"), 5432, uses,
                           f"`nexus {ct.subcommand}` {'writes' if uses else 'does not use'} the database",
                           dest_container=pod_spec(d)["containers"][0])
            if ct.subcommand == "orchestrator":
                ups = get(ct.config, "orchestrator.upstreams") or {}
                for key, sub in (("ingestion", "ingest"), ("alerts", "alerts")):
                    m_url = re.match(r"https?://([^:/]+):(\d+)/?$", (ups.get(key) if isinstance(ups, dict) else None) or "")
                    if not m_url:
                        continue  # rule network-policy names it
                    for t in [t for t in nexus if t.subcommand == sub]:
                        svc = r.service_for(m_url.group(1)) or {}
                        port = next((container_port(t.c, p.get("targetPort", p.get("port")))
                                     for p in (svc.get("spec") or {}).get("ports") or []
                                     if int(p.get("port", 0)) == int(m_url.group(2))), int(m_url.group(2)))
                        expect(pod_peer(t.workload, f"{ref(t.workload)} (orchestrator.upstreams.{key})"),
                               port, True, "the orchestrator forwards the control center's calls", dest_container=t.c)


# --- Grafana: its datasources point at something that exists and that it may reach ----------

GRAFANA_BUILTIN_UIDS = {"grafana", "-- Grafana --", "-- Mixed --", "-- Dashboard --"}
SECRET_VALUE = "\0secret"  # an environment value taken from a Secret: set, value unknown


def grafana_containers(r: Rendering) -> list[Container]:
    return [ct for ct in r.containers if not ct.init
            and str(ct.c.get("image", "")).rsplit("/", 1)[-1].split(":")[0] == "grafana"]


def configmap(r: Rendering, name: str, ns: str | None) -> dict | None:
    return next((cm for cm in r.kind("ConfigMap") if cm["metadata"]["name"] == name
                 and cm["metadata"].get("namespace") == ns), None)


def container_environment(r: Rendering, ct: Container) -> dict[str, str]:
    ns = ct.workload["metadata"].get("namespace")
    env: dict[str, str] = {}
    for ef in ct.c.get("envFrom") or []:
        ref_ = ef.get("configMapRef")
        cm = configmap(r, ref_["name"], ns) if ref_ else None
        for k, v in ((cm or {}).get("data") or {}).items():
            env[ef.get("prefix", "") + k] = str(v)
    for var, e in ct.env.items():
        env[var] = SECRET_VALUE if "valueFrom" in e else str(e.get("value", ""))
    return env


def mounted_configmap(r: Rendering, w: dict, c: dict, directory: str) -> dict | None:
    """The ConfigMap mounted (whole, not by subPath) at `directory` in container `c`."""
    vols = {v["name"]: v for v in pod_spec(w).get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        cm = (vols.get(m["name"]) or {}).get("configMap")
        if cm and not m.get("subPath") and m["mountPath"].rstrip("/") == directory.rstrip("/"):
            return configmap(r, cm.get("name"), w["metadata"].get("namespace"))
    return None


GRAFANA_VAR = re.compile(r"\$__env\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand(node: Any, env: dict[str, str], unset: set[str]) -> Any:
    """Grafana's expansion of environment variables in provisioning files."""
    if isinstance(node, dict):
        return {k: expand(v, env, unset) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(v, env, unset) for v in node]
    if isinstance(node, str):
        def sub(m: re.Match) -> str:
            var = m.group(1) or m.group(2) or m.group(3)
            if var not in env:
                unset.add(var)
            return env.get(var, "")
        return GRAFANA_VAR.sub(sub, node)
    return node


def datasource_uids(node: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and isinstance(ds.get("uid"), str):
            out.add(ds["uid"])
        elif isinstance(ds, str):
            out.add(ds)
        for v in node.values():
            out |= datasource_uids(v)
    elif isinstance(node, list):
        for v in node:
            out |= datasource_uids(v)
    return {u for u in out if u not in GRAFANA_BUILTIN_UIDS and not u.startswith("$")}


def resolve_service(r: Rendering, host: str, ns: str) -> tuple[dict | None, str]:
    """The Service of the rendering a host name means (name, name.ns, name.ns.svc...), and its
    namespace; None when the name is not of the rendering."""
    parts = host.split(".")
    svc_ns = parts[1] if len(parts) > 1 else ns
    svc = next((s for s in r.kind("Service") if s["metadata"]["name"] == parts[0]
                and s["metadata"].get("namespace") == svc_ns), None)
    return svc, svc_ns


def rule_grafana(r: Rendering) -> None:
    for ct in grafana_containers(r):
        w = ct.workload
        ns = w["metadata"].get("namespace")
        env = container_environment(r, ct)
        prov = env.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
        cm = mounted_configmap(r, w, ct.c, f"{prov}/datasources")
        if cm is None:
            r.fail(w, "grafana", f"no ConfigMap mounted at {prov}/datasources")
            continue
        provisioned: dict[str, tuple[dict, dict]] = {}  # uid -> (expanded, as written)
        for key, text in (cm.get("data") or {}).items():
            doc = parse(str(text)) if key.endswith((".yaml", ".yml")) else None
            for ds in (doc or {}).get("datasources") or []:
                unset: set[str] = set()
                provisioned[ds.get("uid") or ds.get("name")] = (expand(ds, env, unset), ds)
                for var in sorted(unset):
                    r.fail(w, "grafana", f"datasource {ds.get('uid')}: ${{{var}}} is not in Grafana's environment")
                if r.datasources is not None:
                    path, canonical = r.datasources
                    if ds.get("uid") not in canonical:
                        r.fail(cm, "grafana", f"{key}: datasource {ds.get('uid')} is not in {path}")
                    elif canonical[ds.get("uid")] != ds:
                        r.fail(cm, "grafana", f"{key}: datasource {ds.get('uid')} differs from the one of {path}")
        for uid, (ds, written) in provisioned.items():
            m_url = re.match(r"^(?:([a-z]+)://)?([^:/]+)(?::(\d+))?", str(ds.get("url") or ""))
            if not m_url:
                r.fail(w, "grafana", f"datasource {uid}: url {ds.get('url')!r} names no host")
                continue
            scheme, host = m_url.group(1), m_url.group(2)
            kind = str(ds.get("type"))
            port = int(m_url.group(3) or {"postgres": 5432, "grafana-postgresql-datasource": 5432}.get(
                kind, 443 if scheme == "https" else 80))
            svc, svc_ns = resolve_service(r, host, ns)
            if svc is None and svc_ns != ns and kind == "prometheus":
                # A Prometheus of another namespace (the Prometheus Operator's): only where the
                # rendering has it scrape Nexus, and Grafana may reach it there.
                if not r.kind("ServiceMonitor"):
                    r.fail(w, "grafana", f"datasource {uid} reads a Prometheus at {host}:{port}, and nothing in "
                           "this rendering has one scrape Nexus (no ServiceMonitor): leave the datasource out")
                peer = Peer(f"Prometheus at {host}:{port}", {"app.kubernetes.io/name": "prometheus"},
                            {"kubernetes.io/metadata.name": svc_ns})
                if not egress_allowed(r, w, peer, port):
                    r.fail(w, "grafana", f"datasource {uid}: Grafana's egress does not allow {host}:{port}")
                continue
            if svc is None:
                r.fail(w, "grafana", f"datasource {uid}: {host} is no Service of the rendering")
                continue
            sport = next((p for p in svc["spec"].get("ports") or [] if int(p.get("port", 0)) == port), None)
            if sport is None:
                r.fail(w, "grafana", f"datasource {uid}: Service {host} has no port {port}")
                continue
            backends = [t for t in r.workloads if service_selects(svc, pod_labels(t))]
            if not backends:
                r.fail(w, "grafana", f"datasource {uid}: Service {host} selects no pod of the rendering")
            for t in backends:
                tc = pod_spec(t)["containers"][0]
                tport = container_port(tc, sport.get("targetPort", port)) or port
                if not egress_allowed(r, w, pod_peer(t), tport, dest_container=tc):
                    r.fail(w, "grafana", f"datasource {uid}: Grafana's egress does not allow {ref(t)} port {tport}")
                if not allowed(r, t["metadata"].get("namespace"), pod_labels(t), tc, tport, pod_peer(w, "Grafana")):
                    r.fail(w, "grafana", f"datasource {uid}: {ref(t)} does not let Grafana in on port {tport}")
                if kind in ("postgres", "grafana-postgresql-datasource"):
                    check_historian_role(r, w, ct, ds, written, t, tc)
        # Every dashboard reads provisioned datasources only.
        providers = mounted_configmap(r, w, ct.c, f"{prov}/dashboards")
        for key, text in ((providers or {}).get("data") or {}).items():
            for pv in (parse(str(text)) or {}).get("providers") or []:
                path = (pv.get("options") or {}).get("path")
                dcm = mounted_configmap(r, w, ct.c, path) if path else None
                if dcm is None:
                    r.fail(w, "grafana", f"dashboard provider {pv.get('name')}: no ConfigMap mounted at {path}")
                    continue
                for f, body in (dcm.get("data") or {}).items():
                    if not f.endswith(".json"):
                        continue
                    missing = datasource_uids(parse(str(body))) - set(provisioned)
                    if missing:
                        r.fail(dcm, "grafana", f"dashboard {f} reads datasource(s) {', '.join(sorted(missing))}, "
                               "which are not provisioned")


def check_historian_role(r: Rendering, w: dict, ct: Container, ds: dict, written: dict, db: dict,
                         dbc: dict) -> None:
    """Grafana logs in as a role the database's init scripts make, with the password those
    scripts are given (the same Secret key), in the database the server creates."""
    uid = ds.get("uid")
    dbenv = {e["name"]: e for e in dbc.get("env") or [] if "name" in e}
    want_db = (dbenv.get("POSTGRES_DB") or {}).get("value")
    got_db = (ds.get("jsonData") or {}).get("database")
    if want_db and got_db != want_db:
        r.fail(w, "grafana", f"datasource {uid}: database {got_db!r}, the server creates {want_db!r}")
    scripts = ""
    vols = {v["name"]: v for v in pod_spec(db).get("volumes") or []}
    for m in dbc.get("volumeMounts") or []:
        if not m["mountPath"].startswith("/docker-entrypoint-initdb.d"):
            continue
        cm = configmap(r, ((vols.get(m["name"]) or {}).get("configMap") or {}).get("name"), db["metadata"].get("namespace"))
        data = (cm or {}).get("data") or {}
        scripts += "\n".join(str(v) for k, v in data.items() if not m.get("subPath") or k == m["subPath"])
    roles = set(re.findall(r"(?i)CREATE\s+(?:ROLE|USER)\s+\"?([A-Za-z_][A-Za-z0-9_]*)", scripts))
    user = str(ds.get("user") or "")
    if user not in roles:
        r.fail(w, "grafana", f"datasource {uid}: user {user!r} is not a role the init scripts of {ref(db)} create "
               f"({', '.join(sorted(roles)) or 'none mounted at /docker-entrypoint-initdb.d'})")
        return
    # The password as written names a variable; the Secret key that variable comes from.
    m_var = GRAFANA_VAR.search(str((written.get("secureJsonData") or {}).get("password") or ""))
    var = (m_var.group(1) or m_var.group(2) or m_var.group(3)) if m_var else None
    key = ((ct.env.get(var) or {}).get("valueFrom") or {}).get("secretKeyRef") if var else None
    if not key:
        r.fail(w, "grafana", f"datasource {uid}: the password is not from a Secret (secretKeyRef)")
        return
    given = [((e.get("valueFrom") or {}).get("secretKeyRef") or {}) for e in dbenv.values()]
    if not any(g.get("name") == key.get("name") and g.get("key") == key.get("key") for g in given):
        r.fail(w, "grafana", f"datasource {uid}: Grafana logs in as {user} with the Secret {key.get('name')} key "
               f"{key.get('key')}, which {ref(db)} does not give its init scripts")


def adapter_names(rules: list[dict]) -> set[str]:
    out = set()
    for rule in rules:
        name = (rule.get("name") or {})
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule.get("seriesQuery", ""))
        base = series.group(1) if series else ""
        if name.get("as"):
            out.add(name["as"])
        elif base:
            out.add(re.sub(name.get("matches", "^$a"), "", base) if name.get("matches") else base)
    return out


def rule_hpa(r: Rendering) -> None:
    hpas = r.kind("HorizontalPodAutoscaler")
    if not hpas:
        return
    served = adapter_names(r.adapter_rules or [])
    for h in hpas:
        t = h["spec"]["scaleTargetRef"]
        target = next((w for w in r.workloads if w["kind"] == t["kind"] and w["metadata"]["name"] == t["name"]), None)
        if not target:
            r.fail(h, "hpa", f"scaleTargetRef {t['kind']}/{t['name']} is not in the rendering")
        elif "replicas" in target["spec"]:
            r.fail(target, "hpa", f"sets spec.replicas while {ref(h)} scales it: every apply resets the scale")
        for m in h["spec"].get("metrics") or []:
            if m["type"] in ("Pods", "Object", "External"):
                name = m[m["type"].lower()]["metric"]["name"]
                if name not in served:
                    r.fail(h, "hpa", f"metric {name} is served by no prometheus-adapter rule "
                           f"(the rules serve: {', '.join(sorted(served)) or 'nothing'})")
        down = (h["spec"].get("behavior") or {}).get("scaleDown") or {}
        if int(down.get("stabilizationWindowSeconds", 300)) < 300:
            r.fail(h, "hpa", "scaleDown.stabilizationWindowSeconds below 300s")


def rule_monitoring(r: Rendering) -> None:
    sms = r.kind("ServiceMonitor")
    if not sms and not r.kind("HorizontalPodAutoscaler"):
        return
    for ct, port in [(ct, port) for ct in r.nexus() for port in http_ports(ct)]:
        w = ct.workload
        scraped = False
        for s in r.kind("Service"):
            if not service_selects(s, pod_labels(w)):
                continue
            for sm in sms:
                if not matches(sm["spec"].get("selector"), s["metadata"].get("labels") or {}):
                    continue
                names = {e.get("port") for e in sm["spec"].get("endpoints") or []}
                for p in s["spec"].get("ports") or []:
                    if p.get("name") in names and container_port(ct.c, p.get("targetPort", p["port"])) == port:
                        scraped = True
        if not scraped:
            r.fail(w, "monitoring", f"no ServiceMonitor scrapes port {port} (`nexus {ct.subcommand}`)")


RULES: dict[str, Callable[[Rendering], None]] = {
    "command-consumer": rule_command_consumer,
    "single-broker": rule_single_broker,
    "probes": rule_probes,
    "pdb": rule_pdb,
    "security": rule_security,
    "headless": rule_headless,
    "stateful-storage": rule_stateful_storage,
    "no-secrets": rule_no_secrets,
    "secret-env": rule_secret_env,
    "mqtt-tls": rule_mqtt_tls,
    "network-policy": rule_network_policy,
    "egress": rule_egress,
    "grafana": rule_grafana,
    "hpa": rule_hpa,
    "monitoring": rule_monitoring,
}


def check(name: str, docs: list[dict], adapter_rules: list[dict] | None,
          datasources: tuple[str, dict[str, dict]] | None = None) -> Rendering:
    r = Rendering(name, docs, adapter_rules, datasources)
    if not r.nexus():
        r.fail("platform", "command-consumer", "no Nexus container found in the rendering")
        return r
    for rule in RULES.values():
        rule(r)
    return r


# ---------------------------------------------------------------------------------------------
# `nexus config check` of every container's configuration


def config_check(r: Rendering, nexus_bin: str) -> list[str]:
    problems = []
    seen: dict = {}
    for ct in r.nexus():
        if not ct.config_text:
            problems.append(f"{r.name}: {ref(ct.workload)}: config: no ConfigMap provides {ct.config_path}")
            continue
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
        for var, e in ct.env.items():
            vf = e.get("valueFrom") or {}
            env[var] = (str(e.get("value", "")) if "valueFrom" not in e
                        else "nexus-0" if "fieldRef" in vf
                        else "postgres://nexus:placeholder@nexus-db:5432/nexus" if var.endswith("URL")
                        else "placeholder")
        key = (ct.config_text, tuple(sorted(env.items())))
        if key in seen:
            print(f"  {r.name}: {ref(ct.workload)} `nexus {ct.subcommand}`: as {seen[key]}")
            continue
        seen[key] = ref(ct.workload)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(ct.config_text)
        try:
            out = subprocess.run([nexus_bin, "config", "check", "--config", f.name], env=env,
                                 capture_output=True, text=True, timeout=60)
        finally:
            os.unlink(f.name)
        status = "ok" if out.returncode == 0 else f"FAILED (exit {out.returncode})"
        print(f"  {r.name}: {ref(ct.workload)} `nexus {ct.subcommand}`: nexus config check {status}")
        if out.returncode != 0:
            problems.append(f"{r.name}: {ref(ct.workload)}: config: {(out.stdout + out.stderr).strip()}")
    return problems


# ---------------------------------------------------------------------------------------------
# Self-test: every rule catches a mutation that breaks it


def workload(docs: list[dict], component: str) -> dict | None:
    for d in docs:
        if d.get("kind") in WORKLOAD_KINDS and pod_labels(d).get("app.kubernetes.io/component") == component:
            return d
    return None


def nexus_container(docs: list[dict], component: str) -> dict | None:
    w = workload(docs, component)
    return pod_spec(w)["containers"][0] if w else None


def configmap_named(docs: list[dict], name: str) -> dict | None:
    """A ConfigMap by the name it was generated with (the rendering adds a hash suffix)."""
    return next((x for x in docs if x.get("kind") == "ConfigMap" and re.fullmatch(
        re.escape(name) + r"(-[a-z0-9]{10})?", x["metadata"]["name"])), None)


def grafana_container(docs: list[dict]) -> dict | None:
    w = next((x for x in docs if x.get("kind") in WORKLOAD_KINDS
              and pod_labels(x).get("app.kubernetes.io/name") == "grafana"), None)
    return pod_spec(w)["containers"][0] if w else None


def set_env(c: dict, var: str, entry: dict) -> None:
    env = c.setdefault("env", [])
    env[:] = [e for e in env if e.get("name") != var] + [dict(name=var, **entry)]


def mutations(docs: list[dict], with_datasources: bool = False) -> list[tuple[str, str, Callable[[list[dict]], bool]]]:
    """(description, rule expected to fail, mutate(docs) -> applicable)."""
    main = "broker" if workload(docs, "broker") else "platform"
    ing = "ingest" if workload(docs, "ingest") else "platform"
    gw = "gateway" if workload(docs, "gateway") else "platform"
    out: list[tuple[str, str, Callable[[list[dict]], bool]]] = []

    def m(desc: str, rule: str):
        def deco(f: Callable[[list[dict]], bool | None]):
            out.append((desc, rule, lambda d: f(d) is not False))
            return f
        return deco

    @m(f"{gw}: readinessProbe removed", "probes")
    def _(d):
        nexus_container(d, gw).pop("readinessProbe")

    @m(f"{gw}: livenessProbe on the wrong port", "probes")
    def _(d):
        nexus_container(d, gw)["livenessProbe"]["httpGet"]["port"] = 9999

    @m("gateway consumes commands besides the command handler", "command-consumer")
    def _(d):
        c = nexus_container(d, "gateway")
        if not c:
            return False
        set_env(c, "NEXUS_GATEWAY__COMMANDS", {"value": "true"})

    @m("a second command consumer (commands with 2 replicas, or an extra `nexus commands`)", "command-consumer")
    def _(d):
        w = workload(d, "commands") or workload(d, "platform")
        w["spec"]["replicas"] = 2

    @m("command handler rolled out with RollingUpdate", "command-consumer")
    def _(d):
        w = workload(d, "commands")
        if not w:
            return False
        w["spec"]["strategy"] = {"type": "RollingUpdate"}

    @m(f"{main}: PodDisruptionBudget removed", "pdb")
    def _(d):
        labels = pod_labels(workload(d, main))
        d[:] = [x for x in d if not (x.get("kind") == "PodDisruptionBudget" and matches(x["spec"]["selector"], labels))]

    @m(f"{ing}: readOnlyRootFilesystem false", "security")
    def _(d):
        nexus_container(d, ing)["securityContext"]["readOnlyRootFilesystem"] = False

    @m(f"{ing}: capabilities not dropped", "security")
    def _(d):
        nexus_container(d, ing)["securityContext"].pop("capabilities")

    @m(f"{main}: runs as root", "security")
    def _(d):
        pod_spec(workload(d, main))["securityContext"]["runAsUser"] = 0

    @m(f"{main}: no seccomp profile", "security")
    def _(d):
        pod_spec(workload(d, main))["securityContext"].pop("seccompProfile")

    @m(f"{ing}: /tmp not mounted", "security")
    def _(d):
        c = nexus_container(d, ing)
        c["volumeMounts"] = [v for v in c["volumeMounts"] if v["mountPath"] != "/tmp"]

    @m(f"{gw}: OPC UA PKI directory moved off the volumes", "security")
    def _(d):
        set_env(nexus_container(d, gw), "NEXUS_GATEWAY__OPCUA__PKI_DIR", {"value": "/opt/pki"})

    @m("namespace not labelled restricted", "security")
    def _(d):
        ns = next(x for x in d if x.get("kind") == "Namespace")
        ns["metadata"]["labels"].pop("pod-security.kubernetes.io/enforce")

    @m(f"{ing}: serviceName points at a normal Service", "headless")
    def _(d):
        w = workload(d, ing)
        svc = next(x for x in d if x.get("kind") == "Service" and x["metadata"]["name"] == w["spec"]["serviceName"])
        svc["spec"].pop("clusterIP")

    @m(f"{ing}: WAL volume deleted on scale-down", "stateful-storage")
    def _(d):
        workload(d, ing)["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] = "Delete"

    @m("gateways scaled without sharding", "stateful-storage")
    def _(d):
        c = nexus_container(d, "gateway")
        if not c:
            return False
        set_env(c, "NEXUS_GATEWAY__SHARD__ENABLED", {"value": "false"})

    @m(f"{gw}: no shared OPC UA identity", "stateful-storage")
    def _(d):
        spec = pod_spec(workload(d, gw))
        spec["volumes"] = [v for v in spec["volumes"] if (v.get("secret") or {}).get("secretName") != "nexus-opcua-pki"]

    @m("a password in the nexus.yaml ConfigMap", "no-secrets")
    def _(d):
        cm = next(x for x in d if x.get("kind") == "ConfigMap" and "nexus.yaml" in (x.get("data") or {}))
        cm["data"]["nexus.yaml"] += "\n# added\nmqtt_extra:\n  password: hunter2\n"

    @m("a database URL with its password in a ConfigMap", "no-secrets")
    def _(d):
        d.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "extra", "namespace": "nexus"},
                  "data": {"DATABASE": "postgres://nexus:hunter2@nexus-db:5432/nexus"}})

    @m(f"{ing}: NEXUS_DATABASE_URL as a literal", "secret-env")
    def _(d):
        set_env(nexus_container(d, ing), "NEXUS_DATABASE_URL", {"value": "postgres://nexus@nexus-db/nexus"})

    @m(f"{main}: a password_env not set", "secret-env")
    def _(d):
        c = nexus_container(d, main)
        c["env"] = [e for e in c["env"] if e["name"] != "NEXUS_VIEWER_PASSWORD"]

    @m("orchestrator given the database URL", "secret-env")
    def _(d):
        c = nexus_container(d, "orchestrator")
        if not c:
            return False
        set_env(c, "NEXUS_DATABASE_URL", {"valueFrom": {"secretKeyRef": {"name": "nexus-secrets", "key": "database-url"}}})

    @m("8883 removed from the broker's Services", "mqtt-tls")
    def _(d):
        for s in d:
            if s.get("kind") == "Service":
                s["spec"]["ports"] = [p for p in s["spec"]["ports"] if p["port"] != 8883] or [{"port": 1, "name": "x"}]

    @m(f"{main}: TLS certificate not from nexus-broker-tls", "mqtt-tls")
    def _(d):
        for v in pod_spec(workload(d, main))["volumes"]:
            if (v.get("secret") or {}).get("secretName") == "nexus-broker-tls":
                v["secret"]["secretName"] = "other"

    @m("default-deny NetworkPolicy removed", "network-policy")
    def _(d):
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["spec"].get("podSelector") == {})]

    @m("database open to every pod", "network-policy")
    def _(d):
        for x in d:
            if x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "database-clients":
                x["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]

    @m("plain MQTT opened to everyone", "network-policy")
    def _(d):
        w = workload(d, main)
        d.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "open-1883", "namespace": w["metadata"]["namespace"]},
                  "spec": {"podSelector": {"matchLabels": pod_labels(w)}, "policyTypes": ["Ingress"],
                           "ingress": [{"ports": [{"protocol": "TCP", "port": 1883}]}]}})

    @m("the orchestrator's calls to ingestion and alerts not allowed", "network-policy")
    def _(d):
        before = len(d)
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "nexus-upstreams")]
        return len(d) != before

    @m("Prometheus scrape policy removed", "network-policy")
    def _(d):
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "prometheus-scrape")]

    @m("NEXUS_HISTORIAN_PASSWORD written into Grafana's env ConfigMap (envFrom)", "no-secrets")
    def _(d):
        cm = configmap_named(d, "nexus-grafana-env")
        if not cm:
            return False
        cm["data"]["NEXUS_HISTORIAN_PASSWORD"] = "hunter2"

    @m("GF_SECURITY_ADMIN_PASSWORD written into Grafana's env ConfigMap (envFrom)", "no-secrets")
    def _(d):
        cm = configmap_named(d, "nexus-grafana-env")
        if not cm:
            return False
        cm["data"]["GF_SECURITY_ADMIN_PASSWORD"] = "hunter2"

    @m("Grafana's admin password taken from a ConfigMap key (configMapKeyRef)", "no-secrets")
    def _(d):
        c = grafana_container(d)
        if not c:
            return False
        set_env(c, "GF_SECURITY_ADMIN_PASSWORD",
                {"valueFrom": {"configMapKeyRef": {"name": "nexus-grafana-env", "key": "NEXUS_HISTORIAN_USER"}}})

    @m("every egress policy removed", "egress")
    def _(d):
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and "Egress" in policy_types(x))]

    @m("DNS not allowed", "egress")
    def _(d):
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "dns")]

    @m("default-deny-egress and dns select only Nexus's pods (the database's egress opens)", "egress")
    def _(d):
        for x in d:
            if x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] in ("default-deny-egress", "dns"):
                x["spec"]["podSelector"] = {"matchLabels": {"app.kubernetes.io/name": "nexus"}}

    @m(f"{'ingest' if ing == 'ingest' else 'Grafana'}: open egress", "egress")
    def _(d):
        w = workload(d, "ingest") or next(x for x in d if x.get("kind") == "Deployment"
                                          and pod_labels(x).get("app.kubernetes.io/name") == "grafana")
        d.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "open-egress", "namespace": w["metadata"]["namespace"]},
                  "spec": {"podSelector": {"matchLabels": pod_labels(w)}, "policyTypes": ["Egress"], "egress": [{}]}})

    @m(f"{gw}: egress closed (no way to the PLCs)", "egress")
    def _(d):
        before = len(d)
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] in
                                     ("nexus-devices-egress", "nexus-platform-egress"))]
        return len(d) != before

    @m("ingest, alerts and the orchestrator cannot reach the broker", "egress")
    def _(d):
        before = len(d)
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "nexus-broker-clients-egress")]
        return len(d) != before

    @m("ingest and alerts cannot reach the database", "egress")
    def _(d):
        before = len(d)
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "nexus-database-egress")]
        return len(d) != before

    @m("the orchestrator cannot reach its upstreams", "egress")
    def _(d):
        before = len(d)
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "nexus-upstreams-egress")]
        return len(d) != before

    @m("the orchestrator may reach the database", "egress")
    def _(d):
        for x in d:
            if x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "nexus-database-egress":
                x["spec"]["podSelector"]["matchExpressions"][1]["values"].append("orchestrator")
                return True
        return False

    @m("alert webhooks on every port", "egress")
    def _(d):
        for x in d:
            if x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "nexus-alerts-webhooks":
                x["spec"]["egress"][0].pop("ports")
                return True
        return False

    @m("alert webhooks not allowed", "egress")
    def _(d):
        before = len(d)
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "nexus-alerts-webhooks")]
        return len(d) != before

    @m("Grafana cannot reach the database", "grafana")
    def _(d):
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "grafana-egress")]

    @m("Grafana cannot reach its Prometheus", "grafana")
    def _(d):
        before = len(d)
        d[:] = [x for x in d if not (x.get("kind") == "NetworkPolicy" and x["metadata"]["name"] == "grafana-prometheus")]
        return len(d) != before

    @m("a Prometheus datasource where nothing scrapes Nexus", "grafana")
    def _(d):
        if any(x.get("kind") == "ServiceMonitor" for x in d):
            return False
        cm = configmap_named(d, "nexus-grafana-datasources")
        doc = yaml.safe_load(cm["data"]["nexus.yaml"])
        doc["datasources"].append({"name": "Nexus Prometheus", "uid": "nexus-prometheus", "type": "prometheus",
                                   "access": "proxy", "url": "${NEXUS_PROMETHEUS_URL}"})
        cm["data"]["nexus.yaml"] = yaml.safe_dump(doc)
        configmap_named(d, "nexus-grafana-env")["data"]["NEXUS_PROMETHEUS_URL"] = "http://prometheus-operated.monitoring:9090"

    @m("the ServiceMonitors removed while Grafana reads Prometheus", "grafana")
    def _(d):
        cm = configmap_named(d, "nexus-grafana-datasources")
        reads = any(ds.get("type") == "prometheus" for text in (cm or {}).get("data", {}).values()
                    for ds in (yaml.safe_load(text) or {}).get("datasources") or [])
        if not reads or not any(x.get("kind") == "ServiceMonitor" for x in d):
            return False
        d[:] = [x for x in d if x.get("kind") != "ServiceMonitor"]

    @m("a dashboard reads a datasource that is not provisioned", "grafana")
    def _(d):
        cm = configmap_named(d, "nexus-grafana-dashboards")
        cm["data"]["extra.json"] = json.dumps({"panels": [{"datasource": {"type": "prometheus", "uid": "nexus-prometheus-x"}}]})

    @m("Grafana's historian host is no Service", "grafana")
    def _(d):
        configmap_named(d, "nexus-grafana-env")["data"]["NEXUS_HISTORIAN_HOST"] = "historian:5432"

    @m("Grafana's historian password variable not set", "grafana")
    def _(d):
        c = grafana_container(d)
        c["env"] = [e for e in c["env"] if e["name"] != "NEXUS_HISTORIAN_PASSWORD"]

    @m("the database does not run the init script that makes Grafana's role", "grafana")
    def _(d):
        c = pod_spec(workload(d, "database"))["containers"][0]
        c["volumeMounts"] = [v for v in c["volumeMounts"] if not v["mountPath"].startswith("/docker-entrypoint-initdb.d")]

    @m("the database's init script gets another password than Grafana's", "grafana")
    def _(d):
        c = pod_spec(workload(d, "database"))["containers"][0]
        for e in c["env"]:
            if e["name"] == "NEXUS_GRAFANA_DB_PASSWORD":
                e["valueFrom"]["secretKeyRef"]["key"] = "admin-password"

    @m("a Grafana datasource differs from deploy/grafana's", "grafana")
    def _(d):
        if not with_datasources:
            return False
        cm = configmap_named(d, "nexus-grafana-datasources")
        doc = yaml.safe_load(cm["data"]["nexus.yaml"])
        doc["datasources"][0]["jsonData"]["sslmode"] = "require"
        cm["data"]["nexus.yaml"] = yaml.safe_dump(doc)

    @m("HPA metric renamed", "hpa")
    def _(d):
        h = next((x for x in d if x.get("kind") == "HorizontalPodAutoscaler"), None)
        if not h:
            return False
        h["spec"]["metrics"][0]["pods"]["metric"]["name"] = "nexus_something_else"

    @m("HPA target sets replicas", "hpa")
    def _(d):
        h = next((x for x in d if x.get("kind") == "HorizontalPodAutoscaler"), None)
        if not h:
            return False
        t = h["spec"]["scaleTargetRef"]
        next(w for w in d if w.get("kind") == t["kind"] and w["metadata"]["name"] == t["name"])["spec"]["replicas"] = 3

    @m("ServiceMonitor no longer selects the Services", "monitoring")
    def _(d):
        sm = next((x for x in d if x.get("kind") == "ServiceMonitor"), None)
        if not sm:
            return False
        sm["spec"]["selector"] = {"matchLabels": {"nothing": "here"}}

    @m("a broker replica too many", "single-broker")
    def _(d):
        w = workload(d, "broker")
        if not w:
            return False
        w["spec"]["replicas"] = 2

    return out


def self_test(renderings: dict[str, list[dict]], adapter_rules: list[dict] | None,
              datasources: tuple[str, dict[str, dict]] | None = None) -> int:
    failed = 0
    for name, docs in renderings.items():
        base = check(name, docs, adapter_rules, datasources)
        if base.failures:
            print(f"self-test {name}: the unmutated rendering does not pass:")
            for obj, rule, msg in base.failures:
                print(f"  {obj}: {rule}: {msg}")
            failed += 1
            continue
        applied, missed = 0, 0
        for desc, rule, mutate in mutations(docs, datasources is not None):
            d = copy.deepcopy(docs)
            if not mutate(d):
                continue
            applied += 1
            r = check(name, d, adapter_rules, datasources)
            rules = {f[1] for f in r.failures}
            if rule not in rules:
                missed += 1
                print(f"self-test {name}: NOT CAUGHT: {desc} (expected rule {rule}; got {sorted(rules) or 'no failure'})")
        failed += missed
        print(f"self-test {name}: {applied - missed} of {applied} mutations caught by the rule they break")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("renderings", nargs="+", metavar="NAME=FILE")
    ap.add_argument("--adapter-rules", help="prometheus-adapter rules (a ConfigMap with config.yaml, or the rules YAML)")
    ap.add_argument("--nexus", metavar="BIN", help="also run `BIN config check` for every Nexus container")
    ap.add_argument("--grafana-datasources", metavar="FILE",
                    help="Grafana's datasource provisioning file; every rendering's datasources must be its own")
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()

    datasources = None
    if args.grafana_datasources:
        with open(args.grafana_datasources) as f:
            doc = yaml.safe_load(f) or {}
        datasources = (args.grafana_datasources, {d.get("uid"): d for d in doc.get("datasources") or []})

    adapter_rules = None
    if args.adapter_rules:
        with open(args.adapter_rules) as f:
            doc = yaml.safe_load(f)
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            doc = yaml.safe_load(doc["data"]["config.yaml"])
        adapter_rules = (doc or {}).get("rules") or []

    renderings = {}
    for spec in args.renderings:
        name, _, path = spec.partition("=")
        renderings[name] = load(path or name)

    if args.self_test:
        return self_test(renderings, adapter_rules, datasources)

    problems = 0
    for name, docs in renderings.items():
        r = check(name, docs, adapter_rules, datasources)
        for obj, rule, msg in r.failures:
            print(f"{name}: {obj}: {rule}: {msg}")
        problems += len(r.failures)
        if not r.failures:
            n = len(r.nexus())
            print(f"{name}: {len(RULES)} rules hold ({len(r.workloads)} workloads, {n} Nexus containers)")
        if args.nexus:
            for p in config_check(r, args.nexus):
                print(p)
                problems += 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Strict schema validation of rendered Kubernetes manifests.

    k8s_schemas.py --kubernetes-version 1.33 [--kubernetes-version 1.37] FILE...

Every document of every FILE is validated with kubernetes-validate in strict mode (an unknown
field is an error) against each Kubernetes version given. Kinds it has no schema for (custom
resources) are validated against a schema of deploy/checks/schemas/ when there is one
(ServiceMonitor), and otherwise fail: a kind nobody checks is not let through silently.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jsonschema
import kubernetes_validate.utils as kv
import yaml

SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
# Custom resources: (apiVersion, kind) -> schema file in SCHEMAS.
OWN = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json"}

# kubernetes-validate reads its schema files for every document; read each once.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)


def name(d: dict) -> str:
    return f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("-k", "--kubernetes-version", action="append", required=True)
    args = ap.parse_args()
    errors = 0
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        counts = {"kubernetes": 0, "own": 0}
        for d in docs:
            key = (d.get("apiVersion"), d.get("kind"))
            if key in OWN:
                with open(os.path.join(SCHEMAS, OWN[key])) as f:
                    schema = json.load(f)
                try:
                    jsonschema.Draft202012Validator(schema).validate(d)
                    counts["own"] += 1
                except jsonschema.ValidationError as e:
                    where = ".".join(str(p) for p in e.absolute_path)
                    print(f"ERROR {path}: {name(d)}: {where}: {e.message} (schema {OWN[key]})")
                    errors += 1
                continue
            for version in args.kubernetes_version:
                try:
                    kv.validate(d, version, strict=True)
                    counts["kubernetes"] += 1
                except kv.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    print(f"ERROR {path}: {name(d)}: Kubernetes {e.version}: {where}: {e.message}")
                    errors += 1
                except kv.SchemaNotFoundError as e:
                    print(f"ERROR {path}: {name(d)}: {e.message}, and deploy/checks/schemas has none")
                    errors += 1
        print(f"  {path}: {len(docs)} documents; {counts['kubernetes']} validations against "
              f"Kubernetes {', '.join(args.kubernetes_version)} (strict), {counts['own']} against "
              f"deploy/checks/schemas (custom resources kubernetes-validate does not know)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

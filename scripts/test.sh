#!/usr/bin/env bash
# Run every test of the workspace: unit, property and integration tests against a real
# PostgreSQL, the embedded broker and Mosquitto, all started by the test harness on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

# Independent protocol peers and the API tester from PyPI, in a virtualenv under target/
# (tests find it there).
venv=target/test-venv
if ! "$venv/bin/python" -c "import pymodbus, snap7, asyncua, pysparkplug, schemathesis, playwright" >/dev/null 2>&1; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check pymodbus==3.16.1 python-snap7==3.3.0 asyncua==1.1.8 pysparkplug==0.6.1 \
    schemathesis==4.32.5 playwright==1.65.2
fi

# The browser tests run in Debian's chromium (scripts/deps.sh installs it), never skipped here.
export NEXUS_REQUIRE_BROWSER=1

# The Kubernetes manifests and the compose stack: rendered, validated, invariants (docs/deploy.md).
# The deploy checks also run `nexus config check` with each container's configuration and
# environment, so the binary is built first (the tests use the same build).
cargo build --workspace --all-features --bins --quiet
NEXUS_BIN="${CARGO_TARGET_DIR:-target}/debug/nexus" scripts/check-deploy.sh

if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests; run them first so nextest's summary closes the output.
  cargo test --workspace --all-features --doc --quiet
  # nextest runs tests in parallel processes; each test starts its own servers.
  cargo nextest run --workspace --all-features --no-fail-fast "$@"
else
  cargo test --workspace --all-features --no-fail-fast "$@"
fi

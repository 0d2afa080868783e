#!/usr/bin/env bash
# Run every test of the workspace: unit, property and integration tests against a real
# PostgreSQL, the embedded broker and Mosquitto, all started by the test harness on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests; run them first so nextest's summary closes the output.
  cargo test --workspace --all-features --doc --quiet
  # nextest runs tests in parallel processes; each test starts its own servers.
  cargo nextest run --workspace --all-features --no-fail-fast "$@"
else
  cargo test --workspace --all-features --no-fail-fast "$@"
fi

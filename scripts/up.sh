#!/usr/bin/env bash
# Build Nexus and run the whole platform with the demo setup: embedded broker on 1883,
# services on 4000-7000, a demo operator login. Extra arguments go to `nexus up`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo build --release -p nexus-orchestrator --bin nexus
exec target/release/nexus up --demo "$@"

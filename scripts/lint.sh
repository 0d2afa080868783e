#!/usr/bin/env bash
# Dependency hygiene: no unused dependency (cargo-machete), and only allowed licenses, no
# banned crates and only crates.io as a source (cargo-deny, deny.toml). Installs both tools
# from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

install() {
  local tool=$1 crate=$2 version=$3
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "installing $crate $version" >&2
    cargo install --quiet --locked "$crate" --version "$version"
  fi
}
install cargo-machete cargo-machete 0.9.2
install cargo-deny cargo-deny 0.20.2

cargo machete
cargo deny --log-level error check licenses bans sources

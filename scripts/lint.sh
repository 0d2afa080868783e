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

# The workspace members only: the patched crates under vendor/ are as published, not ours.
members=$(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json, os, sys; print("\n".join(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"]))')
# shellcheck disable=SC2086
cargo machete $members
cargo deny --log-level error check licenses bans sources

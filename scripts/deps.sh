#!/usr/bin/env bash
# Install the system packages Nexus's run and test commands need, when they are missing:
# PostgreSQL (server binaries for the test harness and the historian), Mosquitto (external
# broker in tests), mosquitto-clients (mosquitto_sub/pub) and chromium (the control center's
# browser test). Debian/Ubuntu, apt-get.
set -euo pipefail

need=()
have_pg() {
  command -v initdb >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
have_pg || need+=(postgresql)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
# The control center's browser test drives Debian's Chromium (never a downloaded browser).
[ -x /usr/bin/chromium ] || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "Installing missing system packages: ${need[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian packages start system-wide services; Nexus's harness runs its own instances on
# free ports, so the packaged ones are not needed.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $sudo systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

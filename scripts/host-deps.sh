#!/usr/bin/env bash
# Debian packages the controller needs for tests and bench/: carbon-c-relay
# (its -t mode is the placement oracle), and the daemons whose config tests and
# baselines run on the controller; python3-venv for .venv, iproute2 for the
# lab's route check; chromium and chromium-driver for molecule query's browser
# test of graphite-web's UI. Installs only what is missing.
set -euo pipefail
want="carbon-c-relay keepalived debootstrap rsync python3-venv iproute2 chromium chromium-driver"
missing=""
for pkg in $want; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
# node and npm run statsd's proxy.js in bench/statsd_relay.py. Checked as
# commands: a nodejs from elsewhere (NodeSource) bundles npm and conflicts
# with Debian's npm package.
command -v node >/dev/null || missing="$missing nodejs"
command -v npm >/dev/null || missing="$missing npm"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages:$missing; install them with: sudo apt-get install$missing" >&2
  exit 1
fi
echo "host packages: installing$missing"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null

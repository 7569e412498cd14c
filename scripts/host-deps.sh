#!/usr/bin/env bash
# Debian packages the controller needs for tests and bench/: carbon-c-relay
# (its -t mode is the placement oracle), and the daemons whose config tests and
# baselines run on the controller; python3-venv for .venv, iproute2 for the
# lab's route check; chromium and chromium-driver for molecule query's browser
# test of graphite-web's UI; openssh-server and tcpdump for tests/test_fabfile.py
# and tests/test_ops.py (the fab tasks over a throwaway sshd the test starts with
# its own config, key and port; captures of the relays' traffic). Installs only
# what is missing.
set -euo pipefail
want="carbon-c-relay keepalived debootstrap rsync python3-venv iproute2 chromium chromium-driver"
want="$want openssh-server tcpdump"
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
# The tests need sshd's binary, not a system sshd on port 22: while openssh-server
# installs, a policy-rc.d refuses its start, and the unit is disabled after.
policy=/usr/sbin/policy-rc.d
if [[ " $missing " == *" openssh-server "* && ! -e $policy ]]; then
  trap 'rm -f "$policy"' EXIT
  printf '#!/bin/sh\n# host-deps.sh: no service starts while it installs\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
  rm -f "$policy"
  if command -v systemctl >/dev/null; then systemctl disable --quiet ssh.service 2>/dev/null || true; fi
  missing="${missing/ openssh-server/}"
fi
[ -z "$missing" ] && exit 0
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null

#!/usr/bin/env bash
# Make sure a Docker engine answers: use one that runs, otherwise install
# Debian's docker.io and start dockerd. Says what to do when neither works.
set -euo pipefail
if docker info >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "No Docker engine answers and starting one needs root." >&2
  echo "Start Docker (sudo systemctl start docker) or add yourself to the docker group, then rerun." >&2
  exit 1
fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "docker engine: installing Debian's docker.io"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  } || {
    echo "Could not install docker.io with apt-get: no Docker possible on this machine." >&2
    echo "Install a Docker engine by other means and rerun." >&2
    exit 1
  }
fi
if systemctl is-system-running >/dev/null 2>&1; then
  systemctl start docker || true
fi
if ! docker info >/dev/null 2>&1; then
  echo "docker engine: starting dockerd (log in /var/log/carbonscale-dockerd.log)"
  nohup dockerd >/var/log/carbonscale-dockerd.log 2>&1 &
fi
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "dockerd did not come up; last lines of /var/log/carbonscale-dockerd.log:" >&2
tail -15 /var/log/carbonscale-dockerd.log >&2
exit 1

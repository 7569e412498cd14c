#!/usr/bin/env bash
# The lab: the hosts of inventories/lab as systemd containers, deployed by
# site.yml over the docker connection.
#
#   scripts/lab.sh preflight  can this machine run the lab? (Docker, disk space)
#   scripts/lab.sh up         preflight, start the containers, site.yml, report (make lab)
#   scripts/lab.sh status     the topology, where to send metrics
#   scripts/lab.sh check      only the inventory and conflict checks of `up`
#   scripts/lab.sh destroy    remove the lab's containers and network (make lab-destroy)
#   scripts/lab.sh expand     add the spare storage host under traffic (make lab-expand)
#   scripts/lab.sh shrink     remove it again under traffic (make lab-shrink)
#
# `make lab` runs preflight first, then installs host packages, creates .venv
# and builds the base image, then `up`. The work past preflight is in
# scripts/lab.py (it needs the venv). Environment:
#   CARBONSCALE_LAB_INVENTORY   inventory of the lab (default inventories/lab)
#   CARBONSCALE_LAB_NETWORK     its docker network (default carbonscale-lab)
#   CARBONSCALE_MIN_FREE_MB_DOCKER, CARBONSCALE_MIN_FREE_MB_CHECKOUT
#                               free space required (defaults below)
set -euo pipefail
cd "$(dirname "$0")/.."

# Measured: the base image (0.2 GiB) plus eight converged lab hosts take about
# 2 GiB under Docker's data root; .venv and wheels about 0.8 GiB. Twice that
# leaves room for apt caches, whisper files and logs.
MIN_FREE_MB_DOCKER="${CARBONSCALE_MIN_FREE_MB_DOCKER:-4096}"
MIN_FREE_MB_CHECKOUT="${CARBONSCALE_MIN_FREE_MB_CHECKOUT:-2048}"

die() {
  echo "lab: $*" >&2
  exit 1
}

# Free MiB on the filesystem holding $1 (or its nearest existing parent).
free_mb() {
  local path="$1"
  while [ ! -e "$path" ]; do path=$(dirname "$path"); done
  df -Pk "$path" | awk 'NR == 2 { print int($4 / 1024) }'
}

need_space() {
  local path="$1" need="$2" what="$3" free
  free=$(free_mb "$path")
  if [ "$free" -lt "$need" ]; then
    die "not enough disk space for $what: $path has $free MiB free, the lab needs $need MiB.
Free some space there (docker system prune removes unused images and stopped containers;
make lab-destroy removes an old lab), or set ${4}=<MiB> if you know better, and rerun."
  fi
}

preflight() {
  local docker_root=/var/lib/docker
  if docker info >/dev/null 2>&1; then
    docker_root=$(docker info -f '{{.DockerRootDir}}')
  elif [ "$(id -u)" != 0 ]; then
    die "no Docker engine answers, and starting one needs root.
Start Docker (sudo systemctl start docker) or, if it runs, add yourself to the docker group
(sudo usermod -aG docker \$USER, then log in again), and rerun."
  elif ! command -v dockerd >/dev/null 2>&1 && ! command -v apt-get >/dev/null 2>&1; then
    die "no Docker possible here: no Docker engine answers, dockerd is not installed and there
is no apt-get to install Debian's docker.io. Install a Docker engine (https://docs.docker.com/engine/install/)
and rerun."
  fi
  need_space "$docker_root" "$MIN_FREE_MB_DOCKER" "Docker's data root (the base image and the lab's hosts)" \
    CARBONSCALE_MIN_FREE_MB_DOCKER
  need_space "$PWD" "$MIN_FREE_MB_CHECKOUT" "the checkout (.venv and wheels)" CARBONSCALE_MIN_FREE_MB_CHECKOUT
}

venv_python() {
  [ -x .venv/bin/python ] || die "no .venv here: run \`make lab\` (it creates .venv, then runs this)."
  echo .venv/bin/python
}

case "${1:-}" in
  preflight)
    preflight
    echo "lab: preflight passed (Docker possible, disk space enough)"
    ;;
  up)
    preflight
    exec "$(venv_python)" scripts/lab.py up
    ;;
  status | destroy | check | expand | shrink)
    exec "$(venv_python)" scripts/lab.py "$1"
    ;;
  *)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac

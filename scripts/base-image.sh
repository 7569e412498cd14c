#!/usr/bin/env bash
# Build (or reuse) the systemd Debian 12 image every lab host and molecule
# platform runs. A registry is tried first; where none answers (as on our CI
# machines) the image is made with debootstrap and `docker import`.
set -euo pipefail

IMAGE="${CARBONSCALE_BASE_IMAGE:-carbonscale/debian12-systemd:latest}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# What ansible needs on a node, plus systemd as PID 1. Service packages are
# installed by the roles, never baked in, so molecule exercises the real install.
PACKAGES="systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,sudo,iproute2,procps,ca-certificates,curl,gnupg,netcat-openbsd"

# The recipe's hash is stamped on the image: an image built by an older
# version of this script is rebuilt, not silently reused.
RECIPE=$(sha256sum "$0" | cut -c1-16)
if [ "$(docker image inspect -f '{{ index .Config.Labels "carbonscale.recipe" }}' "$IMAGE" 2>/dev/null)" = "$RECIPE" ]; then
  echo "base image $IMAGE: present, reused"
  exit 0
fi

if timeout 60 docker pull debian:12 >/dev/null 2>&1; then
  echo "base image: building $IMAGE from the registry's debian:12"
  docker build -q -t "$IMAGE" - <<DOCKERFILE
FROM debian:12
LABEL carbonscale.recipe=$RECIPE
RUN apt-get update && apt-get install -y --no-install-recommends $(echo "$PACKAGES" | tr , ' ') && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN systemctl mask getty@tty1.service serial-getty@.service systemd-udevd.service systemd-logind.service
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
DOCKERFILE
  exit 0
fi

command -v debootstrap >/dev/null || {
  echo "base image: no registry answers and debootstrap is missing; installing it" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

root=$(mktemp -d /var/tmp/carbonscale-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image: no registry answers; debootstrap bookworm from $MIRROR (a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || {
  echo "base image: debootstrap failed, last lines of $root.log:" >&2
  tail -20 "$root.log" >&2
  exit 1
}
rm -f "$root.log"
chroot "$root" systemctl mask getty@tty1.service serial-getty@.service \
  systemd-udevd.service systemd-logind.service console-getty.service >/dev/null 2>&1 || true
# Containers have no hardware clock, no udev and no kernel modules to load.
chroot "$root" systemctl mask systemd-modules-load.service sys-kernel-config.mount \
  sys-kernel-debug.mount systemd-remount-fs.service >/dev/null 2>&1 || true
# Trust what the controller trusts: where egress goes through a TLS proxy
# (CI here does), its CA is in /usr/local/share/ca-certificates, and pip, npm
# and curl inside the hosts need it to reach PyPI and npm.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
echo "deb $MIRROR bookworm main" > "$root/etc/apt/sources.list"
echo "deb $MIRROR bookworm-updates main" >> "$root/etc/apt/sources.list"
echo "deb http://deb.debian.org/debian-security bookworm-security main" >> "$root/etc/apt/sources.list"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
# An empty but freshly touched lists dir looks like a valid cache to
# ansible's apt cache_valid_time; date it so the first run really updates.
touch -d 2000-01-01 "$root/var/lib/apt/lists"
: > "$root/etc/machine-id"
tar -C "$root" -c . | docker import - "$IMAGE-rootfs" >/dev/null
# docker import cannot set STOPSIGNAL; a one-line build on top of the import
# can. SIGRTMIN+3 asks systemd for a real halt (SIGTERM would make it re-exec),
# so `docker stop` runs every unit's stop path, which the safe-halt hook needs.
docker build -q -t "$IMAGE" - >/dev/null 2>&1 <<DOCKERFILE
FROM $IMAGE-rootfs
LABEL carbonscale.recipe=$RECIPE
ENV container=docker
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
DOCKERFILE
docker rmi "$IMAGE-rootfs" >/dev/null
echo "base image $IMAGE: built"

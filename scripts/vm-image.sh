#!/usr/bin/env bash
# Build (or reuse) the virtual machine image the kernel tests boot
# (tests/test_vm_*.py): the lab's Debian 12 base (scripts/base-image.sh's
# package list, debootstrap bookworm) plus Debian's own kernel, udev, sshd and
# the packages of the roles the tests apply. The containers share a kernel
# without IPVS and device-mapper; this VM has both.
#
# Everything is installed here, in a chroot, never inside the guest: under
# TCG (software emulation) an apt-get in the guest takes many minutes. The
# roles' own apt tasks then find their packages present.
#
# Output, in $VM_CACHE (default .cache/vm): rootfs-<recipe>.raw (ext4, the
# guest's /dev/vda; boots use a qcow2 overlay on it and never change it),
# vmlinuz-<recipe>, initrd-<recipe>, and id_ed25519 (root's SSH key).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
VM_CACHE="${VM_CACHE:-$here/../.cache/vm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The lab's base packages, read from the base image's recipe (one list).
BASE_PACKAGES=$(sed -n 's/^PACKAGES="\(.*\)"$/\1/p' "$here/base-image.sh")
[ -n "$BASE_PACKAGES" ] || { echo "vm image: no PACKAGES= line in base-image.sh" >&2; exit 1; }
# A real machine's boot (kernel, udev, sshd, DHCP) and what the roles install:
# keepalived/ipvsadm (lvs_director), lvm2 and thin-provisioning-tools
# (ssd_cache's lvmcache: cache_check at activation), graphite-carbon and
# python3-whisper (carbon_storage), nftables (the storage firewall),
# python3-packaging (carbonscale's venv), carbon-c-relay (the relays behind
# the director).
VM_PACKAGES="linux-image-amd64 udev kmod openssh-server \
keepalived ipvsadm lvm2 thin-provisioning-tools graphite-carbon python3-whisper nftables \
python3-packaging carbon-c-relay e2fsprogs xfsprogs util-linux"

# The image is rebuilt when this recipe or the base list changes.
RECIPE=$( (cat "$0"; echo "$BASE_PACKAGES"; grep '^dependencies = ' "$here/../pyproject.toml") |
  sha256sum | cut -c1-16)
image="$VM_CACHE/rootfs-$RECIPE.raw"
if [ -f "$image" ] && [ -f "$VM_CACHE/vmlinuz-$RECIPE" ] && [ -f "$VM_CACHE/initrd-$RECIPE" ]; then
  echo "$RECIPE"
  exit 0
fi
mkdir -p "$VM_CACHE"
[ -f "$VM_CACHE/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C carbonscale-vm -f "$VM_CACHE/id_ed25519"

command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
command -v mkfs.ext4 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq e2fsprogs >/dev/null

root=$(mktemp -d /var/tmp/carbonscale-vm-rootfs.XXXXXX)
log="$VM_CACHE/build.log"
cleanup() {
  for m in dev/pts dev proc sys; do umount "$root/$m" 2>/dev/null || true; done
  rm -rf "$root"
}
trap cleanup EXIT
echo "vm image: debootstrap bookworm from $MIRROR, then the kernel and the roles' packages (a few minutes; log $log)" >&2
debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$MIRROR" >"$log" 2>&1 || {
  echo "vm image: debootstrap failed, last lines of $log:" >&2
  tail -20 "$log" >&2
  exit 1
}
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
# Services must not start inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
echo "deb $MIRROR bookworm main" > "$root/etc/apt/sources.list"
echo "deb $MIRROR bookworm-updates main" >> "$root/etc/apt/sources.list"
echo "deb http://deb.debian.org/debian-security bookworm-security main" >> "$root/etc/apt/sources.list"
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >>"$log" 2>&1
fi
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
{
  chroot "$root" apt-get update
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y --no-install-recommends $VM_PACKAGES
} >>"$log" 2>&1 || {
  echo "vm image: installing the packages failed, last lines of $log:" >&2
  tail -20 "$log" >&2
  exit 1
}
rm -f "$root/usr/sbin/policy-rc.d"
# The carbonscale role creates /opt/carbonscale/venv and pip-installs the
# package's wheel; its dependencies (pyproject.toml) are put there now, so
# the role's pip finds them satisfied instead of fetching numpy under TCG.
deps=$(sed -n 's/^dependencies = \[\(.*\)\]$/\1/p' "$here/../pyproject.toml" | tr -d '",')
{
  chroot "$root" python3 -m venv /opt/carbonscale/venv
  # shellcheck disable=SC2086
  chroot "$root" /opt/carbonscale/venv/bin/pip install -q $deps
} >>"$log" 2>&1 || {
  echo "vm image: the carbonscale venv's dependencies failed, last lines of $log:" >&2
  tail -20 "$log" >&2
  exit 1
}

# The guest: root on the virtio disk, DHCP from qemu's user network, the
# serial console, root's SSH key, no waits for things a test VM lacks.
echo "/dev/vda / ext4 defaults,noatime 0 1" > "$root/etc/fstab"
echo carbonscale-vm > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 carbonscale-vm\n' > "$root/etc/hosts"
printf '[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n' > "$root/etc/systemd/network/10-user.network"
echo "nameserver 10.0.2.3" > "$root/etc/resolv.conf"
chroot "$root" systemctl enable systemd-networkd.service >>"$log" 2>&1
chroot "$root" systemctl mask systemd-networkd-wait-online.service >>"$log" 2>&1
mkdir -p "$root/root/.ssh"
cp "$VM_CACHE/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
chmod 700 "$root/root/.ssh"
chmod 600 "$root/root/.ssh/authorized_keys"
# Keep the journal across boots: the halt test reads the previous boot's.
mkdir -p "$root/var/log/journal" "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=persistent\n' > "$root/etc/systemd/journald.conf.d/carbonscale.conf"
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
  e2scrub_reap.service fstrim.timer >>"$log" 2>&1 || true
# The roles start their own services; keepalived and the package's single
# carbon-cache stay down until a role configures them.
chroot "$root" systemctl disable keepalived.service carbon-cache.service >>"$log" 2>&1 || true
# ansible's apt cache_valid_time sees lists fetched at build time; a run days
# later updates them in the guest (slow but correct) rather than trusting them.
rm -rf "$root"/var/cache/apt/archives/*.deb
: > "$root/etc/machine-id"

kernel=$(find "$root/boot" -name 'vmlinuz-*' | sort | tail -1)
initrd=$(find "$root/boot" -name 'initrd.img-*' | sort | tail -1)
[ -n "$kernel" ] && [ -n "$initrd" ] || { echo "vm image: no kernel or initrd in /boot" >&2; exit 1; }
cp "$kernel" "$VM_CACHE/vmlinuz-$RECIPE.tmp"
cp "$initrd" "$VM_CACHE/initrd-$RECIPE.tmp"
for m in dev/pts dev proc sys; do umount "$root/$m"; done
rm -f "$image.tmp"
truncate -s 4G "$image.tmp"
mkfs.ext4 -q -F -L carbonscale-vm -d "$root" "$image.tmp"
mv "$VM_CACHE/vmlinuz-$RECIPE.tmp" "$VM_CACHE/vmlinuz-$RECIPE"
mv "$VM_CACHE/initrd-$RECIPE.tmp" "$VM_CACHE/initrd-$RECIPE"
mv "$image.tmp" "$image"
# Images of older recipes are not reused.
find "$VM_CACHE" -maxdepth 1 \( -name 'rootfs-*.raw' -o -name 'vmlinuz-*' -o -name 'initrd-*' \) \
  ! -name "*-$RECIPE*" -delete
echo "vm image: built $image" >&2
echo "$RECIPE"

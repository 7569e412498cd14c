#!/usr/bin/env bash
# Boot the kernel-test VM (image from scripts/vm-image.sh) in the foreground:
# serial console to a file, sshd reachable on 127.0.0.1:PORT (qemu's user
# network), the root disk a qcow2 overlay (the cached image is never
# written), extra disks as /dev/vdb, /dev/vdc, ... in the order given.
#
#   scripts/vm-boot.sh -r RECIPE -o OVERLAY.qcow2 -p SSH_PORT -l SERIAL_LOG \
#       [-a kvm|tcg] [-m MEM_MB] [-x DISK.raw]...
#
# The overlay is created when missing, reused when present (a second boot
# sees what the first wrote). qemu exits when the guest powers off or reboots.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
VM_CACHE="${VM_CACHE:-$here/../.cache/vm}"
accel=tcg mem=1024 recipe="" overlay="" port="" serial="" extra=()
while getopts "r:o:p:l:a:m:x:" opt; do
  case $opt in
    r) recipe=$OPTARG ;;
    o) overlay=$OPTARG ;;
    p) port=$OPTARG ;;
    l) serial=$OPTARG ;;
    a) accel=$OPTARG ;;
    m) mem=$OPTARG ;;
    x) extra+=("$OPTARG") ;;
    *) echo "usage: $0 -r RECIPE -o OVERLAY -p PORT -l LOG [-a kvm|tcg] [-m MB] [-x DISK]..." >&2; exit 2 ;;
  esac
done
for need in recipe overlay port serial; do
  [ -n "${!need}" ] || { echo "vm-boot: -${need:0:1} is required" >&2; exit 2; }
done
base="$VM_CACHE/rootfs-$recipe.raw"
[ -f "$base" ] || { echo "vm-boot: no image $base (run scripts/vm-image.sh)" >&2; exit 2; }
[ -f "$overlay" ] || qemu-img create -q -f qcow2 -b "$(realpath "$base")" -F raw "$overlay"

drives=(-drive "file=$overlay,if=virtio,format=qcow2,cache=unsafe")
for disk in "${extra[@]}"; do
  # cache=writeback: the guest's flushes reach the file, so what a halt
  # wrote back is on "disk" when the next boot reads it.
  drives+=(-drive "file=$disk,if=virtio,format=raw,cache=writeback")
done
cpu=()
[ "$accel" = kvm ] && cpu=(-cpu host)
# Units of the image's packages a test VM does not need and TCG pays for at
# every boot: ipvsadm's LSB script (restores saved rules: there are none),
# logind (the lab's containers mask it too; it times out starting under
# TCG), the packaged carbon-c-relay (no test uses it; its port 2003 is the
# line service's). -nodefaults: no VGA, floppy or CD drive for the kernel to probe.
MASKED=""
for unit in ipvsadm.service systemd-logind.service carbon-c-relay.service man-db.timer \
  dpkg-db-backup.timer; do
  MASKED="$MASKED systemd.mask=$unit"
done
# Modules udev would load for the emulated PC's devices and nothing here uses
# (the guest's KVM, wireless, PC speaker, floppy and PS/2 probing, the IDE
# controller): each costs seconds of emulated probing at every boot.
# quiet: every kernel line on the emulated UART is slow; systemd's status
# lines still reach the serial log. mitigations=off: TCG emulates no
# speculation, the retpolines and buffer clears only cost time.
SKIP_MODULES=kvm_amd,kvm_intel,kvm,ccp,cfg80211,rfkill,pcspkr,floppy,psmouse,serio_raw,ata_piix,ata_generic,i2c_piix4
exec qemu-system-x86_64 -accel "$accel" "${cpu[@]}" -m "$mem" -smp 1 \
  -nodefaults -nographic -monitor none -serial "file:$serial" -no-reboot \
  -kernel "$VM_CACHE/vmlinuz-$recipe" -initrd "$VM_CACHE/initrd-$recipe" \
  -append "root=/dev/vda rw console=ttyS0 quiet mitigations=off modprobe.blacklist=$SKIP_MODULES net.ifnames=1 systemd.show_status=1$MASKED" \
  "${drives[@]}" \
  -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=net0

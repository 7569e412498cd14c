"""The one VM the kernel tests share, and what is set up in it before they run.

Every boot under TCG costs minutes, and so does each module Ansible runs
in the emulated python, so the tests share one guest (session fixtures),
each tier's playbook runs once in it, only when a test of that tier runs:

* the storage tier (playbooks/storage.yml: carbon_storage, carbonscale,
  ssd_cache with ssd_cache_backend lvmcache) on two more virtio disks, vdb
  the "disk" and vdc the "SSD", provisioned with LVM first (what a node's
  installer does, not a role): a volume group, the whisper LV on the disk, a
  cache pool on the SSD, a filesystem;
* the LVS director (playbooks/lvs.yml, `lvs_engine: ipvs`) over a bridge
  lvsbr0 (192.168.77.1/24) that joins three network namespaces: two DR real
  servers (rs1 .11, rs2 .12) and a client (.50). The real servers carry the
  VIP on lo with the lvs_realserver role's ARP settings (arp_ignore and
  arp_announce, read from the role's defaults: the role itself cannot target
  a network namespace, its VIP unit runs in the guest's own) and run
  tests/vm_realserver_sink.py, which records what arrives.

The two tiers use different ports (carbon 2103/2104/7102, the VIP's
services 2003/2004/8125), so they do not meet. test_vm_ssd_cache.py powers
the guest off and boots it again; it runs last (VM_TEST_ORDER, applied in
conftest.py), after the tests that need the first boot's network namespaces.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from vm_harness import REPO, VM, build_image, connection_vars, run_playbook

# Modules in the order they share the guest: the kernel's tests need only a
# boot, the director's the first boot's network namespaces, and the cache's
# powers the guest off.
VM_TEST_ORDER = {"test_vm_kernel": 1, "test_vm_ipvs": 2, "test_vm_ssd_cache": 3}

# --- the LVS director and its real servers -------------------------------
VIP = "192.168.77.100"
REAL = {"rs1": "192.168.77.11", "rs2": "192.168.77.12"}
CLIENT = "192.168.77.50"
_REALSERVER_DEFAULTS = yaml.safe_load((REPO / "roles/lvs_realserver/defaults/main.yml").read_text())
ARP_IGNORE = _REALSERVER_DEFAULTS["lvs_realserver_arp_ignore"]
ARP_ANNOUNCE = _REALSERVER_DEFAULTS["lvs_realserver_arp_announce"]

NETWORK = f"""
modprobe crc32c_generic
ip link add lvsbr0 type bridge
ip address add 192.168.77.1/24 dev lvsbr0
ip link set lvsbr0 up
for ns in rs1:11 rs2:12 client:50; do
  name=${{ns%%:*}} last=${{ns##*:}}
  ip netns add $name
  ip link add v-$name type veth peer name eth0 netns $name
  ip link set v-$name master lvsbr0 up
  ip -n $name address add 192.168.77.$last/24 dev eth0
  ip -n $name link set lo up
  ip -n $name link set eth0 up
done
for name in rs1 rs2; do
  ip netns exec $name sysctl -q -w net.ipv4.conf.all.arp_ignore={ARP_IGNORE} \\
    net.ipv4.conf.lo.arp_ignore={ARP_IGNORE} net.ipv4.conf.all.arp_announce={ARP_ANNOUNCE} \\
    net.ipv4.conf.lo.arp_announce={ARP_ANNOUNCE}
  ip -n $name address add {VIP}/32 dev lo
  ip netns exec $name setsid python3 /root/sink.py $name /run/sink-$name.log \\
    </dev/null >/run/sink-$name.out 2>&1 &
done
"""

# --- the storage node and its write-back cache ---------------------------
WHISPER = "/var/lib/graphite/whisper"
LINE_PORT = 2103
DISKS = {"disk": "512M", "ssd": "128M"}
# 512 MiB disk, 128 MiB SSD, a 64 MiB cache pool (1,024 chunks of 64 KiB).
PROVISION = """
pvcreate -q /dev/vdb /dev/vdc
vgcreate -q whisper /dev/vdb /dev/vdc
lvcreate -q -y -n data -L 448M whisper /dev/vdb
lvcreate -q -y --type cache-pool -n data_cache -L 64M whisper /dev/vdc
mkfs.xfs -q /dev/whisper/data
"""

# The image carries every package the roles install (scripts/vm-image.sh),
# so their apt tasks find them present. The stamp tells apt's
# cache_valid_time the lists are fresh (no apt-get update in the emulated
# guest, minutes), and the guest's apt forgets the archive's package lists:
# it then knows the ~900 installed packages instead of ~64,000, and opening
# its cache, which every apt task does, takes a tenth of the time (0.11 s of
# CPU instead of 1.2 s natively; tens of seconds under TCG). A package a role
# wants that the image lacks fails the task by name instead of installing.
# The carbonscale venv has the package's dependencies (image), so the role's
# pip needs no index.
PREPARE = """
mkdir -p /var/lib/apt/periodic
find /var/lib/apt/lists -maxdepth 1 -type f ! -name lock -delete
rm -f /var/cache/apt/pkgcache.bin /var/cache/apt/srcpkgcache.bin
touch /var/lib/apt/periodic/update-success-stamp
"""


def _connection(vm: VM) -> dict:
    return {**connection_vars(vm), "carbonscale_pip_extra_args": "--no-index"}


def storage_inventory(vm: VM) -> dict:
    """The guest as a storage node (qemu's user network gives it 10.0.2.15)."""
    storage = {
        **_connection(vm),
        "carbonscale_address": "10.0.2.15",
        "carbon_instances": [
            {"name": "a", "line_port": LINE_PORT, "pickle_port": 2104, "query_port": 7102}
        ],
        "carbon_storage_whisper_device": "/dev/whisper/data",
        "carbon_storage_whisper_fstype": "xfs",
        "ssd_cache_enabled": True,
        "ssd_cache_backend": "lvmcache",
        "ssd_cache_lvmcache_vg": "whisper",
        "ssd_cache_lvmcache_lv": "data",
        "ssd_cache_lvmcache_cachepool": "data_cache",
        "ssd_cache_halt_timeout": 300,
        "ssd_cache_poll_interval": 1,
    }
    return {"storage": {"hosts": {"vm-storage1": storage}}}


def director_inventory(vm: VM) -> dict:
    """The guest as the LVS director (its side of lvsbr0), the namespaces as relays."""
    director = {
        **_connection(vm),
        "carbonscale_address": "192.168.77.1",
        "lvs_vips": [VIP],
        "lvs_engine": "ipvs",
        "lvs_director_vrrp_interface": "lvsbr0",
        "lvs_director_real_server_hosts": list(REAL),
        # Damping fast enough for a test: a suppressed server is reused
        # after seconds, not minutes.
        "lvs_director_flap_half_life": 4,
        # The statsd check is `carbonscale health` in the emulated guest's
        # python: 9 s of CPU and up to 30 s on a busy host just to start
        # (measured), where the default misc_timeout (timeout + 2 = 3 s)
        # would kill every run and keep the real servers out for good.
        "lvs_director_check_timeout": 30,
        "lvs_director_check_interval": 5,
    }
    relays = {name: {"carbonscale_address": address} for name, address in REAL.items()}
    return {"lvs": {"hosts": {"vm-director1": director}}, "relays": {"hosts": relays}}


@pytest.fixture(scope="session")
def booted_vm(tmp_path_factory):
    """The guest, booted to sshd, nothing configured yet."""
    workdir = tmp_path_factory.mktemp("vm")
    with VM(workdir, build_image(), extra_disks=DISKS) as machine:
        seconds = machine.boot()
        print(
            f"\nVM booted to sshd in {seconds:.1f} s, {machine.boot_cpu:.1f} s of host CPU"
            f" ({machine.accel}); work files in {workdir}"
        )
        machine.ssh(PREPARE)
        yield machine


@pytest.fixture(scope="session")
def storage_vm(booted_vm):
    """The guest with LVM on its two extra disks and the storage tier applied."""
    vm = booted_vm
    vm.ssh("set -e\n" + PROVISION)
    cpu = vm.cpu_seconds()
    run_playbook(vm.workdir, storage_inventory(vm), ["playbooks/storage.yml"])
    print(f"the storage playbook cost {vm.cpu_seconds() - cpu:.0f} s of the guest's CPU")
    return vm


@pytest.fixture(scope="session")
def director_vm(booted_vm):
    """The guest with the real servers' namespaces and the LVS director applied."""
    vm = booted_vm
    vm.ssh(
        "cat > /root/sink.py",
        input=(Path(__file__).parent / "vm_realserver_sink.py").read_text(),
    )
    vm.ssh("set -e\n" + NETWORK)
    cpu = vm.cpu_seconds()
    run_playbook(vm.workdir, director_inventory(vm), ["playbooks/lvs.yml"])
    print(f"the director playbook cost {vm.cpu_seconds() - cpu:.0f} s of the guest's CPU")
    return vm

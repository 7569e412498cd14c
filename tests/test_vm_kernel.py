"""The VM boots Debian 12's own kernel, and the kernel has what the
containers' shared kernel lacks: IPVS (keepalived's virtual_server blocks)
and device-mapper's cache target (lvmcache under whisper)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vm


@pytest.fixture
def vm(booted_vm):
    return booted_vm


def test_the_guest_runs_debians_kernel_under_systemd(vm):
    assert vm.out("uname -r").strip().endswith("-amd64")
    assert vm.out("cat /etc/debian_version").startswith("12.")
    assert vm.out("ps -o comm= -p 1").strip() == "systemd"


def test_ipvs_loads_and_takes_a_virtual_service(vm):
    # crc32c first: libcrc32c (nf_conntrack -> ip_vs) asks the crypto API for it.
    vm.ssh("modprobe crc32c_generic && modprobe ip_vs")
    assert vm.out("cat /proc/net/ip_vs").startswith("IP Virtual Server version")
    vm.ssh("ipvsadm -A -u 10.9.9.9:8125 -s rr -o && ipvsadm -a -u 10.9.9.9:8125 -r 10.9.9.10 -g")
    table = vm.out("ipvsadm -Ln")
    print(table)
    assert "UDP  10.9.9.9:8125 rr ops" in table
    assert "10.9.9.10:8125" in table and "Route" in table
    # Only this service: the director's keepalived may hold others.
    vm.ssh("ipvsadm -D -u 10.9.9.9:8125")


def test_device_mapper_has_the_cache_target(vm):
    vm.ssh("modprobe dm_cache && modprobe dm_cache_smq")
    targets = vm.out("dmsetup targets").split()
    assert "cache" in targets

"""The LVS tier on containers, after side_effect stopped the VRRP master.

This kernel has no IPVS: the directors run the userspace data path (nginx
stream, kept by `carbonscale health pool`) and keepalived does VRRP only. The
IPVS configuration is only validated, by keepalived's config test. Metrics
are sent from this machine to the VIP over the scenario's docker network.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import struct
import time

import pytest
import testinfra

testinfra_hosts = ["lvs-director2"]

VIP = "172.31.5.100"
RELAYS = {"lvs-relay1": "172.31.5.21", "lvs-relay2": "172.31.5.22"}
CARBONSCALE = "/opt/carbonscale/venv/bin/carbonscale"
WHISPER = "/var/lib/graphite/whisper"
UPSTREAMS = "/etc/carbonscale/lvs/upstreams.conf"
POOL_STATE = "/var/lib/carbonscale/lvs/pool-flap.json"
IPVS_CONFIG = "/etc/carbonscale/lvs/keepalived-ipvs.conf"
HALF_LIFE, REUSE_LIMIT = 10.0, 10.0  # molecule.yml's lvs_director_flap_half_life, the seed's reuse


@pytest.fixture(scope="module")
def hosts(request):
    inventory = request.config.option.ansible_inventory
    names = ["lvs-director2", *RELAYS, "lvs-storage1"]
    return {
        name: testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory) for name in names
    }


@pytest.fixture(scope="module")
def failover():
    path = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "failover.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def wait_for(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def landed(storage, metric: str, timeout: float = 60) -> bool:
    path = f"{WHISPER}/{metric.replace('.', '/')}.wsp"
    return bool(wait_for(lambda: storage.file(path).exists, timeout, 0.5))


def send_line(name: str, value: float = 1) -> None:
    with socket.create_connection((VIP, 2003), timeout=5) as sock:
        sock.sendall(f"{name} {value} {int(time.time())}\n".encode())


def in_pool(director, address: str, port: int) -> bool:
    text = director.file(UPSTREAMS).content_string
    if f"server {address}:{port} weight=1;" in text:
        return True
    assert f"server {address}:{port} weight=1 down;" in text, text
    return False


def test_vrrp_elected_the_first_director_and_failed_over_within_3s(failover):
    assert failover["holders_before"] == ["lvs-director1"]
    assert failover["vip_moved_after"] is not None and failover["vip_moved_after"] < 3.0, failover
    assert failover["line_resumed_after"] is not None, failover
    assert failover["holders_after"] == ["lvs-director2"]


def test_traffic_before_and_after_the_failover_landed(hosts, failover):
    assert failover["sent_before_ok"]
    assert landed(hosts["lvs-storage1"], failover["sent_before"])
    assert landed(hosts["lvs-storage1"], failover["sent_after"])


def test_keepalived_runs_vrrp_only_and_the_ipvs_config_passes_the_config_test(hosts):
    director = hosts["lvs-director2"]
    assert director.service("keepalived").is_running
    running = director.file("/etc/keepalived/keepalived.conf").content_string
    assert "virtual_server" not in running and "vrrp_instance carbonscale" in running
    ipvs = director.file(IPVS_CONFIG).content_string
    assert ipvs.count("virtual_server ") == 3
    assert "protocol UDP\n    ops\n" in ipvs and "MISC_CHECK" in ipvs
    tested = director.run(f"{CARBONSCALE} lvs config-test {IPVS_CONFIG}")
    assert tested.rc == 0, tested.stderr
    # The kernel really lacks IPVS, and lvs_engine: ipvs says so.
    refused = director.run(f"{CARBONSCALE} lvs engine ipvs")
    assert refused.rc == 2
    assert "lvs_engine is ipvs but the kernel has no IPVS" in refused.stderr
    assert director.run(f"{CARBONSCALE} lvs engine auto").stdout.strip() == "nginx"


def test_the_misc_check_runs_as_the_script_user_with_its_flap_state(hosts):
    director = hosts["lvs-director2"]
    check = director.run(
        f"runuser -u keepalived_script -- {CARBONSCALE} health statsd 172.31.5.21 8126 "
        "--state /var/lib/carbonscale/lvs/flap.json"
    )
    assert check.rc == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "statsd 172.31.5.21:8126 up"
    state = director.file("/var/lib/carbonscale/lvs/flap.json")
    assert state.user == "keepalived_script"
    assert "statsd/172.31.5.21:8126" in json.loads(state.content_string)


def test_line_pickle_and_statsd_sent_to_the_vip_land_on_storage(hosts):
    stamp = time.time_ns()
    line = f"molecule.lvs.line.run{stamp}"
    for i in range(20):  # 20 connections: both relays take some
        send_line(f"{line}.m{i}")
    pickled = f"molecule.lvs.pickle.run{stamp}"
    payload = pickle.dumps([(pickled, (int(time.time()), 2.0))], protocol=2)
    with socket.create_connection((VIP, 2004), timeout=5) as sock:
        sock.sendall(struct.pack("!L", len(payload)) + payload)
    counter = f"molecule.lvs.statsd.run{stamp}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for _ in range(10):
            udp.sendto(f"{counter}:1|c".encode(), (VIP, 8125))
    storage = hosts["lvs-storage1"]
    assert all(landed(storage, f"{line}.m{i}") for i in range(20))
    assert landed(storage, pickled)
    assert landed(storage, f"stats.counters.{counter}.count")


def test_a_stopped_relay_leaves_the_pool_and_nothing_is_lost(hosts):
    director, relay2 = hosts["lvs-director2"], hosts["lvs-relay2"]
    assert in_pool(director, RELAYS["lvs-relay2"], 2003)
    relay2.run("systemctl stop carbon-c-relay")
    try:
        assert wait_for(lambda: not in_pool(director, RELAYS["lvs-relay2"], 2003), 10)
        assert in_pool(director, RELAYS["lvs-relay1"], 2003)
        stamp = time.time_ns()
        for i in range(20):
            send_line(f"molecule.lvs.onerelay.run{stamp}.m{i}")
        storage = hosts["lvs-storage1"]
        assert all(landed(storage, f"molecule.lvs.onerelay.run{stamp}.m{i}") for i in range(20))
    finally:
        relay2.run("systemctl start carbon-c-relay")
    # Two changes (penalty 20 at most) stay under the suppress limit: it is back.
    assert wait_for(lambda: in_pool(director, RELAYS["lvs-relay2"], 2003), 10)


def _line_state(director) -> dict:
    return json.loads(director.file(POOL_STATE).content_string)[f"tcp/{RELAYS['lvs-relay2']}:2003"]


def test_a_flapping_relay_stays_out_until_its_penalty_decays_below_reuse(hosts):
    director, relay2 = hosts["lvs-director2"], hosts["lvs-relay2"]
    address = RELAYS["lvs-relay2"]
    # Flap: every stop and start the pool sees is one event of penalty 10.
    for _ in range(3):
        relay2.run("systemctl stop carbon-c-relay")
        assert wait_for(lambda: _line_state(director)["up"] is False, 10)
        relay2.run("systemctl start carbon-c-relay")
        assert wait_for(lambda: _line_state(director)["up"] is True, 10)
        if _line_state(director)["suppressed"]:
            break
    state = _line_state(director)
    assert state["suppressed"] and state["penalty"] > 25, state
    # Up, yet out of the pool until P(t) = P * 2^(-(t - updated)/h) < 10.
    release = state["updated"] + HALF_LIFE * math.log2(state["penalty"] / REUSE_LIMIT)
    assert director.run(f"{CARBONSCALE} health tcp {address} 2003").rc == 0
    while time.time() < release - 1.0:
        assert not in_pool(director, address, 2003), f"back before {release}"
        time.sleep(0.5)
    assert wait_for(lambda: in_pool(director, address, 2003), 15)
    back = time.time()
    # The checker runs every second; nginx is reloaded right after.
    assert release - 1.0 <= back <= release + 5.0, (back, release)


def test_a_director_whose_nginx_stops_gives_up_the_vip(hosts):
    director = hosts["lvs-director2"]

    def holds_vip() -> bool:
        return f"inet {VIP}/32" in director.check_output("ip -4 address show dev eth0")

    assert holds_vip()
    director.run("systemctl stop nginx")
    try:
        # vrrp_script: a connect every second, two failures -> FAULT.
        assert wait_for(lambda: not holds_vip(), 10)
        assert "Entering FAULT STATE" in director.check_output(
            "journalctl -u keepalived --no-pager -n 20"
        )
    finally:
        director.run("systemctl start nginx")
    assert wait_for(holds_vip, 15)
    send_line(f"molecule.lvs.nginx_back.run{time.time_ns()}")


def test_relays_carry_the_vip_on_lo_across_a_reboot(hosts):
    relay1 = hosts["lvs-relay1"]
    conf = relay1.file("/etc/sysctl.d/60-carbonscale-lvs-realserver.conf").content_string
    for key, value in (("arp_ignore", 1), ("arp_announce", 2)):
        for dev in ("all", "lo"):
            assert f"net.ipv4.conf.{dev}.{key}={value}" in conf
            assert relay1.sysctl(f"net.ipv4.conf.{dev}.{key}") == value
    assert relay1.service("carbonscale-lvs-vip").is_enabled
    assert f"inet {VIP}/32" in relay1.check_output("ip -4 address show dev lo")
    os.system("docker restart lvs-relay1 >/dev/null")
    assert wait_for(
        lambda: (
            relay1.run("systemctl is-system-running --wait").stdout.strip()
            in ("running", "degraded")
        ),
        120,
        1,
    )
    assert f"inet {VIP}/32" in relay1.check_output("ip -4 address show dev lo")

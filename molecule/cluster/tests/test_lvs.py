"""The LVS tier on containers: the `lvs` directors in front of the `relays`.

This kernel has no IPVS: the directors run the userspace data path (nginx
stream, kept by `carbonscale health pool`) and keepalived does VRRP only. The
IPVS configuration is only validated, by keepalived's config test. Metrics
are sent from this machine to the VIP over the scenario's docker network.
Directors, relays, the VIP and the flap damping come from the inventory.

The disruptive checks (a relay stopped, a relay flapping, a director's nginx
stopped, a relay rebooted, the VRRP master stopped) each put back what they
broke; the master's failover comes last and starts it again. The directors
never preempt (nopreempt): a director that comes back leaves the VIP where it
is, so the checks find the master by asking who holds the VIP.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import socket
import struct
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import vip_sender
from cluster_hosts import setting, wait_for
from whisper_points import wait_for_points

CARBONSCALE = "/opt/carbonscale/venv/bin/carbonscale"
WHISPER = "/var/lib/graphite/whisper"
UPSTREAMS = "/etc/carbonscale/lvs/upstreams.conf"
POOL_STATE = "/var/lib/carbonscale/lvs/pool-flap.json"
IPVS_CONFIG = "/etc/carbonscale/lvs/keepalived-ipvs.conf"
# The failover's persistent senders: metrics per 10 ms batch, and how far back
# the careful one writes again after a reset (more than a blackholed
# connection's retransmissions take to end in a reset).
FAILOVER_SENDER_METRICS = 5
FAILOVER_RESEND_SECONDS = 10
# The 60 s archive of the default schema, where each sent point has its slot.
WEEK = 7 * 86400

disruptive = pytest.mark.disruptive


@pytest.fixture(scope="module")
def tier(cluster):
    """The LVS tier as the inventory describes it."""
    directors = cluster.group("lvs")
    relays = {name: cluster.address(name) for name in cluster.group("relays")}
    assert len(directors) >= 2 and len(relays) >= 2, "a VRRP pair, two real servers"

    def flap(name: str) -> float:
        return float(setting(cluster, directors[0], "lvs_director", f"lvs_director_flap_{name}"))

    return SimpleNamespace(
        directors=directors,
        relays=relays,
        storage=cluster.group("storage"),
        vip=cluster.vars(directors[0])["lvs_vips"][0],
        half_life=flap("half_life"),
        reuse_limit=flap("reuse_limit"),
    )


def holds_vip(cluster, tier, director: str) -> bool:
    out = cluster.host(director).run("ip -4 -o address show dev eth0").stdout
    return f" {tier.vip}/32 " in out


def vrrp_state(director) -> str:
    """keepalived's last "Entering <STATE> STATE" in its journal (MASTER, BACKUP, FAULT)."""
    lines = director.run("journalctl -u keepalived --no-pager -n 200 -o cat").stdout
    states = re.findall(r"Entering (\w+) STATE", lines)
    return states[-1] if states else ""


@pytest.fixture
def master(cluster, tier):
    """The director holding the VIP now (the first one, while it runs)."""
    holders = [d for d in tier.directors if holds_vip(cluster, tier, d)]
    assert len(holders) == 1, holders
    return cluster.host(holders[0])


def landed(cluster, tier, metric: str, timeout: float = 60) -> bool:
    """Has a whisper file for metric appeared on a storage host?"""
    path = f"{WHISPER}/{metric.replace('.', '/')}.wsp"
    return bool(
        wait_for(lambda: any(cluster.host(s).file(path).exists for s in tier.storage), timeout, 0.5)
    )


def send_line(tier, name: str, value: float = 1, timeout: float = 5) -> None:
    with socket.create_connection((tier.vip, 2003), timeout=timeout) as sock:
        sock.sendall(f"{name} {value} {int(time.time())}\n".encode())


def in_pool(director, address: str, port: int) -> bool:
    text = director.file(UPSTREAMS).content_string
    if f"server {address}:{port} weight=1;" in text:
        return True
    assert f"server {address}:{port} weight=1 down;" in text, text
    return False


def test_keepalived_runs_vrrp_only_and_the_ipvs_config_passes_the_config_test(master):
    director = master
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


def test_the_misc_check_runs_as_the_script_user_with_its_flap_state(master, tier):
    director = master
    relay1 = next(iter(tier.relays.values()))
    check = director.run(
        f"runuser -u keepalived_script -- {CARBONSCALE} health statsd {relay1} 8126 "
        "--state /var/lib/carbonscale/lvs/flap.json"
    )
    assert check.rc == 0, check.stdout + check.stderr
    assert check.stdout.strip() == f"statsd {relay1}:8126 up"
    state = director.file("/var/lib/carbonscale/lvs/flap.json")
    assert state.user == "keepalived_script"
    assert f"statsd/{relay1}:8126" in json.loads(state.content_string)


def test_line_pickle_and_statsd_sent_to_the_vip_land_on_storage(cluster, tier):
    stamp = time.time_ns()
    line = f"molecule.lvs.line.run{stamp}"
    for i in range(20):  # 20 connections: both relays take some
        send_line(tier, f"{line}.m{i}")
    pickled = f"molecule.lvs.pickle.run{stamp}"
    payload = pickle.dumps([(pickled, (int(time.time()), 2.0))], protocol=2)
    with socket.create_connection((tier.vip, 2004), timeout=5) as sock:
        sock.sendall(struct.pack("!L", len(payload)) + payload)
    counter = f"molecule.lvs.statsd.run{stamp}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for _ in range(10):
            udp.sendto(f"{counter}:1|c".encode(), (tier.vip, 8125))
    assert all(landed(cluster, tier, f"{line}.m{i}") for i in range(20))
    assert landed(cluster, tier, pickled)
    assert landed(cluster, tier, f"stats.counters.{counter}.count")


@disruptive
def test_a_stopped_relay_leaves_the_pool_and_nothing_is_lost(cluster, tier, master):
    director = master
    (_, address1), (name2, address2) = list(tier.relays.items())[:2]
    relay2 = cluster.host(name2)
    assert in_pool(director, address2, 2003)
    relay2.run("systemctl stop carbon-c-relay")
    try:
        assert wait_for(lambda: not in_pool(director, address2, 2003), 10)
        assert in_pool(director, address1, 2003)
        stamp = time.time_ns()
        for i in range(20):
            send_line(tier, f"molecule.lvs.onerelay.run{stamp}.m{i}")
        assert all(
            landed(cluster, tier, f"molecule.lvs.onerelay.run{stamp}.m{i}") for i in range(20)
        )
    finally:
        relay2.run("systemctl start carbon-c-relay")
    # Two changes (penalty 20 at most) stay under the suppress limit: it is back.
    assert wait_for(lambda: in_pool(director, address2, 2003), 10)


@disruptive
def test_a_flapping_relay_stays_out_until_its_penalty_decays_below_reuse(cluster, tier, master):
    director = master
    name2, address = list(tier.relays.items())[1]
    relay2 = cluster.host(name2)

    def line_state() -> dict:
        return json.loads(director.file(POOL_STATE).content_string)[f"tcp/{address}:2003"]

    # Flap: every stop and start the pool sees is one event of penalty 10.
    for _ in range(3):
        relay2.run("systemctl stop carbon-c-relay")
        assert wait_for(lambda: line_state()["up"] is False, 10)
        relay2.run("systemctl start carbon-c-relay")
        assert wait_for(lambda: line_state()["up"] is True, 10)
        if line_state()["suppressed"]:
            break
    state = line_state()
    # Suppressed when the penalty passed the suppress limit (25) at an event;
    # the state may have been written again since, with the penalty decayed.
    assert state["suppressed"] and state["penalty"] > tier.reuse_limit, state
    # Up, yet out of the pool until P(t) = P * 2^(-(t - updated)/h) < reuse limit.
    release = state["updated"] + tier.half_life * math.log2(state["penalty"] / tier.reuse_limit)
    assert director.run(f"{CARBONSCALE} health tcp {address} 2003").rc == 0
    while time.time() < release - 1.0:
        assert not in_pool(director, address, 2003), f"back before {release}"
        time.sleep(0.5)
    assert wait_for(lambda: in_pool(director, address, 2003), 15)
    back = time.time()
    # The checker runs every second; nginx is reloaded right after.
    assert release - 1.0 <= back <= release + 5.0, (back, release)


@disruptive
def test_a_director_whose_nginx_stops_gives_up_the_vip_and_does_not_take_it_back(
    cluster, tier, master
):
    director = master
    peer = next(d for d in tier.directors if cluster.host(d) is not director)

    def holds() -> bool:
        return f"inet {tier.vip}/32" in director.check_output("ip -4 address show dev eth0")

    assert holds()
    director.run("systemctl stop nginx")
    try:
        # The pool daemon's path check (through nginx to a relay) fails and
        # writes `fail`; the track script reads it every 2 s, fall 3 -> FAULT.
        assert wait_for(lambda: not holds(), 30)
        assert vrrp_state(director) == "FAULT"
        assert wait_for(lambda: holds_vip(cluster, tier, peer), 10)
    finally:
        director.run("systemctl start nginx")
    # nopreempt: healthy again, the director waits as BACKUP and the VIPs stay
    # on the peer (a second move would reset every connection again).
    assert wait_for(lambda: vrrp_state(director) == "BACKUP", 30, 1)
    time.sleep(5)
    assert not holds() and holds_vip(cluster, tier, peer)
    send_line(tier, f"molecule.lvs.nginx_back.run{time.time_ns()}")


@disruptive
def test_relays_carry_the_vip_on_lo_across_a_reboot(cluster, tier):
    name1 = next(iter(tier.relays))
    relay1 = cluster.host(name1)
    conf = relay1.file("/etc/sysctl.d/60-carbonscale-lvs-realserver.conf").content_string
    for key, value in (("arp_ignore", 1), ("arp_announce", 2)):
        for dev in ("all", "lo"):
            assert f"net.ipv4.conf.{dev}.{key}={value}" in conf
            assert relay1.sysctl(f"net.ipv4.conf.{dev}.{key}") == value
    assert relay1.service("carbonscale-lvs-vip").is_enabled
    assert f"inet {tier.vip}/32" in relay1.check_output("ip -4 address show dev lo")
    subprocess.run(["docker", "restart", name1], check=True, capture_output=True)
    assert wait_for(
        lambda: (
            relay1.run("systemctl is-system-running --wait").stdout.strip()
            in ("running", "degraded")
        ),
        120,
        1,
    )
    assert f"inet {tier.vip}/32" in relay1.check_output("ip -4 address show dev lo")
    # Back in every director's pool before the next check.
    address1 = tier.relays[name1]
    for director in tier.directors:
        assert wait_for(lambda d=director: in_pool(cluster.host(d), address1, 2003), 30)


def send_until_accepted(tier, name: str, timeout: float = 0.5) -> bool:
    try:
        send_line(tier, name, timeout=timeout)
        return True
    except OSError:
        return False


def start_sender(tier, prefix: str, base: int, resend: float = 0) -> subprocess.Popen:
    """vip_sender.py writing to the VIP's line port from this machine until stopped."""
    command = [sys.executable, vip_sender.__file__, f"{tier.vip}:2003", prefix]
    command += [str(base), str(FAILOVER_SENDER_METRICS)]
    command += ["--resend", str(resend)] if resend else []
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_sender(process: subprocess.Popen) -> dict:
    process.terminate()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def failover(cluster, tier):
    """Stop the VRRP master (the whole host, as a halt would: systemd halts and
    keepalived leaves with a priority-0 advert) and time, from the moment the
    stop is issued, the VIP's arrival on the backup and the line port taking
    a metric again. Then start the old master again: with nopreempt it comes
    back as BACKUP and leaves the VIP where it is (one reset of the clients'
    connections, not two), and the cluster is whole for what runs next.

    Through the stop and the start two persistent senders write to the VIP
    (vip_sender.py): a plain one, and one that reconnects and writes its last
    FAILOVER_RESEND_SECONDS again after a failure."""
    holders = [d for d in tier.directors if holds_vip(cluster, tier, d)]
    assert len(holders) == 1, holders
    first = holders[0]
    backup = next(d for d in tier.directors if d != first)
    record: dict = {"holders_before": holders, "backup": backup}
    record["sent_before"] = f"molecule.lvs.failover.run{time.time_ns()}.before"
    record["sent_before_ok"] = send_until_accepted(tier, record["sent_before"], timeout=3)
    base = (int(time.time()) // 60 - 1) * 60
    stamp = time.time_ns()
    senders = {
        "plain": (f"carbonscale.failover.run{stamp}.plain", 0),
        "resending": (f"carbonscale.failover.run{stamp}.resending", FAILOVER_RESEND_SECONDS),
    }
    record["senders"] = {
        name: {"prefix": prefix, "base": base} for name, (prefix, _) in senders.items()
    }
    processes = {
        name: start_sender(tier, prefix, base, resend) for name, (prefix, resend) in senders.items()
    }
    try:
        time.sleep(2)  # both connected and writing; the pool's nginx passed `before` on

        record["stop_issued"] = time.time()
        started = time.monotonic()
        stop = subprocess.Popen(["docker", "stop", first], stdout=subprocess.DEVNULL)
        try:
            moved = None
            while time.monotonic() - started < 30:
                if holds_vip(cluster, tier, backup):
                    moved = time.monotonic() - started
                    break
                time.sleep(0.05)
            record["vip_moved_after"] = moved
            resumed = None
            record["sent_after"] = record["sent_before"].replace(".before", ".after")
            while moved is not None and time.monotonic() - started < 60:
                if send_until_accepted(tier, record["sent_after"]):
                    resumed = time.monotonic() - started
                    break
                time.sleep(0.1)
            record["line_resumed_after"] = resumed
            stop.wait(timeout=120)
            record["holders_after"] = [d for d in tier.directors if holds_vip(cluster, tier, d)]
        finally:
            stop.wait(timeout=120)
            record["start_issued"] = time.time()
            subprocess.run(["docker", "start", first], check=True, capture_output=True)
        returned = cluster.host(first)
        record["returned_as_backup"] = bool(
            wait_for(lambda: vrrp_state(returned) == "BACKUP", 120, 1)
        )
        time.sleep(5)  # a preempting director would have taken the VIP by now
        record["holders_after_return"] = [d for d in tier.directors if holds_vip(cluster, tier, d)]
    finally:
        for name, process in processes.items():
            record["senders"][name].update(stop_sender(process))
    print(json.dumps({k: v for k, v in record.items() if k != "senders"}))
    yield record


@disruptive
def test_vrrp_failed_over_within_3s_and_the_returning_master_left_the_vip(failover):
    assert failover["vip_moved_after"] is not None and failover["vip_moved_after"] < 3.0, failover
    assert failover["line_resumed_after"] is not None, failover
    assert failover["holders_after"] == [failover["backup"]]
    assert failover["returned_as_backup"], failover
    assert failover["holders_after_return"] == [failover["backup"]], failover


@disruptive
def test_traffic_before_and_after_the_failover_landed(cluster, tier, failover):
    assert failover["sent_before_ok"]
    assert landed(cluster, tier, failover["sent_before"])
    assert landed(cluster, tier, failover["sent_after"])


@disruptive
def test_the_failover_reset_senders_once_and_a_resending_sender_lost_nothing(
    cluster, tier, failover
):
    """Every point of both senders read back from whisper: the stop of the
    master is one reset episode, its start none (nopreempt); the resending
    sender lost nothing, the plain sender's losses are counted and printed."""
    stop, start = failover["stop_issued"], failover["start_issued"]
    outcome = {}
    # The resending sender first: it waits for all its points, by which time
    # carbon-cache has written the plain sender's too (sent at the same time).
    for name in ("resending", "plain"):
        sender = failover["senders"][name]
        sent = vip_sender.expected(sender["base"], sender["metrics"], range(sender["batches"]))
        unwritten = vip_sender.expected(sender["base"], sender["metrics"], sender["unwritten"])
        written = {key: value for key, value in sent.items() if key not in unwritten}
        patience = 120 if name == "resending" else 10
        found = wait_for_points(
            cluster, tier.storage, sender["prefix"], len(written), WEEK, patience
        )
        outcome[name] = SimpleNamespace(
            sent=sent,
            not_written=unwritten,
            missing=[key for key in written if key not in found],
            wrong=[key for key in written if key in found and found[key] != written[key]],
            resets=vip_sender.episodes(sender["errors"]),
            **sender,
        )
    print(f"\nVRRP master stopped (t=0) and started (t={start - stop:.1f} s), senders via the VIP:")
    for name, o in outcome.items():
        print(
            f"  {name}: {len(o.sent)} points ({o.batches} batches of {o.metrics}, one per 10 ms), "
            f"{len(o.not_written)} not written (connection down), {len(o.missing)} written and "
            f"lost, {len(o.wrong)} wrong; {len(o.errors)} connection errors in "
            f"{len(o.resets)} episode(s) at t="
            f"{[[round(a - stop, 2), round(b - stop, 2)] for a, b in o.resets]} s, "
            f"{o.connects} connections"
        )
    for name, o in outcome.items():
        assert not o.full, f"{name}: ran out of whisper slots, the failover took too long"
        assert not o.wrong, f"{name}: {len(o.wrong)} points with another value, e.g. {o.wrong[:3]}"
        assert len(o.resets) == 1, f"{name}: reset episodes {o.resets}, stop {stop}, start {start}"
        assert stop <= o.resets[0][0] and o.resets[0][1] < start, (name, o.resets, stop, start)
    resending = outcome["resending"]
    assert not resending.not_written and not resending.missing, resending.missing[:3]

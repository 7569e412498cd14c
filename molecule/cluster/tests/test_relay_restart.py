"""Planned restarts of carbon-c-relay, the way the carbon_relay role's handler
does them (directors told first, then `carbonscale relay restart` behind the
relay's front), while a sender writes through the VIP without pause: every
point is on disk afterwards, read back point by point from the whisper files,
and the line port never refused a connection.

Each relay is restarted twice within 20 s (a config push, then an upgrade).
"""

from __future__ import annotations

import json
import time

import pytest
from cluster_hosts import Cluster, setting, vip, wait_for
from whisper_points import wait_for_points

pytestmark = pytest.mark.disruptive

CARBONSCALE = "/opt/carbonscale/venv/bin/carbonscale"
SENDER = "/tmp/carbonscale-steady-sender.py"
SENDER_OUT = "/tmp/carbonscale-steady-sender.json"
METRICS = 20
# points/s the sender writes, and for how long: long enough for every restart.
RATE = 200
SECONDS = 45

# One persistent connection to the VIP writing numbered points; beside it a
# prober opening a connection to each line port every 0.1 s. Point n is
# PREFIX.m{n % METRICS} = n at BASE - (n // METRICS) * 60: one whisper slot each.
SENDER_SCRIPT = r"""
import json, socket, sys, threading, time
door, probes, prefix, base, metrics, rate, seconds = sys.argv[1:8]
metrics, rate, seconds, base = int(metrics), int(rate), float(seconds), int(base)
refused = {p: 0 for p in probes.split(",")}
done = False
def probe():
    while not done:
        for p in refused:
            host, port = p.rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), 2).close()
            except OSError:
                refused[p] += 1
        time.sleep(0.1)
prober = threading.Thread(target=probe)
prober.start()
host, port = door.rsplit(":", 1)
sock = socket.create_connection((host, int(port)), 5)
sent, error, start = 0, None, time.monotonic()
try:
    while time.monotonic() - start < seconds:
        batch = "".join(
            f"{prefix}.m{n % metrics} {n} {base - (n // metrics) * 60}\n"
            for n in range(sent, sent + rate // 10)
        )
        sock.sendall(batch.encode())
        sent += rate // 10
        time.sleep(0.1)
except OSError as exc:
    error = str(exc)
sock.close()
done = True
prober.join()
print(json.dumps({"sent": sent, "error": error, "refused": refused}))
"""


def planned(cluster: Cluster, relay: str) -> None:
    """The handler's first step: the directors learn the restart is planned."""
    for director in cluster.group("lvs"):
        state_dir = setting(cluster, relay, "carbon_relay", "carbon_relay_lvs_state_dir")
        seconds = setting(cluster, relay, "carbon_relay", "carbon_relay_planned_restart_seconds")
        cluster.host(director).check_output(
            f"{CARBONSCALE} health planned {cluster.address(relay)} --seconds {seconds} "
            f"--state-dir {state_dir}"
        )


def restart(cluster: Cluster, relay: str) -> str:
    """The handler's restart, as the role renders it."""
    port = setting(cluster, relay, "carbon_relay", "carbon_relay_port")
    hold_dir = setting(cluster, relay, "carbon_relay", "carbon_relay_front_hold_dir")
    done = cluster.host(relay).run(
        f"{CARBONSCALE} relay restart --unit carbon-c-relay --port {port} --hold-dir {hold_dir}"
    )
    assert done.rc == 0, done.stderr
    assert "behind the front" in done.stdout, done.stdout  # held, not a plain restart
    return done.stdout.strip()


def test_planned_relay_restarts_lose_no_point_and_never_close_the_line_port(cluster):
    relays = cluster.group("relays")
    storage = cluster.group("storage")
    address = vip(cluster)
    assert address, "this check sends through the directors' VIP"
    sender = cluster.host(storage[0])  # a relay carries the VIP on lo: send from storage
    stamp = sender.check_output("date +%s%N")
    prefix = f"carbonscale.restart.run{stamp}"
    base = (int(stamp[:10]) // 60 - 1) * 60
    probes = ",".join([f"{address}:2003", *(f"{cluster.address(r)}:2003" for r in relays)])

    sender.run(f"cat > {SENDER} <<'EOF'\n{SENDER_SCRIPT}\nEOF")
    started = sender.run(
        f"rm -f {SENDER_OUT}; setsid nohup python3 {SENDER} {address}:2003 {probes} {prefix} "
        f"{base} {METRICS} {RATE} {SECONDS} > {SENDER_OUT} 2>&1 < /dev/null &"
    )
    assert started.rc == 0, started.stderr
    time.sleep(3)
    restarts = []
    for relay in relays:
        first = time.monotonic()
        for _ in range(2):
            planned(cluster, relay)
            restarts.append(f"{relay}: {restart(cluster, relay)}")
        assert time.monotonic() - first < 20, f"{relay}'s two restarts took over 20 s"
    result = wait_for(lambda: sender.run(f"cat {SENDER_OUT}").stdout.strip(), SECONDS + 30, step=1)
    outcome = json.loads(result)
    assert outcome["error"] is None, outcome
    assert outcome["refused"] == dict.fromkeys(probes.split(","), 0), outcome["refused"]
    sent = outcome["sent"]

    expected = {(f"m{n % METRICS}", str(base - (n // METRICS) * 60)): float(n) for n in range(sent)}

    found = wait_for_points(cluster, storage, prefix, len(expected))
    missing = [key for key in expected if key not in found]
    wrong = [key for key in expected if key in found and found[key] != expected[key]]
    print(
        f"\nrelay restarts behind the front: {len(restarts)} restarts "
        f"({'; '.join(restarts)}); {sent} points sent at {RATE}/s through {address}:2003, "
        f"{len(expected) - len(missing)} on disk, {len(missing)} lost, "
        f"refused connections {outcome['refused']}"
    )
    assert not missing, f"{len(missing)} of {sent} points lost, e.g. {missing[:5]}"
    assert not wrong, f"{len(wrong)} points with another value, e.g. {wrong[:5]}"

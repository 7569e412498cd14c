"""The safe-halt hook through real systemd halts of the storage container.

The device layer is fake (tests/fakes/fakedm.py: this kernel has no
device-mapper); the units, their ordering, `carbonscale cache` and the halt
itself are real. Each halt test stops the container (docker stop sends
SIGRTMIN+3, systemd's halt), starts it again and reads the order of events
from the persistent journal.
"""

from __future__ import annotations

import json
import subprocess
import time

testinfra_hosts = ["ssdcache-storage1"]

CONTAINER = "ssdcache-storage1"
CARBONSCALE = "/opt/carbonscale/venv/bin/carbonscale"
CONFIG = "/etc/carbonscale/ssd-cache.json"
WHISPER = "/var/lib/graphite/whisper"
UNITS = [
    "carbonscale-ssd-cache-load.service",
    "carbonscale-ssd-cache-halt.service",
    "carbonscale-ssd-cache-report.service",
    "carbonscale-ssd-cache-report.timer",
]


def _status(host) -> dict:
    return json.loads(host.check_output(f"{CARBONSCALE} cache status --config {CONFIG} --json"))


def _halt_and_boot(host) -> str:
    """Halt the container with systemd, boot it again; the journal since the halt."""
    since = host.check_output("date '+%Y-%m-%d %H:%M:%S'")
    time.sleep(1)
    subprocess.run(["docker", "stop", CONTAINER], check=True, capture_output=True, timeout=180)
    subprocess.run(["docker", "start", CONTAINER], check=True, capture_output=True, timeout=60)
    # Right after the start systemd's bus is not up yet: ask until it answers.
    deadline = time.monotonic() + 300
    while True:
        boot = subprocess.run(
            ["docker", "exec", CONTAINER, "systemctl", "is-system-running", "--wait"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if boot.stdout.strip() in ("running", "degraded") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert boot.stdout.strip() in ("running", "degraded"), boot.stdout + boot.stderr
    return host.check_output(f"journalctl -q -o short-iso --no-pager --since '{since}'")


def _position(journal: str, needle: str) -> int:
    lines = journal.splitlines()
    for number, line in enumerate(lines):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} is not in the journal:\n" + "\n".join(lines[-80:]))


def test_units_verify_clean_and_are_ordered_for_the_halt(host):
    for unit in UNITS:
        check = host.run(f"systemd-analyze verify {unit}")
        assert check.rc == 0 and check.stderr.strip() == "", f"{unit}: {check.stderr}"
    for name in ("a", "b"):
        after = host.check_output(f"systemctl show -p After --value carbon-cache@{name}").split()
        assert "carbonscale-ssd-cache-halt.service" in after
    halt_after = host.check_output(
        "systemctl show -p After --value carbonscale-ssd-cache-halt.service"
    ).split()
    assert "var-lib-graphite-whisper.mount" in halt_after
    assert "blk-availability.service" in halt_after
    load_before = host.check_output(
        "systemctl show -p Before --value carbonscale-ssd-cache-load.service"
    ).split()
    assert "var-lib-graphite-whisper.mount" in load_before


def test_cache_is_loaded_and_its_dirty_blocks_reach_carbon(host):
    state = _status(host)
    assert state["present"] is True
    assert state["dirty_blocks"] > 0
    # The timer's report goes to carbon-cache@a: a whisper file per value.
    host.check_output("systemctl start carbonscale-ssd-cache-report.service")
    path = f"{WHISPER}/carbonscale/ssd_cache/ssdcache-storage1/dirty_blocks.wsp"
    deadline = time.monotonic() + 60
    while not host.file(path).exists and time.monotonic() < deadline:
        time.sleep(2)
    assert host.file(path).exists


def test_a_halt_stops_carbon_then_unmounts_flushes_and_removes(host):
    before = _status(host)["dirty_blocks"]
    journal = _halt_and_boot(host)
    order = [
        _position(journal, "Stopped carbon-cache@a.service"),
        _position(journal, "carbon instances stopped"),
        _position(journal, f"unmounted {WHISPER}"),
        _position(journal, "dirty blocks before flush"),
        _position(journal, "flushed: 0 dirty blocks"),
        _position(journal, "removed flashcache cachedev"),
        _position(journal, "safe halt done"),
    ]
    assert order == sorted(order), journal
    assert _position(journal, "Stopped carbon-cache@b.service") < order[1]
    # Halting took some seconds after the reading above: at most that many blocks.
    reported = int(journal.split("dirty blocks before flush: ", 1)[1].split()[0])
    assert 0 < reported <= before
    # The fake logs every call that changes something: fast_remove=0 before
    # the remove, and the remove itself.
    assert _position(journal, "fast_remove=0") < _position(journal, "dmsetup remove cachedev")
    assert "INCOMPLETE" not in journal and "TIMEOUT" not in journal
    # Booted again: the cache loaded before the whisper mount, carbon running.
    assert _position(journal, "flashcache_load /var/lib/fakedisks/ssd0") < _position(
        journal, "Mounted var-lib-graphite-whisper.mount"
    )
    assert host.service("carbon-cache@a").is_running
    assert _status(host)["present"] is True


def test_a_hanging_flush_times_out_and_keeps_the_dirty_blocks_on_the_ssd(host):
    control = "/var/lib/fakedm/control.json"
    original = host.file(control).content_string if host.file(control).exists else "{}"
    hung = {**json.loads(original or "{}"), "hang": True}
    host.check_output(f"echo '{json.dumps(hung)}' > {control}")
    try:
        journal = _halt_and_boot(host)
    finally:
        host.check_output(f"echo '{original or '{}'}' > {control}")
    order = [
        _position(journal, "flush started"),
        _position(journal, "TIMEOUT"),
        _position(journal, "removing cachedev with fast_remove=1"),
        _position(journal, "removed cachedev (fast remove)"),
        _position(journal, "safe halt INCOMPLETE"),
    ]
    assert order == sorted(order), journal
    # flashcache_load at boot brought the kept dirty blocks back: more than a
    # fresh load's.
    initial = json.loads(original or "{}").get("initial_dirty", 4000)
    assert _status(host)["dirty_blocks"] > initial

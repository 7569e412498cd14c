"""A real write-back dm-cache under whisper, flushed by a real poweroff.

The guest (tests/vm_lab.py) runs the storage tier's playbook (carbon_storage,
carbonscale and ssd_cache with ssd_cache_backend lvmcache) over LVM on two
virtio disks, the "disk" and the "SSD". carbon writes whisper through the
cache until it holds dirty blocks; `systemctl poweroff` halts the guest; the
next boot's journal of the halted boot must show carbon stopped, whisper
unmounted, the cache flushed to zero dirty blocks and split off, in that
order, and every point written before the halt must read back from the
whisper files.

The hanging-flush path (timeout) stays with the fakes (tests/test_cache.py,
molecule/ssd_cache): a real dm-cache cannot be made to hang on purpose.
"""

from __future__ import annotations

import json
import time

import pytest
from vm_harness import VM
from vm_lab import LINE_PORT, WHISPER

pytestmark = pytest.mark.vm

CARBONSCALE = "/opt/carbonscale/venv/bin/carbonscale"
CONFIG = "/etc/carbonscale/ssd-cache.json"
METRICS = [f"vmtest.cache.m{n:02d}" for n in range(24)]


def send(vm: VM, points: dict[str, list[tuple[int, float]]]) -> None:
    lines = "".join(f"{name} {value!r} {ts}\n" for name, pts in points.items() for ts, value in pts)
    vm.ssh(
        f'python3 -c \'import socket,sys; socket.create_connection(("127.0.0.1", {LINE_PORT}))'
        ".sendall(sys.stdin.buffer.read())'",
        input=lines,
    )


READ = r"""
import json, sys, whisper
out = {}
for name in json.load(sys.stdin):
    path = "%s/%s.wsp" % (sys.argv[1], name.replace(".", "/"))
    try:
        (start, end, step), values = whisper.fetch(path, 0)
    except (IOError, OSError):
        out[name] = None
        continue
    out[name] = [[start + i * step, v] for i, v in enumerate(values) if v is not None]
print(json.dumps(out))
"""


def read_points(vm: VM) -> dict[str, dict[int, float] | None]:
    text = vm.ssh(f"python3 /root/read_points.py {WHISPER}", input=json.dumps(METRICS)).stdout
    data = json.loads(text)
    return {k: (None if v is None else {int(t): val for t, val in v}) for k, v in data.items()}


def cache_state(vm: VM) -> dict:
    return json.loads(vm.out(f"{CARBONSCALE} cache status --config {CONFIG} --json"))


def position(journal: list[str], needle: str) -> int:
    for number, line in enumerate(journal):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} is not in the halted boot's journal:\n" + "\n".join(journal))


@pytest.fixture
def vm(storage_vm):
    return storage_vm


def test_whisper_through_a_dirty_write_back_cache_survives_a_real_poweroff(vm):
    vm.ssh("cat > /root/read_points.py", input=READ)
    state = cache_state(vm)
    assert state["present"] is True, state
    lvs = vm.out("lvs -o lv_name,segtype,cache_mode,cache_policy whisper/data --noheadings")
    assert "cache" in lvs and "writeback" in lvs, lvs

    # Points a minute apart in the last hours (retention 60s:7d); rounds
    # until the cache holds dirty blocks: reads between rounds (page cache
    # dropped) make whisper's blocks hot, smq promotes them, and carbon's next
    # writes to them stay on the SSD, dirty, until a flush.
    now = int(time.time()) // 60 * 60
    sent: dict[str, dict[int, float]] = {name: {} for name in METRICS}
    dirty = 0
    for round_ in range(12):
        batch = {
            name: [(now - (round_ * 30 + k) * 60, n * 1000.0 + round_ * 30 + k) for k in range(30)]
            for n, name in enumerate(METRICS)
        }
        send(vm, batch)
        for name, pts in batch.items():
            sent[name].update(pts)
        deadline = time.monotonic() + 180
        while True:
            stored = read_points(vm)
            if all(stored[n] is not None and sent[n].items() <= stored[n].items() for n in METRICS):
                break
            assert time.monotonic() < deadline, "carbon did not write the points within 180 s"
            time.sleep(2)
        vm.ssh("sync; echo 3 > /proc/sys/vm/drop_caches")
        read_points(vm)
        dirty = cache_state(vm)["dirty_blocks"]
        points = sum(map(len, sent.values()))
        print(f"round {round_}: {points} points written, {dirty} dirty blocks")
        if dirty > 0 and round_ >= 1:
            break
    assert dirty > 0, "the write-back cache never held a dirty block"
    before = read_points(vm)

    since = vm.out("date '+%Y-%m-%d %H:%M:%S'").strip()
    seconds = vm.poweroff()
    print(f"poweroff with {dirty} dirty blocks took {seconds:.1f} s")
    seconds = vm.boot()
    print(f"the next boot reached sshd in {seconds:.1f} s, {vm.boot_cpu:.1f} s of host CPU")
    journal = vm.out(
        "journalctl -b -1 -o short-monotonic --no-pager "
        "-u carbonscale-ssd-cache-halt.service -u 'carbon-cache@*' "
        f"-u var-lib-graphite-whisper.mount --since '{since}'"
    ).splitlines()
    print("the halted boot's journal (halt hook, carbon, whisper mount):\n" + "\n".join(journal))

    order = [
        position(journal, "Stopped carbon-cache@a.service"),
        position(journal, "carbon instances stopped: carbon-cache@a.service"),
        position(journal, f"unmounted {WHISPER}"),
        position(journal, "dirty blocks before flush: "),
        position(journal, "flushed: 0 dirty blocks"),
        position(journal, "removed lvmcache whisper/data"),
        position(journal, "safe halt done"),
    ]
    assert order == sorted(order), order
    flushed_from = int(journal[order[3]].split("dirty blocks before flush: ")[1].split()[0])
    assert flushed_from > 0, journal[order[3]]
    assert not any("INCOMPLETE" in line or "ERROR" in line for line in journal)

    # The boot attached the split pool again and carbon writes through it.
    assert cache_state(vm)["present"] is True
    carbon = vm.ssh("systemctl is-active carbon-cache@a.service", check=False).stdout
    assert carbon.strip() == "active"
    after = read_points(vm)
    total = 0
    for name in METRICS:
        assert after[name] is not None, f"{name}: whisper file gone after the halt"
        for ts, value in sent[name].items():
            assert after[name].get(ts) == value, f"{name} at {ts}: {after[name].get(ts)} != {value}"
            total += 1
        assert after[name] == before[name], name
    print(f"after the next boot: all {total} points of {len(METRICS)} whisper files read back")

"""carbonscale.cache: parsers on the real programs' output, and the safe-halt,
start and report paths run against tests/fakes/fakedm.py (the same fakes the
ssd_cache molecule scenario installs) put first in PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from relay_sinks import LineReceiver

from carbonscale import CarbonscaleError
from carbonscale.cache import (
    CacheState,
    backend_for,
    check,
    config_from_dict,
    halt,
    lvmcache_state,
    metric_points,
    parse_dmsetup_targets,
    parse_flashcache_status,
    parse_flashcache_table,
    parse_lvs_nameprefixes,
    report,
    start,
)
from carbonscale.sender import encode_line

FAKEDM = Path(__file__).parent / "fakes" / "fakedm.py"

# `dmsetup status` and `dmsetup table` of a flashcache write-back device as
# printed by a real host (flashcache 3.x, from a published benchmark write-up;
# indentation is the kernel's tabs there rendered as spaces).
FLASHCACHE_STATUS = """\
0 20480000 flashcache stats: 
    reads(262), writes(18)
    read hits(254), read hit percent(96)
    write hits(12) write hit percent(66)
    dirty write hits(5) dirty write hit percent(27)
    replacement(0), write replacement(0)
    write invalidates(0), read invalidates(2)
    pending enqueues(1), pending inval(1)
    metadata dirties(13), metadata cleans(1)
    metadata batch(5) metadata ssd writes(9)
    cleanings(1) fallow cleanings(0)
    no room(0) front merge(0) back merge(0)
    disk reads(8), disk writes(1) ssd reads(255) ssd writes(33)
    uncached reads(2), uncached writes(0), uncached IO requeue(0)
    disk read errors(0), disk write errors(0) ssd read errors(0) ssd write errors(0)
    uncached sequential reads(0), uncached sequential writes(0)
    pid_adds(0), pid_dels(0), pid_drops(0) pid_expiry(0)
"""  # noqa: W291 - the kernel prints "stats: " with a trailing space
FLASHCACHE_TABLE = """\
0 20480000 flashcache conf:
    ssd dev (/dev/loop0), disk dev (/dev/rbd/bench/bencha) cache mode(WRITE_BACK)
    capacity(508M), associativity(512), data block size(4K) metadata block size(4096b)
    skip sequential thresh(0K)
    total blocks(130048), cached blocks(93), cache percent(0)
    dirty blocks(12), dirty percent(0)
    nr_queued(0)
Size Hist: 1024:5 4096:22496 
"""  # noqa: W291
# A busy production cache (tabs as the kernel prints them, disk assoc line of
# flashcache 3.1).
FLASHCACHE_TABLE_BUSY = (
    "0 15623780319 flashcache conf:\n"
    "\tssd dev (/dev/disk/by-partlabel/OSD-SATA-01-ssd), "
    "disk dev (/dev/disk/by-partlabel/OSD-SATA-01-data) cache mode(WRITE_BACK)\n"
    "\tcapacity(347422M), associativity(512), data block size(4K) metadata block size(4096b)\n"
    "\tdisk assoc(256K)\n"
    "\tskip sequential thresh(32K)\n"
    "\ttotal blocks(88940032), cached blocks(38453498), cache percent(43)\n"
    "\tdirty blocks(25037914), dirty percent(28)\n"
    "\tnr_queued(0)\n"
    "Size Hist: 512:760473 1024:2 3584:8 4096:2591203166 \n"
)
# lvm2 2.03.16 (Debian 12) --nameprefixes form, as `lvm devtypes --nameprefixes`
# prints it on this image: two leading spaces, KEY='value', empty values kept.
LVS_CACHED = (
    "  LVM2_LV_FULL_NAME='vg_ml1/lv_home' LVM2_SEGTYPE='cache' LVM2_POOL_LV='[lv_cache_cpool]' "
    "LVM2_CACHE_MODE='writeback' LVM2_CACHE_POLICY='smq' LVM2_CACHE_DIRTY_BLOCKS='1024' "
    "LVM2_CACHE_USED_BLOCKS='524282' LVM2_CACHE_TOTAL_BLOCKS='524288'\n"
)
LVS_PLAIN = (
    "  LVM2_LV_FULL_NAME='vg_ml1/lv_home' LVM2_SEGTYPE='linear' LVM2_POOL_LV='' "
    "LVM2_CACHE_MODE='' LVM2_CACHE_POLICY='' LVM2_CACHE_DIRTY_BLOCKS='' "
    "LVM2_CACHE_USED_BLOCKS='' LVM2_CACHE_TOTAL_BLOCKS=''\n"
)


# ---------------------------------------------------------------- parsers


def test_flashcache_table_gives_dirty_blocks():
    state = parse_flashcache_table(FLASHCACHE_TABLE)
    assert state == CacheState(
        present=True, dirty_blocks=12, dirty_percent=0.0, used_blocks=93, total_blocks=130048
    )


def test_flashcache_table_of_a_busy_cache():
    state = parse_flashcache_table(FLASHCACHE_TABLE_BUSY)
    assert (state.dirty_blocks, state.dirty_percent) == (25037914, 28.0)
    assert state.total_blocks == 88940032


def test_flashcache_status_has_counters_but_no_dirty_count():
    counters = parse_flashcache_status(FLASHCACHE_STATUS)
    assert counters["reads"] == 262
    assert counters["dirty_write_hit_percent"] == 27
    assert counters["ssd_write_errors"] == 0
    assert counters["cleanings"] == 1
    assert "dirty_blocks" not in counters
    # The stats form is not a table: asking it for dirty blocks is an error.
    with pytest.raises(CarbonscaleError, match="no 'dirty blocks"):
        parse_flashcache_table(FLASHCACHE_STATUS.replace("stats:", "conf:"))


def test_flashcache_write_through_table_has_no_dirty_blocks():
    table = FLASHCACHE_TABLE.replace("WRITE_BACK", "WRITE_THROUGH").replace(
        "    dirty blocks(12), dirty percent(0)\n", ""
    )
    assert parse_flashcache_table(table).dirty_blocks == 0


@pytest.mark.parametrize(
    "text", ["0 41943040 linear 8:16 0\n", "", "garbage", "0 10 cache 8 1546/262144 128"]
)
def test_other_targets_are_not_flashcache(text):
    with pytest.raises(CarbonscaleError, match="not a flashcache table"):
        parse_flashcache_table(text)


def test_lvs_nameprefixes_keeps_empty_fields():
    (row,) = parse_lvs_nameprefixes(LVS_PLAIN)
    assert row["lv_full_name"] == "vg_ml1/lv_home"
    assert row["cache_policy"] == ""
    assert lvmcache_state(row) == CacheState(present=False)


def test_lvs_cached_origin():
    (row,) = parse_lvs_nameprefixes(LVS_CACHED)
    state = lvmcache_state(row)
    assert state.present and state.dirty_blocks == 1024
    assert state.total_blocks == 524288 and state.used_blocks == 524282
    assert state.dirty_percent == 0.2
    assert state.policy == "smq"


def test_lvs_columns_are_refused():
    columns = "  LV      CachePolicy CacheSettings Chunk   CacheUsedBlocks  CacheDirtyBlocks\n"
    with pytest.raises(CarbonscaleError, match="--nameprefixes"):
        parse_lvs_nameprefixes(columns)


def test_dmsetup_targets():
    text = "flashcache       v1.0.4\ncache            v2.2.0\nstriped          v1.6.0\n"
    assert parse_dmsetup_targets(text) == {"flashcache", "cache", "striped"}


# ---------------------------------------------------------------- config


FLASHCACHE_CONFIG = {
    "backend": "flashcache",
    "whisper_dir": "/var/lib/graphite/whisper",
    "units": ["carbon-cache@a.service", "carbon-cache@b.service"],
    "timeout": 5,
    "poll_interval": 0.2,
    "device_wait": 1,
    "flashcache": {
        "name": "cachedev",
        "ssd": "SSD",
        "disk": "DISK",
        "sysctls": {"dirty_thresh_pct": 30, "reclaim_policy": 1},
    },
    "report": {"prefix": "carbonscale.ssd_cache.s1", "destination": "127.0.0.1:2003"},
}
LVM_CONFIG = {
    "backend": "lvmcache",
    "whisper_dir": "/var/lib/graphite/whisper",
    "units": ["carbon-cache@a.service"],
    "timeout": 5,
    "poll_interval": 0.2,
    "device_wait": 1,
    "lvmcache": {
        "vg": "vg0",
        "lv": "whisper",
        "cachepool": "whisper_cache",
        "policy": "smq",
        "policy_settings": {"migration_threshold": 2048},
    },
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backend": "bcache"}, "backend must be one of flashcache, lvmcache"),
        ({"whisper_dir": "relative"}, "whisper_dir must be an absolute path"),
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout_action": "pray"}, "timeout_action must be one of"),
        ({"flashcache": {"name": "c", "ssd": "/dev/sdb"}}, "flashcache.disk is required"),
        (
            {"flashcache": {"name": "c", "ssd": "/dev/sdb", "disk": "/dev/md0.1"}},
            "has a '.' in its name",
        ),
        (
            {"flashcache": {"name": "c", "ssd": "/a", "disk": "/b", "sysctls": {"x": "1"}}},
            "sysctls must map sysctl names to integers",
        ),
    ],
)
def test_bad_config_is_refused(change, message):
    with pytest.raises(CarbonscaleError, match=message):
        config_from_dict({**FLASHCACHE_CONFIG, **change})


def test_flashcache_sysctl_names_use_device_basenames():
    config = config_from_dict(
        {
            **FLASHCACHE_CONFIG,
            "flashcache": {"name": "c", "ssd": "/dev/sdb", "disk": "/dev/cciss/c0d2"},
        }
    )
    assert config.flashcache.sysctl_key("fast_remove") == "dev.flashcache.sdb+c0d2.fast_remove"


# ---------------------------------------------------------------- against the fakes


class Fake:
    """A scratch world for tests/fakes/fakedm.py: its programs first in PATH,
    its state in one directory, device paths that exist."""

    def __init__(self, tmp_path: Path, monkeypatch, programs=None) -> None:
        self.dir = tmp_path / "fakedm"
        self.dir.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for name in programs or (
            "dmsetup",
            "flashcache_create",
            "flashcache_load",
            "sysctl",
            "lvs",
            "lvchange",
            "lvconvert",
            "systemctl",
            "mountpoint",
            "umount",
        ):
            # fakedm dispatches on the name it is run as (a symlink keeps it).
            (self.bin / name).symlink_to(FAKEDM)
        monkeypatch.setenv("PATH", f"{self.bin}:/usr/bin:/bin")
        monkeypatch.setenv("FAKEDM_DIR", str(self.dir))
        self.ssd = tmp_path / "ssd0"
        self.disk = tmp_path / "disk0"
        self.ssd.touch()
        self.disk.touch()

    def control(self, **values) -> None:
        path = self.dir / "control.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(values)
        path.write_text(json.dumps(data))

    def calls(self) -> list[str]:
        path = self.dir / "calls.log"
        return path.read_text().splitlines() if path.exists() else []

    def disk_state(self) -> dict:
        return json.loads((self.dir / "disk.json").read_text())

    def flashcache(self, **config):
        data = json.loads(json.dumps(FLASHCACHE_CONFIG))
        data["flashcache"]["ssd"] = str(self.ssd)
        data["flashcache"]["disk"] = str(self.disk)
        data.update(config)
        return backend_for(config_from_dict(data))

    def lvmcache(self, **config):
        data = json.loads(json.dumps(LVM_CONFIG))
        data.update(config)
        return backend_for(config_from_dict(data))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    return Fake(tmp_path, monkeypatch)


def running(fake: Fake, whisper: str = "/var/lib/graphite/whisper") -> None:
    fake.control(
        units={"carbon-cache@a.service": "active", "carbon-cache@b.service": "active"},
        mounted=[whisper],
    )


def test_start_creates_then_loads_and_sets_sysctls(fake):
    backend = fake.flashcache()
    with pytest.raises(CarbonscaleError, match=r"flashcache_load .* failed"):
        start(backend)  # boot without --create never makes a new cache
    changes = start(backend, create=True)
    assert changes[0].startswith("created flashcache cachedev")
    assert "set dev.flashcache.ssd0+disk0.dirty_thresh_pct=30" in changes
    assert "set dev.flashcache.ssd0+disk0.reclaim_policy=1" in changes
    assert start(backend, create=True) == []  # idempotent
    state = backend.state()
    assert state.present and state.dirty_blocks == 4000
    assert "flashcache_create -p back -b 4k cachedev" in " ".join(fake.calls())


def test_halt_flashcache_stops_unmounts_flushes_removes_in_order(fake):
    backend = fake.flashcache()
    start(backend, create=True)
    running(fake)
    fake.control(drain_per_second=5000)
    lines: list[str] = []
    assert halt(backend, lines.append) == 0
    calls = fake.calls()
    order = [
        "systemctl stop carbon-cache@a.service carbon-cache@b.service",
        "umount /var/lib/graphite/whisper",
        "sysctl -w dev.flashcache.ssd0+disk0.fast_remove=0",
        "sysctl -w dev.flashcache.ssd0+disk0.do_sync=1",
        "dmsetup remove cachedev",
    ]
    assert [c for c in calls if c in order] == order
    text = "\n".join(lines)
    assert "dirty blocks before flush: 4000 blocks" not in text  # sanity of the wording below
    assert "dirty blocks before flush: 4000 dirty blocks" in text
    assert "flushed: 0 dirty blocks" in text
    assert "safe halt done in" in text and "before 4000, after 0" in text
    assert not backend.state().present
    assert fake.disk_state()["ssds"][str(fake.ssd)]["dirty"] == 0


def test_halt_keeps_the_cache_when_whisper_is_busy(fake):
    backend = fake.flashcache()
    start(backend, create=True)
    running(fake)
    fake.control(busy=["/var/lib/graphite/whisper"])
    lines: list[str] = []
    assert halt(backend, lines.append) == 1
    text = "\n".join(lines)
    assert "ERROR: cannot unmount /var/lib/graphite/whisper" in text
    assert "target is busy" in text
    assert "KEEPING the cache" in text
    assert not any(
        "fast_remove" in c or "do_sync" in c or c.startswith("dmsetup remove") for c in fake.calls()
    )
    assert backend.state().dirty_blocks == 4000


def test_halt_timeout_fast_removes_flashcache_and_boot_restores_the_dirty_blocks(fake):
    backend = fake.flashcache(timeout=1.5)
    start(backend, create=True)
    running(fake)
    fake.control(hang=True)
    lines: list[str] = []
    began = time.monotonic()
    assert halt(backend, lines.append) == 1
    assert time.monotonic() - began < 10
    text = "\n".join(lines)
    assert "TIMEOUT: 4000 dirty blocks" in text and "(limit 1.5 s, 4000 before)" in text
    assert "removing cachedev with fast_remove=1" in text
    assert "safe halt INCOMPLETE" in text and "cache removed" in text
    assert "sysctl -w dev.flashcache.ssd0+disk0.fast_remove=1" in fake.calls()
    assert not backend.state().present
    # The SSD kept them; the next boot's load brings them back.
    assert fake.disk_state()["ssds"][str(fake.ssd)]["dirty"] == 4000
    fake.control(hang=False, initial_dirty=0)
    assert start(backend)[0].startswith("loaded flashcache cachedev")
    assert backend.state().dirty_blocks == 4000


def test_halt_timeout_can_keep_the_flashcache_attached(fake):
    backend = fake.flashcache(timeout=1, timeout_action="keep")
    start(backend, create=True)
    running(fake)
    fake.control(hang=True)
    lines: list[str] = []
    assert halt(backend, lines.append) == 1
    assert "cache still attached" in lines[-1]
    assert backend.state().present


def test_halt_lvmcache_uses_the_cleaner_policy_then_splits_the_cache(fake):
    (fake.dir / "disk.json").write_text(
        json.dumps({"ssds": {}, "lvs": {"vg0/whisper": {"segtype": "linear", "dirty": 0}}})
    )
    backend = fake.lvmcache(device_wait=0.1)
    backend.device_paths = lambda: []  # no /dev/vg0/whisper on the controller
    changes = start(backend, create=True)
    assert changes == [
        "attached lvmcache vg0/whisper (cache pool vg0/whisper_cache) in writeback mode, policy smq"
    ]
    assert start(backend) == []
    running(fake)
    fake.control(drain_per_second=4000)
    lines: list[str] = []
    assert halt(backend, lines.append) == 0
    calls = fake.calls()
    assert calls[-3:] == [
        "umount /var/lib/graphite/whisper",
        "lvchange --cachepolicy cleaner vg0/whisper",
        "lvconvert -y --splitcache vg0/whisper",
    ]
    assert "--cachesettings migration_threshold=2048 vg0/whisper" in calls[0]
    assert any(line.startswith("flushing: ") for line in lines)
    assert not backend.state().present
    # The boot (no --create) attaches the pool the halt split off.
    disk = json.loads((fake.dir / "disk.json").read_text())
    disk["lvs"]["vg0/whisper_cache"] = {"segtype": "cache-pool", "dirty": 0}
    (fake.dir / "disk.json").write_text(json.dumps(disk))
    assert start(backend)[0].startswith("attached lvmcache")


def test_lvmcache_boot_without_a_pool_does_not_create_one(fake):
    (fake.dir / "disk.json").write_text(
        json.dumps({"ssds": {}, "lvs": {"vg0/whisper": {"segtype": "linear", "dirty": 0}}})
    )
    backend = fake.lvmcache(device_wait=0.1)
    backend.device_paths = lambda: []
    with pytest.raises(CarbonscaleError, match="has no cache attached"):
        start(backend)
    assert not any(call.startswith("lvconvert") for call in fake.calls())


def test_lvmcache_start_restores_the_policy_after_a_timed_out_halt(fake):
    (fake.dir / "disk.json").write_text(
        json.dumps({"ssds": {}, "lvs": {"vg0/whisper": {"segtype": "linear", "dirty": 0}}})
    )
    backend = fake.lvmcache(timeout=1)
    backend.device_paths = lambda: []
    start(backend, create=True)
    running(fake)
    fake.control(hang=True)
    lines: list[str] = []
    assert halt(backend, lines.append) == 1
    assert "the cache stays attached with 4000 dirty blocks" in "\n".join(lines)
    assert backend.state().policy == "cleaner"
    fake.control(hang=False)
    assert start(backend) == ["set cache policy smq on vg0/whisper (was cleaner)"]


def test_start_waits_for_devices_then_says_which_are_missing(fake):
    backend = fake.flashcache(device_wait=0.5)
    fake.ssd.unlink()
    with pytest.raises(CarbonscaleError, match=r"ssd0 did not appear within 0.5 s"):
        start(backend, create=True)


def test_check_names_what_is_missing(tmp_path, monkeypatch):
    Fake(tmp_path, monkeypatch, programs=("dmsetup", "sysctl"))
    backend = backend_for(config_from_dict(FLASHCACHE_CONFIG))
    with pytest.raises(CarbonscaleError) as excinfo:
        check(backend)
    message = str(excinfo.value)
    assert "flashcache_create is not installed" in message
    assert "flashcache_load is not installed" in message
    assert "github.com/facebookarchive/flashcache" in message


def test_check_passes_with_programs_and_target(fake):
    check(fake.flashcache())
    check(fake.lvmcache())


# ---------------------------------------------------------------- report


def test_metric_points():
    state = CacheState(
        present=True,
        dirty_blocks=12,
        dirty_percent=0.5,
        used_blocks=93,
        total_blocks=130048,
        counters={"ssd_write_errors": 0},
    )
    lines = encode_line(metric_points("p.s1", state, 1700000000)).decode().splitlines()
    assert lines == [
        "p.s1.present 1 1700000000",
        "p.s1.dirty_blocks 12 1700000000",
        "p.s1.dirty_percent 0.5 1700000000",
        "p.s1.used_blocks 93 1700000000",
        "p.s1.total_blocks 130048 1700000000",
        "p.s1.ssd_write_errors 0 1700000000",
    ]
    absent = metric_points("p.s1", CacheState(present=False), 1)
    assert [p.name for p in absent] == ["p.s1.present"]


def test_report_sends_line_protocol():
    receiver = LineReceiver()
    points = metric_points("p", CacheState(present=True, dirty_blocks=7), 42)
    assert report(points, f"127.0.0.1:{receiver.port}") == 2
    assert receiver.wait() == [b"p.present 1 42\np.dirty_blocks 7 42\n"]


def test_report_destination_must_be_host_port():
    with pytest.raises(CarbonscaleError, match="HOST:PORT of a carbon line receiver"):
        report([], "localhost")


def test_cli_report_dry_run_and_bad_config(fake, tmp_path):
    backend = fake.flashcache()
    start(backend, create=True)
    config = tmp_path / "cache.json"
    data = json.loads(json.dumps(FLASHCACHE_CONFIG))
    data["flashcache"].update(ssd=str(fake.ssd), disk=str(fake.disk))
    config.write_text(json.dumps(data))
    cli = [sys.executable, "-m", "carbonscale", "cache"]
    env = dict(os.environ)
    out = subprocess.run(
        [*cli, "report", "--config", str(config), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "carbonscale.ssd_cache.s1.dirty_blocks 4000 " in out
    status = subprocess.run(
        [*cli, "status", "--config", str(config)], capture_output=True, text=True, env=env
    )
    assert status.stdout.strip() == (
        f"flashcache cachedev (ssd {fake.ssd}, disk {fake.disk}): 4000 dirty blocks (1%)"
    )
    config.write_text('{"backend": "bcache"}')
    bad = subprocess.run(
        [*cli, "halt", "--config", str(config)], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("carbonscale: error: ")
    assert "backend must be one of flashcache, lvmcache" in bad.stderr
    assert "Traceback" not in bad.stderr

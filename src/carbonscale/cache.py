"""SSD write-back caches under the whisper filesystem: state, boot, safe halt, report.

Two backends, both device-mapper targets:

- flashcache (out of tree, Facebook): `flashcache_create -p back`, reloaded at
  boot with `flashcache_load`; per-cache sysctls under
  `dev.flashcache.<ssd>+<disk>.*` (the basenames of the two devices). Its dirty
  block count is in `dmsetup table <name>` (`dirty blocks(N), dirty
  percent(P)`, flashcache_status_table); `dmsetup status <name>` carries the
  I/O and error counters (flashcache_status_info) but no dirty count.
- lvmcache (dm-cache through LVM): the origin LV converted with `lvconvert
  --type cache --cachepool ... --cachemode writeback`; dirty blocks in `lvs -o
  cache_dirty_blocks`.

A write-back cache still attached at halt panicked kernels (flashcache issues
#58, #84). `halt` is the hook that prevents it: stop what uses the whisper
filesystem, sync, unmount it (refuse to go on if it is busy: the cache is
kept), flush the cache while logging how many dirty blocks are left, then
remove it, all bounded by a timeout that says what is left when it expires.

Every external program is run through `Host`, so tests (and the ssd_cache
molecule scenario) put fake `dmsetup`, `lvs`, ... first in PATH and the code
under test is this same code.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from carbonscale import CarbonscaleError
from carbonscale.sender import Point, parse_address, send

BACKENDS = ("flashcache", "lvmcache")
TIMEOUT_ACTIONS = ("fast_remove", "keep")
# dm targets each backend needs (`dmsetup targets`) and the module that provides it.
KERNEL_TARGETS = {"flashcache": ("flashcache", "flashcache"), "lvmcache": ("cache", "dm-cache")}
PROGRAMS = {
    "flashcache": ("dmsetup", "flashcache_create", "flashcache_load", "sysctl"),
    "lvmcache": ("dmsetup", "lvs", "lvchange", "lvconvert"),
}
# Fields asked of lvs, in --nameprefixes form (KEY='value'; empty values
# survive, unlike whitespace-split columns).
LVS_FIELDS = (
    "lv_full_name",
    "segtype",
    "pool_lv",
    "cache_mode",
    "cache_policy",
    "cache_dirty_blocks",
    "cache_used_blocks",
    "cache_total_blocks",
)
# Counters from `dmsetup status` worth graphing next to the dirty blocks.
FLASHCACHE_REPORTED_COUNTERS = (
    "disk_read_errors",
    "disk_write_errors",
    "ssd_read_errors",
    "ssd_write_errors",
    "cleanings",
)


# --------------------------------------------------------------------------
# Parsers (pure functions over the programs' real output)

_KEYED_VALUE = re.compile(r"([A-Za-z_][A-Za-z0-9_ ]*?)\s?\(([^()\n]*)\)")


def parse_keyed_values(text: str) -> dict[str, int | str]:
    """flashcache's `name(value)` pairs, from `dmsetup status` or `dmsetup table`.

    Keys are lower case with spaces as underscores (`dirty blocks(12)` ->
    `dirty_blocks: 12`); all-digit values become ints, others stay strings
    (`capacity(508M)`, `ssd dev (/dev/sdb)`).
    """
    values: dict[str, int | str] = {}
    for match in _KEYED_VALUE.finditer(text):
        key = "_".join(match.group(1).split()).lower()
        raw = match.group(2).strip()
        values[key] = int(raw) if raw.isdigit() else raw
    return values


@dataclass(frozen=True)
class CacheState:
    """What a cache device reports. `present` False means the device does not exist
    (never loaded, or removed by a halt); the counts are then None."""

    present: bool
    dirty_blocks: int | None = None
    dirty_percent: float | None = None
    used_blocks: int | None = None
    total_blocks: int | None = None
    policy: str = ""
    counters: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.present:
            return "device not present"
        text = f"{self.dirty_blocks} dirty blocks"
        if self.dirty_percent is not None:
            text += f" ({self.dirty_percent:g}%)"
        return text


def parse_flashcache_table(text: str) -> CacheState:
    """`dmsetup table <name>` of a flashcache device (flashcache_status_table)."""
    header = text.split(None, 3)
    if len(header) < 3 or header[2] != "flashcache":
        raise CarbonscaleError(
            f"not a flashcache table (expected '<start> <length> flashcache conf: ...'): "
            f"{text.strip()[:80]!r}"
        )
    values = parse_keyed_values(text)
    mode = str(values.get("cache_mode", "WRITE_BACK"))
    if "dirty_blocks" not in values:
        if mode != "WRITE_BACK":
            # Write-through and write-around caches hold no dirty blocks.
            return CacheState(present=True, dirty_blocks=0, dirty_percent=0.0)
        raise CarbonscaleError(
            f"flashcache table has no 'dirty blocks(N)' field: {text.strip()[:80]!r}"
        )
    return CacheState(
        present=True,
        dirty_blocks=_int(values["dirty_blocks"], "dirty blocks"),
        dirty_percent=float(_int(values.get("dirty_percent", 0), "dirty percent")),
        used_blocks=_optional_int(values.get("cached_blocks")),
        total_blocks=_optional_int(values.get("total_blocks")),
    )


def parse_flashcache_status(text: str) -> dict[str, int]:
    """`dmsetup status <name>` of a flashcache device (flashcache_status_info): its
    integer counters (`reads`, `cleanings`, `ssd_write_errors`, ...). It has no
    dirty count: that is in the table."""
    header = text.split(None, 3)
    if len(header) < 3 or header[2] != "flashcache":
        raise CarbonscaleError(
            f"not a flashcache status (expected '<start> <length> flashcache stats: ...'): "
            f"{text.strip()[:80]!r}"
        )
    return {k: v for k, v in parse_keyed_values(text).items() if isinstance(v, int)}


def parse_lvs_nameprefixes(text: str) -> list[dict[str, str]]:
    """`lvs --noheadings --nameprefixes -o ...`: one dict per LV, keys without
    the `LVM2_` prefix, lower case (`LVM2_CACHE_DIRTY_BLOCKS='0'` ->
    `cache_dirty_blocks: '0'`)."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = {}
        try:
            tokens = shlex.split(line)
        except ValueError as exc:
            raise CarbonscaleError(f"unreadable lvs line {line.strip()!r}: {exc}") from None
        for token in tokens:
            key, sep, value = token.partition("=")
            if not sep or not key.startswith("LVM2_"):
                raise CarbonscaleError(
                    f"lvs output is not in --nameprefixes form (KEY='value'): {line.strip()!r}"
                )
            row[key[len("LVM2_") :].lower()] = value
        rows.append(row)
    return rows


def lvmcache_state(row: dict[str, str]) -> CacheState:
    """The cache state of one lvs row; an origin without a cache segment is 'not present'."""
    if row.get("segtype") != "cache":
        return CacheState(present=False)
    dirty = _optional_int(row.get("cache_dirty_blocks"))
    total = _optional_int(row.get("cache_total_blocks"))
    percent = round(100.0 * dirty / total, 2) if dirty is not None and total else None
    return CacheState(
        present=True,
        dirty_blocks=dirty,
        dirty_percent=percent,
        used_blocks=_optional_int(row.get("cache_used_blocks")),
        total_blocks=total,
        policy=row.get("cache_policy", ""),
    )


def parse_dmsetup_targets(text: str) -> set[str]:
    """`dmsetup targets`: the target names the kernel knows (`cache  v2.2.0`)."""
    return {line.split()[0] for line in text.splitlines() if line.strip()}


def _int(value: int | str, what: str) -> int:
    if isinstance(value, int):
        return value
    raise CarbonscaleError(f"{what} is not a number: {value!r}")


def _optional_int(value: int | str | None) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    raise CarbonscaleError(f"expected a block count, got {value!r}")


# --------------------------------------------------------------------------
# Configuration (/etc/carbonscale/ssd-cache.json, written by the ssd_cache role)


@dataclass(frozen=True)
class FlashcacheConfig:
    name: str
    ssd: str
    disk: str
    size: str = ""
    block_size: str = "4k"
    sysctls: dict[str, int] = field(default_factory=dict)

    @property
    def sysctl_device(self) -> str:
        """flashcache names its sysctl directory `<ssd basename>+<disk basename>`."""
        return f"{os.path.basename(self.ssd)}+{os.path.basename(self.disk)}"

    def sysctl_key(self, name: str) -> str:
        return f"dev.flashcache.{self.sysctl_device}.{name}"


@dataclass(frozen=True)
class LvmcacheConfig:
    vg: str
    lv: str
    cachepool: str
    policy: str = "smq"
    policy_settings: dict[str, int | str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"{self.vg}/{self.lv}"


@dataclass(frozen=True)
class CacheConfig:
    backend: str
    whisper_dir: str
    units: tuple[str, ...]
    timeout: float = 600.0
    poll_interval: float = 5.0
    device_wait: float = 60.0
    timeout_action: str = "fast_remove"
    flashcache: FlashcacheConfig | None = None
    lvmcache: LvmcacheConfig | None = None
    report_prefix: str = "carbonscale.ssd_cache"
    report_destination: str = ""


def load_config(path: str | os.PathLike) -> CacheConfig:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CarbonscaleError(f"cannot read the cache config {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CarbonscaleError(f"{path} is not JSON: {exc}") from None
    return config_from_dict(data, str(path))


def config_from_dict(data: object, where: str = "cache config") -> CacheConfig:
    if not isinstance(data, dict):
        raise CarbonscaleError(f"{where}: expected a JSON object")
    backend = data.get("backend")
    if backend not in BACKENDS:
        raise CarbonscaleError(
            f"{where}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    whisper_dir = data.get("whisper_dir")
    if not isinstance(whisper_dir, str) or not whisper_dir.startswith("/"):
        raise CarbonscaleError(
            f"{where}: whisper_dir must be an absolute path, got {whisper_dir!r}"
        )
    units = data.get("units", [])
    if not isinstance(units, list) or not all(isinstance(u, str) and u for u in units):
        raise CarbonscaleError(f"{where}: units must be a list of systemd unit names")
    numbers = {}
    for key, default in (("timeout", 600.0), ("poll_interval", 5.0), ("device_wait", 60.0)):
        value = data.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise CarbonscaleError(
                f"{where}: {key} must be a positive number of seconds, got {value!r}"
            )
        numbers[key] = float(value)
    timeout_action = data.get("timeout_action", "fast_remove")
    if timeout_action not in TIMEOUT_ACTIONS:
        raise CarbonscaleError(
            f"{where}: timeout_action must be one of {', '.join(TIMEOUT_ACTIONS)}, "
            f"got {timeout_action!r}"
        )
    flashcache = lvmcache = None
    section = data.get(backend)
    if not isinstance(section, dict):
        raise CarbonscaleError(f"{where}: backend {backend} needs a '{backend}' object")
    if backend == "flashcache":
        flashcache = FlashcacheConfig(
            name=_required_str(section, "name", where, backend),
            ssd=_required_str(section, "ssd", where, backend),
            disk=_required_str(section, "disk", where, backend),
            size=str(section.get("size", "") or ""),
            block_size=str(section.get("block_size", "4k") or "4k"),
            sysctls=_sysctls(section.get("sysctls", {}), where),
        )
        for dev in (flashcache.ssd, flashcache.disk):
            if "." in os.path.basename(dev):
                raise CarbonscaleError(
                    f"{where}: flashcache device {dev!r} has a '.' in its name, which the sysctl "
                    "key dev.flashcache.<ssd>+<disk> cannot hold; "
                    "use a /dev/disk/by-id name without dots"
                )
    else:
        settings = section.get("policy_settings", {})
        if not isinstance(settings, dict):
            raise CarbonscaleError(f"{where}: lvmcache.policy_settings must be an object")
        lvmcache = LvmcacheConfig(
            vg=_required_str(section, "vg", where, backend),
            lv=_required_str(section, "lv", where, backend),
            cachepool=_required_str(section, "cachepool", where, backend),
            policy=str(section.get("policy", "smq") or "smq"),
            policy_settings=settings,
        )
    report = data.get("report", {}) or {}
    return CacheConfig(
        backend=backend,
        whisper_dir=whisper_dir.rstrip("/") or "/",
        units=tuple(units),
        timeout=numbers["timeout"],
        poll_interval=numbers["poll_interval"],
        device_wait=numbers["device_wait"],
        timeout_action=timeout_action,
        flashcache=flashcache,
        lvmcache=lvmcache,
        report_prefix=str(report.get("prefix", "carbonscale.ssd_cache")),
        report_destination=str(report.get("destination", "")),
    )


def _required_str(section: dict, key: str, where: str, backend: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise CarbonscaleError(f"{where}: {backend}.{key} is required (a non-empty string)")
    return value


def _sysctls(value: object, where: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str)
        and re.fullmatch(r"[a-z_]+", k)
        and isinstance(v, int)
        and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise CarbonscaleError(f"{where}: flashcache.sysctls must map sysctl names to integers")
    return dict(value)


# --------------------------------------------------------------------------
# The host: every program run and every clock read goes through here


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def why(self) -> str:
        if self.timed_out:
            return "timed out"
        message = (self.stderr or self.stdout).strip().splitlines()
        return f"exit {self.returncode}" + (f": {message[-1]}" if message else "")


class Host:
    """Runs programs with a bounded wait. A program stuck in the kernel (a
    `dmsetup remove` writing back a huge cache) cannot be killed; on timeout
    it is sent SIGKILL and abandoned, never waited for without a bound."""

    def run(self, argv: list[str], timeout: float | None = None) -> Result:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except FileNotFoundError:
            return Result(127, "", f"{argv[0]}: command not found")
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                out, err = proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                out, err = "", ""
            return Result(-9, out or "", err or "", timed_out=True)
        return Result(proc.returncode, out, err)

    def which(self, program: str) -> str | None:
        return shutil.which(program)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def sync(self) -> None:
        os.sync()

    def holders(self, path: str) -> list[str]:
        """Processes with a file, cwd or root under `path` (why an unmount is busy)."""
        prefix = path.rstrip("/") + "/"
        found = []
        for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
            uses = []
            for link in ("cwd", "root"):
                target = _readlink(f"/proc/{pid}/{link}")
                if target and (target == path or target.startswith(prefix)):
                    uses.append(link)
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                fds = []
            if any(
                (t := _readlink(f"/proc/{pid}/fd/{fd}")) and (t == path or t.startswith(prefix))
                for fd in fds
            ):
                uses.append("open files")
            if uses:
                found.append(f"pid {pid} ({_comm(pid)}): {', '.join(uses)}")
        return found


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# --------------------------------------------------------------------------
# Backends


class Backend:
    """One cache device. Subclasses run the backend's own programs."""

    def __init__(self, config: CacheConfig, host: Host) -> None:
        self.config = config
        self.host = host

    kind = ""

    def describe(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def state(self) -> CacheState:  # pragma: no cover - overridden
        raise NotImplementedError

    def device_paths(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def check(self) -> list[str]:
        """What is missing for this backend to work here (empty: all there)."""
        problems = [
            f"{program} is not installed (not in PATH)"
            for program in PROGRAMS[self.kind]
            if not self.host.which(program)
        ]
        if self.host.which("dmsetup"):
            target, module = KERNEL_TARGETS[self.kind]
            if target not in self._targets():
                if self.host.which("modprobe"):
                    self.host.run(["modprobe", module], timeout=30)
                if target not in self._targets():
                    problems.append(
                        f"the kernel has no device-mapper target '{target}' (module {module} "
                        "not loaded and `modprobe` could not load it)"
                    )
        return problems

    def _targets(self) -> set[str]:
        result = self.host.run(["dmsetup", "targets"], timeout=30)
        return parse_dmsetup_targets(result.stdout) if result.ok else set()

    def start(self, create: bool) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def begin_flush(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def remove(self, timeout: float) -> Result:  # pragma: no cover - overridden
        raise NotImplementedError

    def on_timeout(self, log: Callable[[str], None], dirty: CacheState) -> bool:
        """After the flush timed out: make the halt as safe as possible. True
        when the cache device is gone afterwards."""
        log(
            f"the cache stays attached with {dirty.describe()}: "
            "they are written back after the next boot"
        )
        return False

    def _must(self, argv: list[str], timeout: float = 120) -> Result:
        result = self.host.run(argv, timeout=timeout)
        if not result.ok:
            raise CarbonscaleError(f"`{shlex.join(argv)}` failed ({result.why()})")
        return result


class Flashcache(Backend):
    kind = "flashcache"

    @property
    def fc(self) -> FlashcacheConfig:
        assert self.config.flashcache is not None
        return self.config.flashcache

    def describe(self) -> str:
        return f"flashcache {self.fc.name} (ssd {self.fc.ssd}, disk {self.fc.disk})"

    def device_paths(self) -> list[str]:
        return [self.fc.ssd, self.fc.disk]

    def present(self) -> bool:
        return self.host.run(["dmsetup", "info", self.fc.name], timeout=30).ok

    def state(self) -> CacheState:
        if not self.present():
            return CacheState(present=False)
        table = self._must(["dmsetup", "table", self.fc.name], timeout=30)
        state = parse_flashcache_table(table.stdout)
        status = self.host.run(["dmsetup", "status", self.fc.name], timeout=30)
        if status.ok:
            counters = parse_flashcache_status(status.stdout)
            reported = {k: counters[k] for k in FLASHCACHE_REPORTED_COUNTERS if k in counters}
            state = replace(state, counters=reported)
        return state

    def start(self, create: bool) -> list[str]:
        changes = []
        if not self.present():
            loaded = self.host.run(["flashcache_load", self.fc.ssd, self.fc.name], timeout=600)
            if loaded.ok:
                changes.append(f"loaded {self.describe()} with flashcache_load")
            elif not create:
                raise CarbonscaleError(
                    f"flashcache_load {self.fc.ssd} {self.fc.name} failed ({loaded.why()}); "
                    "the whisper filesystem must not be mounted from the bare disk "
                    "while the SSD may hold dirty blocks"
                )
            else:
                argv = ["flashcache_create", "-p", "back"]
                if self.fc.size:
                    argv += ["-s", self.fc.size]
                if self.fc.block_size:
                    argv += ["-b", self.fc.block_size]
                # Never -f: without it flashcache_create refuses an SSD that
                # already holds a cache, so dirty blocks are never wiped.
                self._must([*argv, self.fc.name, self.fc.ssd, self.fc.disk], timeout=600)
                changes.append(f"created {self.describe()} (write-back)")
        for name, value in sorted(self.fc.sysctls.items()):
            key = self.fc.sysctl_key(name)
            current = self.host.run(["sysctl", "-n", key], timeout=30)
            if current.ok and current.stdout.strip() == str(value):
                continue
            self._must(["sysctl", "-w", f"{key}={value}"], timeout=30)
            changes.append(f"set {key}={value}")
        return changes

    def begin_flush(self) -> None:
        # fast_remove=0: `dmsetup remove` writes every dirty block back;
        # do_sync=1 starts that cleaning now, so the wait can be watched and bounded.
        self._must(["sysctl", "-w", f"{self.fc.sysctl_key('fast_remove')}=0"], timeout=30)
        self._must(["sysctl", "-w", f"{self.fc.sysctl_key('do_sync')}=1"], timeout=30)

    def remove(self, timeout: float) -> Result:
        return self.host.run(["dmsetup", "remove", self.fc.name], timeout=timeout)

    def on_timeout(self, log: Callable[[str], None], dirty: CacheState) -> bool:
        if self.config.timeout_action != "fast_remove":
            return super().on_timeout(log, dirty)
        # A write-back flashcache still present at halt is what panicked
        # kernels. fast_remove=1 detaches it without cleaning: the dirty blocks
        # persist on the SSD and flashcache_load brings them back at boot.
        log(
            f"removing {self.fc.name} with fast_remove=1: "
            f"the {dirty.dirty_blocks} dirty blocks stay on {self.fc.ssd}"
            " and flashcache_load restores them at boot"
        )
        set_fast = self.host.run(
            ["sysctl", "-w", f"{self.fc.sysctl_key('fast_remove')}=1"], timeout=30
        )
        if not set_fast.ok:
            log(f"ERROR: cannot set fast_remove=1 ({set_fast.why()}); the cache stays attached")
            return False
        removed = self.remove(timeout=60)
        if not removed.ok:
            log(
                f"ERROR: fast remove of {self.fc.name} failed ({removed.why()}); "
                "the cache stays attached"
            )
            return False
        log(f"removed {self.fc.name} (fast remove)")
        return True


class Lvmcache(Backend):
    kind = "lvmcache"

    @property
    def lvm(self) -> LvmcacheConfig:
        assert self.config.lvmcache is not None
        return self.config.lvmcache

    def describe(self) -> str:
        return f"lvmcache {self.lvm.origin} (cache pool {self.lvm.vg}/{self.lvm.cachepool})"

    def device_paths(self) -> list[str]:
        return [f"/dev/{self.lvm.vg}/{self.lvm.lv}"]

    def _row(self) -> dict[str, str]:
        result = self._must(
            [
                "lvs",
                "--noheadings",
                "--nameprefixes",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                ",".join(LVS_FIELDS),
                self.lvm.origin,
            ],
            timeout=60,
        )
        rows = parse_lvs_nameprefixes(result.stdout)
        if len(rows) != 1:
            raise CarbonscaleError(f"lvs {self.lvm.origin} returned {len(rows)} rows, expected 1")
        return rows[0]

    def state(self) -> CacheState:
        return lvmcache_state(self._row())

    def _settings_args(self) -> list[str]:
        if not self.lvm.policy_settings:
            return []
        text = " ".join(f"{k}={v}" for k, v in sorted(self.lvm.policy_settings.items()))
        return ["--cachesettings", text]

    def start(self, create: bool) -> list[str]:
        changes = []
        state = self.state()
        if not state.present:
            if not create:
                raise CarbonscaleError(
                    f"{self.lvm.origin} has no cache attached; run the ssd_cache role "
                    "(or `carbonscale cache start --create`) to attach it"
                )
            self._must(
                [
                    "lvconvert",
                    "-y",
                    "--type",
                    "cache",
                    "--cachepool",
                    f"{self.lvm.vg}/{self.lvm.cachepool}",
                    "--cachemode",
                    "writeback",
                    "--cachepolicy",
                    self.lvm.policy,
                    *self._settings_args(),
                    self.lvm.origin,
                ],
                timeout=600,
            )
            changes.append(
                f"attached {self.describe()} in writeback mode, policy {self.lvm.policy}"
            )
        elif state.policy != self.lvm.policy:
            # A halt that timed out leaves the cleaner policy in place.
            self._must(
                [
                    "lvchange",
                    "--cachepolicy",
                    self.lvm.policy,
                    *self._settings_args(),
                    self.lvm.origin,
                ],
                timeout=120,
            )
            changes.append(
                f"set cache policy {self.lvm.policy} on {self.lvm.origin} (was {state.policy})"
            )
        return changes

    def begin_flush(self) -> None:
        # The cleaner policy writes every dirty block back and promotes nothing.
        self._must(["lvchange", "--cachepolicy", "cleaner", self.lvm.origin], timeout=120)

    def remove(self, timeout: float) -> Result:
        # --splitcache detaches the (now clean) cache pool and keeps it; the
        # next boot's `carbonscale cache start` attaches it again.
        return self.host.run(["lvconvert", "-y", "--splitcache", self.lvm.origin], timeout=timeout)


def backend_for(config: CacheConfig, host: Host | None = None) -> Backend:
    host = host or Host()
    return Flashcache(config, host) if config.backend == "flashcache" else Lvmcache(config, host)


# --------------------------------------------------------------------------
# Operations


def check(backend: Backend) -> None:
    problems = backend.check()
    if problems:
        hint = (
            "flashcache is out of tree: build and install its kernel module (dkms) and utilities "
            "(flashcache_create, flashcache_load) from "
            "https://github.com/facebookarchive/flashcache, "
            "or use ssd_cache_backend: lvmcache"
            if backend.kind == "flashcache"
            else "install lvm2 and load dm-cache (a mainline kernel module)"
        )
        raise CarbonscaleError(
            f"{backend.kind} cannot work on this host: {'; '.join(problems)}. {hint}"
        )


def start(backend: Backend, create: bool = False) -> list[str]:
    """Bring the cache up before the whisper filesystem is mounted: wait for
    its devices, load (or with `create`, create/attach) it, apply its
    settings. Returns what changed (empty: it was already up as configured)."""
    deadline = backend.host.monotonic() + backend.config.device_wait
    missing = [p for p in backend.device_paths() if not backend.host.exists(p)]
    while missing and backend.host.monotonic() < deadline:
        backend.host.sleep(1)
        missing = [p for p in backend.device_paths() if not backend.host.exists(p)]
    if missing:
        raise CarbonscaleError(
            f"{backend.describe()}: device(s) {', '.join(missing)} did not appear within "
            f"{backend.config.device_wait:g} s"
        )
    return backend.start(create)


def halt(backend: Backend, log: Callable[[str], None]) -> int:
    """The safe-halt sequence; returns 0 when the cache was flushed and removed,
    1 when it was kept (busy filesystem, timeout, a failing command)."""
    config, host = backend.config, backend.host
    started = host.monotonic()
    deadline = started + config.timeout

    def left() -> float:
        return max(1.0, deadline - host.monotonic())

    def elapsed() -> float:
        return host.monotonic() - started

    log(
        f"safe halt of {backend.describe()} under {config.whisper_dir}: "
        f"timeout {config.timeout:g} s"
    )

    # 1. Whatever writes or reads whisper must be gone (at halt systemd has
    # stopped them already: this unit is ordered before them).
    active = [
        u for u in config.units if host.run(["systemctl", "is-active", "--quiet", u], timeout=30).ok
    ]
    if active:
        log(f"stopping {' '.join(active)}")
        stopped = host.run(["systemctl", "stop", *active], timeout=left())
        if not stopped.ok:
            log(f"ERROR: systemctl stop {' '.join(active)} failed ({stopped.why()})")
    still = [
        u for u in config.units if host.run(["systemctl", "is-active", "--quiet", u], timeout=30).ok
    ]
    if still:
        log(f"ERROR: still running: {' '.join(still)}")
    else:
        log(f"carbon instances stopped: {' '.join(config.units) or '(none configured)'}")

    # 2. sync, 3. unmount; a busy filesystem keeps the cache: flushing or
    # removing it under a mounted filesystem is how data gets lost.
    host.sync()
    log("sync done")
    if host.run(["mountpoint", "-q", config.whisper_dir], timeout=30).ok:
        unmounted = host.run(["umount", config.whisper_dir], timeout=left())
        if not unmounted.ok:
            holders = host.holders(config.whisper_dir)
            log(
                f"ERROR: cannot unmount {config.whisper_dir} ({unmounted.why()})"
                + (f"; held by {'; '.join(holders)}" if holders else "")
                + f". KEEPING the cache: {backend.describe()} is not flushed and not removed"
            )
            return 1
        log(f"unmounted {config.whisper_dir}")
    else:
        log(f"{config.whisper_dir} is not mounted")

    before = backend.state()
    if not before.present:
        log(
            f"dirty blocks before flush: none, {backend.describe()} is not present; "
            "nothing to flush"
        )
        log(f"safe halt done in {elapsed():.1f} s")
        return 0
    log(f"dirty blocks before flush: {before.describe()}")

    # 4. flush, watched and bounded.
    try:
        backend.begin_flush()
    except CarbonscaleError as exc:
        log(f"ERROR: cannot start the flush: {exc}")
        return _gave_up(backend, log, before, before, elapsed())
    log("flush started")
    state = backend.state()
    if state.present and state.dirty_blocks is None:
        log(f"ERROR: {backend.describe()} reports no dirty-block count")
        return _gave_up(backend, log, before, state, elapsed())
    while state.dirty_blocks and host.monotonic() < deadline:
        host.sleep(min(config.poll_interval, max(0.0, deadline - host.monotonic())))
        state = backend.state()
        log(f"flushing: {state.describe()} left after {elapsed():.1f} s")
    if state.dirty_blocks:
        log(
            f"TIMEOUT: {state.describe()} left after {elapsed():.1f} s "
            f"(limit {config.timeout:g} s, {before.dirty_blocks} before)"
        )
        return _gave_up(backend, log, before, state, elapsed())
    log(f"flushed: 0 dirty blocks after {elapsed():.1f} s")

    # 5. remove.
    removed = backend.remove(timeout=left())
    if not removed.ok:
        log(f"ERROR: removing {backend.describe()} failed ({removed.why()})")
        return _gave_up(backend, log, before, backend.state(), elapsed())
    after = backend.state()
    log(f"removed {backend.describe()}")
    log(
        f"safe halt done in {elapsed():.1f} s: dirty blocks before {before.dirty_blocks}, "
        f"after {after.dirty_blocks if after.present else 0}"
    )
    return 0


def _gave_up(backend: Backend, log, before: CacheState, now: CacheState, seconds: float) -> int:
    gone = backend.on_timeout(log, now) if now.present else True
    log(
        f"safe halt INCOMPLETE after {seconds:.1f} s: dirty blocks before {before.dirty_blocks}, "
        f"left {now.dirty_blocks if now.present else 0}; cache "
        f"{'removed' if gone else 'still attached'}"
    )
    return 1


# --------------------------------------------------------------------------
# Reporting dirty blocks to carbon


def metric_points(prefix: str, state: CacheState, timestamp: int) -> list[Point]:
    """The points one report sends: `<prefix>.present` always, the block counts
    and flashcache's error counters while the device exists."""
    values: list[tuple[str, float | int]] = [("present", int(state.present))]
    if state.present:
        for name in ("dirty_blocks", "dirty_percent", "used_blocks", "total_blocks"):
            value = getattr(state, name)
            if value is not None:
                values.append((name, value))
        values.extend(sorted(state.counters.items()))
    return [Point(f"{prefix}.{name}", value, timestamp) for name, value in values]


def report(points: list[Point], destination: str, timeout: float = 10.0) -> int:
    """Send the points to carbon's line receiver (HOST:PORT)."""
    try:
        address = parse_address(destination)
    except CarbonscaleError:
        raise CarbonscaleError(
            "the report destination must be HOST:PORT of a carbon line receiver, "
            f"got {destination!r}"
        ) from None
    return send(points, address, "line", timeout=timeout)

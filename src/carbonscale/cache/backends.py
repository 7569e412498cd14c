"""The two cache backends, flashcache and lvmcache, over the programs of the host."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import replace

from carbonscale import CarbonscaleError
from carbonscale.cache.config import CacheConfig, FlashcacheConfig, LvmcacheConfig
from carbonscale.cache.host import Host, Result
from carbonscale.cache.parsers import (
    CacheState,
    lvmcache_state,
    parse_dmsetup_targets,
    parse_flashcache_status,
    parse_flashcache_table,
    parse_lvs_nameprefixes,
)

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

    def _pool_exists(self) -> bool:
        pool = f"{self.lvm.vg}/{self.lvm.cachepool}"
        return self.host.run(["lvs", "--noheadings", "-o", "lv_name", pool], timeout=60).ok

    def _settings_args(self) -> list[str]:
        if not self.lvm.policy_settings:
            return []
        text = " ".join(f"{k}={v}" for k, v in sorted(self.lvm.policy_settings.items()))
        return ["--cachesettings", text]

    def start(self, create: bool) -> list[str]:
        changes = []
        state = self.state()
        if not state.present:
            # The halt's --splitcache leaves the pool clean and unused: the
            # boot attaches it again (nothing on it to lose). A pool that is
            # not there is created only by converge.
            if not create and not self._pool_exists():
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

"""The cache configuration (/etc/carbonscale/ssd-cache.json, written by the ssd_cache role)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from carbonscale import CarbonscaleError

BACKENDS = ("flashcache", "lvmcache")

TIMEOUT_ACTIONS = ("fast_remove", "keep")


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

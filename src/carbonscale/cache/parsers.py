"""Parsers of the cache programs' real output: dmsetup table and status, lvs, dmsetup targets."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from carbonscale import CarbonscaleError

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

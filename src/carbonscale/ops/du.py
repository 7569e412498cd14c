"""Whisper bytes per host (and per carbon-cache instance), free space, growth and
the date the whisper filesystem fills up at that rate.

Disk bytes are counted as `du -s -B1` counts them (allocated blocks of every file
and directory, each inode once), so the number can be checked against `du`. The
growth comes from earlier runs: each run appends (time, disk bytes) to a small
history file on the host, and the rate is taken against the oldest sample inside
the window (whisper files are preallocated, so bytes grow as files are created).
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from collections.abc import Mapping

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.atomicfile import write_atomically
from carbonscale.ops.tree import check_root, metric_names, tree_files
from carbonscale.ring import Ring

HISTORY_SAMPLES = 2000


def disk_usage(root: str) -> dict:
    """Allocated bytes under root like `du -s -B1` (hard links once), and the whisper
    files' apparent bytes and count."""
    check_root(root)
    seen: set[tuple[int, int]] = set()
    top = os.lstat(root)
    disk = top.st_blocks * 512
    whisper_bytes = files = 0
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            disk += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(info.st_mode) and entry.name.endswith(".wsp"):
                whisper_bytes += info.st_size
                files += 1
    return {"disk_bytes": disk, "whisper_bytes": whisper_bytes, "files": files}


def per_instance(root: str, ring: Ring, host: str) -> dict[str, dict]:
    """Whisper bytes and files per ring member of this host (by primary owner); files
    whose primary owner is elsewhere count under "not owned"."""
    paths, sizes = tree_files(root)
    names = metric_names(paths)
    found: dict[str, dict] = {}
    if not names:
        return found
    primary = ring.locate_batch(names)[:, 0]
    for index, member in enumerate(ring.members):
        if member.host != host:
            continue
        mine = primary == index
        found[member.relay_syntax] = {
            "whisper_bytes": int(sizes[mine].sum()),
            "files": int(mine.sum()),
        }
    elsewhere = np.array([ring.members[i].host != host for i in primary.tolist()], dtype=bool)
    if elsewhere.any():
        found["not owned"] = {
            "whisper_bytes": int(sizes[elsewhere].sum()),
            "files": int(elsewhere.sum()),
        }
    return found


def _read_history(path: str) -> list[list[float]]:
    try:
        with open(path, encoding="utf-8") as handle:
            samples = json.load(handle)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise CarbonscaleError(f"cannot read du history {path}: {exc}") from exc
    if not isinstance(samples, list):
        raise CarbonscaleError(f"du history {path} is not a list of [time, bytes]")
    return samples


def record_and_rate(path: str, now: float, used: int, window: float) -> float | None:
    """Append (now, used) to the history file; bytes/s against the oldest sample of
    the window (None without one)."""
    samples = [s for s in _read_history(path) if s[0] < now]
    earlier = [s for s in samples if s[0] >= now - window]
    rate = (used - earlier[0][1]) / (now - earlier[0][0]) if earlier else None
    samples = [*samples, [now, used]][-HISTORY_SAMPLES:]
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        write_atomically(path, json.dumps(samples), 0o644)
    except OSError as exc:
        raise CarbonscaleError(f"cannot write du history {path}: {exc.strerror}") from exc
    return rate


def du_here(
    root: str,
    ring: Ring | None = None,
    host: str | None = None,
    history: str | None = None,
    window: float = 86400.0,
    now: float | None = None,
) -> dict:
    now = time.time() if now is None else now
    report = disk_usage(root)
    info = os.statvfs(root)
    report["free_bytes"] = info.f_bavail * info.f_frsize
    report["growth_bytes_per_s"] = (
        record_and_rate(history, now, report["disk_bytes"], window) if history else None
    )
    rate = report["growth_bytes_per_s"]
    report["full_at"] = now + report["free_bytes"] / rate if rate and rate > 0 else None
    if ring is not None and host is not None:
        report["instances"] = per_instance(root, ring, host)
    return report


def du_table(reports: Mapping[str, dict]) -> str:
    """Hosts sorted by the date they fill up (no growth last)."""
    order = sorted(reports, key=lambda h: (reports[h].get("full_at") or math.inf, h))
    lines = [
        f"{'host':<20} {'disk bytes':>15} {'files':>10} {'free bytes':>16} "
        f"{'growth B/s':>12}  full at (UTC)"
    ]
    for host in order:
        r = reports[host]
        rate = r.get("growth_bytes_per_s")
        full = r.get("full_at")
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(full)) if full else "-"
        lines.append(
            f"{host:<20} {r['disk_bytes']:>15} {r['files']:>10} {r['free_bytes']:>16} "
            f"{'-' if rate is None else f'{rate:.1f}':>12}  {when}"
        )
        instances = r.get("instances") or {}
        sizes = {v["whisper_bytes"] for v in instances.values()}
        if len(sizes) > 1:
            for member, v in instances.items():
                lines.append(f"  {member:<30} {v['whisper_bytes']:>15} {v['files']:>10}")
    return "\n".join(lines)

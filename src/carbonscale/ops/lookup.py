"""Where metrics live: on each host, whether its file is there (size, newest point)
and whether the ring gives it to this host; across hosts, every owner's state and
every stray copy."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.migrate.plan import metric_path
from carbonscale.ops.tree import check_root
from carbonscale.ring import Ring
from carbonscale.whisper.files import read_whisper
from carbonscale.whisper.header import CorruptWhisper
from carbonscale.whisper.timelines import _point_dtype


def newest_point(path: str) -> tuple[int, float] | None:
    """(timestamp, value) of the newest point of the finest archive, None when empty."""
    data, header = read_whisper(path)
    archive = header.archives[0]
    slots = np.frombuffer(data, _point_dtype(), archive.points, archive.offset)
    if not slots["t"].any():
        return None
    newest = int(np.argmax(slots["t"]))
    return int(slots["t"][newest]), float(slots["v"][newest])


def file_state(root: str, name: str) -> dict | None:
    """The metric's file on this host: size and newest point; None when absent."""
    path = os.path.join(root, metric_path(name))
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"size": None, "newest": None, "error": f"{exc.strerror}"}
    try:
        newest = newest_point(path)
    except (OSError, CorruptWhisper) as exc:
        return {"size": size, "newest": None, "error": str(exc)}
    return {"size": size, "newest": list(newest) if newest else None}


def lookup_here(root: str, ring: Ring, host: str, names: Sequence[str]) -> dict:
    """This host's answer for each name: the owners, whether this host is one, its file."""
    check_root(root)
    if not names:
        raise CarbonscaleError("give at least one metric name")
    encoded = [n.encode() for n in names]
    rows = ring.locate_batch(encoded).tolist()
    found = {}
    for name, row in zip(names, rows, strict=True):
        owners = [ring.members[i] for i in row]
        found[name] = {
            "owners": [m.relay_syntax for m in owners],
            "owner_hosts": sorted({m.host for m in owners}),
            "owned_here": any(m.host == host for m in owners),
            "file": file_state(root, name),
        }
    return {"host": host, "metrics": found}


def merge_lookups(reports: Mapping[str, dict]) -> dict:
    """Per metric across hosts (reports by inventory host name, each from lookup_here):
    its owners, each owner host's file (or missing) and the stray copies."""
    merged: dict[str, dict] = {}
    for inventory_host, report in sorted(reports.items()):
        ring_host = report["host"]
        for name, here in report["metrics"].items():
            entry = merged.setdefault(
                name, {"owners": here["owners"], "owner_files": {}, "strays": {}}
            )
            where = f"{inventory_host} ({ring_host})"
            if here["owned_here"]:
                entry["owner_files"][where] = here["file"]
            elif here["file"] is not None:
                entry["strays"][where] = here["file"]
    for entry in merged.values():
        entry["complete"] = all(f is not None for f in entry["owner_files"].values())
    return merged


def lookup_table(merged: Mapping[str, dict]) -> str:
    lines = []
    for name, entry in merged.items():
        lines.append(f"{name}  owners: {', '.join(entry['owners'])}")
        for where, state in entry["owner_files"].items():
            lines.append(f"  owner {where}: {_describe(state)}")
        for where, state in entry["strays"].items():
            lines.append(f"  STRAY {where}: {_describe(state)}")
    return "\n".join(lines)


def _describe(state: dict | None) -> str:
    if state is None:
        return "MISSING"
    if state.get("error"):
        return f"{state['size']} bytes, unreadable: {state['error']}"
    newest = state["newest"]
    point = f"newest point {newest[1]:g} at {newest[0]}" if newest else "no points"
    return f"{state['size']} bytes, {point}"

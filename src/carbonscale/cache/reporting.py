"""Dirty blocks (and flashcache's error counters) reported to carbon."""

from __future__ import annotations

from carbonscale import sender
from carbonscale.cache.parsers import CacheState
from carbonscale.sender import Point


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
    """Send the points to carbon's line receiver (HOST:PORT); how many."""
    sender.report(points, [destination], timeout)
    return len(points)

"""Archives as timelines (numpy arrays of the window's slots), and aggregation."""

from __future__ import annotations

import functools
from collections import namedtuple

from carbonscale.whisper.header import AGGREGATION_METHODS, ArchiveInfo

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    import numpy as np


class Timeline(namedtuple("Timeline", "start step values known first_slot")):
    """An archive's window: interval `start + i * step` has `values[i]` (float64 array)
    if `known[i]` (bool array); `first_slot` is the slot of interval `start`, -1 when
    the archive is empty (no base)."""

    __slots__ = ()

    @property
    def end(self) -> int:
        """The last interval (inclusive)."""
        return self.start + (len(self.values) - 1) * self.step


@functools.cache
def _point_dtype() -> np.dtype:
    """A whisper point: big-endian uint32 timestamp, float64 value."""
    import numpy as np

    return np.dtype([("t", ">u4"), ("v", ">f8")])


_ARANGE_CACHE: dict[int, np.ndarray] = {}


def _arange(count: int) -> np.ndarray:
    import numpy as np

    found = _ARANGE_CACHE.get(count)
    if found is None:
        found = np.arange(count, dtype=np.int64)
        if len(_ARANGE_CACHE) < 64:
            _ARANGE_CACHE[count] = found
    return found


def window_start(archive: ArchiveInfo, now: int) -> int:
    """First interval of the archive's window at `now` (whisper fetch's fromInterval)."""
    return now - now % archive.step - (archive.points - 1) * archive.step


def read_timeline(data: bytes, archive: ArchiveInfo, now: int) -> Timeline:
    import numpy as np

    step, count = archive.step, archive.points
    start = window_start(archive, now)
    slots = np.frombuffer(data, _point_dtype(), count, archive.offset)
    base = int(slots["t"][0])
    if base == 0:
        return Timeline(start, step, np.zeros(count), np.zeros(count, bool), -1)
    first = ((start - base) // step) % count
    stamps = np.concatenate((slots["t"][first:], slots["t"][:first]))
    values = np.concatenate((slots["v"][first:], slots["v"][:first])).astype(np.float64)
    known = stamps == start + step * _arange(count)
    return Timeline(start, step, values, known, first)


def _grid(line: Timeline, start: int, rows: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, step // line.step) values and known flags of `line` for the intervals
    `start + r * step` (cells outside line's window are unknown)."""
    import numpy as np

    per_row = step // line.step
    total = rows * per_row
    first = (start - line.start) // line.step
    lo, hi = max(first, 0), min(first + total, len(line.values))
    if lo == first and hi == first + total:
        return (
            line.values[lo:hi].reshape(rows, per_row),
            line.known[lo:hi].reshape(rows, per_row),
        )
    values = np.zeros(total)
    known = np.zeros(total, bool)
    if lo < hi:
        values[lo - first : hi - first] = line.values[lo:hi]
        known[lo - first : hi - first] = line.known[lo:hi]
    return values.reshape(rows, per_row), known.reshape(rows, per_row)


def aggregate(
    aggregation: int, values: np.ndarray, known: np.ndarray, xff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Row aggregates of (rows, k) `values` where `known`, as whisper propagates them.

    Returns (aggregates, ok): ok where a row has a known value and
    known/k >= xff (whisper's __propagate rule); aggregates elsewhere are junk.
    """
    import numpy as np

    rows, per_row = values.shape
    counts = known.sum(axis=1)
    ok = (counts > 0) & (counts / per_row >= xff)
    method = AGGREGATION_METHODS[aggregation]
    with np.errstate(invalid="ignore", divide="ignore"):
        if method in ("average", "sum", "avg_zero"):
            # Column by column: the same additions in the same order as the C twin.
            total = np.zeros(rows)
            for column in range(per_row):
                total += np.where(known[:, column], values[:, column], 0.0)
            if method == "average":
                return total / np.maximum(counts, 1), ok
            if method == "avg_zero":
                return total / per_row, ok
            return total, ok
        if method == "last":
            last = per_row - 1 - np.argmax(known[:, ::-1], axis=1)
            return values[_arange(rows), last], ok
        if method == "max":
            return np.where(known, values, -np.inf).max(axis=1), ok
        if method == "min":
            return np.where(known, values, np.inf).min(axis=1), ok
        magnitude = np.abs(values)
        if method == "absmax":
            pick = np.argmax(np.where(known, magnitude, -1.0), axis=1)
        else:
            pick = np.argmin(np.where(known, magnitude, np.inf), axis=1)
        return values[_arange(rows), pick], ok

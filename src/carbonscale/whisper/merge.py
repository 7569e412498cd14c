"""The fill merge: the C merge (`_whisper.c`) when built, else its numpy twin
`plan_fill_numpy`; both plan the same writes, byte for byte.
"""

from __future__ import annotations

import itertools
import os
from collections import namedtuple
from collections.abc import Iterable, Iterator

from carbonscale.whisper.header import POINT_SIZE, ArchiveInfo, Header
from carbonscale.whisper.timelines import (
    Timeline,
    _grid,
    _point_dtype,
    aggregate,
    read_timeline,
    window_start,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    import numpy as np

try:  # the merge in C (src/carbonscale/_whisper.c); plan_fill_numpy is its twin
    from carbonscale import _whisper
except ImportError:  # pragma: no cover - depends on the build
    _whisper = None


class ArchivePatch(namedtuple("ArchivePatch", "archive slots points whole")):
    """Points to write into one DST archive: `slots` (sorted array) and their (t, v)
    `points` (POINT dtype, big-endian, in slot order); `whole` when the archive was
    empty (no base) and not all zeros: write all of it (zeros elsewhere)."""

    __slots__ = ()


Writes = list[tuple[int, bytes]]


def fill_data(
    src: bytes, src_header: Header, dst: bytes, dst_header: Header, now: int, fd: int | None
) -> int:
    """Fill DST (`dst` are its bytes, `fd` the file open for writing) from SRC; the
    points filled. With fd None, count them and write nothing (a dry run).

    Both must be whole files whose headers parse_header accepted. The C merge
    when built, else its numpy twin (the same writes, byte for byte)."""
    if _whisper is not None:
        return _whisper.fill(src, dst, now, -1 if fd is None else fd)
    points, writes = plan_fill_numpy(src, src_header, dst, dst_header, now)
    if fd is not None:
        apply_writes(fd, writes)
    return points


def plan_fill_numpy(
    src: bytes, src_header: Header, dst: bytes, dst_header: Header, now: int
) -> tuple[int, Writes]:
    """The numpy twin of the C merge: the rules of the module docstring."""
    import numpy as np

    aggregation, xff = dst_header.aggregation, dst_header.xff
    finest_start = window_start(dst_header.archives[0], now)
    src_lines: dict[int, Timeline] = {}

    def src_line(index: int) -> Timeline:
        if index not in src_lines:
            src_lines[index] = read_timeline(src, src_header.archives[index], now)
        return src_lines[index]

    patches = []
    previous: Timeline | None = None
    for archive in dst_header.archives:
        line = read_timeline(dst, archive, now)
        step, count = archive.step, archive.points
        need = ~line.known
        filled = np.zeros(count, bool)
        values = line.values
        state = (values, need, filled)

        # 1. Recompute coarse intervals inside the finest window from merged finer data.
        if previous is not None and step % previous.step == 0:
            lo = max(0, -((line.start - finest_start) // step))
            if lo < count and need[lo:].any():
                grid_values, grid_known = _grid(previous, line.start + lo * step, count - lo, step)
                _take(state, lo, count, *aggregate(aggregation, grid_values, grid_known, xff))
        # 2. SRC at the same precision; 3. finer SRC aggregated, finest first.
        by_preference = sorted(
            range(len(src_header.archives)),
            key=lambda i: (src_header.archives[i].step != step, src_header.archives[i].step),
        )
        for index in by_preference:
            src_archive = src_header.archives[index]
            if src_archive.step > step or step % src_archive.step or not need.any():
                continue
            other = src_line(index)
            if src_archive.step == step:
                shift = (line.start - other.start) // step
                lo, hi = max(0, -shift), min(count, len(other.values) - shift)
                if lo < hi:
                    shifted = slice(lo + shift, hi + shift)
                    _take(state, lo, hi, other.values[shifted], other.known[shifted])
                continue
            # rows of DST intervals that overlap the finer SRC window
            lo = max(0, (other.start - line.start) // step)
            hi = min(count, (other.end - line.start) // step + 1)
            if lo < hi and need[lo:hi].any():
                grid_values, grid_known = _grid(other, line.start + lo * step, hi - lo, step)
                _take(state, lo, hi, *aggregate(aggregation, grid_values, grid_known, xff))
        if filled.any():
            patches.append(_patch(archive, line, values, filled, dst))
        previous = Timeline(line.start, step, values, line.known | filled, line.first_slot)
    return sum(len(p.slots) for p in patches), patch_writes(patches, dst)


def _take(
    state: tuple[np.ndarray, np.ndarray, np.ndarray],
    lo: int,
    hi: int,
    new_values: np.ndarray,
    usable: np.ndarray,
) -> None:
    """Fill rows lo:hi that are still needed and `usable` with `new_values`."""
    values, need, filled = state
    chosen = need[lo:hi] & usable
    values[lo:hi][chosen] = new_values[chosen]
    filled[lo:hi] |= chosen
    need[lo:hi] &= ~chosen


def _patch(
    archive: ArchiveInfo, line: Timeline, values: np.ndarray, filled: np.ndarray, dst: bytes
) -> ArchivePatch:
    import numpy as np

    rows = np.flatnonzero(filled)
    empty = line.first_slot < 0
    # An empty archive gets its base (slot 0) at the first filled interval, as
    # whisper's first write would; otherwise slots follow the existing base. An
    # empty archive that is not all zeros is written whole (zeros elsewhere): the
    # new layout must not pick up stale slots whose timestamps happen to match it.
    whole = bool(empty and np.frombuffer(dst, np.uint8, archive.size, archive.offset).any())
    first_slot = -int(rows[0]) if empty else line.first_slot
    slots = (rows + first_slot) % archive.points
    order = np.argsort(slots, kind="stable")
    points = np.empty(len(rows), _point_dtype())
    points["t"] = (line.start + rows * line.step)[order]
    points["v"] = values[rows][order]
    return ArchivePatch(archive, slots[order], points, whole)


def _runs(slots: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first index, end index) of runs of consecutive slots in sorted `slots`."""
    import numpy as np

    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    edges = [0, *breaks.tolist(), len(slots)]
    return itertools.pairwise(edges)


# Runs of filled slots closer than this are written as one, the slots between
# them rewritten with the bytes just read (under the lock, so unchanged): a 10 s
# archive filled from 1 min data would otherwise take a write per point.
RUN_GAP = 1024


def patch_writes(patches: Iterable[ArchivePatch], dst: bytes) -> Writes:
    """Patches as writes: a whole archive when `whole`, else runs of slots (runs
    less than RUN_GAP bytes apart joined)."""
    import numpy as np

    image = bytearray(dst)
    runs: list[list[int]] = []

    def add(offset: int, data: bytes) -> None:
        image[offset : offset + len(data)] = data
        if runs and 0 <= offset - (runs[-1][0] + runs[-1][1]) <= RUN_GAP:
            runs[-1][1] = offset + len(data) - runs[-1][0]
        else:
            runs.append([offset, len(data)])

    for patch in patches:
        archive = patch.archive
        if patch.whole:
            block = np.zeros(archive.points, _point_dtype())
            block[patch.slots] = patch.points
            add(archive.offset, block.tobytes())
            continue
        for lo, hi in _runs(patch.slots):
            add(archive.offset + int(patch.slots[lo]) * POINT_SIZE, patch.points[lo:hi].tobytes())
    return [(offset, bytes(image[offset : offset + length])) for offset, length in runs]


def apply_writes(fd: int, writes: Writes) -> None:
    for offset, data in writes:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

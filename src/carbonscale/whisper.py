"""Whisper files read and written directly: fill (merge history) and verify.

A migration ends in a fill: the new owner of a metric has been writing a file
since the switch, the old owner holds its history. `fill_file` merges SRC's
history into DST without ever changing a point DST already has; `verify_file`
checks that every SRC point within DST's retention is present in DST.

Both files are mapped whole and merged by the C merge (`_whisper.c`; its
numpy twin `plan_fill_numpy` handles the archives as arrays of big-endian
`>Ld` points, and the tests hold both to the same writes); only the filled
runs of slots are written back. No per-point whisper calls: that is where
carbonate's fill spends its 80 ms a file.

The fill rules, for every DST archive, finest first (`now` fixes the windows):

- An archive's window is the `points` intervals ending at `now` aligned to its
  step (exactly what whisper's fetch returns for it). A slot is a point when its
  stored timestamp is the interval the slot stands for; anything else (0, a
  stale or foreign timestamp, an archive whose first slot is 0) is empty.
- A point present in DST is never changed; 0.0 and NaN are values like any
  other (carbonate takes 0.0 for a gap and overwrites it).
- An empty DST slot is filled, in this order of preference:
  1. coarser archives only, and only for intervals that start inside the
     finest DST archive's window: the aggregate recomputed from the merged
     (already filled) next finer DST archive, with DST's method and
     xFilesFactor -- what carbon itself would have propagated had it received
     the merged points. This fixes the interval that straddles the switch, where
     SRC's aggregate covers only SRC's part of it;
  2. SRC's point at the same precision (an SRC archive with the same step);
  3. the aggregate of a finer SRC archive whose step divides DST's, finest
     first, with DST's method and xFilesFactor (known/total >= xFilesFactor).
  Outside the finest window, coarser archives thus get SRC's points (2, then 3).
- Coarse data is never spread into finer archives, and an SRC archive whose
  step does not divide DST's step is never used for it (there is no honest
  way to split or regroup its intervals).
- A missing DST becomes an exact copy of SRC, written to a temporary file and
  linked into place (never over a DST that appeared meanwhile: then it is
  filled). A corrupt SRC is skipped; a corrupt DST is skipped unless
  `move_corrupt`, which renames it to `<DST>.corrupt-<unix time>` and copies.
- DST is changed only under flock(LOCK_EX), the lock carbon takes with
  WHISPER_LOCK_WRITES, and the lock is released on every path (the file
  descriptor is closed in `finally`). SRC is read under flock(LOCK_SH), held
  until DST is written; a SRC and DST that are one file (hard links) are
  skipped, since the second lock would wait for the first forever.
- An empty DST archive (no base) gets its base at the first filled interval,
  as whisper's first write would; one that holds stale bytes is written whole,
  zeros around the new points, so that no stale slot reads as a point.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import mmap
import os
import struct
import time
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator

from carbonscale import CarbonscaleError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    import numpy as np

try:  # the merge in C (src/carbonscale/_whisper.c); plan_fill_numpy is its twin
    from carbonscale import _whisper
except ImportError:  # pragma: no cover - depends on the build
    _whisper = None

AGGREGATION_METHODS = {
    1: "average",
    2: "sum",
    3: "last",
    4: "max",
    5: "min",
    6: "avg_zero",
    7: "absmax",
    8: "absmin",
}
HEADER = struct.Struct(">2LfL")
ARCHIVE_INFO = struct.Struct(">3L")
POINT_SIZE = 12
# No sane whisper file has more archives; a larger count is a corrupt header
# (and would make us read megabytes of "archive infos").
MAX_ARCHIVES = 1024
# Map every page at once (Linux): faulting them in one by one costs more than the read.
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class CorruptWhisper(CarbonscaleError):
    """A file that is not a whole, consistent whisper file."""


# Plain named tuples and classes, not dataclasses: `import dataclasses` (and the
# inspect it pulls in) alone took a fifth of a small fill's start-up.
class ArchiveInfo(namedtuple("ArchiveInfo", "offset step points")):
    __slots__ = ()

    @property
    def retention(self) -> int:
        return self.step * self.points

    @property
    def size(self) -> int:
        return self.points * POINT_SIZE


class Header(namedtuple("Header", "aggregation max_retention xff archives")):
    """aggregation: int, max_retention: int, xff: float, archives: tuple[ArchiveInfo]."""

    __slots__ = ()

    @property
    def method(self) -> str:
        return AGGREGATION_METHODS[self.aggregation]

    @property
    def file_size(self) -> int:
        last = self.archives[-1]
        return last.offset + last.size

    def schema(self) -> str:
        """`60:10080,300:8640 average 0.5`: steps and points, method, xFilesFactor."""
        archives = ",".join(f"{a.step}:{a.points}" for a in self.archives)
        return f"{archives} {self.method} {self.xff:g}"


def parse_header(data: bytes, file_size: int | None = None) -> Header:
    """The header of whisper bytes `data`; CorruptWhisper if the file is not whole.

    `file_size` (default len(data)) must be exactly what the header describes:
    a truncated file, or one with trailing bytes, is corrupt.
    """
    size = len(data) if file_size is None else file_size
    if len(data) < HEADER.size:
        raise CorruptWhisper(f"truncated header ({len(data)} bytes)")
    aggregation, max_retention, xff, count = HEADER.unpack_from(data)
    if aggregation not in AGGREGATION_METHODS:
        raise CorruptWhisper(f"unknown aggregation type {aggregation}")
    if not 0.0 <= xff <= 1.0:  # NaN fails too
        raise CorruptWhisper(f"xFilesFactor {xff} is not within [0, 1]")
    if not 1 <= count <= MAX_ARCHIVES:
        raise CorruptWhisper(f"archive count {count} is not within [1, {MAX_ARCHIVES}]")
    offset = HEADER.size + count * ARCHIVE_INFO.size
    if len(data) < offset:
        raise CorruptWhisper(f"truncated archive list ({len(data)} of {offset} bytes)")
    archives = []
    for index in range(count):
        archive = ArchiveInfo(*ARCHIVE_INFO.unpack_from(data, HEADER.size + index * 12))
        if archive.offset != offset:
            raise CorruptWhisper(f"archive {index} starts at {archive.offset}, not {offset}")
        if archive.step < 1 or archive.points < 1:
            raise CorruptWhisper(f"archive {index} has {archive.points} points of {archive.step}s")
        if archives and archive.step <= archives[-1].step:
            raise CorruptWhisper(f"archive {index} is not coarser than archive {index - 1}")
        archives.append(archive)
        offset += archive.size
    if size != offset:
        what = "truncated" if size < offset else "trailing bytes"
        raise CorruptWhisper(f"{what}: {size} bytes, the header describes {offset}")
    return Header(aggregation, max_retention, xff, tuple(archives))


# ----- archives as timelines --------------------------------------------------


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


# ----- the merge -------------------------------------------------------------


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


# ----- files -----------------------------------------------------------------

FILLED, UNCHANGED, COPIED, REPLACED, SKIPPED = (
    "filled",
    "unchanged",
    "copied",
    "replaced",
    "skipped",
)


class FillResult(namedtuple("FillResult", "path status points reason", defaults=(0, ""))):
    __slots__ = ()


def _read_locked(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def read_whisper(path: str) -> tuple[bytes, Header]:
    """A whole whisper file under flock(LOCK_SH), and its header (CorruptWhisper if bad)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        data = _read_locked(fd)
    finally:
        os.close(fd)  # closing releases the lock
    return data, parse_header(data)


def _copy_into_place(data: bytes, mode: int, dst: str) -> bool:
    """Write `data` as `dst` atomically; False (and nothing written) if `dst` exists."""
    import tempfile  # here: its imports (shutil, random) cost start-up time on every fill

    parent = os.path.dirname(dst) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dst) + ".", dir=parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode & 0o7777)
        finally:
            os.close(fd)
        try:
            os.link(tmp, dst)  # unlike rename, never replaces a file carbon just created
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def _map_locked(fd: int) -> mmap.mmap | bytes:
    """The file's bytes, mapped: a fill touches nearly every page of both files, and
    mapping the page cache is four times faster than copying it out with read().
    Only carbon writes whisper files, in place and never truncating; the caller
    holds the flock for as long as the mapping is read."""
    size = os.fstat(fd).st_size
    if size == 0:
        return b""  # mmap refuses empty files; parse_header reports it as corrupt
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ)


def _unmap(data: mmap.mmap | bytes) -> None:
    if isinstance(data, mmap.mmap):
        # BufferError: a numpy view (the twin's) still holds it; it is freed with the view
        with contextlib.suppress(BufferError):
            data.close()


def fill_file(
    src: str,
    dst: str,
    now: int | None = None,
    dry_run: bool = False,
    move_corrupt: bool = False,
    name: str | None = None,
) -> FillResult:
    """Fill DST from SRC (see the module docstring); never raises for a bad file.

    SRC is read under flock(LOCK_SH), held until DST is written: the merge reads
    SRC's mapped pages, so they must not change meanwhile. (Two fills running at
    once in opposite directions over the same two files would each hold the
    lock the other waits for; a migration fills from a staging copy, never
    back.)"""
    name = name or dst
    now = int(time.time()) if now is None else int(now)
    try:
        fd = os.open(src, os.O_RDONLY)
    except OSError as exc:
        return FillResult(name, SKIPPED, reason=f"cannot read SRC {src}: {exc.strerror}")
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        source = os.fstat(fd)
        data = _map_locked(fd)
    except OSError as exc:
        os.close(fd)
        return FillResult(name, SKIPPED, reason=f"cannot read SRC {src}: {exc.strerror}")
    try:
        try:
            header = parse_header(data)
        except CorruptWhisper as exc:
            return FillResult(name, SKIPPED, reason=f"corrupt SRC {src}: {exc}")
        return _fill_into(data, header, source, dst, now, dry_run, move_corrupt, name)
    finally:
        _unmap(data)
        os.close(fd)  # releases SRC's lock


def _fill_into(
    data: mmap.mmap | bytes,
    header: Header,
    source: os.stat_result,
    dst: str,
    now: int,
    dry_run: bool,
    move_corrupt: bool,
    name: str,
) -> FillResult:
    mode = source.st_mode
    for _attempt in range(3):
        try:
            fd = os.open(dst, os.O_RDONLY if dry_run else os.O_RDWR)
        except FileNotFoundError:
            if dry_run:
                return FillResult(name, COPIED)
            try:
                if _copy_into_place(data, mode, dst):
                    return FillResult(name, COPIED)
            except OSError as exc:
                return FillResult(name, SKIPPED, reason=f"cannot copy to {dst}: {exc.strerror}")
            continue  # DST appeared meanwhile: fill it
        except OSError as exc:
            return FillResult(name, SKIPPED, reason=f"cannot open DST {dst}: {exc.strerror}")
        try:
            target = os.fstat(fd)
            if (target.st_dev, target.st_ino) == (source.st_dev, source.st_ino):
                # a hard link in the trees; locking it twice would wait forever
                return FillResult(name, SKIPPED, reason=f"SRC and DST {dst} are the same file")
            return _fill_open(fd, data, header, dst, now, dry_run, move_corrupt, mode, name)
        except OSError as exc:
            return FillResult(name, SKIPPED, reason=f"cannot write DST {dst}: {exc.strerror}")
        finally:
            os.close(fd)  # releases the flock on every path
    return FillResult(name, SKIPPED, reason=f"DST {dst} keeps appearing and vanishing")


def _fill_open(
    fd: int,
    data: mmap.mmap | bytes,
    header: Header,
    dst: str,
    now: int,
    dry_run: bool,
    move_corrupt: bool,
    mode: int,
    name: str,
) -> FillResult:
    fcntl.flock(fd, fcntl.LOCK_SH if dry_run else fcntl.LOCK_EX)
    current = b""
    try:
        current = _map_locked(fd)
        try:
            dst_header = parse_header(current)
        except CorruptWhisper as exc:
            if not move_corrupt:
                return FillResult(
                    name, SKIPPED, reason=f"corrupt DST {dst}: {exc} (--move-corrupt replaces it)"
                )
            if not dry_run:
                aside = f"{dst}.corrupt-{int(time.time())}"
                os.rename(dst, aside)
                if not _copy_into_place(data, mode, dst):
                    return FillResult(
                        name,
                        SKIPPED,
                        reason=f"corrupt DST {dst} moved to {aside}, "
                        "and a new DST appeared meanwhile",
                    )
            return FillResult(name, REPLACED, reason=str(exc))
        points = fill_data(data, header, current, dst_header, now, None if dry_run else fd)
        return FillResult(name, FILLED if points else UNCHANGED, points)
    finally:
        _unmap(current)
        fcntl.flock(fd, fcntl.LOCK_UN)


# ----- verify ----------------------------------------------------------------


class VerifyResult:
    """One file's verify counts; `examples`: a few missing timestamps."""

    __slots__ = ("checked", "dst_missing", "error", "examples", "missing", "path", "unchecked")

    def __init__(self, path: str, error: str = "") -> None:
        self.path = path
        self.error = error
        self.checked = self.missing = self.unchecked = 0
        self.dst_missing = False
        self.examples: list[int] = []

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"VerifyResult({fields})"

    @property
    def ok(self) -> bool:
        return not self.missing and not self.error


MISSING_EXAMPLES = 5


def verify_data(
    src: bytes,
    src_header: Header,
    dst: bytes | None,
    dst_header: Header | None,
    now: int,
    name: str,
) -> VerifyResult:
    """Every SRC point within a DST archive of the same step must be present in DST.

    SRC points at a precision DST does not have are counted as unchecked (fill
    never spreads them and only aggregates finer ones, so there is nothing to
    compare them with), as long as they are within DST's retention.
    """
    import numpy as np

    result = VerifyResult(name)
    dst_by_step = {a.step: a for a in dst_header.archives} if dst_header else {}
    oldest = now - (max(a.retention for a in dst_header.archives) if dst_header else 0)
    for archive in src_header.archives:
        line = read_timeline(src, archive, now)
        target = dst_by_step.get(archive.step)
        if dst_header is None:
            result.checked += int(line.known.sum())
            result.missing += int(line.known.sum())
            continue
        if target is None:
            times = line.start + archive.step * _arange(archive.points)
            result.unchecked += int((line.known & (times > oldest)).sum())
            continue
        other = read_timeline(dst, target, now)
        shift = (other.start - line.start) // archive.step
        lo, hi = max(0, shift), min(archive.points, shift + target.points)
        if lo >= hi:
            continue
        wanted = line.known[lo:hi]
        absent = wanted & ~other.known[lo - shift : hi - shift]
        result.checked += int(wanted.sum())
        missed = int(absent.sum())
        if missed:
            result.missing += missed
            room = MISSING_EXAMPLES - len(result.examples)
            rows = np.flatnonzero(absent)[:room] + lo
            result.examples.extend(int(line.start + r * archive.step) for r in rows)
    return result


def verify_file(
    src: str, dst: str, now: int | None = None, name: str | None = None
) -> VerifyResult:
    name = name or dst
    now = int(time.time()) if now is None else int(now)
    try:
        data, header = read_whisper(src)
    except CorruptWhisper as exc:
        return VerifyResult(name, error=f"corrupt SRC {src}: {exc}")
    except OSError as exc:
        return VerifyResult(name, error=f"cannot read SRC {src}: {exc.strerror}")
    try:
        other, other_header = read_whisper(dst)
    except FileNotFoundError:
        result = verify_data(data, header, None, None, now, name)
        result.dst_missing = True
        return result
    except CorruptWhisper as exc:
        return VerifyResult(name, error=f"corrupt DST {dst}: {exc}")
    except OSError as exc:
        return VerifyResult(name, error=f"cannot read DST {dst}: {exc.strerror}")
    return verify_data(data, header, other, other_header, now, name)


# ----- trees -----------------------------------------------------------------


def whisper_files(root: str) -> list[str]:
    """Relative paths of every *.wsp under root, sorted."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        relative = os.path.relpath(directory, root)
        for file in sorted(files):
            if file.endswith(".wsp"):
                found.append(file if relative == "." else os.path.join(relative, file))
    return found


def resolve_pair(src: str, dst: str) -> tuple[str, list[str]]:
    """('file' | 'tree', relative paths) for a SRC/DST pair; CarbonscaleError on bad input."""
    if not os.path.exists(src):
        raise CarbonscaleError(f"SRC {src} does not exist")
    if os.path.isdir(src):
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise CarbonscaleError(f"SRC {src} is a directory but DST {dst} is not")
        if os.path.exists(dst) and os.path.samefile(src, dst):
            raise CarbonscaleError("SRC and DST are the same directory")
        return "tree", whisper_files(src)
    if not os.path.isfile(src):
        raise CarbonscaleError(f"SRC {src} is not a regular file or a directory")
    if os.path.isdir(dst):
        raise CarbonscaleError(f"SRC {src} is a file but DST {dst} is a directory")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise CarbonscaleError("SRC and DST are the same file")
    return "file", [""]


def _pair(src: str, dst: str, relative: str) -> tuple[str, str]:
    if not relative:
        return src, dst
    return os.path.join(src, relative), os.path.join(dst, relative)


def _fill_one(job: tuple[str, str, str, int, bool, bool]) -> FillResult:
    src, dst, relative, now, dry_run, move_corrupt = job
    source, target = _pair(src, dst, relative)
    return fill_file(source, target, now, dry_run, move_corrupt, relative or dst)


def _verify_one(job: tuple[str, str, str, int]) -> VerifyResult:
    src, dst, relative, now = job
    source, target = _pair(src, dst, relative)
    return verify_file(source, target, now, relative or dst)


def _run_on_threads(
    function: Callable, jobs: list, workers: int, on_result: Callable | None
) -> list:
    """run_jobs on threads: plain threads pulling jobs, not concurrent.futures, whose
    imports alone cost more start-up time than a small fill takes. Results in job
    order; `on_result` sees them as they finish. A worker's exception is raised here."""
    import queue
    import threading

    ordered: list = [None] * len(jobs)
    pending = iter(enumerate(jobs))
    take = threading.Lock()
    finished: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            with take:
                item = next(pending, None)
            if item is None:
                return
            index, job = item
            try:
                finished.put((index, function(job), None))
            except BaseException as exc:  # handed to the main thread, raised there
                finished.put((index, None, exc))
                return

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(jobs)))]
    for thread in threads:
        thread.start()
    try:
        for _ in jobs:
            index, result, error = finished.get()
            if error is not None:
                raise error
            ordered[index] = result
            if on_result:
                on_result(result)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return ordered


def run_jobs(
    function: Callable,
    jobs: list,
    workers: int,
    on_result: Callable | None = None,
    threads: bool = False,
) -> list:
    """function over jobs with `workers` at once: threads when the work releases
    the GIL (the C merge and file I/O), else processes (numpy work holds it)."""
    results = []

    def done(result: object) -> None:
        results.append(result)
        if on_result:
            on_result(result)

    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            done(function(job))
        return results
    if threads:
        return _run_on_threads(function, jobs, workers, on_result)
    import multiprocessing

    context = multiprocessing.get_context("fork")
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with context.Pool(workers) as pool:
        for result in pool.imap_unordered(function, jobs, chunksize=chunk):
            done(result)
    return results


class FillSummary:
    def __init__(self, results: list[FillResult], seconds: float, dry_run: bool = False) -> None:
        self.results = results
        self.seconds = seconds
        self.dry_run = dry_run

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def points(self) -> int:
        return sum(r.points for r in self.results)

    @property
    def skipped(self) -> list[FillResult]:
        return [r for r in self.results if r.status == SKIPPED]

    def as_dict(self) -> dict:
        return {
            "files": len(self.results),
            "filled": self.count(FILLED),
            "points": self.points,
            "copied": self.count(COPIED),
            "replaced": self.count(REPLACED),
            "unchanged": self.count(UNCHANGED),
            "skipped": [{"path": r.path, "reason": r.reason} for r in self.skipped],
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
        }

    def line(self) -> str:
        rate = len(self.results) / self.seconds if self.seconds > 0 else 0.0
        would = "would fill" if self.dry_run else "filled"
        return (
            f"{len(self.results)} files: {self.count(FILLED)} {would} ({self.points} points), "
            f"{self.count(COPIED)} copied, {self.count(REPLACED)} replaced, "
            f"{self.count(UNCHANGED)} unchanged, {len(self.skipped)} skipped "
            f"in {self.seconds:.2f} s ({rate:.0f} files/s)"
        )


def fill(
    src: str,
    dst: str,
    jobs: int = 1,
    now: int | None = None,
    dry_run: bool = False,
    move_corrupt: bool = False,
    on_result: Callable[[FillResult], None] | None = None,
    paths: list[str] | None = None,
) -> FillSummary:
    """Fill a file or a tree (every *.wsp of SRC into the same relative path under DST)."""
    started = time.monotonic()
    if paths is None:
        paths = resolve_pair(src, dst)[1]
    now = int(time.time()) if now is None else int(now)
    work = [(src, dst, relative, now, dry_run, move_corrupt) for relative in paths]
    results = run_jobs(_fill_one, work, jobs, on_result, threads=_whisper is not None)
    return FillSummary(results, time.monotonic() - started, dry_run)


class VerifySummary:
    def __init__(self, results: list[VerifyResult], seconds: float) -> None:
        self.results = results
        self.seconds = seconds

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def as_dict(self, limit: int = 1000) -> dict:
        bad = sorted((r for r in self.results if not r.ok), key=lambda r: r.path)
        return {
            "ok": self.ok,
            "files": len(self.results),
            "points_checked": sum(r.checked for r in self.results),
            "points_missing": sum(r.missing for r in self.results),
            "points_unchecked": sum(r.unchecked for r in self.results),
            "files_with_missing_points": sum(1 for r in self.results if r.missing),
            "dst_missing": sorted(r.path for r in self.results if r.dst_missing)[:limit],
            "errors": [{"path": r.path, "error": r.error} for r in bad if r.error][:limit],
            "missing": [
                {"path": r.path, "checked": r.checked, "missing": r.missing, "examples": r.examples}
                for r in bad
                if r.missing
            ][:limit],
            "seconds": round(self.seconds, 3),
        }


def verify(
    src: str,
    dst: str,
    jobs: int = 1,
    now: int | None = None,
    on_result: Callable[[VerifyResult], None] | None = None,
    paths: list[str] | None = None,
) -> VerifySummary:
    started = time.monotonic()
    if paths is None:
        paths = resolve_pair(src, dst)[1]
    now = int(time.time()) if now is None else int(now)
    results = run_jobs(_verify_one, [(src, dst, r, now) for r in paths], jobs, on_result)
    return VerifySummary(results, time.monotonic() - started)

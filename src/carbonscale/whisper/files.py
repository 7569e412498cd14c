"""One file pair: fill DST from SRC under the locks carbon takes, copy a missing DST."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
from collections import namedtuple

from carbonscale.whisper.header import CorruptWhisper, Header, parse_header
from carbonscale.whisper.merge import fill_data

# Map every page at once (Linux): faulting them in one by one costs more than the read.
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

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

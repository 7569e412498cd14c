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

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

    # What runs on DST's bytes and header right after a fill, under the same lock.
    After = Callable[[mmap.mmap | bytes, Header], None]

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
    lock the other waits for; a migration fills from a snapshot in memory
    (fill_snapshot), never back.)"""
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
        identity = (source.st_dev, source.st_ino)
        return _fill_into(
            data, header, identity, source.st_mode, dst, now, dry_run, move_corrupt, name
        )
    finally:
        _unmap(data)
        os.close(fd)  # releases SRC's lock


def fill_snapshot(
    data: bytes,
    header: Header,
    dst: str,
    now: int,
    name: str,
    mode: int,
    check: Callable[[mmap.mmap | bytes, Header], str],
) -> tuple[FillResult, str]:
    """Fill DST from `data`, a snapshot of SRC already in memory (what a migration
    pulled from a source host), by fill_file's rules; then `check(DST's bytes, DST's
    header)` while DST is still locked, right after the writes: no carbon write can
    land between the fill and its check. A missing DST is linked into place (`mode`)
    and checked under flock(LOCK_SH) as it is then.

    (FillResult, the check's answer: '' when it passed); the check does not run
    (answer '') when the fill was skipped."""
    answer = [""]

    def after(current: mmap.mmap | bytes, current_header: Header) -> None:
        answer[0] = check(current, current_header)

    result = _fill_into(data, header, None, mode, dst, now, False, False, name, after)
    if result.status == COPIED:
        return result, _check_locked(dst, after) or answer[0]
    return result, answer[0]


def _check_locked(path: str, after: After) -> str:
    """after(bytes, header) of `path` under flock(LOCK_SH); '' or why it cannot run."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    current: mmap.mmap | bytes = b""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        current = _map_locked(fd)
        after(current, parse_header(current))
        return ""
    except CorruptWhisper as exc:
        return f"{path} is corrupt after the copy: {exc}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    finally:
        _unmap(current)
        os.close(fd)


def _fill_into(
    data: mmap.mmap | bytes,
    header: Header,
    identity: tuple[int, int] | None,
    mode: int,
    dst: str,
    now: int,
    dry_run: bool,
    move_corrupt: bool,
    name: str,
    after: After | None = None,
) -> FillResult:
    """Fill DST from SRC's `data`; `identity`: SRC's (st_dev, st_ino), None when SRC
    is no file (a snapshot in memory)."""
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
            if (target.st_dev, target.st_ino) == identity:
                # a hard link in the trees; locking it twice would wait forever
                return FillResult(name, SKIPPED, reason=f"SRC and DST {dst} are the same file")
            return _fill_open(fd, data, header, dst, now, dry_run, move_corrupt, mode, name, after)
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
    after: After | None = None,
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
        if after is not None:
            # The map is MAP_SHARED: it reads the page cache the fill's pwrite changed.
            after(current, dst_header)
        return FillResult(name, FILLED if points else UNCHANGED, points)
    finally:
        _unmap(current)
        fcntl.flock(fd, fcntl.LOCK_UN)

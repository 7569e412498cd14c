"""Files replaced whole by a rename, so a reader (nginx, the next check run, a
rerun of a move) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable


def write_atomically(
    path: str | os.PathLike,
    data: str | bytes | Iterable[bytes],
    mode: int | None = None,
    durable: bool = False,
) -> None:
    """Replace `path` with `data` (text, bytes, or bytes chunks written in turn:
    a large body needs no joined copy) by a rename in its directory.

    Without `mode` the file is private to its owner (mkstemp's 0600). `durable`
    syncs the file before the rename: state that a rerun resumes from must
    survive a crash, not only a torn write."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path))
    )
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, str):
                out.write(data.encode())
            elif isinstance(data, bytes):
                out.write(data)
            else:
                for chunk in data:
                    out.write(chunk)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

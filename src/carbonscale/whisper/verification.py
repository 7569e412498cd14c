"""Verify: is every SRC point within DST's retention present in DST."""

from __future__ import annotations

import time

from carbonscale.whisper.files import read_whisper
from carbonscale.whisper.header import CorruptWhisper, Header
from carbonscale.whisper.merge import _whisper
from carbonscale.whisper.timelines import _arange, read_timeline


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

    The C count (`_whisper.verify`, a few slot reads per point, the GIL released)
    when built, else its numpy twin `verify_data_numpy` (the same counts)."""
    if _whisper is None or dst is None:
        return verify_data_numpy(src, src_header, dst, dst_header, now, name)
    result = VerifyResult(name)
    result.checked, result.missing, result.unchecked, result.examples = _whisper.verify(
        src, dst, now
    )
    return result


def verify_data_numpy(
    src: bytes,
    src_header: Header,
    dst: bytes | None,
    dst_header: Header | None,
    now: int,
    name: str,
) -> VerifyResult:
    """verify_data with numpy arrays: the reference twin of the C count."""
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

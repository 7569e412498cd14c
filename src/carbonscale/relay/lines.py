"""Carbon pickle frames to line protocol, without ever running code.

A frame's payload is a pickled list of `(path, (timestamp, value))`. carbon's
senders use protocol 2, Python 3 clients 4 or 5, some send protocol 0, tuples
for lists, string numbers, or several points in one entry
(`(path, [(ts, v), ...])` or `(path, (ts, v), (ts, v), ...)`). All of that is
made of lists, tuples, str, bytes, int and float: no global is ever needed.

`RestrictedUnpickler` therefore refuses every global. GLOBAL, STACK_GLOBAL,
INST and the extension-registry codes all go through `find_class`; REDUCE,
BUILD, OBJ, NEWOBJ and NEWOBJ_EX can only call or build what an earlier
opcode put on the stack, and without globals nothing callable can get there.
Persistent ids are refused too, and protocol 5 out-of-band buffers fail
because no `buffers` are ever given. The C unpickler stays in C: only
`find_class` and `persistent_load` are Python, and legitimate frames never
reach them.

`format_points` turns the unpickled object into line protocol. It is the C
extension `carbonscale.relay._lines` when it was built (the wheel always has
it); `format_points_py` is its reference, used when it was not.
"""

from __future__ import annotations

import io
import math
import pickle
import re

try:
    from carbonscale.relay._lines import check_memo as _check_memo_c
    from carbonscale.relay._lines import format_points as _format_points_c
except ImportError:  # a checkout whose extension was not compiled
    _check_memo_c = _format_points_c = None

# carbon's PICKLE_RECEIVER_MAX_LENGTH default.
DEFAULT_MAX_FRAME = 1024 * 1024
# Longest metric name written, in bytes (PATH_MAX: a longer one cannot be a
# whisper file anyway).
DEFAULT_MAX_NAME = 4096
# Pickle memo references let a small frame name one long path many times; this
# bounds what one frame may expand to. Honest frames stay far below it.
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024

_INT64 = 2**63
_EXACT = 2**53
# Whitespace or a control byte would end the name (or the line) early.
_BAD_NAME_BYTE = re.compile(rb"[\x00-\x20\x7f]")


class MalformedFrame(Exception):
    """The frame is not a pickled list of datapoints: its connection is closed."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only build lists, tuples, dicts, sets, str, bytes and numbers."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"global {module}.{name} refused")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent id refused")


# ---------------------------------------------------------------- memo bombs

# Opcode -> argument: bytes of a fixed argument (int), ("len", n) for an n-byte
# little-endian length prefix, ("lines", n) for n newline-terminated lines.
_FIXED = {op: 0 for op in b"(012Naebd}l]t)suRoQ"}
_FIXED.update({op: 0 for op in (0x81, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8F, 0x90, 0x91, 0x92)})
_FIXED.update({op: 0 for op in (0x93, 0x94, 0x97, 0x98)})
_FIXED.update({op: 1 for op in (ord("K"), ord("h"), ord("q"), 0x80, 0x82)})
_FIXED.update({op: 2 for op in (ord("M"), 0x83)})
_FIXED.update({op: 4 for op in (ord("J"), ord("j"), ord("r"), 0x84)})
_FIXED.update({op: 8 for op in (ord("G"), 0x95)})
_LINES = {op: 1 for op in b"ILFSVgPp"}
_LINES.update({ord("c"): 2, ord("i"): 2})
_PREFIX = {op: 1 for op in (ord("U"), ord("C"), 0x8C, 0x8A)}
_PREFIX.update({op: 4 for op in (ord("T"), ord("B"), ord("X"), 0x8B)})
_PREFIX.update({op: 8 for op in (0x8D, 0x8E, 0x96)})


def check_memo_py(frame: bytes) -> None:
    """ValueError on a memo index at or past the frame's length, or an argument
    running past its end; the reference twin of the C `check_memo`.

    CPython's unpickler grows its memo array to twice the largest index it is
    given: LONG_BINPUT 1078405844 in a 200-byte frame made it allocate and
    zero 16 GiB. Honest pickles number memo entries from 0, each PUT taking at
    least two bytes, so every index is below the frame's length.
    """
    size, pos, limit = len(frame), 0, len(frame)
    while pos < size:
        op = frame[pos]
        pos += 1
        if op == ord("."):
            return
        if op in _FIXED:
            width = _FIXED[op]
            if size - pos < width:
                raise ValueError("the pickle ends inside an opcode's argument")
            if op == ord("r") and int.from_bytes(frame[pos : pos + 4], "little") >= limit:
                raise ValueError("memo index past the frame's length")
            pos += width
        elif op in _PREFIX:
            width = _PREFIX[op]
            if size - pos < width:
                raise ValueError("the pickle ends inside a length")
            length = int.from_bytes(frame[pos : pos + width], "little")
            pos += width
            if op == 0x8B and length & 0x80000000:
                raise ValueError("negative length")
            if length > size - pos:
                raise ValueError("a length runs past the frame's end")
            pos += length
        elif op in _LINES:
            for _ in range(_LINES[op]):
                end = frame.find(b"\n", pos)
                if end < 0:
                    raise ValueError("the pickle ends inside a line argument")
                if op == ord("p"):
                    digits = frame[pos:end]
                    if not digits.isdigit() or len(digits) > 19 or int(digits) >= limit:
                        raise ValueError("memo index past the frame's length")
                pos = end + 1
        else:
            return  # unknown: the unpickler stops here too


check_memo = _check_memo_c or check_memo_py


def unpickle(frame: bytes):
    """The frame's object, or MalformedFrame. Trailing bytes after STOP are malformed."""
    # BufferedReader gives the C unpickler peek(), so it prefetches the whole
    # frame instead of calling read() per opcode (4x faster for protocol 2).
    try:
        check_memo(frame)
    except ValueError as exc:
        raise MalformedFrame(str(exc)) from None
    stream = io.BufferedReader(io.BytesIO(frame), buffer_size=len(frame) + 8)
    try:
        # encoding="bytes": Python 2 str (names, string numbers) arrive as bytes
        # instead of failing the whole frame on one non-ASCII name.
        obj = RestrictedUnpickler(stream, encoding="bytes").load()
    except Exception as exc:  # the unpickler raises a dozen kinds on garbage
        raise MalformedFrame(f"{type(exc).__name__}: {exc}") from None
    if stream.tell() != len(frame):
        raise MalformedFrame(f"{len(frame) - stream.tell()} bytes after the pickle's end")
    return obj


# ---------------------------------------------------------------- reference


def _number(x) -> int | float | None:
    """float(x) as carbon does it, keeping int64 integers exact."""
    if isinstance(x, int):
        if -_INT64 <= x < _INT64:
            return int(x)
        try:
            return float(x)
        except OverflowError:
            return None
    if isinstance(x, float):
        return x
    if isinstance(x, str | bytes | bytearray):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _finite(x) -> int | float | None:
    """_number(x), or None for an infinity or NaN (carbon cannot store them)."""
    v = _number(x)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _timestamp(x, now: int) -> int | None:
    v = _finite(x)
    if v is None:
        return None
    if isinstance(v, float):
        v = math.trunc(v)
        if not -_INT64 <= v < _INT64:
            return None
    return now if v == -1 else v


def _value(x) -> bytes | None:
    v = _finite(x)
    if v is None:
        return None
    if isinstance(v, float):
        if v.is_integer() and abs(v) < _EXACT:
            return b"%d" % int(v)
        return repr(v).encode()
    return b"%d" % v


def _name(x, max_name: int) -> bytes | None:
    if isinstance(x, str):
        try:
            data = x.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            return None
    elif isinstance(x, bytes | bytearray):
        data = bytes(x)
    else:
        return None
    if not data or len(data) > max_name or _BAD_NAME_BYTE.search(data):
        return None
    return data


def _is_seq(x) -> bool:
    return isinstance(x, list | tuple)


def format_points_py(frame, now: int, max_name: int, max_output: int) -> tuple[bytes, int, int]:
    """(line protocol, points written, points skipped); ValueError for a malformed frame."""
    if not _is_seq(frame):
        raise ValueError(f"frame holds a {type(frame).__name__}, not a list of datapoints")
    out: list[bytes] = []
    size = points = invalid = 0
    for entry in frame:
        if not _is_seq(entry) or len(entry) < 2:
            invalid += 1
            continue
        if len(entry) > 2:
            pts = entry[1:]
        elif not _is_seq(entry[1]) or not entry[1]:
            invalid += 1
            continue
        elif not _is_seq(entry[1][0]):
            pts = entry[1:]  # the single point (ts, value)
        else:
            pts = entry[1]
        name = _name(entry[0], max_name)
        if name is None:
            invalid += len(pts)
            continue
        for point in pts:
            if not _is_seq(point) or len(point) != 2:
                invalid += 1
                continue
            ts = _timestamp(point[0], now)
            value = _value(point[1]) if ts is not None else None
            if value is None:
                invalid += 1
                continue
            line = b"%s %s %d\n" % (name, value, ts)
            size += len(line)
            if size > max_output:
                raise ValueError(f"frame expands to more than {max_output} bytes of line protocol")
            out.append(line)
            points += 1
    return b"".join(out), points, invalid


format_points = _format_points_c or format_points_py
IMPLEMENTATION = "C" if _format_points_c else "Python"


def decode_frame(
    frame: bytes,
    now: int,
    max_name: int = DEFAULT_MAX_NAME,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> tuple[bytes, int, int]:
    """One frame's payload to (line protocol, points, invalid); MalformedFrame if it is not one."""
    obj = unpickle(frame)
    try:
        return format_points(obj, now, max_name, max_output)
    except ValueError as exc:
        raise MalformedFrame(str(exc)) from None

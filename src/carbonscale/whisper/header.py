"""The whisper file format: the header, its archives, and the check that a file is whole."""

from __future__ import annotations

import struct
from collections import namedtuple

from carbonscale import CarbonscaleError

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

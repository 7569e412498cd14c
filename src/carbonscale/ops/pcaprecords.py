"""The records of a classic pcap file in bulk: batches of frames as one buffer
and numpy arrays of where each frame starts and how long it is.

dpkt.pcap.Reader yields one (timestamp, bytes) pair per record, a Python object
and a read() each: a microsecond or two per packet before anything is decoded.
Here dpkt.pcap reads the file header (byte order, link type, micro- or
nanosecond stamps) and the records are walked in the buffer read in large
blocks, with the same results as dpkt's reader: a record whose header is cut
off at the end of the file is not one (and is counted as a truncated record), a
record whose data is cut off is the bytes that are there.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import dpkt
import numpy as np

try:
    from carbonscale._hotcount import record_starts
except ImportError:  # a checkout whose extension was not compiled
    record_starts = None

# Bytes read per block; a batch holds the records that start in it.
BLOCK_BYTES = 16 << 20
_RECORD_HEADER = 16


class Batch:
    """Frames: buffer[starts[i] : starts[i] + lengths[i]]; the first and last record's
    timestamps."""

    __slots__ = ("buffer", "first", "last", "lengths", "starts")

    def __init__(self, buffer: bytes, starts: np.ndarray, lengths: np.ndarray, first, last):
        self.buffer = buffer
        self.starts = starts
        self.lengths = lengths
        self.first = first
        self.last = last

    @classmethod
    def of_frames(cls, records: list[tuple[float, bytes]]) -> Batch:
        """A batch of (timestamp, frame) records from any reader (pcapng, tests)."""
        lengths = np.fromiter((len(frame) for _, frame in records), np.int64, len(records))
        starts = np.zeros(len(records), np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        buffer = b"".join(frame for _, frame in records)
        return cls(buffer, starts, lengths, records[0][0], records[-1][0])


def file_header(handle: BinaryIO) -> tuple[int, str, float] | None:
    """(link type, struct byte order, stamp divisor) of a classic pcap file, or None
    (then dpkt's own readers are used). The handle is left after the header."""
    raw = handle.read(dpkt.pcap.FileHdr.__hdr_len__)
    if len(raw) < dpkt.pcap.FileHdr.__hdr_len__:
        return None
    for order, header_type in (("<", dpkt.pcap.LEFileHdr), (">", dpkt.pcap.FileHdr)):
        header = header_type(raw)
        if header.magic == dpkt.pcap.TCPDUMP_MAGIC:
            return header.linktype, order, 1e6
        if header.magic == dpkt.pcap.TCPDUMP_MAGIC_NANO:
            return header.linktype, order, 1e9
    return None


def batches(handle: BinaryIO, order: str, divisor: float, skipped) -> Iterator[Batch]:
    """The records after the file header, in batches (one per block read)."""
    caplen = struct.Struct(order + "I").unpack_from
    stamp = struct.Struct(order + "II").unpack_from
    rest = b""
    while True:
        block = handle.read(BLOCK_BYTES)
        data = rest + block if rest else block
        at_end = not block
        size = len(data)
        last_header = size - _RECORD_HEADER
        if record_starts is not None:
            found, offset = record_starts(data, order == ">")
            starts = np.frombuffer(found, np.int64).tolist()
        else:
            starts, offset = _record_starts(data, caplen, size)
        append = starts.append
        cut_short = None
        if at_end and offset < size:
            if offset <= last_header:  # dpkt reads what there is of the record's data
                cut_short = offset + _RECORD_HEADER
                append(cut_short)
            else:
                skipped["truncated record at the end"] += 1
            offset = size
        if starts:
            begins = np.array(starts, np.int64)
            lengths = _caplens(data, begins, order)
            if cut_short is not None:
                lengths[-1] = size - cut_short
            yield Batch(
                data,
                begins,
                lengths,
                _stamp(stamp(data, starts[0] - _RECORD_HEADER), divisor),
                _stamp(stamp(data, starts[-1] - _RECORD_HEADER), divisor),
            )
        rest = data[offset:]
        if at_end:
            return


def _record_starts(data: bytes, caplen, size: int) -> tuple[list[int], int]:
    """Where the frames of the records that lie whole in data begin, and the end of
    the last one (the Python twin of _hotcount.record_starts)."""
    starts: list[int] = []
    append = starts.append
    offset = 0
    last_header = size - _RECORD_HEADER
    while offset <= last_header:
        following = offset + _RECORD_HEADER + caplen(data, offset + 8)[0]
        if following > size:
            break
        append(offset + _RECORD_HEADER)
        offset = following
    return starts, offset


def _caplens(data: bytes, begins: np.ndarray, order: str) -> np.ndarray:
    """Each record's captured length (its header's third word)."""
    raw = np.frombuffer(data, np.uint8)
    at = begins - 8
    b0, b1, b2, b3 = (raw[at + i].astype(np.int64) for i in range(4))
    if order == "<":
        return b0 | b1 << 8 | b2 << 16 | b3 << 24
    return b3 | b2 << 8 | b1 << 16 | b0 << 24


def _stamp(header: tuple[int, int], divisor: float) -> float:
    seconds, fraction = header
    return seconds + (fraction / divisor)

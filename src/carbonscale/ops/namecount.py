"""Points per metric name in line-protocol or statsd text, counted with numpy.

The reference is what `Decoder.names` does line by line: a line protocol name is
the line's first whitespace-separated field (`bytes.split()`), a statsd name the
text before the line's first ':'; empty (or, for line protocol, blank) lines
hold no point. Doing that per line in Python costs about a microsecond per
point; here each block of text is cut into names with a few vectorised passes
(the positions of newlines and separators), every name is hashed from its bytes
read eight at a time, and points are counted per hash (np.unique). Only one
name per hash is turned into a Python bytes object.

Lines numpy cannot cut the simple way (a tab, CR, VT or FF anywhere in the
block, a leading space, a blank line, a name longer than MAX_HASHED_NAME) are
counted by the reference code instead, so the counts are the same as its, as
long as two different names do not share a 64-bit hash. The hash is a
multiply-xorshift over the name's 8-byte words and its length, with a key drawn
per process: names of up to 8 bytes, or differing in one word only, never
share one; any other pair does with a chance of 2**-64.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

# Text is cut into blocks of about this many bytes: numpy's temporaries stay
# small enough to be reused instead of faulted in afresh.
BLOCK_BYTES = 2 << 20
# Longer names are counted by the reference code (they are rare, and hashing
# them would cost one more pass over every name per 8 bytes).
MAX_HASHED_NAME = 96
_PAD = MAX_HASHED_NAME + 8

_WORD_MASKS = np.array([(1 << (8 * r)) - 1 for r in range(8)] + [2**64 - 1], dtype=np.uint64)
_LENGTH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_WORD_MULTIPLIER = np.uint64(0xBF58476D1CE4E5B9)
_SHIFT = np.uint64(31)
_KEY = np.uint64(int.from_bytes(os.urandom(8), "little"))
# bytes.split() separators other than space and newline: a block holding one is
# counted by the reference code.
_OTHER_WHITESPACE = np.array([9, 11, 12, 13], dtype=np.uint8)


def reference_names(block: bytes, statsd: bool) -> list[bytes]:
    """The name of every point of a block, line by line (what the vectorised count
    must agree with)."""
    if statsd:
        return [line.split(b":", 1)[0] for line in block.split(b"\n") if line]
    return [fields[0] for fields in map(bytes.split, block.split(b"\n")) if fields]


def _blocks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks joined into blocks of about BLOCK_BYTES, cut only after a chunk
    that ends a line (a block ends with a newline unless the last chunk does not)."""
    group: list[bytes] = []
    size = 0
    for chunk in chunks:
        group.append(chunk)
        size += len(chunk)
        if size >= BLOCK_BYTES and chunk[-1:] == b"\n":
            yield b"".join(group)
            group, size = [], 0
    if group:
        yield b"".join(group)


class NameCounter:
    """Points per name over blocks of text of one protocol."""

    def __init__(self, statsd: bool) -> None:
        self.statsd = statsd
        self.hashes: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.names: dict[int, bytes] = {}
        self.exact: Counter[bytes] = Counter()

    def add_chunks(self, chunks: Iterable[bytes]) -> None:
        for block in _blocks(chunks):
            self.add(block)

    def add(self, block: bytes) -> None:
        if not block:
            return
        if block[-1:] != b"\n":
            block += b"\n"  # the reference's split counts a last unterminated line
        size = len(block)
        padded = block + bytes(_PAD)
        text = np.frombuffer(padded, np.uint8, size)
        if self.statsd:
            cuts = np.flatnonzero((text == 10) | (text == 58))
        else:
            cuts = np.flatnonzero(text <= 32)
            found = text[cuts]
            if np.isin(found, _OTHER_WHITESPACE).any():
                self.exact.update(reference_names(block, False))
                return
            cuts = cuts[(found == 10) | (found == 32)]
        newline = np.flatnonzero(text[cuts] == 10)  # indexes into cuts
        starts = np.empty(len(newline), np.int64)
        starts[0] = 0
        starts[1:] = cuts[newline[:-1]] + 1
        # The first cut at or after a line's start ends its name (the line's own
        # newline if it has no separator).
        first_cut = np.empty(len(newline), np.int64)
        first_cut[0] = 0
        first_cut[1:] = newline[:-1] + 1
        ends = cuts[first_cut]
        lengths = ends - starts
        if self.statsd:
            odd = ends == cuts[newline]  # no ':' (whole line) is fine; empty lines are odd
            odd &= lengths == 0
            odd |= lengths > MAX_HASHED_NAME
        else:
            odd = (lengths == 0) | (lengths > MAX_HASHED_NAME)
        if odd.any():
            line_ends = cuts[newline]
            for start, end in zip(starts[odd].tolist(), line_ends[odd].tolist(), strict=True):
                self.exact.update(reference_names(block[start:end], self.statsd))
            keep = ~odd
            starts, lengths = starts[keep], lengths[keep]
        if not len(starts):
            return
        words = np.ndarray((size + MAX_HASHED_NAME,), "<u8", padded, 0, (1,))
        hashes = lengths.astype(np.uint64) * _LENGTH_MULTIPLIER ^ _KEY
        for offset in range(0, int(lengths.max()), 8):
            word = words[starts + offset]
            word &= _WORD_MASKS[np.clip(lengths - offset, 0, 8)]
            hashes ^= word
            hashes *= _WORD_MULTIPLIER
            hashes ^= hashes >> _SHIFT
        unique, counts = np.unique(hashes, return_counts=True)
        names = self.names
        new = [i for i, value in enumerate(unique.tolist()) if value not in names]
        if new:  # one name per new hash, from its first line in the block
            new_hashes = unique[new]
            rows = np.flatnonzero(np.isin(hashes, new_hashes))
            found, first = np.unique(hashes[rows], return_index=True)
            rows = rows[first]
            for value, start, length in zip(
                found.tolist(), starts[rows].tolist(), lengths[rows].tolist(), strict=True
            ):
                names[value] = block[start : start + length]
        self.hashes.append(unique)
        self.counts.append(counts)

    def result(self) -> Counter[bytes]:
        counter = Counter(self.exact)
        if self.hashes:
            unique, where = np.unique(np.concatenate(self.hashes), return_inverse=True)
            totals = np.bincount(where, np.concatenate(self.counts), len(unique))
            names = self.names
            for value, total in zip(unique.tolist(), totals.astype(np.int64).tolist(), strict=True):
                counter[names[value]] += total
        return counter


def count_names(chunks: Iterable[bytes], statsd: bool = False) -> Counter[bytes]:
    """Points per name in line-protocol (or statsd) text given as chunks of whole lines."""
    counter = NameCounter(statsd)
    counter.add_chunks(chunks)
    return counter.result()

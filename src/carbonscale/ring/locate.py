"""Metric names in, `metric<TAB>owner...` lines out, fast and in flat memory.

Names are the first whitespace-separated field of each line (so line protocol
works), read in blocks of about BLOCK_BYTES; `Locator` formats a block's owner
lines, in C when `_ringhash` is built (carbonscale.ring.hashes holds the
binding), else with numpy; `locate_stream` pipes a stream through it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.relay_names import rewrite_block
from carbonscale.ring import Ring, hashes

BLOCK_BYTES = 1 << 20  # read and write in 1 MiB blocks (two threads format them)


def read_blocks(stream: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """Whole lines in blocks of about BLOCK_BYTES, with the number of each block's first line."""
    rest = b""
    line_no = 1
    while True:
        chunk = stream.read(BLOCK_BYTES)
        data = rest + chunk
        if chunk:
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            block, rest = data[: cut + 1], data[cut + 1 :]
        else:
            block, rest = data, b""
        if block:
            yield block, line_no
            line_no += block.count(b"\n")
        if not chunk:
            return


def check_utf8(block: bytes, line_no: int = 1) -> None:
    try:
        block.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = line_no + block.count(b"\n", 0, exc.start)
        raise CarbonscaleError(f"line {bad}: metric name is not valid UTF-8") from exc


def names_in(block: bytes, line_no: int = 1, allowed_chars: bytes | None = None) -> list[bytes]:
    """Metric names of a block of lines: the first whitespace-separated field,
    rewritten as carbon-c-relay does with allowed_chars (None: as given).

    Invalid UTF-8 stops everything with the line number: a name the relay
    would route is a name we must be able to print and compare.
    """
    if allowed_chars is not None:
        block = rewrite_block(block, allowed_chars)
    check_utf8(block, line_no)
    lines = block.split(b"\n")
    if any(space in block for space in (b" ", b"\t", b"\r", b"\x0b", b"\x0c")):
        return [fields[0] for fields in map(bytes.split, lines) if fields]
    if lines[-1] == b"" and b"\n\n" not in block and not block.startswith(b"\n"):
        return lines[:-1]  # the common case: no blank lines
    return [line for line in lines if line]


def read_names(stream: BinaryIO, allowed_chars: bytes | None = None) -> Iterator[list[bytes]]:
    for block, line_no in read_blocks(stream):
        names = names_in(block, line_no, allowed_chars)
        if names:
            yield names


def join_lines(names: list[bytes], suffixes: list[bytes], indices: np.ndarray) -> bytes:
    """names[i] + suffixes[indices[i]] for every name, as one bytes object."""
    if hashes._ringhash is not None:
        return hashes._ringhash.join_lines(names, suffixes, indices.astype(np.int64).tobytes())
    parts: list[bytes] = [b""] * (2 * len(names))
    parts[::2] = names
    parts[1::2] = list(map(suffixes.__getitem__, indices.tolist()))
    return b"".join(parts)


def _row_codes(ring: Ring, rows: np.ndarray) -> np.ndarray:
    """One integer per owner row (members in base len(members))."""
    codes = np.zeros(len(rows), dtype=np.int64)
    for column in range(rows.shape[1]):
        codes = codes * len(ring.members) + rows[:, column]
    return codes


def _suffix_of(ring: Ring, row: Sequence[int]) -> bytes:
    return ("\t" + "\t".join(ring.members[i].address for i in row) + "\n").encode()


# Owner rows are looked up in a table indexed by row code while the code
# space (members ** replication) stays this small; beyond it, per batch.
CODE_TABLE_LIMIT = 1 << 16


def _suffix_table(ring: Ring, rows: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """Distinct `\\towner[\\towner]\\n` texts of rows, and each row's index into them."""
    _, first, inverse = np.unique(_row_codes(ring, rows), return_index=True, return_inverse=True)
    return [_suffix_of(ring, row) for row in rows[first].tolist()], inverse.reshape(-1)


def _code_table(ring: Ring) -> list[bytes] | None:
    count = len(ring.members)
    if count**ring.replication > CODE_TABLE_LIMIT:
        return None
    rows = np.array(list(np.ndindex(*(count,) * ring.replication)), dtype=np.int64)
    return [_suffix_of(ring, row) for row in rows.tolist()]


class Locator:
    """Formats `metric<TAB>owner...` lines for batches of names, fast.

    carbon_ch and fnv1a_ch depend only on a 16-bit position, so the owner
    texts of all 65536 positions are built once; jump indexes a table of all
    owner rows when it is small, or builds the texts per batch.
    """

    def __init__(self, ring: Ring, allowed_chars: bytes | None = None) -> None:
        self.ring = ring
        self.allowed_chars = allowed_chars  # the relay's name rewrite (None: names as given)
        self.code_table: list[bytes] | None = None
        # Arguments of _ringhash.locate_block, which does a whole block in C.
        self.block_args: tuple | None = None
        if ring.hash_type != "jump_fnv1a_ch":
            rows = ring._owner_rows[ring._start_of_position]
            self.position_texts, self.position_index = _suffix_table(ring, rows)
            kind = 0 if ring.hash_type == "carbon_ch" else 1
            table = self.position_index.astype(np.int64).tobytes()
            self.block_args = (kind, ring.signed_char, table, self.position_texts, b"", 1)
        else:
            self.code_table = _code_table(ring)
            if self.code_table is not None:
                order = ring.bucket_order.astype(np.int64).tobytes()
                self.block_args = (2, True, b"", self.code_table, order, ring.replication)
        if hashes._ringhash is None or not hasattr(hashes._ringhash, "locate_block"):
            self.block_args = None

    def format(self, names: list[bytes]) -> bytes:
        if self.ring.hash_type != "jump_fnv1a_ch":
            indices = self.position_index[self.ring.positions(names)]
            return join_lines(names, self.position_texts, indices)
        rows = self.ring.locate_batch(names)
        if self.code_table is not None:
            return join_lines(names, self.code_table, _row_codes(self.ring, rows))
        texts, indices = _suffix_table(self.ring, rows)
        return join_lines(names, texts, indices)

    def format_block(self, block: bytes, line_no: int) -> bytes:
        if self.block_args is not None:
            if self.allowed_chars is not None:
                block = rewrite_block(block, self.allowed_chars)
            check_utf8(block, line_no)
            return hashes._ringhash.locate_block(block, *self.block_args)
        names = names_in(block, line_no, self.allowed_chars)
        return self.format(names) if names else b""


def locate_stream(locator: Locator, source: BinaryIO, out: BinaryIO) -> None:
    """Stream source to out block by block: memory stays flat on any input size.

    With the C loop (which releases the GIL) a second thread formats the next
    block while this one reads and writes; output order is input order.
    """
    if locator.block_args is None:
        for block in read_blocks(source):
            out.write(locator.format_block(*block))
        return
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque[Future[bytes]] = deque()
        for block in read_blocks(source):
            pending.append(pool.submit(locator.format_block, *block))
            if len(pending) > 2:
                out.write(pending.popleft().result())
        while pending:
            out.write(pending.popleft().result())

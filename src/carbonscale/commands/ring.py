"""`carbonscale ring`: where metrics live (locate), what a member change moves (diff),
and how evenly a ring spreads (balance)."""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.relay_names import DEFAULT_ALLOWED_CHARS, rewrite_block
from carbonscale.ring import (
    COMPATS,
    HASH_TYPES,
    Ring,
    RingDiff,
    parse_member,
    parse_relay_config,
    select_cluster,
    suggest_instances,
)
from carbonscale.ring import _ringhash as _ringhash

BLOCK_BYTES = 1 << 20  # read and write in 1 MiB blocks (two threads format them)
SAMPLE_NAMES = 100_000


# ----- shared plumbing ------------------------------------------------------


def _add_ring_options(parser: argparse.ArgumentParser, with_config: bool = True) -> None:
    parser.add_argument("--hash", choices=HASH_TYPES, help="hash type")
    parser.add_argument(
        "--compat",
        choices=COMPATS,
        default="carbon-c-relay",
        help="whose placement to follow (default carbon-c-relay, the relay we deploy)",
    )
    parser.add_argument(
        "--replication", type=int, default=1, help="copies of each metric (default 1)"
    )
    if with_config:
        parser.add_argument(
            "--relay-config",
            metavar="FILE",
            help="take hash, replication and members from a carbon-c-relay config",
        )
        parser.add_argument("--cluster", metavar="NAME", help="the cluster of the relay config")
    parser.add_argument(
        "--allowed-chars",
        metavar="CHARS",
        default=DEFAULT_ALLOWED_CHARS.decode(),
        help="the relay's -c: characters kept in names next to [A-Za-z0-9] (default %(default)s)",
    )
    parser.add_argument(
        "--raw-names",
        action="store_true",
        help="hash names as given, as `carbon-c-relay -t` does (the live relay rewrites them)",
    )


def name_rewrite(args: argparse.Namespace, ring: Ring) -> bytes | None:
    """The allowed characters of the relay's name rewrite, or None to hash names as given.

    carbon-c-relay rewrites every name before hashing it (carbonscale.relay_names);
    carbon's Python relay does not.
    """
    if ring.compat != "carbon-c-relay" or args.raw_names:
        return None
    allowed = os.fsencode(args.allowed_chars)
    if any(byte in b" \t\n\r\x0b\x0c.\0" for byte in allowed):
        raise CarbonscaleError("--allowed-chars cannot hold whitespace, '.' or NUL")
    return allowed


def make_ring(
    members: Sequence[str],
    hash_type: str | None,
    compat: str,
    replication: int,
    relay_config: str | None = None,
    cluster: str | None = None,
    what: str = "",
) -> Ring:
    """A ring from members and options, or from a carbon-c-relay config file."""
    if relay_config:
        if members:
            raise CarbonscaleError(f"give {what}members or a relay config, not both")
        try:
            with open(relay_config, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise CarbonscaleError(
                f"cannot read relay config {relay_config}: {exc.strerror}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise CarbonscaleError(f"relay config {relay_config} is not valid UTF-8") from exc
        return select_cluster(parse_relay_config(text), cluster, relay_config).ring()
    if not hash_type:
        raise CarbonscaleError("--hash is required without a relay config")
    if not members:
        raise CarbonscaleError(f"no {what}members given")
    return Ring([parse_member(m) for m in members], hash_type, compat, replication)


def shadowed_warning(ring: Ring) -> str | None:
    """A warning naming members that can never receive a metric, if any."""
    shadowed = ring.shadowed_members()
    if not shadowed:
        return None
    why = " (fnv1a_ch hashes the instance alone: give every member its own instance)"
    return (
        f"{len(shadowed)} member(s) own no ring position and receive nothing: "
        + ", ".join(str(m) for m in shadowed)
        + (why if ring.hash_type == "fnv1a_ch" else "")
    )


def _ring_from(args: argparse.Namespace) -> Ring:
    ring = make_ring(
        args.members, args.hash, args.compat, args.replication, args.relay_config, args.cluster
    )
    warning = shadowed_warning(ring)
    if warning:
        print(f"carbonscale: warning: {warning}", file=sys.stderr)
    return ring


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
    if _ringhash is not None:
        return _ringhash.join_lines(names, suffixes, indices.astype(np.int64).tobytes())
    parts: list[bytes] = [b""] * (2 * len(names))
    parts[::2] = names
    parts[1::2] = list(map(suffixes.__getitem__, indices.tolist()))
    return b"".join(parts)


def _owner_text(ring: Ring, rows: np.ndarray, sep: str = "\t") -> list[str]:
    return [sep.join(ring.members[i].address for i in row) for row in rows.tolist()]


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
        if _ringhash is None or not hasattr(_ringhash, "locate_block"):
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
            return _ringhash.locate_block(block, *self.block_args)
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


# ----- verbs ---------------------------------------------------------------


def run_locate(args: argparse.Namespace) -> int:
    ring = _ring_from(args)
    locator = Locator(ring, name_rewrite(args, ring))
    locate_stream(locator, sys.stdin.buffer, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


def run_diff(args: argparse.Namespace) -> int:
    old = make_ring(
        args.old, args.hash, args.compat, args.replication,
        args.old_relay_config, args.old_cluster, "old ",
    )  # fmt: skip
    new = make_ring(
        args.new, args.new_hash or args.hash, args.compat, args.new_replication or args.replication,
        args.new_relay_config, args.new_cluster, "new ",
    )  # fmt: skip
    for side, ring in (("old", old), ("new", new)):
        warning = shadowed_warning(ring)
        if warning:
            print(f"carbonscale: warning: {side} ring: {warning}", file=sys.stderr)
    diff = RingDiff(old, new)
    out = sys.stdout.buffer
    for names in read_names(sys.stdin.buffer, name_rewrite(args, old)):
        changed, old_rows, new_rows = diff.add(names)
        if not args.summary and changed.size:
            out.write(
                b"".join(
                    b"%s\t%s\t%s\n" % (names[i], a.encode(), b.encode())
                    for i, a, b in zip(
                        changed.tolist(),
                        _owner_text(old, old_rows[changed], ","),
                        _owner_text(new, new_rows[changed], ","),
                        strict=True,
                    )
                )
            )
    out.flush()
    report = sys.stdout if args.summary else sys.stderr
    print(f"moved {diff.moved} of {diff.total} metrics ({diff.fraction:.2%})", file=report)
    print("primary owner, from (rows) -> to (columns):", file=report)
    table = diff.matrix_by_label()
    columns = sorted({dst for row in table.values() for dst in row})
    width = max(len(label) for label in [*table, *columns]) if table else 0
    print(" " * width + "".join(f"  {label:>{width}}" for label in columns), file=report)
    for src, row in table.items():
        cells = "".join(f"  {row.get(dst, 0):>{width}}" for dst in columns)
        print(f"{src:<{width}}{cells}", file=report)
    return 0


def _sample(args: argparse.Namespace, allowed_chars: bytes | None = None) -> list[bytes]:
    if args.names:
        source = sys.stdin.buffer if args.names == "-" else None
        try:
            handle = source or open(args.names, "rb")  # noqa: SIM115
        except OSError as exc:
            raise CarbonscaleError(f"cannot read names file {args.names}: {exc.strerror}") from exc
        with handle:
            return [name for block in read_names(handle, allowed_chars) for name in block]
    return [f"carbonscale.sample.{i:07d}.value".encode() for i in range(args.sample)]


def _balance_table(ring: Ring, names: list[bytes]) -> tuple[list[str], np.ndarray]:
    count = len(ring.members)
    rows = ring.locate_batch(names) if names else np.zeros((0, ring.replication), np.int64)
    primary = np.bincount(rows[:, 0], minlength=count) / max(len(names), 1)
    copies = np.bincount(rows.reshape(-1), minlength=count) / max(len(names), 1)
    if ring.hash_type == "jump_fnv1a_ch":
        positions = np.full(count, 1.0 / count)
        header = "member                          buckets  names(primary)  names(any copy)"
    else:
        positions = ring.primary_share_of_positions()
        header = "member                          ring     names(primary)  names(any copy)"
    lines = [header]
    for i, member in enumerate(ring.members):
        lines.append(
            f"{member.relay_syntax:<30}  {positions[i]:7.3%}  {primary[i]:14.3%}  {copies[i]:15.3%}"
        )
    return lines, primary


def run_balance(args: argparse.Namespace) -> int:
    ring = _ring_from(args)
    names = _sample(args, name_rewrite(args, ring))
    lines, primary = _balance_table(ring, names)
    print("\n".join(lines))
    low = primary.min()
    ratio = float("inf") if low == 0 else primary.max() / low
    print(f"names: {len(names)}; max/min primary share: {ratio:.3f}")
    if ring.hash_type != "jump_fnv1a_ch":
        print(f"ring entries hidden by an equal position (collisions): {ring.collisions}")
    if args.suggest_instances:
        if ring.hash_type != "carbon_ch" or ring.compat != "carbon-c-relay":
            raise CarbonscaleError(
                "--suggest-instances searches carbon_ch rings for carbon-c-relay"
            )
        suggested, before, after = suggest_instances(ring.members, rounds=args.rounds)
        print(f"suggested instances (max/min share of ring positions {before:.3f} -> {after:.3f}):")
        for member in suggested:
            print(f"    {member.relay_syntax}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ring", help="consistent-hash ring placement")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    locate = verbs.add_parser(
        "locate",
        help="owners of each metric read from stdin",
        description=(
            "Read metric names (the first field of each line, so line protocol works) and "
            "print metric<TAB>host:port[<TAB>host:port...], primary first."
        ),
    )
    _add_ring_options(locate)
    locate.add_argument("members", nargs="*", metavar="MEMBER", help="host[:port][=instance]")
    locate.set_defaults(func=run_locate)

    diff = verbs.add_parser(
        "diff",
        help="what a member change moves",
        description=(
            "Read metric names from stdin; print metric<TAB>old owners<TAB>new owners for every "
            "metric whose owners change, then (on stderr) the moved fraction and a from -> to "
            "matrix of primary owners. The new ring takes the old ring's settings unless given."
        ),
    )
    _add_ring_options(diff, with_config=False)
    diff.add_argument(
        "--new-hash", choices=HASH_TYPES, help="hash of the new ring (default --hash)"
    )
    diff.add_argument("--new-replication", type=int, help="replication of the new ring")
    for side in ("old", "new"):
        diff.add_argument(f"--{side}-relay-config", metavar="FILE", help=f"{side} relay config")
        diff.add_argument(f"--{side}-cluster", metavar="NAME", help=f"cluster in the {side} config")
    diff.add_argument("--old", nargs="*", default=[], metavar="MEMBER", help="old members")
    diff.add_argument("--new", nargs="*", default=[], metavar="MEMBER", help="new members")
    diff.add_argument("--summary", action="store_true", help="print only the summary, on stdout")
    diff.set_defaults(func=run_diff)

    balance = verbs.add_parser(
        "balance",
        help="how evenly a ring spreads metrics",
        description=(
            "Share of ring positions and of a sample of names per member, collisions, and "
            "optionally instance names that balance a carbon_ch ring."
        ),
    )
    _add_ring_options(balance)
    balance.add_argument("members", nargs="*", metavar="MEMBER", help="host[:port][=instance]")
    balance.add_argument("--names", metavar="FILE", help="sample names from FILE ('-': stdin)")
    balance.add_argument(
        "--sample", type=int, default=SAMPLE_NAMES, help="synthetic sample size without --names"
    )
    balance.add_argument(
        "--suggest-instances",
        action="store_true",
        help="search instance names that balance a carbon_ch ring (like buckytools findhash)",
    )
    balance.add_argument("--rounds", type=int, default=2, help="search passes (default 2)")
    balance.set_defaults(func=run_balance)

"""`carbonscale ring`: where metrics live (locate), what a member change moves (diff),
and how evenly a ring spreads (balance)."""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.ring import (
    COMPATS,
    HASH_TYPES,
    Member,
    Ring,
    parse_member,
    parse_relay_config,
    select_cluster,
    suggest_instances,
)

BLOCK_BYTES = 1 << 20  # read and write in 1 MiB blocks (even work for the workers)
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


def _ring_from(args: argparse.Namespace) -> Ring:
    return make_ring(
        args.members, args.hash, args.compat, args.replication, args.relay_config, args.cluster
    )


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


def names_in(block: bytes, line_no: int = 1) -> list[bytes]:
    """Metric names of a block of lines: the first whitespace-separated field.

    Invalid UTF-8 stops everything with the line number: a name the relay
    would route is a name we must be able to print and compare.
    """
    try:
        block.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = line_no + block.count(b"\n", 0, exc.start)
        raise CarbonscaleError(f"line {bad}: metric name is not valid UTF-8") from exc
    lines = block.split(b"\n")
    if b" " in block or b"\t" in block or b"\r" in block:
        return [fields[0] for fields in map(bytes.split, lines) if fields]
    return [line for line in lines if line]


def read_names(stream: BinaryIO) -> Iterator[list[bytes]]:
    for block, line_no in read_blocks(stream):
        names = names_in(block, line_no)
        if names:
            yield names


def interleave(names: list[bytes], suffixes: list[bytes]) -> bytes:
    """b"".join of name, suffix, name, suffix... without building name+suffix objects."""
    parts: list[bytes] = [b""] * (2 * len(names))
    parts[::2] = names
    parts[1::2] = suffixes
    return b"".join(parts)


def _owner_text(ring: Ring, rows: np.ndarray) -> list[str]:
    return ["\t".join(ring.members[i].address for i in row) for row in rows.tolist()]


def _row_codes(ring: Ring, rows: np.ndarray) -> np.ndarray:
    """One integer per owner row (members in base len(members))."""
    codes = np.zeros(len(rows), dtype=np.int64)
    for column in range(rows.shape[1]):
        codes = codes * len(ring.members) + rows[:, column]
    return codes


def _suffixes(ring: Ring, rows: np.ndarray) -> list[bytes]:
    """`\\towner[\\towner]\\n` for each row, built once per distinct row."""
    uniques, inverse = np.unique(_row_codes(ring, rows), return_inverse=True)
    first = np.zeros(len(uniques), dtype=np.int64)
    first[inverse[::-1]] = np.arange(len(rows))[::-1]
    text = [("\t" + t + "\n").encode() for t in _owner_text(ring, rows[first])]
    return list(map(text.__getitem__, inverse.tolist()))


class Locator:
    """Formats `metric<TAB>owner...` lines for batches of names, fast.

    carbon_ch and fnv1a_ch depend only on a 16-bit position, so the owner
    text of all 65536 positions is built once; jump builds it per batch.
    """

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.by_position: list[bytes] | None = None
        if ring.hash_type != "jump_fnv1a_ch":
            rows = ring._owner_rows[ring._start_of_position]
            self.by_position = _suffixes(ring, rows)

    def format(self, names: list[bytes]) -> bytes:
        if self.by_position is not None:
            table = self.by_position
            suffixes = list(map(table.__getitem__, self.ring.positions(names).tolist()))
        else:
            suffixes = _suffixes(self.ring, self.ring.locate_batch(names))
        return interleave(names, suffixes)

    def format_block(self, block: bytes, line_no: int) -> bytes:
        names = names_in(block, line_no)
        return self.format(names) if names else b""


# The locator a forked worker inherits (set before the pool forks).
_WORKER_LOCATOR: Locator | None = None


def _format_in_worker(block: bytes, line_no: int) -> bytes:
    assert _WORKER_LOCATOR is not None
    return _WORKER_LOCATOR.format_block(block, line_no)


def locate_stream(locator: Locator, source: BinaryIO, out: BinaryIO, jobs: int) -> None:
    """Stream source to out in blocks; with jobs > 1 blocks are formatted by forked
    workers, in order, with a bounded number in flight (memory stays flat)."""
    blocks = read_blocks(source)
    first = next(blocks, None)
    if first is None:
        return
    second = next(blocks, None)
    if jobs <= 1 or second is None:
        out.write(locator.format_block(*first))
        if second is not None:
            out.write(locator.format_block(*second))
        for block in blocks:
            out.write(locator.format_block(*block))
        return
    global _WORKER_LOCATOR
    _WORKER_LOCATOR = locator
    pending: deque = deque()
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for block in itertools.chain((first, second), blocks):
            pending.append(pool.apply_async(_format_in_worker, block))
            if len(pending) >= 2 * jobs:
                out.write(pending.popleft().get())
        while pending:
            out.write(pending.popleft().get())


# ----- verbs ---------------------------------------------------------------


def run_locate(args: argparse.Namespace) -> int:
    locator = Locator(_ring_from(args))
    locate_stream(locator, sys.stdin.buffer, sys.stdout.buffer, _jobs(args.jobs))
    sys.stdout.buffer.flush()
    return 0


def _jobs(requested: int | None) -> int:
    if requested is None:
        return min(os.cpu_count() or 1, 4)
    if requested < 1:
        raise CarbonscaleError(f"--jobs must be >= 1, got {requested}")
    return requested


def _member_label(member: Member) -> str:
    return member.relay_syntax


def run_diff(args: argparse.Namespace) -> int:
    old = make_ring(
        args.old, args.hash, args.compat, args.replication,
        args.old_relay_config, args.old_cluster, "old ",
    )  # fmt: skip
    new = make_ring(
        args.new, args.new_hash or args.hash, args.compat, args.new_replication or args.replication,
        args.new_relay_config, args.new_cluster, "new ",
    )  # fmt: skip
    out = sys.stdout.buffer
    old_labels = [_member_label(m) for m in old.members]
    new_labels = [_member_label(m) for m in new.members]
    matrix: dict[tuple[int, int], int] = {}
    total = moved = 0
    for names in read_names(sys.stdin.buffer):
        old_rows, new_rows = old.locate_batch(names), new.locate_batch(names)
        pairs = np.stack([old_rows[:, 0], new_rows[:, 0]], axis=1)
        keys, counts = np.unique(pairs, axis=0, return_counts=True)
        for (src, dst), count in zip(keys.tolist(), counts.tolist(), strict=True):
            matrix[(src, dst)] = matrix.get((src, dst), 0) + count
        total += len(names)
        # A metric moves when its set of owners changes (a new replica order
        # alone moves no data).
        changed = np.nonzero((np.sort(old_rows, axis=1) != np.sort(new_rows, axis=1)).any(axis=1))[
            0
        ]
        moved += changed.size
        if not args.summary and changed.size:
            old_text = _owner_text(old, old_rows[changed])
            new_text = _owner_text(new, new_rows[changed])
            lines = [
                b"%s\t%s\t%s\n"
                % (names[i], a.replace("\t", ",").encode(), b.replace("\t", ",").encode())
                for i, a, b in zip(changed.tolist(), old_text, new_text, strict=True)
            ]
            out.write(b"".join(lines))
    out.flush()
    report = sys.stdout if args.summary else sys.stderr
    fraction = moved / total if total else 0.0
    print(f"moved {moved} of {total} metrics ({fraction:.2%})", file=report)
    print("primary owner, from (rows) -> to (columns):", file=report)
    width = max(len(label) for label in old_labels + new_labels)
    used_new = sorted({dst for _, dst in matrix})
    print(" " * width + "".join(f"  {new_labels[d]:>{width}}" for d in used_new), file=report)
    for src in sorted({s for s, _ in matrix}):
        cells = "".join(f"  {matrix.get((src, d), 0):>{width}}" for d in used_new)
        print(f"{old_labels[src]:<{width}}{cells}", file=report)
    return 0


def _sample(args: argparse.Namespace) -> list[bytes]:
    if args.names:
        source = sys.stdin.buffer if args.names == "-" else None
        try:
            handle = source or open(args.names, "rb")  # noqa: SIM115
        except OSError as exc:
            raise CarbonscaleError(f"cannot read names file {args.names}: {exc.strerror}") from exc
        with handle:
            return [name for block in read_names(handle) for name in block]
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
    names = _sample(args)
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
    locate.add_argument(
        "--jobs", type=int, help="worker processes for large inputs (default: cores, up to 4)"
    )
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

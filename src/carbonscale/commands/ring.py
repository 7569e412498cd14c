"""`carbonscale ring`: where metrics live (locate), what a member change moves (diff),
and how evenly a ring spreads (balance)."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from carbonscale import CarbonscaleError, ExitStatus
from carbonscale.relay_names import DEFAULT_ALLOWED_CHARS
from carbonscale.ring import COMPATS, HASH_TYPES, Ring, RingDiff, suggest_instances

# The library side of these verbs; imported here too so that the names keep
# working from carbonscale.commands.ring, where they used to live.
from carbonscale.ring.build import make_ring, shadowed_warning
from carbonscale.ring.locate import (  # noqa: F401
    Locator,
    check_utf8,
    join_lines,
    locate_stream,
    names_in,
    read_blocks,
    read_names,
)

SAMPLE_NAMES = 100_000


# ----- shared plumbing ------------------------------------------------------


def _add_ring_options(parser: argparse.ArgumentParser, with_config: bool = True) -> None:
    parser.add_argument("--hash", choices=HASH_TYPES, help="hash type")
    parser.add_argument(
        "--compat",
        choices=COMPATS,
        default="carbon-c-relay",
        help="whose placement to follow (default %(default)s, the relay we deploy)",
    )
    parser.add_argument(
        "--replication", type=int, default=1, help="copies of each metric (default %(default)s)"
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


def _ring_from(args: argparse.Namespace) -> Ring:
    ring = make_ring(
        args.members, args.hash, args.compat, args.replication, args.relay_config, args.cluster
    )
    warning = shadowed_warning(ring)
    if warning:
        print(f"carbonscale: warning: {warning}", file=sys.stderr)
    return ring


def _owner_text(ring: Ring, rows: np.ndarray, sep: str = "\t") -> list[str]:
    return [sep.join(ring.members[i].address for i in row) for row in rows.tolist()]


# ----- verbs ---------------------------------------------------------------


def run_locate(args: argparse.Namespace) -> int:
    ring = _ring_from(args)
    locator = Locator(ring, name_rewrite(args, ring))
    locate_stream(locator, sys.stdin.buffer, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return ExitStatus.OK


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
    return ExitStatus.OK


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
    return ExitStatus.OK


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
        "--sample",
        type=int,
        default=SAMPLE_NAMES,
        help="synthetic sample size without --names (default %(default)s)",
    )
    balance.add_argument(
        "--suggest-instances",
        action="store_true",
        help="search instance names that balance a carbon_ch ring (like buckytools findhash)",
    )
    balance.add_argument(
        "--rounds", type=int, default=2, help="search passes (default %(default)s)"
    )
    balance.set_defaults(func=run_balance)

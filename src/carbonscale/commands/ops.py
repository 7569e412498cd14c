"""`carbonscale ops`: an operator's questions answered on one host, over its own
whisper tree, captured traffic or migration journal. The fabfile runs them on
every host of an inventory group with --json and merges the answers
(carbonscale.ops.*.merge_*); without --json each prints a table."""

from __future__ import annotations

import argparse
import json
import os
import sys

from carbonscale import CarbonscaleError, ExitStatus
from carbonscale.relay_names import DEFAULT_ALLOWED_CHARS
from carbonscale.ring import COMPATS, HASH_TYPES


def _ring_options(parser: argparse.ArgumentParser, required_self: bool = True) -> None:
    ring = parser.add_argument_group("the ring (a carbon-c-relay config, or members and hash)")
    ring.add_argument("--relay-config", metavar="FILE", help="the live relay config")
    ring.add_argument("--cluster", metavar="NAME", help="its consistent-hash cluster")
    ring.add_argument("--hash", choices=HASH_TYPES, help="hash type (with --member)")
    ring.add_argument("--compat", choices=COMPATS, default="carbon-c-relay")
    ring.add_argument("--replication", type=int, default=1)
    ring.add_argument(
        "--member", action="append", default=[], metavar="MEMBER", help="host:port=instance"
    )
    parser.add_argument(
        "--self",
        dest="self_host",
        required=required_self,
        metavar="ADDRESS",
        help="this host as the ring's members name it (its carbonscale_address)",
    )


def _ring(args: argparse.Namespace, optional: bool = False):
    from carbonscale.ring.build import make_ring

    if optional and not args.relay_config and not args.member:
        return None
    return make_ring(
        args.member, args.hash, args.compat, args.replication, args.relay_config, args.cluster
    )


def _root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, metavar="DIR", help="the whisper root")


def _out(args: argparse.Namespace, report, table: str) -> int:
    if args.json:
        json.dump(report, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(table)
    return ExitStatus.OK


def run_lookup(args: argparse.Namespace) -> int:
    from carbonscale.ops.lookup import lookup_here, lookup_table, merge_lookups

    report = lookup_here(args.root, _ring(args), args.self_host, args.metrics)
    return _out(args, report, lookup_table(merge_lookups({args.self_host: report})))


def run_du(args: argparse.Namespace) -> int:
    from carbonscale.ops.du import du_here, du_table

    ring = _ring(args, optional=True)
    if ring is not None and not args.self_host:
        raise CarbonscaleError("per-instance bytes need --self with the ring")
    report = du_here(args.root, ring, args.self_host, args.history, args.window)
    return _out(args, report, du_table({args.self_host or "this host": report}))


def run_inconsistent(args: argparse.Namespace) -> int:
    from carbonscale.ops.inconsistent import inconsistent_here, inconsistent_table

    report = inconsistent_here(args.root, _ring(args), args.self_host, args.list)
    return _out(args, report, inconsistent_table({args.self_host: report}, args.list))


def run_hot_metrics(args: argparse.Namespace) -> int:
    from carbonscale.ops import hotmetrics

    _fill_port_defaults(args)
    if (args.pcap is None) == (args.seconds is None):
        raise CarbonscaleError("give --pcap FILE or --seconds N (capture here with tcpdump)")
    if args.seconds is not None and args.seconds <= 0:
        raise CarbonscaleError("--seconds must be > 0")
    ring = _ring(args, optional=True)
    allowed = None
    if ring is not None and ring.compat == "carbon-c-relay":
        allowed = os.fsencode(args.allowed_chars)
    decoder = hotmetrics.Decoder(args.line_port, args.pickle_port, args.statsd_port)
    path = args.pcap
    if path is None:
        path = hotmetrics.temporary_capture_path()
        try:
            hotmetrics.capture(
                args.seconds,
                args.interface,
                [*args.line_port, *args.pickle_port, *args.statsd_port],
                path,
                args.line_port[0],
            )
            hotmetrics.decode_capture(path, decoder)
        finally:
            os.unlink(path)
    else:
        hotmetrics.decode_capture(path, decoder)
    report = hotmetrics.analyse(
        decoder, ring, allowed, args.statsd_backend, args.seconds, args.top, args.prefix_depth
    )
    merged = hotmetrics.merge_hot({"here": report}, args.top)
    return _out(args, report, hotmetrics.hot_table(merged))


def run_relays(args: argparse.Namespace) -> int:
    from carbonscale.ops.relays import merge_relays, relays_here, relays_table

    report = relays_here(args.root)
    return _out(args, report, relays_table(merge_relays({"here": report})))


def run_migration_status(args: argparse.Namespace) -> int:
    from carbonscale.ops.migration import migration_here, migration_table

    report = migration_here(args.state_dir, args.plan_id)
    return _out(args, report, migration_table({"this host": report}))


def run_stacks(args: argparse.Namespace) -> int:
    from carbonscale.ops.stacks import stack_errors, stacks_here, stacks_table

    if args.timeout <= 0:
        raise CarbonscaleError("--timeout must be > 0")
    report = stacks_here(args.instance, args.unit, args.timeout)
    _out(args, report, stacks_table({"": report}))
    errors = stack_errors({"": report})
    for line in errors:  # a unit that did not dump; the others are printed
        print(f"carbonscale: {line}", file=sys.stderr)
    return ExitStatus.PROBLEM if errors else ExitStatus.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ops",
        help="operator questions answered on this host (the fabfile runs them cluster-wide)",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    lookup = verbs.add_parser(
        "lookup", help="each metric's owners, and its file here (size, newest point)"
    )
    _root(lookup)
    _ring_options(lookup)
    lookup.add_argument("metrics", nargs="+", metavar="METRIC")
    lookup.set_defaults(func=run_lookup)

    du = verbs.add_parser(
        "du", help="whisper bytes and files, free space, growth, the date the disk fills"
    )
    _root(du)
    _ring_options(du, required_self=False)
    du.add_argument("--history", metavar="FILE", help="keep samples here for the growth rate")
    du.add_argument(
        "--window", type=float, default=86400.0, help="growth window in seconds (default a day)"
    )
    du.set_defaults(func=run_du)

    inconsistent = verbs.add_parser(
        "inconsistent", help="files here that the ring gives to other hosts"
    )
    _root(inconsistent)
    _ring_options(inconsistent)
    inconsistent.add_argument("--list", action="store_true", help="name every such metric")
    inconsistent.set_defaults(func=run_inconsistent)

    hot = verbs.add_parser(
        "hot-metrics",
        help="top metrics and prefixes by points/s in captured traffic, load per instance",
    )
    hot.add_argument("--pcap", metavar="FILE", help="analyse this pcap/pcapng file")
    hot.add_argument("--seconds", type=float, help="or capture this long here (tcpdump)")
    hot.add_argument("--interface", default="any", help="capture interface (default any)")
    for name, default in (("line", 2003), ("pickle", 2004), ("statsd", 8125)):
        hot.add_argument(
            f"--{name}-port",
            type=int,
            action="append",
            metavar="PORT",
            help=f"{name} protocol port (repeat; default {default})",
        )
    hot.add_argument(
        "--statsd-backend",
        action="append",
        default=[],
        metavar="HOST:PORT[:ADMIN]",
        help="the statsd relay's backends, in its order (repeat)",
    )
    hot.add_argument("--top", type=int, default=20, help="metrics and prefixes shown (0: all)")
    hot.add_argument("--prefix-depth", type=int, default=2, help="name components of a prefix")
    hot.add_argument(
        "--allowed-chars",
        default=DEFAULT_ALLOWED_CHARS.decode(),
        help="the relay's -c name rewrite (default %(default)s)",
    )
    _ring_options(hot, required_self=False)
    hot.set_defaults(func=run_hot_metrics)

    relays = verbs.add_parser(
        "relays", help="the relays' own counters held in this host's whisper tree"
    )
    _root(relays)
    relays.set_defaults(func=run_relays)

    migration = verbs.add_parser("migration-status", help="this host's migration journal")
    migration.add_argument("--state-dir", required=True, metavar="DIR")
    migration.add_argument("--plan-id", metavar="ID", help="only this plan")
    migration.set_defaults(func=run_migration_status)

    stacks = verbs.add_parser(
        "stacks",
        help="every thread's stack of a carbon-cache instance or carbonscale daemon here "
        "(signalled, read from its journal)",
    )
    stacks.add_argument(
        "--instance", action="append", default=[], metavar="NAME",
        help="a carbon-cache instance (repeat; with neither option: every instance and "
        "carbonscale daemon running here)",
    )  # fmt: skip
    stacks.add_argument(
        "--unit",
        action="append",
        default=[],
        help="a carbonscale daemon's unit, e.g. carbonscale-pickle-relay (repeat)",
    )
    stacks.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each dump (default 10)"
    )
    stacks.set_defaults(func=run_stacks)

    for verb in (lookup, du, inconsistent, hot, relays, migration, stacks):
        verb.add_argument("--json", action="store_true", help="print JSON (the fabfile reads it)")


def _fill_port_defaults(args: argparse.Namespace) -> None:
    args.line_port = args.line_port or [2003]
    args.pickle_port = args.pickle_port or [2004]
    args.statsd_port = args.statsd_port or [8125]

"""`carbonscale gen`: test metrics to stdout or to a listener."""

from __future__ import annotations

import argparse
import random
import sys
import time

from carbonscale import CarbonscaleError, ExitStatus
from carbonscale.gen import generate, metric_names
from carbonscale.sender import (
    FORMATS,
    PICKLE_FRAME_POINTS,
    STATSD_TYPES,
    batches,
    encode_line,
    encode_pickle,
    encode_statsd,
    parse_address,
    send,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gen",
        help="generate test metrics (gentestmetrics) and optionally send them",
        description=(
            "Generate test metrics like buckytools' gentestmetrics: line protocol on stdout, "
            "oldest timestamp first, or sent to a carbon or statsd listener."
        ),
    )
    parser.add_argument(
        "-c",
        type=int,
        default=1000,
        dest="count",
        help="number of metric names (default %(default)s)",
    )
    parser.add_argument(
        "-f", dest="names_file", help="file of metric names, one per line; overrides -c"
    )
    parser.add_argument(
        "-i",
        type=int,
        default=60,
        dest="interval",
        help="seconds between points (default %(default)s)",
    )
    parser.add_argument(
        "-l",
        type=int,
        default=100,
        dest="limit",
        help="random values are in [0, l) (default %(default)s)",
    )
    parser.add_argument(
        "-p", default="test.", dest="prefix", help='prefix of every name (default "%(default)s")'
    )
    parser.add_argument(
        "-s",
        type=int,
        dest="start",
        help="timestamp of the last point; iterations go backwards (default now)",
    )
    parser.add_argument(
        "-v", type=float, dest="value", help="use this value instead of random ones"
    )
    parser.add_argument(
        "-x",
        type=int,
        default=1,
        dest="points",
        help="points per metric name (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, help="random seed, for repeatable values")
    parser.add_argument("--send", metavar="HOST:PORT", help="send to a listener instead of stdout")
    parser.add_argument(
        "--format", choices=FORMATS, default="line", help="wire format (default %(default)s)"
    )
    parser.add_argument(
        "--rate", type=float, default=0, help="points per second when sending (0: unlimited)"
    )
    parser.add_argument(
        "--statsd-type",
        choices=STATSD_TYPES,
        default="c",
        help="statsd metric type (default %(default)s)",
    )
    parser.add_argument(
        "--packet-size",
        type=int,
        default=0,
        help="statsd: pack lines into datagrams of up to this many bytes (0: one per datagram)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = metric_names(args.count, args.prefix, args.names_file)
    points = generate(
        names,
        points=args.points,
        interval=args.interval,
        start=args.start,
        limit=args.limit,
        value=args.value,
        rng=random.Random(args.seed),
    )
    if args.send:
        address = parse_address(args.send)
        started = time.monotonic()
        sent = send(
            points,
            address,
            fmt=args.format,
            rate=args.rate,
            statsd_type=args.statsd_type,
            packet_size=args.packet_size,
        )
        elapsed = time.monotonic() - started
        print(
            f"sent {sent} points ({len(names)} names) to {args.send} "
            f"as {args.format} in {elapsed:.2f}s",
            file=sys.stderr,
        )
        return ExitStatus.OK
    out = sys.stdout.buffer
    if args.rate:
        raise CarbonscaleError("--rate applies to --send only")
    for batch in batches(points, 4096):
        if args.format == "line":
            out.write(encode_line(batch))
        elif args.format == "pickle":
            for frame in batches(batch, PICKLE_FRAME_POINTS):
                out.write(encode_pickle(frame))
        else:
            out.write(b"".join(line + b"\n" for line in encode_statsd(batch, args.statsd_type)))
    out.flush()
    return ExitStatus.OK

"""`carbonscale health`: flap-damped checks for load balancers.

`carbonscale health statsd|tcp HOST PORT --state FILE` is one check run (for
keepalived's MISC_CHECK): exit 0 when the server may be used, 1 when it is
down or suppressed for flapping. `carbonscale health pool CONFIG` is the
checker of the userspace pool (nginx stream) on directors without IPVS.
`carbonscale health planned HOST --seconds N` announces a restart of HOST on a
director: its checks' state changes in the next N seconds are no flaps.
`carbonscale health path HOST PORT` proves a TCP proxy on HOST:PORT reaches a
relay (the pool daemon runs it every round for keepalived's track script).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime

from carbonscale import ExitStatus
from carbonscale.flap import (
    DEFAULT_HALF_LIFE,
    DEFAULT_PENALTY,
    DEFAULT_REUSE_LIMIT,
    DEFAULT_STATE_DIR,
    DEFAULT_SUPPRESS_LIMIT,
    PlannedRestarts,
)
from carbonscale.health import damped_check, damper_from, proxied_path
from carbonscale.lvs_pool import Pool


def _flap_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        metavar="FILE",
        help="flap state file kept across runs (without it the check is undamped)",
    )
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds (default %(default)g)")
    parser.add_argument(
        "--half-life", type=float, default=DEFAULT_HALF_LIFE, help="seconds (default %(default)g)"
    )
    parser.add_argument(
        "--reuse-limit", type=float, default=DEFAULT_REUSE_LIMIT, help="(default %(default)g)"
    )
    parser.add_argument(
        "--suppress-limit", type=float, default=DEFAULT_SUPPRESS_LIMIT, help="(default %(default)g)"
    )
    parser.add_argument(
        "--penalty",
        type=float,
        default=DEFAULT_PENALTY,
        help="per state change (default %(default)g)",
    )
    parser.add_argument(
        "--peer-max-age",
        type=float,
        default=30.0,
        help="other servers of the service count when checked within this many seconds "
        "(default %(default)g); a suppressed server is kept when none of them is usable",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "health",
        help="flap-damped health checks (keepalived MISC_CHECK, userspace pool)",
        description=__doc__.split("\n\n", 1)[1],
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for kind, text in (
        ("statsd", "ask a statsd admin port `health` (reply `health: up`)"),
        ("tcp", "connect to a TCP port"),
    ):
        check = verbs.add_parser(kind, help=text, description=text + "; exit 0 usable, 1 not")
        check.add_argument("host")
        check.add_argument("port", type=int)
        _flap_args(check)
        check.set_defaults(func=run_check, kind=kind)

    pool = verbs.add_parser(
        "pool",
        help="check real servers and keep nginx's stream upstreams up to date",
        description=(
            "Check every real server of the pool config with flap damping and rewrite "
            "nginx's upstreams when the usable set changes (nginx -t, then reload)."
        ),
    )
    pool.add_argument("config", help="pool config (JSON, written by the lvs_director role)")
    pool.add_argument(
        "--init",
        action="store_true",
        help="only write the upstreams, every server in, if the file is missing; print "
        "'created' or 'kept'",
    )
    pool.add_argument("--rounds", type=int, help="stop after N rounds (default: run forever)")
    pool.set_defaults(func=run_pool)

    path = verbs.add_parser(
        "path",
        help="prove a TCP proxy (the directors' nginx) reaches a relay; exit 0 yes, 1 no",
        description=(
            "Connect through the proxy; the connection must stay open for --hold seconds "
            "(a proxy that reaches no relay closes it) and close cleanly within --timeout "
            "once we close ours (a connection nobody accepted never does)."
        ),
    )
    path.add_argument("host")
    path.add_argument("port", type=int)
    path.add_argument("--timeout", type=float, default=1.0, help="seconds (default %(default)g)")
    path.add_argument("--hold", type=float, default=0.3, help="seconds (default %(default)g)")
    path.set_defaults(func=run_path)

    planned = verbs.add_parser(
        "planned",
        help="announce a planned restart of a host: no flap penalty for N seconds",
        description=(
            "Mark HOST (a real server's address, as the checks name it) planned on this "
            "director for N seconds: its up/down changes then add no flap penalty. "
            "--seconds 0 ends the window."
        ),
    )
    planned.add_argument("host")
    planned.add_argument("--seconds", type=float, required=True, help="length of the window")
    planned.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help="the directors' flap state directory (default %(default)s)",
    )
    planned.set_defaults(func=run_planned)


def run_check(args: argparse.Namespace) -> int:
    damper = damper_from(
        {
            "half_life": args.half_life,
            "reuse_limit": args.reuse_limit,
            "suppress_limit": args.suppress_limit,
            "penalty": args.penalty,
        }
    )
    result = damped_check(
        args.kind,
        args.host,
        args.port,
        damper,
        args.state,
        args.timeout,
        peer_max_age=args.peer_max_age,
    )
    if not args.quiet:
        print(f"{args.kind} {args.host}:{args.port} {result.describe(damper)}")
    return ExitStatus.OK if result.usable else ExitStatus.PROBLEM


def run_pool(args: argparse.Namespace) -> int:
    pool = Pool.load(args.config)
    if args.init:
        print("created" if pool.init() else "kept")
        return ExitStatus.OK
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(message)s")
    pool.run(args.rounds)
    return ExitStatus.OK


def run_planned(args: argparse.Namespace) -> int:
    until = PlannedRestarts(args.state_dir).mark(args.host, args.seconds, time.time())
    if args.seconds:
        stamp = datetime.fromtimestamp(until, UTC).strftime("%H:%M:%SZ")
        print(f"{args.host}: restart planned until {stamp}")
    else:
        print(f"{args.host}: no restart planned")
    return ExitStatus.OK


def run_path(args: argparse.Namespace) -> int:
    ok, why = proxied_path(args.host, args.port, args.timeout, args.hold)
    print(f"path {args.host}:{args.port} {'ok' if ok else 'failed'}: {why}")
    return ExitStatus.OK if ok else ExitStatus.PROBLEM

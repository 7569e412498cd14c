"""`carbonscale report`: losses that would be silent, sent to carbon as counters.

restarts      systemd's automatic restarts of units (carbon-cache instances that
              died and lost what they held), a timer on storage nodes runs it
nginx-errors  connections the directors' nginx refused or could not pass on,
              counted from its error log, a timer on directors runs it

Each point goes to the first --destination that takes it.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from carbonscale import ExitStatus


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="loss counters to carbon: carbon-cache restarts, nginx refusals",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_: str, func, prefix_example: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_, description=help_)
        sub.add_argument("--prefix", required=True, help=f"metric prefix, e.g. {prefix_example}")
        sub.add_argument(
            "--destination",
            metavar="HOST:PORT",
            action="append",
            default=[],
            help="a carbon line receiver; repeat it for fallbacks, tried in order",
        )
        sub.add_argument(
            "--dry-run", action="store_true", help="print the lines instead of sending them"
        )
        sub.set_defaults(func=func)
        return sub

    restarts = verb(
        "restarts",
        "send each unit's automatic restarts (NRestarts) and whether it runs",
        run_restarts,
        "carbonscale.storage.HOST (then .INSTANCE.restarts)",
    )
    restarts.add_argument("units", nargs="+", metavar="UNIT", help="e.g. carbon-cache@a.service")
    nginx = verb(
        "nginx-errors",
        "count the refusals in nginx's error log since the last run and send the totals",
        run_nginx_errors,
        "carbonscale.lvs.HOST.nginx",
    )
    nginx.add_argument(
        "--log",
        type=Path,
        default=Path("/var/log/nginx/error.log"),
        help="nginx's error log (default %(default)s)",
    )
    nginx.add_argument(
        "--state",
        type=Path,
        required=True,
        help="JSON file with the totals and where the last run stopped reading",
    )


def _send(args: argparse.Namespace, points) -> int:
    from carbonscale import CarbonscaleError
    from carbonscale.sender import encode_line, report

    if args.dry_run:
        sys.stdout.write(encode_line(points).decode())
        return ExitStatus.OK
    if not args.destination:
        raise CarbonscaleError("no destination: pass --destination HOST:PORT")
    took = report(points, args.destination)
    print(f"{socket.gethostname()}: sent {len(points)} points to {took}", file=sys.stderr)
    return ExitStatus.OK


def run_restarts(args: argparse.Namespace) -> int:
    from carbonscale.losses import restart_points, unit_states

    points = restart_points(args.prefix, unit_states(args.units), int(time.time()))
    return _send(args, points)


def run_nginx_errors(args: argparse.Namespace) -> int:
    from carbonscale.losses import NginxErrorLog, nginx_error_points

    log = NginxErrorLog(args.log, args.state)
    counts = log.update()
    if not args.dry_run:
        # Saved before sending: the totals are cumulative, so a report that
        # does not arrive is made up by the next one.
        log.save()
    return _send(args, nginx_error_points(args.prefix, counts, int(time.time())))

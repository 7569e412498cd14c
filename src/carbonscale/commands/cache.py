"""`carbonscale cache`: the SSD write-back cache under the whisper filesystem.

check   are the backend's programs and kernel target there
start   at boot, before the whisper mount: load the cache (or --create it) and set it up
status  dirty blocks now
halt    the safe-halt hook: stop carbon, sync, unmount, flush, remove (bounded)
report  send the dirty-block count to carbon (a timer runs it every minute)
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from carbonscale import ExitStatus

DEFAULT_CONFIG = "/etc/carbonscale/ssd-cache.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="the SSD write-back cache under whisper: check, start, status, halt, report",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_: str, func) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_, description=help_)
        sub.add_argument(
            "--config",
            default=DEFAULT_CONFIG,
            help="the cache's JSON config, from the ssd_cache role (default %(default)s)",
        )
        sub.set_defaults(func=func)
        return sub

    verb("check", "check that the backend's programs and kernel target are there", run_check)
    start = verb(
        "start",
        "load the cache and apply its settings (boot, before the whisper filesystem is mounted)",
        run_start,
    )
    start.add_argument(
        "--create",
        action="store_true",
        help="create (flashcache) or attach (lvmcache) a missing cache; never wipes one",
    )
    start.add_argument("--json", action="store_true", help="print {changed, changes} as JSON")
    status = verb("status", "print the cache's dirty blocks", run_status)
    status.add_argument("--json", action="store_true", help="print the state as JSON")
    verb(
        "halt",
        "stop carbon, sync, unmount whisper, flush and remove the cache, within a timeout",
        run_halt,
    )
    report = verb("report", "send the dirty-block count to carbon", run_report)
    report.add_argument(
        "--destination",
        metavar="HOST:PORT",
        help="carbon line receiver (default: the config's report.destination)",
    )
    report.add_argument("--prefix", help="metric prefix (default: the config's report.prefix)")
    report.add_argument(
        "--dry-run", action="store_true", help="print the lines instead of sending them"
    )


def _backend(args: argparse.Namespace):
    from carbonscale.cache import backend_for, load_config

    return backend_for(load_config(args.config))


def run_check(args: argparse.Namespace) -> int:
    from carbonscale.cache import check

    backend = _backend(args)
    check(backend)
    print(f"{backend.kind}: programs and kernel target present")
    return ExitStatus.OK


def run_start(args: argparse.Namespace) -> int:
    from carbonscale.cache import start

    backend = _backend(args)
    changes = start(backend, create=args.create)
    if args.json:
        print(json.dumps({"changed": bool(changes), "changes": changes}))
    else:
        for change in changes:
            print(change)
        if not changes:
            print(f"{backend.describe()}: already up as configured")
    return ExitStatus.OK


def run_status(args: argparse.Namespace) -> int:
    backend = _backend(args)
    state = backend.state()
    if args.json:
        print(json.dumps({"device": backend.describe(), **state.__dict__}))
    else:
        print(f"{backend.describe()}: {state.describe()}")
    return ExitStatus.OK


def run_halt(args: argparse.Namespace) -> int:
    from carbonscale.cache import halt

    def log(line: str) -> None:
        print(line, flush=True)

    return halt(_backend(args), log)


def run_report(args: argparse.Namespace) -> int:
    from carbonscale.cache import metric_points, report
    from carbonscale.sender import encode_line

    backend = _backend(args)
    config = backend.config
    prefix = args.prefix or config.report_prefix
    destination = args.destination or config.report_destination
    points = metric_points(prefix, backend.state(), int(time.time()))
    if args.dry_run:
        sys.stdout.write(encode_line(points).decode())
        return ExitStatus.OK
    if not destination:
        from carbonscale import CarbonscaleError

        raise CarbonscaleError(
            "no destination: pass --destination HOST:PORT or set report.destination"
        )
    report(points, destination)
    print(f"{socket.gethostname()}: sent {len(points)} points to {destination}", file=sys.stderr)
    return ExitStatus.OK

"""`carbonscale lvs`: the LVS directors.

config-test  keepalived --config-test on a file, working around keepalived
             2.2.7 killing its own test when scripts run as a non-root user
engine       which data path this kernel gets for lvs_engine (auto, ipvs, nginx)
nofile       did every nginx worker get the open files it asks for?
nofile-ceiling  can systemd (PID 1) give a unit that many open files at all?
"""

from __future__ import annotations

import argparse
import sys

from carbonscale import ExitStatus


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lvs",
        help="the LVS directors: keepalived config test, data path detection",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    test = verbs.add_parser(
        "config-test",
        help="validate a keepalived configuration (exit code of keepalived --config-test)",
    )
    test.add_argument("config", help="the keepalived configuration file")
    test.add_argument("--keepalived", default="keepalived", help="the keepalived binary")
    test.set_defaults(func=run_config_test)
    engine = verbs.add_parser("engine", help="print the data path lvs_engine resolves to here")
    engine.add_argument("requested", nargs="?", default="auto", help="auto, ipvs or nginx")
    engine.set_defaults(func=run_engine)
    nofile = verbs.add_parser(
        "nofile", help="exit 1 unless every nginx worker may open NEED files (/proc)"
    )
    nofile.add_argument("pidfile", help="nginx's pid file (/run/nginx.pid)")
    nofile.add_argument("need", type=int, help="worker_rlimit_nofile")
    nofile.set_defaults(func=run_nofile)
    ceiling = verbs.add_parser(
        "nofile-ceiling", help="exit 1 when the service manager cannot grant NEED open files"
    )
    ceiling.add_argument("need", type=int, help="the LimitNOFILE a unit asks for")
    ceiling.add_argument("--pid", type=int, default=1, help="the service manager (default 1)")
    ceiling.set_defaults(func=run_nofile_ceiling)


def run_config_test(args: argparse.Namespace) -> int:
    from carbonscale.lvs import keepalived_config_test

    code, output = keepalived_config_test(args.config, args.keepalived)
    if code != 0:
        sys.stderr.write(output or f"keepalived --config-test exited {code}\n")
        print(
            f"carbonscale: {args.config}: keepalived --config-test failed ({code})", file=sys.stderr
        )
        return ExitStatus.PROBLEM
    return ExitStatus.OK


def run_engine(args: argparse.Namespace) -> int:
    from carbonscale.lvs import ipvs_available, resolve_engine

    engine = resolve_engine(args.requested, *ipvs_available())
    if engine.warning:
        print(f"warning: {engine.warning}", file=sys.stderr)
    print(engine.name)
    return ExitStatus.OK


def run_nofile(args: argparse.Namespace) -> int:
    from carbonscale.proclimits import nginx_nofile_problems

    workers, problems = nginx_nofile_problems(args.pidfile, args.need)
    for problem in problems:
        print(f"carbonscale: {problem}", file=sys.stderr)
    if problems:
        return ExitStatus.PROBLEM
    print(f"{len(workers)} nginx workers may open at least {args.need} files")
    return ExitStatus.OK


def run_nofile_ceiling(args: argparse.Namespace) -> int:
    from carbonscale.proclimits import ceiling_problem

    problem = ceiling_problem(args.need, args.pid)
    if problem:
        print(f"carbonscale: {problem}", file=sys.stderr)
        return ExitStatus.PROBLEM
    print(f"the service manager can grant {args.need} open files")
    return ExitStatus.OK

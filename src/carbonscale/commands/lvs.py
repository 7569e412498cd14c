"""`carbonscale lvs`: the LVS directors.

config-test  keepalived --config-test on a file, working around keepalived
             2.2.7 killing its own test when scripts run as a non-root user
engine       which data path this kernel gets for lvs_engine (auto, ipvs, nginx)
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

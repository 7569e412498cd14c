"""`carbonscale migrate`: move every metric to its owners under a new ring.

plan (controller) -> sync and verify (each destination) -> cleanup (each host
holding copies it no longer owns); serve runs on every storage host; status
reads the journals."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from carbonscale import CarbonscaleError
from carbonscale.ring import COMPATS, HASH_TYPES, Ring, parse_relay_config, select_cluster

# Exit codes: 0 ok, 1 some items failed (listed), 2 bad input or a host that cannot
# be reached (named; rerun to continue).
EXIT_PROBLEM = 1


def _ring(args: argparse.Namespace, side: str) -> Ring | None:
    from carbonscale.migrate._ringglue import make_ring

    members = getattr(args, side)
    config = getattr(args, f"{side}_relay_config")
    if not members and not config:
        return None
    return make_ring(
        members,
        getattr(args, f"{side}_hash") or args.hash,
        args.compat,
        getattr(args, f"{side}_replication") or args.replication,
        config,
        getattr(args, f"{side}_cluster"),
        f"{side} ",
    )


def _live_cluster(args: argparse.Namespace) -> Ring | None:
    if not args.relay_config:
        return None
    try:
        with open(args.relay_config, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CarbonscaleError(f"cannot read relay config {args.relay_config}: {exc}") from exc
    return select_cluster(parse_relay_config(text), args.cluster, args.relay_config).ring()


def target_ring(args: argparse.Namespace) -> Ring:
    """The new ring; checked against the live relay config when both are given."""
    new = _ring(args, "new")
    live = _live_cluster(args)
    if new is None and live is None:
        raise CarbonscaleError(
            "give the new ring: --new MEMBERS, --new-relay-config or --relay-config"
        )
    if new is None:
        return live
    if live is not None:
        from carbonscale.migrate.plan import check_live

        check_live(new, live, args.relay_config)
    return new


def _secret(args: argparse.Namespace) -> bytes:
    from carbonscale.migrate.transport import read_secret

    if not args.secret_file:
        raise CarbonscaleError("--secret-file is needed to talk to the hosts' services")
    return read_secret(args.secret_file)


def _print(args: argparse.Namespace, report: dict, line: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print(line)


# ----- verbs ---------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    from carbonscale.migrate.journal import Journal
    from carbonscale.migrate.transport import make_server, parse_allowlist

    allow = parse_allowlist(args.allow)
    if args.check_config:
        from carbonscale.migrate.transport import parse_listen

        parse_listen(args.listen)
        _secret(args)
        if not os.path.isdir(args.root):
            raise CarbonscaleError(f"whisper root {args.root} is not a directory")
        return 0
    status = None
    if args.state_dir:
        journal = Journal(args.state_dir, "")
        status = journal.counts
    server = make_server(args.listen, args.root, _secret(args), allow, status)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    host, port = server.server_address[:2]
    print(f"serving {args.root} on {host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def run_list(args: argparse.Namespace) -> int:
    from carbonscale.migrate.plan import parse_hosts
    from carbonscale.migrate.transport import Client, encode_listing, free_bytes, walk_tree

    if args.root:
        if not os.path.isdir(args.root):
            raise CarbonscaleError(f"whisper root {args.root} is not a directory")
        data = encode_listing(walk_tree(args.root), free_bytes(args.root))
    else:
        if not args.host:
            raise CarbonscaleError("give --root (this host) or --host NAME=ADDRESS:PORT")
        (name, endpoint), *_ = parse_hosts([args.host], args.port).items()
        from carbonscale.migrate.transport import decode_listing  # noqa: F401

        client = Client(name, endpoint, _secret(args))
        response = client._request("GET", "/list")
        data = response.read()
    with open(args.output, "wb") as out:
        out.write(data)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from carbonscale.migrate.plan import (
        collect_listings,
        compute_plan,
        jump_message,
        parse_hosts,
        ring_hosts,
        write_plan,
    )

    new = target_ring(args)
    old = _ring(args, "old")
    endpoints = {h: f"{h}:{args.port}" for ring in (new, old) if ring for h in ring_hosts(ring)}
    endpoints.update(parse_hosts(args.host, args.port))
    files = {}
    for entry in args.listing:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise CarbonscaleError(f"--listing {entry!r}: expected HOST=FILE")
        if name not in endpoints:
            raise CarbonscaleError(f"unknown host {name}: not a ring member host nor a --host")
        files[name] = path
    needs_secret = any(h not in files for h in endpoints)
    listings = collect_listings(endpoints, files, _secret(args) if needs_secret else None)
    plan = compute_plan(new, listings, endpoints, old, args.allow_jump_reshuffle, args.reserve)
    plan_id = write_plan(plan, args.output)
    summary = plan.summary
    if "jump_reshuffle" in summary:
        print(f"carbonscale: warning: {jump_message(summary['jump_reshuffle'])}", file=sys.stderr)
    lines = [
        f"plan {plan_id}: {summary['work']} of {summary['metrics']} metrics to move "
        f"({summary['moved_fraction']:.2%}), written to {args.output}"
    ]
    if summary.get("owner_change") is not None:
        lines.append(f"owners change (old ring -> new ring): {summary['owner_change']} metrics")
    for pair in summary["pairs"]:
        lines.append(
            f"  {pair['src']} -> {pair['dst']}: {pair['files']} files, {pair['bytes']} bytes"
        )
    for host, count in sorted(summary["strays"].items()):
        lines.append(f"  copies to remove from {host} once verified: {count}")
    for host, space in sorted(summary["free"].items()):
        lines.append(f"  {host} needs {space['needed']} bytes, has {space['free']} free")
    _print(args, {"plan": plan_id, **summary}, "\n".join(lines))
    return 0


def _context(args: argparse.Namespace):
    from carbonscale.migrate import counter_sender
    from carbonscale.migrate.engine import Context
    from carbonscale.migrate.plan import PlanFile

    counters = None
    if args.carbon:
        from carbonscale.sender import parse_address

        counters = counter_sender(parse_address(args.carbon))
    return Context(
        PlanFile(args.plan),
        args.self,
        args.root,
        args.state_dir,
        _secret(args),
        jobs=args.jobs,
        batch=args.batch,
        counters=counters,
    )


def _step(args: argparse.Namespace, step) -> int:
    result = step(_context(args))
    for metric, peer, error in result.failed[: args.max_listed]:
        where = f" from {peer}" if peer else ""
        print(f"carbonscale: failed {metric}{where}: {error}", file=sys.stderr)
    _print(args, result.as_dict(), result.line())
    return EXIT_PROBLEM if result.failed else 0


def run_sync(args: argparse.Namespace) -> int:
    from carbonscale.migrate.engine import sync

    return _step(args, sync)


def run_verify(args: argparse.Namespace) -> int:
    from carbonscale.migrate.engine import verify

    return _step(args, verify)


def run_cleanup(args: argparse.Namespace) -> int:
    from carbonscale.migrate.engine import cleanup, purge

    if args.purge:
        ctx = _context(args)
        removed = purge(ctx)
        print(f"purged the quarantine of plan {ctx.plan.plan_id}: {removed} files deleted")
        return 0
    return _step(args, cleanup)


def run_drained(args: argparse.Namespace) -> int:
    from carbonscale.migrate.drain import wait_drained
    from carbonscale.migrate.plan import PlanFile
    from carbonscale.sender import parse_address

    plan = PlanFile(args.plan)
    plan.check_host(args.self)
    metrics = [row.name for row in plan.rows() if args.self in row.holders]
    instances = [parse_address(entry) for entry in args.carbonlink]
    rounds, waited = wait_drained(instances, metrics, args.before, args.timeout)
    print(
        f"{args.self}: carbon-cache holds no point stamped before {args.before:.0f} for the "
        f"{len(metrics)} metrics it holds in plan {plan.plan_id} ({rounds} queries, "
        f"{waited:.1f} s waited)"
    )
    return 0


def run_status(args: argparse.Namespace) -> int:
    from carbonscale.migrate.journal import Journal
    from carbonscale.migrate.plan import PlanFile
    from carbonscale.migrate.transport import Client

    if args.move:
        from carbonscale.migrate.lifecycle import Move, read_status

        move = Move.load(args.move)
        _print(args, move.data if move else {}, read_status(args.move))
        if not args.plan and not args.state_dir:
            return 0
    hosts: dict[str, dict] = {}
    plan = PlanFile(args.plan) if args.plan else None
    if args.state_dir:
        counts = Journal(args.state_dir, "").counts(plan.plan_id if plan else None)
        hosts["local"] = counts
    elif plan:
        secret = _secret(args)
        for host in plan.hosts:
            found = Client(host, plan.endpoints[host], secret).status()
            hosts[host] = {plan.plan_id: found.get(plan.plan_id, {})}
    else:
        raise CarbonscaleError("give --state-dir (this host) or --plan (every host's service)")
    lines = []
    for host, plans in hosts.items():
        for plan_id, phases in sorted(plans.items()):
            for phase, counts in sorted(phases.items()):
                lines.append(
                    f"{host}  {plan_id}  {phase:<8} done {counts['done']}  "
                    f"pending {counts['pending']}  failed {counts['failed']}"
                )
    _print(args, hosts, "\n".join(lines) or "nothing recorded")
    return 0


# ----- arguments ----------------------------------------------------------------


def _common_step(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, metavar="FILE", help="the plan (from `plan`)")
    parser.add_argument(
        "--self", required=True, metavar="HOST", help="this host's name in the plan"
    )
    parser.add_argument("--root", required=True, metavar="DIR", help="this host's whisper root")
    parser.add_argument(
        "--state-dir", required=True, metavar="DIR", help="where this host's journal lives"
    )
    parser.add_argument("--secret-file", required=True, metavar="FILE", help="the shared secret")
    parser.add_argument("-j", "--jobs", type=int, default=4, help="batches in flight (default 4)")
    parser.add_argument(
        "--batch", type=int, default=200, help="files per request to a peer (default 200)"
    )
    parser.add_argument(
        "--carbon", metavar="HOST:PORT", help="send the step's counters to carbon (line protocol)"
    )
    parser.add_argument("--max-listed", type=int, default=100, help="failures listed on stderr")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    from carbonscale.migrate.transport import DEFAULT_PORT

    parser = subparsers.add_parser(
        "migrate",
        help="move metrics to their owners under a new ring, node to node",
        description=(
            "Converge every metric onto exactly its owners' hosts with the union of every "
            "copy's points: plan, then sync and verify on each destination, then cleanup."
        ),
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    serve = verbs.add_parser(
        "serve",
        help="serve this host's whisper tree to its peers",
        description=(
            "The read-only file service a sync pulls from. Arguments may also come from a "
            "file: @FILE, one per line."
        ),
        fromfile_prefix_chars="@",
    )
    serve.add_argument("--root", required=True, metavar="DIR", help="the whisper root")
    serve.add_argument(
        "--listen",
        default=f"0.0.0.0:{DEFAULT_PORT}",
        help=f"ADDRESS:PORT (default port {DEFAULT_PORT})",
    )
    serve.add_argument("--secret-file", required=True, metavar="FILE", help="the shared secret")
    serve.add_argument(
        "--allow", action="append", default=[], metavar="CIDR", help="addresses allowed (repeat)"
    )
    serve.add_argument("--state-dir", metavar="DIR", help="answer /status from this journal")
    serve.add_argument(
        "--check-config", action="store_true", help="check the arguments and exit (no listen)"
    )
    serve.set_defaults(func=run_serve)

    listing = verbs.add_parser("list", help="save a whisper tree's listing (for plan --listing)")
    listing.add_argument("--root", metavar="DIR", help="list this local tree")
    listing.add_argument("--host", metavar="NAME=ADDRESS:PORT", help="or ask a host's service")
    listing.add_argument("--port", type=int, default=DEFAULT_PORT, help=argparse.SUPPRESS)
    listing.add_argument("--secret-file", metavar="FILE", help="the shared secret")
    listing.add_argument("-o", "--output", required=True, metavar="FILE")
    listing.set_defaults(func=run_list)

    plan = verbs.add_parser(
        "plan",
        help="what must move where (per metric, per host pair, strays, free space)",
        description=(
            "List every host (or read saved listings) and write the plan: every metric "
            "whose copies are not exactly on its owners' hosts, with its owners and holders."
        ),
    )
    plan.add_argument("--hash", choices=HASH_TYPES, help="hash of both rings")
    plan.add_argument("--replication", type=int, default=1, help="replication of both rings")
    plan.add_argument("--compat", choices=COMPATS, default="carbon-c-relay")
    for side in ("new", "old"):
        plan.add_argument(
            f"--{side}", nargs="*", default=[], metavar="MEMBER", help=f"{side} members"
        )
        plan.add_argument(f"--{side}-hash", choices=HASH_TYPES, help=f"hash of the {side} ring")
        plan.add_argument(f"--{side}-replication", type=int, help=f"replication of the {side} ring")
        plan.add_argument(f"--{side}-relay-config", metavar="FILE", help=f"{side} relay config")
        plan.add_argument(f"--{side}-cluster", metavar="NAME", help=f"cluster in the {side} config")
    plan.add_argument(
        "--relay-config", metavar="FILE", help="the live relay config: the new ring, or its check"
    )
    plan.add_argument("--cluster", metavar="NAME", help="cluster in the live relay config")
    plan.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME[=ADDRESS:PORT]",
        help="a storage host (ring hosts are implied; add hosts with stray copies)",
    )
    plan.add_argument("--port", type=int, default=DEFAULT_PORT, help="the services' default port")
    plan.add_argument("--listing", action="append", default=[], metavar="HOST=FILE")
    plan.add_argument("--secret-file", metavar="FILE", help="the shared secret")
    plan.add_argument(
        "--allow-jump-reshuffle",
        action="store_true",
        help="accept a jump_fnv1a_ch removal that remaps about half the metrics",
    )
    plan.add_argument(
        "--reserve",
        type=int,
        default=0,
        metavar="BYTES",
        help="bytes every destination must keep free after the move (default 0)",
    )
    plan.add_argument("-o", "--output", required=True, metavar="FILE", help="the plan file")
    plan.add_argument("--json", action="store_true", help="print the summary as JSON")
    plan.set_defaults(func=run_plan)

    for name, func, text in (
        ("sync", run_sync, "pull, fill and check every metric this host must receive"),
        ("verify", run_verify, "check every source copy's points against this host's files"),
        ("cleanup", run_cleanup, "quarantine verified copies this host no longer owns"),
    ):
        step = verbs.add_parser(name, help=text)
        _common_step(step)
        if name == "cleanup":
            step.add_argument(
                "--purge", action="store_true", help="delete this plan's quarantine instead"
            )
        step.set_defaults(func=func)

    drained = verbs.add_parser(
        "drained",
        help="wait until carbon-cache here wrote out the plan's metrics (CarbonLink)",
        description=(
            "Before a delta fill: wait until no carbon-cache instance of this host holds "
            "a point stamped before --before for a metric this host holds in the plan."
        ),
    )
    drained.add_argument("--plan", required=True, metavar="FILE", help="the plan")
    drained.add_argument("--self", required=True, metavar="HOST", help="this host in the plan")
    drained.add_argument(
        "--carbonlink", action="append", required=True, metavar="ADDRESS:PORT",
        help="a carbon-cache instance's cache query port (repeat)",
    )  # fmt: skip
    drained.add_argument(
        "--before", type=float, required=True, metavar="EPOCH", help="points stamped before"
    )
    drained.add_argument("--timeout", type=float, default=600, help="seconds (default 600)")
    drained.set_defaults(func=run_drained)

    status = verbs.add_parser("status", help="done / pending / failed per host and phase")
    status.add_argument("--plan", metavar="FILE", help="ask every host of the plan")
    status.add_argument("--state-dir", metavar="DIR", help="or read this host's journal")
    status.add_argument("--secret-file", metavar="FILE", help="the shared secret")
    status.add_argument(
        "--move", metavar="FILE", help="the phases of expand.yml / decommission.yml's state file"
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=run_status)

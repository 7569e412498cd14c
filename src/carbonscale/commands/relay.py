"""`carbonscale relay`: the relay daemons (pickle to line, statsd).

Each verb registers itself in its own `register_<verb>` function and imports
its implementation only when it runs, so `carbonscale --help` stays fast and
one verb's dependencies never load for another.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from carbonscale import ExitStatus
from carbonscale.relay.pickle_settings import Settings, parse_hostport


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "relay",
        help="run a relay daemon (pickle to line protocol, statsd consistent hashing)",
        description="Relay daemons run by systemd on the relay nodes.",
    )
    verbs = parser.add_subparsers(dest="relay_command", metavar="RELAY", required=True)
    register_pickle(verbs)
    register_restart(verbs)
    register_statsd(verbs)


def _daemon_logging() -> None:
    # journald adds the time and the unit; a terminal gets the same lines.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)


# ---------------------------------------------------------------- pickle


def register_pickle(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "pickle",
        help="carbon pickle protocol in (2004), line protocol out to carbon-c-relay (2003)",
        description=(
            "Receive carbon pickle frames (4-byte big-endian length, then a pickled list of "
            "(path, (timestamp, value))) with an unpickler that refuses every global, and "
            "forward the points as line protocol, in batches, to carbon-c-relay. "
            "SIGTERM stops listening and drains the queue. "
            "Arguments may also come from a file: @FILE, one per line."
        ),
        fromfile_prefix_chars="@",
    )
    parser.add_argument(
        "--listen",
        default=f":{Settings.listen[1]}",
        help="[HOST]:PORT to listen on (default %(default)s: every address)",
    )
    parser.add_argument(
        "--line-listen",
        help="[HOST]:PORT to take line protocol on as well, passed to carbon-c-relay whole "
        "(the relay's front: carbon-c-relay then restarts behind it, see `relay restart`); "
        "default: none",
    )
    parser.add_argument(
        "--max-line",
        type=int,
        default=Settings.max_line,
        help="longest line-protocol line in bytes; a longer one is skipped and counted "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--hold-dir",
        help="directory where `relay restart` asks for a hold and the relay confirms it "
        "(default: none, no hold)",
    )
    parser.add_argument(
        "--close-after",
        type=float,
        default=Settings.close_after,
        help="with carbon-c-relay unreachable this many seconds outside a hold, close the "
        "listeners and the clients until it is back, so the directors take this relay out "
        "(default %(default)g: never, only queue)",
    )
    parser.add_argument(
        "--upstream",
        default="{}:{}".format(*Settings.upstream),
        help="carbon-c-relay's line listener HOST:PORT (default %(default)s)",
    )
    parser.add_argument(
        "--max-frame",
        type=int,
        default=Settings.max_frame,
        help="largest frame in bytes; a larger one closes its connection (default %(default)s, "
        "carbon's)",
    )
    parser.add_argument(
        "--max-buffered",
        type=int,
        default=Settings.max_buffered,
        help="bytes of unfinished frames held for all clients together; the client that "
        "pushes over is closed and counted (frames_refused_memory; default %(default)s)",
    )
    parser.add_argument(
        "--max-name",
        type=int,
        default=Settings.max_name,
        help="longest metric name in bytes; longer points are skipped and counted "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-output",
        type=int,
        default=Settings.max_output,
        help="a frame expanding to more line-protocol bytes is malformed (default %(default)s)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=Settings.queue_size,
        help="points held while carbon-c-relay is away; beyond, dropped and counted "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=Settings.batch_size,
        help="points written to carbon-c-relay per write, at most (default %(default)s)",
    )
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=Settings.stats_interval,
        help="seconds between the relay's own counters sent as metrics (default %(default)g)",
    )
    parser.add_argument(
        "--stats-prefix",
        help="name prefix of those metrics (default carbon.relays.<hostname>.pickle)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=Settings.idle_timeout,
        help="close client connections silent this many seconds; 0 never (default %(default)g)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=Settings.drain_timeout,
        help="on SIGTERM, seconds to wait for the queue to reach carbon-c-relay "
        "(default %(default)g)",
    )
    parser.add_argument(
        "--reconnect-interval",
        type=float,
        default=Settings.reconnect_interval,
        help="seconds between connection attempts to carbon-c-relay (default %(default)g)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the arguments, print the settings and exit (the role's check "
        "before an arguments file goes live)",
    )
    parser.set_defaults(func=run_pickle)


def run_pickle(args: argparse.Namespace) -> int:
    settings = Settings(
        listen=parse_hostport(args.listen, "--listen", allow_any=True),
        line_listen=(
            parse_hostport(args.line_listen, "--line-listen", allow_any=True)
            if args.line_listen
            else None
        ),
        max_line=args.max_line,
        hold_dir=args.hold_dir or None,
        close_after=args.close_after,
        upstream=parse_hostport(args.upstream, "--upstream"),
        max_frame=args.max_frame,
        max_buffered=args.max_buffered,
        max_name=args.max_name,
        max_output=args.max_output,
        queue_size=args.queue_size,
        batch_size=args.batch_size,
        stats_interval=args.stats_interval,
        idle_timeout=args.idle_timeout,
        drain_timeout=args.drain_timeout,
        reconnect_interval=args.reconnect_interval,
    )
    if args.stats_prefix is not None:
        settings.stats_prefix = args.stats_prefix
    settings.validate()
    if args.check_config:
        for field in dataclasses.fields(settings):
            print(f"{field.name}\t{getattr(settings, field.name)}")
        return ExitStatus.OK
    _daemon_logging()
    from carbonscale.relay import pickle_relay  # the daemon's asyncio, only to run it

    pickle_relay.run(settings)
    return ExitStatus.OK


# ---------------------------------------------------------------- restart


def register_restart(verbs: argparse._SubParsersAction) -> None:
    from carbonscale.relay import hold

    parser = verbs.add_parser(
        "restart",
        help="restart carbon-c-relay behind the relay's front without losing a line",
        description=(
            "Hold the front (`relay pickle --hold-dir`): it finishes the lines it is "
            "writing and queues the rest; wait until carbon-c-relay has read every byte; "
            "restart its unit; wait until it listens again; release the front, which "
            "writes its queue. Without a running front (no hold directory) carbon-c-relay "
            "is restarted plainly. The front is released whatever fails."
        ),
    )
    parser.add_argument(
        "--unit", default="carbon-c-relay", help="carbon-c-relay's unit (default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        required=True,
        help="carbon-c-relay's line port behind the front (the front's --upstream port)",
    )
    parser.add_argument("--hold-dir", required=True, help="the front's --hold-dir")
    parser.add_argument(
        "--hold-seconds",
        type=float,
        default=hold.DEFAULT_HOLD_SECONDS,
        help="the hold ends by itself after this long, whatever happens here (default %(default)g)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=hold.DEFAULT_WAIT_SECONDS,
        help="longest wait for each step (default %(default)g s)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=hold.DEFAULT_SETTLE_SECONDS,
        help="seconds after carbon-c-relay listens before the front connects (default %(default)g)",
    )
    parser.set_defaults(func=run_restart)


def run_restart(args: argparse.Namespace) -> int:
    import subprocess

    from carbonscale import CarbonscaleError
    from carbonscale.relay import hold

    if not 0 < args.port < 65536:
        raise CarbonscaleError(f"--port wants 1-65535, got {args.port}")
    for name in ("hold_seconds", "wait"):
        if getattr(args, name) <= 0:
            raise CarbonscaleError(f"--{name.replace('_', '-')} must be > 0")

    def restart() -> None:
        done = subprocess.run(
            ["systemctl", "restart", args.unit], capture_output=True, text=True, check=False
        )
        if done.returncode:
            raise CarbonscaleError(
                f"systemctl restart {args.unit} failed: {done.stderr.strip() or done.returncode}"
            )

    report = hold.restart_behind_front(
        restart,
        args.hold_dir,
        args.port,
        seconds=args.hold_seconds,
        wait=args.wait,
        settle=max(0.0, args.settle),
    )
    if report.held:
        print(
            f"restarted {args.unit} behind the front: held {report.hold_seconds:.1f}s, "
            f"{report.queued_at_hold} points queued at the hold"
        )
    else:
        print(f"restarted {args.unit} (no front running in {args.hold_dir}: nothing to hold)")
    return ExitStatus.OK


# ---------------------------------------------------------------- statsd


def register_statsd(verbs: argparse._SubParsersAction) -> None:
    from carbonscale.flap import (
        DEFAULT_HALF_LIFE,
        DEFAULT_PENALTY,
        DEFAULT_REUSE_LIMIT,
        DEFAULT_SUPPRESS_LIMIT,
    )
    from carbonscale.relay.statsd.config import RelayConfig

    # The daemon's defaults are RelayConfig's; the options show them.
    statsd = {field.name: field.default for field in dataclasses.fields(RelayConfig)}
    parser = verbs.add_parser(
        "statsd",
        help="statsd consistent-hash relay (8125) in front of statsd daemons, like StatsRelay",
        description=(
            "Relay statsd datagrams to statsd daemons, each metric name (the text before ':') "
            "always to the same daemon: 64-bit FNV-1a and jump hash over the backends in the "
            "order given (StatsRelay's placement; give every relay the same list). Backends are "
            "health-checked on their admin port with flap damping; the metrics of a held-out "
            "backend go to their second choice (carbon-c-relay's jump replica), the others never "
            "move. Arguments may also come from a file: @FILE, one per line."
        ),
        fromfile_prefix_chars="@",
    )
    parser.add_argument(
        "backends",
        nargs="+",
        metavar="BACKEND",
        help="statsd daemon HOST:PORT[:ADMIN_PORT] (IPv6 as [ADDR]:PORT[:ADMIN_PORT]); the "
        "order is the hash order and must be the same on every relay; a backend without "
        "ADMIN_PORT is never health-checked",
    )
    parser.add_argument(
        "--listen", default=statsd["listen"], help="UDP address (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=statsd["port"], help="UDP port (default %(default)s)"
    )
    parser.add_argument(
        "--admin-listen",
        default=statsd["admin_listen"],
        help="admin TCP address (default %(default)s)",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=statsd["admin_port"],
        help="admin TCP port: 'health' answers 'health: up' (or down) like statsd, for "
        "load-balancer checks; also 'health up|down', 'stats', 'backends' "
        "(default %(default)s; 0: off)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=statsd["workers"],
        help="processes sharing the UDP port with SO_REUSEPORT (default %(default)s)",
    )
    parser.add_argument(
        "--packet-size",
        type=int,
        default=statsd["packet_size"],
        help="largest datagram sent to a backend in bytes (default %(default)s)",
    )
    parser.add_argument(
        "--rcvbuf",
        type=int,
        default=statsd["rcvbuf"],
        help="UDP receive buffer of each worker in bytes; above net.core.rmem_max only with "
        "CAP_NET_ADMIN (default %(default)s)",
    )
    parser.add_argument(
        "--cache-size",
        type=int,
        default=statsd["cache_size"],
        help="metric names whose backend is remembered (default %(default)s)",
    )
    parser.add_argument(
        "--check-interval",
        type=float,
        default=statsd["check_interval"],
        help="seconds between health checks (default %(default)g)",
    )
    parser.add_argument(
        "--check-timeout",
        type=float,
        default=statsd["check_timeout"],
        help="seconds a backend's admin port has to answer (default %(default)g)",
    )
    parser.add_argument(
        "--flap-half-life",
        type=float,
        default=DEFAULT_HALF_LIFE,
        help="flap penalty half-life in seconds (default %(default)g)",
    )
    parser.add_argument(
        "--flap-reuse-limit",
        type=float,
        default=DEFAULT_REUSE_LIMIT,
        help="penalty below which a backend returns (default %(default)g)",
    )
    parser.add_argument(
        "--flap-suppress-limit",
        type=float,
        default=DEFAULT_SUPPRESS_LIMIT,
        help="penalty above which a flapping backend is held out (default %(default)g)",
    )
    parser.add_argument(
        "--flap-penalty",
        type=float,
        default=DEFAULT_PENALTY,
        help="penalty of each up/down change (default %(default)g)",
    )
    parser.add_argument(
        "--flap-state",
        metavar="FILE",
        help="keep the flap damping state in this file across restarts (default: memory)",
    )
    parser.add_argument(
        "--carbon",
        default="127.0.0.1:2003",
        help="carbon line receiver HOST:PORT for the relay's counters, or 'none' "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=statsd["stats_interval"],
        help="seconds between the relay's counters sent to carbon (default %(default)g)",
    )
    parser.add_argument(
        "--stats-prefix",
        help="name prefix of those counters (default carbon.relays.<hostname>.statsd)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the arguments, print the backends in hash order and exit",
    )
    parser.add_argument(
        "--locate",
        action="append",
        metavar="NAME",
        help="print the backend a metric name goes to when every backend is usable, and "
        "exit (repeatable)",
    )
    parser.add_argument("--verbose", action="store_true", help="log at debug level")
    parser.set_defaults(func=run_statsd)


def _carbon_address(text: str) -> tuple[str, int] | None:
    """--carbon: HOST:PORT, or None for 'none' (or empty)."""
    from carbonscale import CarbonscaleError

    if text in ("", "none"):
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CarbonscaleError(f"--carbon {text!r}: expected HOST:PORT (or 'none')")
    return host, int(port)


def statsd_config_from_args(args: argparse.Namespace):
    """The statsd relay's RelayConfig and FlapDamper from the parsed arguments."""
    import math
    import socket

    from carbonscale import CarbonscaleError
    from carbonscale.flap import FlapDamper
    from carbonscale.relay.statsd.backends import parse_backends
    from carbonscale.relay.statsd.config import RelayConfig

    backends = parse_backends(args.backends)
    for name, value, low, high in (
        ("--port", args.port, 1, 65535),
        ("--admin-port", args.admin_port, 0, 65535),
        ("--workers", args.workers, 1, 256),
        ("--packet-size", args.packet_size, 64, 65507),
        ("--cache-size", args.cache_size, 1, 1 << 40),
        ("--rcvbuf", args.rcvbuf, 0, 1 << 31),
    ):
        if not low <= value <= high:
            raise CarbonscaleError(f"{name} {value}: must be in {low}-{high}")
    for name, value in (
        ("--check-interval", args.check_interval),
        ("--check-timeout", args.check_timeout),
        ("--stats-interval", args.stats_interval),
    ):
        if not (math.isfinite(value) and value > 0):
            raise CarbonscaleError(f"{name} {value}: must be a positive number of seconds")
    damper = FlapDamper(
        half_life=args.flap_half_life,
        reuse_limit=args.flap_reuse_limit,
        suppress_limit=args.flap_suppress_limit,
        penalty=args.flap_penalty,
    )
    prefix = args.stats_prefix or f"carbon.relays.{socket.gethostname().split('.')[0]}.statsd"
    config = RelayConfig(
        backends=backends,
        listen=args.listen,
        port=args.port,
        admin_listen=args.admin_listen,
        admin_port=args.admin_port,
        workers=args.workers,
        packet_size=args.packet_size,
        rcvbuf=args.rcvbuf,
        cache_size=args.cache_size,
        check_interval=args.check_interval,
        check_timeout=args.check_timeout,
        flap_state=args.flap_state,
        carbon=_carbon_address(args.carbon),
        stats_interval=args.stats_interval,
        stats_prefix=prefix,
    )
    return config, damper


def run_statsd(args: argparse.Namespace) -> int:
    from carbonscale.relay.statsd.placement import primary
    from carbonscale.relay.statsd.supervisor import Supervisor

    config, damper = statsd_config_from_args(args)
    if args.locate:
        count = len(config.backends)
        for name in args.locate:
            data = name.encode().split(b":", 1)[0]
            print(f"{name} {config.backends[primary(data, count)].spec}")
        return ExitStatus.OK
    if args.check_config:
        for index, backend in enumerate(config.backends):
            print(f"{index} {backend.spec}")
        return ExitStatus.OK
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(message)s",
    )
    return Supervisor(config, damper).run()

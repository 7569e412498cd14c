"""The statsd relay (StatsRelay's role): one statsd daemon per metric name.

statsd aggregates in memory, so every datagram of a metric must reach the
same daemon, or two daemons flush partial sums under one name and the last
write to Graphite wins. The relay takes the metric name (the bytes before the
first ':') and places it like StatsRelay (jjneely/statsrelay): 64-bit FNV-1a,
unsigned bytes, then Google's jump hash over the backends in the order they
are given. Every relay must be given the same backends in the same order.

Health: a supervisor process asks each backend's admin port `health`
(statsd's management interface) every few seconds and damps flapping with
`carbonscale.flap.FlapDamper` (state kept across checks, optionally in a
file across restarts). A backend that is down or suppressed is held out; its
metrics go to their second choice, picked the way carbon-c-relay picks jump
replicas (xorshift the hash, move the last bucket into the chosen one's
place, jump again over one bucket fewer). Metrics whose first choice is
usable never move, whatever happens to other backends.

Processes: the supervisor runs the health checks, the admin port (`health`
answers `health: up` like statsd, for the LVS checks), the counters sent to
carbon, and restarts workers. `--workers` processes each bind the UDP port
with SO_REUSEPORT (the kernel spreads senders over them by address hash) and
run the hot loop: recvmmsg batches, a name -> backend cache, per-backend
batching into datagrams of at most `--packet-size` bytes. Workers and the
supervisor share one small array (health flags, counters).

The package, one module per concern: `backends` (parsing the backend list),
`placement` (which backend a name goes to), `shared` (the array workers and
supervisor share), `worker` (the hot loop), `config` (settings and defaults),
`supervisor` (health checks, admin port, counters, workers). Every name is
importable from the package as before; a name is loaded with its module on
first use, so `carbonscale.relay.statsd.backends` (what the controller needs)
does not load the daemon.
"""

from __future__ import annotations

from importlib import import_module

# Where each public name lives.
_HOMES = {
    "Backend": "backends",
    "COALESCE_LINES": "worker",
    "COALESCE_SECONDS": "worker",
    "COUNTERS": "shared",
    "C_DATAGRAMS": "shared",
    "C_FORWARDED": "shared",
    "C_MALFORMED": "shared",
    "C_METRICS": "shared",
    "C_NO_BACKEND": "shared",
    "C_REFUSED": "shared",
    "C_REROUTED": "shared",
    "C_SEND_FAILED": "shared",
    "DEFAULT_ADMIN_PORT": "config",
    "DEFAULT_CACHE_SIZE": "config",
    "DEFAULT_PACKET_SIZE": "config",
    "DEFAULT_PORT": "config",
    "DEFAULT_RCVBUF": "config",
    "FLUSH_LINES": "worker",
    "HealthChecker": "supervisor",
    "KernelDrops": "supervisor",
    "RECV_BATCH": "worker",
    "RelayConfig": "config",
    "SO_RCVBUFFORCE": "worker",
    "SharedState": "shared",
    "Supervisor": "supervisor",
    "Worker": "worker",
    "bind_udp": "worker",
    "choices": "placement",
    "parse_backend": "backends",
    "parse_backends": "backends",
    "place": "placement",
    "primary": "placement",
    "route": "placement",
    "route_py": "placement",
    "number_of": "placement",
    "refused_samples": "placement",
    "udp_drops": "supervisor",
    "worker_main": "worker",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])

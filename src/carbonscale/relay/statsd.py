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
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from carbonscale import CarbonscaleError
from carbonscale.flap import FlapDamper, FlapState, FlapStore
from carbonscale.health import statsd_admin_health
from carbonscale.relay import udpio
from carbonscale.ring import fnv1a_64, jump_hash, xorshift64

log = logging.getLogger("carbonscale.relay.statsd")

DEFAULT_PORT = 8125
DEFAULT_ADMIN_PORT = 8126
DEFAULT_PACKET_SIZE = 1400
DEFAULT_RCVBUF = 32 * 1024 * 1024
DEFAULT_CACHE_SIZE = 500_000
# Datagrams read per recvmmsg call.
RECV_BATCH = 256
# Metric lines buffered before a flush even while the socket never drains.
FLUSH_LINES = 4096
# A drained socket after at least this many lines means load: nap
# COALESCE_SECONDS before reading again rather than wait in poll().
COALESCE_LINES = 32
COALESCE_SECONDS = 0.0005
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# Counters each worker publishes (cumulative), in this order, followed by the
# per-backend forwarded counts.
COUNTERS = (
    "datagrams_received",
    "metrics_received",
    "metrics_forwarded",
    "metrics_malformed",
    "metrics_rerouted",
    "metrics_no_backend",
    "metrics_send_failed",
)
(
    C_DATAGRAMS,
    C_METRICS,
    C_FORWARDED,
    C_MALFORMED,
    C_REROUTED,
    C_NO_BACKEND,
    C_SEND_FAILED,
) = range(len(COUNTERS))


# --------------------------------------------------------------------------
# Backends


@dataclass(frozen=True)
class Backend:
    """A statsd daemon: UDP `host:port`, and its admin port for health checks."""

    host: str
    port: int
    admin_port: int | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def spec(self) -> str:
        """The command-line form, `host:port[:admin_port]`."""
        return self.address + (f":{self.admin_port}" if self.admin_port else "")

    @property
    def metric_name(self) -> str:
        """The backend as one Graphite path component."""
        return "".join(c if c.isalnum() or c in "-" else "_" for c in self.address)

    def __str__(self) -> str:
        return self.spec


def _port(text: str, spec: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise CarbonscaleError(f"statsd backend {spec!r}: {what} {text!r} is not in 1-65535")
    return int(text)


def parse_backend(text: str) -> Backend:
    """`host:port[:admin_port]`, IPv6 as `[addr]:port[:admin_port]`."""
    spec = text.strip()
    if not spec or any(c.isspace() for c in spec):
        raise CarbonscaleError(f"statsd backend {text!r}: empty or contains whitespace")
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not host or not rest.startswith(":"):
            raise CarbonscaleError(f"statsd backend {text!r}: expected [ipv6]:port[:admin_port]")
        parts = [host, *rest[1:].split(":")]
    else:
        parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise CarbonscaleError(
            f"statsd backend {text!r}: expected host:port[:admin_port] "
            "(IPv6 addresses in [brackets])"
        )
    port = _port(parts[1], text, "port")
    admin = _port(parts[2], text, "admin port") if len(parts) == 3 else None
    return Backend(parts[0], port, admin)


def parse_backends(texts: Sequence[str]) -> list[Backend]:
    backends = [parse_backend(t) for t in texts]
    if not backends:
        raise CarbonscaleError("the statsd relay needs at least one backend")
    seen: set[tuple[str, int]] = set()
    for backend in backends:
        key = (backend.host, backend.port)
        if key in seen:
            raise CarbonscaleError(
                f"statsd backend {backend.address} is listed twice: "
                "each daemon must appear once, in the same order on every relay"
            )
        seen.add(key)
    return backends


# --------------------------------------------------------------------------
# Placement


def choices(key: int, count: int) -> Iterator[int]:
    """Backend indices in preference order for a 64-bit name hash.

    The first is StatsRelay's `Jump(key, count)`; each next one is the next
    jump replica as carbon-c-relay computes it: remove the chosen bucket by
    moving the last bucket into its place, xorshift the key, jump over one
    bucket fewer.
    """
    buckets = list(range(count))
    alive = count
    while alive:
        position = jump_hash(key, alive)
        yield buckets[position]
        alive -= 1
        buckets[position] = buckets[alive]
        key = xorshift64(key)


def primary(name: bytes, count: int) -> int:
    """StatsRelay's backend index for a metric name (bytes before ':')."""
    return jump_hash(fnv1a_64(name), count)


def place(name: bytes, usable: Sequence[bool]) -> int | None:
    """The first usable backend in `name`'s preference order, or None."""
    for index in choices(fnv1a_64(name), len(usable)):
        if usable[index]:
            return index
    return None


def route_py(
    data: bytes,
    first: dict[bytes, int],
    usable: bytes,
    second: dict[bytes, int],
    pending: list[list[bytes]],
) -> tuple[int, int, list[tuple[bytes, bytes]]]:
    """Sort the metric lines of `data` into `pending` by cached placement.

    A line is `name:value|type...`: a name of at least one byte before the
    first ':' and a '|' after it, or it is malformed (counted, dropped).
    Empty lines are not metrics. A routable line goes to
    `pending[first[name]]` when that backend is usable (`usable[i]` non-zero),
    else to `pending[second[name]]`; a name missing from the cache it needs
    is returned in `misses` as `(name, line)` for the caller to hash. Returns
    `(metrics, malformed, misses)`. The C extension's `route` is this loop.
    """
    metrics = malformed = 0
    misses = []
    for line in data.split(b"\n"):
        if not line:
            continue
        metrics += 1
        colon = line.find(b":")
        if colon < 1 or line.find(b"|", colon) < 0:
            malformed += 1
            continue
        name = line[:colon]
        index = first.get(name)
        if index is not None and not usable[index]:
            index = second.get(name)
        if index is None:
            misses.append((name, line))
        else:
            pending[index].append(line)
    return metrics, malformed, misses


try:
    from carbonscale.relay._statsd import route
except ImportError:  # a checkout whose extension was not compiled
    route = route_py


# --------------------------------------------------------------------------
# Shared state between the supervisor and the workers


class SharedState:
    """One int64 array in shared memory.

    [0] health generation (bumped on every change of the usable set),
    [1 .. n] usable flags, then one block per worker: the COUNTERS followed by
    forwarded metrics per backend. Workers write only their own block.
    """

    def __init__(self, backends: int, workers: int, array=None) -> None:
        self.backends = backends
        self.workers = workers
        self.block = len(COUNTERS) + backends
        size = 1 + backends + workers * self.block
        self.array = array if array is not None else multiprocessing.RawArray(ctypes.c_int64, size)
        if array is None:
            for i in range(backends):
                self.array[1 + i] = 1

    def generation(self) -> int:
        return self.array[0]

    def usable(self) -> list[bool]:
        return [bool(v) for v in self.array[1 : 1 + self.backends]]

    def set_usable(self, usable: Sequence[bool]) -> None:
        for i, flag in enumerate(usable):
            self.array[1 + i] = int(flag)
        self.array[0] += 1

    def worker_offset(self, worker: int) -> int:
        return 1 + self.backends + worker * self.block

    def totals(self) -> list[int]:
        """COUNTERS then per-backend forwarded, summed over workers."""
        sums = [0] * self.block
        for w in range(self.workers):
            base = self.worker_offset(w)
            for i in range(self.block):
                sums[i] += self.array[base + i]
        return sums


# --------------------------------------------------------------------------
# Worker: the hot loop


def bind_udp(address: str, port: int, rcvbuf: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if rcvbuf:
        try:
            # Beyond net.core.rmem_max; needs CAP_NET_ADMIN (the unit grants it).
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((address, port))
    return sock


class Worker:
    """Routes datagrams from one SO_REUSEPORT socket to the backends."""

    def __init__(
        self,
        backends: Sequence[Backend],
        state: SharedState,
        index: int,
        sock: socket.socket,
        packet_size: int = DEFAULT_PACKET_SIZE,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.backends = list(backends)
        self.count = len(backends)
        self.state = state
        self.offset = state.worker_offset(index)
        self.sock = sock
        self.packet_size = packet_size
        self.cache_size = cache_size
        self.addresses = [self._resolve(b) for b in backends]
        families = {a[0] for a in self.addresses}
        self.out = {f: socket.socket(f, socket.SOCK_DGRAM) for f in families}
        for out in self.out.values():
            out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        # Slots: i = backend i as first choice, n + i = backend i as second
        # choice (rerouted), 2n = no usable backend.
        self.pending: list[list[bytes]] = [[] for _ in range(2 * self.count + 1)]
        self.pending_lines = 0
        # name -> first choice (never changes: the backend list is fixed);
        # name -> slot for names whose first choice is held out (cleared on
        # every health change).
        self.first: dict[bytes, int] = {}
        self.second: dict[bytes, int] = {}
        # Continue a restarted worker's counters where its predecessor left them.
        array, base = state.array, self.offset
        self.counters = [array[base + i] for i in range(len(COUNTERS))]
        self.forwarded = [array[base + len(COUNTERS) + i] for i in range(self.count)]
        self.generation = -1
        self.usable: list[bool] = [True] * self.count
        self.usable_flags = bytes(self.usable)
        self.refresh_health()
        self.stop = False

    @staticmethod
    def _resolve(backend: Backend) -> tuple[socket.AddressFamily, tuple]:
        try:
            info = socket.getaddrinfo(backend.host, backend.port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise CarbonscaleError(f"statsd backend {backend}: {exc.strerror}") from exc
        family, _, _, _, sockaddr = info[0]
        return family, sockaddr

    def refresh_health(self) -> None:
        generation = self.state.generation()
        if generation != self.generation:
            self.generation = generation
            self.usable = self.state.usable()
            self.usable_flags = bytes(self.usable)
            self.second.clear()

    def publish(self) -> None:
        array, base = self.state.array, self.offset
        for i, value in enumerate(self.counters):
            array[base + i] = value
        base += len(COUNTERS)
        for i, value in enumerate(self.forwarded):
            array[base + i] = value

    def handle(self, count: int, data: bytes) -> None:
        """Route one batch: `count` datagrams joined by newlines in `data`."""
        metrics, malformed, misses = route(
            data, self.first, self.usable_flags, self.second, self.pending
        )
        counters = self.counters
        counters[C_DATAGRAMS] += count
        counters[C_METRICS] += metrics
        counters[C_MALFORMED] += malformed
        self.pending_lines += metrics
        # Names not in the caches yet: hash them (carbonscale.ring), remember.
        for name, line in misses:
            index = self.first.get(name)
            if index is None:
                index = self._first_choice(name)
            if self.usable[index]:
                self.pending[index].append(line)
            else:
                slot = self.second.get(name)
                if slot is None:
                    slot = self._second_choice(name)
                self.pending[slot].append(line)

    def _first_choice(self, name: bytes) -> int:
        if len(self.first) >= self.cache_size:
            self.first.clear()
        index = self.first[name] = primary(name, self.count)
        return index

    def _second_choice(self, name: bytes) -> int:
        if len(self.second) >= self.cache_size:
            self.second.clear()
        index = place(name, self.usable)
        slot = 2 * self.count if index is None else self.count + index
        self.second[name] = slot
        return slot

    def flush(self) -> None:
        n, pending, counters = self.count, self.pending, self.counters
        for index in range(n):
            lines, rerouted = pending[index], pending[n + index]
            if not lines and not rerouted:
                continue
            if rerouted:
                counters[C_REROUTED] += len(rerouted)
                lines = lines + rerouted
                rerouted.clear()
            sent = self._send(index, lines)
            pending[index] = []
            counters[C_FORWARDED] += sent
            counters[C_SEND_FAILED] += len(lines) - sent
            self.forwarded[index] += sent
        dropped = pending[2 * n]
        if dropped:
            counters[C_NO_BACKEND] += len(dropped)
            dropped.clear()
        self.pending_lines = 0

    def _send(self, index: int, lines: list[bytes]) -> int:
        """Send `lines` to backend `index` packed in datagrams; return lines sent."""
        family, address = self.addresses[index]
        sendto = self.out[family].sendto
        limit = self.packet_size
        data = b"\n".join(lines)
        size = len(data)
        start = sent = 0
        while start < size:
            if size - start <= limit:
                end = size
            else:
                end = data.rfind(b"\n", start, start + limit + 1)
                if end <= start:
                    # One line longer than the packet size travels alone.
                    end = data.find(b"\n", start)
                    if end < 0:
                        end = size
            chunk = data[start:end]
            try:
                sendto(chunk, address)
                sent += chunk.count(b"\n") + 1
            except OSError:
                pass
            start = end + 1
        return sent

    def run(self) -> None:
        """The hot loop until `stop` is set (SIGTERM)."""
        fd = self.sock.fileno()
        self.sock.setblocking(False)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        recv_many = udpio.recv_many
        handle = self.handle
        shared = self.state.array
        while not self.stop:
            count, data = recv_many(fd, RECV_BATCH)
            if count:
                # A health change applies from the next batch on (one read
                # of shared memory a batch).
                if shared[0] != self.generation:
                    self.refresh_health()
                handle(count, data)
                if self.pending_lines >= FLUSH_LINES:
                    self.flush()
                    self.publish()
                continue
            # Drained: send what is batched, then wait for more.
            busy = self.pending_lines >= COALESCE_LINES
            if self.pending_lines:
                self.flush()
            self.publish()
            if busy:
                # Under load, nap instead of sleeping in poll(): the senders
                # then never pay for waking us, and the next read gets a
                # full batch. Costs at most this much latency.
                time.sleep(COALESCE_SECONDS)
            else:
                poller.poll(500)
        self.flush()
        self.publish()


def worker_main(
    backends: list[Backend],
    array,
    workers: int,
    index: int,
    listen: str,
    port: int,
    rcvbuf: int,
    packet_size: int,
    cache_size: int,
    log_level: int,
) -> None:
    """Entry point of a worker process (forked by the supervisor)."""
    logging.basicConfig(level=log_level, format=f"%(levelname)s worker {index}: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state = SharedState(len(backends), workers, array)
    try:
        sock = bind_udp(listen, port, rcvbuf)
    except OSError as exc:
        log.error("cannot bind UDP %s:%d: %s", listen, port, exc.strerror)
        sys.exit(3)
    worker = Worker(backends, state, index, sock, packet_size, cache_size)

    def on_term(signum, frame):
        worker.stop = True

    signal.signal(signal.SIGTERM, on_term)
    if index == 0:
        log.info(
            "UDP %s:%d, receive buffer %d bytes, %s I/O",
            listen,
            port,
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            "recvmmsg" if udpio.HAVE_C else "Python recv",
        )
    worker.run()


# --------------------------------------------------------------------------
# Supervisor: health checks, admin port, counters to carbon, workers


class HealthChecker:
    """Checks every backend with an admin port and damps flapping."""

    def __init__(
        self,
        backends: Sequence[Backend],
        damper: FlapDamper,
        timeout: float = 1.0,
        state_file: str | None = None,
        probe=statsd_admin_health,
        clock=time.time,
    ) -> None:
        self.backends = list(backends)
        self.damper = damper
        self.timeout = timeout
        self.state_file = state_file
        self.probe = probe
        self.clock = clock
        self.states: dict[str, FlapState] = {b.spec: FlapState() for b in backends}
        self.up: list[bool | None] = [None] * len(backends)
        self.usable: list[bool] = [True] * len(backends)
        self._pool = ThreadPoolExecutor(max_workers=min(16, max(1, len(backends))))

    def _probe(self, backend: Backend) -> bool:
        if backend.admin_port is None:
            return True
        return self.probe(backend.host, backend.admin_port, self.timeout)

    def check(self) -> bool:
        """One round of checks; True when the usable set changed."""
        results = list(self._pool.map(self._probe, self.backends))
        now = self.clock()
        if self.state_file:
            with FlapStore(self.state_file) as store:
                for backend in self.backends:
                    if backend.spec in store.states:
                        self.states[backend.spec] = store.get(backend.spec)
                usable = self._observe(results, now)
                store.states.update(self.states)
        else:
            usable = self._observe(results, now)
        changed = usable != self.usable
        for i, backend in enumerate(self.backends):
            if usable[i] != self.usable[i]:
                if usable[i]:
                    log.warning("backend %s is back in", backend)
                elif not results[i]:
                    log.warning("backend %s is down: held out", backend)
                else:
                    until = self.damper.release_time(self.states[backend.spec])
                    log.warning(
                        "backend %s is flapping: held out until about %s",
                        backend,
                        time.strftime("%H:%M:%S", time.localtime(until)) if until else "stable",
                    )
        self.up = list(results)
        self.usable = usable
        return changed

    def _observe(self, results: Sequence[bool], now: float) -> list[bool]:
        return [
            self.damper.observe(self.states[b.spec], up, now)
            for b, up in zip(self.backends, results, strict=True)
        ]

    def describe(self) -> list[str]:
        now = self.clock()
        lines = []
        for i, backend in enumerate(self.backends):
            st = self.states[backend.spec]
            status = "in" if self.usable[i] else "out"
            checked = {None: "unchecked", True: "up", False: "down"}[self.up[i]]
            if backend.admin_port is None:
                checked = "not checked (no admin port)"
            lines.append(
                f"{backend.spec} {status} check={checked} "
                f"penalty={self.damper.decayed(st, now):.1f} suppressed={st.suppressed}"
            )
        return lines


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on full receive buffers of UDP sockets on `port`.

    The last column of /proc/net/udp{,6} (this network namespace). Only our
    workers can hold the port: SO_REUSEPORT groups need the same user.
    """
    total = 0
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(path, encoding="ascii") as table:
                next(table, None)
                for row in table:
                    fields = row.split()
                    if len(fields) > 12 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        total += int(fields[-1])
        except (OSError, ValueError):
            continue
    return total


class KernelDrops:
    """Cumulative kernel drops on the relay's port, across worker restarts
    (a restarted worker's new socket starts again from zero)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.total = 0
        self.last = 0
        self._lock = threading.Lock()

    def read(self) -> int:
        with self._lock:
            now = udp_drops(self.port)
            self.total += now - self.last if now >= self.last else now
            self.last = now
            return self.total


@dataclass
class RelayConfig:
    backends: list[Backend]
    listen: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    admin_listen: str = "0.0.0.0"
    admin_port: int = DEFAULT_ADMIN_PORT
    workers: int = 1
    packet_size: int = DEFAULT_PACKET_SIZE
    rcvbuf: int = DEFAULT_RCVBUF
    cache_size: int = DEFAULT_CACHE_SIZE
    check_interval: float = 5.0
    check_timeout: float = 1.0
    flap_state: str | None = None
    carbon: tuple[str, int] | None = ("127.0.0.1", 2003)
    stats_interval: float = 60.0
    stats_prefix: str = "carbonscale.statsd_relay"


class Supervisor:
    def __init__(self, config: RelayConfig, damper: FlapDamper) -> None:
        self.config = config
        self.backends = config.backends
        self.state = SharedState(len(self.backends), config.workers)
        self.checker = HealthChecker(self.backends, damper, config.check_timeout, config.flap_state)
        self.stop = threading.Event()
        self.manual_health = "up"
        self.started = time.time()
        self.processes: list[multiprocessing.process.BaseProcess | None] = [None] * config.workers
        # fork, not spawn: spawn re-imports the main module, and
        # `python -m carbonscale` would run the CLI again in every worker. The
        # children touch only their socket, logging and the shared array.
        self._context = multiprocessing.get_context("fork")
        self.kernel_drops = KernelDrops(config.port)
        self._last_totals = [0] * (self.state.block + 1)
        self._carbon_failing = False
        self.admin: socketserver.ThreadingTCPServer | None = None
        # Maintained by the main loop (the admin thread only reads it).
        self.workers_alive = 0

    # ----- health

    def health_round(self) -> None:
        if self.checker.check():
            self.state.set_usable(self.checker.usable)

    def relay_is_up(self) -> bool:
        return self.manual_health == "up" and self.workers_alive > 0 and any(self.checker.usable)

    # ----- admin port

    def admin_command(self, line: str) -> str | None:
        words = line.strip().split()
        if not words:
            return ""
        cmd, params = words[0].lower(), words[1:]
        if cmd == "health":
            if params and params[0].lower() in ("up", "down"):
                self.manual_health = params[0].lower()
                log.warning("health set %s on the admin port", self.manual_health)
            return f"health: {'up' if self.relay_is_up() else 'down'}\n"
        if cmd == "stats":
            counters, forwarded = self.totals()
            out = [f"uptime: {int(time.time() - self.started)}"]
            out += [f"{name}: {value}" for name, value in counters.items()]
            for backend, value in zip(self.backends, forwarded, strict=True):
                out.append(f"backend {backend.spec} forwarded: {value}")
            return "\n".join(out) + "\nEND\n\n"
        if cmd == "backends":
            return "\n".join(self.checker.describe()) + "\nEND\n\n"
        if cmd == "help":
            return "Commands: health [up|down], stats, backends, quit\n\n"
        if cmd == "quit":
            return None
        return "ERROR\n"

    def start_admin(self) -> None:
        if not self.config.admin_port:
            return
        supervisor = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def handle(self) -> None:
                try:
                    for raw in self.rfile:
                        reply = supervisor.admin_command(raw.decode("ascii", "replace"))
                        if reply is None:
                            return
                        self.wfile.write(reply.encode())
                        self.wfile.flush()
                except OSError:
                    return

        family = socket.AF_INET6 if ":" in self.config.admin_listen else socket.AF_INET

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True
            address_family = family

        try:
            self.admin = Server((self.config.admin_listen, self.config.admin_port), Handler)
        except OSError as exc:
            raise CarbonscaleError(
                f"cannot listen on admin port {self.config.admin_listen}:"
                f"{self.config.admin_port}: {exc.strerror}"
            ) from exc
        threading.Thread(target=self.admin.serve_forever, name="admin", daemon=True).start()

    # ----- counters to carbon

    def totals(self) -> tuple[dict[str, int], list[int]]:
        """Cumulative counters (workers' and the kernel's drops) and forwarded per backend."""
        raw = self.state.totals()
        counters = dict(zip(COUNTERS, raw[: len(COUNTERS)], strict=True))
        counters["datagrams_dropped_kernel"] = self.kernel_drops.read()
        return counters, raw[len(COUNTERS) :]

    def stats_lines(self, now: int) -> bytes:
        """The counters since the last call, as carbon line protocol."""
        counters, forwarded = self.totals()
        current = [*counters.values(), *forwarded]
        deltas = [max(0, t - last) for t, last in zip(current, self._last_totals, strict=True)]
        self._last_totals = current
        prefix = self.config.stats_prefix
        lines = [f"{prefix}.{name} {deltas[i]} {now}" for i, name in enumerate(counters)]
        for i, backend in enumerate(self.backends):
            lines.append(
                f"{prefix}.backends.{backend.metric_name}.forwarded "
                f"{deltas[len(counters) + i]} {now}"
            )
            lines.append(
                f"{prefix}.backends.{backend.metric_name}.usable "
                f"{int(self.checker.usable[i])} {now}"
            )
        lines.append(f"{prefix}.backends_usable {sum(self.checker.usable)} {now}")
        return ("\n".join(lines) + "\n").encode()

    def send_stats(self) -> None:
        payload = self.stats_lines(int(time.time()))
        if self.config.carbon is None:
            return
        try:
            with socket.create_connection(self.config.carbon, timeout=5) as sock:
                sock.sendall(payload)
            if self._carbon_failing:
                log.warning("counters reach carbon at %s:%d again", *self.config.carbon)
            self._carbon_failing = False
        except OSError as exc:
            if not self._carbon_failing:
                log.warning(
                    "cannot send counters to carbon at %s:%d: %s",
                    *self.config.carbon,
                    exc.strerror or exc,
                )
            self._carbon_failing = True

    # ----- workers

    def start_worker(self, index: int) -> None:
        c = self.config
        process = self._context.Process(
            target=worker_main,
            name=f"statsd-relay-worker-{index}",
            args=(
                self.backends,
                self.state.array,
                c.workers,
                index,
                c.listen,
                c.port,
                c.rcvbuf,
                c.packet_size,
                c.cache_size,
                logging.getLogger().level,
            ),
            daemon=True,
        )
        process.start()
        self.processes[index] = process

    def run(self) -> int:
        c = self.config
        # Fail early and clearly when the port is taken (then close: a socket
        # that never reads would get its share of SO_REUSEPORT traffic).
        try:
            bind_udp(c.listen, c.port, 0).close()
        except OSError as exc:
            raise CarbonscaleError(f"cannot bind UDP {c.listen}:{c.port}: {exc.strerror}") from exc
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        self.health_round()
        for index in range(c.workers):
            self.start_worker(index)
        self.workers_alive = c.workers
        self.start_admin()
        log.info(
            "statsd relay on UDP %s:%d, %d worker(s), admin %s, backends: %s",
            c.listen,
            c.port,
            c.workers,
            f"{c.admin_listen}:{c.admin_port}" if c.admin_port else "off",
            " ".join(b.spec for b in self.backends),
        )
        now = time.monotonic()
        next_check = now + c.check_interval
        next_stats = now + c.stats_interval
        exit_code = 0
        while not self.stop.wait(min(1.0, c.check_interval)):
            for index, process in enumerate(self.processes):
                if process is not None and not process.is_alive():
                    if process.exitcode == 3:
                        log.error("worker %d cannot bind its socket: stopping", index)
                        self.stop.set()
                        exit_code = 1
                        break
                    log.error("worker %d died (exit %s): restarting", index, process.exitcode)
                    self.start_worker(index)
            self.workers_alive = sum(1 for p in self.processes if p is not None and p.is_alive())
            now = time.monotonic()
            if now >= next_check:
                self.health_round()
                next_check = now + c.check_interval
            if now >= next_stats:
                self.send_stats()
                next_stats = now + c.stats_interval
        self.shutdown()
        return exit_code

    def shutdown(self) -> None:
        for process in self.processes:
            if process is not None and process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 5
        for process in self.processes:
            if process is not None:
                process.join(max(0.1, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()
        if self.admin is not None:
            self.admin.shutdown()
            self.admin.server_close()
        if self.config.carbon is not None:
            self.send_stats()
        counters, _ = self.totals()
        log.info("stopped: %s", ", ".join(f"{name} {value}" for name, value in counters.items()))

"""A worker process: the hot loop from one SO_REUSEPORT socket to the backends."""

from __future__ import annotations

import logging
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence

from carbonscale import CarbonscaleError
from carbonscale.relay import udpio
from carbonscale.relay.statsd.backends import Backend
from carbonscale.relay.statsd.config import DEFAULT_CACHE_SIZE, DEFAULT_PACKET_SIZE
from carbonscale.relay.statsd.placement import place, primary, route
from carbonscale.relay.statsd.shared import (
    C_DATAGRAMS,
    C_FORWARDED,
    C_MALFORMED,
    C_METRICS,
    C_NO_BACKEND,
    C_REFUSED,
    C_REROUTED,
    C_SEND_FAILED,
    COUNTERS,
    SharedState,
)

log = logging.getLogger("carbonscale.relay.statsd")

# Datagrams read per recvmmsg call.
RECV_BATCH = 256

# Metric lines buffered before a flush even while the socket never drains.
FLUSH_LINES = 4096

# A drained socket after at least this many lines means load: nap
# COALESCE_SECONDS before reading again rather than wait in poll().
COALESCE_LINES = 32
COALESCE_SECONDS = 0.0005

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
# A worker exits with this when it cannot bind the port: the supervisor then
# stops instead of restarting it in a loop.
EXIT_CANNOT_BIND = 3


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
        metrics, malformed, refused, misses = route(
            data, self.first, self.usable_flags, self.second, self.pending
        )
        counters = self.counters
        counters[C_DATAGRAMS] += count
        counters[C_METRICS] += metrics
        counters[C_MALFORMED] += malformed
        counters[C_REFUSED] += refused
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
        sys.exit(EXIT_CANNOT_BIND)
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

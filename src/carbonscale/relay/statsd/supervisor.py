"""The supervisor: health checks, the admin port, counters to carbon, workers."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from carbonscale import CarbonscaleError, ExitStatus
from carbonscale.flap import FlapDamper, FlapState, FlapStore
from carbonscale.health import statsd_admin_health
from carbonscale.relay.statsd.backends import Backend
from carbonscale.relay.statsd.config import RelayConfig
from carbonscale.relay.statsd.shared import COUNTERS, SharedState
from carbonscale.relay.statsd.worker import EXIT_CANNOT_BIND, bind_udp, worker_main

log = logging.getLogger("carbonscale.relay.statsd")


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
        exit_code = ExitStatus.OK
        while not self.stop.wait(min(1.0, c.check_interval)):
            for index, process in enumerate(self.processes):
                if process is not None and not process.is_alive():
                    if process.exitcode == EXIT_CANNOT_BIND:
                        log.error("worker %d cannot bind its socket: stopping", index)
                        self.stop.set()
                        exit_code = ExitStatus.PROBLEM
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

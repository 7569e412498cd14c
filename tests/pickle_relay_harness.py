"""A real `carbonscale relay pickle` process and a real TCP line sink, for the tests."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import subprocess
import sys
import threading
import time

CLI = [sys.executable, "-m", "carbonscale"]


def frame(payload: bytes) -> bytes:
    return struct.pack("!L", len(payload)) + payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LineSink:
    """carbon-c-relay's stand-in: accepts connections on a port and keeps every byte."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.data = bytearray()
        self.connections = 0
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        self.conns: list[socket.socket] = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        while True:
            try:
                chunk = conn.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                conn.close()
                return
            with self.lock:
                self.data += chunk

    def lines(self, prefix: bytes | None = None, exclude: bytes | None = None) -> list[bytes]:
        with self.lock:
            out = bytes(self.data).split(b"\n")[:-1]
        if prefix is not None:
            out = [line for line in out if line.startswith(prefix)]
        if exclude is not None:
            out = [line for line in out if not line.startswith(exclude)]
        return out

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)

    def close(self) -> None:
        self.running = False
        # shutdown() wakes the thread blocked in accept(); close() alone does not.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class RelayProcess:
    """`carbonscale relay pickle` on a free port; stop() returns its final counters."""

    def __init__(self, upstream_port: int, *extra: str, stats_interval: float = 3600) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                *CLI,
                "relay",
                "pickle",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--upstream",
                f"127.0.0.1:{upstream_port}",
                "--stats-interval",
                str(stats_interval),
                "--stats-prefix",
                "carbon.relays.test.pickle",
                *extra,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.listening = threading.Event()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        if not self.listening.wait(30):
            self.proc.kill()
            raise RuntimeError(f"relay did not start: {self.log}")

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            if "listening on" in line:
                self.listening.set()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> dict[str, int]:
        self.proc.terminate()
        self.proc.wait(timeout)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any("stopped:" in x for x in self.log):
            time.sleep(0.02)
        line = next(x for x in self.log if "stopped:" in x)
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split("stopped:", 1)[1])}

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


def send_and_wait_close(relay: RelayProcess, data: bytes, timeout: float = 10) -> bool:
    """Send bytes on a fresh connection, half-close, and wait for the relay to close it.

    True when the relay closed (or reset) the connection before we did."""
    sock = relay.connect()
    try:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True
    finally:
        sock.close()

"""A live carbon-c-relay on this machine, writing to TCP sinks the test runs.

Unlike `carbon-c-relay -t`, the live relay rewrites names before it routes
them; only a running relay shows where a line really goes and as what.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

from relay_oracle import RELAY


class Sinks:
    """TCP listeners on 127.0.0.1 keeping every byte they receive, per port."""

    def __init__(self, count: int) -> None:
        self.listeners = []
        for _ in range(count):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            listener.setblocking(False)
            self.listeners.append(listener)
        self.ports = [listener.getsockname()[1] for listener in self.listeners]
        self.data = {port: bytearray() for port in self.ports}
        self.lock = threading.Lock()
        self.selector = selectors.DefaultSelector()
        for port, listener in zip(self.ports, self.listeners, strict=True):
            self.selector.register(listener, selectors.EVENT_READ, ("accept", port))
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            for key, _ in self.selector.select(0.1):
                kind, port = key.data
                if kind == "accept":
                    conn, _ = key.fileobj.accept()
                    conn.setblocking(False)
                    self.selector.register(conn, selectors.EVENT_READ, ("read", port))
                    continue
                try:
                    chunk = key.fileobj.recv(1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    self.selector.unregister(key.fileobj)
                    key.fileobj.close()
                    continue
                with self.lock:
                    self.data[port] += chunk

    def lines(self, port: int) -> list[bytes]:
        """Complete lines received on port (without '\\n')."""
        with self.lock:
            data = bytes(self.data[port])
        return data.split(b"\n")[:-1]

    def close(self) -> None:
        self.running = False
        self.thread.join()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_relay(args: list[str], port: int) -> Iterator[subprocess.Popen]:
    """carbon-c-relay with args (-f CONFIG ...), up once it accepts on port."""
    proc = subprocess.Popen(
        [RELAY, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"carbon-c-relay did not start: {proc.stderr.read()!r}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(data)


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


class LineReceiver:
    """One connection's bytes, as a carbon line receiver on 127.0.0.1 gets them."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            self.received.append(data)

    def wait(self, timeout: float = 5.0) -> list[bytes]:
        """What arrived, once the sender closed (or timeout passed)."""
        self._thread.join(timeout)
        self.server.close()
        return self.received

"""Health probes shared by the LVS checks and the statsd relay.

statsd's admin port answers `health` with `health: up` (or `down`); Graphite's
TCP listeners are healthy when they accept a connection.
"""

from __future__ import annotations

import socket


def tcp_connect(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connection to host:port is accepted within `timeout`."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def statsd_admin_health(host: str, port: int, timeout: float = 1.0) -> bool:
    """Ask a statsd-style admin port `health`; True when the reply says `up`.

    A backend that accepts the connection but does not answer within
    `timeout` is down: a wedged daemon must leave the pool.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"health\n")
            reply = b""
            while b"\n" not in reply and len(reply) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return b"up" in reply.split(b"\n", 1)[0]

"""Batched UDP I/O: many datagrams per call.

`recv_many(fd, max_msgs) -> (count, data)` reads up to `max_msgs` queued
datagrams without blocking and returns them joined, each followed by a
newline, so `data.split(b"\\n")` gives every metric line of the batch;
`(0, b"")` when nothing is queued. `send_many(fd, datagrams) -> int` sends
bytes objects on a connected socket and returns how many went out before it
would block.

The C extension `carbonscale.relay._statsd` does each with one recvmmsg(2) or
sendmmsg(2) system call (about 5x fewer cycles a datagram than a Python
loop). The functions below are its reference and the fallback when the
extension was not built; tests check the two agree.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

# recv_many reads at most this many datagrams a call (the C slots' count).
MAX_BATCH = 1024
# The largest UDP payload (IPv4): a read this big never truncates a datagram.
MAX_DATAGRAM = 65536

try:
    from carbonscale.relay._statsd import recv_many as _recv_many_c
    from carbonscale.relay._statsd import send_many as _send_many_c
except ImportError:  # a checkout whose extension was not compiled
    _recv_many_c = _send_many_c = None

HAVE_C = _recv_many_c is not None


def recv_many_py(fd: int, max_msgs: int) -> tuple[int, bytes]:
    if not 1 <= max_msgs <= MAX_BATCH:
        raise ValueError(f"max_msgs must be in 1..{MAX_BATCH}")
    # A socket object over the caller's descriptor, detached (not closed) after.
    sock = socket.socket(fileno=fd)
    recv = sock.recv
    parts: list[bytes] = []
    try:
        for _ in range(max_msgs):
            try:
                parts.append(recv(MAX_DATAGRAM, socket.MSG_DONTWAIT))
            except (BlockingIOError, InterruptedError):
                break
    finally:
        sock.detach()
    if not parts:
        return 0, b""
    parts.append(b"")
    return len(parts) - 1, b"\n".join(parts)


def send_many_py(fd: int, datagrams: Sequence[bytes]) -> int:
    sock = socket.socket(fileno=fd)
    sent = 0
    try:
        for datagram in datagrams:
            if not isinstance(datagram, bytes):
                raise TypeError("every datagram must be bytes")
            try:
                sock.send(datagram)
            except BlockingIOError:
                break
            except OSError:
                if sent:
                    break
                raise
            sent += 1
    finally:
        sock.detach()
    return sent


recv_many = _recv_many_c or recv_many_py
send_many = _send_many_c or send_many_py

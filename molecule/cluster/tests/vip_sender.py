"""A persistent carbon line sender through the VIP, run as its own process
until SIGTERM; then it prints what happened as JSON on stdout.

    python3 vip_sender.py HOST:PORT PREFIX BASE METRICS [--resend SECONDS]

Every INTERVAL (10 ms) batch k is due: one point for each of METRICS metrics,
point n = k * METRICS + i is `PREFIX.m{i} n BASE - k * 60` (a whisper slot
of its own, going back in time; see `expected`). It keeps one connection and
reconnects when a write or connect fails, recording each failure with its
wall-clock time.

- plain: the batches that fail or come due while there is no connection are
  not written (counted in `unwritten`); what the kernel took counts as written.
- --resend SECONDS: batches wait while there is no connection, and after a
  reconnect everything written in the SECONDS before the failure is written
  again (whisper overwrites a slot with the same value, so a resent point
  costs nothing): what a careful client does to lose nothing on a reset.
"""

from __future__ import annotations

import collections
import json
import signal
import socket
import sys
import time

INTERVAL = 0.01
# The 60 s archive of the storage role's default schema holds 7 days: 10,080
# slots a metric. The sender stops taking new batches before it runs out.
MAX_BATCHES = 10_000
CONNECT_TIMEOUT = 1.0


def batch_lines(prefix: str, base: int, metrics: int, k: int) -> bytes:
    return "".join(
        f"{prefix}.m{i} {k * metrics + i} {base - k * 60}\n" for i in range(metrics)
    ).encode()


def expected(base: int, metrics: int, batches) -> dict[tuple[str, str], float]:
    """{(metric leaf, timestamp): value} of the given batches, as whisper_points reads them."""
    return {
        (f"m{i}", str(base - k * 60)): float(k * metrics + i)
        for k in batches
        for i in range(metrics)
    }


def run(door: str, prefix: str, base: int, metrics: int, resend: float) -> dict:
    host, port = door.rsplit(":", 1)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    errors: list[list] = []  # [wall time, "connect" or "send", message]
    unwritten: list[int] = []  # batches the plain sender could not write
    written: collections.deque[tuple[float, int]] = collections.deque()  # resend window
    pending: list[int] = []
    sock = None
    connects = 0
    due = 0
    start = time.monotonic()
    while not stopping:
        now = time.monotonic()
        while due < MAX_BATCHES and start + due * INTERVAL <= now:
            pending.append(due)
            due += 1
        if sock is None:
            try:
                sock = socket.create_connection((host, int(port)), CONNECT_TIMEOUT)
                connects += 1
                if resend and connects > 1:
                    pending = sorted({k for _, k in written} | set(pending))
            except OSError as exc:
                errors.append([time.time(), "connect", str(exc)])
                if not resend:
                    unwritten.extend(pending)
                    pending = []
                time.sleep(0.05)
                continue
        while pending:
            k = pending[0]
            try:
                sock.sendall(batch_lines(prefix, base, metrics, k))
            except OSError as exc:
                errors.append([time.time(), "send", str(exc)])
                sock.close()
                sock = None
                if not resend:
                    unwritten.extend(pending)
                    pending = []
                break
            pending.pop(0)
            if resend:
                written.append((time.monotonic(), k))
        if resend and sock is not None:
            while written and written[0][0] < time.monotonic() - resend:
                written.popleft()
        time.sleep(max(0.0, start + due * INTERVAL - time.monotonic()))
    closed = None
    if sock is not None:
        # Half-close and wait for the relay's close: it has read everything.
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            while sock.recv(65536):
                pass
            closed = "clean"
        except OSError as exc:
            closed = str(exc)
        sock.close()
    return {
        "batches": due,
        "metrics": metrics,
        "full": due >= MAX_BATCHES,
        "unwritten": sorted(set(unwritten + pending)),
        "connects": connects,
        "errors": errors,
        "closed": closed,
    }


def episodes(errors: list[list], gap: float = 5.0) -> list[list[float]]:
    """Failures less than `gap` seconds apart are one episode: [[first, last], ...]."""
    found: list[list[float]] = []
    for when, *_ in sorted(errors):
        if found and when - found[-1][1] < gap:
            found[-1][1] = when
        else:
            found.append([when, when])
    return found


if __name__ == "__main__":
    door, prefix, base, metrics = sys.argv[1:5]
    seconds = float(sys.argv[6]) if sys.argv[5:6] == ["--resend"] else 0.0
    print(json.dumps(run(door, prefix, int(base), int(metrics), seconds)))

"""Restart carbon-c-relay behind the relay's front without losing a line.

carbon-c-relay discards what is unread in its sockets when it stops, so a
sender connected to it loses points at every restart. On a relay node the
public ports (line 2003, pickle 2004) belong to `carbonscale relay pickle`
(the front), which keeps its clients and queues their lines while
carbon-c-relay, on a loopback port behind it, restarts:

1. hold: the restarter writes `HOLD_REQUEST` (the time the hold ends by
   itself, so a restarter that dies never leaves the front held) into the
   front's hold directory; the front finishes the batch it is writing (whole
   lines only), stops writing and answers with `HOLD_ACK`;
2. the restarter waits until carbon-c-relay has read every byte the front
   sent (no unread or unacknowledged bytes on loopback connections to its
   port, from /proc/net/tcp): from then on its queues hold everything, and
   carbon-c-relay delivers its queues before it exits;
3. restart carbon-c-relay, wait until it listens again and a little more
   (3.7.3 has crashed when a client connected in its first half second);
4. release: remove `HOLD_REQUEST`; the front reconnects and writes its queue.

The front never connects to carbon-c-relay while held, so step 3's window
sees no client from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from carbonscale import CarbonscaleError

HOLD_REQUEST = "hold"
HOLD_ACK = "held"
# A hold that nobody releases ends by itself after this many seconds.
DEFAULT_HOLD_SECONDS = 120.0
DEFAULT_WAIT_SECONDS = 30.0
# After carbon-c-relay accepts again, before the front may connect.
DEFAULT_SETTLE_SECONDS = 1.0
PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


class HoldError(CarbonscaleError):
    pass


# ---------------------------------------------------------------- the files


def request_hold(hold_dir: str | os.PathLike, seconds: float) -> None:
    """Ask the front to hold until now + seconds (or until released)."""
    path = Path(hold_dir)
    until = time.time() + seconds
    tmp = path / f".{HOLD_REQUEST}.{os.getpid()}"
    tmp.write_text(json.dumps({"until": until}))
    tmp.replace(path / HOLD_REQUEST)


def release_hold(hold_dir: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(hold_dir) / HOLD_REQUEST).unlink()


def requested_until(hold_dir: str | os.PathLike, now: float) -> float | None:
    """The end of the hold asked for, if one is asked for and not over (the front's side)."""
    try:
        text = (Path(hold_dir) / HOLD_REQUEST).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return None
    try:
        until = float(json.loads(text)["until"])
    except (ValueError, KeyError, TypeError):
        # A request being written (or garbage): treat as no request.
        return None
    return until if until > now else None


def write_ack(hold_dir: str | os.PathLike, queued: int) -> None:
    path = Path(hold_dir)
    tmp = path / f".{HOLD_ACK}.{os.getpid()}"
    tmp.write_text(json.dumps({"pid": os.getpid(), "queued": queued}))
    tmp.replace(path / HOLD_ACK)


def remove_ack(hold_dir: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(hold_dir) / HOLD_ACK).unlink()


def read_ack(hold_dir: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(hold_dir) / HOLD_ACK).read_text())
    except (FileNotFoundError, ValueError):
        return None


# ---------------------------------------------------------------- the sockets


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def _tcp_rows(tables: Iterable[str]) -> Iterator[list[str]]:
    """The fields of each socket row of /proc/net/tcp and tcp6 (header skipped)."""
    for table in tables:
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) >= 5:
                yield fields


def unread_bytes(port: int, tables: Iterable[str] = PROC_NET_TCP) -> int:
    """Bytes still in flight on established connections to local `port`.

    The receiving side's rx_queue (bytes carbon-c-relay has not read) plus
    the sending side's tx_queue (bytes not yet acknowledged) of every
    established connection whose local or remote port is `port`.
    """
    total = 0
    for fields in _tcp_rows(tables):
        if fields[3] != TCP_ESTABLISHED:
            continue
        tx_queue, rx_queue = (int(value, 16) for value in fields[4].split(":"))
        if _port_of(fields[1]) == port:
            total += rx_queue
        elif _port_of(fields[2]) == port:
            total += tx_queue
    return total


def listening(port: int, tables: Iterable[str] = PROC_NET_TCP) -> bool:
    """A socket listens on `port` (read from the tables: a probe connection is
    the very thing that can crash carbon-c-relay while it starts)."""
    return any(
        fields[3] == TCP_LISTEN and _port_of(fields[1]) == port for fields in _tcp_rows(tables)
    )


def _wait(predicate: Callable[[], bool], seconds: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# ---------------------------------------------------------------- the sequence


@dataclass
class HoldReport:
    held: bool  # False: no front was running, nothing to hold
    queued_at_hold: int = 0
    hold_seconds: float = 0.0  # from the request until released


def hold(hold_dir: str | os.PathLike, port: int, *, seconds: float, wait: float) -> HoldReport:
    """Steps 1 and 2: the front holds and carbon-c-relay has read all it was sent."""
    path = Path(hold_dir)
    if not path.is_dir():
        return HoldReport(held=False)
    remove_ack(path)  # a stale answer from a front that died is no answer
    request_hold(path, seconds)
    if not _wait(lambda: read_ack(path) is not None, wait):
        release_hold(path)
        raise HoldError(
            f"the relay front did not confirm the hold within {wait:g}s ({path / HOLD_ACK} "
            "missing): is carbonscale-pickle-relay running with this --hold-dir?"
        )
    if not _wait(lambda: unread_bytes(port) == 0, wait):
        release_hold(path)
        raise HoldError(
            f"carbon-c-relay (port {port}) still has {unread_bytes(port)} unread bytes "
            f"after {wait:g}s; not restarting it"
        )
    ack = read_ack(path) or {}
    return HoldReport(held=True, queued_at_hold=int(ack.get("queued", 0)))


def release(hold_dir: str | os.PathLike, *, wait: float) -> None:
    """Step 4: the front writes again (it removes its answer when it does)."""
    path = Path(hold_dir)
    release_hold(path)
    if path.is_dir() and not _wait(lambda: read_ack(path) is None, wait):
        raise HoldError(f"the relay front did not resume within {wait:g}s")


def restart_behind_front(
    restart: Callable[[], None],
    hold_dir: str | os.PathLike,
    port: int,
    *,
    seconds: float = DEFAULT_HOLD_SECONDS,
    wait: float = DEFAULT_WAIT_SECONDS,
    settle: float = DEFAULT_SETTLE_SECONDS,
) -> HoldReport:
    """Hold the front, restart carbon-c-relay (`restart`), wait for it, release the front.

    The front is released whatever happens; an error says which step failed.
    """
    started = time.monotonic()
    report = hold(hold_dir, port, seconds=seconds, wait=wait)
    try:
        restart()
        if not _wait(lambda: listening(port), wait, interval=0.1):
            raise HoldError(
                f"carbon-c-relay does not listen on port {port} {wait:g}s after its restart"
            )
        time.sleep(settle)
    finally:
        if report.held:
            release(hold_dir, wait=wait)
    report.hold_seconds = time.monotonic() - started
    return report

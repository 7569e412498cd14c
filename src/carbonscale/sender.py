"""Points to carbon and statsd: line, pickle and statsd encodings, paced sending.

`carbonscale gen --send` sends its test metrics with this, and the reports
(`carbonscale cache report`, `carbonscale report ...`) their counters.
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from carbonscale import CarbonscaleError

FORMATS = ("line", "pickle", "statsd")
STATSD_TYPES = ("c", "g", "ms")
# carbon's own senders batch a few hundred points a frame.
PICKLE_FRAME_POINTS = 500


@dataclass(frozen=True)
class Point:
    name: str
    value: int | float
    timestamp: int


def _number(value: int | float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def encode_line(batch: list[Point]) -> bytes:
    return "".join(f"{p.name} {_number(p.value)} {p.timestamp}\n" for p in batch).encode()


def encode_pickle(batch: list[Point]) -> bytes:
    """One carbon pickle frame: 4-byte big-endian length, then the pickled list."""
    payload = pickle.dumps([(p.name, (p.timestamp, p.value)) for p in batch], protocol=2)
    return struct.pack("!L", len(payload)) + payload


def encode_statsd(batch: list[Point], metric_type: str = "c") -> list[bytes]:
    """statsd lines `name:value|type`, one per point (datagram packing is the sender's)."""
    return [f"{p.name}:{_number(p.value)}|{metric_type}".encode() for p in batch]


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CarbonscaleError(f"--send wants HOST:PORT (or [IPv6]:PORT), got {text!r}")
    return host, int(port)


class Pacer:
    """Keeps a sender at `rate` points per second (0: as fast as possible)."""

    def __init__(self, rate: float) -> None:
        if rate < 0:
            raise CarbonscaleError(f"--rate must be >= 0, got {rate}")
        self.rate = rate
        self.started = time.monotonic()
        self.sent = 0

    def wait(self, count: int) -> None:
        self.sent += count
        if self.rate:
            ahead = self.sent / self.rate - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)


def batches(points: Iterable[Point], size: int) -> Iterator[list[Point]]:
    batch: list[Point] = []
    for point in points:
        batch.append(point)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def send(
    points: Iterable[Point],
    address: tuple[str, int],
    fmt: str = "line",
    rate: float = 0,
    statsd_type: str = "c",
    packet_size: int = 0,
    timeout: float = 10.0,
) -> int:
    """Send points to a carbon (TCP line/pickle) or statsd (UDP) listener; return the count.

    Rate pacing works per batch; a rate below the batch size sends one point
    per batch so the pacing stays smooth.
    """
    if fmt not in FORMATS:
        raise CarbonscaleError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")
    pacer = Pacer(rate)
    batch_size = PICKLE_FRAME_POINTS if not rate else max(1, min(PICKLE_FRAME_POINTS, int(rate)))
    host, port = address
    sent = 0
    try:
        if fmt == "statsd":
            with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
                sock.connect((host, port))
                for batch in batches(points, batch_size):
                    for datagram in _pack_datagrams(encode_statsd(batch, statsd_type), packet_size):
                        sock.send(datagram)
                    sent += len(batch)
                    pacer.wait(len(batch))
            return sent
        encode = encode_line if fmt == "line" else encode_pickle
        with socket.create_connection((host, port), timeout=timeout) as sock:
            for batch in batches(points, batch_size):
                sock.sendall(encode(batch))
                sent += len(batch)
                pacer.wait(len(batch))
            # Half-close and wait for the peer to close: the receiver has then
            # read everything we sent, so a caller can check right after.
            sock.shutdown(socket.SHUT_WR)
            _drain_until_closed(sock)
    except OSError as exc:
        raise CarbonscaleError(
            f"sending to {host}:{port} failed after {sent} points: {exc.strerror or exc}"
        ) from exc
    return sent


def report(points: list[Point], destinations: list[str], timeout: float = 10.0) -> str:
    """Send a report's points to the first carbon line receiver (HOST:PORT) of
    `destinations` that takes them all; that destination. A report is small
    and cumulative, so trying the next receiver costs at most a duplicate."""
    addresses = []
    for destination in destinations:
        try:
            addresses.append((destination, parse_address(destination)))
        except CarbonscaleError:
            raise CarbonscaleError(
                "the report destination must be HOST:PORT of a carbon line receiver, "
                f"got {destination!r}"
            ) from None
    if not addresses:
        raise CarbonscaleError("no report destination: give at least one HOST:PORT")
    failures = []
    for destination, address in addresses:
        try:
            send(points, address, "line", timeout=timeout)
            return destination
        except CarbonscaleError as exc:
            failures.append(str(exc))
    raise CarbonscaleError("; ".join(failures))


def _drain_until_closed(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        # A receiver that keeps half-closed connections open: everything was
        # still written; there is just no confirmation that it was read.
        pass


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _pack_datagrams(lines: list[bytes], packet_size: int) -> Iterator[bytes]:
    """One line per datagram, or newline-joined lines up to `packet_size` bytes."""
    if packet_size <= 0:
        yield from lines
        return
    packet = b""
    for line in lines:
        if packet and len(packet) + 1 + len(line) > packet_size:
            yield packet
            packet = b""
        packet = packet + b"\n" + line if packet else line
    if packet:
        yield packet

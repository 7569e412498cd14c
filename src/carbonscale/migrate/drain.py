"""Has an old owner's carbon-cache written out what it held for the moved metrics?

A delta fill copies what is on disk. Points a carbon-cache instance still holds
in memory are not there yet: a fill taken before they are written misses them,
and once the relays stop sending to that host nothing would bring them over.
So before the delta fill, every instance of an old owner is asked over
CarbonLink (carbon's cache query port, `cache-query-bulk`) which of the moved
metrics it still holds points for that are stamped before a moment (when the
last relay began writing to both rings); the fill waits until none are left.

CarbonLink frames are a 4-byte big-endian length and a pickle. What carbon
answers is unpickled with no class allowed (dicts, lists, tuples, numbers and
strings only).
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
import time
from collections.abc import Callable, Iterable

from carbonscale import CarbonscaleError
from carbonscale.relay.lines import RestrictedUnpickler

CHUNK = 1000


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, got = [], 0
    while got < count:
        chunk = sock.recv(min(count - got, 1 << 20))
        if not chunk:
            raise ConnectionError("CarbonLink closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def cache_query_bulk(
    address: tuple[str, int], metrics: list[str], timeout: float = 10.0
) -> dict[str, list[tuple[float, float]]]:
    """The points carbon-cache at `address` holds for each metric (not yet written)."""
    request = pickle.dumps({"type": "cache-query-bulk", "metrics": metrics}, protocol=2)
    where = f"carbon-cache at {address[0]}:{address[1]}"
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(struct.pack("!L", len(request)) + request)
            (length,) = struct.unpack("!L", _recv_exactly(sock, 4))
            answer = RestrictedUnpickler(io.BytesIO(_recv_exactly(sock, length))).load()
    except (OSError, ConnectionError) as exc:
        raise CarbonscaleError(f"{where}: CarbonLink query failed: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise CarbonscaleError(f"{where}: unreadable CarbonLink answer: {exc}") from exc
    if not isinstance(answer, dict) or "datapointsByMetric" not in answer:
        raise CarbonscaleError(f"{where}: CarbonLink answered {str(answer)[:200]!r}")
    return answer["datapointsByMetric"]


def held_before(
    instances: Iterable[tuple[str, int]],
    metrics: list[str],
    before: float,
    query: Callable = cache_query_bulk,
) -> list[str]:
    """Metrics some instance still holds a point for stamped before `before`."""
    held: set[str] = set()
    for address in instances:
        for start in range(0, len(metrics), CHUNK):
            answer = query(address, metrics[start : start + CHUNK])
            for metric, points in answer.items():
                if any(float(stamp) < before for stamp, _ in points):
                    held.add(metric)
    return sorted(held)


def wait_drained(
    instances: list[tuple[str, int]],
    metrics: list[str],
    before: float,
    timeout: float,
    interval: float = 1.0,
    query: Callable = cache_query_bulk,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, float]:
    """Wait until no instance holds a point of `metrics` stamped before `before`.
    Returns (queries made, seconds waited); a CarbonscaleError after `timeout`."""
    started = clock()
    rounds = 0
    while True:
        rounds += 1
        held = held_before(instances, metrics, before, query)
        waited = clock() - started
        if not held:
            return rounds, waited
        if waited >= timeout:
            raise CarbonscaleError(
                f"carbon-cache still holds points from before the dual write for "
                f"{len(held)} moved metric(s) after {timeout:.0f} s (e.g. {held[0]}): "
                "its writes are behind (MAX_UPDATES_PER_SECOND, a slow disk); rerun later"
            )
        sleep(interval)

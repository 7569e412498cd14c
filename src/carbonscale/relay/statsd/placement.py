"""Which backend a metric name goes to: StatsRelay's placement, then
carbon-c-relay's jump replicas while backends are held out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

from carbonscale.ring import fnv1a_64, jump_hash, xorshift64


def choices(key: int, count: int) -> Iterator[int]:
    """Backend indices in preference order for a 64-bit name hash.

    The first is StatsRelay's `Jump(key, count)`; each next one is the next
    jump replica as carbon-c-relay computes it: remove the chosen bucket by
    moving the last bucket into its place, xorshift the key, jump over one
    bucket fewer.
    """
    buckets = list(range(count))
    alive = count
    while alive:
        position = jump_hash(key, alive)
        yield buckets[position]
        alive -= 1
        buckets[position] = buckets[alive]
        key = xorshift64(key)


def primary(name: bytes, count: int) -> int:
    """StatsRelay's backend index for a metric name (bytes before ':')."""
    return jump_hash(fnv1a_64(name), count)


def place(name: bytes, usable: Sequence[bool]) -> int | None:
    """The first usable backend in `name`'s preference order, or None."""
    for index in choices(fnv1a_64(name), len(usable)):
        if usable[index]:
            return index
    return None


_DECIMAL = re.compile(rb"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NOT_FINITE = re.compile(rb"[+-]?(?:inf|infinity|nan)", re.IGNORECASE)


def number_of(text: bytes) -> float | None:
    """A statsd value or sample rate as a number, None when it is none (the
    daemon judges those). inf, infinity and nan (any case, signed) and decimals
    that overflow come back not finite. The C extension's number_of."""
    if _NOT_FINITE.fullmatch(text):
        return math.inf
    if _DECIMAL.fullmatch(text):
        return float(text)
    return None


def refused_samples(samples: bytes) -> bool:
    """Whether a line's samples (after the name's ':') would make statsd store
    a number carbon cannot: a value that is not finite (sets, type s, hold any
    text) or a sample rate `@RATE` that is not a positive finite number (`@0`
    makes a counter infinite)."""
    for segment in samples.split(b":"):
        fields = segment.split(b"|")
        if len(fields) < 2:
            continue
        if fields[1] != b"s":
            value = number_of(fields[0])
            if value is not None and not math.isfinite(value):
                return True
        for field in fields[2:]:
            if field.startswith(b"@"):
                rate = number_of(field[1:])
                if rate is not None and not (math.isfinite(rate) and rate > 0):
                    return True
    return False


def route_py(
    data: bytes,
    first: dict[bytes, int],
    usable: bytes,
    second: dict[bytes, int],
    pending: list[list[bytes]],
) -> tuple[int, int, int, list[tuple[bytes, bytes]]]:
    """Sort the metric lines of `data` into `pending` by cached placement.

    A line is `name:value|type...`: a name of at least one byte before the
    first ':' and a '|' after it, or it is malformed (counted, dropped).
    Empty lines are not metrics. A routable line goes to
    `pending[first[name]]` when that backend is usable (`usable[i]` non-zero),
    else to `pending[second[name]]`; a name missing from the cache it needs
    is returned in `misses` as `(name, line)` for the caller to hash. Returns
    `(metrics, malformed, refused, misses)`. The C extension's `route` is this loop.
    """
    metrics = malformed = refused = 0
    misses = []
    for line in data.split(b"\n"):
        if not line:
            continue
        metrics += 1
        colon = line.find(b":")
        if colon < 1 or line.find(b"|", colon) < 0:
            malformed += 1
            continue
        if refused_samples(line[colon + 1 :]):
            refused += 1
            continue
        name = line[:colon]
        index = first.get(name)
        if index is not None and not usable[index]:
            index = second.get(name)
        if index is None:
            misses.append((name, line))
        else:
            pending[index].append(line)
    return metrics, malformed, refused, misses


try:
    from carbonscale.relay._statsd import route
except ImportError:  # a checkout whose extension was not compiled
    route = route_py

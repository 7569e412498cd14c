"""Test metrics: buckytools' gentestmetrics (sending them is carbonscale.sender's).

Names are `<prefix><NNNNNN>` for a count, or `<prefix><line>` for each line of
a names file. Each name gets `points` timestamps `interval` apart, the last one
at `start` rounded down to the interval (so iterations go backwards from
`start`), emitted oldest first: all names at the first timestamp, then all at
the next, as a collector flushing every interval would.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

from carbonscale import CarbonscaleError

# Sending lives in carbonscale.sender; `send` stays importable from here too.
from carbonscale.sender import Point
from carbonscale.sender import send as send


def metric_names(count: int, prefix: str, names_file: str | None = None) -> list[str]:
    """The names to generate: from a file (one per line, blanks skipped) or counted."""
    if names_file is None:
        if count < 0:
            raise CarbonscaleError(f"-c must be >= 0, got {count}")
        return [f"{prefix}{i:06d}" for i in range(count)]
    try:
        with open(names_file, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise CarbonscaleError(f"cannot read names file {names_file}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CarbonscaleError(f"names file {names_file} is not valid UTF-8") from exc
    names = []
    for lineno, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if any(ch.isspace() for ch in name):
            raise CarbonscaleError(f"{names_file}:{lineno}: metric name contains whitespace")
        names.append(prefix + name)
    return names


def generate(
    names: list[str],
    points: int = 1,
    interval: int = 60,
    start: int | None = None,
    limit: int = 100,
    value: float | None = None,
    rng: random.Random | None = None,
) -> Iterator[Point]:
    """Yield the points chronologically (every name at one timestamp, then the next)."""
    if interval <= 0:
        raise CarbonscaleError(f"-i must be a positive number of seconds, got {interval}")
    if points < 1:
        raise CarbonscaleError(f"-x must be >= 1, got {points}")
    if value is None and limit <= 0:
        raise CarbonscaleError(f"-l must be > 0, got {limit}")
    start = int(time.time()) if start is None else start
    first = start - start % interval - interval * (points - 1)
    if first < 0:
        raise CarbonscaleError(
            f"-s {start} with -x {points} and -i {interval} reaches before the epoch"
        )
    rng = rng or random.Random()
    for step in range(points):
        timestamp = first + step * interval
        for name in names:
            yield Point(name, value if value is not None else rng.randrange(limit), timestamp)

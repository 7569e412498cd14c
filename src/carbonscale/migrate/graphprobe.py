"""Were the graphs whole while the storage tier moved?

A move is only as good as what a person sees meanwhile: a series whose new
owner answers before its history arrived, or whose old owner is dropped from
the query tier too early, shows a hole on a dashboard although every point is
back on disk at the end. The probe renders a few series through graphite-web
(the query host, as a dashboard does) every few seconds while a move runs and
keeps what each render showed. Afterwards, `gaps` compares each render with
what had been sent by then: a slot that had reached the front door at least
`grace` seconds before the render (the time carbon needs to take it in) and is
not in the graph is a hole in that graph.

A failed render (an error status, a timeout) is kept apart: it is not a hole
in a graph, but a dashboard showing an error is not whole either.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Render:
    at: float  # when the answer came (Unix time)
    # {series: stamps with a value}; None when the render failed
    seen: dict[str, set[int]] | None
    error: str = ""


@dataclass
class GraphProbe:
    """Render `targets` from graphite-web at `url` every `every` seconds, over
    [since, now], in a thread, until stop()."""

    url: str
    targets: list[str]
    since: int
    every: float = 3.0
    timeout: float = 20.0
    renders: list[Render] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="graph-probe", daemon=True)

    def start(self) -> GraphProbe:
        self._thread.start()
        return self

    def stop(self) -> list[Render]:
        self._stop.set()
        self._thread.join()
        return self.renders

    def render_once(self) -> Render:
        # noCache: what the storage hosts answer now, not a render the query
        # host's memcached kept (a dashboard may lag by that on purpose).
        query = [("format", "json"), ("from", str(self.since)), ("until", "now"), ("noCache", "1")]
        query += [("target", target) for target in self.targets]
        address = f"{self.url.rstrip('/')}/render?{urllib.parse.urlencode(query)}"
        try:
            with urllib.request.urlopen(address, timeout=self.timeout) as answer:
                body = json.load(answer)
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, bad JSON
            return Render(time.time(), None, f"{type(exc).__name__}: {exc}")
        seen = {
            series["target"]: {
                int(stamp) for value, stamp in series["datapoints"] if value is not None
            }
            for series in body
        }
        return Render(time.time(), seen)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.renders.append(self.render_once())
            self._stop.wait(max(0.0, self.every - (time.monotonic() - started)))


@dataclass
class GapReport:
    renders: int
    failed: list[tuple[float, str]]
    # (render time, series, stamp) of every slot that should have been in a graph and was not
    missing: list[tuple[float, str, int]]
    longest_gap: int  # seconds: the longest run of consecutive missing slots in one series
    series: int


def gaps(
    renders: Iterable[Render],
    delivered: dict[int, float],
    series: Iterable[str],
    step: int,
    grace: float,
) -> GapReport:
    """Holes in the probe's renders. `delivered`: {slot stamp: when the sender had
    handed the slot to the front door} (history written before the move counts as
    delivered before it); `series`: the names the targets cover, each of which
    had every delivered slot sent."""
    names = sorted(series)
    renders = list(renders)
    failed = [(r.at, r.error) for r in renders if r.seen is None]
    missing: list[tuple[float, str, int]] = []
    longest = 0
    for render in renders:
        if render.seen is None:
            continue
        due = sorted(t for t, at in delivered.items() if at + grace <= render.at)
        for name in names:
            have = render.seen.get(name, set())
            run = 0
            previous = None
            for stamp in due:
                if stamp in have:
                    run = 0
                    continue
                missing.append((render.at, name, stamp))
                run = run + 1 if previous is not None and stamp - previous == step else 1
                previous = stamp
                longest = max(longest, run * step)
    return GapReport(len(renders), failed, missing, longest, len(names))

"""Losses that would otherwise be silent, as counters for carbon's dashboard.

- carbon-cache restarts: systemd's `NRestarts` of each instance's unit, the
  automatic restarts `Restart=` made after the daemon died (a crash, an OOM
  kill, a `kill -9`): the points in that instance's memory were lost each
  time. systemd keeps the count across daemon-reloads and resets it when an
  operator starts the unit, so graph it with nonNegativeDerivative.
- refused connections at the directors' nginx (the userspace LVS path):
  nginx counts nothing in its stream module, but logs every connection it
  could not accept or pass on. `NginxErrorLog` reads the error log from where
  the last run stopped (following logrotate's rename to `.1`) and adds each
  line to its kind's cumulative counter, kept in a state file.

`carbonscale report restarts|nginx-errors` send them; the carbon_storage and
lvs_director roles run those from timers.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from carbonscale import CarbonscaleError
from carbonscale.atomicfile import write_atomically
from carbonscale.sender import Point

# ---------------------------------------------------------------- restarts

SYSTEMCTL_PROPERTIES = ("Id", "NRestarts", "ActiveState")


@dataclass(frozen=True)
class UnitState:
    unit: str
    restarts: int
    active: bool

    @property
    def metric(self) -> str:
        """carbon-cache@a.service -> a; a unit without an instance: its name."""
        name = self.unit.removesuffix(".service")
        return name.split("@", 1)[1] if "@" in name else name.replace(".", "_")


def parse_systemctl_show(text: str) -> list[UnitState]:
    """`systemctl show -p Id,NRestarts,ActiveState UNIT...`: one block per unit."""
    states = []
    for block in re.split(r"\n\s*\n", text.strip()):
        values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if not values:
            continue
        if "Id" not in values or not values.get("NRestarts", "").isdigit():
            raise CarbonscaleError(f"systemctl show gave no restart count: {block!r}")
        states.append(
            UnitState(values["Id"], int(values["NRestarts"]), values.get("ActiveState") == "active")
        )
    return states


def unit_states(units: list[str]) -> list[UnitState]:
    """Restart counts and activity of systemd units, in the order given."""
    try:
        done = subprocess.run(
            ["systemctl", "show", "-p", ",".join(SYSTEMCTL_PROPERTIES), "--", *units],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CarbonscaleError(f"systemctl show failed: {exc}") from exc
    if done.returncode != 0:
        why = " ".join(done.stderr.split())  # systemctl's lines, on the one line of an error
        raise CarbonscaleError(f"systemctl show failed: {why}")
    states = parse_systemctl_show(done.stdout)
    if len(states) != len(units):
        raise CarbonscaleError(f"systemctl show answered for {len(states)} of {len(units)} units")
    return states


def restart_points(prefix: str, states: list[UnitState], timestamp: int) -> list[Point]:
    """`<prefix>.<instance>.restarts` and `.running` (1 or 0) per unit."""
    points = []
    for state in states:
        points.append(Point(f"{prefix}.{state.metric}.restarts", state.restarts, timestamp))
        points.append(Point(f"{prefix}.{state.metric}.running", int(state.active), timestamp))
    return points


# ---------------------------------------------------------------- nginx errors

# The kinds of error-log line that mean a client was refused or cut off, first
# match wins. nginx passes a client whose relay refused to the next one, so
# `upstream_connect_failed` counts attempts; `no_live_upstreams` and
# `no_file_descriptors` (accept4() or socket() failing with EMFILE/ENFILE)
# count clients refused outright.
NGINX_ERROR_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("no_file_descriptors", ("(24: Too many open files)", "(23: Too many open files in system)")),
    ("worker_connections", ("worker_connections are not enough",)),
    ("no_live_upstreams", ("no live upstreams",)),
    ("upstream_connect_failed", ("while connecting to upstream",)),
    ("proxy_errors", ("while proxying",)),
)
NGINX_COUNTERS = tuple(kind for kind, _ in NGINX_ERROR_KINDS)
# Levels below error (warn, notice, info) are routine: clients closing, reloads.
_NGINX_LEVEL = re.compile(rb"^\S+ \S+ \[(error|crit|alert|emerg)\] ")


def classify_nginx_error(line: bytes) -> str | None:
    """The counter an nginx error-log line adds to, or None."""
    if not _NGINX_LEVEL.match(line):
        return None
    text = line.decode("utf-8", "replace")
    for kind, needles in NGINX_ERROR_KINDS:
        if any(needle in text for needle in needles):
            return kind
    return None


@dataclass
class LogPosition:
    """Where the last run stopped: the file (by inode) and the byte after its
    last complete line."""

    inode: int = 0
    offset: int = 0


def _complete_lines(path: Path, offset: int) -> Iterator[tuple[bytes, int]]:
    """Each complete line from offset on, with the offset after it."""
    with path.open("rb") as handle:
        handle.seek(offset)
        for line in handle:
            if not line.endswith(b"\n"):
                return  # nginx is writing it: the next run reads it whole
            offset += len(line)
            yield line, offset


def new_lines(path: Path, position: LogPosition) -> Iterator[tuple[bytes, LogPosition]]:
    """The log's lines written since `position`, each with the position after it.

    logrotate renames the log to `<path>.1` and nginx reopens a new one: when
    the inode changed, the rest of the old file is read there first. A log
    that shrank in place (copytruncate) is read from its start.
    """
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return
    if position.inode and position.inode != inode:
        rotated = path.with_name(path.name + ".1")
        if rotated.exists() and rotated.stat().st_ino == position.inode:
            for line, offset in _complete_lines(rotated, position.offset):
                yield line, LogPosition(position.inode, offset)
        position = LogPosition(inode, 0)
    elif path.stat().st_size < position.offset:
        position = LogPosition(inode, 0)
    for line, offset in _complete_lines(path, position.offset):
        yield line, LogPosition(inode, offset)


class NginxErrorLog:
    """Cumulative counts of nginx's refusals, kept across runs in a JSON state file."""

    def __init__(self, log: Path, state: Path) -> None:
        self.log = log
        self.state = state
        self.position = LogPosition()
        self.counts = dict.fromkeys(NGINX_COUNTERS, 0)
        if state.exists():
            try:
                saved = json.loads(state.read_text())
                self.position = LogPosition(int(saved["inode"]), int(saved["offset"]))
                for kind in NGINX_COUNTERS:
                    self.counts[kind] = int(saved["counts"].get(kind, 0))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CarbonscaleError(
                    f"{state}: not a state file of `carbonscale report nginx-errors` ({exc}); "
                    "remove it to count from the log's start again"
                ) from None

    def update(self) -> dict[str, int]:
        """Count the lines written since the last update; the counters."""
        try:
            for line, position in new_lines(self.log, self.position):
                kind = classify_nginx_error(line)
                if kind is not None:
                    self.counts[kind] += 1
                self.position = position
        except OSError as exc:
            raise CarbonscaleError(f"cannot read {self.log}: {exc.strerror or exc}") from exc
        # A rotated log with nothing left to read still moves us to the new file.
        try:
            inode = self.log.stat().st_ino
        except FileNotFoundError:
            inode = self.position.inode
        if inode != self.position.inode:
            self.position = LogPosition(inode, 0)
        return dict(self.counts)

    def save(self) -> None:
        data = {"inode": self.position.inode, "offset": self.position.offset}
        data["counts"] = self.counts
        try:
            self.state.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.state, json.dumps(data, sort_keys=True) + "\n", 0o644)
        except OSError as exc:
            raise CarbonscaleError(f"cannot write {self.state}: {exc.strerror or exc}") from exc


def nginx_error_points(prefix: str, counts: dict[str, int], timestamp: int) -> list[Point]:
    """`<prefix>.<kind>` for every kind, zeros included (a graph shows 0, not nothing)."""
    return [Point(f"{prefix}.{kind}", counts[kind], timestamp) for kind in NGINX_COUNTERS]

"""Flap damping for health checks (the seed's algorithm).

Every state change of a checked backend is an event that adds `penalty`. The
accumulated penalty decays exponentially with half-life h:

    P(t2) = P(t1) * exp(-(t2 - t1) * ln 2 / h)

A backend is suppressed (kept out of the pool whatever its last check said)
once P exceeds `suppress_limit`, and released once P falls below
`reuse_limit`. The seed ran half-life 60 s, reuse limit 10, suppress limit 25.

Two rules keep damping from closing the front door:

- a planned restart (a deploy, a migration) is no flap: the relay role marks
  its host planned on every director (`PlannedRestarts`, `carbonscale health
  planned HOST --seconds N`) before it restarts, and a change inside that
  window adds no penalty;
- damping never suppresses the last usable server of a service: when every
  server that is up is suppressed, the one with the lowest penalty is used
  (`last_resort`). Down servers stay out; damping only ever delays a return.

Health checks run as separate processes (keepalived's MISC_CHECK, the statsd
relay's checker), so the state is kept in a small JSON file between runs:
`FlapStore`.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import asdict, dataclass

from carbonscale import CarbonscaleError
from carbonscale.atomicfile import write_atomically

DEFAULT_HALF_LIFE = 60.0
DEFAULT_REUSE_LIMIT = 10.0
DEFAULT_SUPPRESS_LIMIT = 25.0
DEFAULT_PENALTY = 10.0
# Where the directors keep their flap state and planned restarts (the
# lvs_director role's lvs_director_state_dir).
DEFAULT_STATE_DIR = "/var/lib/carbonscale/lvs"
PLANNED_FILE = "planned.json"


@dataclass
class FlapState:
    """What one backend's damping needs between checks."""

    penalty: float = 0.0
    # Time of the last penalty update (seconds, same clock as `now` arguments).
    updated: float | None = None
    suppressed: bool = False
    # Last raw check result; a change of it is an event. None: never checked.
    up: bool | None = None


class FlapDamper:
    """The damping parameters and the pure functions over a `FlapState`."""

    def __init__(
        self,
        half_life: float = DEFAULT_HALF_LIFE,
        reuse_limit: float = DEFAULT_REUSE_LIMIT,
        suppress_limit: float = DEFAULT_SUPPRESS_LIMIT,
        penalty: float = DEFAULT_PENALTY,
        max_penalty: float | None = None,
    ) -> None:
        if half_life <= 0:
            raise CarbonscaleError(f"flap half-life must be positive, got {half_life}")
        if not 0 <= reuse_limit < suppress_limit:
            raise CarbonscaleError(
                f"flap limits need 0 <= reuse limit < suppress limit, "
                f"got reuse {reuse_limit} and suppress {suppress_limit}"
            )
        if penalty <= 0:
            raise CarbonscaleError(f"flap penalty must be positive, got {penalty}")
        # A ceiling bounds how long a backend that flapped for hours stays out:
        # from the ceiling it takes log2(max/reuse) half-lives to come back.
        # Default 4x the suppress limit: 100 with the seed's values, 199 s.
        self.max_penalty = 4 * suppress_limit if max_penalty is None else max_penalty
        if self.max_penalty <= suppress_limit:
            raise CarbonscaleError(
                f"flap max penalty {self.max_penalty} must exceed the suppress limit "
                f"{suppress_limit}, or a backend could never be suppressed"
            )
        self.half_life = half_life
        self.reuse_limit = reuse_limit
        self.suppress_limit = suppress_limit
        self.penalty = penalty

    def decayed(self, state: FlapState, now: float) -> float:
        """The penalty at `now`; a clock that went backwards decays nothing."""
        if state.updated is None or state.penalty == 0.0:
            return state.penalty
        elapsed = max(0.0, now - state.updated)
        # exp() of a huge negative number underflows to 0.0, which is right.
        return state.penalty * math.exp(-elapsed * math.log(2) / self.half_life)

    def _settle(self, state: FlapState, now: float) -> None:
        """Apply decay up to `now` and release a suppressed state below reuse."""
        state.penalty = self.decayed(state, now)
        # After a backwards clock jump, measure future decay from the new now:
        # the penalty is kept, never grown or shrunk by the jump itself.
        state.updated = now
        if state.suppressed and state.penalty < self.reuse_limit:
            state.suppressed = False

    def event(self, state: FlapState, now: float) -> FlapState:
        """Record one flap event (a state change) at `now`."""
        self._settle(state, now)
        state.penalty = min(state.penalty + self.penalty, self.max_penalty)
        if state.penalty > self.suppress_limit:
            state.suppressed = True
        return state

    def suppressed_at(self, state: FlapState, now: float) -> bool:
        """Whether `state` is still suppressed at `now`, leaving it unchanged."""
        return state.suppressed and self.decayed(state, now) >= self.reuse_limit

    def is_suppressed(self, state: FlapState, now: float) -> bool:
        self._settle(state, now)
        return state.suppressed

    def observe(self, state: FlapState, up: bool, now: float, planned: bool = False) -> bool:
        """Feed one raw check result; return whether the backend may be used.

        A change from the previous result is an event (the first result is
        not), unless it is `planned` (a restart announced beforehand). The
        backend is usable when it is up and not suppressed.
        """
        if state.up is not None and up != state.up and not planned:
            self.event(state, now)
        else:
            self._settle(state, now)
        state.up = up
        return up and not state.suppressed

    def release_time(self, state: FlapState) -> float | None:
        """When a suppressed state's penalty drops below the reuse limit."""
        if not state.suppressed or state.updated is None:
            return None
        if state.penalty < self.reuse_limit:
            return state.updated
        # Solve P * exp(-dt ln2 / h) = reuse for dt.
        return state.updated + self.half_life * math.log2(state.penalty / self.reuse_limit)


def last_resort(states: list[tuple[str, FlapState]], now: float, damper: FlapDamper) -> str | None:
    """The server to use although suppressed, so a service keeps one.

    `states` are one service's servers in config order. None when some server
    is usable already or none is up; otherwise the up server with the lowest
    penalty at `now` (the first of equals, so every checker picks the same).
    """
    up = [(name, st) for name, st in states if st.up]
    if not up or any(not damper.suppressed_at(st, now) for _, st in up):
        return None
    return min(up, key=lambda item: damper.decayed(item[1], now))[0]


class FlapStore:
    """Flap states by backend name, kept in a JSON file across check runs.

    Each check run opens the store, updates its backend and saves; a lock file
    serializes concurrent checkers and the write is atomic (rename), so a
    checker killed by keepalived's timeout never leaves a torn file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.states: dict[str, FlapState] = {}
        self._lock_fd: int | None = None

    def __enter__(self) -> FlapStore:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CarbonscaleError(f"cannot open flap state {self.path}: {exc.strerror}") from exc
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.states = self._load()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._save()
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    def _load(self) -> dict[str, FlapState]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                raw = json.load(handle)
            return {name: FlapState(**fields) for name, fields in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError):
            # A damaged state file must not take a healthy pool down: start
            # over (every backend unsuppressed) rather than fail every check.
            return {}

    def _save(self) -> None:
        states = {name: asdict(st) for name, st in self.states.items()}
        write_atomically(self.path, json.dumps(states))

    def get(self, name: str) -> FlapState:
        return self.states.setdefault(name, FlapState())


class PlannedRestarts:
    """Hosts whose restart is planned, each until a time: `planned.json` in
    the directors' state directory, written by `carbonscale health planned`
    (the relay role's handler, before it restarts a relay) and read by every
    check run. A lock serializes writers (relays restarting together); readers
    need none, the file is replaced by a rename."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, PLANNED_FILE)

    @classmethod
    def beside(cls, state_path: str) -> PlannedRestarts:
        """The planned restarts kept next to a flap state file (its directory)."""
        return cls(os.path.dirname(os.path.abspath(state_path)))

    def load(self) -> dict[str, float]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                raw = json.load(handle)
            return {str(host): float(until) for host, until in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError):
            # A damaged file plans nothing: every change counts again.
            return {}

    def active(self, now: float) -> set[str]:
        return {host for host, until in self.load().items() if until > now}

    def mark(self, host: str, seconds: float, now: float) -> float:
        """Plan `host` for `seconds` from `now` (0 ends the window); the end."""
        if not 0 <= seconds <= 86400:
            raise CarbonscaleError(f"a planned restart lasts 0-86400 seconds, got {seconds:g}")
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
            lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CarbonscaleError(
                f"cannot open planned restarts {self.path}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Expired windows are dropped so the file does not grow forever.
            planned = {h: u for h, u in self.load().items() if u > now}
            until = now + seconds
            if seconds:
                planned[host] = until
            else:
                planned.pop(host, None)
            # Readable by the unprivileged user keepalived runs checks as.
            write_atomically(self.path, json.dumps(planned), 0o644)
            return until
        finally:
            os.close(lock)


def key_host(key: str) -> str:
    """The host of a check key `kind/host:port`."""
    return key.split("/", 1)[-1].rsplit(":", 1)[0]

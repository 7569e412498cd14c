"""Flap damping for health checks (the seed's algorithm).

Every state change of a checked backend is an event that adds `penalty`. The
accumulated penalty decays exponentially with half-life h:

    P(t2) = P(t1) * exp(-(t2 - t1) * ln 2 / h)

A backend is suppressed (kept out of the pool whatever its last check said)
once P exceeds `suppress_limit`, and released once P falls below
`reuse_limit`. The seed ran half-life 60 s, reuse limit 10, suppress limit 25.

Health checks run as separate processes (keepalived's MISC_CHECK, the statsd
relay's checker), so the state is kept in a small JSON file between runs:
`FlapStore`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass

from carbonscale import CarbonscaleError

DEFAULT_HALF_LIFE = 60.0
DEFAULT_REUSE_LIMIT = 10.0
DEFAULT_SUPPRESS_LIMIT = 25.0
DEFAULT_PENALTY = 10.0


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

    def is_suppressed(self, state: FlapState, now: float) -> bool:
        self._settle(state, now)
        return state.suppressed

    def observe(self, state: FlapState, up: bool, now: float) -> bool:
        """Feed one raw check result; return whether the backend may be used.

        A change from the previous result is an event (the first result is
        not). The backend is usable when it is up and not suppressed.
        """
        if state.up is not None and up != state.up:
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


def write_atomically(path: str, text: str, mode: int | None = None) -> None:
    """Replace `path` with `text` by a rename: a reader (nginx, the next check
    run) sees the old file or the new one, never a torn one. Without `mode`
    the file is private to its owner (mkstemp's 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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

"""The migration journal: what is done, per host, phase, metric and peer host.

sqlite3 in WAL mode: a transaction is on disk when commit returns, a process
killed at any instruction (kill -9) leaves the last committed state, and a
rerun picks up everything that is not `done`. Items are marked done only after
their verify passed; a failure is recorded as `failed` with its reason and is
retried by the next run, never skipped (buckytools' resume file records failed
copies as done, so a resumed run never retries them: the bug this avoids).

synchronous=NORMAL: a power loss may forget the last few `done` marks; the
work is then redone, which a fill makes harmless (it never changes a point
already present).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable

from carbonscale import CarbonscaleError

PENDING, DONE, FAILED = "pending", "done", "failed"
PHASES = ("sync", "verify", "cleanup")

SCHEMA = """
CREATE TABLE IF NOT EXISTS work (
    plan TEXT NOT NULL,
    phase TEXT NOT NULL,
    metric TEXT NOT NULL,
    peer TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (plan, phase, metric, peer)
) WITHOUT ROWID;
"""


class Journal:
    def __init__(self, state_dir: str, host: str) -> None:
        try:
            os.makedirs(state_dir, exist_ok=True)
            self.path = os.path.join(state_dir, "journal.sqlite")
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=30000")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise CarbonscaleError(f"cannot open the journal in {state_dir}: {exc}") from exc
        self.host = host
        self.lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def add(self, plan: str, phase: str, items: Iterable[tuple[str, str]]) -> None:
        """Record items (metric, peer) as pending unless already known."""
        now = time.time()
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR IGNORE INTO work (plan, phase, metric, peer, status, updated) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                ((plan, phase, metric, peer, now) for metric, peer in items),
            )
            self.db.execute("COMMIT")

    def open_items(self, plan: str, phase: str) -> list[tuple[str, str]]:
        """(metric, peer) of every item not done: pending and failed ones alike."""
        with self.lock:
            return self.db.execute(
                "SELECT metric, peer FROM work WHERE plan = ? AND phase = ? AND status != 'done' "
                "ORDER BY peer, metric",
                (plan, phase),
            ).fetchall()

    def record(self, plan: str, phase: str, results: Iterable[tuple[str, str, str, str]]) -> None:
        """Results (metric, peer, status, error), in one transaction."""
        now = time.time()
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE work SET status = ?, error = ?, attempts = attempts + 1, updated = ? "
                "WHERE plan = ? AND phase = ? AND metric = ? AND peer = ?",
                (
                    (status, error, now, plan, phase, metric, peer)
                    for metric, peer, status, error in results
                ),
            )
            self.db.execute("COMMIT")

    def reopen(self, plan: str, phase: str, items: Iterable[tuple[str, str]]) -> None:
        """Mark items pending again (a verify found a sync's result incomplete)."""
        now = time.time()
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE work SET status = 'pending', updated = ? "
                "WHERE plan = ? AND phase = ? AND metric = ? AND peer = ?",
                ((now, plan, phase, metric, peer) for metric, peer in items),
            )
            self.db.execute("COMMIT")

    def failures(self, plan: str, phase: str, limit: int = 1000) -> list[tuple[str, str, str]]:
        with self.lock:
            return self.db.execute(
                "SELECT metric, peer, error FROM work WHERE plan = ? AND phase = ? "
                "AND status = 'failed' ORDER BY metric, peer LIMIT ?",
                (plan, phase, limit),
            ).fetchall()

    def counts(self, plan: str | None = None) -> dict:
        """{plan: {phase: {pending, done, failed}}}."""
        query = "SELECT plan, phase, status, count(*) FROM work"
        args: tuple = ()
        if plan:
            query += " WHERE plan = ?"
            args = (plan,)
        found: dict = {}
        with self.lock:
            for plan_id, phase, status, count in self.db.execute(
                query + " GROUP BY plan, phase, status", args
            ):
                phases = found.setdefault(plan_id, {})
                phases.setdefault(phase, {PENDING: 0, DONE: 0, FAILED: 0})[status] = count
        return found

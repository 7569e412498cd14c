"""The steps of a migration on one host: sync, verify, cleanup, status.

`sync` runs on a destination: for every (metric, source host) of the plan that
concerns it, pull the source's snapshot over the file service (batches, `jobs`
at once) into memory, fill it into the live file with
`carbonscale.whisper.fill_snapshot` (fill's rules, under carbon's lock; a
missing file is linked into place) and, still under that lock, check with
`verify_data` that every point of the snapshot is now there; only then is the
item marked done. (The snapshot is staged in memory, not in a file: a staged
file was written, read back and deleted once per metric, and a killed run
never used one again.) `verify` does the same check later against
a fresh snapshot (an old owner's carbon-cache may have written more since); a
miss reopens the sync item. `cleanup` runs on a host holding copies it no
longer owns: it pulls each owner's file, verifies its own copy against every
one of them under flock(LOCK_EX), and only then moves the copy to
`<root>/.quarantine/<plan id>/`; `purge` deletes that directory.

Every step is idempotent and resumable: the journal says what is done, a fill
never changes a point already present, and quarantine moves are renames.
"""

from __future__ import annotations

import fcntl
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable

from carbonscale import CarbonscaleError
from carbonscale.migrate.journal import DONE, FAILED, PENDING, Journal
from carbonscale.migrate.plan import PlanFile, metric_path
from carbonscale.migrate.transport import (
    QUARANTINE,
    Client,
    SourceUnreachable,
    free_bytes,
    open_in_root,
    read_all,
)
from carbonscale.progress import Progress
from carbonscale.whisper import (
    SKIPPED,
    CorruptWhisper,
    Header,
    VerifyResult,
    fill_snapshot,
    parse_header,
    read_whisper,
    verify_data,
)

DEFAULT_BATCH = 200


class StepResult:
    """What a step did on one host."""

    def __init__(self, phase: str, host: str) -> None:
        self.phase, self.host = phase, host
        self.items = self.done = self.files = self.points = self.bytes = 0
        self.failed: list[tuple[str, str, str]] = []
        self.started = time.monotonic()
        self.seconds = 0.0
        self.lock = threading.Lock()

    def as_dict(self) -> dict:
        rate = self.files / self.seconds if self.seconds > 0 else 0.0
        return {
            "phase": self.phase,
            "host": self.host,
            "items": self.items,
            "done": self.done,
            "files": self.files,
            "points": self.points,
            "bytes": self.bytes,
            "failed": [{"metric": m, "peer": p, "error": e} for m, p, e in self.failed],
            "seconds": round(self.seconds, 3),
            "files_per_second": round(rate, 1),
        }

    def line(self) -> str:
        rate = self.files / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.phase} on {self.host}: {self.done} of {self.items} done, "
            f"{len(self.failed)} failed, {self.files} files ({self.bytes} bytes, "
            f"{self.points} points filled) in {self.seconds:.2f} s ({rate:.0f} files/s)"
        )


class Context:
    """Where a step runs: the plan, this host, its whisper root, journal and peers."""

    def __init__(
        self,
        plan: PlanFile,
        host: str,
        root: str,
        state_dir: str,
        secret: bytes,
        jobs: int = 4,
        batch: int = DEFAULT_BATCH,
        progress: bool | None = None,
        counters: Callable[[StepResult], None] | None = None,
    ) -> None:
        plan.check_host(host)
        if not os.path.isdir(root):
            raise CarbonscaleError(f"whisper root {root} is not a directory")
        if not 1 <= jobs <= 256:
            raise CarbonscaleError(f"--jobs must be within 1..256, not {jobs}")
        if not 1 <= batch <= 100_000:
            raise CarbonscaleError(f"--batch must be within 1..100000, not {batch}")
        self.plan, self.host, self.root = plan, host, os.path.realpath(root)
        self.journal = Journal(state_dir, host)
        self.secret, self.jobs, self.batch = secret, jobs, batch
        self.progress, self.counters = progress, counters

    def client(self, peer: str) -> Client:
        return Client(peer, self.plan.endpoints[peer], self.secret)

    def live(self, metric: str) -> str:
        return os.path.join(self.root, metric_path(metric))


# ----- running batches against peers ---------------------------------------------


def _batches(items: list[tuple[str, str]], size: int) -> list[tuple[str, list[str]]]:
    by_peer: dict[str, list[str]] = {}
    for metric, peer in items:
        by_peer.setdefault(peer, []).append(metric)
    return [
        (peer, metrics[start : start + size])
        for peer, metrics in by_peer.items()
        for start in range(0, len(metrics), size)
    ]


def _run_batches(
    ctx: Context,
    phase: str,
    items: list[tuple[str, str]],
    result: StepResult,
    handle_batch: Callable[[str, list[str]], list[tuple[str, str, str, str]]],
) -> None:
    """handle_batch(peer, metrics) over every batch, `jobs` at once; each batch's
    results are committed to the journal as it ends. A peer that cannot be reached
    stops the run (after the batches in flight are recorded) with its name."""
    batches = _batches(items, ctx.batch)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for entry in batches:
        todo.put(entry)
    progress = Progress(len(items), unit="files", enabled=ctx.progress)
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        while not stop.is_set():
            try:
                peer, metrics = todo.get_nowait()
            except queue.Empty:
                return
            try:
                outcome = handle_batch(peer, metrics)
            except BaseException as exc:  # recorded below, raised in the main thread
                errors.append(exc)
                stop.set()
                return
            ctx.journal.record(ctx.plan.plan_id, phase, outcome)
            with result.lock:
                for metric, peer_name, status, error in outcome:
                    if status == DONE:
                        result.done += 1
                    else:
                        result.failed.append((metric, peer_name, error))
                progress.advance(len(outcome))

    threads = [threading.Thread(target=work) for _ in range(min(ctx.jobs, len(batches)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    progress.finish()
    result.seconds = time.monotonic() - result.started
    if ctx.counters:
        ctx.counters(result)
    if errors:
        raise errors[0]


class _Partial(Exception):
    """A peer broke off mid-batch: the results so far, and why."""

    def __init__(self, outcome: list, cause: SourceUnreachable) -> None:
        super().__init__(str(cause))
        self.outcome, self.cause = outcome, cause


def _pull(
    ctx: Context,
    peer: str,
    metrics: list[str],
    each: Callable[[str, bytes | None, str], tuple[str, str, str, str]],
) -> list[tuple[str, str, str, str]]:
    """each(metric, data or None, reason) for every file of the batch, from `peer`."""
    outcome: list[tuple[str, str, str, str]] = []
    wanted = {metric_path(m): m for m in metrics}
    try:
        for path, data, reason in ctx.client(peer).files(list(wanted)):
            outcome.append(each(wanted[path], data, reason))
    except SourceUnreachable as exc:
        raise _Partial(outcome, exc) from exc
    return outcome


def _guarded(ctx: Context, phase: str, handle: Callable) -> Callable:
    """Record what a broken-off batch did finish before re-raising its cause."""

    def run(peer: str, metrics: list[str]) -> list[tuple[str, str, str, str]]:
        try:
            return handle(peer, metrics)
        except _Partial as partial:
            ctx.journal.record(ctx.plan.plan_id, phase, partial.outcome)
            raise partial.cause from None

    return run


# ----- sync ----------------------------------------------------------------------


def sync_items(plan: PlanFile, host: str) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(metric, source host) pairs this destination must pull, and each metric's size."""
    items, sizes = [], {}
    for row in plan.rows():
        if host in row.owners:
            for source in row.holders:
                if source != host:
                    items.append((row.name, source))
                    sizes[row.name] = row.size
    return items, sizes


def _check_points(data: bytes, live: str, now: int, metric: str) -> str:
    """'' when every point of `data` within the live file's retention is in it."""
    try:
        header = parse_header(data)
    except CorruptWhisper as exc:
        return f"corrupt source copy: {exc}"
    try:
        current, current_header = read_whisper(live)
    except FileNotFoundError:
        return "missing on this host"
    except (OSError, CorruptWhisper) as exc:
        return f"cannot read {live}: {exc}"
    return _missing(verify_data(data, header, current, current_header, now, metric))


def _missing(found: VerifyResult) -> str:
    """'' when the check found every point, else what it missed."""
    if found.error:
        return found.error
    if found.missing:
        examples = ", ".join(map(str, found.examples))
        return f"{found.missing} of {found.checked} points missing (e.g. {examples})"
    return ""


def _new_file_mode() -> int:
    """The mode of a file this process creates (0666 less the umask): a missing live
    file is linked into place with it, as carbon would have created it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def sync(ctx: Context, now: int | None = None) -> StepResult:
    result = StepResult("sync", ctx.host)
    plan_id = ctx.plan.plan_id
    items, sizes = sync_items(ctx.plan, ctx.host)
    ctx.journal.add(plan_id, "sync", items)
    todo = ctx.journal.open_items(plan_id, "sync")
    result.items = len(todo)
    needed = sum(sizes.get(m, 0) for m in {m for m, _ in todo} if not os.path.exists(ctx.live(m)))
    needed += ctx.jobs * max(sizes.values(), default=0)  # new files' temporary copies in flight
    free = free_bytes(ctx.root)
    if needed > free:
        raise CarbonscaleError(
            f"host {ctx.host}: the plan needs {needed} bytes on {ctx.root}'s filesystem, "
            f"it has {free} free; nothing was moved"
        )
    mode = _new_file_mode()

    def one(peer: str) -> Callable:
        def each(metric: str, data: bytes | None, reason: str) -> tuple[str, str, str, str]:
            if data is None:
                return metric, peer, FAILED, f"source {peer}: {reason}"
            at = int(time.time()) if now is None else now
            try:
                header = parse_header(data)
            except CorruptWhisper as exc:
                return metric, peer, FAILED, f"source {peer}: corrupt SRC: {exc}"

            def check(current: bytes, current_header: Header) -> str:
                return _missing(verify_data(data, header, current, current_header, at, metric))

            filled, problem = fill_snapshot(data, header, ctx.live(metric), at, metric, mode, check)
            if filled.status == SKIPPED:
                return metric, peer, FAILED, f"source {peer}: {filled.reason}"
            if problem:
                return metric, peer, FAILED, f"verify after fill: {problem}"
            with result.lock:
                result.files += 1
                result.points += filled.points
                result.bytes += len(data)
            return metric, peer, DONE, ""

        return each

    def batch(peer: str, metrics: list[str]) -> list:
        return _pull(ctx, peer, metrics, one(peer))

    _run_batches(ctx, "sync", todo, result, _guarded(ctx, "sync", batch))
    return result


# ----- verify --------------------------------------------------------------------


def verify(ctx: Context, now: int | None = None) -> StepResult:
    result = StepResult("verify", ctx.host)
    plan_id = ctx.plan.plan_id
    items, _ = sync_items(ctx.plan, ctx.host)
    ctx.journal.add(plan_id, "verify", items)
    todo = ctx.journal.open_items(plan_id, "verify")
    result.items = len(todo)

    def one(peer: str) -> Callable:
        def each(metric: str, data: bytes | None, reason: str) -> tuple[str, str, str, str]:
            if data is None:
                return metric, peer, FAILED, f"source {peer}: {reason}"
            at = int(time.time()) if now is None else now
            problem = _check_points(data, ctx.live(metric), at, metric)
            with result.lock:
                result.files += 1
                result.bytes += len(data)
            if problem:
                ctx.journal.reopen(plan_id, "sync", [(metric, peer)])
                return metric, peer, FAILED, problem
            return metric, peer, DONE, ""

        return each

    def batch(peer: str, metrics: list[str]) -> list:
        return _pull(ctx, peer, metrics, one(peer))

    _run_batches(ctx, "verify", todo, result, _guarded(ctx, "verify", batch))
    return result


# ----- cleanup -------------------------------------------------------------------


def cleanup_items(plan: PlanFile, host: str) -> dict[str, list[str]]:
    """{metric: owner hosts} of every copy this host holds and does not own."""
    return {
        row.name: row.owners
        for row in plan.rows()
        if host in row.holders and host not in row.owners
    }


def quarantine_dir(ctx: Context) -> str:
    return os.path.join(ctx.root, QUARANTINE, ctx.plan.plan_id)


def _quarantine(ctx: Context, metric: str, owner_copies: dict[str, bytes], now: int) -> str:
    """Move the local copy to quarantine if every owner's copy has all its points;
    '' when done, else why not. The copy is locked (LOCK_EX) from its read to its move,
    so no carbon write lands in between."""
    relative = metric_path(metric)
    try:
        fd = open_in_root(ctx.root, relative)
    except FileNotFoundError:
        return ""  # moved by an earlier run that was killed before its journal commit
    except OSError as exc:
        return f"cannot open the local copy: {exc.strerror}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = read_all(fd)
        try:
            header = parse_header(data)
        except CorruptWhisper as exc:
            return f"local copy is corrupt ({exc}): kept"
        for owner, copy in owner_copies.items():
            try:
                owner_header = parse_header(copy)
            except CorruptWhisper as exc:
                return f"owner {owner}'s copy is corrupt: {exc}"
            found = verify_data(data, header, copy, owner_header, now, metric)
            if not found.ok:
                return f"owner {owner} lacks {found.missing} of {found.checked} points: kept"
        target = os.path.join(quarantine_dir(ctx), relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(ctx.root, relative), target)
        return ""
    finally:
        os.close(fd)


def cleanup(ctx: Context, now: int | None = None) -> StepResult:
    result = StepResult("cleanup", ctx.host)
    plan_id = ctx.plan.plan_id
    owners_of = cleanup_items(ctx.plan, ctx.host)
    ctx.journal.add(plan_id, "cleanup", ((m, "") for m in owners_of))
    todo = [(m, "") for m, _ in ctx.journal.open_items(plan_id, "cleanup")]
    result.items = len(todo)

    def batch(_peer: str, metrics: list[str]) -> list:
        copies: dict[str, dict[str, bytes]] = {m: {} for m in metrics}
        problems: dict[str, str] = {}
        by_owner: dict[str, list[str]] = {}
        for metric in metrics:
            for owner in owners_of.get(metric, []):
                by_owner.setdefault(owner, []).append(metric)
        for owner, wanted in by_owner.items():
            paths = {metric_path(m): m for m in wanted}
            for path, data, reason in ctx.client(owner).files(list(paths)):
                if data is None:
                    problems.setdefault(paths[path], f"owner {owner}: {reason}: kept")
                else:
                    copies[paths[path]][owner] = data
        outcome = []
        at = int(time.time()) if now is None else now
        for metric in metrics:
            problem = problems.get(metric)
            if not problem and not owners_of.get(metric):
                problem = "no owner in the plan: kept"
            if not problem:
                problem = _quarantine(ctx, metric, copies[metric], at)
            if problem:
                outcome.append((metric, "", FAILED, problem))
            else:
                outcome.append((metric, "", DONE, ""))
                with result.lock:
                    result.files += 1
        return outcome

    _run_batches(ctx, "cleanup", todo, result, batch)
    return result


def purge(ctx: Context) -> int:
    """Delete this plan's quarantine; the files removed."""
    directory = quarantine_dir(ctx)
    count = sum(len(files) for _, _, files in os.walk(directory))
    shutil.rmtree(directory, ignore_errors=True)
    return count


def status(journal: Journal, plan_id: str | None = None) -> dict:
    return journal.counts(plan_id)


__all__ = [
    "DONE",
    "FAILED",
    "PENDING",
    "Context",
    "StepResult",
    "cleanup",
    "purge",
    "status",
    "sync",
    "verify",
]

"""Trees: fill and verify whole directory trees, in parallel, with summaries."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from carbonscale import CarbonscaleError
from carbonscale.whisper import merge
from carbonscale.whisper.files import (
    COPIED,
    FILLED,
    REPLACED,
    SKIPPED,
    UNCHANGED,
    FillResult,
    fill_file,
)
from carbonscale.whisper.verification import VerifyResult, verify_file


def whisper_files(root: str) -> list[str]:
    """Relative paths of every *.wsp under root, sorted."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        relative = os.path.relpath(directory, root)
        for file in sorted(files):
            if file.endswith(".wsp"):
                found.append(file if relative == "." else os.path.join(relative, file))
    return found


def resolve_pair(src: str, dst: str) -> tuple[str, list[str]]:
    """('file' | 'tree', relative paths) for a SRC/DST pair; CarbonscaleError on bad input."""
    if not os.path.exists(src):
        raise CarbonscaleError(f"SRC {src} does not exist")
    if os.path.isdir(src):
        if os.path.exists(dst) and not os.path.isdir(dst):
            raise CarbonscaleError(f"SRC {src} is a directory but DST {dst} is not")
        if os.path.exists(dst) and os.path.samefile(src, dst):
            raise CarbonscaleError("SRC and DST are the same directory")
        return "tree", whisper_files(src)
    if not os.path.isfile(src):
        raise CarbonscaleError(f"SRC {src} is not a regular file or a directory")
    if os.path.isdir(dst):
        raise CarbonscaleError(f"SRC {src} is a file but DST {dst} is a directory")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise CarbonscaleError("SRC and DST are the same file")
    return "file", [""]


def _pair(src: str, dst: str, relative: str) -> tuple[str, str]:
    if not relative:
        return src, dst
    return os.path.join(src, relative), os.path.join(dst, relative)


def _fill_one(job: tuple[str, str, str, int, bool, bool]) -> FillResult:
    src, dst, relative, now, dry_run, move_corrupt = job
    source, target = _pair(src, dst, relative)
    return fill_file(source, target, now, dry_run, move_corrupt, relative or dst)


def _verify_one(job: tuple[str, str, str, int]) -> VerifyResult:
    src, dst, relative, now = job
    source, target = _pair(src, dst, relative)
    return verify_file(source, target, now, relative or dst)


def _run_on_threads(
    function: Callable, jobs: list, workers: int, on_result: Callable | None
) -> list:
    """run_jobs on threads: plain threads pulling jobs, not concurrent.futures, whose
    imports alone cost more start-up time than a small fill takes. Results in job
    order; `on_result` sees them as they finish. A worker's exception is raised here."""
    import queue
    import threading

    ordered: list = [None] * len(jobs)
    pending = iter(enumerate(jobs))
    take = threading.Lock()
    finished: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            with take:
                item = next(pending, None)
            if item is None:
                return
            index, job = item
            try:
                finished.put((index, function(job), None))
            except BaseException as exc:  # handed to the main thread, raised there
                finished.put((index, None, exc))
                return

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(jobs)))]
    for thread in threads:
        thread.start()
    try:
        for _ in jobs:
            index, result, error = finished.get()
            if error is not None:
                raise error
            ordered[index] = result
            if on_result:
                on_result(result)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return ordered


def run_jobs(
    function: Callable,
    jobs: list,
    workers: int,
    on_result: Callable | None = None,
    threads: bool = False,
) -> list:
    """function over jobs with `workers` at once: threads when the work releases
    the GIL (the C merge and file I/O), else processes (numpy work holds it)."""
    results = []

    def done(result: object) -> None:
        results.append(result)
        if on_result:
            on_result(result)

    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            done(function(job))
        return results
    if threads:
        return _run_on_threads(function, jobs, workers, on_result)
    import multiprocessing

    context = multiprocessing.get_context("fork")
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with context.Pool(workers) as pool:
        for result in pool.imap_unordered(function, jobs, chunksize=chunk):
            done(result)
    return results


class FillSummary:
    def __init__(self, results: list[FillResult], seconds: float, dry_run: bool = False) -> None:
        self.results = results
        self.seconds = seconds
        self.dry_run = dry_run

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def points(self) -> int:
        return sum(r.points for r in self.results)

    @property
    def skipped(self) -> list[FillResult]:
        return [r for r in self.results if r.status == SKIPPED]

    def as_dict(self) -> dict:
        return {
            "files": len(self.results),
            "filled": self.count(FILLED),
            "points": self.points,
            "copied": self.count(COPIED),
            "replaced": self.count(REPLACED),
            "unchanged": self.count(UNCHANGED),
            "skipped": [{"path": r.path, "reason": r.reason} for r in self.skipped],
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
        }

    def line(self) -> str:
        rate = len(self.results) / self.seconds if self.seconds > 0 else 0.0
        would = "would fill" if self.dry_run else "filled"
        return (
            f"{len(self.results)} files: {self.count(FILLED)} {would} ({self.points} points), "
            f"{self.count(COPIED)} copied, {self.count(REPLACED)} replaced, "
            f"{self.count(UNCHANGED)} unchanged, {len(self.skipped)} skipped "
            f"in {self.seconds:.2f} s ({rate:.0f} files/s)"
        )


def fill(
    src: str,
    dst: str,
    jobs: int = 1,
    now: int | None = None,
    dry_run: bool = False,
    move_corrupt: bool = False,
    on_result: Callable[[FillResult], None] | None = None,
    paths: list[str] | None = None,
) -> FillSummary:
    """Fill a file or a tree (every *.wsp of SRC into the same relative path under DST)."""
    started = time.monotonic()
    if paths is None:
        paths = resolve_pair(src, dst)[1]
    now = int(time.time()) if now is None else int(now)
    work = [(src, dst, relative, now, dry_run, move_corrupt) for relative in paths]
    results = run_jobs(_fill_one, work, jobs, on_result, threads=merge._whisper is not None)
    return FillSummary(results, time.monotonic() - started, dry_run)


class VerifySummary:
    def __init__(self, results: list[VerifyResult], seconds: float) -> None:
        self.results = results
        self.seconds = seconds

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def as_dict(self, limit: int = 1000) -> dict:
        bad = sorted((r for r in self.results if not r.ok), key=lambda r: r.path)
        return {
            "ok": self.ok,
            "files": len(self.results),
            "points_checked": sum(r.checked for r in self.results),
            "points_missing": sum(r.missing for r in self.results),
            "points_unchecked": sum(r.unchecked for r in self.results),
            "files_with_missing_points": sum(1 for r in self.results if r.missing),
            "dst_missing": sorted(r.path for r in self.results if r.dst_missing)[:limit],
            "errors": [{"path": r.path, "error": r.error} for r in bad if r.error][:limit],
            "missing": [
                {"path": r.path, "checked": r.checked, "missing": r.missing, "examples": r.examples}
                for r in bad
                if r.missing
            ][:limit],
            "seconds": round(self.seconds, 3),
        }


def verify(
    src: str,
    dst: str,
    jobs: int = 1,
    now: int | None = None,
    on_result: Callable[[VerifyResult], None] | None = None,
    paths: list[str] | None = None,
) -> VerifySummary:
    started = time.monotonic()
    if paths is None:
        paths = resolve_pair(src, dst)[1]
    now = int(time.time()) if now is None else int(now)
    results = run_jobs(_verify_one, [(src, dst, r, now) for r in paths], jobs, on_result)
    return VerifySummary(results, time.monotonic() - started)

#!/usr/bin/env python3
"""New whisper files per second this disk takes, through carbon's own create
path, and the MAX_CREATES_PER_MINUTE that leaves room for everything else.

carbon-cache's writer thread, for a metric without a file, takes a token of
MAX_CREATES_PER_MINUTE (none left: the points are dropped, `droppedCreates`),
then creates the file (carbon.database.WhisperDatabase.create: makedirs, then
whisper.create with WHISPER_FALLOCATE_CREATE) and writes the metric's cached
points into it (whisper.update_many). This bench runs that same code,
carbon's WhisperDatabase with the storage role's settings and its default
schema and aggregation (roles/carbon_storage/defaults/main.yml), on --files
new metrics spread over --dirs directories in a hidden directory it makes
in --dir and removes at the end; --dir must be on the whisper filesystem (on
a storage node: the whisper tree itself).

Timed side by side in one run, each the best of --runs, after a syncfs() of
the filesystem and including the syncfs() that puts the files on disk (a burst the disk cannot
absorb is a burst it cannot sustain):

- anchor: the same files as carbon would preallocate them, without whisper
  (open, posix_fallocate to the file's size, close): the filesystem's cost;
- carbon: create and first write, as the writer thread does.

Then: creates/s per instance that leave `--headroom` of the disk for the
updates the same writer threads do, over --instances instances per node, as
a MAX_CREATES_PER_MINUTE, beside the role's default.

    .venv/bin/python bench/creates.py [--dir DIR] [--files 1000] [--runs 3]
        [--instances 4] [--headroom 0.25]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import whisper
import yaml

ROLE_DEFAULTS = Path(__file__).resolve().parents[1] / "roles/carbon_storage/defaults/main.yml"


def role_schema() -> tuple[list[tuple[int, int]], float, str, bool, int]:
    """The role's catch-all schema and aggregation, its fallocate setting and create limit."""
    defaults = yaml.safe_load(ROLE_DEFAULTS.read_text())
    schema = next(s for s in defaults["carbon_storage_schemas"] if s["pattern"] == ".*")
    aggregation = next(a for a in defaults["carbon_storage_aggregation"] if a["pattern"] == ".*")
    archives = [whisper.parseRetentionDef(part) for part in schema["retentions"].split(",")]
    return (
        archives,
        float(aggregation["xfilesfactor"]),
        aggregation["method"],
        bool(defaults["carbon_storage_whisper_fallocate_create"]),
        int(defaults["carbon_storage_max_creates_per_minute"]),
    )


def carbon_database(data_dir: Path, fallocate: bool):
    """carbon's WhisperDatabase as carbon-cache builds it from the role's carbon.conf."""
    from carbon.conf import settings

    settings.update(
        {
            "LOCAL_DATA_DIR": str(data_dir),
            "TAG_HASH_FILENAMES": True,
            "WHISPER_SPARSE_CREATE": False,
            "WHISPER_FALLOCATE_CREATE": fallocate,
            "WHISPER_AUTOFLUSH": False,
            "WHISPER_LOCK_WRITES": True,
            "WHISPER_FADVISE_RANDOM": False,
        }
    )
    from carbon.database import TimeSeriesDatabase

    return TimeSeriesDatabase.plugins["whisper"](settings)


def sync_filesystem(path: Path) -> None:
    """syncfs(2): this filesystem's dirty pages on disk, not the whole machine's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def metric_names(files: int, dirs: int, run: int) -> list[str]:
    return [f"bench.run{run}.host{n % dirs}.metric{n}" for n in range(files)]


def time_anchor(root: Path, names: list[str], size: int) -> float:
    sync_filesystem(root.parent)
    started = time.perf_counter()
    for name in names:
        path = root / (name.replace(".", "/") + ".wsp")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    sync_filesystem(root.parent)
    return time.perf_counter() - started


def time_carbon(database, names: list[str], archives, xff: float, method: str) -> float:
    now = int(time.time())
    points = [(now - 60, 1.0), (now, 2.0)]  # a metric's first points, as cached
    sync_filesystem(Path(database.data_dir).parent)
    started = time.perf_counter()
    for name in names:
        database.create(name, archives, xff, method)
        database.write(name, points)
    sync_filesystem(Path(database.data_dir).parent)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="a directory on the whisper filesystem")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--dirs", type=int, default=50, help="hosts the metrics spread over")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--instances", type=int, default=4, help="carbon-cache instances a node")
    parser.add_argument(
        "--headroom",
        type=float,
        default=0.25,
        help="share of the disk's create rate a sustained burst of creates may use",
    )
    args = parser.parse_args()
    if args.files < 1 or args.runs < 1 or args.instances < 1 or not 0 < args.headroom <= 1:
        print("bench: --files, --runs, --instances >= 1, 0 < --headroom <= 1", file=sys.stderr)
        return 2
    archives, xff, method, fallocate, default_limit = role_schema()
    header = whisper.metadataSize + whisper.archiveInfoSize * len(archives)
    size = header + sum(whisper.pointSize * points for _, points in archives)
    parent = args.dir or Path(tempfile.gettempdir())
    try:
        work = Path(tempfile.mkdtemp(prefix=".bench-creates-", dir=parent))
    except OSError as exc:
        print(f"bench: cannot use {parent}: {exc.strerror}", file=sys.stderr)
        return 2
    retentions = ",".join(f"{s}s:{p}" for s, p in archives)
    print(
        f"{args.files} new metrics over {args.dirs} directories in {work} "
        f"({os.statvfs(work).f_bsize} byte blocks); schema {retentions} ({size:,} bytes a file), "
        f"xff {xff} {method}, fallocate {fallocate}; best of {args.runs}, syncfs() included"
    )
    try:
        database = carbon_database(work / "carbon", fallocate)
        anchor_times, carbon_times = [], []
        for run in range(args.runs):
            names = metric_names(args.files, args.dirs, run)
            anchor_times.append(time_anchor(work / "anchor", names, size))
            carbon_times.append(time_carbon(database, names, archives, xff, method))
            shutil.rmtree(work / "anchor")
            shutil.rmtree(work / "carbon")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    anchor_rate = args.files / min(anchor_times)
    carbon_rate = args.files / min(carbon_times)
    per_instance = carbon_rate * args.headroom / args.instances
    allowed = int(per_instance * 60)
    print(f"anchor (open, fallocate, close) {anchor_rate:>9,.0f} files/s")
    print(
        f"carbon (create, first write)    {carbon_rate:>9,.0f} files/s"
        f"   ratio carbon/anchor {carbon_rate / anchor_rate:.2f}"
    )
    print(
        f"MAX_CREATES_PER_MINUTE that keeps creates to {args.headroom:.0%} of this disk with "
        f"{args.instances} instances: {allowed:,} per instance "
        f"(role default {default_limit}: {default_limit / allowed:.2f} of it; "
        f"{default_limit * args.instances / 60 / carbon_rate:.1%} of the disk)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Whisper fill speed: `carbonscale whisper fill` against carbonate's fill_archives.

Builds a SRC tree (the old owner's history: six days of points, one a minute)
and a DST tree (the new owner's files: the last hour), --files files (default
150) over three schemas, then times, in the same run and on separate copies of
the same DST tree:

- copy:      shutil.copytree of the SRC tree (the anchor: moving the bytes);
- carbonate: carbonate.fill.fill_archives(src, dst, time.time()) per file, in
             one process (what carbon-sync does after its rsync);
- ours:      `carbonscale whisper fill SRC DST` as a subprocess (the console
             script: start-up and imports included, bytecode compiled as an
             installed package has it), --jobs 1, then --jobs 2.

Each timing is the best of --runs (the machine is shared and noisy); every run
starts from a fresh copy of DST and after os.sync(), so that no run pays for
the write-back of the files an earlier one wrote (that made the copy time vary
between 31 and 76 ms from one run of this bench to the next). Ours is checked
with `carbonscale whisper verify` afterwards (0 missing points required), so the bench never times a
fill that leaves data behind.

Goal (issue 4): ours >= 20x carbonate's files/s, and ours <= 3x the copy time.

    .venv/bin/python bench/fill.py [--files 150] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import whisper
from carbonate.fill import fill_archives

# The console script, as operators run it (python -m adds runpy's imports).
CONSOLE_SCRIPT = Path(sys.executable).with_name("carbonscale")
CARBONSCALE = [str(CONSOLE_SCRIPT) if CONSOLE_SCRIPT.exists() else "carbonscale", "whisper"]
# (archives, xFilesFactor, aggregation): the schema first.
SCHEMAS = [
    ([(60, 10080), (300, 8640), (3600, 8760)], 0.5, "average"),  # 1m:7d,5m:30d,1h:1y
    ([(60, 1440 * 14), (600, 4320 * 2), (3600 * 6, 1460)], 0.0, "sum"),  # 1m:14d,10m:60d,6h:1y
    ([(10, 8640), (60, 10080), (600, 52560)], 0.3, "max"),  # 10s:1d,1m:7d,10m:1y
]
TEMPLATES_PER_SCHEMA = 3
HISTORY = 6 * 86400  # SRC: six days of points
SINCE_SWITCH = 3600  # DST: the last hour


def make_templates(where: Path, now: int) -> list[tuple[Path, Path]]:
    """(src, dst) template files: a few per schema, with different values."""
    rng = random.Random(4)
    pairs = []
    for number, (archives, xff, method) in enumerate(SCHEMAS):
        for copy in range(TEMPLATES_PER_SCHEMA):
            src, dst = where / f"s{number}_{copy}.wsp", where / f"d{number}_{copy}.wsp"
            for path in (src, dst):
                whisper.create(str(path), archives, xFilesFactor=xff, aggregationMethod=method)
            history = [
                (t, rng.uniform(0, 100)) for t in range(now - HISTORY, now - SINCE_SWITCH, 60)
            ]
            whisper.update_many(str(src), history, now=now)
            recent = [(t, rng.uniform(0, 100)) for t in range(now - SINCE_SWITCH, now, 60)]
            whisper.update_many(str(dst), recent, now=now)
            pairs.append((src, dst))
    return pairs


def build_trees(root: Path, files: int, now: int) -> tuple[Path, Path]:
    templates = make_templates(Path(tempfile.mkdtemp(dir=root)), now)
    src_root, dst_root = root / "src", root / "dst"
    for index in range(files):
        src, dst = templates[index % len(templates)]
        relative = Path(f"servers/host{index // 50:03d}/metric{index:05d}.wsp")
        for template, tree in ((src, src_root), (dst, dst_root)):
            target = tree / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template, target)
    return src_root, dst_root


def wsp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.wsp"))


def time_copy(src_root: Path, scratch: Path) -> float:
    target = scratch / "copy"
    shutil.rmtree(target, ignore_errors=True)
    os.sync()
    started = time.perf_counter()
    shutil.copytree(src_root, target)
    return time.perf_counter() - started


def time_carbonate(src_root: Path, dst_root: Path, scratch: Path) -> float:
    target = scratch / "carbonate"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(dst_root, target)
    files = wsp_files(src_root)
    os.sync()
    started = time.perf_counter()
    for relative in files:
        fill_archives(str(src_root / relative), str(target / relative), time.time())
    return time.perf_counter() - started


def time_ours(src_root: Path, dst_root: Path, scratch: Path, jobs: int) -> tuple[float, dict]:
    target = scratch / f"ours{jobs}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(dst_root, target)
    os.sync()
    started = time.perf_counter()
    run = subprocess.run(
        [*CARBONSCALE, "fill", "--json", "--jobs", str(jobs), str(src_root), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"carbonscale whisper fill failed: {run.stderr}")
    checked = subprocess.run(
        [*CARBONSCALE, "verify", "--json", str(src_root), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(checked.stdout)
    if checked.returncode != 0 or report["points_missing"]:
        sys.exit(f"verify after our fill found missing points: {checked.stdout[:2000]}")
    return seconds, {"fill": json.loads(run.stdout), "verify": report}


def compile_bytecode() -> None:
    """Compile carbonscale's modules, as pip does when it installs the package.

    An editable checkout run with PYTHONDONTWRITEBYTECODE (this machine sets it)
    would otherwise compile every module from source on every start, and the
    bench would time the compiler, not the fill."""
    import carbonscale

    package = Path(carbonscale.__file__).parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(package)], check=True, capture_output=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=150)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    compile_bytecode()
    root = Path(tempfile.mkdtemp(prefix="bench-fill-"))
    try:
        now = int(time.time())
        src_root, dst_root = build_trees(root, args.files, now)
        files = len(wsp_files(src_root))
        size = sum(p.stat().st_size for p in src_root.rglob("*.wsp"))
        print(
            f"{files} files over {len(SCHEMAS)} schemas, {size / 1e6:.1f} MB in SRC; "
            f"best of {args.runs} runs"
        )
        copy = min(time_copy(src_root, root) for _ in range(args.runs))
        carbonate = min(time_carbonate(src_root, dst_root, root) for _ in range(args.runs))
        ours1 = min(
            (time_ours(src_root, dst_root, root, 1) for _ in range(args.runs)), key=lambda r: r[0]
        )
        ours2 = min(
            (time_ours(src_root, dst_root, root, 2) for _ in range(args.runs)), key=lambda r: r[0]
        )
        fill_report = ours1[1]["fill"]
        print(
            f"ours filled {fill_report['points']} points into {fill_report['filled']} files; "
            f"verify: {ours1[1]['verify']['points_checked']} points checked, "
            f"{ours1[1]['verify']['points_missing']} missing"
        )
        rows = [
            ("copy (shutil.copytree)", copy),
            ("carbonate fill_archives", carbonate),
            ("carbonscale whisper fill -j1", ours1[0]),
            ("carbonscale whisper fill -j2", ours2[0]),
        ]
        for label, seconds in rows:
            print(f"{label:30s} {seconds:8.3f} s {files / seconds:9.1f} files/s")
        for label, seconds in rows[2:]:
            print(
                f"{label}: {carbonate / seconds:.1f}x carbonate (goal >= 20), "
                f"{seconds / copy:.2f}x the copy time (goal <= 3)"
            )
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Plan speed and memory: `carbonscale migrate plan` over ten million metric names.

Builds listings of --names metrics (default 10,000,000) placed by an old ring of
60 carbon_ch members (30 hosts, 2 instances each, replication 2: every metric on
two hosts, 20,000,000 listed copies), then runs, as the console script, the plan
for a new ring of 64 members (2 more hosts) from those listings, and prints its
wall time and peak memory (resource.getrusage(RUSAGE_CHILDREN).ru_maxrss of the
plan process), and the CPU time it used (on a shared machine the wall time
also counts the other jobs' turns).

Goal (issue): <= 60 s and <= 4 GiB.

    .venv/bin/python bench/migrate_plan.py [--names 10000000]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from carbonscale.migrate.transport import LISTING_MAGIC
from carbonscale.ring import Ring

CONSOLE_SCRIPT = Path(sys.executable).with_name("carbonscale")
CARBONSCALE = [str(CONSOLE_SCRIPT) if CONSOLE_SCRIPT.exists() else "carbonscale"]
FILE_SIZE = 329_776  # 60s:7d,5m:30d,1h:1y
CHUNK = 1_000_000


def members(hosts: int) -> list[str]:
    return [f"10.1.{h // 200}.{h % 200 + 1}:{port}={name}" for h in range(hosts)
            for port, name in ((2103, "a"), (2203, "b"))]  # fmt: skip


def build(root: Path, count: int, old: list[str]) -> list[str]:
    ring = Ring(old, "carbon_ch", replication=2)
    host_of_member = np.array([hosts_index(m) for m in old], dtype=np.int64)
    host_count = int(host_of_member.max()) + 1
    blocks: list[list[bytes]] = [[] for _ in range(host_count)]
    for start in range(0, count, CHUNK):
        names = [
            f"servers.dc{i % 7}.host{i // 100:06d}.cpu{i % 100}.user".encode()
            for i in range(start, min(count, start + CHUNK))
        ]
        rows = host_of_member[ring.locate_batch(names)]
        paths = b"\n".join(names).replace(b".", b"/").replace(b"\n", b".wsp\n") + b".wsp"
        paths = paths.split(b"\n")
        for host in range(host_count):
            held = np.flatnonzero((rows == host).any(axis=1))
            blocks[host].append(b"".join(paths[i] + b"\n" for i in held.tolist()))
    args = []
    for host in range(host_count):
        block = b"".join(blocks[host])
        blocks[host] = []
        n = block.count(b"\n")
        path = root / f"host{host}.list"
        with open(path, "wb") as out:
            out.write(b"%s %d %d %d\n" % (LISTING_MAGIC, n, len(block), 1 << 50))
            out.write(block)
            out.write(np.full(n, FILE_SIZE, dtype="<i8").tobytes())
            out.write(np.zeros(n, dtype="<i8").tobytes())
        args += ["--listing", f"{address(old, host)}={path}"]
    return args


def hosts_index(member: str) -> int:
    _, b, c = member.split(":")[0].split(".")[1:]
    return int(b) * 200 + int(c) - 1


def address(old: list[str], host: int) -> str:
    return next(m.split(":")[0] for m in old if hosts_index(m) == host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, default=10_000_000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-migrate-plan-"))
    try:
        old, new = members(30), members(32)
        started = time.perf_counter()
        listings = build(root, args.names, old)
        for host in range(30, 32):  # the new hosts: empty trees
            path = root / f"host{host}.list"
            path.write_bytes(b"%s 0 0 %d\n" % (LISTING_MAGIC, 1 << 50))
            listings += ["--listing", f"{address(new, host)}={path}"]
        print(f"built listings of {args.names} names in {time.perf_counter() - started:.0f} s")
        command = [
            *CARBONSCALE, "migrate", "plan", "--hash", "carbon_ch", "--replication", "2",
            "--old", *old, "--new", *new, *listings, "-o", str(root / "plan.tsv"),
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak, cpu = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
        if done.returncode != 0:
            sys.exit(f"plan failed: {done.stderr}")
        print(done.stdout.splitlines()[0])
        print(
            f"plan of {args.names} names (64 members, replication 2, old and new ring): "
            f"{seconds:.1f} s (goal <= 60), peak {peak / 2**30:.2f} GiB (goal <= 4); "
            f"{cpu:.1f} s of CPU (wall time above CPU time is this machine's other jobs)"
        )
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

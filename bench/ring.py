#!/usr/bin/env python3
"""Ring placement speed: `carbonscale ring locate` against `carbon-c-relay -t`.

Both read the same 500,000 names (dotted paths, about 12% with non-ASCII
bytes) from the same file and answer from the same relay config: 8 hosts x 3
carbon-cache instances = 24 members, replication 2, for carbon_ch and
jump_fnv1a_ch. The relay's -t mode prints a routing block per metric; ours
prints `metric<TAB>owner<TAB>owner`; both write to /dev/null. Runs are
interleaved (relay, ours, relay, ours, ...) and the best of --runs is kept,
because the machine is shared and noisy. The answers are compared on a
sample first, so the bench never times two programs that disagree.

Goal (issue 2): ratio >= 1.0 (the project at least as fast as the relay).

    .venv/bin/python bench/ring.py [--names 500000] [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from carbonscale.relay_names import rewrite_block

CARBONSCALE = [sys.executable, "-m", "carbonscale"]
WORDS = ["servers", "prod", "web", "db", "cpu", "load", "p99", "eu-west", "requests", "disk"]
UNICODE = ["é", "ü", "中文", "ñandú", "Ωmega"]


def make_names(count: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        parts = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        if rng.random() < 0.12:
            parts.insert(rng.randrange(len(parts)), rng.choice(UNICODE))
        lines.append(".".join(parts) + f".{i}")
    return ("\n".join(lines) + "\n").encode()


def write_config(path: Path, hash_type: str) -> Path:
    members = [
        f"10.0.0.{host}:{2003 + 100 * slot}={name}"
        for host in range(1, 9)
        for slot, name in enumerate("abc", start=1)
    ]
    path.write_text(
        f"cluster ring {hash_type} replication 2\n    "
        + "\n    ".join(members)
        + "\n    ;\nmatch * send to ring stop;\n"
    )
    return path


def timed(cmd: list[str], names: Path) -> float:
    with names.open("rb") as source:
        start = time.perf_counter()
        subprocess.run(cmd, stdin=source, stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start


def agree(relay: str, config: Path, sample: bytes) -> None:
    """Same owners, name by name, on a sample: a bench of wrong answers is void.

    -t skips the live relay's name rewrite, which locate applies: -t is given
    the rewritten names here (the timed runs give it the names as they are).
    """
    relay_out = subprocess.run(
        [relay, "-t", "-f", str(config)],
        input=rewrite_block(sample),
        capture_output=True,
        check=True,
    ).stdout.decode()
    theirs = {}
    for block in relay_out.split("match\n")[1:]:
        lines = block.strip().splitlines()
        theirs[lines[0].split("-> ", 1)[1]] = [line.strip() for line in lines[2:-1]]
    ours_out = subprocess.run(
        [*CARBONSCALE, "ring", "locate", "--relay-config", str(config)],
        input=sample,
        capture_output=True,
        check=True,
    ).stdout.decode()
    ours = {}
    for line in ours_out.splitlines():
        metric, *owners = line.split("\t")
        ours[metric] = owners
    if ours != theirs:
        bad = [m for m in theirs if ours.get(m) != theirs[m]][:3]
        raise SystemExit(f"bench: carbonscale and carbon-c-relay disagree, e.g. {bad}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    relay = shutil.which("carbon-c-relay")
    if relay is None:
        print("bench: carbon-c-relay is not installed (make host-deps)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-ring-") as tmp:
        names = Path(tmp) / "names.txt"
        data = make_names(args.names)
        names.write_bytes(data)
        sample = b"\n".join(data.split(b"\n")[:5000]) + b"\n"
        print(
            f"{args.names} names, 24 members (8 hosts x 3 instances), replication 2, "
            f"best of {args.runs} interleaved runs"
        )
        ratios = []
        for hash_type in ("carbon_ch", "jump_fnv1a_ch"):
            config = write_config(Path(tmp) / f"{hash_type}.conf", hash_type)
            agree(relay, config, sample)
            relay_times, our_times = [], []
            for _ in range(args.runs):
                relay_times.append(timed([relay, "-t", "-f", str(config)], names))
                our_times.append(
                    timed([*CARBONSCALE, "ring", "locate", "--relay-config", str(config)], names)
                )
            relay_best, ours_best = min(relay_times), min(our_times)
            ratio = relay_best / ours_best
            ratios.append(ratio)
            print(
                f"{hash_type:14} carbon-c-relay -t {args.names / relay_best:>10,.0f} names/s"
                f"   carbonscale ring locate {args.names / ours_best:>10,.0f} names/s"
                f"   ratio {ratio:.2f}"
            )
        print(f"lowest ratio {min(ratios):.2f} (goal >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

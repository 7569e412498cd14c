"""A storage tier on disk for the ops verbs and the fabfile: one whisper tree per
host, each file written where carbon-c-relay -t says its metric goes, then a few
copies placed on purpose on hosts that do not own them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import whisper
from relay_oracle import relay_test_owners, write_cluster_config

HOSTS = ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
MEMBERS = [f"{h}:{p}={n}" for h in HOSTS for p, n in ((2103, "a"), (2203, "b"))]
NAMES = [f"app.svc{i:03d}.requests" for i in range(90)]


@dataclass
class StorageTier:
    roots: dict[str, Path]
    relay_config: Path
    owners: dict[str, list[str]]  # metric -> owner host addresses (relay's answer)
    strays: dict[str, set[str]] = field(default_factory=dict)  # host -> metrics misplaced
    missing: set[str] = field(default_factory=set)  # metrics only on a wrong host
    values: dict[str, tuple[int, float]] = field(default_factory=dict)


def write_metric(root: Path, name: str, stamp: int, value: float) -> Path:
    path = root / (name.replace(".", "/") + ".wsp")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        whisper.create(str(path), [(60, 1440), (3600, 24 * 30)])
    whisper.update(str(path), value, stamp)
    return path


def build_tier(tmp: Path, roots: dict[str, Path] | None = None) -> StorageTier:
    """Every metric on its owner's tree; app.svc000-002 copied onto another host too
    (strays), app.svc003 only on a host that does not own it (its owner misses it)."""
    config = write_cluster_config(tmp / "relay.conf", "carbon_ch", 1, MEMBERS)
    placement = relay_test_owners(config, NAMES)
    owners = {n: [a.split(":")[0] for a in placement[n]] for n in NAMES}
    roots = roots or {h: tmp / f"whisper-{h}" for h in HOSTS}
    for root in roots.values():
        root.mkdir(parents=True, exist_ok=True)
    tier = StorageTier(roots, config, owners, {h: set() for h in HOSTS})
    now = int(time.time())
    for i, name in enumerate(NAMES):
        stamp, value = now - 60 * (i % 5 + 1), float(i) + 0.5
        tier.values[name] = (stamp - stamp % 60, value)
        wrong = next(h for h in HOSTS if h not in owners[name])
        if i < 3:
            write_metric(roots[owners[name][0]], name, stamp, value)
            write_metric(roots[wrong], name, stamp, value)
            tier.strays[wrong].add(name)
        elif i == 3:
            write_metric(roots[wrong], name, stamp, value)
            tier.strays[wrong].add(name)
            tier.missing.add(name)
        else:
            write_metric(roots[owners[name][0]], name, stamp, value)
    return tier

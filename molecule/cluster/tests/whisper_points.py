"""Every point under a metric prefix, read back from the whisper files on the
storage hosts: what the persistent-sender checks compare with what they sent.

The senders give each point a whisper slot of its own (60 s apart, going back
in time from a minute boundary), so one point overwritten or lost shows.
"""

from __future__ import annotations

import json

from cluster_hosts import Cluster, setting, wait_for

# whisper answers from the finest archive that covers the whole window: with
# the storage role's default schema (60s:7d first) a window of at most 7 days
# reads the 60 s archive, where each point has its own slot.
FETCH = (
    "python3 -c 'import json, sys, time, whisper\n"
    "out = {}\n"
    "since = int(time.time()) - int(sys.argv[1])\n"
    "for path in sys.argv[2:]:\n"
    "    (start, end, step), values = whisper.fetch(path, since)\n"
    "    out[path] = {str(start + i * step): v for i, v in enumerate(values) if v is not None}\n"
    "print(json.dumps(out))' "
)


def points_on_disk(
    cluster: Cluster, storage: list[str], prefix: str, window: int = 86400
) -> dict[tuple[str, str], float]:
    """{(metric leaf, timestamp): value} of every PREFIX.<leaf> file on the storage
    hosts, points of the last `window` seconds."""
    found = {}
    for host in storage:
        root = setting(cluster, host, "carbon_storage", "carbon_storage_whisper_dir")
        top = f"{root}/{prefix.replace('.', '/')}"
        files = cluster.host(host).run(f"ls {top}/*.wsp 2>/dev/null").stdout.split()
        if not files:
            continue
        points = json.loads(cluster.host(host).check_output(f"{FETCH} {window} {' '.join(files)}"))
        for path, values in points.items():
            metric = path.rsplit("/", 1)[1][: -len(".wsp")]
            for timestamp, value in values.items():
                found[(metric, timestamp)] = value
    return found


def wait_for_points(
    cluster: Cluster,
    storage: list[str],
    prefix: str,
    expected: int,
    window: int = 86400,
    timeout: float = 120,
) -> dict[tuple[str, str], float]:
    """points_on_disk once at least `expected` points are there (carbon-cache
    writes asynchronously), or what is there after timeout seconds."""

    def complete() -> dict | None:
        found = points_on_disk(cluster, storage, prefix, window)
        return found if len(found) >= expected else None

    return wait_for(complete, timeout, step=5) or points_on_disk(cluster, storage, prefix, window)


# The newest point of each whisper file given that exists: {path: value}.
LAST_VALUES = (
    "python3 -c 'import json, os, sys, time, whisper\n"
    "out = {}\n"
    "for path in filter(os.path.exists, sys.argv[1:]):\n"
    "    (start, end, step), values = whisper.fetch(path, int(time.time()) - 600)\n"
    "    out[path] = ([v for v in values if v is not None] or [None])[-1]\n"
    "print(json.dumps(out))' "
)


def last_values(host, paths: list[str]) -> dict[str, float | None]:
    return json.loads(host.check_output(LAST_VALUES + " ".join(paths)))


def newest_values(cluster: Cluster, metrics: list[str]) -> dict[str, float]:
    """{metric: its newest point of the last 10 minutes} for the metrics of the
    list that have a file with a point on some storage host (each is written
    where the ring says: the checks need not know which host)."""
    found = {}
    for host in cluster.group("storage"):
        root = setting(cluster, host, "carbon_storage", "carbon_storage_whisper_dir")
        paths = {f"{root}/{metric.replace('.', '/')}.wsp": metric for metric in metrics}
        for path, value in last_values(cluster.host(host), list(paths)).items():
            if value is not None:
                found[paths[path]] = value
    return found


def arrived(cluster: Cluster, want: dict[str, float]) -> bool:
    """Has every metric of want, somewhere on the storage hosts, the newest value
    want says? (A report sent to a relay is written where the ring says.)"""
    return newest_values(cluster, list(want)) == want

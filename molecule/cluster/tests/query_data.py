"""Series the query checks read back, written on the storage hosts with
whisper's own tools (python3-whisper, installed with graphite-carbon), so what
graphite-web answers can be compared with what is on disk, value by value.

Shared by test_query.py, test_query_ui.py and test_query_hung_storage.py.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

WHISPER = "/var/lib/graphite/whisper"
# One series per storage host under lab.query (the first two hosts): a render
# through the query host must merge both, and still answer with one host's
# while the other hangs.
PROBES = ("lab.query.probe", "lab.query.other")
PROBE_SCALES = (10, 1)
# One series under each graph of the carbonscale dashboard, so the browser
# test sees every graph drawn even where this cluster's own source is idle or
# has only a few minutes of points (no SSD cache, no migration running). The
# node is named `sample`, a name no real relay or instance has.
DASHBOARD_SAMPLES = (
    "carbon.relays.sample.metricsReceived",
    "carbon.relays.sample.metricsQueued",
    "carbon.relays.sample.pickle.points",
    "carbon.relays.sample.pickle.queued",
    "carbon.relays.sample.statsd.metrics_received",
    "carbon.relays.sample.statsd.metrics_no_backend",
    "carbon.relays.sample.statsd.backends.statsd1.usable",
    "carbon.agents.sample-a.committedPoints",
    "carbon.agents.sample-a.cache.size",
    "carbonscale.storage.sample.a.restarts",
    "carbonscale.lvs.sample.nginx.no_live_upstreams",
    "carbonscale.ssd_cache.sample.dirty_blocks",
    "carbonscale.migrate.sample.files_done",
)
# A year of 10 s points (3,153,600 slots, 38 MB): read whole, a render of it is
# megabytes; the from == until test checks a storage node never does that.
BIG_SERIES = "lab.big.series"


@dataclass(frozen=True)
class QueryTier:
    query: str  # the query host's inventory name
    query_url: str
    storage: tuple[str, ...]  # every storage host
    addresses: dict  # {host: address}
    seen: dict  # {host: {metric: [values]}} what each graphite-web must answer


def _path(metric: str) -> str:
    return f"{WHISPER}/{metric.replace('.', '/')}.wsp"


def write_series(host, metric: str, retention: str, points: str) -> None:
    """A fresh whisper file for metric with points 'time:value ...' (shell words),
    written as carbon's user, as carbon would: a directory root made in the
    whisper tree would stop carbon, and a later move, from writing into it."""
    path = _path(metric)
    script = (
        f"set -e; mkdir -p $(dirname {path}); rm -f {path}; "
        f"whisper-create {path} {retention} >/dev/null; "
        + (f"whisper-update {path} {points}" if points else "true")
    )
    host.check_output(f"runuser -u _graphite -- sh -c {shlex.quote(script)}")


def prepare(cluster) -> QueryTier:
    query = cluster.group("query")[0]
    storage = tuple(cluster.group("storage"))
    assert len(storage) >= 2, "the query checks merge two storage hosts' series"
    seen = {}
    for name, metric, scale in zip(storage, PROBES, PROBE_SCALES, strict=False):
        host = cluster.host(name)
        now = int(host.check_output("date +%s"))
        minute = now - now % 60
        points = " ".join(f"{minute - i * 60}:{i * scale}" for i in range(1, 7))
        write_series(host, metric, "60s:1d", points)
        seen[name] = {metric: [float(i * scale) for i in range(1, 7)]}
    first = cluster.host(storage[0])
    now = int(first.check_output("date +%s"))
    ramp = " ".join(f"{now - now % 60 - i * 60}:{(i * 7) % 23 + 1}" for i in range(1, 41))
    for metric in DASHBOARD_SAMPLES:
        write_series(first, metric, "60s:1d", ramp)
    write_series(first, BIG_SERIES, "10s:365d", "")
    for name in storage[2:]:
        seen[name] = {}
    seen[query] = {m: v for name in storage for m, v in seen[name].items()}
    addresses = {name: cluster.address(name) for name in (query, *storage)}
    return QueryTier(
        query=query,
        query_url=f"http://{addresses[query]}:8080",
        storage=storage,
        addresses=addresses,
        seen=seen,
    )

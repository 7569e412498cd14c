"""The relays' own counters, read where they land: carbon-c-relay, the pickle relay
and the statsd relay send them as `carbon.relays.<relay>.*` metrics through the
ring, so each storage host holds some of them. On a host: the newest point of
every counter it holds; across hosts: per relay, received / sent / dropped / queued.

carbon-c-relay's and the pickle relay's counters are cumulative since start; the
statsd relay's are per interval.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from carbonscale.ops.lookup import newest_point
from carbonscale.ops.tree import check_root
from carbonscale.whisper.header import CorruptWhisper

RELAYS_DIR = ("carbon", "relays")

# The summary columns: which counters (newest values summed) make each, per daemon.
SUMMARY = {
    "carbon-c-relay": {
        "received": ["metricsReceived"],
        "sent": ["metricsSent"],
        "dropped": ["metricsDropped"],
        "queued": ["metricsQueued"],
    },
    "pickle": {
        "received": ["pickle.points"],
        "sent": ["pickle.sent"],
        "dropped": ["pickle.dropped_overflow", "pickle.dropped_shutdown", "pickle.invalid"],
        "queued": ["pickle.queued"],
    },
    "statsd (per interval)": {
        "received": ["statsd.metrics_received"],
        "sent": ["statsd.metrics_forwarded"],
        "dropped": [
            "statsd.metrics_malformed",
            "statsd.metrics_no_backend",
            "statsd.metrics_send_failed",
            "statsd.datagrams_dropped_kernel",
        ],
        "queued": [],
    },
}


def relays_here(root: str) -> dict[str, dict[str, list]]:
    """{relay: {counter: [timestamp, value]}} of every relay counter file under root."""
    check_root(root)
    base = os.path.join(root, *RELAYS_DIR)
    found: dict[str, dict[str, list]] = {}
    if not os.path.isdir(base):
        return found
    for relay in sorted(os.listdir(base)):
        top = os.path.join(base, relay)
        if not os.path.isdir(top):
            continue
        for directory, _, files in os.walk(top):
            for file in files:
                if not file.endswith(".wsp"):
                    continue
                path = os.path.join(directory, file)
                relative = os.path.relpath(path, top)[: -len(".wsp")].replace(os.sep, ".")
                try:
                    point = newest_point(path)
                except (OSError, CorruptWhisper):
                    continue
                if point is not None:
                    found.setdefault(relay, {})[relative] = list(point)
    return found


def merge_relays(reports: Mapping[str, Mapping[str, Mapping[str, list]]]) -> dict:
    """Per relay: every counter's newest point over all hosts, and the summary."""
    counters: dict[str, dict[str, list]] = {}
    for report in reports.values():
        for relay, values in report.items():
            mine = counters.setdefault(relay, {})
            for name, point in values.items():
                if name not in mine or point[0] > mine[name][0]:
                    mine[name] = point
    merged = {}
    for relay, values in sorted(counters.items()):
        summary = {}
        for daemon, columns in SUMMARY.items():
            present = {n for names in columns.values() for n in names} & set(values)
            if not present:
                continue
            summary[daemon] = {
                column: (sum(values[n][1] for n in names if n in values) if names else None)
                for column, names in columns.items()
            }
            summary[daemon]["at"] = max(values[n][0] for n in present)
        merged[relay] = {"summary": summary, "counters": values}
    return merged


def relays_table(merged: Mapping[str, dict]) -> str:
    lines = [
        f"{'relay':<16} {'daemon':<22} {'received':>14} {'sent':>14} {'dropped':>10} "
        f"{'queued':>10}  at"
    ]
    for relay, entry in merged.items():
        for daemon, s in entry["summary"].items():
            cells = [
                "-" if s[c] is None else f"{s[c]:.0f}" for c in ("received", "sent", "dropped")
            ]
            queued = "-" if s["queued"] is None else f"{s['queued']:.0f}"
            lines.append(
                f"{relay:<16} {daemon:<22} {cells[0]:>14} {cells[1]:>14} {cells[2]:>10} "
                f"{queued:>10}  {s['at']}"
            )
    return "\n".join(lines)

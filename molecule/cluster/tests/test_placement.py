"""End to end: metrics sent to the cluster's front door land, as whisper files,
on the storage instance that `carbonscale ring locate` names.

Two users: the cluster scenario's verify (molecule passes its inventory) and
`make lab`'s smoke test (scripts/lab.py passes inventories/lab). Hosts are found
by group, never by name (cluster_hosts.py; the `cluster` fixture is in
conftest.py). With CARBONSCALE_SMOKE_REPORT set, a summary of what
was checked (and what was not, and why) is written there as JSON for the
lab to print.

A tier that is not deployed yet (its package is absent from its hosts) is
reported as not checked and the test is skipped, saying so; a tier that is
deployed but does not deliver fails.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from cluster_hosts import Cluster, front_door, owners_by_member, vip, whisper_paths

METRICS = 1000


class Report:
    """What was checked, for the lab's summary: status is passed, failed or
    not checked; lines say what was sent where and what was found."""

    def __init__(self) -> None:
        self.status = "failed"
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)


@pytest.fixture(scope="module")
def report():
    """Written whatever the outcome; a test sets the status it reached."""
    summary = Report()
    yield summary
    path = os.environ.get("CARBONSCALE_SMOKE_REPORT")
    if path:
        with open(path, "w") as handle:
            json.dump({"status": summary.status, "lines": summary.lines}, handle)


def deployed(cluster: Cluster, group: str, package: str) -> tuple[bool, str]:
    """Is the tier on its first host? (False, why) when it is not deployed."""
    hosts = cluster.group(group)
    if not hosts:
        return False, f"the inventory has no {group} hosts"
    if not cluster.host(hosts[0]).package(package).is_installed:
        return False, f"{package} is not installed on {hosts[0]}: the {group} tier is not deployed"
    return True, ""


RELAY_CONFIG = "/etc/carbon-c-relay.conf"
CARBONSCALE = "/usr/local/bin/carbonscale"


def sender_and_door(cluster: Cluster) -> tuple[str, str]:
    """(host to send from, HOST:PORT to send to): the LVS VIP's line port.

    Sent from a storage node: a relay carries the VIP on lo (direct routing)
    and would deliver to itself. Without directors, a relay's line port.
    """
    address, port = front_door(cluster, 2003)
    sender = cluster.group("storage" if vip(cluster) else "relays")[0]
    return sender, f"{address}:{port}"


def whisper_names(cluster: Cluster, host: str, prefix: str) -> set[str]:
    """Metric names under prefix that have a whisper file on host."""
    return {
        path[: -len(".wsp")].replace("/", ".")
        for path in whisper_paths(cluster, host, prefix.rstrip(".").replace(".", "/"))
    }


def test_metrics_land_where_the_ring_says(cluster, report):
    missing = []
    for group, package in (("storage", "graphite-carbon"), ("relays", "carbon-c-relay")):
        ok, why = deployed(cluster, group, package)
        if not ok:
            missing.append(why)
    if missing:
        report.status = "not checked"
        report.add(
            f"{METRICS} metrics sent to the front door and found where the ring says: NOT CHECKED"
        )
        for why in missing:
            report.add(f"  {why}")
        pytest.skip("; ".join(missing))

    sender, door = sender_and_door(cluster)
    relay = cluster.host(cluster.group("relays")[0])
    # A fresh prefix per run, so files of earlier runs prove nothing.
    stamp = relay.run("date +%s%N").stdout.strip()
    prefix = f"carbonscale.smoke.run{stamp}."
    gen = f"{CARBONSCALE} gen -c {METRICS} -x 1 -p {prefix} --seed 1"

    # Where the live relay's own config puts each metric (replication included).
    located = relay.run(
        f"{gen} | {CARBONSCALE} ring locate --relay-config {RELAY_CONFIG} --cluster storage"
    )
    assert located.rc == 0, located.stderr
    members = owners_by_member(cluster)
    expected: dict[str, set[str]] = {}
    for line in located.stdout.splitlines():
        metric, *owners = line.split("\t")
        expected[metric] = {members[owner][0] for owner in owners}
    assert len(expected) == METRICS

    sent = cluster.host(sender).run(f"{gen} --send {door}")
    assert sent.rc == 0, sent.stderr
    report.add(f"{METRICS} metrics sent from {sender} to {door} (line protocol)")

    # carbon-cache writes asynchronously (MAX_CREATES_PER_MINUTE paces new
    # files): poll until every expected file is there, or time out.
    storage = cluster.group("storage")
    deadline = time.monotonic() + 180
    while True:
        found = {host: whisper_names(cluster, host, prefix) for host in storage}
        landed = {m: {h for h in storage if m in found[h]} for m in expected}
        if all(landed[m] >= expected[m] for m in expected) or time.monotonic() > deadline:
            break
        time.sleep(5)

    absent = {m: sorted(expected[m] - landed[m]) for m in expected if expected[m] - landed[m]}
    strays = {m: sorted(landed[m] - expected[m]) for m in expected if landed[m] - expected[m]}
    report.add(
        f"whisper files found on the owner hosts: {METRICS - len(absent)}/{METRICS}; "
        f"on hosts the ring does not name: {len(strays)}"
    )
    assert not absent, (
        f"{len(absent)} metrics missing on their owners, e.g. {list(absent.items())[:3]}"
    )
    assert not strays, (
        f"{len(strays)} metrics on hosts the ring does not name, e.g. {list(strays.items())[:3]}"
    )
    report.status = "passed"

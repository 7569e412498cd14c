"""End to end: metrics sent to the cluster's front door land, as whisper files,
on the storage instance that `carbonscale ring locate` names.

Two users: the cluster scenario's verify (molecule passes its inventory) and
`make lab`'s smoke test (scripts/lab.py passes inventories/lab). Hosts are found
by group, never by name. With CARBONSCALE_SMOKE_REPORT set, a summary of what
was checked (and what was not, and why) is written there as JSON for the
lab to print.

A tier that is not deployed yet (its package is absent from its hosts) is
reported as not checked and the test is skipped, saying so; a tier that is
deployed but does not deliver fails.
"""

from __future__ import annotations

import json
import os

import pytest
import testinfra
from testinfra.utils.ansible_runner import AnsibleRunner

METRICS = 1000


class Cluster:
    def __init__(self, inventory: str) -> None:
        self.inventory = inventory
        self.runner = AnsibleRunner(inventory)
        self._hosts: dict[str, testinfra.host.Host] = {}

    def group(self, name: str) -> list[str]:
        return self.runner.get_hosts(name)

    def vars(self, name: str) -> dict:
        return self.runner.get_variables(name)

    def host(self, name: str):
        if name not in self._hosts:
            self._hosts[name] = testinfra.get_host(
                f"ansible://{name}", ansible_inventory=self.inventory
            )
        return self._hosts[name]


@pytest.fixture(scope="module")
def cluster(request) -> Cluster:
    inventory = request.config.option.ansible_inventory
    assert inventory, "run with --ansible-inventory (molecule verify and scripts/lab.py do)"
    return Cluster(inventory)


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
    pytest.fail(
        "the relay and storage tiers are deployed but the placement check is not written yet"
    )

"""The converged cluster as the checks see it: hosts found by group in the
inventory molecule (or scripts/lab.py) passes, never by name or address.

Shared by every test module in this directory (conftest.py makes the
`cluster` fixture from it).
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import testinfra
import yaml
from testinfra.utils.ansible_runner import AnsibleRunner

ROLES = Path(__file__).resolve().parents[3] / "roles"


class Cluster:
    def __init__(self, inventory: str) -> None:
        self.inventory = inventory
        self.runner = AnsibleRunner(inventory)
        self._hosts: dict[str, testinfra.host.Host] = {}
        self._vars: dict[str, dict] = {}

    def group(self, name: str) -> list[str]:
        return self.runner.get_hosts(name)

    def vars(self, name: str) -> dict:
        if name not in self._vars:
            self._vars[name] = self.runner.get_variables(name)
        return self._vars[name]

    def address(self, name: str) -> str:
        return self.vars(name)["carbonscale_address"]

    def host(self, name: str):
        if name not in self._hosts:
            self._hosts[name] = testinfra.get_host(
                f"ansible://{name}", ansible_inventory=self.inventory
            )
        return self._hosts[name]


def owners_by_member(cluster: Cluster) -> dict[str, tuple[str, str]]:
    """host:port (as the relay prints it) -> (storage host, instance name)."""
    members = {}
    for host in cluster.group("storage"):
        facts = cluster.vars(host)
        for instance in facts["carbon_instances"]:
            members[f"{facts['carbonscale_address']}:{instance['line_port']}"] = (
                host,
                instance["name"],
            )
    return members


@cache
def role_default(role: str, name: str):
    """A role's default as written in its defaults/main.yml (a literal value):
    for settings the inventory leaves to the role."""
    defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    return defaults[name]


def setting(cluster: Cluster, host: str, role: str, name: str):
    """What the role ran with on host: the inventory's value, else the role's default."""
    found = cluster.vars(host)
    return found[name] if name in found else role_default(role, name)


def vip(cluster: Cluster) -> str | None:
    """The directors' first VIP; None where the inventory has no LVS tier."""
    relays = cluster.group("relays")
    vips = (cluster.vars(relays[0]).get("lvs_vips") or []) if relays else []
    return vips[0] if vips and cluster.group("lvs") else None


def front_door(cluster: Cluster, port: int) -> tuple[str, int]:
    """Where senders send: the VIP (the LVS tier), else the first relay."""
    return vip(cluster) or cluster.address(cluster.group("relays")[0]), port


def whisper_paths(cluster: Cluster, host: str, under: str = "", newer_than: float | None = None):
    """Paths of the whisper files on host, relative to its whisper dir: those
    under `under` (a dir relative to it), modified after `newer_than` (Unix time)
    if given. Empty when the dir does not exist."""
    root = setting(cluster, host, "carbon_storage", "carbon_storage_whisper_dir").rstrip("/")
    newer = f" -newermt @{int(newer_than)}" if newer_than is not None else ""
    top = f"{root}/{under}".rstrip("/")
    out = cluster.host(host).run(f"find {top} -name '*.wsp'{newer} -printf '%p\\n' 2>/dev/null")
    return {line[len(root) + 1 :] for line in out.stdout.splitlines() if line.endswith(".wsp")}


def wait_for(predicate, timeout: float, step: float = 0.2):
    """predicate()'s first true value within timeout seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def tracebacks_since(cluster: Cluster, since: float) -> dict[str, str]:
    """{host: what its journal logged around each Python traceback since `since`
    (Unix time)} for every host of the inventory that logged one."""
    found = {}
    for name in cluster.group("all"):
        out = cluster.host(name).run(
            f"journalctl --since @{int(since)} -q -o short-iso --no-pager"
            " | grep -B2 -A8 'Traceback (most recent call last)'"
        )
        if out.stdout.strip():
            found[name] = out.stdout
    return found

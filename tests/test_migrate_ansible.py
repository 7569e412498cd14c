"""library/carbon_migrate run by ansible-playbook against localhost, over the real
file services of tests/test_migrate.py's three-host cluster: check mode plans and
counts without writing or moving anything, the steps converge the cluster, a
second sync changes nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ansible_runner import module_task
from test_migrate import A, B, C, Cluster

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
needs_ansible = pytest.mark.skipif(not PLAYBOOK_BIN.exists(), reason="ansible is not installed")


def task(tmp_path: Path, args: dict, *extra: str) -> dict:
    body = "".join(f"        {key}: {json.dumps(value)}\n" for key, value in args.items())
    return module_task(tmp_path, "carbon_migrate", body, *extra)


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*.wsp")}


@pytest.mark.slow
@needs_ansible
def test_module_plans_in_check_mode_then_converges_the_cluster(tmp_path):
    cluster = Cluster(tmp_path, "carbon_ch", 1, 40)
    try:
        plan = tmp_path / "plan.tsv"
        common = {"plan": str(plan), "secret_file": str(cluster.secret)}
        planning = {
            "step": "plan",
            "new_relay_config": str(cluster.new_config),
            "old_relay_config": str(cluster.old_config),
            "hosts": [f"{h.name}={h.endpoint}" for h in cluster.hosts.values()],
            **common,
        }
        before = {name: snapshot(h.root) for name, h in cluster.hosts.items()}
        checked = task(tmp_path, planning, "--check", "--diff")
        assert checked["changed"] and not plan.exists()
        assert checked["summary"]["work"] > 0
        assert f"-> {B}" in checked["diff"]["after"]
        written = task(tmp_path, planning)
        assert written["changed"] and plan.exists()
        assert written["plan_id"] == plan.read_text().split("\n", 1)[0].rsplit(" ", 1)[1]
        for name, host in cluster.hosts.items():
            step = {"host": name, "root": str(host.root), "state_dir": str(host.state), **common}
            dry = task(tmp_path, {"step": "sync", **step}, "--check", "--diff")
            moving = sum(1 for m in cluster.metrics if name in cluster.new_owners[m]
                         and cluster.old_owners[m] != cluster.new_owners[m])  # fmt: skip
            assert dry["work"] >= moving
            assert snapshot(host.root) == before[name]  # check mode moved nothing
        for name, host in cluster.hosts.items():
            step = {"host": name, "root": str(host.root), "state_dir": str(host.state), **common}
            synced = task(tmp_path, {"step": "sync", **step})
            assert not synced.get("failed"), synced
        # verify and cleanup host by host: B verifies after A's cleanup moved A's copies
        # to quarantine, which A's service still serves.
        for name, host in cluster.hosts.items():
            step = {"host": name, "root": str(host.root), "state_dir": str(host.state), **common}
            verified = task(tmp_path, {"step": "verify", **step})
            assert not verified.get("failed"), verified
            cleaned = task(tmp_path, {"step": "cleanup", **step})
            assert not cleaned.get("failed"), cleaned
            assert cleaned["changed"] == (name in (A, C))
        cluster.check_converged()
        host = cluster.hosts[B]
        step = {"host": B, "root": str(host.root), "state_dir": str(host.state), **common}
        again = task(tmp_path, {"step": "sync", **step})
        assert not again["changed"]  # the journal says done: nothing is pulled again
    finally:
        cluster.close()


@needs_ansible
def test_module_bad_input_fails_with_one_message(tmp_path):
    (tmp_path / "secret").write_bytes(b"0123456789abcdef0123")
    failed = task(
        tmp_path,
        {"step": "sync", "plan": str(tmp_path / "none.tsv"),
         "secret_file": str(tmp_path / "secret"), "host": "x", "root": str(tmp_path)},
    )  # fmt: skip
    assert failed["failed"] and failed["msg"].startswith("cannot read plan ")

"""Losses are never silent: the counters the roles' report timers send reach
whisper, with the value the host counted.

- a carbon-cache instance killed with SIGKILL (its cached points lost) is
  restarted by systemd, and `carbonscale.storage.<host>.<instance>.restarts`
  says so;
- each director's nginx refusal totals (`carbonscale report nginx-errors`,
  counted from its error log) arrive as `carbonscale.lvs.<host>.nginx.*`.

The timers run every minute; the checks start the report's service at once
instead of waiting for them.
"""

from __future__ import annotations

import json

import pytest
from cluster_hosts import setting, wait_for
from whisper_points import arrived, newest_values


def restarts(host, unit: str) -> tuple[int, str]:
    shown = host.check_output(f"systemctl show -p NRestarts -p ActiveState --value {unit}")
    count, state = shown.split()
    return int(count), state


def test_each_director_reports_its_nginx_refusal_totals(cluster):
    for name in cluster.group("lvs"):
        director = cluster.host(name)
        state_dir = setting(cluster, name, "lvs_director", "lvs_director_state_dir")
        assert director.service("carbonscale-lvs-report.timer").is_enabled
        ran = director.run("systemctl start carbonscale-lvs-report.service")
        assert ran.rc == 0, director.run("journalctl -u carbonscale-lvs-report -n 5").stdout
        totals = json.loads(director.file(f"{state_dir}/nginx-errors.json").content_string)
        prefix = f"carbonscale.lvs.{name.replace('.', '_')}.nginx"  # the role's default
        want = {f"{prefix}.{kind}": count for kind, count in totals["counts"].items()}
        assert wait_for(lambda w=want: arrived(cluster, w), 60, 2), want
        print(f"\n{name}: nginx refusal totals {totals['counts']} on disk")


@pytest.mark.disruptive
def test_a_killed_carbon_cache_instance_is_counted_on_the_dashboard(cluster):
    name = cluster.group("storage")[0]
    host = cluster.host(name)
    instance = cluster.vars(name)["carbon_instances"][0]["name"]
    unit = f"carbon-cache@{instance}.service"
    before, state = restarts(host, unit)
    assert state == "active", state
    host.run(f"systemctl kill -s KILL {unit}")
    # Restart= brings it back after RestartSec, and systemd counts it.
    assert wait_for(lambda: restarts(host, unit) == (before + 1, "active"), 60, 1), restarts(
        host, unit
    )
    ran = host.run("systemctl start carbonscale-storage-report.service")
    assert ran.rc == 0, host.run("journalctl -u carbonscale-storage-report -n 5").stdout
    # The role's default prefix, sent through the relays: the files are where
    # the ring places them, on any storage host.
    metric = f"carbonscale.storage.{name.replace('.', '_')}.{instance}"
    want = {f"{metric}.restarts": before + 1, f"{metric}.running": 1}
    counted = wait_for(lambda: arrived(cluster, want), 60, 2)
    print(
        f"\n{unit} on {name} killed: NRestarts {before} -> {before + 1}, "
        f"on disk {newest_values(cluster, list(want))}"
    )
    assert counted

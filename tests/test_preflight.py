"""playbooks/preflight.yml: a broken inventory stops site.yml before any host
is contacted, with a message naming the host, the variable and what to do.

Every inventory here points at containers that do not exist: a check that
tried to reach a host would fail as "unreachable", not with our message.
"""

import pytest
import yaml
from ansible_runner import ROOT, run_playbook

INSTANCES = [
    {"name": "a", "line_port": 2103, "pickle_port": 2104, "query_port": 7102},
    {"name": "b", "line_port": 2203, "pickle_port": 2204, "query_port": 7202},
]


def inventory(tmp_path, storage=None, relays=None, storage_vars=None):
    """A lab-shaped inventory; each host is {name: hostvars}."""
    if storage is None:
        storage = {"s1": {"carbonscale_address": "10.9.0.31"}}
    if relays is None:
        relays = {"r1": {"carbonscale_address": "10.9.0.21"}}
    if storage_vars is None:
        storage_vars = {"carbon_instances": INSTANCES}
    hosts = {
        "all": {
            "vars": {"ansible_connection": "community.docker.docker"},
            "children": {
                "relays": {"hosts": relays},
                "storage": {
                    "hosts": storage,
                    "vars": storage_vars,
                },
            },
        }
    }
    for vars_ in [*storage.values(), *relays.values()]:
        vars_.setdefault("ansible_host", "cs-preflight-test-no-such-container")
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(hosts))
    return path


def run(playbook, inv):
    return run_playbook(["-i", str(inv), str(ROOT / playbook)])


@pytest.mark.parametrize("inv", ["inventories/lab", "inventories/sample"])
def test_shipped_inventories_pass(inv):
    rc, out = run("playbooks/preflight.yml", ROOT / inv)
    assert rc == 0, out


def test_missing_address_stops_site_before_any_host_is_contacted(tmp_path):
    inv = inventory(tmp_path, storage={"s1": {}})
    rc, out = run("site.yml", inv)
    assert rc != 0
    assert "s1: carbonscale_address is missing" in out
    assert "host_vars/s1.yml" in out
    # Stopped by the preflight: no fact gathering, no other play started.
    assert "UNREACHABLE" not in out
    assert "Gather facts" not in out


def test_address_that_is_not_ipv4(tmp_path):
    inv = inventory(tmp_path, relays={"r1": {"carbonscale_address": "10.9.0.300"}})
    rc, out = run("playbooks/preflight.yml", inv)
    assert rc != 0
    assert "r1: carbonscale_address is not an IPv4 address: 10.9.0.300" in out


def test_two_hosts_with_one_address(tmp_path):
    inv = inventory(
        tmp_path,
        storage={
            "s1": {"carbonscale_address": "10.9.0.31"},
            "s2": {"carbonscale_address": "10.9.0.31"},
        },
    )
    rc, out = run("playbooks/preflight.yml", inv)
    assert rc != 0
    assert "Hosts s1, s2 share carbonscale_address 10.9.0.31" in out


def test_storage_host_without_carbon_instances(tmp_path):
    inv = inventory(tmp_path, storage_vars={})
    rc, out = run("site.yml", inv)
    assert rc != 0
    assert "s1 (group storage) has no carbon_instances" in out
    assert "group_vars/storage.yml" in out
    assert "UNREACHABLE" not in out


def test_carbon_instances_not_a_list(tmp_path):
    inv = inventory(tmp_path, storage_vars={"carbon_instances": "a:2103"})
    rc, out = run("playbooks/preflight.yml", inv)
    assert rc != 0
    assert "carbon_instances that is not a non-empty list" in out


def test_instance_without_a_port(tmp_path):
    broken = [INSTANCES[0], {"name": "b", "line_port": 2203, "query_port": 7202}]
    inv = inventory(tmp_path, storage_vars={"carbon_instances": broken})
    rc, out = run("playbooks/preflight.yml", inv)
    assert rc != 0
    assert "s1: carbon_instances[1] (b): pickle_port must be a port number 1-65535, got None" in out


def test_instances_sharing_a_port(tmp_path):
    clash = [INSTANCES[0], {**INSTANCES[1], "line_port": 2104}]
    inv = inventory(tmp_path, storage_vars={"carbon_instances": clash})
    rc, out = run("playbooks/preflight.yml", inv)
    assert rc != 0
    assert (
        "carbon_instances[1] (b) line_port 2104 clashes with carbon_instances[0] (a) pickle_port"
        in out
    )


def test_instances_sharing_a_name(tmp_path):
    twins = [INSTANCES[0], {**INSTANCES[1], "name": "a"}]
    inv = inventory(tmp_path, storage_vars={"carbon_instances": twins})
    rc, out = run("playbooks/preflight.yml", inv)
    assert rc != 0
    assert "carbon_instances[1] (a): duplicate name, also carbon_instances[0]" in out


def test_relays_without_storage(tmp_path):
    inv = inventory(tmp_path, storage={})
    rc, out = run("playbooks/preflight.yml", inv)
    assert rc != 0
    assert "relays but no host in group storage" in out

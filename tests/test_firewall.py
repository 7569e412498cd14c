"""carbonscale.firewall: the storage firewall's allowed sources from the inventory.

What roles/carbon_storage renders into its nftables sets; the table itself is
loaded and tested from allowed and refused hosts by molecule/cluster
(tests/test_storage_firewall.py).
"""

import re
import sys

import pytest
import yaml
from ansible_runner import ROOT, run_playbook

from carbonscale import CarbonscaleError
from carbonscale.firewall import parse_source, sources_from_inventory

GROUPS = {
    "relays": ["r1", "r2"],
    "query": ["q1"],
    "storage": ["s1", "s2"],
    "lvs": ["l1"],
}
HOSTVARS = {
    "r1": {"carbonscale_address": "10.0.0.21"},
    "r2": {"carbonscale_address": "10.0.0.22"},
    "q1": {"carbonscale_address": "2001:db8::41"},
    # No carbonscale_address: the gathered default IPv4 address, as for the ring.
    "s1": {"ansible_default_ipv4": {"address": "10.0.0.31"}},
    "s2": {"carbonscale_address": "10.0.0.32"},
    "l1": {"carbonscale_address": "10.0.0.11"},
}
TIERS = ["relays", "query", "storage"]


def test_hosts_of_the_groups_at_their_address_and_nobody_else():
    assert sources_from_inventory(GROUPS, TIERS, HOSTVARS) == {
        "ipv4": ["10.0.0.21", "10.0.0.22", "10.0.0.31", "10.0.0.32"],
        "ipv6": ["2001:db8::41"],
    }


def test_a_group_the_inventory_does_not_have_adds_nobody():
    assert sources_from_inventory({"storage": ["s2"]}, TIERS, HOSTVARS) == {
        "ipv4": ["10.0.0.32"],
        "ipv6": [],
    }


def test_overlapping_sources_collapse_into_disjoint_networks():
    # nft refuses overlapping elements of an interval set: a network holding
    # inventory hosts, a duplicate and two adjacent halves must come out disjoint.
    extra = ["10.0.0.0/27", "10.0.0.21", "192.168.0.0/25", "192.168.0.128/25", "[2001:db8::41]"]
    assert sources_from_inventory(GROUPS, TIERS, HOSTVARS, extra) == {
        "ipv4": ["10.0.0.0/27", "10.0.0.32", "192.168.0.0/24"],
        "ipv6": ["2001:db8::41"],
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1/8", "has host bits set"),
        ("relay1.example", "is not an IP address or network"),
        ("", "expected an IP address or network"),
        (None, "expected an IP address or network"),
    ],
)
def test_a_bad_source_is_refused_with_where_it_came_from(text, message):
    with pytest.raises(CarbonscaleError, match="allowed sources\\[1\\]") as caught:
        sources_from_inventory(GROUPS, TIERS, HOSTVARS, ["10.1.0.0/16", text])
    assert message in str(caught.value)


def test_a_host_named_by_hostname_is_refused_naming_the_host():
    hostvars = {**HOSTVARS, "r2": {"carbonscale_address": "relay2.example"}}
    with pytest.raises(CarbonscaleError, match="relays host r2 carbonscale_address"):
        sources_from_inventory(GROUPS, TIERS, hostvars)


def test_a_host_without_any_address_is_refused():
    with pytest.raises(CarbonscaleError, match="query host q1 has no carbonscale_address"):
        sources_from_inventory(GROUPS, TIERS, {**HOSTVARS, "q1": {}})


def test_extra_must_be_a_list():
    with pytest.raises(CarbonscaleError, match="must be a list"):
        sources_from_inventory(GROUPS, TIERS, HOSTVARS, "10.0.0.0/8")


def test_parse_source_keeps_a_network_and_a_host():
    assert str(parse_source("10.2.0.0/16", "x")) == "10.2.0.0/16"
    assert str(parse_source(" 10.2.0.9 ", "x")) == "10.2.0.9/32"


PLAY = """
- hosts: storage
  gather_facts: false
  connection: local
  tasks:
    - name: The role's defaults
      ansible.builtin.include_vars: %(root)s/roles/carbon_storage/defaults/main.yml
    - name: The role's firewall ruleset
      ansible.builtin.template:
        src: %(root)s/roles/carbon_storage/templates/storage-firewall.nft.j2
        dest: "{{ out }}"
        mode: "0644"
"""


def render_ruleset(tmp_path, **role_vars) -> tuple[int, str, str]:
    """(rc, ansible output, ruleset text) of the role's template for storage
    host s1 (run on the controller) in a relays/query/storage/lvs inventory."""
    out = tmp_path / "storage-firewall.nft"
    instances = [
        {"name": "a", "line_port": 2103, "pickle_port": 2104, "query_port": 7102},
        {"name": "b", "line_port": 2203, "pickle_port": 2204, "query_port": 7202},
    ]
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {
        "all": {
            "children": {
                "relays": {"hosts": {h: HOSTVARS[h] for h in GROUPS["relays"]}},
                "query": {"hosts": {"q1": HOSTVARS["q1"]}},
                "lvs": {"hosts": {"l1": HOSTVARS["l1"]}},
                "storage": {
                    "hosts": {
                        "s1": {"carbonscale_address": "10.0.0.31", **local},
                        "s2": HOSTVARS["s2"],
                    },
                    "vars": {"carbon_instances": instances},
                },
            }
        }
    }
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "vars.yml").write_text(yaml.safe_dump({"out": str(out), **role_vars}))
    play = tmp_path / "play.yml"
    play.write_text(PLAY % {"root": ROOT})
    rc, output = run_playbook(
        ["-i", "hosts.yml", "-l", "s1", "-e", "@vars.yml", str(play)], cwd=tmp_path
    )
    return rc, output, out.read_text() if out.exists() else ""


def nft_set(ruleset: str, name: str) -> str:
    """The `elements = {...}` line of set NAME ('' when the set is empty)."""
    body = ruleset.split(f"set {name} {{", 1)[1].split("}", 1)[0]
    return (
        re.sub(r"\s+", " ", body.split("elements = {", 1)[1]).strip() if "elements" in body else ""
    )


def test_the_role_renders_the_sets_from_the_inventory(tmp_path):
    rc, output, ruleset = render_ruleset(tmp_path, carbon_storage_allowed_sources=["10.9.0.0/16"])
    assert rc == 0, output
    assert nft_set(ruleset, "write_ports") == "2103, 2104, 2203, 2204"
    assert nft_set(ruleset, "carbonlink_ports") == "7102, 7202"
    # Relays, query and storage hosts and the extra network; not the LVS director.
    assert (
        nft_set(ruleset, "writers_ipv4")
        == "10.0.0.21, 10.0.0.22, 10.0.0.31, 10.0.0.32, 10.9.0.0/16"
    )
    assert nft_set(ruleset, "writers_ipv6") == "2001:db8::41"
    # CarbonLink: this node's own address and the extra network only.
    assert nft_set(ruleset, "carbonlink_ipv4") == "10.0.0.31, 10.9.0.0/16"
    assert nft_set(ruleset, "carbonlink_ipv6") == ""
    # Loading replaces this table only.
    commands = [line.strip() for line in ruleset.splitlines() if not line.strip().startswith("#")]
    assert not any("flush" in line for line in commands)
    assert commands.count("delete table inet carbonscale_storage") == 1


def test_a_bad_extra_source_stops_the_render_naming_it(tmp_path):
    rc, output, _ = render_ruleset(tmp_path, carbon_storage_allowed_sources=["10.9.0.1/16"])
    assert rc != 0
    assert "firewall_sources: allowed sources[0]: '10.9.0.1/16' is not an IP address" in output

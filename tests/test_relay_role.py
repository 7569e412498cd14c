"""roles/carbon_relay renders what carbon-c-relay accepts and refuses what it cannot run.

Through ansible-playbook on localhost: the role's cluster checks
(tasks/clusters.yml) over members from the carbon_ring_members filter, then
the role's own template rendered to a file. The file is checked by the real
carbon-c-relay (-t) and by `carbonscale ring locate --relay-config`, which must
name the same member for every metric. The role itself runs on containers in
molecule/relay.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible_runner import BIN, ROOT, role_vars_task, run_playbook
from relay_oracle import RELAY, needs_relay, relay_test_owners

from carbonscale.relay_names import relay_key

PLAY = """
- hosts: localhost
  gather_facts: false
  connection: local
  vars:
    ansible_facts: {processor_vcpus: 2}
  tasks:
%(role_vars)s    - name: The role's cluster checks
      ansible.builtin.include_tasks: %(root)s/roles/carbon_relay/tasks/clusters.yml
    - name: The role's template
      ansible.builtin.template:
        src: %(root)s/roles/carbon_relay/templates/carbon-c-relay.conf.j2
        dest: "{{ out }}"
        mode: "0644"
"""


def storage_hostvars(hosts: int, instances: list[str]) -> dict:
    """Hosts storage1..N; instance names are made unique per host when they
    end in '#' (fnv1a_ch keys on the name alone)."""
    return {
        f"storage{h}": {
            "carbonscale_address": f"10.1.0.{h}",
            "carbon_instances": [
                {
                    "name": name.replace("#", str(h)),
                    "line_port": 2103 + 100 * i,
                    "pickle_port": 2104 + 100 * i,
                }
                for i, name in enumerate(instances)
            ],
        }
        for h in range(1, hosts + 1)
    }


def render(tmp_path, hosts=2, instances=("a", "b"), **role_vars):
    """(rc, output, path of the rendered config).

    The storage hosts are in the inventory, so the role's own default
    (groups['storage'] | carbon_ring_members(hostvars)) makes the members;
    role variables are extra vars, above the role defaults the play loads."""
    out = tmp_path / "carbon-c-relay.conf"
    inventory = {
        "all": {
            "hosts": {
                "localhost": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                }
            },
            "children": {"storage": {"hosts": storage_hostvars(hosts, list(instances))}},
        }
    }
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "vars.yml").write_text(yaml.safe_dump({"out": str(out), **role_vars}))
    play = tmp_path / "play.yml"
    play.write_text(PLAY % {"root": ROOT, "role_vars": role_vars_task("carbon_relay")})
    rc, output = run_playbook(["-i", "hosts.yml", "-e", "@vars.yml", str(play)], cwd=tmp_path)
    return rc, output, out


NAMES = ["a.b.c"] + [
    f"servers.web{i:03d}.cpu.{kind}" for i in range(300) for kind in ("user", "ünï")
]


def locate(config: Path, cluster: str) -> dict[str, list[str]]:
    proc = subprocess.run(
        [
            BIN / "carbonscale",
            "ring",
            "locate",
            "--relay-config",
            str(config),
            "--cluster",
            cluster,
        ],
        input="\n".join(NAMES) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.split("\t")[0]: line.split("\t")[1:] for line in proc.stdout.splitlines()}


@needs_relay
@pytest.mark.parametrize(
    ("hash_type", "replication"), [("carbon_ch", 1), ("fnv1a_ch", 2), ("jump_fnv1a_ch", 1)]
)
def test_rendered_config_is_accepted_and_locate_agrees_with_the_relay(
    tmp_path, hash_type, replication
):
    # fnv1a_ch hashes the instance name alone: names unique per host (a1, b1, a2...).
    names = ("a#", "b#") if hash_type == "fnv1a_ch" else ("a", "b")
    rc, out, config = render(
        tmp_path,
        hosts=3,
        instances=names,
        carbon_relay_hash=hash_type,
        carbon_relay_replication=replication,
    )
    assert rc == 0, out
    text = config.read_text()
    members = [
        f"10.1.0.{h}:{2103 + 100 * i}={n.replace('#', str(h))}"
        for h in (1, 2, 3)
        for i, n in enumerate(names)
    ]
    assert f"{hash_type} replication {replication}\n" in text
    assert [line.strip() for line in text.splitlines() if "=" in line and ":" in line] == members
    # -t routes names as given; the live relay (and locate) the rewritten ones.
    relay = relay_test_owners(config, [relay_key(name.encode()).decode() for name in NAMES])
    assert len(relay) == len(NAMES)
    assert locate(config, "storage") == relay


@needs_relay
def test_two_clusters_for_dual_writes(tmp_path):
    """During a migration every metric goes to the old ring and to the new one."""
    new = [f"10.2.0.{h}:2103=a" for h in range(1, 5)]
    rc, out, config = render(tmp_path, carbon_relay_migration_members=new)
    assert rc == 0, out
    text = config.read_text()
    assert 'send to "storage" "storage_next"' in text
    # The relay accepts it, and every metric is sent to one member of each.
    proc = subprocess.run(
        [RELAY, "-t", "-f", str(config)],
        input="a.b.c\n",
        capture_output=True,
        text=True,
        check=True,
    )
    destinations = [
        line.strip()
        for line in proc.stdout.rsplit("match\n", 1)[1].splitlines()
        if line.strip().startswith("10.")
    ]
    expected = [locate(config, "storage")["a.b.c"][0], locate(config, "storage_next")["a.b.c"][0]]
    assert destinations == expected, proc.stdout


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # 65 members: carbon-c-relay 3.7.3 crashes past CONN_DESTS_SIZE (64).
        ({"hosts": 13, "instances": ("a", "b", "c", "d", "e")}, "it has 65 members"),
        # fnv1a_ch keys on the instance name alone: two "a" never both receive.
        (
            {"hosts": 2, "instances": ("a",), "carbon_relay_hash": "fnv1a_ch"},
            "members that would never receive a metric",
        ),
        ({"carbon_relay_replication": 5}, "replication 5"),
        ({"carbon_relay_hash": "md5"}, "hash md5"),
        (
            {
                "carbon_relay_migration_members": ["10.2.0.1:2103=a"],
                "carbon_relay_migration_cluster_name": "storage",
            },
            "must differ",
        ),
    ],
)
def test_clusters_the_relay_cannot_run_are_refused(tmp_path, kwargs, message):
    rc, out, config = render(tmp_path, **kwargs)
    assert rc != 0
    assert message in out
    assert not config.exists()

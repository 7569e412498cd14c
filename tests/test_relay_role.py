"""roles/carbon_relay renders what carbon-c-relay accepts and refuses what it cannot run.

Through ansible-playbook on localhost: the role's cluster checks
(tasks/clusters.yml) over members from the carbon_ring_members filter, then
the role's own template rendered to a file. The file is checked by the real
carbon-c-relay (-t) and by `carbonscale ring locate --relay-config`, which must
name the same member for every metric. The role itself runs on containers in
the cluster scenario (molecule/cluster/tests/test_relay.py).
"""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible_runner import BIN, ROOT, role_vars_task, run_playbook
from line_samples import good_and_bad_lines
from relay_oracle import RELAY, needs_relay, relay_test_owners
from relay_sinks import Sinks, free_port, running_relay, send, wait_for

from carbonscale.relay_names import relay_key, relay_line

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
    - name: The role's runtime options
      ansible.builtin.template:
        src: %(root)s/roles/carbon_relay/templates/default.j2
        dest: "{{ out }}.default"
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
    # Whole lines: the role's config drops lines without a valid value and timestamp.
    relay = relay_test_owners(
        config, [relay_key(name.encode()).decode() + " 1 1700000000" for name in NAMES]
    )
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
        input="a.b.c 1 1700000000\n",
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
            "own no ring position and receive nothing",
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


# --------------------------------------------------------------------------
# Lines carbon-cache cannot store: dropped by the live relay, and counted


@pytest.mark.slow
@needs_relay
def test_live_relay_drops_and_counts_what_carbon_cache_cannot_store(tmp_path):
    good, bad, discarded = good_and_bad_lines()
    sinks = Sinks(3)
    try:
        port = free_port()
        members = [f"127.0.0.1:{p}={name}" for p, name in zip(sinks.ports, "abc", strict=True)]
        config = tmp_path / "carbon-c-relay.conf"
        rc, out, _ = render(
            tmp_path,
            carbon_relay_members=members,
            carbon_relay_listen_address="127.0.0.1",
            carbon_relay_port=port,
            carbon_relay_statistics_interval=1,
            carbon_relay_hostname="roletest",
            carbon_relay_config_file=str(config),
        )
        assert rc == 0, out
        # The relay runs with the options the role writes for it.
        options = (tmp_path / "carbon-c-relay.conf.default").read_text()
        args = shlex.split(options.split('DAEMON_ARGS="', 1)[1].split('"', 1)[0])
        assert args[:2] == ["-f", str(config)]

        counter = b"carbon.relays.roletest.metricsBlackholed "
        discards = b"carbon.relays.roletest.metricsDiscarded "

        def last(prefix: bytes) -> int:
            values = [
                int(line.split()[1])
                for p in sinks.ports
                for line in sinks.lines(p)
                if line.startswith(prefix)
            ]
            return values[-1] if values else -1

        def arrived() -> int:
            return sum(1 for p in sinks.ports for line in sinks.lines(p) if line.startswith(b"ok."))

        with running_relay(args, port):
            send(port, b"".join(line + b"\n" for line in good + bad + discarded))
            wait_for(lambda: arrived() >= len(good) and last(counter) >= len(bad))
            wait_for(lambda: last(discards) >= len(discarded), 5)
            blackholed, discarded_count = last(counter), last(discards)
        received = {
            p: [ln for ln in sinks.lines(p) if not ln.startswith(b"carbon.")] for p in sinks.ports
        }
    finally:
        sinks.close()

    locate = subprocess.run(
        [BIN / "carbonscale", "ring", "locate", "--relay-config", str(config)],
        input=b"".join(line + b"\n" for line in good),
        capture_output=True,
        check=True,
    )
    owner = {
        row.split(b"\t")[0]: row.split(b"\t")[1].decode() for row in locate.stdout.splitlines()
    }
    expected = {p: [] for p in received}
    for line in good:
        sent, end = relay_line(line)
        expected[int(owner[sent[:end]].rsplit(":", 1)[1])].append(sent)
    assert {p: sorted(lines) for p, lines in received.items()} == {
        p: sorted(lines) for p, lines in expected.items()
    }
    assert blackholed == len(bad), f"metricsBlackholed {blackholed}, {len(bad)} bad lines sent"
    assert discarded_count == len(discarded)
    print(
        f"{len(good)} good lines at their owners, {len(bad)} bad lines dropped, "
        f"metricsBlackholed {blackholed}, metricsDiscarded {discarded_count}"
    )

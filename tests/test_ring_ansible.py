"""The Ansible glue of carbonscale.ring, run by ansible-playbook on localhost.

The filter turns an inventory into ring members; the module answers locate and
diff (with check mode and diff mode). Both must give exactly what the library
gives, since they are only glue over it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from carbonscale import CarbonscaleError
from carbonscale.relay_names import relay_key
from carbonscale.ring import Ring, parse_member

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
needs_ansible = pytest.mark.skipif(not PLAYBOOK_BIN.exists(), reason="ansible is not installed")

INVENTORY = """\
all:
  children:
    storage:
      hosts:
        s1:
          carbonscale_address: 10.1.0.1
          carbon_instances: [{name: a, line_port: 2103}, {name: b, line_port: 2203}]
        s2:
          carbonscale_address: 10.1.0.2
          carbon_instances: [{name: a, line_port: 2103}, {name: b, line_port: 2203}]
        s3: {carbonscale_address: "2001:db8::3", carbon_instances: [{name: a, line_port: 2103}]}
  vars:
    ansible_connection: local
"""

NAMES = [f"servers.web{i}.cpu.{kind}" for i in range(40) for kind in ("user", "sys", "ünï")]


def relay_name(name: str) -> str:
    """The name carbon-c-relay routes and writes (its rewrite: 'ü' -> '__')."""
    return relay_key(name.encode()).decode()


def playbook(tmp_path: Path, tasks: str, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "hosts.yml").write_text(INVENTORY)
    (tmp_path / "play.yml").write_text(
        "- name: Ring glue\n  hosts: localhost\n  gather_facts: false\n  tasks:\n" + tasks
    )
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_LIBRARY=str(ROOT / "library"),
        ANSIBLE_FILTER_PLUGINS=str(ROOT / "filter_plugins"),
        ANSIBLE_STDOUT_CALLBACK="json",
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
    )
    # No other callback (make molecule-* enables profile_tasks) may write into the JSON.
    env.pop("ANSIBLE_CALLBACKS_ENABLED", None)
    return subprocess.run(
        [str(PLAYBOOK_BIN), "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "play.yml"), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=300,
    )


def task_results(run: subprocess.CompletedProcess) -> list[dict]:
    report = json.loads(run.stdout[run.stdout.index("{") :])
    return [task["hosts"]["localhost"] for task in report["plays"][0]["tasks"]]


EXPECTED_MEMBERS = [
    "10.1.0.1:2103=a",
    "10.1.0.1:2203=b",
    "10.1.0.2:2103=a",
    "10.1.0.2:2203=b",
    "[2001:db8::3]:2103=a",
]


@needs_ansible
def test_filters_build_members_from_inventory_and_owners_match_the_library(tmp_path):
    run = playbook(
        tmp_path,
        """\
    - name: Members
      ansible.builtin.set_fact:
        members: "{{ groups['storage'] | carbon_ring_members(hostvars) }}"
    - name: Owners
      ansible.builtin.set_fact:
        owners: >-
          {{ 'servers.web1.cpu.user'
             | carbon_ring_owners(members, hash='jump_fnv1a_ch', replication=2) }}
        rewritten: >-
          {{ 'servers.web1.cpu.ünï'
             | carbon_ring_owners(members, hash='jump_fnv1a_ch', replication=2) }}
""",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = task_results(run)
    assert results[0]["ansible_facts"]["members"] == EXPECTED_MEMBERS
    ring = Ring([parse_member(m) for m in EXPECTED_MEMBERS], "jump_fnv1a_ch", replication=2)
    assert results[1]["ansible_facts"]["owners"] == [
        m.address for m in ring.locate("servers.web1.cpu.user")
    ]
    assert results[1]["ansible_facts"]["rewritten"] == [
        m.address for m in ring.locate(relay_name("servers.web1.cpu.ünï"))
    ]


@needs_ansible
def test_filter_refuses_a_bad_inventory_with_a_clear_message(tmp_path):
    run = playbook(
        tmp_path,
        """\
    - name: Members of a host without instances
      ansible.builtin.set_fact:
        members: "{{ ['s1', 'nope'] | carbon_ring_members(hostvars) }}"
""",
    )
    assert run.returncode != 0
    assert "nope" in run.stdout
    assert "Traceback" not in run.stdout


@needs_ansible
def test_module_locate_writes_tsv_with_check_and_diff(tmp_path):
    names_file = tmp_path / "names.txt"
    names_file.write_text("".join(f"{n} 1 1700000000\n" for n in NAMES))
    dest = tmp_path / "placement.tsv"
    task = f"""\
    - name: Locate
      carbon_ring:
        hash: carbon_ch
        replication: 2
        members: "{{{{ groups['storage'] | carbon_ring_members(hostvars) }}}}"
        names_file: {names_file}
        dest: {dest}
"""
    checked = playbook(tmp_path, task, "--check", "--diff")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    result = task_results(checked)[0]
    assert result["changed"] is True
    assert not dest.exists(), "check mode must not write"
    assert "diff" in result

    applied = playbook(tmp_path, task)
    assert task_results(applied)[0]["changed"] is True
    ring = Ring([parse_member(m) for m in EXPECTED_MEMBERS], "carbon_ch", replication=2)
    # Reported and hashed as carbon-c-relay rewrites them ('ü' -> '__').
    expected = "".join(
        n + "\t" + "\t".join(m.address for m in ring.locate(n)) + "\n"
        for n in map(relay_name, NAMES)
    )
    assert dest.read_text() == expected

    again = playbook(tmp_path, task)
    assert task_results(again)[0]["changed"] is False


@needs_ansible
def test_module_diff_counts_moves_like_the_library(tmp_path):
    task = f"""\
    - name: Diff
      carbon_ring:
        action: diff
        hash: carbon_ch
        members: {json.dumps(EXPECTED_MEMBERS[:4])}
        new_members: {json.dumps(EXPECTED_MEMBERS)}
        names: {json.dumps(NAMES)}
"""
    run = playbook(tmp_path, task)
    assert run.returncode == 0, run.stdout + run.stderr
    result = task_results(run)[0]
    old = Ring([parse_member(m) for m in EXPECTED_MEMBERS[:4]], "carbon_ch")
    new = Ring([parse_member(m) for m in EXPECTED_MEMBERS], "carbon_ch")
    moving = [n for n in map(relay_name, NAMES) if old.locate(n) != new.locate(n)]
    assert result["moved_count"] == len(moving) > 0
    assert result["changed"] is False  # a question, not a change


@needs_ansible
def test_module_bad_members_fail_with_the_library_message(tmp_path):
    run = playbook(
        tmp_path,
        """\
    - name: Locate with a duplicate member
      carbon_ring:
        hash: carbon_ch
        members: [a, b, a]
        names: [x.y]
""",
    )
    assert run.returncode != 0
    result = task_results(run)[0]
    assert result["failed"] is True
    assert "duplicate member" in result["msg"]
    assert "Traceback" not in result.get("module_stderr", "")


def test_the_glue_has_no_second_implementation():
    """The glue imports carbonscale.ring and defines no hash of its own."""
    for path in (ROOT / "library" / "carbon_ring.py", ROOT / "filter_plugins" / "carbon_ring.py"):
        text = path.read_text()
        assert "carbonscale" in text
        lowered = text.lower()
        assert "hashlib" not in lowered and "0x811c9dc5" not in lowered
        assert "0xcbf29ce4" not in lowered and "def jump" not in lowered


@needs_ansible
def test_module_warns_about_members_that_receive_nothing(tmp_path):
    run = playbook(
        tmp_path,
        """\
    - name: fnv1a_ch with the same instance name on two hosts
      carbon_ring:
        hash: fnv1a_ch
        members: [10.1.0.1:2103=a, 10.1.0.2:2103=a, 10.1.0.3:2103=b]
        names: [x.y]
""",
    )
    assert run.returncode == 0, run.stdout
    assert any("10.1.0.2:2103=a" in w for w in task_results(run)[0]["warnings"])


@needs_ansible
def test_shadowed_filter_names_the_members_that_get_nothing(tmp_path):
    run = playbook(
        tmp_path,
        """\
    - name: Shadowed members per hash
      vars:
        members: "{{ groups['storage'] | carbon_ring_members(hostvars) }}"
      ansible.builtin.set_fact:
        fnv: "{{ members | carbon_ring_shadowed(hash='fnv1a_ch') }}"
        ch: "{{ members | carbon_ring_shadowed(hash='carbon_ch') }}"
""",
    )
    assert run.returncode == 0, run.stdout
    facts = task_results(run)[0]["ansible_facts"]
    # Instances a, b, a, b, a under fnv1a_ch: only the first a and first b own entries.
    assert facts["fnv"] == ["10.1.0.2:2103=a", "10.1.0.2:2203=b", "[2001:db8::3]:2103=a"]
    assert facts["ch"] == []


@needs_ansible
def test_errors_filter_lists_what_carbon_c_relay_refuses(tmp_path):
    """carbon_ring_errors: carbonscale.ring's checks, one line each, [] when valid."""
    too_many = [f"10.2.0.{i}:2003" for i in range(1, 66)]
    run = playbook(
        tmp_path,
        f"""\
    - name: Errors of good and bad clusters
      vars:
        members: "{{{{ groups['storage'] | carbon_ring_members(hostvars) }}}}"
      ansible.builtin.set_fact:
        good: "{{{{ members | carbon_ring_errors(hash='carbon_ch', replication=2) }}}}"
        jump: "{{{{ members | carbon_ring_errors(hash='jump_fnv1a_ch', replication=5) }}}}"
        shadowed: "{{{{ members | carbon_ring_errors(hash='fnv1a_ch') }}}}"
        too_many: "{{{{ {too_many} | carbon_ring_errors }}}}"
        several: "{{{{ ['10.1.0.1:2103', '10.1.0.1:2103', 'bad host'] |
          carbon_ring_errors(hash='md5', replication=4) }}}}"
        no_replication: "{{{{ members | carbon_ring_errors(replication=0) }}}}"
""",
    )
    assert run.returncode == 0, run.stdout
    facts = task_results(run)[0]["ansible_facts"]
    assert facts["good"] == [] and facts["jump"] == []
    # The same line the relay role and `carbonscale ring` print for shadowed members.
    assert facts["shadowed"] == [
        "3 member(s) own no ring position and receive nothing: 10.1.0.2:2103=a, "
        "10.1.0.2:2203=b, [2001:db8::3]:2103=a (fnv1a_ch hashes the instance alone: "
        "give every member its own instance)"
    ]
    assert facts["too_many"] == [
        "65 members: carbon-c-relay accepts at most 64 in one cluster (CONN_DESTS_SIZE); "
        "split the ring or use --compat carbon"
    ]
    assert facts["several"] == [
        "unknown hash 'md5': choose one of carbon_ch, fnv1a_ch, jump_fnv1a_ch",
        "member 'bad host': empty or contains whitespace",
        "duplicate member 10.1.0.1:2103 (same as 10.1.0.1:2103)",
        "replication 4 is greater than the 2 members",
    ]
    assert facts["no_replication"] == ["replication must be >= 1, got 0"]
    # Each line is what Ring raises first for the same input.
    for members, hash_type, replication, lines in (
        (too_many, "carbon_ch", 1, facts["too_many"]),
        (EXPECTED_MEMBERS, "carbon_ch", 0, facts["no_replication"]),
    ):
        with pytest.raises(CarbonscaleError) as raised:
            Ring(members, hash_type, replication=replication)
        assert str(raised.value) == lines[0]

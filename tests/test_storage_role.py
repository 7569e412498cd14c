"""roles/carbon_storage refuses a bad carbon_instances before it touches a node.

Two layers, both exercised through ansible-playbook on localhost: the role's
argument specs (types, via validate_argument_spec on the role's own
meta/argument_specs.yml) and tasks/validate.yml (duplicates and port clashes,
via the carbon_instances_errors filter over carbonscale.storage). The role
itself is run on real containers by molecule/migrate (tests/test_storage.py).
"""

import pytest
import yaml
from ansible_runner import ROOT, run_playbook

from carbonscale.storage import instance_errors

GOOD = [
    {"name": "a", "line_port": 2103, "pickle_port": 2104, "query_port": 7102},
    {"name": "b", "line_port": 2203, "pickle_port": 2204, "query_port": 7202},
]

PLAY = """
- hosts: localhost
  gather_facts: false
  connection: local
  vars_files: [vars.yml]
  tasks:
    - name: The role's argument specs
      ansible.builtin.validate_argument_spec:
        argument_spec: "{{ (lookup('file', '%(root)s/roles/carbon_storage/meta/argument_specs.yml')
          | from_yaml).argument_specs.main.options }}"
    - name: The role's own validation tasks
      ansible.builtin.include_tasks: %(root)s/roles/carbon_storage/tasks/validate.yml
      vars:
        carbon_storage_whisper_dir: /var/lib/graphite/whisper
"""


def run_role_checks(tmp_path, instances):
    (tmp_path / "vars.yml").write_text(yaml.safe_dump({"carbon_instances": instances}))
    play = tmp_path / "play.yml"
    play.write_text(PLAY % {"root": ROOT})
    return run_playbook(["-i", "localhost,", str(play)], cwd=tmp_path)


def test_good_instances_pass(tmp_path):
    rc, out = run_role_checks(tmp_path, GOOD)
    assert rc == 0, out


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        (
            [GOOD[0], {**GOOD[1], "name": "a"}],
            "carbon_instances[1] (a): duplicate name, also carbon_instances[0]",
        ),
        (
            [GOOD[0], {**GOOD[1], "query_port": 2103}],
            "(b) query_port 2103 clashes with carbon_instances[0] (a) line_port",
        ),
        (
            [{**GOOD[0], "pickle_port": 2103}],
            "(a) pickle_port 2103 clashes with carbon_instances[0] (a) line_port",
        ),
        ([{**GOOD[0], "name": "a b"}], "name 'a b' must be 1-32 letters, digits"),
        ([{**GOOD[0], "line_port": 70000}], "line_port must be a port number 1-65535, got 70000"),
    ],
)
def test_bad_instances_are_refused_with_the_reason(tmp_path, instances, message):
    rc, out = run_role_checks(tmp_path, instances)
    assert rc != 0
    assert message in out, out
    assert "Traceback" not in out


def test_argument_specs_refuse_a_missing_port(tmp_path):
    rc, out = run_role_checks(tmp_path, [{"name": "a", "line_port": 2103, "query_port": 7102}])
    assert rc != 0
    assert "missing required arguments: pickle_port" in out, out


def test_argument_specs_refuse_a_port_that_is_not_a_number(tmp_path):
    rc, out = run_role_checks(tmp_path, [{**GOOD[0], "line_port": "twenty"}])
    assert rc != 0
    assert "line_port" in out and "int" in out, out


def test_instance_errors_lists_every_problem_at_once():
    errors = instance_errors(
        [GOOD[0], {**GOOD[0]}, {"name": "c", "line_port": 0, "pickle_port": 1, "query_port": 2}]
    )
    assert errors == [
        "carbon_instances[1] (a): duplicate name, also carbon_instances[0]: "
        "two instances would share a unit and a ring position",
        "carbon_instances[1] (a) line_port 2103 clashes with carbon_instances[0] (a) line_port",
        "carbon_instances[1] (a) pickle_port 2104 clashes with carbon_instances[0] (a) pickle_port",
        "carbon_instances[1] (a) query_port 7102 clashes with carbon_instances[0] (a) query_port",
        "carbon_instances[2] (c): line_port must be a port number 1-65535, got 0",
    ]


@pytest.mark.parametrize("value", [None, [], "a:2103", [["a", 2103]], [{**GOOD[0], "extra": 1}]])
def test_instance_errors_on_shapes_that_are_not_a_list_of_instances(value):
    assert instance_errors(value)


def test_valid_list_has_no_errors():
    assert instance_errors(GOOD) == []

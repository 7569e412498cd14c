"""Each role variable is written once: its default in defaults/main.yml.

meta/argument_specs.yml types and describes every variable and gives no
default; the README table is made from the two by scripts/role-docs.py. Here:
the rule holds for every role, every README table is what the script makes
(so no row is missing, stale or for a variable that does not exist), and every
real default passes its role's argument spec in ansible-playbook itself.
"""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from ansible_runner import ROOT, run_playbook

spec = importlib.util.spec_from_file_location("role_docs", ROOT / "scripts" / "role-docs.py")
role_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(role_docs)

ROLES = role_docs.roles(ROOT)


def test_every_role_is_checked():
    assert {role.name for role in ROLES} >= {"carbon_relay", "carbon_storage", "carbonscale"}


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_defaults_live_only_in_defaults_main(role):
    assert role_docs.problems(role) == []


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_readme_table_is_made_from_defaults_and_spec(role):
    readme = (role / "README.md").read_text()
    assert role_docs.readme_text(role) == readme, "run scripts/role-docs.py"


def test_the_rule_catches_each_kind_of_drift(tmp_path):
    role = tmp_path / "roles" / "demo"
    for sub in ("defaults", "meta", "tasks"):
        (role / sub).mkdir(parents=True)
    (role / "defaults" / "main.yml").write_text('demo_port: 2003\ndemo_pipe: "{{ a | b }}"\n')
    options = {
        "demo_port": {"type": "int", "default": 2004, "description": "Port."},
        "demo_pipe": {"type": "str", "description": "A | B."},
        "demo_key": {"type": "str", "required": True, "description": "Key."},
        "demo_ghost": {"type": "str", "description": "Nowhere."},
    }
    spec_file = role / "meta" / "argument_specs.yml"
    spec = {"argument_specs": {"main": {"options": options}}}
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert role_docs.problems(role) == [
        "demo: the argument spec gives demo_port a default; defaults/main.yml is the only "
        "place for it",
        "demo: demo_ghost has no default in defaults/main.yml and is not required",
    ]
    (role / "defaults" / "main.yml").write_text("demo_port: 2003\ndemo_extra: 1\n")
    assert "demo: demo_extra is in defaults/main.yml but not in the argument spec" in (
        role_docs.problems(role)
    )

    readme = role / "README.md"
    readme.write_text("# demo\n\nNo markers.\n")
    with pytest.raises(role_docs.RoleDocsError, match="needs one"):
        role_docs.readme_text(role)
    (role / "defaults" / "main.yml").write_text('demo_port: 2003\ndemo_pipe: "{{ a | b }}"\n')
    readme.write_text(f"# demo\n\n{role_docs.START}\n| `demo_gone` | 1 | x |\n{role_docs.END}\n")
    table = role_docs.readme_text(role)
    assert "demo_gone" not in table
    assert "| `demo_pipe` | `{{ a \\| b }}` | A \\| B. |\n" in table
    assert "| `demo_key` | required | Key. |\n" in table
    assert "| `demo_port` | `2003` | Port. |\n" in table


PLAY = """
- name: Every role's argument spec over the role's own defaults
  hosts: localhost
  gather_facts: false
  roles:
%(roles)s
"""

INVENTORY = {
    "all": {
        "hosts": {
            "localhost": {
                "ansible_connection": "local",
                "carbonscale_address": "10.0.0.1",
                # The variables the roles require: no default by design.
                "carbon_instances": [
                    {"name": "a", "line_port": 2103, "pickle_port": 2104, "query_port": 7102}
                ],
                "graphite_web_secret_key": "test",
                "migrate_transport_secret": "test-secret-16-chars",
            }
        },
        "children": {
            group: {"hosts": {"localhost": None}} for group in ("storage", "relays", "lvs")
        },
    }
}


def validate_every_role(tmp_path, *extra: str) -> tuple[int, str]:
    # The validation Ansible prepends to a role is tagged always; with a tag no
    # task has, it is the only thing that runs, over the role's real defaults
    # (templated where they are Jinja), as at the start of a real run.
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(INVENTORY))
    roles = "".join(f"    - role: {role}\n" for role in sorted(role.name for role in ROLES))
    (tmp_path / "play.yml").write_text(PLAY % {"roles": roles})
    return run_playbook(
        ["-i", "hosts.yml", "--tags", "only-argument-specs", *extra, "play.yml"], cwd=tmp_path
    )


def test_every_default_passes_its_argument_spec(tmp_path):
    code, output = validate_every_role(tmp_path)
    assert code == 0, output
    for role in ROLES:
        assert f"TASK [{role.name} : Validating arguments against arg spec 'main'" in output


def test_a_value_of_the_wrong_type_is_refused(tmp_path):
    code, output = validate_every_role(tmp_path, "-e", "statsd_relay_port=eighty")
    assert code != 0
    assert "statsd_relay_port" in output, output

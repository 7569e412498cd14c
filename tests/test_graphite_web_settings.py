"""roles/graphite_web's local_settings.py as the role renders it, in both modes.

The template is Python that ruff cannot read as it stands, so what it renders
is linted here with the project's ruff rules and compiled. The addresses in it
come from the carbonscale_addresses filter (carbonscale.inventory.host_address):
carbonscale_address, else the gathered default IPv4 address, like the ring.
"""

from __future__ import annotations

import subprocess
import sys
import types
from unittest import mock

import pytest
import yaml
from ansible_runner import BIN, ROOT, run_playbook

PLAY = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: The role's defaults
      ansible.builtin.include_vars: %(root)s/roles/graphite_web/defaults/main.yml
    - name: The role's template in each mode
      ansible.builtin.include_tasks: render.yml
      loop: [local, cluster]
      loop_control:
        loop_var: mode
"""

# set_fact: include_vars (the role's defaults) outranks play and task vars.
RENDER = """
- name: Mode {{ mode }}
  ansible.builtin.set_fact:
    graphite_web_mode: "{{ mode }}"
    graphite_web_secret_key: k
- name: Render local_settings.py in mode {{ mode }}
  ansible.builtin.template:
    src: %(root)s/roles/graphite_web/templates/local_settings.py.j2
    dest: "{{ mode }}_settings.py"
    mode: "0644"
"""

INVENTORY = {
    "all": {
        "hosts": {
            "localhost": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "carbonscale_address": "10.0.0.9",
                "carbon_instances": [
                    {"name": "a", "line_port": 2103, "pickle_port": 2104, "query_port": 7102},
                    {"name": "b", "line_port": 2203, "pickle_port": 2204, "query_port": 7202},
                ],
            }
        },
        "children": {
            "storage": {
                "hosts": {
                    "s1": {"carbonscale_address": "10.0.0.31"},
                    "s2": {"carbonscale_address": "10.0.0.32", "graphite_web_port": 8081},
                    "s3": {"ansible_default_ipv4": {"address": "10.0.0.33"}},
                }
            }
        },
    }
}


def render(tmp_path, inventory: dict = INVENTORY) -> tuple[int, str]:
    """Both modes' settings into tmp_path: (exit code, output)."""
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "play.yml").write_text(PLAY % {"root": ROOT})
    (tmp_path / "render.yml").write_text(RENDER % {"root": ROOT})
    return run_playbook(["-i", "hosts.yml", "play.yml"], cwd=tmp_path)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The directory holding local_settings.py.j2 rendered in each mode."""
    tmp_path = tmp_path_factory.mktemp("graphite_web")
    code, output = render(tmp_path)
    assert code == 0, output
    return tmp_path


def settings(rendered, mode: str) -> dict:
    """The rendered settings executed, with graphite.http_pool (which cluster
    mode replaces; graphite-web is not installed on the controller) faked."""
    path = rendered / f"{mode}_settings.py"
    module: dict = {}
    graphite = types.ModuleType("graphite")
    graphite.http_pool = types.ModuleType("graphite.http_pool")
    graphite.http_pool.http = None
    fakes = {"graphite": graphite, "graphite.http_pool": graphite.http_pool}
    with mock.patch.dict(sys.modules, fakes):
        exec(compile(path.read_text(), str(path), "exec"), module)
    module["_graphite_http_pool"] = graphite.http_pool
    return module


@pytest.mark.parametrize("mode", ["local", "cluster"])
def test_rendered_settings_pass_ruff(rendered, mode):
    lint = subprocess.run(
        [BIN / "ruff", "check", "--config", ROOT / "pyproject.toml", f"{mode}_settings.py"],
        cwd=rendered,
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_local_mode_asks_this_nodes_instances_at_its_ring_address(rendered):
    local = settings(rendered, "local")
    assert local["CARBONLINK_HOSTS"] == ["10.0.0.9:7102:a", "10.0.0.9:7202:b"]
    assert local["CLUSTER_SERVERS"] == []


def test_cluster_mode_fans_out_to_every_storage_node(rendered):
    cluster = settings(rendered, "cluster")
    # s3 has no carbonscale_address: its gathered default IPv4 address.
    assert cluster["CLUSTER_SERVERS"] == ["10.0.0.31:8080", "10.0.0.32:8081", "10.0.0.33:8080"]
    assert cluster["CARBONLINK_HOSTS"] == []
    # graphite's pool, which retries a hung node three times, is replaced by
    # one that gives up at the first timeout (graphite_web_remote_http_retries: 0).
    assert cluster["_graphite_http_pool"].http.connection_pool_kw["retries"].total is False


def test_a_storage_node_without_an_address_is_named(tmp_path):
    inventory = yaml.safe_load(yaml.safe_dump(INVENTORY))
    inventory["all"]["children"]["storage"]["hosts"]["s3"] = {}
    code, output = render(tmp_path, inventory)
    assert code != 0
    assert "host s3 has no carbonscale_address" in output, output

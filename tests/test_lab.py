"""The lab's preflight: every error a new user meets before `make lab` creates
anything stops it with a message that says what to do.

scripts/lab.sh preflight (Docker possible, disk space) runs with faked
conditions: a `docker` that does not answer, an `id` that says non-root, a
PATH without dockerd or apt-get, a free-space requirement above what the disk
has. scripts/lab.py check (inventory, conflicts on this machine) runs against
a temporary inventory with its own network name and subnet, and the conflicts
are real docker networks and containers this test creates and removes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAB_SH = ROOT / "scripts" / "lab.sh"
LAB_PY = ROOT / "scripts" / "lab.py"
BASE_IMAGE = os.environ.get("CARBONSCALE_BASE_IMAGE") or "carbonscale/debian12-systemd:latest"
# A /24 no scenario or lab uses (see COORDINATION.md's subnet list).
SUBNET = "172.30.77"
# The conflict checks create docker networks on and around SUBNET and expect
# no other on it: under pytest-xdist (make unit) they all run on one worker.
pytestmark = pytest.mark.xdist_group("lab-subnet")


def fake_bin(tmp_path: Path, scripts: dict[str, str], real: tuple[str, ...]) -> Path:
    """A PATH directory with fake commands and links to the real ones named."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in scripts.items():
        path = bindir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    for name in real:
        os.symlink(shutil.which(name), bindir / name)
    return bindir


def preflight(env_extra: dict[str, str], path: str | None = None):
    env = dict(os.environ, **env_extra)
    if path is not None:
        env["PATH"] = path
    proc = subprocess.run(
        ["/bin/bash", str(LAB_SH), "preflight"], env=env, capture_output=True, text=True
    )
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())


SHELL_TOOLS = ("df", "awk", "dirname", "sed")


def test_preflight_passes_here():
    rc, out = preflight({})
    assert rc == 0, out
    assert "preflight passed" in out


def test_no_docker_and_not_root(tmp_path):
    bindir = fake_bin(tmp_path, {"docker": "exit 1", "id": "echo 1000"}, SHELL_TOOLS)
    rc, out = preflight({}, path=str(bindir))
    assert rc == 1
    assert "no Docker engine answers, and starting one needs root" in out
    assert "sudo systemctl start docker" in out


def test_no_docker_possible(tmp_path):
    # Root, but no engine answers, no dockerd to start and no apt-get to install one.
    bindir = fake_bin(tmp_path, {"docker": "exit 1", "id": "echo 0"}, SHELL_TOOLS)
    rc, out = preflight({}, path=str(bindir))
    assert rc == 1
    assert "no Docker possible here" in out
    assert "Install a Docker engine" in out


def test_root_without_docker_can_install_it(tmp_path):
    # Root with apt-get: scripts/docker-engine.sh will install docker.io; not an error.
    bindir = fake_bin(
        tmp_path, {"docker": "exit 1", "id": "echo 0", "apt-get": "exit 0"}, SHELL_TOOLS
    )
    rc, out = preflight({}, path=str(bindir))
    assert rc == 0, out


def test_not_enough_space_for_docker():
    rc, out = preflight({"CARBONSCALE_MIN_FREE_MB_DOCKER": str(10**9)})
    assert rc == 1
    docker_root = subprocess.check_output(
        ["docker", "info", "-f", "{{.DockerRootDir}}"], text=True
    ).strip()
    assert "not enough disk space for Docker's data root" in out
    assert f"{docker_root} has" in out
    assert "needs 1000000000 MiB" in out
    assert "docker system prune" in out


def test_not_enough_space_for_the_checkout():
    rc, out = preflight({"CARBONSCALE_MIN_FREE_MB_CHECKOUT": str(10**9)})
    assert rc == 1
    assert f"not enough disk space for the checkout (.venv and wheels): {ROOT} has" in out


# --- scripts/lab.py check: the inventory and what is in the lab's way -------


@pytest.fixture
def lab(tmp_path):
    """A two-host lab inventory with its own names; removes what tests create."""
    tag = uuid.uuid4().hex[:8]
    created: list[tuple[str, str]] = []

    class Lab:
        def __init__(self):
            self.network = f"cs-labtest-{tag}"
            self.containers = [f"cs-labtest-{tag}-relay1", f"cs-labtest-{tag}-storage1"]
            self.hosts = {
                "relays": {
                    "relay1": {
                        "ansible_host": self.containers[0],
                        "carbonscale_address": f"{SUBNET}.21",
                    }
                },
                "storage": {
                    "storage1": {
                        "ansible_host": self.containers[1],
                        "carbonscale_address": f"{SUBNET}.31",
                    }
                },
            }

        def write(self) -> Path:
            children = {group: {"hosts": hosts} for group, hosts in self.hosts.items()}
            children["storage"]["vars"] = {
                "carbon_instances": [
                    {"name": "a", "line_port": 2103, "pickle_port": 2104, "query_port": 7102}
                ]
            }
            inv = tmp_path / "inventory"
            inv.mkdir(exist_ok=True)
            (inv / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": children}}))
            return inv

        def docker(self, kind: str, *args: str) -> None:
            proc = subprocess.run(["docker", *args], capture_output=True, text=True)
            assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
            created.append(
                (kind, args[-1] if kind == "network" else args[args.index("--name") + 1])
            )

        def check(self, path_prefix: str | None = None):
            env = dict(
                os.environ,
                CARBONSCALE_LAB_INVENTORY=str(self.write()),
                CARBONSCALE_LAB_NETWORK=self.network,
            )
            if path_prefix:
                env["PATH"] = f"{path_prefix}:{env['PATH']}"
            proc = subprocess.run(
                [sys.executable, str(LAB_PY), "check"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            return proc.returncode, " ".join((proc.stdout + proc.stderr).split())

    yield Lab()
    # Each one gone before the next test, which may need its subnet or name.
    for kind, name in reversed(created):
        command = (
            ["docker", "rm", "-f", name]
            if kind == "container"
            else ["docker", "network", "rm", name]
        )
        for _ in range(5):
            if subprocess.run(command, capture_output=True).returncode == 0:
                break
            if subprocess.run(["docker", kind, "inspect", name], capture_output=True).returncode:
                break  # already gone
            time.sleep(1)


def test_check_passes_on_a_free_subnet(lab):
    rc, out = lab.check()
    assert rc == 0, out
    assert f"nothing in the way of {lab.network} ({SUBNET}.0/24)" in out


def test_another_network_on_the_lab_subnet(lab):
    other = f"{lab.network}-other"
    lab.docker("network", "network", "create", "--subnet", f"{SUBNET}.0/24", other)
    rc, out = lab.check()
    assert rc == 1
    assert (
        f"docker network {other} uses {SUBNET}.0/24, which overlaps the lab's {SUBNET}.0/24" in out
    )
    assert f"docker network rm {other}" in out
    assert "changing the addresses in" in out


def test_a_wider_network_overlapping_the_lab_subnet(lab):
    other = f"{lab.network}-wide"
    # 172.30.76.0/23 holds 172.30.77.0/24.
    lab.docker("network", "network", "create", "--subnet", "172.30.76.0/23", other)
    rc, out = lab.check()
    assert rc == 1
    assert f"docker network {other} uses 172.30.76.0/23, which overlaps" in out


def test_a_network_with_the_lab_name_not_made_by_the_lab(lab):
    lab.docker("network", "network", "create", "--subnet", f"{SUBNET}.0/24", lab.network)
    rc, out = lab.check()
    assert rc == 1
    assert f"a docker network named {lab.network} exists that the lab did not create" in out


def test_the_lab_network_on_another_subnet(lab):
    lab.docker(
        "network",
        "network",
        "create",
        "--label",
        "owner=carbonscale-lab",
        "--subnet",
        "172.30.78.0/24",
        lab.network,
    )
    rc, out = lab.check()
    assert rc == 1
    assert f"the lab's network {lab.network} has 172.30.78.0/24" in out
    assert "make lab-destroy" in out


def test_a_container_with_a_lab_host_name_not_made_by_the_lab(lab):
    name = lab.containers[1]
    lab.docker("container", "create", "--name", name, BASE_IMAGE)
    rc, out = lab.check()
    assert rc == 1
    assert f"a container named {name} exists that the lab did not create" in out
    assert f"docker rm -f {name}" in out


def test_a_route_of_this_machine_into_the_lab_subnet(lab, tmp_path):
    # A VPN route, faked: this test must not change the machine's routes.
    routes = [{"dst": "default", "dev": "eth0"}, {"dst": f"{SUBNET}.0/24", "dev": "tun0"}]
    bindir = fake_bin(tmp_path, {"ip": f"echo '{json.dumps(routes)}'"}, ())
    rc, out = lab.check(path_prefix=str(bindir))
    assert rc == 1
    assert f"this machine routes {SUBNET}.0/24 through tun0" in out


def test_hosts_on_two_subnets(lab):
    lab.hosts["storage"]["storage1"]["carbonscale_address"] = "172.30.79.31"
    rc, out = lab.check()
    assert rc == 1
    assert "the lab's hosts must share one /24" in out
    assert f"{SUBNET}.0/24, 172.30.79.0/24" in out


def test_the_gateway_address(lab):
    lab.hosts["relays"]["relay1"]["carbonscale_address"] = f"{SUBNET}.1"
    rc, out = lab.check()
    assert rc == 1
    assert f"relay1: {SUBNET}.1 is the network, gateway (.1) or broadcast address" in out


def test_a_host_without_a_container_name(lab):
    del lab.hosts["relays"]["relay1"]["ansible_host"]
    rc, out = lab.check()
    assert rc == 1
    assert "relay1 has no ansible_host" in out

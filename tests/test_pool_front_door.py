"""The pool never closes the front door (issue 19, item 2).

Two relays of one service are real TCP listeners on 127.0.0.1 and 127.0.0.2
(the same port, as the relays share one), stopped and started as a restart
would; the damping runs with real checks against them, the clock is passed in
so half-lives take no wall time.
"""

import json
import multiprocessing
import socket
import subprocess
import sys
import time

import pytest
import yaml
from ansible_runner import BIN, ROOT, role_vars_task, run_playbook
from test_health_cli import Listener

from carbonscale import CarbonscaleError
from carbonscale.flap import FlapDamper, PlannedRestarts
from carbonscale.health import damped_check
from carbonscale.lvs_pool import Pool

CLI = [sys.executable, "-m", "carbonscale", "health"]
HOSTS = ("127.0.0.1", "127.0.0.2")


def _shared_port() -> int:
    """A port free on both loopback addresses."""
    for _ in range(50):
        probe = socket.socket()
        probe.bind((HOSTS[0], 0))
        port = probe.getsockname()[1]
        other = socket.socket()
        try:
            other.bind((HOSTS[1], port))
            return port
        except OSError:
            continue
        finally:
            probe.close()
            other.close()
    raise RuntimeError("no port free on both loopback addresses")


@pytest.fixture
def relays():
    port = _shared_port()
    listeners = [Listener(host, port) for host in HOSTS]
    yield listeners
    for listener in listeners:
        if listener.sock.fileno() != -1:
            listener.close()


def line_pool(tmp_path, port) -> Pool:
    raw = {
        "services": [
            {
                "name": "line",
                "protocol": "TCP",
                "port": 2003,
                "check": "tcp",
                "check_port": port,
                "servers": [{"address": host} for host in HOSTS],
            }
        ],
        "upstreams": str(tmp_path / "upstreams.conf"),
        "state": str(tmp_path / "pool-flap.json"),
        "flap": {"half_life": 60, "reuse_limit": 10, "suppress_limit": 25, "penalty": 10},
        "test": ["true"],
        "reload": ["true"],
    }
    return Pool.from_dict(raw, source="pool.json")


def in_pool(text: str) -> list[str]:
    """The servers nginx would send to (not marked down)."""
    return [
        line.split()[1].rsplit(":", 1)[0]
        for line in text.splitlines()
        if line.strip().startswith("server ") and not line.endswith(" down;")
    ]


def restart_each_twice(pool, relays, plan=None):
    """Each relay restarted twice within 20 s, one after the other, with a
    check round every 2 s (the role's check interval). Returns the servers in
    the pool after every round."""
    rounds = []
    now = 0.0
    applied = pool.step(now=now)
    rounds.append(in_pool(applied))
    for relay in relays:
        for _ in range(2):
            if plan:
                plan(relay.host, now)
            relay.close()
            now += 2
            applied = pool.step(now=now, applied=applied)
            rounds.append(in_pool(applied))
            relay.open()
            now += 2
            applied = pool.step(now=now, applied=applied)
            rounds.append(in_pool(applied))
    return rounds, applied


def test_two_restarts_of_each_relay_never_close_the_line_port(tmp_path, relays):
    pool = line_pool(tmp_path, relays[0].port)
    rounds, applied = restart_each_twice(pool, relays)
    # Every round had a server in the pool: the port never closed.
    assert all(rounds), rounds
    # Both relays are up now and both flapped four times within 16 s: both
    # are suppressed, and the one with the lower penalty (the first, whose
    # flaps are older) stays in as the last resort.
    state = json.loads((tmp_path / "pool-flap.json").read_text())
    keys = [f"tcp/{host}:{relays[0].port}" for host in HOSTS]
    assert all(state[k]["suppressed"] and state[k]["up"] for k in keys), state
    assert state[keys[0]]["penalty"] < state[keys[1]]["penalty"]
    assert in_pool(applied) == ["127.0.0.1"]
    # While the second relay restarted, the first (suppressed, up) served alone.
    assert rounds[-2] == ["127.0.0.1"]


def test_a_down_relay_is_never_the_last_resort(tmp_path, relays):
    pool = line_pool(tmp_path, relays[0].port)
    _, applied = restart_each_twice(pool, relays)
    relays[0].close()
    applied = pool.step(now=100.0, applied=applied)
    # The first is down: the suppressed second is the only one up.
    assert in_pool(applied) == ["127.0.0.2"]
    relays[1].close()
    applied = pool.step(now=102.0, applied=applied)
    assert in_pool(applied) == []


def test_planned_restarts_are_no_flaps(tmp_path, relays):
    pool = line_pool(tmp_path, relays[0].port)
    planned = PlannedRestarts(str(tmp_path))

    def plan(host, now):
        planned.mark(host, 30, now)

    rounds, applied = restart_each_twice(pool, relays, plan)
    state = json.loads((tmp_path / "pool-flap.json").read_text())
    assert [s["penalty"] for s in state.values()] == [0.0, 0.0]
    assert not any(s["suppressed"] for s in state.values())
    # Out only while actually down, back in on the next round.
    assert in_pool(applied) == list(HOSTS)
    assert rounds[1] == ["127.0.0.2"] and rounds[2] == list(HOSTS)


def test_flaps_after_the_planned_window_count(tmp_path, relays):
    pool = line_pool(tmp_path, relays[0].port)
    PlannedRestarts(str(tmp_path)).mark("127.0.0.1", 10, 0.0)
    applied = pool.step(now=0.0)
    relays[0].close()
    applied = pool.step(now=5.0, applied=applied)  # inside the window
    relays[0].open()
    applied = pool.step(now=12.0, applied=applied)  # after it: an event
    state = json.loads((tmp_path / "pool-flap.json").read_text())
    assert state[f"tcp/127.0.0.1:{relays[0].port}"]["penalty"] == 10.0


def test_cli_planned_then_damped_checks(tmp_path, relays):
    port = str(relays[0].port)
    state = str(tmp_path / "flap.json")
    check = [*CLI, "tcp", "127.0.0.1", port, "--state", state]
    marked = subprocess.run(
        [*CLI, "planned", "127.0.0.1", "--seconds", "60", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert marked.returncode == 0, marked.stderr
    assert marked.stdout.startswith("127.0.0.1: restart planned until ")
    assert (tmp_path / "planned.json").stat().st_mode & 0o777 == 0o644
    assert subprocess.run(check).returncode == 0
    for _ in range(3):  # three restarts, six changes: 60 penalty if they counted
        relays[0].close()
        assert subprocess.run(check, capture_output=True).returncode == 1
        relays[0].open()
        assert subprocess.run(check, capture_output=True).returncode == 0
    assert json.loads((tmp_path / "flap.json").read_text())[f"tcp/127.0.0.1:{port}"][
        "penalty"
    ] == pytest.approx(0.0)
    ended = subprocess.run(
        [*CLI, "planned", "127.0.0.1", "--seconds", "0", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert ended.stdout == "127.0.0.1: no restart planned\n"
    assert json.loads((tmp_path / "planned.json").read_text()) == {}
    bad = subprocess.run(
        [*CLI, "planned", "x", "--seconds", "-1", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr == "carbonscale: error: a planned restart lasts 0-86400 seconds, got -1\n"


def test_stale_peers_do_not_count(tmp_path, relays):
    # A server checked long ago (removed from the config, say) says nothing
    # about the service now: the suppressed server is its last resort.
    damper = FlapDamper()
    state = str(tmp_path / "flap.json")
    port = relays[0].port
    assert damped_check("tcp", "127.0.0.2", port, damper, state, now=0.0).usable
    for t, up in enumerate([True, False, True, False, True]):
        (relays[0].open if up else relays[0].close)() if t else None
        result = damped_check("tcp", "127.0.0.1", port, damper, state, now=float(t))
    assert result.up and not result.usable  # the peer, checked at 0, is fresh
    later = damped_check("tcp", "127.0.0.1", port, damper, state, now=40.0)
    assert later.usable and later.last_resort  # the peer is 40 s old


def _mark(directory, host):
    for i in range(30):
        PlannedRestarts(directory).mark(f"{host}-{i}", 60, 0.0)


def test_concurrent_marks_are_all_kept(tmp_path):
    workers = [
        multiprocessing.Process(target=_mark, args=(str(tmp_path), f"relay{n}")) for n in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(PlannedRestarts(str(tmp_path)).active(1.0)) == 120


def test_damaged_planned_file_plans_nothing(tmp_path):
    (tmp_path / "planned.json").write_text("[1, 2")
    assert PlannedRestarts(str(tmp_path)).active(0.0) == set()
    with pytest.raises(CarbonscaleError, match="0-86400 seconds"):
        PlannedRestarts(str(tmp_path)).mark("h", 1e9, 0.0)


HANDLER_PLAY = """
- hosts: relay1
  gather_facts: false
  tasks:
%(role_vars)s    - name: The handler's task, as the role would run it on notify
      ansible.builtin.include_tasks: %(tasks)s
"""


def test_relay_role_handler_marks_the_relay_planned_on_every_director(tmp_path):
    # The role's first handler (its `listen` dropped: a task has none), run
    # for relay1 and delegated to two directors: both local here, each with
    # its own state directory.
    handlers = yaml.safe_load((ROOT / "roles/carbon_relay/handlers/main.yml").read_text())
    planned = handlers[0]
    # Every handler runs on the one notify, the directors' mark first.
    assert {handler["listen"] for handler in handlers} == {"Restart carbon-c-relay"}
    assert "relay" in handlers[-1]["ansible.builtin.command"]["argv"]
    del planned["listen"]
    (tmp_path / "tasks.yml").write_text(yaml.safe_dump([planned]))
    (tmp_path / "play.yml").write_text(
        HANDLER_PLAY
        % {"role_vars": role_vars_task("carbon_relay"), "tasks": tmp_path / "tasks.yml"}
    )
    venv = BIN.parent
    (tmp_path / "hosts.yml").write_text(
        yaml.safe_dump(
            {
                "all": {
                    "vars": {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                        "carbonscale_venv": str(venv),
                    },
                    "children": {
                        "relays": {"hosts": {"relay1": {"carbonscale_address": "10.0.0.21"}}},
                        "lvs": {
                            "hosts": {
                                f"director{n}": {"state_dir": str(tmp_path / f"d{n}")}
                                for n in (1, 2)
                            }
                        },
                    },
                }
            }
        )
    )
    # Each director's own state directory: the handler names the role's
    # variable, set here per director through hostvars of the delegated host.
    code, output = run_playbook(
        [
            "-i",
            str(tmp_path / "hosts.yml"),
            str(tmp_path / "play.yml"),
            "-e",
            "carbon_relay_lvs_state_dir={{ hostvars[item].state_dir }}",
        ]
    )
    assert code == 0, output
    for n in (1, 2):
        marks = PlannedRestarts(str(tmp_path / f"d{n}")).load()
        assert list(marks) == ["10.0.0.21"]
        assert 50 < marks["10.0.0.21"] - time.time() <= 60

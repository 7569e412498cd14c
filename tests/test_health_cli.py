"""`carbonscale health` and the userspace pool, against real sockets and the real CLI."""

import json
import math
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from carbonscale import CarbonscaleError
from carbonscale.flap import FlapDamper
from carbonscale.health import damped_check
from carbonscale.lvs_pool import Pool

CLI = [sys.executable, "-m", "carbonscale"]


class Listener:
    """A TCP listener that can be closed and reopened on the same port."""

    def __init__(self, host="127.0.0.1", port=None):
        self.sock = None
        self.host = host
        self.port = port
        self.open()

    def open(self):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port or 0))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        self.sock = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock):
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()

    def close(self):
        # shutdown() first: close() alone leaves the socket listening while the
        # accept thread is blocked in accept() on it.
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def run_cli(*args):
    return subprocess.run([*CLI, "health", *args], capture_output=True, text=True, check=False)


def test_cli_check_exit_codes(tmp_path):
    listener = Listener()
    state = str(tmp_path / "flap.json")
    up = run_cli("tcp", "127.0.0.1", str(listener.port), "--state", state)
    assert (up.returncode, up.stdout.strip()) == (0, f"tcp 127.0.0.1:{listener.port} up")
    listener.close()
    down = run_cli("tcp", "127.0.0.1", str(listener.port), "--state", state)
    assert down.returncode == 1
    assert "down" in down.stdout


def test_cli_flapping_server_stays_out_while_up(tmp_path):
    # Two servers of one service (same check, same port): the steady one on
    # 127.0.0.2 keeps the service usable, so the flapping one may stay out.
    listener = Listener()
    steady = Listener("127.0.0.2", listener.port)
    state = str(tmp_path / "flap.json")
    args = ("tcp", "127.0.0.1", str(listener.port), "--state", state)
    assert run_cli("tcp", "127.0.0.2", str(listener.port), "--state", state).returncode == 0
    assert run_cli(*args).returncode == 0
    # down, up, down, up: four changes within a second, penalty ~40 > 25.
    for _ in range(2):
        listener.close()
        assert run_cli(*args).returncode == 1
        listener.open()
        last = run_cli(*args)
    assert last.returncode == 1, last.stdout
    assert "suppressed for flapping" in last.stdout
    saved = json.loads(Path(state).read_text())[f"tcp/127.0.0.1:{listener.port}"]
    assert saved["suppressed"] is True and saved["up"] is True
    # Undamped (no --state), the same server is simply up.
    assert run_cli("tcp", "127.0.0.1", str(listener.port)).returncode == 0
    # The steady server stops: the suppressed one is the service's last
    # server that is up, and damping never takes that one out.
    steady.close()
    assert run_cli("tcp", "127.0.0.2", str(listener.port), "--state", state).returncode == 1
    kept = run_cli(*args)
    assert kept.returncode == 0, kept.stdout
    assert "but kept: no other server of this service is usable" in kept.stdout


def test_cli_bad_input_exits_2(tmp_path):
    bad = run_cli("tcp", "127.0.0.1", "1", "--half-life", "0")
    assert bad.returncode == 2
    assert bad.stderr.startswith("carbonscale: error: flap half-life must be positive")
    config = tmp_path / "pool.json"
    config.write_text("{nope")
    bad = run_cli("pool", str(config))
    assert bad.returncode == 2 and "is not JSON" in bad.stderr


def test_damped_check_releases_when_the_formula_says(tmp_path):
    listener = Listener()
    damper = FlapDamper(half_life=60.0, reuse_limit=10.0, suppress_limit=25.0, penalty=10.0)
    state = str(tmp_path / "flap.json")
    # A steady second server of the service, checked once, counts for the
    # whole test: without one the suppressed server would be its last resort.
    partner = Listener("127.0.0.2", listener.port)
    age = {"peer_max_age": 1e9}
    assert damped_check("tcp", "127.0.0.2", listener.port, damper, state, now=0.0, **age).usable
    times = iter(range(100))
    check = lambda: damped_check(  # noqa: E731
        "tcp", "127.0.0.1", listener.port, damper, state, now=float(next(times)), **age
    )
    assert check().usable
    listener.close()
    assert not check().usable
    listener.open()
    check()
    listener.close()
    check()
    listener.open()
    result = check()  # t=4, four changes at t=1..4
    assert result.up and not result.usable
    peak = sum(10.0 * 2 ** (-(4 - t) / 60) for t in (1, 2, 3, 4))
    assert result.state.penalty == pytest.approx(peak)
    release = 4 + 60 * math.log2(peak / 10)
    assert result.release == pytest.approx(release)
    at = lambda now: damped_check(  # noqa: E731
        "tcp", "127.0.0.1", listener.port, damper, state, now=now, **age
    )
    assert not at(release - 0.01).usable
    assert at(release + 0.01).usable
    partner.close()


def pool_config(tmp_path, ports, **extra):
    services = [
        {
            "name": "line",
            "protocol": "TCP",
            "port": 2003,
            "scheduler": "wlc",
            "check": "tcp",
            "check_port": ports[0],
            "servers": [{"address": "127.0.0.1"}],
        },
        {
            "name": "statsd",
            "protocol": "UDP",
            "port": 8125,
            "scheduler": "rr",
            "check": "tcp",
            "check_port": ports[1],
            "servers": [{"address": "127.0.0.1", "weight": 3}],
        },
    ]
    raw = {
        "services": services,
        "upstreams": str(tmp_path / "upstreams.conf"),
        "state": str(tmp_path / "flap.json"),
        "flap": {"half_life": 60},
        "test": ["true"],
        "reload": ["true"],
        **extra,
    }
    return Pool.from_dict(raw, source="pool.json")


def test_pool_marks_failed_servers_down(tmp_path):
    alive, dead = Listener(), Listener()
    dead.close()
    pool = pool_config(tmp_path, [alive.port, dead.port])
    assert pool.init() is True
    assert " down;" not in pool.current()
    assert pool.init() is False
    applied = pool.step(now=0.0)
    text = (tmp_path / "upstreams.conf").read_text()
    assert applied == text
    assert (
        "upstream carbonscale_line {\n    least_conn;\n    server 127.0.0.1:2003 weight=1;\n}"
        in text
    )
    assert "upstream carbonscale_statsd {\n    server 127.0.0.1:8125 weight=3 down;\n}" in text


def test_pool_keeps_old_upstreams_when_nginx_refuses(tmp_path):
    alive, dead = Listener(), Listener()
    dead.close()
    pool = pool_config(tmp_path, [alive.port, dead.port], test=["false"])
    pool.init()
    before = pool.current()
    assert pool.step(now=0.0) is None
    assert pool.current() == before


def test_pool_flapping_server_stays_out_until_release(tmp_path):
    steady, flappy = Listener(), Listener()
    # The statsd service's second server, on the same check port, keeps the
    # service usable while the first one is suppressed.
    partner = Listener("127.0.0.2", flappy.port)
    pool = pool_config(tmp_path, [steady.port, flappy.port])
    pool.services[1].servers.append(("127.0.0.2", 1))
    key = f"tcp/127.0.0.1:{flappy.port}"
    applied = pool.step(now=0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        (flappy.close if t % 2 else flappy.open)()
        applied = pool.step(now=t, applied=applied)
    assert "127.0.0.1:8125 weight=3 down" in applied  # up again, but suppressed
    assert "127.0.0.2:8125 weight=1;" in applied
    with open(pool.state_path) as handle:
        state = json.load(handle)[key]
    release = 4.0 + 60 * math.log2(state["penalty"] / 10)
    assert "8125 weight=3 down" in pool.step(now=release - 0.01, applied=applied)
    assert "8125 weight=3;" in pool.step(now=release + 0.01, applied=applied)
    partner.close()


def test_pool_refuses_unknown_scheduler(tmp_path):
    raw = {
        "services": [
            {"name": "x", "protocol": "TCP", "port": 1, "scheduler": "fastest", "servers": []}
        ],
        "upstreams": "u",
        "state": "s",
    }
    with pytest.raises(CarbonscaleError, match="unknown scheduler 'fastest'"):
        Pool.from_dict(raw, source="pool.json")


def test_pool_init_rewrites_only_when_the_servers_change(tmp_path):
    alive, dead = Listener(), Listener()
    dead.close()
    pool = pool_config(tmp_path, [alive.port, dead.port])
    pool.init()
    pool.step(now=0.0)
    checked = pool.current()
    assert "weight=3 down;" in checked
    # Same servers: the checked file (with its down marks) is kept.
    assert pool.init() is False and pool.current() == checked
    # A server added: written again, every server in until the next check.
    pool.services[1].servers.append(("127.0.0.2", 1))
    assert pool.init() is True
    assert "server 127.0.0.2:8125 weight=1;" in pool.current()
    assert " down;" not in pool.current()


def test_pool_default_scheduler_is_keepaliveds(tmp_path):
    # keepalived's virtual_server and the userspace pool balance a service
    # that names no scheduler the same way: wlc, least connections in nginx.
    raw = {
        "services": [{"name": "x", "protocol": "TCP", "port": 1, "servers": [{"address": "a"}]}],
        "upstreams": str(tmp_path / "u"),
        "state": str(tmp_path / "s"),
    }
    pool = Pool.from_dict(raw, source="pool.json")
    assert pool.services[0].scheduler == "wlc"
    assert "upstream carbonscale_x {\n    least_conn;\n" in pool.render(None)

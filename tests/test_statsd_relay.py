"""The statsd relay: StatsRelay's placement, rerouting, flap damping, the daemon.

References: StatsRelay's own test vectors (jjneely/statsrelay jump_test.go),
carbon-c-relay's `-t` output for the order of jump replicas (the second
choice of a held-out backend), and the relay process itself with UDP sinks
and admin ports standing in for statsd daemons.
"""

from __future__ import annotations

import collections
import random
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from carbonscale import CarbonscaleError
from carbonscale.flap import FlapDamper
from carbonscale.inventory import backends_from_inventory
from carbonscale.relay import statsd, udpio
from carbonscale.relay.statsd import (
    Backend,
    HealthChecker,
    SharedState,
    Worker,
    choices,
    parse_backend,
    parse_backends,
    place,
    primary,
    refused_samples,
)
from carbonscale.ring import fnv1a_64

# ---------------------------------------------------------------- placement

# jjneely/statsrelay jump_test.go: 45 nodes, added without instance (so in
# the given order), and where three names must land.
STATSRELAY_NODES = [f"graphite0{i:02d}-g5" for i in range(10, 19)] + [
    f"graphite-data0{i:02d}-g5" for i in range(19, 55)
]
STATSRELAY_PLACEMENT = {
    b"foobar": "graphite-data043-g5",
    b"suebob.foo.honey.i.shrunk.the.kids": "graphite-data048-g5",
    b"5min.prod.dc06.graphite-web006-g6.kernel.net.netfilter.nf_conntrack_max": "graphite014-g5",
}
STATSRELAY_FNV = {
    b"foobar": 0x85944171F73967E8,
    b"changed": 0xDF38879AF614707B,
    b"5min.prod.dc06.graphite-web006-g6.kernel.net.netfilter.nf_conntrack_max": (
        0xDB7B58EF171EEE9F
    ),
}


def test_fnv1a_64_matches_statsrelay_vectors():
    for name, expected in STATSRELAY_FNV.items():
        assert fnv1a_64(name) == expected


def test_placement_matches_statsrelay_vectors():
    assert len(STATSRELAY_NODES) == 45
    for name, node in STATSRELAY_PLACEMENT.items():
        assert STATSRELAY_NODES[primary(name, len(STATSRELAY_NODES))] == node


def _random_names(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_-"
    names = set()
    while len(names) < count:
        parts = [
            "".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 6))
        ]
        names.add(".".join(parts).encode())
    return sorted(names)


def _carbon_c_relay_replicas(names: list[bytes], count: int, tmp_path) -> dict[bytes, list[int]]:
    """Every jump replica of each name, in order, from carbon-c-relay -t."""
    ports = [9001 + i for i in range(count)]
    conf = tmp_path / f"jump{count}.conf"
    members = "\n".join(f"        127.0.0.1:{p}" for p in ports)
    conf.write_text(
        f"cluster statsd\n    jump_fnv1a_ch replication {count}\n{members}\n    ;\n"
        "match * send to statsd stop;\n"
    )
    feed = b"".join(name + b" 1 1\n" for name in names)
    out = subprocess.run(
        ["carbon-c-relay", "-t", "-f", str(conf)], input=feed, capture_output=True, check=True
    ).stdout.decode()
    replicas: dict[bytes, list[int]] = {}
    current = None
    for line in out.splitlines():
        text = line.strip()
        if text.startswith("* -> "):
            current = replicas.setdefault(text[5:].encode(), [])
        elif current is not None and text.startswith("127.0.0.1:"):
            current.append(ports.index(int(text.split(":")[1])))
    return replicas


@pytest.mark.skipif(not shutil.which("carbon-c-relay"), reason="carbon-c-relay not installed")
@pytest.mark.parametrize("count", [2, 3, 5, 8, 13])
def test_preference_order_is_carbon_c_relays_jump_replica_order(count, tmp_path):
    names = _random_names(2000, seed=count)
    replicas = _carbon_c_relay_replicas(names, count, tmp_path)
    assert len(replicas) == len(names)
    for name in names:
        assert list(choices(fnv1a_64(name), count)) == replicas[name], name


def test_rerouting_moves_only_the_held_out_backends_metrics():
    names = _random_names(20000, seed=7)
    count = 6
    everyone = [True] * count
    before = {name: place(name, everyone) for name in names}
    assert all(before[name] == primary(name, count) for name in names)
    for out in ([2], [0, 5], [1, 2, 3]):
        usable = [i not in out for i in range(count)]
        moved_to = collections.Counter()
        for name in names:
            after = place(name, usable)
            if before[name] in out:
                assert after not in out
                # The first usable backend in carbon-c-relay's replica order.
                order = list(choices(fnv1a_64(name), count))
                assert after == next(i for i in order if usable[i])
                moved_to[after] += 1
            else:
                assert after == before[name], "a metric of a healthy backend moved"
        # The held-out share spreads over every remaining backend.
        assert set(moved_to) == {i for i in range(count) if usable[i]}
    assert place(b"x", [False] * count) is None


# ---------------------------------------------------------------- parsing


def test_backend_specs():
    assert parse_backend("10.0.0.1:8127:8128") == Backend("10.0.0.1", 8127, 8128)
    assert parse_backend("statsd-a:8127") == Backend("statsd-a", 8127, None)
    assert parse_backend("[::1]:8127:8128") == Backend("::1", 8127, 8128)
    assert parse_backend("[::1]:8127:8128").spec == "[::1]:8127:8128"
    for bad in ("", "host", "host:0", "host:70000", "host:1:2:3", ":8125", "[::1]8125", "a b:1"):
        with pytest.raises(CarbonscaleError):
            parse_backend(bad)
    with pytest.raises(CarbonscaleError, match="listed twice"):
        parse_backends(["a:1:2", "b:1", "a:1:3"])
    with pytest.raises(CarbonscaleError, match="at least one"):
        parse_backends([])


def test_backends_from_inventory_order():
    hostvars = {
        "relay1": {
            "carbonscale_address": "10.0.0.21",
            "statsd_instances": [
                {"name": "a", "port": 8127, "admin_port": 8128},
                {"name": "b", "port": 8129, "admin_port": 8130},
            ],
        },
        "relay2": {"carbonscale_address": "10.0.0.22"},
    }
    default = [{"name": "a", "port": 8127, "admin_port": 8128}]
    assert backends_from_inventory(["relay1", "relay2"], hostvars, default) == [
        "10.0.0.21:8127:8128",
        "10.0.0.21:8129:8130",
        "10.0.0.22:8127:8128",
    ]
    with pytest.raises(CarbonscaleError, match="statsd_instances"):
        backends_from_inventory(["relay2"], hostvars)
    with pytest.raises(CarbonscaleError, match="carbonscale_address"):
        backends_from_inventory(["relay3"], {"relay3": {}}, default)
    with pytest.raises(CarbonscaleError, match="integer port"):
        backends_from_inventory(["relay1"], {"relay1": {"carbonscale_address": "h"}}, [{}])


def test_cli_rejects_bad_input_with_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "carbonscale", "relay", "statsd", "h:1", "h:1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("carbonscale: error: statsd backend h:1 is listed twice")
    args = tmp_path / "relay.args"
    args.write_text("10.0.0.1:8127:8128\n10.0.0.2:8127:8128\n--packet-size\n1400\n")
    run = subprocess.run(
        [sys.executable, "-m", "carbonscale", "relay", "statsd", f"@{args}", "--check-config"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout == "0 10.0.0.1:8127:8128\n1 10.0.0.2:8127:8128\n"
    run = subprocess.run(
        [sys.executable, "-m", "carbonscale", "relay", "statsd", f"@{args}", "--locate", "foobar"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout == f"foobar 10.0.0.{primary(b'foobar', 2) + 1}:8127:8128\n"


# ---------------------------------------------------------------- batched I/O


def _udp_pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return rx, tx


@pytest.mark.skipif(not udpio.HAVE_C, reason="the _statsd extension is not built")
def test_c_and_python_batched_io_agree():
    rx, tx = _udp_pair()
    with rx, tx:
        datagrams = [b"a:1|c", b"", b"b:2|c\nc:3|c", b"x" * 65000, b"\n\n"]
        for recv_many, send_many in (
            (udpio._recv_many_c, udpio._send_many_c),
            (udpio.recv_many_py, udpio.send_many_py),
        ):
            assert recv_many(rx.fileno(), 8) == (0, b"")
            assert send_many(tx.fileno(), datagrams) == len(datagrams)
            time.sleep(0.05)
            count, data = recv_many(rx.fileno(), 3)
            count2, data2 = recv_many(rx.fileno(), 8)
            assert (count, count2) == (3, 2)
            assert data + data2 == b"".join(d + b"\n" for d in datagrams)
            with pytest.raises(TypeError):
                send_many(tx.fileno(), ["text"])
            with pytest.raises(ValueError):
                recv_many(rx.fileno(), 0)


@pytest.mark.skipif(statsd.route is statsd.route_py, reason="the _statsd extension is not built")
def test_c_and_python_routing_agree():
    datagrams = _fuzz_datagrams(3000, seed=99)
    data = b"".join(d + b"\n" for d in datagrams)
    rng = random.Random(5)
    count = 5
    names = {line.split(b":", 1)[0] for d in datagrams for line in d.split(b"\n") if b":" in line}
    # Half the names cached, some of them with a second choice.
    first = {n: primary(n, count) for n in names if rng.random() < 0.5}
    second = {n: rng.randrange(2 * count + 1) for n in first if rng.random() < 0.5}
    usable = bytes([1, 0, 1, 1, 0])
    results = []
    for route in (statsd.route, statsd.route_py):
        pending = [[] for _ in range(2 * count + 1)]
        metrics, malformed, refused, misses = route(data, first, usable, second, pending)
        results.append((metrics, malformed, refused, misses, pending))
    assert results[0] == results[1]
    metrics, malformed, refused, misses, pending = results[0]
    assert metrics > 10000 and malformed > 1000 and refused > 100 and misses and all(pending)
    with pytest.raises(ValueError):
        statsd.route(data, first, usable, second, [[]])
    with pytest.raises(ValueError):
        statsd.route(b"a:1|c", {b"a": 7}, usable, second, pending)


# ---------------------------------------------------------------- the worker


class _Sinks:
    """UDP sockets standing in for statsd daemons: a thread keeps every datagram."""

    def __init__(self, count: int) -> None:
        self.socks = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.socks.append(sock)
        self.datagrams: list[list[bytes]] = [[] for _ in range(count)]
        self.last_arrival = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for s in self.socks]

    def _collect(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self.socks, [], [], 0.05)
            for sock in ready:
                index = self.socks.index(sock)
                while True:
                    try:
                        datagram = sock.recv(65536)
                    except BlockingIOError:
                        break
                    self.datagrams[index].append(datagram)
                    self.last_arrival = time.monotonic()

    def drain(self, quiet: float = 0.3) -> None:
        """Return once nothing arrived for `quiet` seconds (from now at least)."""
        start = time.monotonic()
        while time.monotonic() - max(self.last_arrival, start) < quiet:
            time.sleep(0.02)

    def wait_lines(self, count: int, timeout: float = 30.0) -> None:
        """Wait for `count` metric lines in all, then for stragglers beyond them."""
        _wait_for(lambda: sum(len(self.lines(i)) for i in range(len(self.socks))) >= count, timeout)
        self.drain()

    def lines(self, index: int) -> list[bytes]:
        return [line for d in self.datagrams[index] for line in d.split(b"\n") if line]

    def clear(self) -> None:
        self.datagrams = [[] for _ in self.socks]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.socks:
            sock.close()


def _worker(sinks: _Sinks, packet_size: int = 1400) -> Worker:
    backends = [Backend("127.0.0.1", port) for port in sinks.ports]
    state = SharedState(len(backends), 1)
    inbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return Worker(backends, state, 0, inbound, packet_size=packet_size, cache_size=100)


def test_worker_routes_batches_and_counts():
    sinks = _Sinks(4)
    worker = _worker(sinks, packet_size=200)
    names = _random_names(500, seed=3)
    lines = [name + b":%d|c" % i for i, name in enumerate(names)]
    long_line = b"long." + b"x" * 300 + b":1|c"
    data = b"\n".join(lines[:250]) + b"\n\n" + b"\n".join(lines[250:]) + b"\n" + long_line + b"\n"
    data += b"no-colon|c\n:1|c\nnopipe:1\n"
    worker.handle(3, data)
    worker.flush()
    worker.publish()
    try:
        sinks.wait_lines(501)
        for index in range(4):
            for datagram in sinks.datagrams[index]:
                assert len(datagram) <= 200 or datagram == long_line
            for line in sinks.lines(index):
                assert primary(line.split(b":", 1)[0], 4) == index
        received = sorted(line for i in range(4) for line in sinks.lines(i))
        assert received == sorted([*lines, long_line])
        counters = worker.counters
        assert counters[statsd.C_DATAGRAMS] == 3
        assert counters[statsd.C_METRICS] == 504
        assert counters[statsd.C_MALFORMED] == 3
        assert counters[statsd.C_FORWARDED] == 501
        assert sum(worker.forwarded) == 501
        # The cache is bounded: 501 names through a 100-entry cache.
        assert len(worker.first) <= 100
    finally:
        sinks.close()


def test_worker_reroutes_after_a_health_change_and_counts_it():
    sinks = _Sinks(3)
    worker = _worker(sinks)
    names = _random_names(3000, seed=11)
    data = b"\n".join(name + b":1|c" for name in names)
    try:

        def one_round() -> dict[bytes, int]:
            worker.handle(1, data)
            worker.flush()
            if worker.usable != [False, False, False]:
                sinks.wait_lines(len(names))
            sinks.drain()
            placed = {}
            for index in range(3):
                for line in sinks.lines(index):
                    placed[line.split(b":", 1)[0]] = index
            sinks.clear()
            return placed

        before = one_round()
        worker.state.set_usable([True, False, True])
        worker.refresh_health()
        after = one_round()
        worker.state.set_usable([False, False, False])
        worker.refresh_health()
        assert one_round() == {}
        held_out = [n for n in names if primary(n, 3) == 1]
        assert worker.counters[statsd.C_REROUTED] == len(held_out)
        assert worker.counters[statsd.C_NO_BACKEND] == len(names)
        assert worker.counters[statsd.C_FORWARDED] == 2 * len(names)
        assert before == {name: primary(name, 3) for name in names}
        for name in names:
            if primary(name, 3) == 1:
                assert after[name] == place(name, [True, False, True]) != 1
            else:
                assert after[name] == before[name]
    finally:
        sinks.close()


# ---------------------------------------------------------------- health and flap damping


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_flapping_backend_stays_out_until_stable():
    backends = [Backend("127.0.0.1", 1, 2), Backend("127.0.0.1", 3, 4)]
    answers = {2: True, 4: True}
    clock = _Clock()
    checker = HealthChecker(
        backends, FlapDamper(), probe=lambda host, port, timeout: answers[port], clock=clock
    )
    assert not checker.check() and checker.usable == [True, True]
    # One outage: out while down, back as soon as it answers (penalty 10 < 25).
    answers[4] = False
    clock.now += 5
    assert checker.check() and checker.usable == [True, False]
    answers[4] = True
    clock.now += 5
    assert checker.check() and checker.usable == [True, True]
    # It flaps: the third change pushes the penalty over the suppress limit,
    # and it stays out although every later check says up.
    answers[4] = False
    clock.now += 5
    assert checker.check() and checker.usable == [True, False]
    answers[4] = True
    for _ in range(20):
        clock.now += 5
        checker.check()
        assert checker.usable == [True, False], "a suppressed backend came back too early"
    state = checker.states[backends[1].spec]
    assert state.suppressed
    release = checker.damper.release_time(state)
    assert release is not None and release > clock.now
    clock.now = release + 1
    assert checker.check() and checker.usable == [True, True]
    # The other backend never moved.
    assert checker.states[backends[0].spec].penalty == 0


def test_backend_without_admin_port_is_never_checked():
    calls = []
    checker = HealthChecker(
        [Backend("h", 1)], FlapDamper(), probe=lambda *a: calls.append(a) or False
    )
    checker.check()
    assert checker.usable == [True] and calls == []


def test_flap_state_file_survives_a_restart(tmp_path):
    backends = [Backend("127.0.0.1", 1, 2)]
    answers = [True, False, True, False]
    clock = _Clock()
    path = str(tmp_path / "flap.json")
    checker = HealthChecker(
        backends,
        FlapDamper(),
        state_file=path,
        probe=lambda *a: answers.pop(0),
        clock=clock,
    )
    for _ in range(4):
        clock.now += 1
        checker.check()
    assert checker.states[backends[0].spec].suppressed
    restarted = HealthChecker(
        backends, FlapDamper(), state_file=path, probe=lambda *a: True, clock=clock
    )
    clock.now += 1
    restarted.check()
    assert restarted.usable == [False]


# ---------------------------------------------------------------- the daemon


class FakeStatsd:
    """A UDP sink plus an admin port answering `health` like statsd."""

    def __init__(self) -> None:
        self.healthy = True
        self.admin = socket.socket()
        self.admin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.admin.bind(("127.0.0.1", 0))
        self.admin.listen(16)
        self.admin_port = self.admin.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.admin.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(64)
                    if self.healthy:
                        conn.sendall(b"health: up\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.admin.close()


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _admin(port: int, command: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(command.encode() + b"\nquit\n")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out.decode()


def _stats(port: int) -> dict[str, int]:
    values = {}
    for line in _admin(port, "stats").splitlines():
        key, sep, value = line.rpartition(": ")
        if sep and value.isdigit():
            values[key] = int(value)
    return values


class Relay:
    """`carbonscale relay statsd` in a subprocess, with FakeStatsd backends."""

    def __init__(self, backends: int, *extra: str) -> None:
        self.sinks = _Sinks(backends)
        self.fakes = [FakeStatsd() for _ in range(backends)]
        self.port = _free_port(socket.SOCK_DGRAM)
        self.admin_port = _free_port(socket.SOCK_STREAM)
        specs = [
            f"127.0.0.1:{port}:{fake.admin_port}"
            for port, fake in zip(self.sinks.ports, self.fakes, strict=True)
        ]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "carbonscale",
                "relay",
                "statsd",
                *specs,
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--admin-listen",
                "127.0.0.1",
                "--admin-port",
                str(self.admin_port),
                *extra,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if _admin(self.admin_port, "health").startswith("health: "):
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"relay did not start: {self.proc.stderr.read()}")
            time.sleep(0.1)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx.connect(("127.0.0.1", self.port))

    def send(self, datagrams, pace: int = 2000) -> None:
        for start in range(0, len(datagrams), pace):
            udpio.send_many(self.tx.fileno(), datagrams[start : start + pace])
            time.sleep(0.02)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=15)
        finally:
            self.proc.kill()
            self.tx.close()
            self.sinks.close()
            for fake in self.fakes:
                fake.close()
        return err


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_daemon_routes_reroutes_answers_health_and_reports(tmp_path):
    carbon = socket.socket()
    carbon.bind(("127.0.0.1", 0))
    carbon.listen(4)
    carbon.settimeout(20)
    relay = Relay(
        3,
        "--check-interval",
        "0.2",
        "--stats-interval",
        "0.5",
        "--carbon",
        f"127.0.0.1:{carbon.getsockname()[1]}",
        "--stats-prefix",
        "test.relay",
    )
    try:
        assert _admin(relay.admin_port, "health") == "health: up\n"
        names = _random_names(2000, seed=5)
        relay.send([name + b":1|c" for name in names])
        relay.sinks.wait_lines(len(names))
        placed = {}
        for index in range(3):
            for line in relay.sinks.lines(index):
                placed[line.split(b":")[0]] = index
        assert placed == {name: primary(name, 3) for name in names}

        # Backend 1 stops answering: its metrics go to their second choice.
        relay.fakes[1].healthy = False
        _wait_for(lambda: " out " in _admin(relay.admin_port, "backends").splitlines()[1])
        relay.sinks.clear()
        relay.send([name + b":1|c" for name in names])
        relay.sinks.wait_lines(len(names))
        assert relay.sinks.lines(1) == []
        for index in (0, 2):
            for line in relay.sinks.lines(index):
                name = line.split(b":")[0]
                if primary(name, 3) != 1:
                    assert index == primary(name, 3)
                else:
                    assert index == place(name, [True, False, True])
        stats = _stats(relay.admin_port)
        held_out = sum(1 for n in names if primary(n, 3) == 1)
        assert stats["metrics_rerouted"] == held_out
        assert stats["metrics_forwarded"] == 2 * len(names)

        # Every backend down: the relay reports itself down (LVS drains it)
        # and counts what it cannot deliver.
        for fake in relay.fakes:
            fake.healthy = False
        _wait_for(lambda: _admin(relay.admin_port, "health") == "health: down\n")
        relay.send([b"lost:1|c"] * 10)
        _wait_for(lambda: _stats(relay.admin_port)["metrics_no_backend"] == 10)
        assert _admin(relay.admin_port, "health up") == "health: down\n"
        for fake in relay.fakes:
            fake.healthy = True
        _wait_for(lambda: _admin(relay.admin_port, "health") == "health: up\n")
        # An operator drains the relay by hand.
        assert _admin(relay.admin_port, "health down") == "health: down\n"
        assert _admin(relay.admin_port, "health up") == "health: up\n"
        assert _admin(relay.admin_port, "bogus") == "ERROR\n"

        # Counters reach carbon as line protocol.
        conn, _ = carbon.accept()
        with conn:
            conn.settimeout(5)
            payload = b""
            while chunk := conn.recv(65536):
                payload += chunk
        names_sent = {line.split()[0] for line in payload.decode().splitlines()}
        for counter in (*statsd.COUNTERS, "datagrams_dropped_kernel", "backends_usable"):
            assert f"test.relay.{counter}" in names_sent
    finally:
        err = relay.stop()
        carbon.close()
    assert relay.proc.returncode == 0, err
    assert "Traceback" not in err


def test_daemon_keeps_a_flapping_backend_out_until_stable():
    relay = Relay(
        2,
        "--check-interval",
        "0.1",
        "--flap-half-life",
        "3",
        "--carbon",
        "none",
    )
    try:
        fake = relay.fakes[0]

        def status() -> str:
            return _admin(relay.admin_port, "backends").splitlines()[0].split()[1]

        # Three changes (down, up, down) exceed the suppress limit.
        for healthy in (False, True, False):
            fake.healthy = healthy
            _wait_for(lambda h=healthy: status() == ("in" if h else "out"))
        fake.healthy = True
        time.sleep(1.0)
        assert status() == "out", "a flapping backend came back while its penalty was high"
        assert "suppressed=True" in _admin(relay.admin_port, "backends")
        # Penalty 30 decays below the reuse limit 10 after log2(3) half-lives.
        _wait_for(lambda: status() == "in", timeout=15)
    finally:
        err = relay.stop()
    assert relay.proc.returncode == 0, err


# ---------------------------------------------------------------- fuzz


def _fuzz_datagrams(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    names = [n.decode() for n in _random_names(300, seed=seed)]
    types = ["c", "g", "ms", "s", "h", "c|@0.1", "ms|@0.5|#tag:x", "c|@0", "c|@-1", "g|@inf"]

    def valid_line() -> bytes:
        value = rng.choice(["1", "-2", "+3", "0.5", "1e3", "abc", "", "inf", "NaN", "1e400"])
        return f"{rng.choice(names)}:{value}|{rng.choice(types)}".encode()

    def valid_datagram() -> bytes:
        return b"\n".join(valid_line() for _ in range(rng.randint(1, 40)))

    def mutate(data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(buf) + 1)
            if op < 0.3 and buf:
                buf[min(pos, len(buf) - 1)] = rng.randrange(256)
            elif op < 0.6:
                buf[pos:pos] = bytes([rng.choice(b":|\n\r\x00@#\xff.")])
            elif op < 0.8 and buf:
                del buf[min(pos, len(buf) - 1)]
            else:
                buf = buf[:pos]
        return bytes(buf)

    datagrams = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.25:
            datagrams.append(rng.randbytes(rng.randint(0, 600)))
        elif kind < 0.5:
            datagrams.append(valid_datagram())
        elif kind < 0.97:
            datagrams.append(mutate(valid_datagram()))
        elif kind < 0.98:
            datagrams.append(b"")
        elif kind < 0.99:
            datagrams.append(b"\n" * rng.randint(1, 50))
        else:
            big = b"\n".join(valid_line() for _ in range(2000))[: rng.randint(1000, 65000)]
            datagrams.append(mutate(big) if rng.random() < 0.5 else big)
    return datagrams


def _expected(datagrams: list[bytes]) -> tuple[int, list[bytes], int]:
    """Non-empty lines, the routable ones (a name before ':', a '|' after, and
    samples statsd can store: route_py's refused_samples, which the daemon's C
    loop must agree with), and how many were refused."""
    metrics, routable, refused = 0, [], 0
    for datagram in datagrams:
        for line in datagram.split(b"\n"):
            if not line:
                continue
            metrics += 1
            colon = line.find(b":")
            if colon >= 1 and b"|" in line[colon:]:
                if refused_samples(line[colon + 1 :]):
                    refused += 1
                else:
                    routable.append(line)
    return metrics, routable, refused


@pytest.mark.slow
def test_fuzz_100k_datagrams_relay_survives_and_counts_every_drop():
    datagrams = _fuzz_datagrams(100_000, seed=2024)
    metrics, routable, refused = _expected(datagrams)
    relay = Relay(4, "--carbon", "none", "--packet-size", "1400")
    try:
        relay.send(datagrams, pace=1000)
        _wait_for(
            lambda: (
                (s := _stats(relay.admin_port))["datagrams_received"]
                + s["datagrams_dropped_kernel"]
                == len(datagrams)
            ),
            timeout=60,
        )
        relay.sinks.drain(quiet=0.5)
        assert relay.proc.poll() is None, "the relay died"
        assert _admin(relay.admin_port, "health") == "health: up\n"
        stats = _stats(relay.admin_port)
        # Nothing was lost by the kernel at this pace, so every datagram was read.
        assert stats["datagrams_dropped_kernel"] == 0
        assert stats["datagrams_received"] == len(datagrams)
        assert stats["metrics_received"] == metrics
        assert stats["metrics_refused"] == refused > 1000
        assert stats["metrics_malformed"] == metrics - len(routable) - refused
        assert (
            stats["metrics_forwarded"]
            + stats["metrics_malformed"]
            + stats["metrics_refused"]
            + stats["metrics_no_backend"]
            + stats["metrics_send_failed"]
            == stats["metrics_received"]
        )
        assert stats["metrics_no_backend"] == stats["metrics_send_failed"] == 0
        delivered = collections.Counter()
        for index in range(4):
            for line in relay.sinks.lines(index):
                assert primary(line.split(b":", 1)[0], 4) == index
                delivered[line] += 1
        assert delivered == collections.Counter(routable)
        assert stats["metrics_forwarded"] == len(routable)
    finally:
        err = relay.stop()
    assert relay.proc.returncode == 0, err
    assert "Traceback" not in err

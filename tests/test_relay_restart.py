"""carbon-c-relay restarted behind the relay's front (`carbonscale relay pickle
--line-listen --hold-dir`) while a sender writes without pause: every line
arrives once. Real programs: this machine's carbon-c-relay, the front as its
own process, a TCP sink behind carbon-c-relay.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time

import pytest
from pickle_relay_harness import RelayProcess, frame
from relay_oracle import RELAY, needs_relay
from relay_sinks import Sinks, free_port, wait_for

from carbonscale.relay import hold

pytestmark = needs_relay


class CarbonCRelay:
    """carbon-c-relay on a loopback port forwarding everything to one sink port."""

    def __init__(self, tmp_path, sink_port: int) -> None:
        self.port = free_port()
        self.config = tmp_path / "relay.conf"
        self.config.write_text(
            f"listen type linemode 127.0.0.1:{self.port} proto tcp;\n"
            f"cluster sink forward 127.0.0.1:{sink_port};\n"
            "match * send to sink stop;\n"
        )
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RELAY, "-f", str(self.config), "-H", "test", "-w", "2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1


class SteadySender:
    """One persistent connection writing numbered lines without pause."""

    def __init__(self, port: int, prefix: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.prefix = prefix
        self.sent = 0
        self.running = True
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        while self.running:
            lines = "".join(
                f"{self.prefix}.m{n % 7} {n} {1700000000 + n}\n"
                for n in range(self.sent, self.sent + 20)
            )
            self.sock.sendall(lines.encode())
            self.sent += 20
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        self.sock.close()
        return self.sent


@pytest.fixture
def front_behind(tmp_path):
    """(front, carbon-c-relay, sinks, line port, hold dir), all running."""
    sinks = Sinks(1)
    crelay = CarbonCRelay(tmp_path, sinks.ports[0])
    crelay.start()
    assert wait_for(lambda: hold.listening(crelay.port), 20)
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    line_port = free_port()
    # --close-after: a carbon-c-relay gone outside a hold closes the front;
    # the restarts below take longer than that, so a hold must keep it open.
    front = RelayProcess(
        crelay.port,
        "--line-listen",
        f"127.0.0.1:{line_port}",
        "--hold-dir",
        str(hold_dir),
        "--close-after",
        "0.5",
        "--reconnect-interval",
        "0.2",
    )
    try:
        yield front, crelay, sinks, line_port, hold_dir
    finally:
        front.kill()
        crelay.stop()
        sinks.close()


def numbers(sinks: Sinks, prefix: bytes) -> list[int]:
    return [int(line.split()[1]) for line in sinks.lines(sinks.ports[0]) if line.startswith(prefix)]


def test_restarts_behind_the_front_lose_no_line(front_behind):
    front, crelay, sinks, line_port, hold_dir = front_behind
    sender = SteadySender(line_port, "restart.line")
    time.sleep(0.5)
    reports = []
    for _ in range(3):
        reports.append(hold.restart_behind_front(crelay.restart, hold_dir, crelay.port, wait=20))
        time.sleep(0.3)
    sent = sender.stop()
    assert crelay.restarts == 3
    assert all(report.held for report in reports)
    assert wait_for(lambda: len(numbers(sinks, b"restart.line.")) >= sent, 30)
    got = numbers(sinks, b"restart.line.")
    assert sorted(got) == list(range(sent)), (
        f"{sent} sent, {len(got)} arrived, {sent - len(set(got))} missing, "
        f"{len(got) - len(set(got))} twice"
    )
    counters = front.stop()
    assert counters["holds"] == 3
    assert counters["lines"] == sent
    assert counters["dropped_overflow"] == counters["dropped_shutdown"] == 0
    # The front stayed connected to its sender throughout, and took a new
    # connection to carbon-c-relay after each restart.
    assert counters["connections"] == 1
    assert counters["upstream_connects"] == 4


def test_pickle_points_also_wait_out_the_restart(front_behind):
    front, crelay, sinks, _line_port, hold_dir = front_behind
    sock = front.connect()
    sent = 0

    def send_batch():
        nonlocal sent
        import pickle

        points = [(f"restart.pickle.m{n % 5}", (1700000000 + n, n)) for n in range(sent, sent + 50)]
        sock.sendall(frame(pickle.dumps(points, protocol=2)))
        sent += 50

    send_batch()
    report = hold.hold(hold_dir, crelay.port, seconds=60, wait=20)
    assert report.held
    crelay.stop()
    for _ in range(10):  # arrive while carbon-c-relay is away: queued in the front
        send_batch()
    crelay.start()
    assert wait_for(lambda: hold.listening(crelay.port), 20)
    time.sleep(1)
    hold.release(hold_dir, wait=20)
    assert wait_for(lambda: len(numbers(sinks, b"restart.pickle.")) >= sent, 30)
    assert sorted(numbers(sinks, b"restart.pickle.")) == list(range(sent))
    sock.close()


def test_a_hold_nobody_releases_ends_by_itself(front_behind):
    _front, crelay, sinks, line_port, hold_dir = front_behind
    report = hold.hold(hold_dir, crelay.port, seconds=1.5, wait=20)
    assert report.held
    with socket.create_connection(("127.0.0.1", line_port)) as sock:
        sock.sendall(b"expire.line 1 1700000000\n")
        time.sleep(0.5)
        assert numbers(sinks, b"expire.line") == []  # held: not written yet
        assert wait_for(lambda: numbers(sinks, b"expire.line") == [1], 15)
    assert hold.read_ack(hold_dir) is None


def test_without_a_front_carbon_c_relay_is_restarted_plainly(tmp_path):
    restarted = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    with listener:
        report = hold.restart_behind_front(
            lambda: restarted.append(1),
            tmp_path / "absent",
            listener.getsockname()[1],
            wait=5,
            settle=0,
        )
    assert restarted == [1]
    assert not report.held
    # And a carbon-c-relay that does not come back is an error, after the restart ran.
    with pytest.raises(hold.HoldError, match="does not listen"):
        hold.restart_behind_front(
            lambda: restarted.append(2), tmp_path / "absent", free_port(), wait=0.3, settle=0
        )
    assert restarted == [1, 2]


def test_a_front_that_does_not_answer_is_never_waited_on_forever(tmp_path):
    with pytest.raises(hold.HoldError, match="did not confirm the hold"):
        hold.hold(tmp_path, free_port(), seconds=5, wait=0.3)
    assert not (tmp_path / hold.HOLD_REQUEST).exists()  # no hold left behind


def test_unread_bytes_sees_what_the_reader_has_not_read():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    with contextlib.closing(listener), socket.create_connection(("127.0.0.1", port)) as client:
        server, _ = listener.accept()
        with server:
            client.sendall(b"x" * 1000)
            assert wait_for(lambda: hold.unread_bytes(port) == 1000, 5)
            assert server.recv(4096) == b"x" * 1000
            assert wait_for(lambda: hold.unread_bytes(port) == 0, 5)
    assert hold.listening(port) is False


def test_oversized_line_is_skipped_and_counted_the_connection_stays(front_behind):
    front, _crelay, sinks, line_port, _hold_dir = front_behind
    with socket.create_connection(("127.0.0.1", line_port)) as sock:
        sock.sendall(b"long." + b"x" * 70000 + b" 1 1700000000\nafter.long 2 1700000000\n")
        assert wait_for(lambda: numbers(sinks, b"after.long") == [2], 15)
    counters = front.stop()
    assert counters["lines_oversized"] == 1
    assert counters["lines"] == 1
    assert not [line for line in sinks.lines(sinks.ports[0]) if line.startswith(b"long.")]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def test_carbon_c_relay_gone_outside_a_hold_closes_the_front_until_it_is_back(front_behind):
    front, crelay, sinks, line_port, _hold_dir = front_behind
    client = socket.create_connection(("127.0.0.1", line_port))
    client.sendall(b"gone.before 1 1700000000\n")
    assert wait_for(lambda: numbers(sinks, b"gone.before") == [1], 15)
    crelay.stop()  # not planned: no hold
    assert wait_for(lambda: not _accepts(line_port) and not _accepts(front.port), 10)
    client.settimeout(5)
    assert client.recv(1) == b""  # closed by the front: the sender goes elsewhere
    client.close()
    crelay.start()
    assert wait_for(lambda: _accepts(line_port) and _accepts(front.port), 20)
    with socket.create_connection(("127.0.0.1", line_port)) as again:
        again.sendall(b"gone.after 2 1700000000\n")
    assert wait_for(lambda: numbers(sinks, b"gone.after") == [2], 15)
    counters = front.stop()
    assert counters["closed_front"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0", "--hold-dir", "x"], "--port wants 1-65535"),
        (["--port", "2013", "--hold-dir", "x", "--wait", "0"], "--wait must be > 0"),
    ],
)
def test_restart_refuses_bad_input_in_one_line(args, message):
    done = subprocess.run(
        [sys.executable, "-m", "carbonscale", "relay", "restart", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

"""`carbonscale gen`: gentestmetrics output, and real sends decoded by real receivers."""

import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from carbon.util import get_unpickler

from carbonscale.gen import generate, metric_names
from carbonscale.sender import send

CLI = [sys.executable, "-m", "carbonscale"]
# carbon's own restricted unpickler: what a carbon pickle receiver decodes.
CARBON_UNPICKLER = get_unpickler(insecure=False)


def run_cli(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)


def test_gentestmetrics_timestamps_go_backwards_from_start_and_print_oldest_first():
    out = run_cli("gen", "-c", "3", "-x", "2", "-s", "1000", "-v", "5").stdout.splitlines()
    # 1000 rounded down to 60 is 960, the last of two points; 900 comes first.
    assert out == [
        "test.000000 5 900",
        "test.000001 5 900",
        "test.000002 5 900",
        "test.000000 5 960",
        "test.000001 5 960",
        "test.000002 5 960",
    ]


def test_random_values_respect_the_limit_and_seed_repeats():
    # A fixed start: the default (now) can cross a minute between the two runs.
    args = ("gen", "-c", "200", "-l", "7", "--seed", "3", "-s", "1795430400")
    first = run_cli(*args).stdout
    again = run_cli(*args).stdout
    assert first == again
    values = {int(line.split()[1]) for line in first.splitlines()}
    assert values <= set(range(7))
    assert len(values) > 1


def test_names_file_with_prefix_skips_blank_lines(tmp_path):
    names = tmp_path / "names"
    names.write_text("a.b\n\n  c.d  \n")
    out = run_cli("gen", "-f", str(names), "-p", "x.", "-s", "120", "-i", "10", "-v", "1")
    assert out.stdout.splitlines() == ["x.a.b 1 120", "x.c.d 1 120"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "0"], "-i must be a positive"),
        (["-x", "0"], "-x must be >= 1"),
        (["-f", "/nonexistent/names"], "cannot read names file"),
        (["--send", "nohostport"], "--send wants HOST:PORT"),
        (["--send", "127.0.0.1:99999"], "--send wants HOST:PORT"),
        (["-s", "10", "-x", "5"], "before the epoch"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run_cli("gen", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_refused_connection_is_a_clear_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    result = run_cli("gen", "-c", "1", "--send", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert "Connection refused" in result.stderr


class TcpSink:
    """A TCP listener that keeps every byte of one connection."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.data = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                self.data += chunk
        self.listener.close()


def test_line_send_arrives_complete():
    sink = TcpSink()
    result = run_cli(
        "gen", "-c", "1500", "-x", "2", "-s", "6000", "--send", f"127.0.0.1:{sink.port}"
    )
    assert result.returncode == 0, result.stderr
    sink.thread.join(5)
    lines = sink.data.decode().splitlines()
    assert len(lines) == 3000
    assert lines[0].startswith("test.000000 ")
    assert lines[0].endswith(" 5940")
    assert lines[-1].startswith("test.001499 ")
    assert lines[-1].endswith(" 6000")
    assert "sent 3000 points" in result.stderr


def test_pickle_frames_decode_with_carbons_unpickler():
    sink = TcpSink()
    result = run_cli(
        "gen", "-c", "1200", "-v", "3", "-s", "600", "--format", "pickle",
        "--send", f"127.0.0.1:{sink.port}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sink.thread.join(5)
    data, points = sink.data, []
    while data:
        (length,) = struct.unpack("!L", data[:4])
        points.extend(CARBON_UNPICKLER.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    assert len(points) == 1200
    assert points[0] == ("test.000000", (600, 3.0))
    assert {name for name, _ in points} == {f"test.{i:06d}" for i in range(1200)}


def test_statsd_send_one_metric_per_datagram_or_packed():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    port = sock.getsockname()[1]
    names = metric_names(20, "s.")
    assert send(generate(names, value=1), ("127.0.0.1", port), fmt="statsd") == 20
    single = [sock.recv(2048) for _ in range(20)]
    assert single[0] == b"s.000000:1|c"
    send(
        generate(names, value=1), ("127.0.0.1", port), fmt="statsd", statsd_type="g",
        packet_size=60,
    )  # fmt: skip
    packed = []
    while sum(len(p.split(b"\n")) for p in packed) < 20:
        packed.append(sock.recv(2048))
    assert all(len(p) <= 60 for p in packed)
    assert b"\n".join(packed).split(b"\n")[5] == b"s.000005:1|g"
    sock.close()


def test_rate_paces_the_sender():
    sink = TcpSink()
    started = time.monotonic()
    send(generate(metric_names(60, "r."), value=1), ("127.0.0.1", sink.port), rate=100)
    # 60 points at 100/s cannot take less than about 0.6 s.
    assert time.monotonic() - started >= 0.5

"""carbonscale.losses and `carbonscale report`: restart counts from systemctl's
output, nginx's refusals counted from its error-log lines across runs and a
logrotate, then from a real nginx refusing clients (no relay, no descriptors),
and the reports sent to a real line receiver (with a fallback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from relay_oracle import needs_relay
from relay_sinks import LineReceiver, free_port, wait_for
from test_lvs_nginx import needs_nginx, needs_root, relay, running_nginx  # noqa: F401 (fixture)

from carbonscale import CarbonscaleError
from carbonscale.health import tcp_connect
from carbonscale.losses import (
    NGINX_COUNTERS,
    NginxErrorLog,
    classify_nginx_error,
    nginx_error_points,
    parse_systemctl_show,
    restart_points,
)
from carbonscale.sender import Point, encode_line, report

# Lines in the form nginx 1.22's stream module (Debian 12) writes, one per kind, then
# routine ones that must not count.
EMFILE_ACCEPT = b"2026/12/01 21:14:03 [crit] 812#812: accept4() failed (24: Too many open files)\n"
EMFILE_SOCKET = (
    b"2026/12/01 21:14:03 [crit] 812#812: *1391 socket() failed (24: Too many open files) "
    b"while connecting to upstream, client: 172.31.6.31, server: 0.0.0.0:2003, "
    b'upstream: "172.31.6.21:2003", bytes from/to client:0/0, bytes from/to upstream:0/0\n'
)
REFUSED = (
    b"2026/12/01 21:15:10 [error] 812#812: *1402 connect() failed (111: Connection refused) "
    b"while connecting to upstream, client: 172.31.6.31, server: 0.0.0.0:2003, "
    b'upstream: "172.31.6.22:2003", bytes from/to client:0/0, bytes from/to upstream:0/0\n'
)
NO_LIVE = (
    b"2026/12/01 21:15:11 [error] 812#812: *1403 no live upstreams while connecting to "
    b'upstream, client: 172.31.6.31, server: 0.0.0.0:2003, upstream: "carbonscale_line", '
    b"bytes from/to client:0/0, bytes from/to upstream:0/0\n"
)
WORKER_CONNECTIONS = (
    b"2026/12/01 21:16:00 [alert] 812#812: 16384 worker_connections are not enough\n"
)
PROXY_RESET = (
    b"2026/12/01 21:17:00 [error] 812#812: *1500 recv() failed (104: Connection reset by peer) "
    b"while proxying and reading from upstream, client: 172.31.6.31, server: 0.0.0.0:2003, "
    b'upstream: "172.31.6.21:2003", bytes from/to client:120/0, bytes from/to upstream:0/120\n'
)
ROUTINE = [
    b"2026/12/01 21:10:00 [notice] 811#811: signal process started\n",
    b"2026/12/01 21:10:01 [info] 812#812: *7 client 172.31.6.31:40000 connected to 0.0.0.0:2003\n",
    # A warning naming an upstream is no refusal.
    b"2026/12/01 21:10:02 [warn] 812#812: *8 upstream server temporarily disabled while "
    b"connecting to upstream, client: 172.31.6.31\n",
]


def test_each_kind_of_refusal_is_recognised_and_routine_lines_are_not():
    assert classify_nginx_error(EMFILE_ACCEPT) == "no_file_descriptors"
    assert classify_nginx_error(EMFILE_SOCKET) == "no_file_descriptors"
    assert classify_nginx_error(REFUSED) == "upstream_connect_failed"
    assert classify_nginx_error(NO_LIVE) == "no_live_upstreams"
    assert classify_nginx_error(WORKER_CONNECTIONS) == "worker_connections"
    assert classify_nginx_error(PROXY_RESET) == "proxy_errors"
    assert [classify_nginx_error(line) for line in ROUTINE] == [None, None, None]
    assert classify_nginx_error(b"\xff\xfe garbage\n") is None


def counted(tmp_path, log_name="error.log") -> dict[str, int]:
    log = NginxErrorLog(tmp_path / log_name, tmp_path / "state.json")
    counts = log.update()
    log.save()
    return counts


def test_counts_are_cumulative_across_runs_and_a_half_written_line_waits(tmp_path):
    log = tmp_path / "error.log"
    log.write_bytes(b"".join([*ROUTINE, EMFILE_ACCEPT, EMFILE_SOCKET, REFUSED]))
    first = counted(tmp_path)
    assert first == {**dict.fromkeys(NGINX_COUNTERS, 0), "no_file_descriptors": 2,
                     "upstream_connect_failed": 1}  # fmt: skip
    # Nothing new: the same totals, nothing counted twice.
    assert counted(tmp_path) == first
    # nginx is half-way through a line: it counts once it is whole.
    with log.open("ab") as handle:
        handle.write(NO_LIVE + REFUSED[:40])
    second = counted(tmp_path)
    assert second["no_live_upstreams"] == 1 and second["upstream_connect_failed"] == 1
    with log.open("ab") as handle:
        handle.write(REFUSED[40:])
    assert counted(tmp_path)["upstream_connect_failed"] == 2


def test_logrotate_rename_reads_the_rest_of_the_old_file_then_the_new(tmp_path):
    log = tmp_path / "error.log"
    log.write_bytes(REFUSED)
    assert counted(tmp_path)["upstream_connect_failed"] == 1
    with log.open("ab") as handle:  # written after our last run, before the rotation
        handle.write(NO_LIVE)
    os.rename(log, tmp_path / "error.log.1")
    log.write_bytes(EMFILE_ACCEPT)
    counts = counted(tmp_path)
    assert (counts["upstream_connect_failed"], counts["no_live_upstreams"]) == (1, 1)
    assert counts["no_file_descriptors"] == 1
    # The next rotation, with nothing left unread: the new file from its start.
    os.rename(log, tmp_path / "error.log.1")
    log.write_bytes(WORKER_CONNECTIONS)
    assert counted(tmp_path)["worker_connections"] == 1
    assert counted(tmp_path)["no_file_descriptors"] == 1


def test_a_truncated_log_is_read_from_its_start_and_a_missing_one_counts_nothing(tmp_path):
    log = tmp_path / "error.log"
    log.write_bytes(REFUSED * 3)
    assert counted(tmp_path)["upstream_connect_failed"] == 3
    log.write_bytes(REFUSED)  # copytruncate, then one new line
    assert counted(tmp_path)["upstream_connect_failed"] == 4
    log.unlink()
    assert counted(tmp_path)["upstream_connect_failed"] == 4


def test_a_broken_state_file_is_one_clear_error(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(CarbonscaleError, match="remove it to count from the log's start"):
        NginxErrorLog(tmp_path / "error.log", tmp_path / "state.json")


def test_every_counter_is_a_point_zeros_included():
    counts = dict.fromkeys(NGINX_COUNTERS, 0) | {"no_live_upstreams": 3}
    points = nginx_error_points("carbonscale.lvs.d1.nginx", counts, 100)
    assert [p.name.rsplit(".", 1)[1] for p in points] == list(NGINX_COUNTERS)
    assert Point("carbonscale.lvs.d1.nginx.no_live_upstreams", 3, 100) in points


SYSTEMCTL_SHOW = """\
Id=carbon-cache@a.service
NRestarts=3
ActiveState=active

Id=carbon-cache@b.service
NRestarts=0
ActiveState=activating
"""


def test_restart_counts_from_systemctl_show():
    states = parse_systemctl_show(SYSTEMCTL_SHOW)
    lines = encode_line(restart_points("carbonscale.storage.s1", states, 7)).decode()
    assert lines.splitlines() == [
        "carbonscale.storage.s1.a.restarts 3 7",
        "carbonscale.storage.s1.a.running 1 7",
        "carbonscale.storage.s1.b.restarts 0 7",
        "carbonscale.storage.s1.b.running 0 7",
    ]
    # A unit systemd does not know has no NRestarts value to trust.
    with pytest.raises(CarbonscaleError, match="no restart count"):
        parse_systemctl_show("Id=nope.service\nNRestarts=\nActiveState=inactive\n")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_report_goes_to_the_first_destination_that_takes_it():
    receiver = LineReceiver()
    port = receiver.port
    down = f"127.0.0.1:{closed_port()}"
    took = report([Point("a.b", 1, 5)], [down, f"127.0.0.1:{port}"])
    assert took == f"127.0.0.1:{port}"
    assert receiver.wait() == [b"a.b 1 5\n"]
    with pytest.raises(CarbonscaleError, match=f"sending to 127.0.0.1:{down.split(':')[1]}"):
        report([Point("a.b", 1, 5)], [down])
    with pytest.raises(CarbonscaleError, match="HOST:PORT of a carbon line receiver"):
        report([], ["nohost"])


def test_cli_nginx_errors_sends_the_totals_and_bad_input_is_one_line(tmp_path):
    log = tmp_path / "error.log"
    log.write_bytes(EMFILE_SOCKET + NO_LIVE)
    receiver = LineReceiver()
    cli = [sys.executable, "-m", "carbonscale", "report", "nginx-errors", "--log", str(log)]
    done = subprocess.run(
        [*cli, "--state", str(tmp_path / "s.json"), "--prefix", "p.d1.nginx",
         "--destination", f"127.0.0.1:{receiver.port}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = receiver.wait()[0].decode().splitlines()
    assert len(lines) == len(NGINX_COUNTERS)
    assert [line.split()[:2] for line in lines if line.split()[1] != "0"] == [
        ["p.d1.nginx.no_file_descriptors", "1"],
        ["p.d1.nginx.no_live_upstreams", "1"],
    ]
    bad = subprocess.run(
        [*cli, "--state", str(tmp_path / "s.json"), "--prefix", "p", "--destination", "x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "HOST:PORT" in bad.stderr, bad.stderr


def test_cli_restarts_of_a_real_systemd_unit_or_a_clear_error():
    done = subprocess.run(
        [sys.executable, "-m", "carbonscale", "report", "restarts", "--prefix", "p",
         "--dry-run", "no-such-unit-carbonscale.service"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if done.returncode == 0:  # systemd answers for any name: 0 restarts, not running
        assert done.stdout.splitlines()[0].split()[:2] == [
            "p.no-such-unit-carbonscale.restarts",
            "0",
        ]
    else:  # no systemd here (a container, CI): one line saying so
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "systemctl show" in done.stderr, done.stderr


def refused_clients(port: int, count: int) -> int:
    """Connect count clients, each waiting for nginx to close it: how many it did."""
    closed = 0
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            try:
                closed += conn.recv(1) == b""
            except OSError:
                closed += 1
    return closed


@needs_nginx
@needs_root
def test_a_real_nginx_without_a_relay_counts_every_refused_client(tmp_path):
    listen = free_port()
    with running_nginx(tmp_path, listen, free_port(), rlimit=4096, hard=8192):
        log = NginxErrorLog(tmp_path / "error.log", tmp_path / "state.json")
        time.sleep(0.2)
        before = log.update()  # running_nginx's readiness probe was refused too
        assert refused_clients(listen, 7) == 7
        time.sleep(0.2)
        counts = log.update()
    # One relay in the group: nginx never marks it down, every client is a
    # failed connect (with more relays some would be "no live upstreams").
    refused = sum(counts[k] - before[k] for k in ("upstream_connect_failed", "no_live_upstreams"))
    assert refused == 7, (before, counts)
    assert counts["no_file_descriptors"] == 0


@needs_relay
@needs_nginx
@needs_root
def test_a_real_nginx_out_of_descriptors_is_counted(tmp_path, relay):  # noqa: F811
    # The worker keeps 64 descriptors (hard limit, no CAP_SYS_RESOURCE):
    # idle clients use them up, and the next clients are refused.
    listen = free_port()
    with running_nginx(tmp_path, listen, relay, rlimit=4096, hard=64):
        idle = []
        try:
            for _ in range(40):
                idle.append(socket.create_connection(("127.0.0.1", listen), timeout=2))
            time.sleep(0.5)
            assert tcp_connect("127.0.0.1", listen)
            log = NginxErrorLog(tmp_path / "error.log", tmp_path / "state.json")
            assert wait_for(lambda: log.update()["no_file_descriptors"] > 0, 10), log.counts
        finally:
            for conn in idle:
                conn.close()
    # nginx stopped: every line it wrote about a refusal is counted, once.
    text = (tmp_path / "error.log").read_text()
    counts = log.update()
    assert counts["no_file_descriptors"] == text.count("Too many open files"), text[-2000:]

"""`carbonscale ops` verbs against real whisper trees and real captured traffic.

The truth: where carbon-c-relay -t sends each metric (files written there, plus
copies placed on purpose on wrong hosts), `du -s -B1` on the trees, the whisper
points written, and traffic sent over loopback sockets captured by tcpdump.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

import dpkt
import pytest
from ops_cluster import HOSTS, MEMBERS, NAMES, build_tier, write_metric
from relay_oracle import needs_relay, relay_test_owners, write_cluster_config

from carbonscale import CarbonscaleError
from carbonscale.ops.du import du_here
from carbonscale.ops.hotmetrics import Decoder
from carbonscale.ops.lookup import merge_lookups

CLI = [sys.executable, "-m", "carbonscale"]
# The capture fixture (traffic_pcap, also used by test_fabfile.py) listens on
# fixed ports: both modules stay on one xdist worker (make unit: loadgroup).
pytestmark = [needs_relay, pytest.mark.xdist_group("capture-ports")]


def ops(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, "ops", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    return build_tier(tmp_path_factory.mktemp("tier"))


def test_inconsistent_finds_exactly_the_misplaced_files(tier):
    for host in HOSTS:
        out = ops("inconsistent", "--root", str(tier.roots[host]), "--self", host,
                  "--relay-config", str(tier.relay_config), "--list", "--json")  # fmt: skip
        report = json.loads(out.stdout)
        files = sum(1 for _ in tier.roots[host].rglob("*.wsp"))
        assert report["files"] == files
        assert set(report["metrics"]) == tier.strays[host]
        assert report["inconsistent"] == len(tier.strays[host])
        sizes = sum(
            (tier.roots[host] / (n.replace(".", "/") + ".wsp")).stat().st_size
            for n in tier.strays[host]
        )
        assert report["inconsistent_bytes"] == sizes
    assert sum(len(s) for s in tier.strays.values()) == 4


def test_lookup_names_owners_files_points_and_strays(tier):
    asked = NAMES[:5]
    reports = {}
    for host in HOSTS:
        out = ops("lookup", "--root", str(tier.roots[host]), "--self", host,
                  "--relay-config", str(tier.relay_config), "--json", *asked)  # fmt: skip
        reports[host] = json.loads(out.stdout)
    merged = merge_lookups(reports)
    for name in asked:
        entry = merged[name]
        owner = tier.owners[name][0]
        assert [m.split(":")[0] for m in entry["owners"]] == tier.owners[name]
        state = entry["owner_files"][f"{owner} ({owner})"]
        if name in tier.missing:
            assert state is None
            assert entry["complete"] is False
        else:
            path = tier.roots[owner] / (name.replace(".", "/") + ".wsp")
            assert state["size"] == path.stat().st_size
            assert state["newest"] == [tier.values[name][0], tier.values[name][1]]
        stray_hosts = {w.split(" ")[0] for w in entry["strays"]}
        assert stray_hosts == {h for h in HOSTS if name in tier.strays[h]}


def test_du_equals_du_and_counts_per_instance(tier):
    for host in HOSTS:
        root = tier.roots[host]
        out = ops("du", "--root", str(root), "--self", host,
                  "--relay-config", str(tier.relay_config), "--json")  # fmt: skip
        report = json.loads(out.stdout)
        du = subprocess.run(["du", "-s", "-B1", str(root)], capture_output=True, text=True)
        assert report["disk_bytes"] == int(du.stdout.split()[0])
        files = list(root.rglob("*.wsp"))
        assert report["files"] == len(files)
        assert report["whisper_bytes"] == sum(f.stat().st_size for f in files)
        statvfs = os.statvfs(root)
        assert abs(report["free_bytes"] - statvfs.f_bavail * statvfs.f_frsize) < 64 << 20
        instances = report["instances"]
        owned = sum(v["files"] for k, v in instances.items() if k != "not owned")
        assert owned + instances.get("not owned", {"files": 0})["files"] == len(files)
        assert instances.get("not owned", {"files": 0})["files"] == len(tier.strays[host])


def test_du_growth_and_fill_date_from_history(tmp_path):
    root = tmp_path / "whisper"
    write_metric(root, "a.b", int(time.time()), 1.0)
    history = str(tmp_path / "state" / "du-history.json")
    first = du_here(str(root), history=history, window=3600, now=1_000_000.0)
    assert first["growth_bytes_per_s"] is None and first["full_at"] is None
    write_metric(root, "a.c", int(time.time()), 1.0)
    second = du_here(str(root), history=history, window=3600, now=1_000_100.0)
    rate = (second["disk_bytes"] - first["disk_bytes"]) / 100.0
    assert rate > 0
    assert second["growth_bytes_per_s"] == pytest.approx(rate)
    assert second["full_at"] == pytest.approx(1_000_100.0 + second["free_bytes"] / rate)
    # A sample outside the window is not used.
    third = du_here(str(root), history=history, window=50, now=1_000_200.0)
    assert third["growth_bytes_per_s"] is None


def test_relays_reads_the_counters_where_they_are_stored(tmp_path):
    from carbonscale.ops.relays import merge_relays

    now = int(time.time())
    a, b = tmp_path / "a", tmp_path / "b"
    write_metric(a, "carbon.relays.relay1.metricsReceived", now - 120, 100.0)
    write_metric(a, "carbon.relays.relay1.metricsReceived", now - 60, 250.0)
    write_metric(b, "carbon.relays.relay1.metricsSent", now - 60, 240.0)
    write_metric(b, "carbon.relays.relay1.metricsDropped", now - 60, 3.0)
    write_metric(a, "carbon.relays.relay1.metricsQueued", now - 60, 7.0)
    write_metric(b, "carbon.relays.relay1.pickle.points", now - 60, 40.0)
    write_metric(b, "carbon.relays.relay1.pickle.sent", now - 60, 38.0)
    write_metric(a, "carbon.relays.relay1.pickle.dropped_overflow", now - 60, 2.0)
    reports = {h: json.loads(ops("relays", "--root", str(p), "--json").stdout) for h, p in
               (("a", a), ("b", b))}  # fmt: skip
    summary = merge_relays(reports)["relay1"]["summary"]
    stamp = (now - 60) - (now - 60) % 60
    assert summary["carbon-c-relay"] == {
        "received": 250.0, "sent": 240.0, "dropped": 3.0, "queued": 7.0, "at": stamp,
    }  # fmt: skip
    assert summary["pickle"]["received"] == 40.0
    assert summary["pickle"]["dropped"] == 2.0


def test_migration_status_reads_the_journal(tmp_path):
    from carbonscale.migrate.journal import Journal

    journal = Journal(str(tmp_path), "h")
    journal.add("p1", "sync", [("a.b", "h2"), ("a.c", "h2"), ("a.d", "h3")])
    journal.record("p1", "sync", [("a.b", "h2", "done", ""), ("a.d", "h3", "failed", "gone")])
    journal.close()
    out = json.loads(ops("migration-status", "--state-dir", str(tmp_path), "--json").stdout)
    assert out == {"p1": {"sync": {"pending": 1, "done": 1, "failed": 1}}}
    empty = json.loads(ops("migration-status", "--state-dir", str(tmp_path / "x"), "--json").stdout)
    assert empty == {}


@pytest.mark.parametrize(
    "args, message",
    [
        (["inconsistent", "--root", "/nonexistent", "--self", "h", "--hash", "carbon_ch",
          "--member", "h:2003=a"], "whisper root /nonexistent is not a directory"),
        (["inconsistent", "--root", "/", "--self", "other", "--hash", "carbon_ch",
          "--member", "h:2003=a"], "other is not a ring member host"),
        (["du", "--root", "/nonexistent"], "is not a directory"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2(args, message):
    result = ops(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_not_a_pcap_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "notes.pcap"
    bad.write_text("this is not a capture\n")
    result = ops("hot-metrics", "--pcap", str(bad), check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"carbonscale: error: {bad} is not a pcap or pcapng capture"


# ----- hot-metrics on real traffic ---------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held together, so all differ)."""
    held = [socket.socket() for _ in range(count)]
    try:
        for sock in held:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


# The capture's ports: picked per test process, not fixed, so no other test
# running at the same time (make unit runs on every core) can hold them.
LINE_PORT, PICKLE_PORT, STATSD_PORT = _free_ports(3)
# Points each metric gets: its rank is this order.
LINE = {"web.a.requests": 300, "web.b.requests": 200, "db.c.queries": 100}
PICKLE = {"db.d.latency": 150, "web.e.errors": 40}
STATSD = {"api.f.hits": 250, "api.g.hits": 60}


def _drain_server(port: int, stop: threading.Event) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(8)
    server.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                while conn.recv(65536):
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return server


def _send_traffic() -> None:
    now = int(time.time())
    lines = [f"{n} 1.5 {now}\n" for n, count in LINE.items() for _ in range(count)]
    lines.sort(key=lambda line: hash(line) ^ len(line))  # interleaved, one stream
    with socket.create_connection(("127.0.0.1", LINE_PORT)) as conn:
        data = "".join(lines).encode()
        for at in range(0, len(data), 777):  # lines split across segments on purpose
            conn.sendall(data[at : at + 777])
            time.sleep(0.001)
    with socket.create_connection(("127.0.0.1", PICKLE_PORT)) as conn:
        points = [(n, (now, 2.0)) for n, count in PICKLE.items() for _ in range(count)]
        for at in range(0, len(points), 50):
            body = pickle.dumps(points[at : at + 50], 2)
            conn.sendall(struct.pack(">I", len(body)) + body)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for name, count in STATSD.items():
        for i in range(count):
            udp.sendto(f"{name}:{i}|c".encode(), ("127.0.0.1", STATSD_PORT))
            if i % 50 == 0:
                time.sleep(0.002)
    udp.close()


@pytest.fixture(scope="module")
def traffic_pcap(tmp_path_factory):
    if shutil.which("tcpdump") is None or os.geteuid() != 0:
        pytest.skip("needs tcpdump and root to capture on lo")
    path = tmp_path_factory.mktemp("pcap") / "relay.pcap"
    stop = threading.Event()
    servers = [_drain_server(p, stop) for p in (LINE_PORT, PICKLE_PORT)]
    expression = f"dst port {LINE_PORT} or dst port {PICKLE_PORT} or dst port {STATSD_PORT}"
    dump = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-Z", "root", "-B", "16384", "-U", "-w", str(path), expression],
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)  # tcpdump prints "listening" only once its socket is open
    try:
        _send_traffic()
        time.sleep(1.0)
    finally:
        dump.send_signal(signal.SIGINT)
        _, err = dump.communicate(timeout=30)
        stop.set()
        for server in servers:
            server.close()
    assert re.search(rb"(?m)^0 packets dropped by kernel", err), err
    return path


def test_hot_metrics_ranks_counts_and_projects_load_like_the_relay(traffic_pcap, tmp_path):
    backends = ["10.9.1.1:8127:8128", "10.9.1.1:8129:8130", "10.9.1.2:8127:8128"]
    out = ops("hot-metrics", "--pcap", str(traffic_pcap), "--json", "--top", "0",
              "--line-port", str(LINE_PORT), "--pickle-port", str(PICKLE_PORT),
              "--statsd-port", str(STATSD_PORT), "--hash", "carbon_ch",
              *[a for m in MEMBERS for a in ("--member", m)],
              *[a for b in backends for a in ("--statsd-backend", b)])  # fmt: skip
    report = json.loads(out.stdout)
    truth = Counter({**LINE, **PICKLE, **STATSD})
    assert report["points"] == {
        "line": sum(LINE.values()), "pickle": sum(PICKLE.values()),
        "statsd": sum(STATSD.values()),
    }  # fmt: skip
    assert [[n, c] for n, c, _ in report["top_metrics"]] == [[n, c] for n, c in truth.most_common()]
    for _, count, rate in report["top_metrics"]:
        assert rate == pytest.approx(count / report["seconds"])
    prefixes = Counter()
    for name, count in truth.items():
        prefixes[".".join(name.split(".")[:2])] += count
    assert {n: c for n, c, _ in report["top_prefixes"]} == dict(prefixes)
    # Projected load per storage instance: what carbon-c-relay -t routes.
    config = write_cluster_config(tmp_path / "relay.conf", "carbon_ch", 1, MEMBERS)
    carbon = {**LINE, **PICKLE}
    owners = relay_test_owners(config, list(carbon))
    expected = Counter()
    for name, count in carbon.items():
        expected[owners[name][0]] += count
    member_address = {m: m.split("=")[0] for m in MEMBERS}
    got = {member_address[m]: v[0] for m, v in report["instances"].items() if v[0]}
    assert got == dict(expected)
    assert sum(v[0] for v in report["statsd_daemons"].values()) == sum(STATSD.values())
    assert report["skipped"].get("truncated record at the end", 0) == 0


def _statsd_datagram(version: int) -> bytes:
    udp = dpkt.udp.UDP(sport=40000, dport=8125, data=b"app.hits:1|c")
    udp.ulen = len(udp)
    if version == 4:
        ip = dpkt.ip.IP(src=bytes([10, 0, 0, 1]), dst=bytes([10, 0, 1, 1]), p=17, data=udp)
        ip.len = len(ip)
    else:
        ip = dpkt.ip6.IP6(src=bytes(15) + b"\x01", dst=bytes(15) + b"\x02", nxt=17, p=17,
                          hlim=64, data=udp)  # fmt: skip
        ip.plen = len(udp)
    return bytes(ip)


@pytest.mark.parametrize(("linktype", "header", "version"), [
    (1, bytes(12) + b"\x08\x00", 4),  # Ethernet
    (113, bytes(dpkt.sll.SLL(ethtype=0x86DD)), 6),  # Linux cooked (tcpdump -i any)
    (276, bytes(dpkt.sll2.SLL2(ethtype=0x0800)), 4),  # Linux cooked v2
    (0, struct.pack("=I", 2), 4),  # BSD loopback, host byte order
    (108, struct.pack(">I", 30), 6),  # OpenBSD loopback, network byte order
    (101, b"", 4), (12, b"", 6),  # raw IP
])  # fmt: skip
def test_every_supported_link_type_decodes_and_short_frames_are_counted(linktype, header, version):
    frame = header + _statsd_datagram(version)
    decoder = Decoder()
    decoder.feed(linktype, [(1.0, frame), (2.0, frame[: len(header) + 3])])
    assert decoder.names("statsd") == [b"app.hits"]
    assert decoder.stats.packets == 2
    assert sum(decoder.stats.skipped.values()) == 1


def test_an_unsupported_link_type_is_refused():
    with pytest.raises(CarbonscaleError, match="link type 147 is not supported"):
        Decoder().feed(147, [])

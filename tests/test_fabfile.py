"""The fabfile over real SSH: a throwaway sshd on 127.0.0.1 (its own host key and
an authorized key), an Ansible inventory whose storage hosts all reach it (each
with its own whisper tree and carbonscale_address), one host that does not
answer, and `fab` run as an operator runs it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from ops_cluster import HOSTS, NAMES, build_tier, write_metric
from relay_oracle import needs_relay, relay_test_owners
from test_ops import (  # noqa: F401 (traffic_pcap: the capture fixture, shared)
    LINE,
    LINE_PORT,
    PICKLE,
    PICKLE_PORT,
    STATSD,
    STATSD_PORT,
    traffic_pcap,
)

REPO = Path(__file__).resolve().parent.parent
FAB = [sys.executable, "-m", "fabric", "-r", str(REPO)]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

pytestmark = [
    needs_relay,
    # test_ops.py's capture fixture listens on fixed ports: one xdist worker.
    pytest.mark.xdist_group("capture-ports"),
    pytest.mark.skipif(not os.path.exists(SSHD), reason="openssh-server is not installed"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """(port, client key) of an sshd serving the current user on 127.0.0.1."""
    home = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)],
                       check=True)  # fmt: skip
    (home / "authorized_keys").write_text((home / "client_key.pub").read_text())
    port = free_port()
    config = home / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host_key'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nPidFile {home / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\nMaxStartups 100\n"
        "MaxSessions 100\nLogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"sshd did not start: {process.stderr.read().decode()}")
            time.sleep(0.1)
    yield port, home / "client_key"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def site(sshd, tmp_path_factory):
    """The inventory and the storage tier it describes."""
    port, key = sshd
    tmp = tmp_path_factory.mktemp("site")
    names = {h: f"storage{i + 1}" for i, h in enumerate(HOSTS)}
    tier = build_tier(tmp, {h: tmp / names[h] / "whisper" for h in HOSTS})
    reach = {
        "ansible_host": "127.0.0.1",
        "ansible_port": port,
        "ansible_user": os.environ.get("USER") or "root",
        "ansible_ssh_private_key_file": str(key),
        "carbonscale_venv": sys.prefix,
    }
    storage = {
        names[h]: {
            **reach,
            "carbonscale_address": h,
            "carbon_storage_whisper_dir": str(tier.roots[h]),
            "migrate_transport_state_dir": str(tmp / names[h] / "migrate"),
        }
        for h in HOSTS
    }
    closed = free_port()  # nothing listens there: the host that does not answer
    inventory = {
        "all": {
            "children": {
                "storage": {
                    "hosts": storage,
                    "vars": {
                        "carbon_instances": [
                            {
                                "name": "a",
                                "line_port": 2103,
                                "pickle_port": 2104,
                                "query_port": 7102,
                            },
                            {
                                "name": "b",
                                "line_port": 2203,
                                "pickle_port": 2204,
                                "query_port": 7202,
                            },
                        ]
                    },
                },
                "relays": {
                    "hosts": {"relay1": {**reach, "carbonscale_address": "10.9.1.1"}},
                    "vars": {
                        "carbon_relay_hash": "carbon_ch",
                        "carbon_relay_replication": 1,
                        "pickle_relay_line_listen": f":{LINE_PORT}",
                        "pickle_relay_listen": f":{PICKLE_PORT}",
                        "statsd_relay_port": STATSD_PORT,
                        "statsd_instances": [
                            {"name": "a", "port": 8127, "admin_port": 8128},
                            {"name": "b", "port": 8129, "admin_port": 8130},
                        ],
                    },
                },
                "spare": {
                    "hosts": {
                        "storage9": {
                            **reach,
                            "ansible_port": closed,
                            "carbonscale_address": "10.9.0.9",
                            "carbon_storage_whisper_dir": str(tmp),
                        },
                    }
                },
            }
        }
    }
    path = tmp / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path, tier, names


def fab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FAB, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
    )  # fmt: skip


def test_fab_list_shows_every_task_with_help():
    out = fab("--list")
    assert out.returncode == 0, out.stderr
    for name in ("lookup", "du", "inconsistent", "hot-metrics", "relays", "migration-status"):
        line = next(line for line in out.stdout.splitlines() if line.strip().startswith(name))
        assert len(line.split()) > 2, line


def test_inconsistent_over_ssh_finds_the_misplaced_files(site):
    inventory, tier, names = site
    out = fab("inconsistent", "-i", str(inventory), "--list", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report) == set(names.values())
    for host, name in names.items():
        assert set(report[name]["metrics"]) == tier.strays[host]
    table = fab("inconsistent", "-i", str(inventory))
    assert table.returncode == 0, table.stderr
    for host, name in names.items():
        row = next(line for line in table.stdout.splitlines() if line.startswith(name))
        assert row.split()[2] == str(len(tier.strays[host]))


def test_lookup_over_ssh_names_owner_files_and_strays(site):
    inventory, tier, names = site
    stray = NAMES[0]
    missing = next(iter(tier.missing))
    out = fab("lookup", "-i", str(inventory), "-m", stray, "-m", missing, "--json")
    assert out.returncode == 0, out.stderr
    merged = json.loads(out.stdout)
    owner = tier.owners[stray][0]
    where = f"{names[owner]} ({owner})"
    assert merged[stray]["owner_files"][where]["newest"] == list(tier.values[stray])
    assert set(merged[stray]["strays"]) == {
        f"{names[h]} ({h})" for h in HOSTS if stray in tier.strays[h]
    }
    missing_owner = tier.owners[missing][0]
    assert merged[missing]["owner_files"][f"{names[missing_owner]} ({missing_owner})"] is None
    table = fab("lookup", "-i", str(inventory), "-m", missing)
    assert "MISSING" in table.stdout and "STRAY" in table.stdout


def test_du_over_ssh_equals_du(site):
    inventory, tier, names = site
    out = fab("du", "-i", str(inventory), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for host, name in names.items():
        du = subprocess.run(["du", "-s", "-B1", str(tier.roots[host])], capture_output=True,
                            text=True, check=True)  # fmt: skip
        assert report[name]["disk_bytes"] == int(du.stdout.split()[0])
        assert report[name]["files"] == sum(1 for _ in tier.roots[host].rglob("*.wsp"))


def test_a_host_that_does_not_answer_is_named_and_the_others_report(site):
    inventory, _, names = site
    out = fab("du", "-i", str(inventory), "--on", "storage,spare", "--json")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert set(report) == set(names.values())
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("fab: storage9: cannot reach 127.0.0.1:")
    assert "refused" in lines[0].lower()


@pytest.mark.parametrize(
    "args, message",
    [
        (["du", "--on", "nosuchgroup"], "fab: error: no host or group 'nosuchgroup' in inventory"),
        (["lookup", "-m", "a.b", "--on", "storage1,ghost"], "no host or group 'ghost'"),
        (["hot-metrics", "--pcap", "fabfile.py"], "fabfile.py is not a pcap or pcapng capture"),
    ],
)
def test_bad_input_is_one_line_exit_2(site, args, message):
    inventory, _, _ = site
    out = fab(*args, "-i", str(inventory))
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_relays_and_migration_status_over_ssh(site):
    from carbonscale.migrate.journal import Journal

    inventory, tier, names = site
    now = int(time.time())
    first, second = tier.roots[HOSTS[0]], tier.roots[HOSTS[1]]
    write_metric(first, "carbon.relays.relay1.metricsReceived", now - 60, 900.0)
    write_metric(second, "carbon.relays.relay1.metricsSent", now - 60, 880.0)
    write_metric(second, "carbon.relays.relay1.metricsDropped", now - 60, 20.0)
    write_metric(first, "carbon.relays.relay1.metricsQueued", now - 60, 0.0)
    out = fab("relays", "-i", str(inventory), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)["relay1"]["summary"]["carbon-c-relay"]
    assert (summary["received"], summary["sent"], summary["dropped"], summary["queued"]) == (
        900.0, 880.0, 20.0, 0.0,
    )  # fmt: skip

    state = inventory.parent / names[HOSTS[2]] / "migrate"
    journal = Journal(str(state), names[HOSTS[2]])
    journal.add("plan7", "sync", [("a.b", "x"), ("a.c", "x")])
    journal.record("plan7", "sync", [("a.b", "x", "done", "")])
    journal.close()
    out = fab("migration-status", "-i", str(inventory), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report[names[HOSTS[2]]] == {"plan7": {"sync": {"done": 1, "pending": 1, "failed": 0}}}
    assert report[names[HOSTS[0]]] == {}


def test_hot_metrics_of_a_capture_ranks_and_projects_by_the_inventory_ring(
    site,
    traffic_pcap,  # noqa: F811 (the fixture imported above)
):
    inventory, tier, _ = site
    out = fab("hot-metrics", "-i", str(inventory), "--pcap", str(traffic_pcap), "--json")
    assert out.returncode == 0, out.stderr
    merged = json.loads(out.stdout)
    truth = {**LINE, **PICKLE, **STATSD}
    assert [n for n, _ in merged["top_metrics"]] == sorted(truth, key=truth.get, reverse=True)
    # Per instance, by carbon-c-relay -t on the same members the inventory gives.
    owners = relay_test_owners(tier.relay_config, [*LINE, *PICKLE])
    seconds = merged["points"]["line"] / merged["points_per_s"]["line"]
    expected = {}
    for name, count in {**LINE, **PICKLE}.items():
        expected[owners[name][0]] = expected.get(owners[name][0], 0) + count
    got = {m.split("=")[0]: round(r * seconds) for m, r in merged["instances"].items() if r}
    assert got == expected
    # The statsd daemons are the relays' statsd_instances (10.9.1.1:8127, :8129).
    assert set(merged["statsd_daemons"]) == {"10.9.1.1:8127:8128", "10.9.1.1:8129:8130"}
    assert round(sum(merged["statsd_daemons"].values()) * seconds) == sum(STATSD.values())


def _capturing() -> bool:
    """Whether the verb's tcpdump runs (it writes a carbonscale-hot-*.pcap)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"tcpdump\0") and b"carbonscale-hot-" in cmdline:
            return True
    return False


@pytest.mark.slow
def test_hot_metrics_captures_on_the_relays_over_ssh(site, tmp_path):
    """`--seconds`: tcpdump on each relay (here: the sshd's host, interface any, Linux
    cooked headers). Loopback-to-loopback line traffic is the pickle relay's own
    hand-off to carbon-c-relay and is left out, so only pickle and statsd count."""
    from test_ops import _drain_server, _send_traffic

    if shutil.which("tcpdump") is None or os.geteuid() != 0:
        pytest.skip("needs tcpdump and root")
    inventory, _, _ = site
    stop = threading.Event()
    servers = [_drain_server(p, stop) for p in (LINE_PORT, PICKLE_PORT)]
    try:
        process = subprocess.Popen(
            [*FAB, "hot-metrics", "-i", str(inventory), "--seconds", "25", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not _capturing() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # tcpdump opening its socket after exec
        _send_traffic()
        out, err = process.communicate(timeout=120)
    finally:
        stop.set()
        for server in servers:
            server.close()
    assert process.returncode == 0, err
    merged = json.loads(out)
    assert merged["relays"] == ["relay1"]
    assert merged["points"] == {
        "line": 0, "pickle": sum(PICKLE.values()), "statsd": sum(STATSD.values()),
    }  # fmt: skip
    assert [n for n, _ in merged["top_metrics"]] == sorted(
        {**PICKLE, **STATSD}, key={**PICKLE, **STATSD}.get, reverse=True
    )

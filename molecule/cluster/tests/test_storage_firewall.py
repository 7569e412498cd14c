"""The storage firewall (roles/carbon_storage, table inet carbonscale_storage):
carbon's ports on the storage hosts answer only the hosts that need them.

Probes are real TCP connects made on the hosts themselves: from a relay and
the query host the line port opens and a point sent there lands in whisper;
from a host outside the allowed groups (the LVS directors here) every carbon
port is refused with a reset, and the table's `refused` counter says so; on
the storage host itself, loopback and its own address still work (graphite-web
asks CarbonLink at the node's carbonscale_address). Hosts come from the
inventory's groups, never by name.
"""

from __future__ import annotations

import re
import time

import pytest
from cluster_hosts import setting, wait_for

ROLE = "carbon_storage"
WHISPER = "/var/lib/graphite/whisper"  # carbon_storage_whisper_dir's default
TABLE = "inet carbonscale_storage"

# Prints how a TCP connect to ADDRESS PORT ended: "open", or the exception's
# name (ConnectionRefusedError for a reset, TimeoutError for a drop).
PROBE = """python3 -c '
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("open")
except OSError as exc:
    print(type(exc).__name__)
' {address} {port}"""

# Sends one line-protocol point to ADDRESS PORT.
SEND = """python3 -c '
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as sock:
    sock.sendall(sys.argv[3].encode() + b"\\n")
' {address} {port} '{line}'"""

# Asks CarbonLink at ADDRESS PORT for a metric's cached points, as graphite-web
# does (4-byte length, then a pickled request); prints the answer's keys.
CARBONLINK_QUERY = """python3 -c '
import pickle, socket, struct, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
request = pickle.dumps({{"type": "cache-query", "metric": "molecule.firewall.query"}}, protocol=2)
sock.sendall(struct.pack("!L", len(request)) + request)
def read(size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("CarbonLink closed the connection")
        data += chunk
    return data
print(sorted(pickle.loads(read(struct.unpack("!L", read(4))[0]))))
' {address} {port}"""


def probe(cluster, source: str, address: str, port: int) -> str:
    return cluster.host(source).check_output(PROBE.format(address=address, port=port)).strip()


def refused_packets(cluster, storage: str) -> int:
    listed = cluster.host(storage).check_output(f"nft list counter {TABLE} refused")
    return int(re.search(r"packets (\d+)", listed).group(1))


def landed(cluster, storage: str, path: str, stamp: int) -> str:
    """The values whisper holds around stamp in path on storage, once it holds 42."""
    fetch = (
        f'python3 -c \'import whisper; _, v = whisper.fetch("{path}", {stamp - 60}, '
        f"{stamp + 60}); print([x for x in v if x is not None])'"
    )
    found = cluster.host(storage).run(fetch).stdout.strip()
    return found if found == "[42.0]" else ""


@pytest.fixture(scope="module")
def storage(cluster):
    """[(storage host, its address, its first instance)] for every storage host
    whose role runs the firewall."""
    found = [
        (name, cluster.address(name), cluster.vars(name)["carbon_instances"][0])
        for name in cluster.group("storage")
        if setting(cluster, name, ROLE, "carbon_storage_firewall")
    ]
    assert found, "no storage host runs the firewall (carbon_storage_firewall)"
    return found


@pytest.fixture(scope="module")
def outsiders(cluster, storage) -> list[str]:
    """Hosts in none of the groups the firewall lets write (the LVS directors)."""
    allowed = set()
    for group in setting(cluster, storage[0][0], ROLE, "carbon_storage_firewall_source_groups"):
        allowed.update(cluster.group(group))
    found = [name for name in cluster.group("all") if name not in allowed]
    assert found, "the inventory has no host outside the allowed groups to probe from"
    return found


def test_the_table_is_live_and_loaded_by_an_enabled_unit(cluster, storage):
    for name, _, _ in storage:
        host = cluster.host(name)
        unit = host.service("carbonscale-storage-firewall")
        assert unit.is_enabled and unit.is_running, name
        assert "reject with tcp reset" in host.check_output(f"nft list table {TABLE}")


def test_relays_and_query_hosts_reach_every_storage_line_port(cluster, storage):
    for name, address, instance in storage:
        for source in cluster.group("relays") + cluster.group("query"):
            assert probe(cluster, source, address, instance["line_port"]) == "open", (
                f"{source} -> {name} {address}:{instance['line_port']}"
            )


def test_a_point_sent_from_a_relay_to_a_storage_instance_lands(cluster, storage):
    relay = cluster.group("relays")[0]
    stamp = int(time.time()) // 10 * 10
    for name, address, instance in storage:
        metric = f"molecule.firewall.run{time.time_ns()}.{instance['name']}"
        line = f"{metric} 42 {stamp}"
        cluster.host(relay).check_output(
            SEND.format(address=address, port=instance["line_port"], line=line)
        )
        path = f"{WHISPER}/{metric.replace('.', '/')}.wsp"
        values = wait_for(
            lambda name=name, path=path: landed(cluster, name, path, stamp), timeout=60, step=1
        )
        assert values == "[42.0]", f"{relay} -> {name} {address}:{instance['line_port']}: {values}"


def test_a_host_outside_the_allowed_set_is_refused_and_counted(cluster, storage, outsiders):
    for name, address, instance in storage:
        before = refused_packets(cluster, name)
        ports = [instance[key] for key in ("line_port", "pickle_port", "query_port")]
        for source in outsiders:
            got = {port: probe(cluster, source, address, port) for port in ports}
            # A reset (refused at once), not a drop (a timeout): see the ruleset.
            assert set(got.values()) == {"ConnectionRefusedError"}, f"{source} -> {name}: {got}"
        assert refused_packets(cluster, name) - before >= len(outsiders) * len(ports), name


def test_carbonlink_answers_only_the_storage_host_itself(cluster, storage):
    for name, address, instance in storage:
        query_port = instance["query_port"]
        # graphite-web on the node asks CarbonLink at the node's own address.
        answer = cluster.host(name).check_output(
            CARBONLINK_QUERY.format(address=address, port=query_port)
        )
        assert answer.strip() == "['datapoints']", f"{name} {address}:{query_port}: {answer}"
        for source in cluster.group("relays") + cluster.group("query"):
            assert probe(cluster, source, address, query_port) == "ConnectionRefusedError", (
                f"{source} -> {name} {address}:{query_port}"
            )


def test_loopback_reaches_every_port_on_the_storage_host(cluster, storage):
    for name, _, instance in storage:
        for key in ("line_port", "pickle_port", "query_port"):
            assert probe(cluster, name, "127.0.0.1", instance[key]) == "open", f"{name} {key}"

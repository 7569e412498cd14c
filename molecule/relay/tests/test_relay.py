"""The relay tier in front of real carbon-cache instances.

Placement is checked per instance, not per host: carbon-cache logs
"creating database metric NAME" in its own unit's journal, so the journal of
carbon-cache@<name> on each storage host says which instance received a
metric first. Owners come from the rendered relay config through
`carbonscale ring locate --relay-config` and from carbon-c-relay's own -t mode.
"""

from __future__ import annotations

import re
import time

import pytest
import testinfra

testinfra_hosts = ["relay-relay1"]

RELAYS = {"relay-relay1": "172.31.4.21", "relay-relay2": "172.31.4.22"}
STORAGE = {"relay-storage1": "172.31.4.31", "relay-storage2": "172.31.4.32"}
INSTANCES = {"a": 2103, "b": 2203}
# carbon_ring_members: hosts in inventory order, instances in list order.
MEMBERS = [
    f"{address}:{port}={name}" for address in STORAGE.values() for name, port in INSTANCES.items()
]
STATSD_BACKENDS = [
    f"{address}:{port}:{admin}"
    for address in RELAYS.values()
    for port, admin in ((8127, 8128), (8129, 8130))
]
CARBONSCALE = "/opt/carbonscale/venv/bin/carbonscale"
RELAY_CONFIG = "/etc/carbon-c-relay.conf"
WHISPER = "/var/lib/graphite/whisper"


@pytest.fixture(scope="module")
def hosts(request):
    inventory = request.config.option.ansible_inventory
    return {
        name: testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory)
        for name in [*RELAYS, *STORAGE]
    }


def _stamp(host) -> str:
    return host.check_output("date +%s%N")


def _locate(host, names: list[str]) -> dict[str, str]:
    """{metric: 'address:port'} from the live relay's config, primary owner."""
    out = host.check_output(
        f"printf '%s\\n' {' '.join(names)} | "
        f"{CARBONSCALE} ring locate --relay-config {RELAY_CONFIG} --cluster storage"
    )
    located = {}
    for line in out.splitlines():
        metric, *owners = line.split("\t")
        located[metric] = owners[0]
    return located


def _created_by(hosts, names: set[str], timeout: float = 150) -> dict[str, list[str]]:
    """{metric: ['address:line_port', ...]} of the instances whose journal logs its creation."""
    pattern = re.compile(r"creating database metric (\S+)")
    deadline = time.monotonic() + timeout
    while True:
        created: dict[str, list[str]] = {}
        for storage, address in STORAGE.items():
            for name, port in INSTANCES.items():
                text = hosts[storage].check_output(
                    f"journalctl -q -o cat -u carbon-cache@{name} --no-pager"
                )
                for metric in pattern.findall(text):
                    if metric in names:
                        created.setdefault(metric, []).append(f"{address}:{port}")
        if set(created) >= names or time.monotonic() > deadline:
            return created
        time.sleep(3)


def test_services_run_and_units_verify(hosts):
    for relay in RELAYS:
        host = hosts[relay]
        for unit in (
            "carbon-c-relay",
            "carbonscale-pickle-relay",
            "statsd@a",
            "statsd@b",
            "carbonscale-statsd-relay",
        ):
            assert host.service(unit).is_running, f"{relay} {unit}"
            assert host.service(unit).is_enabled, f"{relay} {unit}"
        for unit in ("carbonscale-pickle-relay.service", "carbonscale-statsd-relay.service"):
            check = host.run(f"systemd-analyze verify {unit}")
            assert check.rc == 0 and check.stderr.strip() == "", check.stderr
        assert host.socket("tcp://0.0.0.0:2003").is_listening
        assert host.socket("tcp://0.0.0.0:2004").is_listening
        assert host.socket("udp://0.0.0.0:8125").is_listening


def test_rendered_config_has_the_storage_members_and_the_relay_accepts_it(hosts):
    for relay in RELAYS:
        host = hosts[relay]
        config = host.file(RELAY_CONFIG).content_string
        block = config.split('cluster "storage"', 1)[1].split(";", 1)[0]
        assert block.split()[:3] == ["carbon_ch", "replication", "1"]
        assert block.split()[3:] == MEMBERS
        check = host.run(f"carbon-c-relay -t -f {RELAY_CONFIG} < /dev/null")
        assert check.rc == 0, check.stdout + check.stderr
        limits = host.check_output("systemctl show -p LimitNOFILE --value carbon-c-relay")
        assert limits == "65536"


def test_locate_agrees_with_the_relays_own_test_mode(hosts):
    host = hosts["relay-relay1"]
    names = [
        f"molecule.agree.{i}.ünï" if i % 7 == 0 else f"molecule.agree.{i}" for i in range(2000)
    ]
    host.check_output(f"printf '%s\\n' {' '.join(names)} > /tmp/agree.txt")
    located = host.check_output(
        f"{CARBONSCALE} ring locate --relay-config {RELAY_CONFIG} < /tmp/agree.txt"
    )
    ours = {line.split("\t")[0]: line.split("\t")[1] for line in located.splitlines()}
    # -t skips the live relay's name rewrite ('ü' -> '__'), and the config drops
    # lines without a value: give it the rewritten names, as whole lines.
    assert "molecule.agree.0.__n__" in ours
    host.check_output(f"printf '%s 1 1700000000\\n' {' '.join(ours)} > /tmp/agree-lines.txt")
    out = host.check_output(f"carbon-c-relay -t -f {RELAY_CONFIG} < /tmp/agree-lines.txt")
    relay_says = {}
    for block in re.split(r"(?m)^match\n", out)[1:]:
        lines = block.strip().splitlines()
        if len(lines) > 2 and "-> " in lines[0] and "_ch(" in lines[1]:
            relay_says[lines[0].split("-> ", 1)[1]] = lines[2].strip()
    assert len(relay_says) == len(names)
    assert ours == relay_says


@pytest.mark.parametrize(("protocol", "port"), [("line", 2003), ("pickle", 2004)])
def test_metrics_are_created_by_the_instance_the_ring_names(hosts, protocol, port):
    sender = hosts["relay-relay2"]
    prefix = f"molecule.{protocol}.run{_stamp(sender)}."
    names = [f"{prefix}{i:06d}" for i in range(200)]
    expected = _locate(hosts["relay-relay1"], names)
    # To the other relay's listener, across the network, as a client would.
    sender.check_output(
        f"{CARBONSCALE} gen -c 200 -x 1 -p {prefix} --format {protocol} "
        f"--send {RELAYS['relay-relay1']}:{port}"
    )
    created = _created_by(hosts, set(names))
    wrong = {m: (created.get(m), expected[m]) for m in names if created.get(m) != [expected[m]]}
    assert not wrong, (
        f"{len(wrong)} of 200 not created (only) by their owner: {list(wrong.items())[:3]}"
    )
    # Every instance got some: the ring spreads, the test is not vacuous.
    assert set(expected.values()) == {m.split("=")[0] for m in MEMBERS}


def _statsd_journal_names(host, unit: str, prefix: str) -> set[str]:
    # statsd's dumpMessages logs each received line: "name:value|type".
    text = host.check_output(f"journalctl -q -o cat -u {unit} --no-pager")
    return set(re.findall(re.escape(prefix) + r"\d+(?=:)", text))


def _whisper_sum(host, path: str) -> float | None:
    out = host.run(
        "python3 -c 'import sys, whisper; (s, e, st), v = whisper.fetch(sys.argv[1], 0); "
        "print(sum(x for x in v if x is not None))' " + path
    )
    return float(out.stdout) if out.rc == 0 else None


def test_statsd_metrics_aggregate_in_one_daemon_and_land_where_the_ring_says(hosts):
    relay1, relay2 = hosts["relay-relay1"], hosts["relay-relay2"]
    assert relay1.check_output(
        f"{CARBONSCALE} relay statsd @/etc/carbonscale/statsd-relay.args --check-config"
    ).splitlines() == [f"{i} {b}" for i, b in enumerate(STATSD_BACKENDS)]

    prefix = f"molecule.statsd.run{_stamp(relay1)}."
    names = [f"{prefix}{i:06d}" for i in range(40)]
    # 25 increments of each name through each relay: 50 per name in total.
    send = f"{CARBONSCALE} gen -c 40 -x 25 -v 1 -p {prefix} --format statsd"
    relay1.check_output(f"{send} --send 127.0.0.1:8125")
    relay2.check_output(f"{send} --send 127.0.0.1:8125")

    located = {}
    for line in relay1.check_output(
        f"{CARBONSCALE} relay statsd @/etc/carbonscale/statsd-relay.args "
        + " ".join(f"--locate {n}" for n in names)
    ).splitlines():
        name, backend = line.split()
        located[name] = backend.rsplit(":", 1)[0]  # address:port, no admin port
    seen: dict[str, list[str]] = {}
    for relay, address in RELAYS.items():
        for instance, port in (("a", 8127), ("b", 8129)):
            for name in _statsd_journal_names(hosts[relay], f"statsd@{instance}", prefix):
                seen.setdefault(name, []).append(f"{address}:{port}")
    assert {n: seen.get(n) for n in names} == {n: [located[n]] for n in names}

    # The aggregates (stats.counters.<name>.count, once per flush) are
    # metrics like any other: carbon-c-relay sends them to their ring owner.
    counts = [f"stats.counters.{n}.count" for n in names]
    owners = _locate(relay1, counts)
    created = _created_by(hosts, set(counts))
    assert {c: created.get(c) for c in counts} == {c: [owners[c]] for c in counts}
    address_to_host = {address: host for host, address in STORAGE.items()}
    totals = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        totals = {
            c: _whisper_sum(
                hosts[address_to_host[owners[c].split(":")[0]]],
                f"{WHISPER}/{c.replace('.', '/')}.wsp",
            )
            for c in counts
        }
        if all(v == 50.0 for v in totals.values()):
            break
        time.sleep(3)
    assert totals == {c: 50.0 for c in counts}


def test_relays_report_their_own_counters(hosts):
    """carbon-c-relay, the pickle relay and the statsd relay each write their
    counters through carbon-c-relay, so they land in whisper too."""
    found = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for relay in RELAYS:
            for kind, metric in (
                ("carbon-c-relay", f"carbon.relays.{relay}.metricsReceived"),
                ("pickle", f"carbon.relays.{relay}.pickle.frames"),
                ("statsd", f"carbon.relays.{relay}.statsd.metrics_forwarded"),
            ):
                path = f"{WHISPER}/{metric.replace('.', '/')}.wsp"
                found[(relay, kind)] = any(hosts[s].file(path).exists for s in STORAGE)
        if all(found.values()):
            break
        time.sleep(5)
    assert all(found.values()), found

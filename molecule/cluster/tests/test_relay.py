"""The relay tier in front of real carbon-cache instances.

Placement is checked per instance, not per host: carbon-cache logs
"creating database metric NAME" in its own unit's journal, so the journal of
carbon-cache@<name> on each storage host says which instance received a
metric first. Owners come from the rendered relay config through
`carbonscale ring locate --relay-config` and from carbon-c-relay's own -t mode.
Relays, storage hosts, their instances and the statsd daemons come from the
inventory (the `relays` and `storage` groups).
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest

CARBONSCALE = "/opt/carbonscale/venv/bin/carbonscale"
RELAY_CONFIG = "/etc/carbon-c-relay.conf"
WHISPER = "/var/lib/graphite/whisper"


@pytest.fixture(scope="module")
def tier(cluster):
    """The relay tier as the inventory describes it."""
    relays = {name: cluster.address(name) for name in cluster.group("relays")}
    storage = {name: cluster.address(name) for name in cluster.group("storage")}
    assert len(relays) >= 2, "the relay checks send from one relay to another"
    # {storage host: {instance name: line port}}
    instances = {
        name: {i["name"]: i["line_port"] for i in cluster.vars(name)["carbon_instances"]}
        for name in storage
    }
    first_relay = next(iter(relays))
    return SimpleNamespace(
        relays=relays,
        storage=storage,
        instances=instances,
        # carbon_ring_members: hosts in inventory order, instances in list order.
        members=[
            f"{storage[name]}:{port}={instance}"
            for name in storage
            for instance, port in instances[name].items()
        ],
        # {relay host: {statsd instance name: port}}
        statsd={
            name: {i["name"]: i["port"] for i in cluster.vars(name)["statsd_instances"]}
            for name in relays
        },
        # The statsd relay's backends: every relay's daemons, inventory order.
        statsd_backends=[
            f"{relays[name]}:{i['port']}:{i['admin_port']}"
            for name in relays
            for i in cluster.vars(name)["statsd_instances"]
        ],
        first_relay=first_relay,
        hash=cluster.vars(first_relay)["carbon_relay_hash"],
        replication=cluster.vars(first_relay)["carbon_relay_replication"],
    )


@pytest.fixture(scope="module")
def hosts(cluster, tier):
    return {name: cluster.host(name) for name in [*tier.relays, *tier.storage]}


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


def _created_by(hosts, tier, names: set[str], timeout: float = 150) -> dict[str, list[str]]:
    """{metric: ['address:line_port', ...]} of the instances whose journal logs its creation."""
    pattern = re.compile(r"creating database metric (\S+)")
    deadline = time.monotonic() + timeout
    while True:
        created: dict[str, list[str]] = {}
        for storage, address in tier.storage.items():
            for name, port in tier.instances[storage].items():
                text = hosts[storage].check_output(
                    f"journalctl -q -o cat -u carbon-cache@{name} --no-pager"
                )
                for metric in pattern.findall(text):
                    if metric in names:
                        created.setdefault(metric, []).append(f"{address}:{port}")
        if set(created) >= names or time.monotonic() > deadline:
            return created
        time.sleep(3)


def test_services_run_and_units_verify(hosts, tier):
    for relay in tier.relays:
        host = hosts[relay]
        units = ["carbon-c-relay", "carbonscale-pickle-relay", "carbonscale-statsd-relay"]
        units += [f"statsd@{instance}" for instance in tier.statsd[relay]]
        for unit in units:
            assert host.service(unit).is_running, f"{relay} {unit}"
            assert host.service(unit).is_enabled, f"{relay} {unit}"
        for unit in ("carbonscale-pickle-relay.service", "carbonscale-statsd-relay.service"):
            check = host.run(f"systemd-analyze verify {unit}")
            assert check.rc == 0 and check.stderr.strip() == "", check.stderr
        assert host.socket("tcp://0.0.0.0:2003").is_listening
        assert host.socket("tcp://0.0.0.0:2004").is_listening
        assert host.socket("udp://0.0.0.0:8125").is_listening


def test_rendered_config_has_the_storage_members_and_the_relay_accepts_it(hosts, tier):
    for relay in tier.relays:
        host = hosts[relay]
        config = host.file(RELAY_CONFIG).content_string
        block = config.split('cluster "storage"', 1)[1].split(";", 1)[0]
        assert block.split()[:3] == [tier.hash, "replication", str(tier.replication)]
        assert block.split()[3:] == tier.members
        check = host.run(f"carbon-c-relay -t -f {RELAY_CONFIG} < /dev/null")
        assert check.rc == 0, check.stdout + check.stderr
        limits = host.check_output("systemctl show -p LimitNOFILE --value carbon-c-relay")
        assert limits == "65536"


def test_locate_agrees_with_the_relays_own_test_mode(hosts, tier):
    host = hosts[tier.first_relay]
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
def test_metrics_are_created_by_the_instance_the_ring_names(hosts, tier, protocol, port):
    first, second = list(tier.relays)[:2]
    sender = hosts[second]
    prefix = f"molecule.{protocol}.run{_stamp(sender)}."
    names = [f"{prefix}{i:06d}" for i in range(200)]
    expected = _locate(hosts[first], names)
    # To the other relay's listener, across the network, as a client would.
    sender.check_output(
        f"{CARBONSCALE} gen -c 200 -x 1 -p {prefix} --format {protocol} "
        f"--send {tier.relays[first]}:{port}"
    )
    created = _created_by(hosts, tier, set(names))
    wrong = {m: (created.get(m), expected[m]) for m in names if created.get(m) != [expected[m]]}
    assert not wrong, (
        f"{len(wrong)} of 200 not created (only) by their owner: {list(wrong.items())[:3]}"
    )
    # Every instance got some: the ring spreads, the test is not vacuous.
    assert set(expected.values()) == {m.split("=")[0] for m in tier.members}


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


def test_statsd_metrics_aggregate_in_one_daemon_and_land_where_the_ring_says(hosts, tier):
    relay1 = hosts[tier.first_relay]
    assert relay1.check_output(
        f"{CARBONSCALE} relay statsd @/etc/carbonscale/statsd-relay.args --check-config"
    ).splitlines() == [f"{i} {b}" for i, b in enumerate(tier.statsd_backends)]

    prefix = f"molecule.statsd.run{_stamp(relay1)}."
    names = [f"{prefix}{i:06d}" for i in range(40)]
    # 25 increments of each name through each relay: 25 x relays per name in total.
    send = f"{CARBONSCALE} gen -c 40 -x 25 -v 1 -p {prefix} --format statsd"
    for relay in tier.relays:
        hosts[relay].check_output(f"{send} --send 127.0.0.1:8125")
    total = 25.0 * len(tier.relays)

    located = {}
    for line in relay1.check_output(
        f"{CARBONSCALE} relay statsd @/etc/carbonscale/statsd-relay.args "
        + " ".join(f"--locate {n}" for n in names)
    ).splitlines():
        name, backend = line.split()
        located[name] = backend.rsplit(":", 1)[0]  # address:port, no admin port
    seen: dict[str, list[str]] = {}
    for relay, address in tier.relays.items():
        for instance, port in tier.statsd[relay].items():
            for name in _statsd_journal_names(hosts[relay], f"statsd@{instance}", prefix):
                seen.setdefault(name, []).append(f"{address}:{port}")
    assert {n: seen.get(n) for n in names} == {n: [located[n]] for n in names}

    # The aggregates (stats.counters.<name>.count, once per flush) are
    # metrics like any other: carbon-c-relay sends them to their ring owner.
    counts = [f"stats.counters.{n}.count" for n in names]
    owners = _locate(relay1, counts)
    created = _created_by(hosts, tier, set(counts))
    assert {c: created.get(c) for c in counts} == {c: [owners[c]] for c in counts}
    address_to_host = {address: host for host, address in tier.storage.items()}
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
        if all(v == total for v in totals.values()):
            break
        time.sleep(3)
    assert totals == {c: total for c in counts}


def test_relays_report_their_own_counters(hosts, tier):
    """carbon-c-relay, the pickle relay and the statsd relay each write their
    counters through carbon-c-relay, so they land in whisper too."""
    found = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for relay in tier.relays:
            for kind, metric in (
                ("carbon-c-relay", f"carbon.relays.{relay}.metricsReceived"),
                ("pickle", f"carbon.relays.{relay}.pickle.frames"),
                ("statsd", f"carbon.relays.{relay}.statsd.metrics_forwarded"),
            ):
                path = f"{WHISPER}/{metric.replace('.', '/')}.wsp"
                found[(relay, kind)] = any(hosts[s].file(path).exists for s in tier.storage)
        if all(found.values()):
            break
        time.sleep(5)
    assert all(found.values()), found

"""Names and values as clients really send them, through the front door, read
back from the storage hosts' disks (issue 19, item 5):

- lines carbon-cache cannot store (infinities, NaN, 1e400, timestamps such as
  1e20 and -5, names too long to be a file, tags without a name:
  tests/line_samples.py) sent to VIP:2003, the same values as pickle to
  VIP:2004, and statsd values inf/NaN and sample rate @0 to VIP:8125: nothing
  is stored, the relays count each one (carbon-c-relay's metricsBlackholed,
  the statsd relay's metrics_refused, read back from whisper);
- 10,000 random byte-string names (UTF-8, invalid UTF-8, NUL, punctuation,
  empty components, leading dots, tags) sent to VIP:2003: carbon-c-relay
  rewrites them before it hashes, and every line it accepts has its whisper
  file on exactly the hosts `carbonscale ring locate` names with the live
  relay's config, and nowhere else; the lines it must drop leave no file;
- no host's journal logged a Python traceback meanwhile.

Sent from this machine over the scenario's network. Each check writes under
a prefix of its own (molecule.*: the scenario's small schema) and removes its
files afterwards, so the checks after it see the cluster as it was.
"""

from __future__ import annotations

import math
import pickle
import random
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from carbon.util import TaggedSeries
from cluster_hosts import (
    front_door,
    owners_by_member,
    setting,
    tracebacks_since,
    wait_for,
    whisper_paths,
)
from whisper_points import newest_values, points_on_disk

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from line_samples import good_and_bad_lines, random_name

from carbonscale.relay_names import relay_line

CARBONSCALE = Path(sys.executable).parent / "carbonscale"
RELAY_CONFIG = "/etc/carbon-c-relay.conf"  # the carbon_relay role's default
NAMES = 10_000
# carbon-cache writes asynchronously and paces new files (MAX_CREATES_PER_MINUTE):
# how long the checks wait for files, and for the relays' counters (sent every
# carbon_relay_statistics_interval, 10 s here) to reach whisper.
PATIENCE = 150


def send_tcp(address: tuple[str, int], data: bytes) -> None:
    """Write data on one connection and close it the way a careful client does:
    shut down writing, then wait for the other side's close."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        while sock.recv(65536):
            pass


def remove_files(cluster, paths_by_host: dict[str, set[str]]) -> None:
    for host, paths in paths_by_host.items():
        root = setting(cluster, host, "carbon_storage", "carbon_storage_whisper_dir")
        paths = sorted(paths)
        for i in range(0, len(paths), 400):  # under the kernel's 128 KiB per argument
            chunk = " ".join(f"'{root}/{path}'" for path in paths[i : i + 400])
            cluster.host(host).run(f"rm -rf {chunk}")


def relay_counter_total(cluster, name: str) -> float:
    """The sum over the relays of carbon.relays.<relay>.<name> as it last reached
    whisper: carbon-c-relay's counters, which count from its start."""
    metrics = [f"carbon.relays.{relay}.{name}" for relay in cluster.group("relays")]
    return sum(newest_values(cluster, metrics).values())


def statsd_relay_counted_since(cluster, name: str, since: int) -> float:
    """The sum over the relays of carbon.relays.<relay>.statsd.<name> since `since`:
    the statsd relay sends what each interval counted."""
    total = 0.0
    for relay in cluster.group("relays"):
        points = points_on_disk(
            cluster, cluster.group("storage"), f"carbon.relays.{relay}.statsd", 900
        )
        total += sum(v for (leaf, ts), v in points.items() if leaf == name and int(ts) >= since)
    return total


# ----- lines carbon-cache cannot store -------------------------------------

STATSD_REFUSED = [b"inf|g", b"-Infinity|g", b"NaN|ms", b"1e400|g", b"1|c|@0", b"1|c|@-0.5"]


def test_lines_carbon_cannot_store_are_dropped_counted_and_never_stored(cluster):
    stamp = int(time.time())
    top = f"molecule/bad{stamp}"
    prefix = f"molecule.bad{stamp}."
    _, bad, _ = good_and_bad_lines(prefix.encode(), b"%d" % stamp)
    pickled = [
        (f"{prefix}pickle.inf", (stamp, math.inf)),
        (f"{prefix}pickle.nan", (stamp, math.nan)),
        (f"{prefix}pickle.future", (1e20, 1.0)),
        (f"{prefix}pickle.negative", (-5, 1.0)),
        (f"{prefix}pickle." + "n" * 300, (stamp, 1.0)),
    ]
    payload = pickle.dumps(pickled, protocol=2)
    statsd = [f"{prefix}statsd.{i}:".encode() + line for i, line in enumerate(STATSD_REFUSED)]
    blackholed = relay_counter_total(cluster, "metricsBlackholed")
    # The statsd relay's interval that holds the sending, and those after it.
    since = stamp - int(
        setting(cluster, cluster.group("relays")[0], "statsd_relay", "statsd_relay_stats_interval")
    )

    send_tcp(front_door(cluster, 2003), b"".join(line + b"\n" for line in bad))
    send_tcp(front_door(cluster, 2004), struct.pack("!L", len(payload)) + payload)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for datagram in statsd:
            udp.sendto(datagram, front_door(cluster, 8125))

    counted = wait_for(
        lambda: (
            relay_counter_total(cluster, "metricsBlackholed") - blackholed >= len(bad)
            and statsd_relay_counted_since(cluster, "metrics_refused", since) >= len(statsd)
        ),
        PATIENCE,
        step=5,
    )
    blackholed = relay_counter_total(cluster, "metricsBlackholed") - blackholed
    refused = statsd_relay_counted_since(cluster, "metrics_refused", since)
    # Whatever a relay let through would be in carbon-cache's files within
    # seconds of the counters: look after one more statistics interval.
    time.sleep(10)
    storage = cluster.group("storage")
    stored = {}
    for host in storage:
        files = {
            path
            for path in whisper_paths(cluster, host, newer_than=stamp - 1)
            if f"bad{stamp}" in path or path.startswith("_tagged/")
        }
        if files:
            stored[host] = files
    tracebacks = tracebacks_since(cluster, stamp)
    remove_files(cluster, {host: {top} for host in storage})
    print(
        f"\nthrough the front door: {len(bad)} line-protocol lines, {len(pickled)} pickled "
        f"points and {len(statsd)} statsd samples carbon cannot store; relays' counters: "
        f"metricsBlackholed +{blackholed:.0f}, statsd metrics_refused +{refused:.0f}; "
        f"files stored: {sum(len(f) for f in stored.values())}; hosts with tracebacks: "
        f"{sorted(tracebacks)}"
    )
    assert not stored, stored
    assert counted, (blackholed, len(bad), refused, len(statsd))
    assert not tracebacks, tracebacks


# ----- random byte-string names ----------------------------------------------

# What carbon-c-relay's validate rule lets through after a name's tags: printable
# ASCII with a '=' (roles/carbon_relay/templates/carbon-c-relay.conf.j2).
TAGS = re.compile(rb"[!-~]*=[!-~]*")


def stored_metric(line: bytes) -> tuple[bytes, str] | None:
    """(the name the relay routes, the metric carbon-cache stores) for a line
    the relay accepts and passes on (names here are short), else None."""
    result = relay_line(line)
    if result is None:
        return None
    sent, end = result
    fields = sent.split(b" ")
    name = sent[:end]
    if not name or b" " in name or len(fields) != 3:
        return None
    if fields[0] != name and not TAGS.fullmatch(fields[0][len(name) :]):
        return None
    return name, fields[0].decode()


def whisper_path(metric: str) -> str:
    """Where carbon-cache writes metric, relative to its storage directory
    (carbon's own encoding: tagged names as a hash under _tagged/)."""
    return TaggedSeries.encode(metric, "/", hash_only=True) + ".wsp"


def test_random_byte_names_are_stored_where_locate_says(cluster, tmp_path):
    stamp = int(time.time())
    top = f"molecule/names{stamp}"
    rng = random.Random(stamp)
    prefix = b"molecule.names%d." % stamp
    # No line breaks inside: a second line's name would fall outside the prefix
    # (the unit test against a live relay covers them: tests/test_relay_names.py).
    lines = [prefix + random_name(rng, i, False) for i in range(NAMES)]
    # Every 50th with tags the relay passes on (few random ones have a '=').
    lines = [name + (b";dc=eu;n=%d" % i if i % 50 == 0 else b"") for i, name in enumerate(lines)]
    lines = [name + b" %d %d" % (i, stamp) for i, name in enumerate(lines)]

    relay = cluster.group("relays")[0]
    config = tmp_path / "carbon-c-relay.conf"
    config.write_bytes(cluster.host(relay).file(RELAY_CONFIG).content)
    located = subprocess.run(
        [CARBONSCALE, "ring", "locate", "--relay-config", str(config), "--cluster", "storage"],
        input=b"".join(line + b"\n" for line in lines),
        capture_output=True,
        check=True,
    )
    members = owners_by_member(cluster)
    owners = {}
    for row in located.stdout.splitlines():
        name, *addresses = row.split(b"\t")
        owners[name] = {members[address.decode()][0] for address in addresses}

    expected: dict[str, set[str]] = {}  # whisper path -> the hosts locate names
    line_of: dict[str, bytes] = {}
    renamed = tagged = 0
    for line in lines:
        stored = stored_metric(line)
        if stored is None:
            continue
        name, metric = stored
        path = whisper_path(metric)
        expected.setdefault(path, set()).update(owners[name])
        line_of[path] = line
        renamed += not line.startswith((name + b" ", name + b";"))
        tagged += ";" in metric
    storage = cluster.group("storage")

    def found() -> dict[str, set[str]]:
        where: dict[str, set[str]] = {}
        for host in storage:
            for path in whisper_paths(cluster, host, top) | whisper_paths(cluster, host, "_tagged"):
                if path.startswith(top) or path in expected:
                    where.setdefault(path, set()).add(host)
        return where

    def complete() -> bool:
        now = found()
        return all(expected[path] <= now.get(path, set()) for path in expected)

    try:
        send_tcp(front_door(cluster, 2003), b"".join(line + b"\n" for line in lines))
        done = wait_for(complete, PATIENCE / 2, step=5)
        resent = 0
        if not done:
            # Files carbon-cache would not create yet (MAX_CREATES_PER_MINUTE
            # drops their points): sent again once, as a client would.
            now = found()
            missing = [line_of[p] for p in expected if not expected[p] <= now.get(p, set())]
            resent = len(missing)
            send_tcp(front_door(cluster, 2003), b"".join(line + b"\n" for line in missing))
            wait_for(complete, PATIENCE, step=5)
        where = found()
        tracebacks = tracebacks_since(cluster, stamp)
    finally:
        remove_files(
            cluster,
            {host: {top} | {p for p in expected if p.startswith("_tagged/")} for host in storage},
        )

    absent = {p: sorted(expected[p] - where.get(p, set())) for p in expected}
    absent = {p: hosts for p, hosts in absent.items() if hosts}
    strays = {p: sorted(where[p] - expected.get(p, set())) for p in where}
    strays = {p: hosts for p, hosts in strays.items() if hosts}
    print(
        f"\n{NAMES} random byte-string names through the front door: {len(expected)} "
        f"stored ({renamed} renamed by the relay, {tagged} tagged), "
        f"{NAMES - len(expected)} dropped as the relay must; sent again after the "
        f"create limit: {resent}; files missing on the hosts locate names: {len(absent)}, "
        f"files on other hosts or not expected: {len(strays)}; hosts with tracebacks: "
        f"{sorted(tracebacks)}"
    )
    assert not absent, list(absent.items())[:5]
    assert not strays, list(strays.items())[:5]
    assert not tracebacks, tracebacks

"""`carbonscale migrate` on three real storage nodes with carbon-cache running.

History sits on the old ring's owners (whisper files with known points, as the
old owners' carbon wrote them), copies left by an old failover sit on node3 (in
no ring), and new points arrive through carbon on the new ring's owners. Then
plan, sync, verify and cleanup run on the nodes as a playbook runs them (the
CLI, as the whisper tree's owner, with the file service between the nodes),
and every whisper file is read back with whisper's own reader: each metric must
be on exactly its new owners' hosts, holding every point sent, and nowhere else.

Owners come from carbon-c-relay -t on the controller (the relay the cluster
runs), not from carbonscale's own ring code. Nodes are reached with
`docker exec` (the containers are the molecule platforms).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from relay_oracle import needs_relay, relay_test_owners, write_cluster_config

pytestmark = needs_relay

NODES = {
    "172.31.10.31": "migrate-node1",
    "172.31.10.32": "migrate-node2",
    "172.31.10.33": "migrate-node3",
}
N1, N2, N3 = NODES  # N3 holds stray copies and is in no ring
ROOT = "/var/lib/graphite/whisper"
STATE = "/var/lib/carbonscale/migrate"
SECRET = "/etc/carbonscale/migrate.secret"
SERVICE = "carbonscale-migrate-serve"
SCHEMA = [(60, 1440), (300, 2016)]  # the scenario's schema for ^mig\.
OLD = [f"{N1}:2103=n1a", f"{N1}:2203=n1b", f"{N2}:2103=n2a"]
NEW = [*OLD, f"{N2}:2203=n2b"]  # appended: also a valid jump_fnv1a_ch change

# Whisper files with known points, as carbon would have written them (same
# schema and aggregation as the scenario's storage-schemas.conf).
WRITE_PY = f"""
import json, os, sys, whisper
for path, points in json.load(sys.stdin).items():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        whisper.create(path, {SCHEMA!r}, xFilesFactor=0.5, aggregationMethod="average")
    whisper.update_many(path, points)
"""
# Every test metric's finest archive on a node: {metric: {ts: value}} or "corrupt".
READ_PY = """
import json, os, sys, time, whisper
root, now, found = sys.argv[1], int(time.time()), {}
for top, _, files in os.walk(os.path.join(root, "mig")):
    for name in files:
        path = os.path.join(top, name)
        metric = os.path.relpath(path, root)[: -len(".wsp")].replace("/", ".")
        try:
            (start, _, step), values = whisper.fetch(path, now - 86000, now)
        except Exception:
            found[metric] = "corrupt"
            continue
        found[metric] = {start + i * step: v for i, v in enumerate(values) if v is not None}
print(json.dumps(found))
"""
# Line protocol to carbon: stdin lines "ADDRESS PORT metric value timestamp".
SEND_PY = """
import socket, sys
by_dest = {}
for line in sys.stdin:
    address, port, payload = line.split(" ", 2)
    by_dest.setdefault((address, int(port)), []).append(payload)
for dest, lines in by_dest.items():
    with socket.create_connection(dest, timeout=10) as sock:
        sock.sendall("".join(lines).encode())
"""


def docker(address, *argv, user="_graphite", stdin=b"", timeout=300):
    return subprocess.run(
        ["docker", "exec", "-i", "-u", user, NODES[address], *argv],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )


def put(address, path, data: bytes):
    done = docker(address, "sh", "-c", f"cat > {path}", stdin=data)
    assert done.returncode == 0, done.stderr


def migrate(address, verb, *args, timeout=300):
    done = docker(address, "carbonscale", "migrate", verb, *args, timeout=timeout)
    done.out, done.err = done.stdout.decode(), done.stderr.decode()
    return done


def step_args(address, plan):
    return ["--plan", plan, "--self", address, "--root", ROOT, "--state-dir", STATE,
            "--secret-file", SECRET]  # fmt: skip


def read_all(address) -> dict:
    done = docker(address, "python3", "-c", READ_PY, ROOT)
    assert done.returncode == 0, done.stderr
    return {m: v if v == "corrupt" else {int(t): x for t, x in v.items()}
            for m, v in json.loads(done.stdout).items()}  # fmt: skip


def reset():
    """Empty every node's test tree, staging, quarantine and plans between cases."""
    for address in NODES:
        paths = [f"{ROOT}/mig", f"{ROOT}/.staging", f"{ROOT}/.quarantine"]
        paths += [f"{STATE}/{tag}-plan.tsv" for tag in ("bad", "kill")]
        assert docker(address, "rm", "-rf", *paths, user="root").returncode == 0


def hosts_of(placed: dict[str, list[str]]) -> dict[str, set[str]]:
    return {m: {owner.rsplit(":", 1)[0] for owner in owners} for m, owners in placed.items()}


class Case:
    """One migration: metrics, old and new ring, what was sent, the plan on the nodes."""

    def __init__(self, tmp: Path, tag: str, hash_type: str, replication: int, count: int):
        reset()
        self.tag = tag
        rng = random.Random(f"{tag}{hash_type}{replication}")
        self.metrics = [
            f"mig.{tag}.web{rng.randrange(9)}.{rng.choice(['cpu', 'mem', 'disk.sda'])}.m{i}"
            for i in range(count)
        ]
        self.configs = {}
        for side, members, repl in (("old", OLD, min(replication, 2)), ("new", NEW, replication)):
            local = write_cluster_config(tmp / f"{tag}-{side}.conf", hash_type, repl, members)
            self.configs[side] = f"{STATE}/{tag}-{side}.conf"
            put(N1, self.configs[side], local.read_bytes())
        old = relay_test_owners(tmp / f"{tag}-old.conf", self.metrics)
        new_members = relay_test_owners(tmp / f"{tag}-new.conf", self.metrics)
        self.old_owners, self.new_owners = hosts_of(old), hosts_of(new_members)
        self.plan_file = f"{STATE}/{tag}-plan.tsv"
        now = int(time.time()) // 60 * 60
        self.expected: dict[str, dict[int, float]] = {}
        self.sent: set[str] = set()  # the metrics new points were sent for
        files: dict[str, dict[str, list]] = {a: {} for a in NODES}
        lines = []
        for index, metric in enumerate(self.metrics):
            path = f"{ROOT}/{metric.replace('.', '/')}.wsp"
            history = [(now - 19980 + 120 * k, float(index * 1000 + k)) for k in range(100)]
            recent = [(now - 3000 + 60 * k, float(-index * 100 - k - 1)) for k in range(20)]
            for host in self.old_owners[metric]:
                files[host][path] = history
            points = dict(history)
            if index % 4 == 0:  # an old failover scattered it onto node3
                stray = [(now - 30000 + 120 * k, index * 1000 + 500.5 + k) for k in range(20)]
                files[N3][path] = stray
                points.update(stray)
            self.expected[metric] = points
            if index % 5 == 1:  # no new point since the switch: only the history has it
                continue
            for member in new_members[metric]:  # what the relays send the new owners
                address, port = member.rsplit(":", 1)
                lines += [f"{address} {port} {metric} {v!r} {t}\n" for t, v in recent]
            points.update(recent)
            self.sent.add(metric)
        for address, content in files.items():
            done = docker(address, "python3", "-c", WRITE_PY, stdin=json.dumps(content).encode())
            assert done.returncode == 0, done.stderr
        done = docker(N3, "python3", "-c", SEND_PY, stdin="".join(lines).encode())
        assert done.returncode == 0, done.stderr
        self._wait_for_carbon(recent_count=20)

    def _wait_for_carbon(self, recent_count, timeout=120):
        """Until every new owner's file holds the points carbon was sent. A file
        carbon is still creating can read as "corrupt" (its header written, its
        archives not yet): that is late here, not wrong."""
        deadline = time.monotonic() + timeout
        while True:
            found = {a: read_all(a) for a in (N1, N2)}
            late = [
                m for m in self.sent for a in self.new_owners[m]
                if not isinstance(points := found[a].get(m, {}), dict)
                or sum(1 for v in points.values() if v < 0) < recent_count
            ]  # fmt: skip
            if not late:
                return
            assert time.monotonic() < deadline, f"carbon never wrote {len(late)} metrics"
            time.sleep(2)

    def plan(self, *extra, output=None):
        return migrate(
            N1, "plan", "--old-relay-config", self.configs["old"],
            "--new-relay-config", self.configs["new"], "--host", N3,
            "--secret-file", SECRET, "-o", output or self.plan_file, "--json", *extra,
        )  # fmt: skip

    def make_plan(self) -> dict:
        done = self.plan()
        assert done.returncode == 0, done.err
        report = json.loads(done.out)
        data = docker(N1, "cat", self.plan_file).stdout
        for address in (N2, N3):
            put(address, self.plan_file, data)
        return report

    def step(self, address, verb, *extra, timeout=300):
        return migrate(address, verb, *step_args(address, self.plan_file), *extra,
                       timeout=timeout)  # fmt: skip

    def on_all(self, verb, *extra) -> dict:
        """The step on every node at once, as a playbook runs it: {node: (exit, stderr)}."""
        procs = {}
        for address in NODES:
            argv = ["docker", "exec", "-u", "_graphite", NODES[address], "carbonscale",
                    "migrate", verb, *step_args(address, self.plan_file), *extra]  # fmt: skip
            procs[address] = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        return {a: (p.wait(300), p.stderr.read()) for a, p in procs.items()}

    def check_converged(self, skip=()) -> int:
        """Every metric on exactly its new owners' hosts with every point; the points
        compared."""
        found = {a: read_all(a) for a in NODES}
        checked = 0
        for metric in self.metrics:
            if metric in skip:
                continue
            holders = {a for a in NODES if metric in found[a]}
            assert holders == self.new_owners[metric], (metric, holders)
            for address in holders:
                assert found[address][metric] == self.expected[metric], (metric, address)
                checked += len(self.expected[metric])
        return checked


def converge(case: Case) -> dict:
    report = case.make_plan()
    for phase in ("sync", "verify", "cleanup"):
        for address, (rc, err) in case.on_all(phase).items():
            assert rc == 0, (phase, address, err)
    return report


@pytest.mark.parametrize("replication", [1, 2])
@pytest.mark.parametrize("hash_type", ["carbon_ch", "fnv1a_ch", "jump_fnv1a_ch"])
def test_every_metric_ends_on_exactly_its_owners_with_every_point(tmp_path, hash_type, replication):
    started = time.monotonic()
    case = Case(tmp_path, f"{hash_type[:4]}{replication}", hash_type, replication, 60)
    strays = sum(1 for i in range(len(case.metrics)) if i % 4 == 0)
    report = converge(case)
    assert report["work"] > 0 and report["strays"].get(N3) == strays
    points = case.check_converged()
    print(
        f"\nmigrate {hash_type} replication {replication}: {len(case.metrics)} metrics, "
        f"{report['work']} moved, {strays} strays from {N3}, {points} points checked "
        f"in {time.monotonic() - started:.1f} s"
    )


KILLED_RUNS = 12


def test_sync_killed_at_random_moments_converges_when_rerun(tmp_path):
    started = time.monotonic()
    # Enough files that a sync takes seconds even on a quiet machine (200 took
    # under half a second there, and no kill landed before a run finished).
    case = Case(tmp_path, "kill", "carbon_ch", 2, 600)
    report = case.make_plan()
    rng = random.Random(14)
    kills = partial = 0
    for address in (N1, N2):
        soonest = 0.3  # raised while kills land before any work (interpreter start-up)
        # KILLED_RUNS runs killed at random moments, then reruns without a kill
        # until done: on a loaded machine each killed run moves only a few files.
        for run in range(KILLED_RUNS + 3):
            delay = rng.uniform(soonest, soonest + 0.6)
            kill = ["timeout", "-s", "KILL", f"{delay:.2f}"] if run < KILLED_RUNS else []
            done = docker(
                address, *kill, "carbonscale", "migrate",
                "sync", *step_args(address, case.plan_file), "--jobs", "1", "--batch", "1",
            )  # fmt: skip
            if done.returncode == 0:
                break
            assert done.returncode == 137, done.stderr  # killed by timeout's SIGKILL
            kills += 1
            status = json.loads(migrate(address, "status", "--state-dir", STATE, "--json").out)
            sync = status["local"].get(report["plan"], {}).get("sync", {})
            if sync.get("done") and sync.get("pending"):
                partial += 1
            elif not sync.get("done"):
                soonest += 0.3
        else:
            pytest.fail(f"sync on {address} never finished in {KILLED_RUNS} killed runs and 3 more")
    assert partial >= 1, f"{kills} kills, none in the middle of the work"
    for phase in ("verify", "cleanup"):
        for address, (rc, err) in case.on_all(phase).items():
            assert rc == 0, (phase, address, err)
    points = case.check_converged()
    print(
        f"\nmigrate kill -9: {len(case.metrics)} metrics, {report['work']} moved, "
        f"{kills} syncs killed ({partial} mid-work), {points} points checked "
        f"in {time.monotonic() - started:.1f} s"
    )


def one_line(done, rc=2) -> str:
    lines = done.err.strip().splitlines()
    assert done.returncode == rc and len(lines) == 1, (done.returncode, done.err)
    return lines[0]


def test_bad_input_is_refused_in_one_line_and_moves_nothing(tmp_path):
    case = Case(tmp_path, "bad", "carbon_ch", 1, 80)
    before = {a: read_all(a) for a in NODES}

    # An unknown host: a listing for it, or a step run as it.
    line = one_line(case.plan("--listing", "10.9.9.9=/dev/null"))
    assert line == "carbonscale: error: unknown host 10.9.9.9: not a ring member host nor a --host"

    # Rings that disagree with the live relay config, in hash or replication.
    for hash_type, replication, word in (("fnv1a_ch", 1, "hash"), ("carbon_ch", 2, "replication")):
        live = write_cluster_config(tmp_path / "live.conf", hash_type, replication, NEW)
        put(N1, f"{STATE}/live.conf", live.read_bytes())
        line = one_line(case.plan("--relay-config", f"{STATE}/live.conf"))
        assert line.startswith(f"carbonscale: error: the new ring's {word} is "), line

    # A destination without the free space the plan needs: the plan must keep
    # all of the disk's free space (the disks cannot be filled here).
    free = max(
        int(a) * int(b)
        for a, b in (docker(n, "stat", "-f", "-c", "%a %S", ROOT).stdout.split() for n in NODES)
    )
    line = one_line(case.plan("--reserve", str(2 * free)))
    assert line.startswith("carbonscale: error: not enough free space: "), line
    assert f" bytes and keeps {2 * free} free, has " in line, line
    assert docker(N1, "test", "-e", case.plan_file).returncode == 1  # no plan was written
    assert {a: read_all(a) for a in NODES} == before  # nothing moved

    # A step run as a host the plan does not know.
    report = case.make_plan()
    line = one_line(migrate(N1, "sync", *step_args("10.9.9.9", case.plan_file)))
    assert "10.9.9.9" in line, line
    assert {a: read_all(a) for a in NODES} == before

    # A corrupt source: a stray copy on node3 cut short.
    victim = next(
        m for i, m in enumerate(case.metrics) if i % 4 == 0 and N3 not in case.new_owners[m]
    )
    victim_path = f"{ROOT}/{victim.replace('.', '/')}.wsp"
    assert docker(N3, "truncate", "-s", "100", victim_path).returncode == 0
    for t, _ in list(case.expected[victim].items()):
        if case.expected[victim][t] % 1 == 0.5:  # the stray's points are gone with it
            del case.expected[victim][t]

    # An unreachable source: node3's file service stopped. The sync of a node
    # that pulls from it stops, naming it and why; after a restart a rerun goes on.
    puller = next(iter(case.new_owners[victim]))
    assert docker(N3, "systemctl", "stop", SERVICE, user="root").returncode == 0
    try:
        line = one_line(case.step(puller, "sync"))
        assert f"host {N3} ({N3}:2099) is unreachable" in line, line
    finally:
        assert docker(N3, "systemctl", "start", SERVICE, user="root").returncode == 0
    time.sleep(2)  # the service binds its port
    results = case.on_all("sync")
    for address, (rc, err) in results.items():
        if address == puller:
            # The corrupt copy is skipped and listed (exit 1), everything else moved.
            assert rc == 1, err
            assert err.strip().splitlines() == [
                line for line in err.strip().splitlines() if victim in line
            ]
            assert f"carbonscale: failed {victim} from {N3}: source {N3}: corrupt" in err, err
        else:
            assert rc == 0, (address, err)
    for address, (rc, err) in case.on_all("verify").items():
        assert rc == (1 if address == puller else 0), (address, err)
    for address, (rc, err) in case.on_all("cleanup").items():
        # node3 keeps the copy that was never verified, and says so.
        assert rc == (1 if address == N3 else 0), (address, err)
        if address == N3:
            assert victim in err and len(err.strip().splitlines()) == 1, err
    assert docker(N3, "stat", "-c", "%s", victim_path).stdout.strip() == b"100"
    points = case.check_converged(skip={victim})
    found = {a: read_all(a) for a in NODES}
    for address in case.new_owners[victim]:
        assert found[address][victim] == case.expected[victim]
    print(
        f"\nmigrate bad input: unknown host, relay config (hash, replication), free space, "
        f"unreachable {N3}, corrupt {victim} refused; {report['work']} moved, "
        f"{points} points checked"
    )

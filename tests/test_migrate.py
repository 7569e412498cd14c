"""carbonscale migrate end to end: real whisper files read point by point, the real
file service on loopback (one instance per "host", each its own whisper root),
placements checked against carbon-c-relay -t, every step run as the CLI.

Hosts are ring-member addresses (10.0.0.x, what carbon-c-relay routes to) whose
services listen on 127.0.0.1 ports; the plan maps one to the other (--host).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import whisper
from relay_oracle import needs_relay, relay_test_owners, write_cluster_config

from carbonscale.migrate.journal import Journal
from carbonscale.migrate.transport import (
    Client,
    SourceUnreachable,
    make_server,
    parse_allowlist,
)

CLI = [sys.executable, "-m", "carbonscale", "migrate"]
SECRET = b"migration-test-secret-0123456789"
A, B, C = "10.0.0.1", "10.0.0.2", "10.0.0.3"  # C holds stray copies, in no ring
SCHEMA = [(60, 1440), (300, 2016)]  # 1 min for a day, 5 min for a week
MEMBERS = {
    "old": [f"{A}:2103=a1", f"{A}:2203=a2"],
    "new": [f"{A}:2103=a1", f"{A}:2203=a2", f"{B}:2103=b1", f"{B}:2203=b2"],
}

pytestmark = needs_relay


class Host:
    """A storage host: a whisper root served by the real file service on loopback."""

    def __init__(self, name: str, root: Path, secret_file: Path, port: int = 0) -> None:
        self.name, self.root, self.secret_file = name, root, secret_file
        self.state = root.parent / f"state-{name}"
        root.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.start()

    def start(self) -> None:
        journal = Journal(str(self.state), self.name)
        self.server = make_server(
            f"127.0.0.1:{self.port}",
            str(self.root),
            SECRET,
            parse_allowlist(["127.0.0.1/32"]),
            journal.counts,
        )
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def path(self, name: str) -> Path:
        return self.root / (name.replace(".", "/") + ".wsp")

    def step(self, verb: str, plan: Path, *extra: str) -> subprocess.CompletedProcess:
        return run(
            verb, "--plan", str(plan), "--self", self.name, "--root", str(self.root),
            "--state-dir", str(self.state), "--secret-file", str(self.secret_file), *extra,
        )  # fmt: skip


def run(*args: str, check_rc: int | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert done.returncode == check_rc, done.stderr
    return done


def series(path: Path, now: int) -> dict[int, float]:
    """{timestamp: value} of the finest archive, read by whisper.fetch."""
    (start, _end, step), values = whisper.fetch(str(path), now - 86400 + 60, now, now=now)
    return {start + i * step: v for i, v in enumerate(values) if v is not None}


def write(path: Path, points: list[tuple[int, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        whisper.create(str(path), SCHEMA, xFilesFactor=0.0)
    whisper.update_many(str(path), points)


def names(count: int) -> list[str]:
    rng = random.Random(11)
    return [
        f"servers.web{rng.randrange(40)}.{rng.choice(['cpu', 'mem', 'disk.sda'])}.m{i}"
        for i in range(count)
    ]


class Cluster:
    """Three hosts; history on the old ring's owners, newer points on the new ring's,
    strays from an old failover on C. `expected[metric]` is every point written."""

    def __init__(self, tmp: Path, hash_type: str, replication: int, count: int) -> None:
        self.tmp = tmp
        self.secret = tmp / "secret"
        self.secret.write_bytes(SECRET)
        self.hosts = {n: Host(n, tmp / n, self.secret) for n in (A, B, C)}
        self.hash_type, self.replication = hash_type, replication
        self.old_config = write_cluster_config(
            tmp / "old.conf", hash_type, min(replication, 2), MEMBERS["old"]
        )
        self.new_config = write_cluster_config(
            tmp / "new.conf", hash_type, replication, MEMBERS["new"]
        )
        self.metrics = names(count)
        self.old_owners = self._owners(self.old_config)
        self.new_owners = self._owners(self.new_config)
        self.now = int(time.time())
        now = self.now - self.now % 60
        self.expected: dict[str, dict[int, float]] = {}
        for index, metric in enumerate(self.metrics):
            points: dict[int, float] = {}
            history = [(now - 72000 + 60 * k, float(index * 1000 + k)) for k in range(0, 1080, 3)]
            recent = [(now - 7140 + 60 * k, float(-index - k)) for k in range(119)]
            for host in self.old_owners[metric]:
                write(self.hosts[host].path(metric), history)
            for host in self.new_owners[metric]:
                write(self.hosts[host].path(metric), recent)
            points.update(history)
            points.update(recent)
            if index % 4 == 0:  # a failover once scattered it onto C
                stray = [(now - 82800 + 60 * k, 0.5 + k) for k in range(60)]
                write(self.hosts[C].path(metric), stray)
                points.update(stray)
            self.expected[metric] = points

    def _owners(self, config: Path) -> dict[str, set[str]]:
        placed = relay_test_owners(config, self.metrics)
        return {m: {owner.rsplit(":", 1)[0] for owner in placed[m]} for m in self.metrics}

    def host_args(self) -> list[str]:
        return [arg for h in self.hosts.values() for arg in ("--host", f"{h.name}={h.endpoint}")]

    def plan(self, *extra: str, old: Path | None = None) -> subprocess.CompletedProcess:
        return run(
            "plan", "--new-relay-config", str(self.new_config),
            "--old-relay-config", str(old or self.old_config), *self.host_args(),
            "--secret-file", str(self.secret), "-o", str(self.tmp / "plan.tsv"), *extra,
        )  # fmt: skip

    def check_converged(self) -> None:
        """Every metric on exactly its new owners' hosts, with every point written."""
        for metric in self.metrics:
            holders = {n for n, h in self.hosts.items() if h.path(metric).exists()}
            assert holders == self.new_owners[metric], metric
            for host in holders:
                found = series(self.hosts[host].path(metric), self.now)
                assert found == self.expected[metric], (metric, host)

    def close(self) -> None:
        for host in self.hosts.values():
            host.stop()


@pytest.fixture
def cluster_factory(tmp_path):
    made = []

    def make(hash_type: str = "carbon_ch", replication: int = 1, count: int = 80) -> Cluster:
        made.append(Cluster(tmp_path, hash_type, replication, count))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()


def converge(cluster: Cluster) -> Path:
    plan = cluster.tmp / "plan.tsv"
    done = cluster.plan()
    assert done.returncode == 0, done.stderr
    for host in cluster.hosts.values():
        sync = host.step("sync", plan, "--jobs", "2", "--batch", "7")
        assert sync.returncode == 0, sync.stderr
    for host in cluster.hosts.values():
        assert host.step("verify", plan).returncode == 0
    for host in cluster.hosts.values():
        clean = host.step("cleanup", plan)
        assert clean.returncode == 0, clean.stderr
    return plan


def test_tagged_series_stay_where_carbon_wrote_them(cluster_factory):
    """carbon names a tagged series' file by a hash of its name: placing that
    path on the ring would move the file away from its owner, so it stays."""
    cluster = cluster_factory("carbon_ch", 1, count=40)
    digest = hashlib.sha256(b"disk.used;host=web1;mount=/var").hexdigest()
    tagged = {
        host: cluster.tmp / host / "_tagged" / digest[:3] / digest[3:6] / f"{digest}.wsp"
        for host in (A, C)
    }
    for path in tagged.values():
        write(path, [(cluster.now - cluster.now % 60 - 60, 1.0)])
    before = {host: path.read_bytes() for host, path in tagged.items()}
    plan = converge(cluster)
    cluster.check_converged()
    assert {host: path.read_bytes() for host, path in tagged.items() if path.exists()} == before
    assert not list((cluster.tmp / C / ".quarantine").rglob(f"{digest}.wsp"))
    assert digest not in plan.read_text()


@pytest.mark.parametrize("replication", [1, 2])
@pytest.mark.parametrize("hash_type", ["carbon_ch", "fnv1a_ch", "jump_fnv1a_ch"])
def test_every_metric_ends_on_exactly_its_owners_with_every_point(
    cluster_factory, hash_type, replication
):
    cluster = cluster_factory(hash_type, replication)
    moving = [m for m in cluster.metrics if cluster.old_owners[m] != cluster.new_owners[m]]
    assert moving, "the ring change must move something"
    plan = converge(cluster)
    cluster.check_converged()
    # The removed copies are in quarantine, whole; purge deletes them on request.
    quarantined = list((cluster.tmp / A / ".quarantine").rglob("*.wsp"))
    quarantined += list((cluster.tmp / C / ".quarantine").rglob("*.wsp"))
    strays = sum(1 for i in range(0, len(cluster.metrics), 4))
    expected_removed = strays + sum(
        1 for m in cluster.metrics if A in cluster.old_owners[m] and A not in cluster.new_owners[m]
    )
    assert len(quarantined) == expected_removed
    status = run("status", "--plan", str(plan), "--secret-file", str(cluster.secret), "--json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    plan_id = plan.read_text().split("\n", 1)[0].rsplit(" ", 1)[1]
    for host, phases in counts.items():
        for phase, found in phases[plan_id].items():
            assert found["pending"] == found["failed"] == 0 and found["done"] > 0, (host, phase)
    assert "cleanup" in counts[C][plan_id] and "sync" in counts[B][plan_id]
    purge = cluster.hosts[C].step("cleanup", plan, "--purge")
    assert purge.returncode == 0 and not (cluster.tmp / C / ".quarantine").joinpath("x").exists()
    assert not list((cluster.tmp / C / ".quarantine").rglob("*.wsp"))
    # A second round finds nothing to move: the cluster has converged.
    again = cluster.plan("--json", old=cluster.new_config)
    assert again.returncode == 0 and '"work": 0' in again.stdout


def test_plan_counts_pairs_strays_and_free_space(cluster_factory):
    cluster = cluster_factory("carbon_ch", 1, 40)
    absent = [m for m in cluster.metrics if cluster.new_owners[m] == {B}][::2]
    for metric in absent:  # B has not received these yet: their files take new space
        cluster.hosts[B].path(metric).unlink()
    done = cluster.plan("--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    to_b = sum(1 for m in cluster.metrics if cluster.new_owners[m] == {B})
    pairs = {(p["src"], p["dst"]): p["files"] for p in report["pairs"]}
    assert pairs[(A, B)] == to_b
    assert report["strays"][C] == len(range(0, 40, 4))
    assert report["free"][B]["needed"] == len(absent) * os.path.getsize(
        cluster.hosts[A].path(cluster.metrics[0])
    )


def done_items(state: Path, phase: str) -> int:
    """Items of PHASE a host's journal has committed as done (0 before it exists)."""
    path = state / "journal.sqlite"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        query = "SELECT count(*) FROM work WHERE phase = ? AND status = 'done'"
        return db.execute(query, (phase,)).fetchone()[0]
    except sqlite3.OperationalError:  # the table is not there yet
        return 0
    finally:
        db.close()


def test_kill_9_at_random_moments_then_rerun_converges(cluster_factory):
    cluster = cluster_factory("carbon_ch", 2, 240)
    plan = cluster.tmp / "plan.tsv"
    assert cluster.plan().returncode == 0
    rng = random.Random(5)
    kills = 0
    for verb in ("sync", "cleanup"):
        for host in cluster.hosts.values():
            # Up to two runs per host and verb are killed mid-way: once the run
            # has committed work of its own (so the kill lands between or inside
            # batches, whatever the machine's speed), after a random extra delay.
            # The next run is let finish.
            for attempt in range(3):
                before = done_items(host.state, verb)
                proc = subprocess.Popen(
                    [*CLI, verb, "--plan", str(plan), "--self", host.name, "--root",
                     str(host.root), "--state-dir", str(host.state), "--secret-file",
                     str(cluster.secret), "--jobs", "2", "--batch", "5"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
                if attempt < 2:
                    while proc.poll() is None and done_items(host.state, verb) == before:
                        time.sleep(0.005)
                    time.sleep(rng.uniform(0, 0.05))
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        kills += 1
                        continue
                rc = proc.wait(timeout=600)
                assert rc == 0, proc.stderr.read()
                break
            if verb == "sync":
                assert host.step("verify", plan).returncode == 0
    assert kills >= 3  # the test must actually have killed runs mid-way
    cluster.check_converged()


def test_unknown_host_is_refused(cluster_factory):
    cluster = cluster_factory(count=10)
    assert cluster.plan().returncode == 0
    outsider = Host("10.9.9.9", cluster.tmp / "outsider", cluster.secret)
    try:
        done = outsider.step("sync", cluster.tmp / "plan.tsv")
    finally:
        outsider.stop()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"carbonscale: error: unknown host 10.9.9.9: the plan's hosts are {A}, {B}, {C}"
    ]
    listing = run(
        "plan", "--new-relay-config", str(cluster.new_config), *cluster.host_args(),
        "--listing", f"10.9.9.9={cluster.tmp / 'x'}", "-o", str(cluster.tmp / "p2"),
    )  # fmt: skip
    assert listing.returncode == 2 and "unknown host 10.9.9.9" in listing.stderr


def test_unreachable_source_stops_naming_it_and_a_rerun_continues(cluster_factory):
    cluster = cluster_factory("carbon_ch", 1, 60)
    plan = cluster.tmp / "plan.tsv"
    assert cluster.plan().returncode == 0
    source = cluster.hosts[C]
    source.stop()
    done = cluster.hosts[B].step("sync", plan)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"host {C} (127.0.0.1:{source.port}) is unreachable" in lines[0]
    source.start()  # same port: the plan names it
    assert cluster.hosts[B].step("sync", plan).returncode == 0
    assert cluster.hosts[A].step("sync", plan).returncode == 0
    for host in cluster.hosts.values():
        assert host.step("cleanup", plan).returncode == 0
    cluster.check_converged()


def test_destination_without_the_free_space_is_refused_and_nothing_moves(cluster_factory):
    cluster = cluster_factory(count=20)
    for metric in cluster.metrics:
        if cluster.new_owners[metric] == {B}:
            cluster.hosts[B].path(metric).unlink()  # new files needed on B
    listings = []
    for host in cluster.hosts.values():
        path = cluster.tmp / f"{host.name}.list"
        assert run("list", "--root", str(host.root), "-o", str(path)).returncode == 0
        data = path.read_bytes()
        head, rest = data.split(b"\n", 1)
        fields = head.split()
        fields[3] = b"1000"  # this host says it has 1000 bytes free
        path.write_bytes(b" ".join(fields) + b"\n" + rest)
        listings += ["--listing", f"{host.name}={path}"]
    done = run(
        "plan", "--new-relay-config", str(cluster.new_config), *cluster.host_args(),
        *listings, "-o", str(cluster.tmp / "plan.tsv"),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("carbonscale: error: not enough free space: ")
    assert f"{B} needs " in done.stderr and "has 1000 free" in done.stderr
    assert not (cluster.tmp / "plan.tsv").exists()


def test_a_reserve_the_destinations_cannot_keep_is_refused(cluster_factory):
    cluster = cluster_factory(count=20)
    for metric in cluster.metrics:
        if cluster.new_owners[metric] == {B}:
            cluster.hosts[B].path(metric).unlink()  # new files needed on B
    plan = cluster.tmp / "plan.tsv"
    disk = os.statvfs(cluster.hosts[B].root)
    # The disk's whole size: the moved files cannot fit, however much other
    # programs on the machine free meanwhile (its free space is not fixed).
    reserve = disk.f_blocks * disk.f_frsize
    done = cluster.plan("--reserve", str(reserve))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("carbonscale: error: not enough free space: ")
    assert f"{B} needs " in done.stderr and f" bytes and keeps {reserve} free, has " in done.stderr
    assert not plan.exists()
    done = cluster.plan("--reserve", "4096", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reserve"] == 4096


def test_corrupt_source_is_skipped_listed_and_kept(cluster_factory):
    cluster = cluster_factory("carbon_ch", 1, 40)
    moving = [m for m in cluster.metrics if cluster.new_owners[m] == {B} and m in cluster.expected]
    victim = moving[0]
    source = cluster.hosts[A].path(victim)
    os.truncate(source, 100)
    plan = cluster.tmp / "plan.tsv"
    assert cluster.plan().returncode == 0
    done = cluster.hosts[B].step("sync", plan)
    assert done.returncode == 1
    assert f"carbonscale: failed {victim} from {A}: source {A}: corrupt SRC" in done.stderr
    # Everything else moved; the corrupt copy is never cleaned up.
    for metric in moving[1:]:
        assert series(cluster.hosts[B].path(metric), cluster.now)
    clean = cluster.hosts[A].step("cleanup", plan)
    assert clean.returncode == 1 and victim in clean.stderr
    assert source.exists() and source.stat().st_size == 100
    # A rerun retries it (failed is never done) and fails again, still listed.
    again = cluster.hosts[B].step("sync", plan)
    assert again.returncode == 1 and victim in again.stderr


def test_rings_disagreeing_with_the_live_relay_config_are_refused(cluster_factory):
    cluster = cluster_factory(count=5)
    live = write_cluster_config(cluster.tmp / "live.conf", "carbon_ch", 2, MEMBERS["new"])
    for hash_type, replication, word in (
        ("fnv1a_ch", "2", "hash"),
        ("carbon_ch", "1", "replication"),
    ):
        done = run(
            "plan", "--new", *MEMBERS["new"], "--hash", hash_type, "--replication", replication,
            "--relay-config", str(live), *cluster.host_args(), "--secret-file",
            str(cluster.secret), "-o", str(cluster.tmp / "plan.tsv"),
        )  # fmt: skip
        assert done.returncode == 2
        assert done.stderr.startswith(f"carbonscale: error: the new ring's {word} is ")
        assert len(done.stderr.strip().splitlines()) == 1


def test_jump_removal_of_a_middle_member_is_refused_with_the_numbers(cluster_factory):
    cluster = cluster_factory("jump_fnv1a_ch", 1, 200)
    members = MEMBERS["new"]
    args = ["plan", "--hash", "jump_fnv1a_ch", "--old", *members, "--new"]
    args += [m for m in members if not m.endswith("=a2")]
    args += [*cluster.host_args(), "--secret-file", str(cluster.secret)]
    done = run(*args, "-o", str(cluster.tmp / "plan.tsv"))
    assert done.returncode == 2
    assert "jump_fnv1a_ch: removing 10.0.0.1:2203=a2 (not the last bucket) remaps" in done.stderr
    assert "between members that stay" in done.stderr
    assert not (cluster.tmp / "plan.tsv").exists()
    allowed = run(*args, "--allow-jump-reshuffle", "-o", str(cluster.tmp / "plan.tsv"))
    assert allowed.returncode == 0, allowed.stderr
    # Removing the last bucket moves only its names: no refusal.
    last = ["plan", "--hash", "jump_fnv1a_ch", "--old", *members, "--new", *members[:-1]]
    last += [*cluster.host_args(), "--secret-file", str(cluster.secret)]
    assert run(*last, "-o", str(cluster.tmp / "p3")).returncode == 0


def test_service_refuses_outsiders_bad_signatures_and_paths_outside_the_root(tmp_path):
    root = tmp_path / "root"
    write(root / "a" / "b.wsp", [(int(time.time()) - 60, 1.0)])
    (tmp_path / "secret.wsp").write_bytes(b"x" * 100)
    (root / "a" / "link.wsp").symlink_to(tmp_path / "secret.wsp")
    (root / "up").symlink_to(tmp_path)
    server = make_server("127.0.0.1:0", str(root), SECRET, parse_allowlist(["127.0.0.2/32"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        # From 127.0.0.1, outside the allowlist: dropped before the request is read.
        with pytest.raises(SourceUnreachable, match="is unreachable"):
            Client("h", f"127.0.0.1:{port}", SECRET).listing()
        assert server.refused == 1
        allowed = Client("h", f"127.0.0.1:{port}", SECRET)
        allowed.source_address = ("127.0.0.2", 0)
        listing = allowed.listing()
        assert listing.paths == [b"a/b.wsp"]  # no symlinks, no dot-directories
        forger = Client("h", f"127.0.0.1:{port}", b"not-the-secret-0123456789")
        forger.source_address = ("127.0.0.2", 0)
        with pytest.raises(SourceUnreachable, match="refused the request: 403"):
            forger.listing()
        got = {
            path: (data, reason)
            for path, data, reason in allowed.files(
                ["a/b.wsp", "../secret.wsp", "/etc/passwd", "a/link.wsp", "up/secret.wsp"]
            )
        }
        assert got["a/b.wsp"][0] == (root / "a" / "b.wsp").read_bytes()
        for refused in ("../secret.wsp", "/etc/passwd", "a/link.wsp", "up/secret.wsp"):
            assert got[refused][0] is None, refused
    finally:
        server.shutdown()
        server.server_close()


def test_a_snapshot_waits_for_carbons_write_lock(tmp_path):
    import fcntl

    root = tmp_path / "root"
    write(root / "m.wsp", [(int(time.time()) - 60, 1.0)])
    server = make_server("127.0.0.1:0", str(root), SECRET, parse_allowlist(["127.0.0.1"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = Client("h", f"127.0.0.1:{server.server_address[1]}", SECRET)
    try:
        with open(root / "m.wsp", "r+b") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # carbon writing (WHISPER_LOCK_WRITES)
            got: list = []
            reader = threading.Thread(target=lambda: got.extend(client.files(["m.wsp"])))
            reader.start()
            reader.join(0.5)
            assert reader.is_alive() and not got  # the snapshot waits for the lock
            held.seek(100)
            held.write(b"\x01")
            held.flush()
            fcntl.flock(held, fcntl.LOCK_UN)
        reader.join(10)
        assert got[0][1] == (root / "m.wsp").read_bytes()
    finally:
        server.shutdown()
        server.server_close()

"""expand.yml and decommission.yml on the running cluster, under a steady stream.

A sender on the query host writes NAMES metrics through the VIP every 10 s
(one whisper slot of the molecule schema): half on the line port, half on the
pickle port, with values that say which metric and slot they are. Their
history (older slots) is on the owners of the ring the relays run, as carbon
would have written it. While it sends, `ansible-playbook expand.yml` adds the
spare storage host (the inventory puts it in the storage group), then
`decommission.yml -e node=...` removes another host. Each move is interrupted
once and run again: the expand by a kill -9 of the sync pulling history into
the new host, the decommission by a kill -9 of ansible-playbook while the
relays roll onto both rings. Meanwhile a probe renders two groups of the
metrics through the query host's graphite-web every 3 s, as a dashboard would.

Afterwards, with the relays' own carbon-c-relay -t as the oracle for the
owners: every point sent and every point of the history is in every owner's
whisper file (read point by point), no other storage host holds a file of
these metrics (cleanup quarantined them), rerunning either playbook changes
nothing, and no render showed a hole: no slot the sender had delivered GRACE
seconds before the render was missing from it.

The spare's carbon-cache may create 60 files a minute (inventory/hosts.yml):
far fewer than the names that move to it, so the test fails if a point
reaches it before the history copy created its file.

Rerunnable on the same cluster: the host added is whichever of the storage
and spare hosts the relays' ring lacks, and the one removed another one.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cluster_hosts import Cluster, setting

from carbonscale.migrate.graphprobe import GraphProbe, gaps

pytestmark = [pytest.mark.disruptive, pytest.mark.reshapes]

REPO = Path(__file__).resolve().parents[3]
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
NAMES = 6000
STEP = 10  # the molecule schema's finest step (10s:1h)
HISTORY = 12  # older slots written on the old owners before the run
STATE = "/var/lib/carbonscale/lifecycle/move.json"
WHISPER = "/var/lib/graphite/whisper"
SENDER = "/tmp/carbonscale-lifecycle-sender.py"
SENDER_OUT = "/tmp/carbonscale-lifecycle-sender.json"
SENDER_STOP = "/tmp/carbonscale-lifecycle-sender.stop"
KILLER = "/tmp/carbonscale-lifecycle-killer.py"
KILLER_OUT = "/tmp/carbonscale-lifecycle-killer.json"
JOURNAL = "/var/lib/carbonscale/migrate/journal.sqlite"
# Two of the 50 groups (240 metrics) rendered through the query host every 3 s.
PROBED_GROUPS = (7, 23)
# A slot counts as due in a graph this long after the sender delivered it: the
# relays' and carbon-cache's own delay before a point can be read (graphite-web
# reads points still in carbon-cache's memory over CarbonLink).
GRACE = 20
# scripts/lab.py (make lab-expand, make lab-shrink) runs this check against the
# lab with `expand` or `shrink`: that one move, not interrupted. Unset (the
# cluster scenario): both moves, each interrupted once.
LAB_MOVE = os.environ.get("CARBONSCALE_LAB_MOVE", "")
assert LAB_MOVE in ("", "expand", "shrink"), f"CARBONSCALE_LAB_MOVE={LAB_MOVE!r}"

# Point of metric i at slot t: i * 10000 + (t // STEP) % 10000, exact in a double.
VALUE = "lambda i, t: float(i * 10000 + (t // 10) % 10000)"

# Every STEP seconds, each metric once, stamped with the slot: even-numbered
# metrics as lines to the VIP's line port, odd-numbered ones as pickle frames
# (carbon's: a 4-byte length and a protocol-2 pickle of (name, (time, value)))
# to its pickle port, each over a connection of its own that is closed only
# when the far side closed it (it read all). A slot whose connection failed (a
# director's failover on a loaded machine resets it) is sent again whole on a
# new one, so each slot counted is delivered. Stops at the stop file; prints
# each slot with the time it was delivered, and the retries.
SENDER_SCRIPT = f"""
import json, os, pickle, socket, struct, sys, time
vip, prefix, count, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
value = {VALUE}

def deliver(port, payload):
    with socket.create_connection((vip, port), 10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        while sock.recv(4096):
            pass

slots, retries, error = [], [], None
while not os.path.exists(stop):
    slot = int(time.time()) // 10 * 10
    if slots and slot == slots[-1][0]:
        time.sleep(0.2)
        continue
    lines = "".join(f"{{prefix}}.g{{i % 50}}.m{{i}} {{value(i, slot)!r}} {{slot}}\\n"
                    for i in range(0, count, 2)).encode()
    frames = []
    odd = list(range(1, count, 2))
    for first in range(0, len(odd), 500):
        body = pickle.dumps([(f"{{prefix}}.g{{i % 50}}.m{{i}}", (slot, value(i, slot)))
                             for i in odd[first:first + 500]], protocol=2)
        frames.append(struct.pack("!L", len(body)) + body)
    for attempt in range(5):
        try:
            deliver(2003, lines)
            deliver(2004, b"".join(frames))
            break
        except OSError as exc:
            retries.append([slot, str(exc)])
            time.sleep(1)
    else:
        error = f"slot {{slot}} not delivered in 5 attempts"
        break
    slots.append([slot, time.time()])
print(json.dumps({{"slots": slots, "retries": retries, "error": error}}))
"""

# On a storage host, detached: once the journal shows a sync pass of a new plan
# under way (at least MIN_DONE files done, some still pending), kill -9 every
# process of the migration engine there (the venv's python running an Ansible
# module as the file service's user; the file service itself runs as
# `carbonscale migrate serve`, another command line). Writes what it did.
KILLER_SCRIPT = """
import json, os, signal, sqlite3, sys, time
journal, python, user, out, min_done = sys.argv[1:6]
import pwd

def syncs():
    if not os.path.exists(journal):
        return {}
    db = sqlite3.connect(journal, timeout=30)
    try:
        rows = db.execute("SELECT plan, status, count(*) FROM work WHERE phase = 'sync' "
                          "GROUP BY plan, status").fetchall()
    finally:
        db.close()
    found = {}
    for plan, status, count in rows:
        found.setdefault(plan, {})[status] = count
    return found

before = set(syncs())
deadline = time.time() + 1800
result = {"killed": [], "plan": None, "done": 0, "pending": 0}
while time.time() < deadline and not result["killed"]:
    for plan, counts in syncs().items():
        done, pending = counts.get("done", 0), counts.get("pending", 0)
        if plan in before or done < int(min_done) or not pending:
            continue
        uid = pwd.getpwnam(user).pw_uid  # the host had no such user before its deploy
        for pid in os.listdir("/proc"):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[:-1]
                owner = os.stat(f"/proc/{pid}").st_uid
            except (OSError, ValueError):
                continue
            if owner == uid and cmdline == [python.encode()]:
                os.kill(int(pid), signal.SIGKILL)
                result["killed"].append(int(pid))
        result.update(plan=plan, done=done, pending=pending)
        break
    time.sleep(0.05)
with open(out, "w") as f:
    json.dump(result, f)
"""

# On a storage host: the history of the given metrics, as carbon would have written it.
HISTORY_SCRIPT = f"""
import json, os, sys, whisper
value = {VALUE}
prefix, root, base, slots = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for i in json.load(sys.stdin):
    path = os.path.join(root, *prefix.split("."), f"g{{i % 50}}", f"m{{i}}.wsp")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        whisper.create(path, [(10, 360)], xFilesFactor=0.5, aggregationMethod="average")
    whisper.update_many(path, [(base - 10 * k, value(i, base - 10 * k)) for k in range(slots)])
"""

# On a storage host: which of the metrics it holds (outside staging and
# quarantine), and for those given, each expected point that is missing or wrong.
CHECK_SCRIPT = f"""
import json, os, sys, time, whisper
value = {VALUE}
prefix, root = sys.argv[1], sys.argv[2]
task = json.load(sys.stdin)
top = os.path.join(root, *prefix.split("."))
held, leftovers = [], []
for group in os.listdir(top) if os.path.isdir(top) else []:
    for name in os.listdir(os.path.join(top, group)):
        if name.startswith("."):  # a fill's temporary file, left by the killed sync
            leftovers.append(os.path.join(group, name))
            continue
        held.append(int(name[1:-4]))
missing, wrong, checked = [], [], 0
now = int(time.time())
for i in task["owned"]:
    path = os.path.join(top, f"g{{i % 50}}", f"m{{i}}.wsp")
    if not os.path.exists(path):
        missing.append([i, "no file"])
        continue
    (start, _, step), values = whisper.fetch(path, now - 3500, now)
    found = {{start + k * step: v for k, v in enumerate(values) if v is not None}}
    for t in task["slots"]:
        checked += 1
        if t not in found:
            missing.append([i, t])
        elif found[t] != value(i, t):
            wrong.append([i, t, found[t]])
print(json.dumps({{"held": sorted(held), "leftovers": leftovers, "missing": missing[:20],
                  "missing_count": len(missing), "wrong": wrong[:20], "wrong_count": len(wrong),
                  "checked": checked}}))
"""


# Inventory host name -> its container (ansible_host: the lab names them
# cs-lab-*; molecule names them as the hosts). Filled by Run.
CONTAINERS: dict[str, str] = {}


def docker(
    host: str, *argv: str, stdin: str = "", timeout: float = 300, detach: bool = False
) -> str:
    """argv run in host's container (as root); its output."""
    container = CONTAINERS.get(host, host)
    done = subprocess.run(
        ["docker", "exec", *(["-d"] if detach else ["-i"]), container, *argv],
        input=stdin.encode(),
        capture_output=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (container, argv[:3], done.stderr.decode()[-2000:])
    return done.stdout.decode()


def relay_owners(relay: str, names: list[str]) -> dict[str, set[str]]:
    """carbon-c-relay -t on the relay's live config: {metric: {owner addresses}} of
    the routing cluster (the storage cluster, or both during a dual write). Whole
    lines: the config validates value and timestamp before it routes."""
    stamp = int(time.time())
    out = docker(
        relay, "carbon-c-relay", "-t", "-f", "/etc/carbon-c-relay.conf",
        stdin="".join(f"{name} 1 {stamp}\n" for name in names),
    )  # fmt: skip
    owners: dict[str, set[str]] = {}
    for block in re.split(r"(?m)^match\n", out)[1:]:
        lines = block.strip().splitlines()
        if len(lines) > 2 and "-> " in lines[0] and "_ch(" in lines[1]:
            metric = lines[0].split("-> ", 1)[1]
            owners.setdefault(metric, set()).update(
                line.strip().rsplit(":", 1)[0] for line in lines[2:] if re.match(r"\s+\d", line)
            )
    assert set(owners) == set(names), f"carbon-c-relay -t placed {len(owners)} of {len(names)}"
    return owners


def ring_hosts(relay: str) -> list[str]:
    """The storage cluster's member addresses in the relay's live config."""
    config = docker(relay, "cat", "/etc/carbon-c-relay.conf")
    body = config.split('cluster "storage"', 1)[1].split(";", 1)[0]
    return sorted({m.split(":", 1)[0] for m in re.findall(r"\b\d+\.\d+\.\d+\.\d+:\d+=\S+", body)})


def playbook_argv(inventories: list[str], name: str, *extra: str) -> tuple[list[str], dict]:
    """ansible-playbook with the project's config: argv and environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(REPO / "roles"),
        ANSIBLE_LIBRARY=str(REPO / "library"),
        ANSIBLE_FILTER_PLUGINS=str(REPO / "filter_plugins"),
        ANSIBLE_MODULE_UTILS=str(REPO / "module_utils"),
        ANSIBLE_COLLECTIONS_PATH=os.environ.get("ANSIBLE_COLLECTIONS_PATH", ""),
        ANSIBLE_FORCE_COLOR="0",
    )
    if not env["ANSIBLE_COLLECTIONS_PATH"]:
        del env["ANSIBLE_COLLECTIONS_PATH"]
    argv = [str(PLAYBOOK), *(a for i in inventories for a in ("-i", i)), str(REPO / name),
            "-e", "skip_confirmation=true", *extra]  # fmt: skip
    return argv, env


def _log(argv: list[str], stdout: str, stderr: str) -> None:
    if os.environ.get("CARBONSCALE_LIFECYCLE_LOG"):  # the playbooks' output, for a failed run
        with open(os.environ["CARBONSCALE_LIFECYCLE_LOG"], "a", encoding="utf-8") as log:
            log.write(f"===== {' '.join(argv)}\n{stdout}\n{stderr}\n")


def playbook(
    inventories: list[str], name: str, *extra: str, succeed: bool = True
) -> tuple[str, float, int]:
    """Run a playbook to its end: its output, seconds and exit status (which must
    be 0 unless succeed=False)."""
    argv, env = playbook_argv(inventories, name, *extra)
    started = time.monotonic()
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - started
    _log(argv, done.stdout, done.stderr)
    if succeed:
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return done.stdout, seconds, done.returncode


def playbook_killed_after(
    inventories: list[str], name: str, relay: str, phase: str, *extra: str
) -> tuple[float, list[str]]:
    """Run a playbook and kill -9 it (its whole process group: ansible-playbook
    and its workers) as soon as the state file on the relay records `phase` done:
    seconds it ran, and the phases done when it died."""
    argv, env = playbook_argv(inventories, name, *extra)
    started = time.monotonic()
    with open(os.devnull, "w") as sink:
        proc = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=sink, stderr=sink, start_new_session=True
        )
    try:
        while phase not in live_phases(relay):
            assert proc.poll() is None, f"{name} ended (status {proc.returncode}) before {phase}"
            assert time.monotonic() - started < 3600, f"{name} never reached {phase}"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.monotonic() - started, live_phases(relay)


def live_phases(relay: str) -> list[str]:
    """Phases the move in progress recorded done (the state file on the first relay)."""
    out = docker(relay, "sh", "-c", f"cat {STATE} 2>/dev/null || true")
    return [p["phase"] for p in json.loads(out)["phases"]] if out.strip() else []


def recap_changes(output: str) -> dict[str, int]:
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.M)
    }


def last_move(relay: str) -> dict:
    """The state file of the move that just ended (kept beside the live one)."""
    done = docker(relay, "sh", "-c", f"ls -t {STATE}.*.done | head -1").strip()
    return json.loads(docker(relay, "cat", done))


class Run:
    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.relay = cluster.group("relays")[0]
        self.storage = cluster.group("storage")
        self.spare = cluster.group("storage_spare")
        assert self.spare, "the inventory has no storage_spare host to add"
        self.everyone = self.storage + self.spare
        for host in cluster.group("all"):
            CONTAINERS[host] = cluster.vars(host).get("ansible_host", host)
        self.by_address = {cluster.address(h): h for h in self.everyone}
        ring = ring_hosts(self.relay)
        outside = [h for h in self.everyone if cluster.address(h) not in ring]
        if LAB_MOVE == "shrink":
            # The lab's shrink undoes its expand: the spare goes if it is in the ring.
            spare = [h for h in self.spare if cluster.address(h) in ring]
            self.removed = spare[0] if spare else self.by_address[ring[1]]
            self.added = None
        else:
            assert len(outside) == 1, f"the relays' ring {ring}: not all but one of {self.everyone}"
            self.added = outside[0]
            # Not the first relay-ring host (it plans every pass): the second one.
            self.removed = self.by_address[ring[1]]
        self.inventory = cluster.inventory
        self.extra = tmp / "storage-with-spare.yml"
        # Every candidate in the storage group: expand's target is all of them.
        group = {"hosts": {host: {} for host in self.everyone}}
        self.extra.write_text(yaml.safe_dump({"all": {"children": {"storage": group}}}))
        stamp = int(time.time())
        self.prefix = f"molecule.lifecycle.run{stamp}"
        self.names = [f"{self.prefix}.g{i % 50}.m{i}" for i in range(NAMES)]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.history_base = (stamp // STEP - 3) * STEP
        self.history = [self.history_base - STEP * k for k in range(HISTORY)]

    def write_history(self) -> None:
        owners = relay_owners(self.relay, self.names)
        for address, host in self.by_address.items():
            mine = [self.index[n] for n, o in owners.items() if address in o]
            if mine:
                docker(host, "runuser", "-u", "_graphite", "--", "python3", "-c", HISTORY_SCRIPT,
                       self.prefix, WHISPER, str(self.history_base), str(HISTORY),
                       stdin=json.dumps(mine))  # fmt: skip

    def start_sender(self) -> None:
        query = self.cluster.group("query")[0]
        vip = self.cluster.vars(self.relay)["lvs_vips"][0]
        self.sender = query
        docker(query, "sh", "-c", f"cat > {SENDER}", stdin=SENDER_SCRIPT)
        command = (
            f"rm -f {SENDER_OUT} {SENDER_STOP}; setsid nohup python3 {SENDER} {vip} "
            f"{self.prefix} {NAMES} {SENDER_STOP} > {SENDER_OUT} 2>&1 < /dev/null &"
        )
        docker(query, "sh", "-c", command)

    def stop_sender(self) -> dict[int, float]:
        """{slot: when it was delivered} of every slot the sender sent."""
        docker(self.sender, "touch", SENDER_STOP)
        deadline = time.monotonic() + 60
        while True:
            out = docker(self.sender, "cat", SENDER_OUT).strip()
            if out:
                break
            assert time.monotonic() < deadline, "the sender did not stop"
            time.sleep(1)
        result = json.loads(out)
        assert result["error"] is None, f"the sender failed: {result['error']}"
        self.retries = result["retries"]
        return {slot: at for slot, at in result["slots"]}

    def start_sync_killer(self, host: str) -> None:
        """On host: kill -9 the migration engine once a new sync pass there is under way."""
        python = setting(self.cluster, host, "carbonscale", "carbonscale_venv") + "/bin/python"
        docker(host, "sh", "-c", f"cat > {KILLER}", stdin=KILLER_SCRIPT)
        docker(host, "rm", "-f", KILLER_OUT)
        argv = ("python3", KILLER, JOURNAL, python, "_graphite", KILLER_OUT, "100")
        docker(host, *argv, detach=True)

    def sync_killer_result(self, host: str) -> dict:
        out = docker(host, "sh", "-c", f"cat {KILLER_OUT} 2>/dev/null || true")
        # If it found nothing, it must not kill a later pass. ([p]: the pattern
        # must not match this shell's own command line.)
        docker(host, "sh", "-c", f"pkill -f '[p]ython3 {KILLER}' || true")
        return json.loads(out) if out.strip() else {"killed": []}

    def check(self, slots: list[int], wait: float = 120) -> dict:
        """Every owner holds every point; no other host holds a file."""
        owners = relay_owners(self.relay, self.names)
        deadline = time.monotonic() + wait
        while True:
            report = {"missing": 0, "wrong": 0, "checked": 0, "strays": 0, "examples": []}
            report["leftovers"] = []
            for address, host in self.by_address.items():
                owned = [self.index[n] for n, o in owners.items() if address in o]
                task = {"owned": owned, "slots": slots}
                found = json.loads(docker(host, "python3", "-c", CHECK_SCRIPT, self.prefix,
                                          WHISPER, stdin=json.dumps(task)))  # fmt: skip
                strays = sorted(set(found["held"]) - set(owned))
                report["strays"] += len(strays)
                report["leftovers"] += [f"{host}:{path}" for path in found["leftovers"]]
                report["missing"] += found["missing_count"]
                report["wrong"] += found["wrong_count"]
                report["checked"] += found["checked"]
                if found["missing"] or found["wrong"] or strays:
                    example = {"missing": found["missing"][:5], "wrong": found["wrong"][:5]}
                    report["examples"].append({host: {**example, "strays": strays[:5]}})
            # carbon-cache writes the last slots within seconds: wait for them.
            if not (report["missing"] or report["wrong"]) or time.monotonic() > deadline:
                return report
            time.sleep(5)


def move_line(name: str, seconds: float, move: dict) -> str:
    """The move's total time, each phase's, and each pass's files/s per destination
    (from the state file the playbook kept)."""
    phases = ", ".join(f"{p['phase']} {p['seconds']:.0f} s" for p in move["phases"])
    passes = []
    for phase in move["phases"]:
        for host, done in sorted(phase.get("info", {}).items()):
            if isinstance(done, dict) and done.get("files"):
                passes.append(
                    f"{phase['phase']} -> {host}: {done['files']} files in {done['seconds']:.1f} s "
                    f"({done['files_per_second']:.0f} files/s)"
                )
    total = move["phases"][-1]["at"] - move["started"]
    return (
        f"{name}: {total:.0f} s from start to cleanup ({phases}); playbook {seconds:.0f} s; "
        f"{'; '.join(passes) or 'no file moved'}"
    )


def expand_interrupted(run: Run, inventories: list[str]) -> tuple[float, str]:
    """expand.yml with the sync pulling history into the new host killed -9
    halfway (small batches, so there is a halfway), then run again to its end:
    seconds, and what happened."""
    run.start_sync_killer(run.added)
    _, first_s, status = playbook(
        inventories, "expand.yml", "-e", "lifecycle_sync_batch=20", succeed=False
    )
    kill = run.sync_killer_result(run.added)
    interrupted = live_phases(run.relay)
    assert kill["killed"] and status != 0, (kill, status)
    assert interrupted == ["deploy"], interrupted  # it died in the copy
    _, second_s, _ = playbook(inventories, "expand.yml")
    return first_s + second_s, (
        f"expand interrupted: the sync on {run.added} killed -9 with {kill['done']} files done "
        f"and {kill['pending']} pending ({first_s:.0f} s), then run again ({second_s:.0f} s)"
    )


def decommission_interrupted(
    run: Run, inventories: list[str], node: tuple
) -> tuple[str, float, str]:
    """decommission.yml with ansible-playbook killed -9 (with its workers) as
    soon as the history copy is recorded, while the relays roll onto both
    rings; then run again to its end: the last run's output, seconds, and what
    happened."""
    killed_s, at_kill = playbook_killed_after(
        inventories, "decommission.yml", run.relay, "copy", *node
    )
    assert "copy" in at_kill and "cutover" not in at_kill, at_kill
    out, rest_s, _ = playbook(inventories, "decommission.yml", *node)
    return (
        out,
        killed_s + rest_s,
        (
            f"decommission interrupted: ansible-playbook killed -9 after {killed_s:.0f} s with "
            f"{', '.join(at_kill)} done, then run again ({rest_s:.0f} s)"
        ),
    )


def test_expand_then_decommission_under_traffic_lose_no_point_and_leave_no_copy(cluster, tmp_path):
    run = Run(cluster, tmp_path)
    inventories = [run.inventory, str(run.extra)]
    expanding, decommissioning = LAB_MOVE in ("", "expand"), LAB_MOVE in ("", "shrink")
    node = ("-e", f"node={run.removed}")
    run.write_history()
    owners = [relay_owners(run.relay, run.names)]  # before, and after each move
    query = cluster.group("query")[0]
    probed = [n for n in run.names if int(n.split(".")[-2][1:]) in PROBED_GROUPS]
    port = setting(cluster, query, "graphite_web", "graphite_web_port")
    probe = GraphProbe(
        url=f"http://{cluster.address(query)}:{port}",
        targets=[f"{run.prefix}.g{g}.*" for g in PROBED_GROUPS],
        since=run.history[-1] - STEP,
    ).start()
    started = time.time()
    run.start_sender()
    delivered: dict[int, float] = {}
    lines, moves = [], []
    try:
        time.sleep(2 * STEP)  # the stream runs before the move starts
        if expanding:
            if LAB_MOVE:
                seconds, what = playbook(inventories, "expand.yml")[1], ""
            else:
                seconds, what = expand_interrupted(run, inventories)
            expand = last_move(run.relay)
            assert expand["action"] == "expand" and expand["outcome"] == "done"
            owners.append(relay_owners(run.relay, run.names))
            again, _, _ = playbook(inventories, "expand.yml")
            assert set(recap_changes(again).values()) == {0}, recap_changes(again)
            lines += [what, move_line("expand", seconds, expand)]
            moves.append("expand")
        if decommissioning:
            if LAB_MOVE:
                out, seconds, _ = playbook(inventories, "decommission.yml", *node)
                what = ""
            else:
                out, seconds, what = decommission_interrupted(run, inventories, node)
            decommission = last_move(run.relay)
            assert decommission["action"] == "decommission" and decommission["outcome"] == "done"
            assert re.search(rf"Now\s+remove\s+{run.removed}\s", out), out[-3000:]
            owners.append(relay_owners(run.relay, run.names))
            lines += [what, move_line("decommission", seconds, decommission)]
            moves.append("decommission")
        time.sleep(STEP + GRACE)  # the stream and the probe go on after the move
    finally:
        delivered = run.stop_sender()
        renders = probe.stop()
    if decommissioning:
        rerun, _, _ = playbook(inventories, "decommission.yml", *node)
        assert set(recap_changes(rerun).values()) == {0}, recap_changes(rerun)
        assert cluster.address(run.removed) not in ring_hosts(run.relay)
    if expanding:
        assert cluster.address(run.added) in ring_hosts(run.relay)

    slots = sorted(delivered)
    report = run.check(run.history + slots)
    history = {t: started for t in run.history}  # on disk before the probe's first render
    holes = gaps(renders, {**history, **delivered}, probed, STEP, GRACE)
    moved_probed = [sum(1 for n in probed if a[n] != b[n]) for a, b in itertools.pairwise(owners)]
    sent = NAMES * len(slots)
    lines.insert(
        0,
        f"lifecycle: {NAMES} metrics (half line, half pickle), {len(slots)} slots of {STEP} s "
        f"sent through the VIP ({sent} points) + {HISTORY} slots of history; "
        f"{report['checked']} points checked on their owners: "
        f"{report['checked'] - report['missing'] - report['wrong']} found, "
        f"{report['missing']} lost, {report['wrong']} wrong; {report['strays']} files on "
        f"non-owners; slots sent again after a failed connection: {len(run.retries)}; "
        f"temporary files the killed sync left: {len(report['leftovers'])} "
        f"{report['leftovers'][:3]}",
    )
    lines.append(
        f"graphs: {holes.renders} renders of {holes.series} series through {query} every "
        f"{probe.every:.0f} s ("
        + ", ".join(
            f"{n} of them moved by the {m}" for n, m in zip(moved_probed, moves, strict=True)
        )
        + f"): {len(holes.missing)} slots missing from a graph {GRACE} s after they were sent, "
        f"longest gap {holes.longest_gap} s; {len(holes.failed)} renders failed"
    )
    if expanding:
        added = cluster.address(run.added)
        moved_in = sum(1 for o in owners[1].values() if added in o)
        creates = int(
            setting(cluster, run.added, "carbon_storage", "carbon_storage_max_creates_per_minute")
        )
        instances = len(cluster.vars(run.storage[0])["carbon_instances"])
        window = (expand["phases"][-1]["at"] - next(
            p["at"] for p in expand["phases"] if p["phase"] == "copy")) / 60  # fmt: skip
        allowed = creates * instances * window
        lines.append(
            f"names moved to {run.added}: {moved_in}; its carbon could create {allowed:.0f} "
            f"files from the history copy to the end of the expand ({creates}/min x "
            f"{instances} instances x {window:.1f} min)"
        )
    print("\n" + "\n".join(line for line in lines if line))
    assert report["checked"] >= NAMES * (HISTORY + len(slots))
    assert not report["missing"] and not report["wrong"], report["examples"]
    assert report["strays"] == 0, report["examples"]
    assert holes.renders > 0 and all(moved_probed), moved_probed
    assert not holes.missing, holes.missing[:10]
    assert not holes.failed, holes.failed[:10]
    # Without the history copy creating their files first, the spare's carbon
    # could not have created most of them in time: points there would have been
    # dropped. (The scenario's spare creates 60 files a minute; a rerun on the
    # same cluster may add back a host with the role's default.)
    if expanding and not LAB_MOVE and run.added in run.spare:
        assert moved_in > allowed, (moved_in, allowed)

"""carbonscale.migrate.lifecycle (the phases of expand.yml / decommission.yml) and
carbonscale.migrate.drain (waiting for carbon-cache to write out the moved metrics),
with relay configs rendered by the relay role's own template and validated by
carbon-c-relay, and a CarbonLink server speaking carbon's framing."""

from __future__ import annotations

import json
import pickle
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from relay_oracle import needs_relay, write_cluster_config

from carbonscale import CarbonscaleError
from carbonscale.migrate import drain, lifecycle
from carbonscale.migrate.plan import without_prefixes
from carbonscale.migrate.transport import Listing

OLD = ["10.0.0.31:2103=a", "10.0.0.31:2203=b", "10.0.0.32:2103=a", "10.0.0.32:2203=b"]
NEW = [*OLD, "10.0.0.33:2103=a", "10.0.0.33:2203=b"]


def config(members, hash_type="carbon_ch", replication=1, second=None) -> str:
    text = f'cluster "storage"\n    {hash_type} replication {replication}\n'
    text += "".join(f"        {m}\n" for m in members) + "    ;\n"
    if second:
        text += f'cluster "storage_next"\n    {hash_type} replication {replication}\n'
        text += "".join(f"        {m}\n" for m in second) + "    ;\n"
    names = '"storage" "storage_next"' if second else '"storage"'
    return text + f"match *\n    send to {names}\n    stop\n    ;\n"


@needs_relay
def test_live_ring_is_read_from_configs_carbon_c_relay_accepts(tmp_path):
    path = write_cluster_config(tmp_path / "relay.conf", "fnv1a_ch", 2, OLD)
    text = path.read_text()
    check = subprocess.run(["carbon-c-relay", "-t", "-t", "-f", str(path)], input=b"",
                           capture_output=True)  # fmt: skip
    assert check.returncode == 0, check.stderr
    live = lifecycle.live_cluster({"relay1": text, "relay2": text}, "c")
    assert live.members == tuple(OLD)
    assert (live.hash_type, live.replication) == ("fnv1a_ch", 2)


def test_relays_that_disagree_are_named_in_one_message():
    configs = {"relay1": config(OLD), "relay2": config(NEW), "relay3": config(OLD)}
    with pytest.raises(CarbonscaleError) as error:
        lifecycle.live_cluster(configs, "storage")
    message = str(error.value)
    assert "relays disagree on cluster 'storage'" in message
    assert "relay1, relay3: carbon_ch replication 1" in message
    assert "relay2: carbon_ch replication 1" in message and "10.0.0.33:2203=b" in message
    with pytest.raises(CarbonscaleError, match="relay2: no consistent-hash cluster 'storage'"):
        lifecycle.live_cluster({"relay1": config(OLD), "relay2": "# empty\n"}, "storage")


def test_a_move_goes_through_every_phase_in_order_and_tells_the_relays_what_to_run(tmp_path):
    state = str(tmp_path / "move.json")
    live = lifecycle.live_cluster({"r1": config(OLD), "r2": config(OLD)}, "storage")
    move, how = lifecycle.begin(state, "expand", live, NEW, "storage", "storage_next", now=100.0)
    assert how == "started"
    assert move.summary()["added_hosts"] == ["10.0.0.33"] and move.next_phase == "deploy"
    move.save()
    seen = []
    for step, phase in enumerate(lifecycle.PHASES):
        again, how = lifecycle.begin(state, "expand", live, NEW, "storage", "storage_next")
        assert how == "continued" and again.next_phase == phase  # a rerun continues here
        seen.append((phase, again.relay_rings()))
        with pytest.raises(CarbonscaleError, match="cannot be done before"):
            later = lifecycle.PHASES[step + 1 :]
            if not later:
                raise CarbonscaleError("cannot be done before: nothing later")
            again.mark(later[0])
        again.mark(phase, {"files": step}, now=200.0 + step)
        again.mark(phase)  # twice: no change
        again.save()
    rings = dict(seen)
    old_only = {"members": OLD, "migration_members": []}
    assert rings["deploy"] == rings["copy"] == old_only  # no traffic before the history
    assert rings["dual"] == rings["delta"] == rings["cutover"] == {
        "members": OLD, "migration_members": NEW,
    }  # fmt: skip
    assert rings["final"] == rings["cleanup"] == {"members": NEW, "migration_members": []}
    done = lifecycle.Move.load(state)
    assert done.next_phase is None
    assert [e["seconds"] for e in done.data["phases"]] == [100.0] + [1.0] * 6
    with pytest.raises(CarbonscaleError, match="cleanup is done"):
        done.relay_rings(rollback=True)
    assert "next: nothing (the move is complete)" in lifecycle.read_status(state)
    archived = done.archive("done")
    assert not Path(state).exists() and json.loads(Path(archived).read_text())["outcome"] == "done"


def test_rollback_returns_the_old_ring_until_cleanup(tmp_path):
    state = str(tmp_path / "move.json")
    live = lifecycle.live_cluster({"r1": config(OLD)}, "storage")
    move, _ = lifecycle.begin(state, "expand", live, NEW, "storage", "storage_next")
    for phase in ("deploy", "copy", "dual", "delta", "cutover"):
        move.mark(phase)
    assert move.relay_rings() == {"members": NEW, "migration_members": []}
    assert move.relay_rings(rollback=True) == {"members": OLD, "migration_members": []}


def test_a_different_move_while_one_is_recorded_is_refused(tmp_path):
    state = str(tmp_path / "move.json")
    live = lifecycle.live_cluster({"r1": config(OLD)}, "storage")
    move, _ = lifecycle.begin(state, "expand", live, NEW, "storage", "storage_next")
    move.mark("deploy")
    move.save()
    other = [*OLD, "10.0.0.34:2103=a"]
    with pytest.raises(CarbonscaleError, match=r"a move is in progress .expand to .*done: deploy"):
        lifecycle.begin(state, "expand", live, other, "storage", "storage_next")
    Path(state).write_text("{}")
    with pytest.raises(CarbonscaleError, match="not a carbonscale move state"):
        lifecycle.Move.load(state)


def test_begin_refuses_what_the_playbook_would_get_wrong(tmp_path):
    state = str(tmp_path / "move.json")
    live = lifecycle.live_cluster({"r1": config(NEW)}, "storage")
    assert lifecycle.begin(state, "expand", live, NEW, "storage", "storage_next")[0] is None
    with pytest.raises(CarbonscaleError, match=r"expand would remove 10.0.0.33"):
        lifecycle.begin(state, "expand", live, OLD, "storage", "storage_next")
    small = lifecycle.live_cluster({"r1": config(OLD)}, "storage")
    with pytest.raises(CarbonscaleError, match=r"decommission would add 10.0.0.33"):
        lifecycle.begin(state, "decommission", small, NEW, "storage", "storage_next")
    dual = lifecycle.live_cluster({"r1": config(OLD, second=NEW)}, "storage")
    with pytest.raises(CarbonscaleError, match="second cluster 'storage_next' but no move"):
        lifecycle.begin(state, "expand", dual, NEW, "storage", "storage_next")
    with pytest.raises(CarbonscaleError, match="replication"):  # the target cannot be run
        lifecycle.begin(
            state, "decommission",
            lifecycle.live_cluster({"r1": config(OLD, replication=4)}, "storage"),
            OLD[:2], "storage", "storage_next",
        )  # fmt: skip
    assert not Path(state).exists()  # nothing was written


def test_decommission_target_keeps_every_other_member_in_order():
    assert lifecycle.decommission_target(NEW, ["10.0.0.32"]) == [
        "10.0.0.31:2103=a", "10.0.0.31:2203=b", "10.0.0.33:2103=a", "10.0.0.33:2203=b",
    ]  # fmt: skip
    with pytest.raises(CarbonscaleError, match=r"10.0.0.99: not in the ring"):
        lifecycle.decommission_target(NEW, ["10.0.0.99"])
    with pytest.raises(CarbonscaleError, match="empty"):
        lifecycle.decommission_target(OLD, ["10.0.0.31", "10.0.0.32"])
    live = lifecycle.live_cluster({"r1": config(NEW)}, "storage")
    assert lifecycle.decommission_plan_target(live, ["10.0.0.33"], None) == OLD
    done = lifecycle.live_cluster({"r1": config(OLD)}, "storage")
    assert lifecycle.decommission_plan_target(done, ["10.0.0.33"], None) is None  # a rerun
    change = lifecycle.ring_change(NEW, OLD)
    assert change.removed_hosts == ["10.0.0.33"] and change.added == []


def test_carbon_own_metrics_are_left_out_of_a_plan_listing():
    paths = [b"carbon/agents/s1-a/cache/size.wsp", b"app/web1/cpu.wsp", b"carbon/relays/r1/x.wsp",
             b"carbon/agentsx/y.wsp"]  # fmt: skip
    block = b"".join(p + b"\n" for p in paths)
    listing = Listing(block, 4, np.arange(4, dtype=np.int64), np.zeros(4, np.int64), 99)
    kept = without_prefixes(listing, lifecycle.LOCAL_PREFIXES)
    assert kept.paths == paths[1:] and kept.sizes.tolist() == [1, 2, 3] and kept.free == 99
    assert without_prefixes(listing, ()) is listing


class _CarbonLink(socketserver.BaseRequestHandler):
    """carbon's CacheManagementHandler framing: a 4-byte length and a pickle."""

    def handle(self):
        (length,) = struct.unpack("!L", self.request.recv(4, socket.MSG_WAITALL))
        request = pickle.loads(self.request.recv(length, socket.MSG_WAITALL))
        assert request["type"] == "cache-query-bulk"
        cache = self.server.cache
        answer = {m: list(cache.get(m, {}).items()) for m in request["metrics"]}
        self.server.asked.append(len(request["metrics"]))
        # Cleared before the answer goes out: the client's next step (a new
        # query, or the test flipping drain_after_one) never races this thread.
        cache.clear() if self.server.drain_after_one else None
        data = pickle.dumps({"datapointsByMetric": answer}, protocol=2)
        self.request.sendall(struct.pack("!L", len(data)) + data)


@pytest.fixture
def carbonlink():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _CarbonLink)
    server.cache, server.asked, server.drain_after_one = {}, [], False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_drain_waits_for_points_stamped_before_the_dual_write(carbonlink):
    metrics = [f"m{i}" for i in range(2500)]
    address = carbonlink.server_address
    carbonlink.cache.update({"m7": {90: 1.0, 120: 2.0}, "m2400": {130: 1.0}})
    assert drain.held_before([address], metrics, 100) == ["m7"]
    assert carbonlink.asked == [1000, 1000, 500]  # chunks of one bulk query
    assert drain.held_before([address], metrics, 131) == ["m2400", "m7"]
    carbonlink.drain_after_one = True
    rounds, _ = drain.wait_drained([address], metrics, 100, timeout=30, interval=0.01)
    assert rounds == 2
    carbonlink.cache.update({"m1": {50: 1.0}})
    carbonlink.drain_after_one = False
    with pytest.raises(CarbonscaleError, match=r"for 1 moved metric.* after 0 s .e.g. m1"):
        drain.wait_drained([address], metrics, 100, timeout=0, interval=0.01)


def test_drain_names_an_instance_that_does_not_answer():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CarbonscaleError, match=f"carbon-cache at 127.0.0.1:{port}: CarbonLink"):
        drain.cache_query_bulk(("127.0.0.1", port), ["x"], timeout=2)


def test_status_prints_the_phases_of_a_move(tmp_path):
    state = tmp_path / "move.json"
    live = lifecycle.live_cluster({"r1": config(OLD)}, "storage")
    move, _ = lifecycle.begin(str(state), "expand", live, NEW, "storage", "storage_next")
    move.mark("deploy")
    move.save()
    done = subprocess.run(
        [sys.executable, "-m", "carbonscale", "migrate", "status", "--move", str(state)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("move expand started ") and "+1 host(s) 10.0.0.33" in lines[0]
    assert lines[1].startswith("  deploy   done ") and lines[-1] == "  next: copy"
    missing = subprocess.run(
        [sys.executable, "-m", "carbonscale", "migrate", "status", "--move", str(tmp_path / "x")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 0 and "no move in progress" in missing.stdout


def _module(tmp_path: Path, args: dict, *extra: str) -> dict:
    from ansible_runner import module_task

    body = "".join(f"        {key}: {json.dumps(value)}\n" for key, value in args.items())
    return module_task(tmp_path, "carbon_lifecycle", body, *extra)


@pytest.mark.slow
def test_module_begins_in_check_mode_without_writing_then_records_each_phase(tmp_path):
    state = tmp_path / "lifecycle" / "move.json"
    configs = {"r1": config(NEW), "r2": config(NEW)}
    begin = {"step": "begin", "state": str(state), "action": "decommission",
             "configs": configs, "remove": ["10.0.0.32"]}  # fmt: skip
    checked = _module(tmp_path, begin, "--check")
    assert checked["changed"] and checked["move"]["removed_hosts"] == ["10.0.0.32"]
    assert not state.exists()  # check mode: nothing written
    started = _module(tmp_path, begin)
    assert started["message"] == "started" and started["move"]["next"] == "deploy"
    assert started["relays"] == {"members": NEW, "migration_members": []}
    mark = {"step": "mark", "state": str(state), "phase": "copy"}
    refused = _module(tmp_path, mark)
    assert refused["failed"] and "phase copy cannot be done before deploy" in refused["msg"]
    for phase in ("deploy", "copy"):
        marked = _module(tmp_path, {**mark, "phase": phase, "info": {"files": 3}})
        assert marked["changed"] and marked["move"]["done"][-1] == phase
    again = _module(tmp_path, {**mark, "phase": "copy"})
    assert not again["changed"]
    target = [m for m in NEW if not m.startswith("10.0.0.32:")]
    assert again["relays"] == {"members": NEW, "migration_members": target}
    rolled = _module(tmp_path, {**begin, "rollback": True})
    assert rolled["message"] == "continued" and rolled["relays"]["members"] == NEW
    bad = _module(tmp_path, {**begin, "configs": {"r1": config(NEW), "r2": config(OLD)}})
    assert bad["failed"] and "relays disagree" in bad["msg"]
    finished = _module(tmp_path, {"step": "finish", "state": str(state), "outcome": "done"})
    assert finished["changed"] and not state.exists()
    assert "the move ended (done)" in finished["message"]
    # The move is over and the relays run the target: a rerun has nothing to do.
    rerun = _module(tmp_path, {**begin, "configs": {"r1": config(target)}})
    assert not rerun["changed"] and rerun["move"] == {}
    assert rerun["message"] == "10.0.0.32: not in the ring the relays run"


def test_drained_command_reads_the_plan_and_refuses_in_one_line(tmp_path, carbonlink):
    plan = tmp_path / "plan.tsv"
    head = {"hosts": ["10.0.0.31", "10.0.0.33"], "endpoints": {}, "summary": {}}
    plan.write_text(
        "# carbonscale migrate plan 1 0123456789abcdef\n" + json.dumps(head) + "\n"
        "a.b\t10.0.0.33\t10.0.0.31\t100\n"  # held here: asked
        "c.d\t10.0.0.31\t10.0.0.33\t100\n"  # not held here: not asked
    )
    port = carbonlink.server_address[1]
    carbonlink.cache.update({"a.b": {50: 1.0}, "c.d": {50: 1.0}})
    argv = [sys.executable, "-m", "carbonscale", "migrate", "drained", "--plan", str(plan),
            "--self", "10.0.0.31", f"--carbonlink=127.0.0.1:{port}", "--timeout", "0"]  # fmt: skip
    held = subprocess.run([*argv, "--before", "100"], capture_output=True, text=True)
    assert held.returncode == 2 and held.stdout == ""
    assert held.stderr.count("\n") == 1 and "1 moved metric(s)" in held.stderr, held.stderr
    assert "e.g. a.b" in held.stderr
    done = subprocess.run([*argv, "--before", "50"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "holds no point stamped before 50 for the 1 metrics it holds" in done.stdout

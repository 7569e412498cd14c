"""Stack dumps on SIGUSR2: real processes with carbonscale.stackdump's handler
(a plain Python process, the pickle and statsd relay daemons as the CLI starts
them) are signalled, their stderr is read with the same collect_dump and
parse_dump `carbonscale ops stacks` uses on the journal, and they keep running.
The journal and systemd half runs in molecule/migrate (tests/test_storage.py
there) against carbon-cache and the migration file service."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from pickle_relay_harness import LineSink, RelayProcess, frame
from relay_oracle import needs_relay
from test_fabfile import fab, site, sshd  # noqa: F401 (site, sshd: fixtures)

from carbonscale import CarbonscaleError, stackdump
from carbonscale.cli import build_parser
from carbonscale.ops.stacks import (
    catches,
    collect_dump,
    instance_unit,
    is_dump_line,
    known_unit,
    parse_dump,
    stack_errors,
    stacks_table,
)

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "carbonscale"]
SIGNAL = stackdump.stack_signal()


class StderrLines:
    """A process's stderr lines as they come; calling it returns the new ones
    (what JournalReader returns from the journal)."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.taken = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._drain, args=(stream,), daemon=True).start()

    def _drain(self, stream) -> None:
        for line in stream:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def __call__(self) -> list[str]:
        with self.lock:
            new, self.taken = self.lines[self.taken :], len(self.lines)
        return new


def functions(threads: list[dict]) -> list[set[str]]:
    return [{frame["function"] for frame in thread["frames"]} for thread in threads]


HOOKED = textwrap.dedent(
    """
    import sys, threading, time
    from carbonscale import CarbonscaleError, stackdump
    stackdump.install()

    def writer_waits_in_a_named_function(ready):
        ready.set()
        threading.Event().wait()

    ready = threading.Event()
    threading.Thread(target=writer_waits_in_a_named_function, args=(ready,), daemon=True).start()
    ready.wait()
    print("log line before the dump", file=sys.stderr, flush=True)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
    """
)


@pytest.fixture
def hooked():
    proc = subprocess.Popen(
        [sys.executable, "-c", HOOKED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait()


def test_a_hooked_process_dumps_every_thread_and_keeps_running(hooked):
    stderr = StderrLines(hooked.stderr)
    assert catches(hooked.pid, SIGNAL)
    os.kill(hooked.pid, SIGNAL)
    lines, complete = collect_dump(stderr, timeout=10)
    assert complete  # ended by the marker, not by a pause
    threads = parse_dump(lines)
    assert len(threads) == 2, lines
    assert "log line before the dump" not in lines
    [current] = [t for t in threads if t["current"]]
    assert current["frames"][-1]["function"] == "<module>"
    writer = next(t for t in threads if "writer_waits_in_a_named_function" in functions([t])[0])
    assert re.fullmatch(r"0x[0-9a-f]+", writer["id"])
    assert writer["frames"][0]["file"].endswith("threading.py")  # innermost first: the wait
    assert all(isinstance(f["line"], int) for f in writer["frames"])
    time.sleep(0.3)
    assert hooked.poll() is None, "the signal killed the process"
    # A second dump: the handler stays.
    os.kill(hooked.pid, SIGNAL)
    lines, complete = collect_dump(stderr, timeout=10)
    assert complete and len(parse_dump(lines)) == 2
    assert stackdump.END_MARKER not in lines


STUCK_IN_C = textwrap.dedent(
    """
    import itertools, threading, time
    from carbonscale import stackdump
    stackdump.install()

    def worker_waits():
        threading.Event().wait()

    threading.Thread(target=worker_waits, daemon=True).start()
    time.sleep(0.2)
    print("ready", flush=True)
    sum(itertools.repeat(1, 10**12))  # a C loop that holds the GIL: no Python runs
    """
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def wait_until_burning_cpu(pid: int, seconds: float = 0.3, timeout: float = 30) -> None:
    """Until the child has spent `seconds` of CPU after "ready": only the C loop
    burns CPU, so by then it is inside it. A signal sent between "ready" and the
    loop (a loaded machine can preempt the child there) would run the Python
    handler and write the end marker this test says is missing."""
    start, deadline = cpu_seconds(pid), time.monotonic() + timeout
    while cpu_seconds(pid) - start < seconds:
        assert time.monotonic() < deadline, "the child never entered its C loop"
        time.sleep(0.05)


def test_a_main_thread_stuck_in_c_still_dumps_without_the_end_marker():
    proc = subprocess.Popen([sys.executable, "-c", STUCK_IN_C], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline() == "ready\n"
        stderr = StderrLines(proc.stderr)
        wait_until_burning_cpu(proc.pid)
        os.kill(proc.pid, SIGNAL)
        start = time.monotonic()
        lines, complete = collect_dump(stderr, timeout=10, quiet=1.0)
        assert not complete
        assert time.monotonic() - start >= 1.0  # ended by the pause
        threads = parse_dump(lines)
        assert [t["current"] for t in threads] == [False, True]
        assert "worker_waits" in functions(threads)[0]
        assert threads[1]["frames"][-1]["function"] == "<module>"
        table = stacks_table(
            {
                "": {
                    "units": [
                        {
                            "unit": "u",
                            "pid": proc.pid,
                            "lines": lines,
                            "threads": threads,
                            "complete": False,
                        }
                    ]
                }
            }
        )
        assert table.endswith("the dump may be cut)")
    finally:
        proc.kill()
        proc.wait()


def test_no_dump_within_the_timeout_is_none():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert not catches(proc.pid, SIGNAL)  # no handler: ops stacks refuses to signal it
        start = time.monotonic()
        assert collect_dump(StderrLines(proc.stderr), timeout=0.5, quiet=0.2) is None
        assert 0.5 <= time.monotonic() - start < 3
    finally:
        proc.kill()
        proc.wait()


def test_catches_reads_the_kernels_view():
    assert not catches(os.getpid(), signal.SIGUSR1)
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        assert catches(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert not catches(2**22 + 12345, SIGNAL)  # no such process


def test_the_pickle_relay_daemon_dumps_its_stacks_and_keeps_relaying():
    sink = LineSink()
    relay = RelayProcess(sink.port)
    try:
        assert catches(relay.proc.pid, SIGNAL)
        taken = len(relay.log)
        os.kill(relay.proc.pid, SIGNAL)

        def new_lines():
            nonlocal taken
            new, taken = relay.log[taken:], len(relay.log)
            return new

        # The end marker comes from a Python handler in the relay's main thread,
        # after the C-level dump: on a loaded machine that can take seconds.
        lines, complete = collect_dump(new_lines, timeout=20, quiet=5.0)
        assert complete, (relay.alive(), relay.log[-20:])
        threads = parse_dump(lines)
        assert threads
        files = {f["file"] for t in threads for f in t["frames"]}
        assert any(f.endswith("carbonscale/relay/pickle_relay.py") for f in files), files
        assert any(f.endswith("carbonscale/cli.py") for f in files), files
        with relay.connect() as conn:  # still serving
            conn.sendall(frame(pickle.dumps([("stacks.after.dump", (1700000000, 1.0))], 2)))
        assert sink.wait_for(lambda s: s.lines(b"stacks.after.dump"))
    finally:
        relay.stop()
        sink.close()


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            found += [int(c) for c in children.read().split()]
    return found


def test_the_statsd_relay_and_its_forked_workers_have_the_handler():
    backend = _free_port(socket.SOCK_DGRAM)
    admin = _free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [*CLI, "relay", "statsd", f"127.0.0.1:{backend}", "--listen", "127.0.0.1",
         "--port", str(_free_port(socket.SOCK_DGRAM)), "--admin-listen", "127.0.0.1",
         "--admin-port", str(admin), "--workers", "2"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while len(_children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        stderr = StderrLines(proc.stderr)
        workers = _children(proc.pid)
        assert all(catches(pid, SIGNAL) for pid in [proc.pid, *workers])
        os.kill(proc.pid, SIGNAL)
        lines, complete = collect_dump(stderr, timeout=10)
        assert complete
        threads = parse_dump(lines)
        files = {f["file"] for t in threads for f in t["frames"]}
        assert any(f.endswith("carbonscale/relay/statsd/supervisor.py") for f in files), files
        time.sleep(0.3)
        assert proc.poll() is None and _children(proc.pid) == workers
    finally:
        proc.terminate()
        proc.wait(20)


def _verb_funcs(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    func = parser.get_default("func")
    if func is not None:
        found.add(stackdump.verb_name(func))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _verb_funcs(sub)
    return found


def test_every_daemon_verb_is_a_verb_of_the_cli_and_only_those_install():
    funcs = _verb_funcs(build_parser())
    assert funcs >= stackdump.DAEMON_VERBS, stackdump.DAEMON_VERBS - funcs
    assert "carbonscale.commands.ops:run_stacks" in funcs
    assert "carbonscale.commands.ops:run_stacks" not in stackdump.DAEMON_VERBS
    # The units that run them are the ones `ops stacks` dumps by default.
    from carbonscale.ops.stacks import DAEMON_UNITS

    for unit in DAEMON_UNITS:
        name = unit.removesuffix(".service")
        templates = list(REPO.glob(f"roles/*/templates/{name}.service.j2"))
        assert templates, unit
        assert "bin/carbonscale " in templates[0].read_text()


def test_a_daemon_verb_installs_the_handler_and_another_verb_does_not():
    probe = textwrap.dedent(
        """
        import signal, sys
        from carbonscale import CarbonscaleError, stackdump
        from carbonscale.commands import ops, relay
        from carbonscale.ops.stacks import catches
        import os
        assert not stackdump.install_for_daemon(ops.run_stacks)
        print(catches(os.getpid(), signal.SIGUSR2))
        assert stackdump.install_for_daemon(relay.run_pickle)
        print(catches(os.getpid(), signal.SIGUSR2))
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_carbon_caches_launcher_dumps_and_ends_with_the_marker(tmp_path):
    """roles/carbon_storage's launcher, run as the unit runs it, over a stand-in
    for carbon's run_twistd_plugin (a writer thread in writeForever, the main
    thread waiting as twisted's reactor does): its own handler dumps both and
    ends with the marker. molecule/migrate does the same against carbon."""
    carbon = tmp_path / "carbon"
    carbon.mkdir()
    (carbon / "__init__.py").write_text("")
    (carbon / "exceptions.py").write_text("class CarbonConfigException(Exception):\n    pass\n")
    (carbon / "util.py").write_text(
        textwrap.dedent(
            """
            import threading, time

            def writeForever():
                threading.Event().wait()

            def run_twistd_plugin(filename):
                threading.Thread(target=writeForever, daemon=True).start()
                print("ready", filename, flush=True)
                while True:
                    time.sleep(0.05)
            """
        )
    )
    launcher = REPO / "roles/carbon_storage/files/carbon-cache-drained.py"
    proc = subprocess.Popen(
        [sys.executable, str(launcher), "--instance=a", "--nodaemon", "start"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "ready /usr/bin/carbon-cache\n"
        assert catches(proc.pid, SIGNAL)
        stderr = StderrLines(proc.stderr)
        os.kill(proc.pid, SIGNAL)
        lines, complete = collect_dump(stderr, timeout=10)
        assert complete
        threads = parse_dump(lines)
        assert any("writeForever" in names for names in functions(threads)), lines
        assert any(f["file"] == str(launcher) for t in threads for f in t["frames"])
        time.sleep(0.3)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_dump_lines_and_python_3_12_headers():
    assert is_dump_line("Thread 0x00007f9a2a48f6c0 (most recent call first):")
    assert is_dump_line('  File "/x.py", line 5 in f')
    assert not is_dump_line("INFO relay: listening on :2004")
    threads = parse_dump(
        [
            "Thread 0x00007f01 [writer] (most recent call first):",  # 3.13 names threads
            '  File "/usr/lib/python3/dist-packages/carbon/writer.py", line 194 in writeForever',
            "  <no Python frame>",
            "Current thread 0x00007f02 (most recent call first):",
            '  File "<frozen x>", line ??? in <module>',
        ]
    )
    assert [(t["id"], t["current"]) for t in threads] == [
        ("0x00007f01", False),
        ("0x00007f02", True),
    ]
    assert threads[0]["frames"] == [
        {"file": "/usr/lib/python3/dist-packages/carbon/writer.py", "line": 194,
         "function": "writeForever"}
    ]  # fmt: skip
    assert threads[1]["frames"][0]["line"] is None


def test_table_and_errors_name_host_unit_and_pid():
    answers = {
        "node1": {
            "units": [
                {"unit": "carbon-cache@a.service", "pid": 7, "threads": [{}],
                 "lines": ["Current thread 0x1 (most recent call first):"]},
                {"unit": "carbon-cache@b.service",
                 "error": "carbon-cache@b.service is not running"},
            ]
        }
    }  # fmt: skip
    assert stacks_table(answers).splitlines() == [
        "== node1: carbon-cache@a.service (pid 7), 1 threads ==",
        "Current thread 0x1 (most recent call first):",
    ]
    assert stack_errors(answers) == ["node1: carbon-cache@b.service is not running"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--instance", "a b"], "'a b' is not a carbon-cache instance name"),
        (["--instance", "a", "--timeout", "0"], "--timeout must be > 0"),
        (
            ["--unit", "systemd-journald"],
            "systemd-journald is not a unit with the stack-dump handler: carbon-cache@NAME or "
            "carbonscale-pickle-relay, carbonscale-statsd-relay, carbonscale-lvs-pool, "
            "carbonscale-migrate-serve",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    run = subprocess.run([*CLI, "ops", "stacks", *args], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.startswith(f"carbonscale: error: {message}")
    assert len(run.stderr.splitlines()) == 1


def test_instance_and_known_units(tmp_path):
    conf = tmp_path / "carbon.conf"
    assert instance_unit("a", str(conf)) == "carbon-cache@a.service"  # no carbon.conf here
    conf.write_text(
        "[cache]\nLOG_DIR = /var/log/%(instance)s\n[cache:a]\nLINE_RECEIVER_PORT = 2103\n"
        "[cache:b-2]\nLINE_RECEIVER_PORT = 2203\n[relay]\nLINE_RECEIVER_PORT = 2013\n"
    )
    assert instance_unit("b-2", str(conf)) == "carbon-cache@b-2.service"
    with pytest.raises(CarbonscaleError) as refused:
        instance_unit("zz", str(conf))
    assert str(refused.value) == f"no carbon-cache instance 'zz' here: {conf} has a, b-2"
    assert known_unit("carbon-cache@b") == "carbon-cache@b.service"
    assert known_unit("carbonscale-pickle-relay") == "carbonscale-pickle-relay.service"
    assert known_unit("carbonscale-lvs-pool.service") == "carbonscale-lvs-pool.service"
    for bad in ("carbon-cache@", "carbon-cache@a b", "carbon-cache.service", "nginx"):
        with pytest.raises(CarbonscaleError, match="not a unit with the stack-dump handler"):
            known_unit(bad)


# ------------------------------------------------------------ the fab task
# test_fabfile's throwaway sshd and inventory (its storage hosts all reach this
# machine over SSH); its tier is placed by carbon-c-relay -t, hence needs_relay.


def test_fab_stacks_is_listed_with_its_help():
    out = fab("--list")
    assert out.returncode == 0, out.stderr
    assert any(line.split()[:2] == ["stacks", "Every"] for line in out.stdout.splitlines())


@needs_relay
def test_fab_stacks_refuses_an_instance_the_host_does_not_have(site):  # noqa: F811
    inventory, _, _ = site
    out = fab("stacks", "storage1", "-i", str(inventory), "--instance", "zz")
    assert out.returncode == 2
    assert out.stderr == (
        "fab: error: storage1 has no carbon-cache instance 'zz' (its carbon_instances: a, b)\n"
    )
    out = fab("stacks", "ghost", "-i", str(inventory))
    assert out.returncode == 2
    assert out.stderr.startswith("fab: error: no host or group 'ghost' in inventory")


@needs_relay
def test_fab_stacks_names_each_host_that_cannot_dump_with_the_reason(site):  # noqa: F811
    """Here the hosts are this machine, where no carbon-cache@a runs (or no
    systemd at all), and one host that does not answer: each is named with its
    one-line reason."""
    inventory, _, names = site
    out = fab("stacks", "storage,spare", "-i", str(inventory), "--unit", "carbon-cache@a")
    assert out.returncode == 1
    lines = sorted(out.stderr.strip().splitlines())
    assert [line.split(":")[0:2] for line in lines] == [
        ["fab", f" {name}"] for name in sorted([*names.values(), "storage9"])
    ]
    for line in lines[:-1]:
        assert "carbon-cache@a.service" in line or "systemctl" in line, line
    assert "cannot reach 127.0.0.1:" in lines[-1]

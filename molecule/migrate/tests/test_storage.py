"""The storage tier on two of the scenario's real nodes: units, limits, ports,
data on disk (the storage tier's own checks, run here so the tier is
converged once for them and for the migration checks)."""

import json
import time

import pytest
import testinfra

testinfra_hosts = ["migrate-node1", "migrate-node2"]

INSTANCES = {
    "a": {"line_port": 2103, "pickle_port": 2104, "query_port": 7102},
    "b": {"line_port": 2203, "pickle_port": 2204, "query_port": 7202},
}
ADDRESS = {"migrate-node1": "172.31.10.31", "migrate-node2": "172.31.10.32"}
WHISPER = "/var/lib/graphite/whisper"
POINTS = 3
INTERVAL = 10


def _name(host):
    return host.backend.get_hostname()


def _other(host):
    return "migrate-node2" if _name(host) == "migrate-node1" else "migrate-node1"


def _peer(request, host):
    """The other node, through the same inventory molecule gave testinfra."""
    inventory = request.config.option.ansible_inventory
    return testinfra.get_host(f"ansible://{_other(host)}", ansible_inventory=inventory)


def _whisper_info(host, path):
    """whisper-info (python3-whisper's CLI): [(secondsPerPoint, points), ...]."""
    out = host.check_output(f"whisper-info {path}")
    archives, current = [], {}
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key in ("secondsPerPoint", "points"):
            current[key] = int(value)
        if len(current) == 2:
            archives.append((current["secondsPerPoint"], current["points"]))
            current = {}
    return archives


def _wait_for(host, paths, timeout=120):
    """Poll until every whisper file exists; returns the ones still missing."""
    deadline = time.monotonic() + timeout
    missing = list(paths)
    while missing and time.monotonic() < deadline:
        missing = [p for p in missing if not host.file(p).exists]
        if missing:
            time.sleep(2)
    return missing


def _fetch(host, path):
    """whisper's own reader: {timestamp: value} of the points present.

    The last 30 minutes: whisper answers from the finest archive covering the
    whole range, so this reads the 10 s archive, not the 1 min aggregates."""
    out = host.check_output(
        "python3 -c 'import json, sys, time, whisper; "
        "(start, end, step), values = whisper.fetch(sys.argv[1], time.time() - 1800); "
        "print(json.dumps({start + i * step: v for i, v in enumerate(values) if v is not None}))' "
        + path
    )
    return {int(k): v for k, v in json.loads(out).items()}


def _open_files_limits(host, pid) -> tuple[int, int]:
    """(soft, hard) "Max open files" of a process."""
    limits = host.file(f"/proc/{pid}/limits").content_string
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_units_verify_clean(host):
    for unit in ["carbon-cache@a.service", "carbon-cache.target"]:
        check = host.run(f"systemd-analyze verify {unit}")
        assert check.rc == 0, check.stderr
        assert check.stderr.strip() == "", check.stderr


def test_package_unit_is_masked(host):
    assert host.run("systemctl is-enabled carbon-cache.service").stdout.strip() == "masked"


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_instance_runs_with_its_ports_and_nofile_limit(host, name):
    unit = host.service(f"carbon-cache@{name}")
    assert unit.is_running
    assert unit.is_enabled
    pid = host.check_output(f"systemctl show -p MainPID --value carbon-cache@{name}")
    assert int(pid) > 0
    # The unit asks for 65536; a container cannot go past the hard limit its
    # engine was given (20000 on the machine this was written on, where
    # dockerd cannot raise it), so the process gets the lower of the two.
    assert host.check_output(f"systemctl show -p LimitNOFILE --value carbon-cache@{name}") == (
        "65536"
    )
    ceiling = _open_files_limits(host, 1)[1]
    assert _open_files_limits(host, pid) == (min(65536, ceiling),) * 2
    assert host.check_output(f"ps -o user= -p {pid}") == "_graphite"
    for kind, port in INSTANCES[name].items():
        assert host.socket(f"tcp://0.0.0.0:{port}").is_listening, f"{name} {kind} {port}"


def test_carbon_reads_lock_writes_on(host):
    # carbon's own settings reader over the rendered file, per instance.
    conf = "/etc/carbon/carbon.conf"
    out = host.check_output(
        'python3 -c "from carbon.conf import Settings; s = Settings(); '
        f"s.readFrom('{conf}', 'cache'); s.readFrom('{conf}', 'cache:b'); "
        "print(s['WHISPER_LOCK_WRITES'], s['LINE_RECEIVER_PORT'], s['LOCAL_DATA_DIR'])\""
    )
    assert out.split() == ["True", "2203", f"{WHISPER}/"]


@pytest.mark.parametrize("name", sorted(INSTANCES))
@pytest.mark.parametrize("fmt", ["line", "pickle"])
def test_points_sent_to_every_instance_port_land_with_the_schema(request, host, name, fmt):
    """Sent from the other node to this one: files, schema and values on disk."""
    sender = _peer(request, host)
    port = INSTANCES[name]["line_port" if fmt == "line" else "pickle_port"]
    prefix = f"molecule.storage.{_name(host).replace('-', '_')}.{name}.{fmt}.run{time.time_ns()}."
    last = int(time.time()) // INTERVAL * INTERVAL
    sender.check_output(
        f"carbonscale gen -c 5 -x {POINTS} -i {INTERVAL} -s {last} -v 42 -p {prefix} "
        f"--format {fmt} --send {ADDRESS[_name(host)]}:{port}"
    )
    base = f"{WHISPER}/{prefix.replace('.', '/')}"
    paths = [f"{base}{i:06d}.wsp" for i in range(5)]
    assert _wait_for(host, paths) == []
    # 10s:1h,1m:1d from the scenario's carbon_storage_schemas.
    assert _whisper_info(host, paths[0]) == [(10, 360), (60, 1440)]
    expected = {last - i * INTERVAL: 42.0 for i in range(POINTS)}
    deadline = time.monotonic() + 60
    while True:
        got = {p: _fetch(host, p) for p in paths}
        if all(points == expected for points in got.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(points == expected for points in got.values()), got


def test_a_restart_writes_the_cache_out_first(host):
    """Points still in carbon's memory at stop are on disk after the restart."""
    prefix = f"molecule.storage.restart.run{time.time_ns()}."
    last = int(time.time()) // INTERVAL * INTERVAL
    port = INSTANCES["a"]["line_port"]
    # Create the files first, then send a second point and restart at once.
    send = f"carbonscale gen -c 50 -x 1 -i {INTERVAL} -p {prefix} --send 127.0.0.1:{port}"
    host.check_output(f"{send} -s {last - INTERVAL} -v 1")
    paths = [f"{WHISPER}/{prefix.replace('.', '/')}{i:06d}.wsp" for i in range(50)]
    assert _wait_for(host, paths) == []
    host.check_output(f"{send} -s {last} -v 2 && systemctl restart carbon-cache@a")
    assert host.service("carbon-cache@a").is_running
    missing = [p for p in paths if _fetch(host, p).get(last) != 2.0]
    assert missing == [], f"{len(missing)} of 50 files lack the point sent just before the restart"


def _main_pid(host, unit):
    return int(host.check_output(f"systemctl show -p MainPID --value {unit}"))


def _functions(thread):
    return {(f["file"].rpartition("/")[2], f["function"]) for f in thread["frames"]}


def test_stacks_show_carbons_writer_thread_and_the_instance_keeps_running(host):
    """`carbonscale ops stacks` signals carbon-cache@a (the launcher's SIGUSR2
    handler) and reads every thread's stack back from its journal."""
    pid = _main_pid(host, "carbon-cache@a")
    start = time.monotonic()
    run = host.run("carbonscale ops stacks --instance a --json")
    took = time.monotonic() - start
    assert run.rc == 0, run.stderr
    [unit] = json.loads(run.stdout)["units"]
    assert (unit["unit"], unit["pid"], unit["complete"]) == ("carbon-cache@a.service", pid, True)
    print(f"{_name(host)}: carbon-cache@a, {len(unit['threads'])} threads in {took:.1f} s")
    writers = [t for t in unit["threads"] if ("writer.py", "writeForever") in _functions(t)]
    assert len(writers) == 1, unit["lines"]
    assert any(f["file"].endswith("/carbon/writer.py") for f in writers[0]["frames"])
    [main] = [t for t in unit["threads"] if t["current"]]  # the reactor ran the handler
    assert ("carbon-cache-drained", "<module>") in _functions(main), unit["lines"]
    assert ("base.py", "mainLoop") in _functions(main), unit["lines"]
    # Alive, the same process, and its writer still writes.
    assert host.service("carbon-cache@a").is_running
    assert _main_pid(host, "carbon-cache@a") == pid
    prefix = f"molecule.storage.stacks.run{time.time_ns()}."
    host.check_output(
        f"carbonscale gen -c 3 -x 1 -i {INTERVAL} -p {prefix} "
        f"--send 127.0.0.1:{INSTANCES['a']['line_port']}"
    )
    paths = [f"{WHISPER}/{prefix.replace('.', '/')}{i:06d}.wsp" for i in range(3)]
    assert _wait_for(host, paths) == []
    # The text form: a header naming unit, pid and threads, then the dump.
    text = host.check_output("carbonscale ops stacks --instance a")
    assert text.splitlines()[0].startswith(f"== carbon-cache@a.service (pid {pid}), ")
    assert "in writeForever" in text


def test_stacks_of_every_daemon_here_and_of_a_stopped_instance(host):
    """Without --instance: every carbon-cache instance and carbonscale daemon
    running (the migration file service is one); a stopped instance or one the
    host does not have is one line and exit 2."""
    host.check_output("systemctl stop carbon-cache@b")
    try:
        run = host.run("carbonscale ops stacks --instance b")
        assert run.rc == 2
        assert run.stderr == (
            "carbonscale: error: carbon-cache@b.service is not running (inactive/dead)\n"
        )
        run = host.run("carbonscale ops stacks --json")
        assert run.rc == 0, run.stderr
        units = {u["unit"]: u for u in json.loads(run.stdout)["units"]}
    finally:
        host.check_output("systemctl start carbon-cache@b")
    assert set(units) == {"carbon-cache@a.service", "carbonscale-migrate-serve.service"}
    serve = units["carbonscale-migrate-serve.service"]
    assert serve["pid"] == _main_pid(host, "carbonscale-migrate-serve")
    assert serve["complete"] and units["carbon-cache@a.service"]["complete"]
    assert any(("migrate.py", "run_serve") in _functions(t) for t in serve["threads"]), serve
    assert host.service("carbonscale-migrate-serve").is_running
    run = host.run("carbonscale ops stacks --instance zz")
    assert run.rc == 2
    assert run.stderr == (
        "carbonscale: error: no carbon-cache instance 'zz' here: /etc/carbon/carbon.conf has a, b\n"
    )

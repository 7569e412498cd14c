"""A storage node that hangs (its container frozen with `docker pause`: the
kernel still accepts the connection, nothing ever answers, the worst case for a
timeout) must not hang the query node: a render answers within FETCH_TIMEOUT
with the other node's data, the failure is logged, and once the node is back
(after REMOTE_RETRY_DELAY) its data is in the answers again.

Runs last (file order): it freezes query-storage2 and thaws it before it ends."""

import json
import re
import subprocess
import time
import urllib.request

testinfra_hosts = ["query-query1"]

QUERY_URL = "http://172.31.7.41:8080"
HUNG_NODE = "query-storage2"
RENDER = "/render?target=lab.query.*&format=json&from=-1h&noCache=1"
# Seconds on top of FETCH_TIMEOUT for everything but waiting: Django, nginx,
# the answering node's own render.
SLACK = 3.0


def _render():
    start = time.monotonic()
    with urllib.request.urlopen(QUERY_URL + RENDER, timeout=60) as response:
        series = json.load(response)
    return time.monotonic() - start, sorted(s["target"] for s in series)


def _setting(host, name):
    settings = host.file("/etc/graphite/local_settings.py").content_string
    return float(re.search(rf"^{name} = ([0-9.]+)$", settings, re.M).group(1))


def _docker(*args):
    done = subprocess.run(["docker", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr.strip()}"


def test_a_hung_storage_node_costs_at_most_fetch_timeout_and_comes_back(host):
    fetch_timeout = _setting(host, "FETCH_TIMEOUT")
    retry_delay = _setting(host, "REMOTE_RETRY_DELAY")
    both = ["lab.query.other", "lab.query.probe"]
    assert _render()[1] == both
    log_lines = int(host.check_output("cat /var/log/graphite/*.log 2>/dev/null | wc -l"))

    _docker("pause", HUNG_NODE)
    try:
        # Each gunicorn worker finds out for itself (then skips the node).
        renders = [_render() for _ in range(4)]
    finally:
        _docker("unpause", HUNG_NODE)
    times = ", ".join(f"{seconds:.2f}" for seconds, _ in renders)
    print(
        f"\n{HUNG_NODE} frozen: renders took {times} s"
        f" (bound: FETCH_TIMEOUT {fetch_timeout} s + {SLACK} s)"
    )
    for seconds, names in renders:
        assert names == ["lab.query.probe"]
        assert seconds <= fetch_timeout + SLACK

    logged = host.check_output(
        f"cat /var/log/graphite/*.log | tail -n +{log_lines + 1} | grep -c 172.31.7.32 || true"
    )
    assert int(logged) > 0, "the failed storage node is not in graphite-web's logs"

    # Back: every gunicorn worker asks it again once REMOTE_RETRY_DELAY has
    # passed since its own last failure; then six renders in a row have both.
    deadline = time.monotonic() + retry_delay + fetch_timeout + 30
    in_a_row = 0
    while in_a_row < 6:
        elapsed, names = _render()
        in_a_row = in_a_row + 1 if names == both else 0
        assert time.monotonic() < deadline, f"{HUNG_NODE} is not used again: {names}"
        assert elapsed < fetch_timeout + SLACK
        if names != both:
            time.sleep(1)
    print(f"{HUNG_NODE} thawed: used again, last render {elapsed:.2f} s")

"""A storage node that hangs (its container frozen with `docker pause`: the
kernel still accepts the connection, nothing ever answers, the worst case for a
timeout) must not hang the query node: a render answers within FETCH_TIMEOUT
with the other node's data, the failure is logged, and once the node is back
(after REMOTE_RETRY_DELAY) its data is in the answers again.

Disruptive (runs after the other checks): it freezes the second storage host
and thaws it before it ends."""

import json
import re
import subprocess
import time
import urllib.request

import pytest

RENDER = "/render?target=lab.query.*&format=json&from=-1h&noCache=1"
# Seconds on top of FETCH_TIMEOUT for everything but waiting: Django, nginx,
# the answering node's own render.
SLACK = 3.0


def _render(query_url):
    start = time.monotonic()
    with urllib.request.urlopen(query_url + RENDER, timeout=60) as response:
        series = json.load(response)
    return time.monotonic() - start, sorted(s["target"] for s in series)


def _setting(host, name):
    settings = host.file("/etc/graphite/local_settings.py").content_string
    return float(re.search(rf"^{name} = ([0-9.]+)$", settings, re.M).group(1))


def _docker(*args):
    done = subprocess.run(["docker", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr.strip()}"


@pytest.mark.disruptive
def test_a_hung_storage_node_costs_at_most_fetch_timeout_and_comes_back(cluster, query_tier):
    host = cluster.host(query_tier.query)
    url = query_tier.query_url
    hung_node = query_tier.storage[1]  # the container is named as the host
    fetch_timeout = _setting(host, "FETCH_TIMEOUT")
    retry_delay = _setting(host, "REMOTE_RETRY_DELAY")
    both = sorted(query_tier.seen[query_tier.query])
    answering = sorted(query_tier.seen[query_tier.storage[0]])
    assert _render(url)[1] == both
    log_lines = int(host.check_output("cat /var/log/graphite/*.log 2>/dev/null | wc -l"))

    _docker("pause", hung_node)
    try:
        # Each gunicorn worker finds out for itself (then skips the node).
        renders = [_render(url) for _ in range(4)]
    finally:
        _docker("unpause", hung_node)
    times = ", ".join(f"{seconds:.2f}" for seconds, _ in renders)
    print(
        f"\n{hung_node} frozen: renders took {times} s"
        f" (bound: FETCH_TIMEOUT {fetch_timeout} s + {SLACK} s)"
    )
    for seconds, names in renders:
        assert names == answering
        assert seconds <= fetch_timeout + SLACK

    logged = host.check_output(
        f"cat /var/log/graphite/*.log | tail -n +{log_lines + 1}"
        f" | grep -c {query_tier.addresses[hung_node]} || true"
    )
    assert int(logged) > 0, "the failed storage node is not in graphite-web's logs"

    # Back: every gunicorn worker asks it again once REMOTE_RETRY_DELAY has
    # passed since its own last failure; then six renders in a row have both.
    deadline = time.monotonic() + retry_delay + fetch_timeout + 30
    in_a_row = 0
    while in_a_row < 6:
        elapsed, names = _render(url)
        in_a_row = in_a_row + 1 if names == both else 0
        assert time.monotonic() < deadline, f"{hung_node} is not used again: {names}"
        assert elapsed < fetch_timeout + SLACK
        if names != both:
            time.sleep(1)
    print(f"{hung_node} thawed: used again, last render {elapsed:.2f} s")

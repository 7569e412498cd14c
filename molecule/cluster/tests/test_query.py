"""graphite-web in both shapes: local reads on the storage hosts, fan-out on
the query host, nginx in front (static files served), memcached on the query
host, and a storage host's answer to a request whose from/until whisper rounds
to one point. The series are written with whisper's own tools (query_data.py)."""

from __future__ import annotations

import json
import re
import statistics
import time

import pytest

RENDER = "/render?target=lab.query.*&format=json&from=-1h"


def _get(host, path):
    out = host.check_output(f"curl -fsS --max-time 20 'http://127.0.0.1:8080{path}'")
    return json.loads(out)


@pytest.fixture(scope="module", params=["query", "storage-first", "storage-second"])
def web(request, cluster, query_tier):
    """(name, host) of each graphite-web: the query host and two storage hosts."""
    name = {
        "query": query_tier.query,
        "storage-first": query_tier.storage[0],
        "storage-second": query_tier.storage[1],
    }[request.param]
    return name, cluster.host(name)


def test_units_are_valid_and_running(web):
    _, host = web
    for unit in ("graphite-web", "nginx"):
        assert host.service(unit).is_running, unit
        assert host.service(unit).is_enabled, unit
    check = host.run("systemd-analyze verify /etc/systemd/system/graphite-web.service")
    assert check.rc == 0, check.stderr
    assert check.stderr.strip() == ""


def test_nginx_has_the_public_port_and_gunicorn_a_local_one(web):
    _, host = web
    assert host.socket("tcp://0.0.0.0:8080").is_listening
    assert host.socket("tcp://127.0.0.1:8081").is_listening
    assert not host.socket("tcp://0.0.0.0:8081").is_listening
    listeners = host.check_output("ss -Htlnp 'sport = :8080'")
    assert "nginx" in listeners and "gunicorn" not in listeners
    assert host.run("nginx -t -q").rc == 0


def test_django_accepts_the_settings(web):
    _, host = web
    assert host.run("graphite-manage check").rc == 0


def test_find_sees_the_metrics(web, query_tier):
    name, host = web
    names = sorted(node["id"] for node in _get(host, "/metrics/find?query=lab.query.*"))
    assert names == sorted(query_tier.seen[name])


def test_render_returns_the_points_whisper_wrote(web, query_tier):
    name, host = web
    series = _get(host, RENDER)
    got = {s["target"]: sorted(v for v, _ in s["datapoints"] if v is not None) for s in series}
    assert got == query_tier.seen[name]


def test_query_host_holds_no_whisper_and_asks_every_storage_host(cluster, query_tier):
    host = cluster.host(query_tier.query)
    assert not host.file("/var/lib/graphite/whisper").exists
    settings = host.file("/etc/graphite/local_settings.py").content_string
    for name in query_tier.storage:
        assert f"'{query_tier.addresses[name]}:8080'" in settings, name


def test_every_static_file_the_ui_pages_load_is_served(cluster, query_tier):
    """The composer, the tree and the dashboard load ExtJS and their own JS/CSS
    from /static/; gunicorn alone answers 404 to every one of them."""
    host = cluster.host(query_tier.query)
    urls = set()
    for page in ("/", "/composer/", "/dashboard/"):
        html = host.check_output(f"curl -fsS --max-time 20 'http://127.0.0.1:8080{page}'")
        urls |= set(re.findall(r"""(?:src|href)=["'](/static/[^"'?]+)""", html))
    assert len(urls) >= 10, urls
    for url in sorted(urls):
        code = host.check_output(
            f"curl -s -o /dev/null -w '%{{http_code}}' 'http://127.0.0.1:8080{url}'"
        )
        assert code == "200", url


def _memcached_hits(host):
    stats = host.check_output(
        'python3 -c \'import socket; s = socket.create_connection(("127.0.0.1", 11211));'
        ' s.sendall(b"stats\\r\\n"); print(s.recv(65536).decode())\''
    )
    return int(re.search(r"STAT get_hits (\d+)", stats).group(1))


def _timed_get(host, path):
    out = host.check_output(
        f"curl -fsS --max-time 20 -o /dev/null -w '%{{time_total}}' 'http://127.0.0.1:8080{path}'"
    )
    return float(out)


def test_a_repeated_render_comes_from_memcached(cluster, query_tier):
    host = cluster.host(query_tier.query)
    assert host.service("memcached").is_running
    settings = host.file("/etc/graphite/local_settings.py").content_string
    assert "MEMCACHE_HOSTS = ['127.0.0.1:11211']" in settings
    # Renders nobody asked for yet (the title makes each cache key new), each
    # asked twice: the second answer is a memcached hit. Medians of five, as
    # one render's time on a shared machine says little.
    run = time.time_ns()
    paths = [
        f"/render?target=lab.query.*&from=-1h&width=400&height=200&title=t{run}x{i}"
        for i in range(5)
    ]
    hits = _memcached_hits(host)
    first = [_timed_get(host, path) for path in paths]
    after_first = _memcached_hits(host)
    second = [_timed_get(host, path) for path in paths]
    after_second = _memcached_hits(host)
    first_ms, second_ms = statistics.median(first) * 1000, statistics.median(second) * 1000
    print(
        f"\nmemcached: get_hits {hits} -> {after_first} (new renders, median {first_ms:.1f} ms)"
        f" -> {after_second} (repeated renders, median {second_ms:.1f} ms)"
    )
    assert after_second - after_first >= len(paths)
    assert second_ms < first_ms


@pytest.mark.parametrize(
    "window",
    [
        pytest.param((1, 5), id="both-inside-one-step"),
        pytest.param((3, 3), id="from-equals-until"),
        pytest.param((10, 10), id="on-a-step-boundary"),
    ],
)
def test_a_window_whisper_rounds_to_one_point_is_answered_small(cluster, query_tier, window):
    """A storage host asked (as the query host asks it: local=1, pickle) for a
    from/until that whisper rounds to the same slot of a 38 MB file must not
    read and send the whole file."""
    host = cluster.host(query_tier.storage[0])
    now = int(time.time())
    base = now - now % 10 - 3600
    params = (
        f"target=lab.big.series&format=pickle&local=1&noCache=1"
        f"&from={base + window[0]}&until={base + window[1]}&now={now}"
    )
    out = host.check_output(
        "curl -sS --max-time 60 -o /tmp/from-until.pickle"
        f" -w '%{{http_code}} %{{size_download}} %{{time_total}}'"
        f" 'http://127.0.0.1:8080/render/?{params}'"
    )
    code, size, seconds = out.split()
    print(f"\nfrom/until {window}: HTTP {code}, {int(size)} bytes in {float(seconds):.3f} s")
    # With from == until graphite-web 1.1.8 answered 400 on the cluster (not
    # the whole file): a refusal is small too, which is what this checks.
    assert code == "200" if window[0] != window[1] else code in ("200", "400")
    assert int(size) < 64 * 1024

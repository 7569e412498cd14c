"""graphite-web in both shapes: local reads on a storage node, fan-out on a query node."""

import json

import pytest

testinfra_hosts = ["query-storage1", "query-query1"]

RENDER = "/render?target=lab.query.probe&format=json&from=-15min"


def _get(host, path):
    out = host.check_output(f"curl -fsS --max-time 20 'http://127.0.0.1:8080{path}'")
    return json.loads(out)


def test_unit_is_valid_and_running(host):
    assert host.service("graphite-web").is_running
    assert host.service("graphite-web").is_enabled
    check = host.run("systemd-analyze verify /etc/systemd/system/graphite-web.service")
    assert check.rc == 0, check.stderr
    assert check.stderr.strip() == ""


def test_django_accepts_the_settings(host):
    assert host.run("graphite-manage check").rc == 0


@pytest.mark.parametrize("path", ["/metrics/find?query=lab.query.*"])
def test_find_sees_the_metric(host, path):
    names = [node["id"] for node in _get(host, path)]
    assert names == ["lab.query.probe"]


def test_render_returns_the_points_whisper_wrote(host):
    series = _get(host, RENDER)
    assert [s["target"] for s in series] == ["lab.query.probe"]
    values = sorted(v for v, _ in series[0]["datapoints"] if v is not None)
    assert values == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]


def test_query_node_holds_no_whisper(host):
    if host.backend.get_hostname() != "query-query1":
        pytest.skip("storage node")
    assert not host.file("/var/lib/graphite/whisper").exists
    settings = host.file("/etc/graphite/local_settings.py").content_string
    assert "'172.31.7.31:8080'" in settings

"""The graph probe's bookkeeping: what a render showed against what had been
sent by then. (Renders from a real graphite-web during real moves: the
cluster scenario's tests/test_lifecycle.py.)"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from carbonscale.migrate.graphprobe import GraphProbe, Render, gaps

STEP = 10


def test_a_slot_is_due_only_grace_seconds_after_it_was_delivered():
    delivered = {100: 105.0, 110: 115.0, 120: 125.0}
    # At 136 s, slots 100 and 110 are due (delivered 105 and 115, grace 20), 120 is not.
    render = Render(136.0, {"a": {100, 110}, "b": {100}})
    report = gaps([render], delivered, ["a", "b"], STEP, grace=20)
    assert report.missing == [(136.0, "b", 110)]
    assert report.longest_gap == 10
    assert report.failed == [] and report.renders == 1 and report.series == 2


def test_the_longest_gap_counts_consecutive_missing_slots_of_one_series():
    delivered = {t: 0.0 for t in range(0, 100, STEP)}
    have = {0, 10, 50, 90}  # 20-40 and 60-80 missing: two runs of three slots
    report = gaps([Render(1000.0, {"a": have})], delivered, ["a"], STEP, grace=0)
    assert [stamp for _, _, stamp in report.missing] == [20, 30, 40, 60, 70, 80]
    assert report.longest_gap == 30


def test_a_series_the_render_lacks_misses_every_due_slot_and_failures_are_kept_apart():
    delivered = {0: 0.0, 10: 0.0}
    renders = [Render(50.0, {"a": {0, 10}}), Render(53.0, None, "HTTPError: 502")]
    report = gaps(renders, delivered, ["a", "gone"], STEP, grace=0)
    assert {(name, stamp) for _, name, stamp in report.missing} == {("gone", 0), ("gone", 10)}
    assert report.failed == [(53.0, "HTTPError: 502")]


@pytest.fixture
def graphite():
    """An HTTP server answering /render as graphite-web's JSON format does, then 500."""
    answers = [
        [
            {"target": "x.a", "tags": {"name": "x.a"}, "datapoints": [[1.0, 100], [None, 110]]},
            {"target": "x.b", "tags": {"name": "x.b"}, "datapoints": [[None, 100], [2.0, 110]]},
        ]
    ]
    asked = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            if answers:
                body = json.dumps(answers.pop(0)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(500)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", asked
    server.shutdown()


def test_render_once_reads_graphite_webs_json_and_keeps_a_failed_render(graphite):
    url, asked = graphite
    probe = GraphProbe(url=url, targets=["x.*"], since=90)
    first = probe.render_once()
    assert first.seen == {"x.a": {100}, "x.b": {110}} and first.error == ""
    assert "target=x.%2A" in asked[0] and "from=90" in asked[0] and "format=json" in asked[0]
    second = probe.render_once()
    assert second.seen is None and "500" in second.error

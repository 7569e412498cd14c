"""The statsd relay refuses what statsd would turn into a number carbon cannot
store (issue 19, item 5): a value that is not finite, a sample rate that is
not a positive finite number (`@0` makes a counter infinite). Counted as
metrics_refused, never forwarded; the C loop and its Python twin agree."""

from __future__ import annotations

import pytest
from test_statsd_relay import Relay, _stats, _wait_for

from carbonscale.relay import statsd

ROUTES = [statsd.route_py] + ([statsd.route] if statsd.route is not statsd.route_py else [])

REFUSED = [
    b"a:inf|c",
    b"a:-Infinity|g",
    b"a:NaN|ms",
    b"a:+nan|h",
    b"a:1e400|g",
    b"a:-1" + b"0" * 400 + b"|g",  # overflows without an exponent
    b"a:1|c|@0",
    b"a:1|c|@0.0",
    b"a:1|c|@-0.5",
    b"a:1|c|@1e-400",  # underflows to 0
    b"a:1|c|@inf",
    b"a:1|ms|@nan|#tag:x",
    b"a:1|c:inf|c",  # a second sample of the same name
    b"a:1|c:2|c|@0",
]
KEPT = [
    b"a:1|c",
    b"a:-2.5|g",
    b"a:+3|g",
    b"a:.5|ms",
    b"a:1e300|g",
    b"a:1|c|@0.1",
    b"a:1|c|@2",
    b"a:inf|s",  # a set member is any text
    b"a:abc|c",  # not a number at all: the daemon's own bad line
    b"a:1|c|@abc",
    b"a:1|c|#tag:inf",  # a tag's value after ':' is no sample
    b"a:0|c",
]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.__name__)
def test_refused_and_kept_lines(route):
    data = b"\n".join(REFUSED + KEPT) + b"\n"
    pending = [[] for _ in range(3)]
    metrics, malformed, refused, misses = route(data, {}, bytes([1]), {}, pending)
    assert (metrics, malformed, refused) == (len(REFUSED) + len(KEPT), 0, len(REFUSED))
    assert [line for _, line in misses] == KEPT


def test_daemon_counts_refused_lines_and_forwards_none(tmp_path):
    relay = Relay(2, "--carbon", "none")
    try:
        datagrams = [b"\n".join(REFUSED[i : i + 3]) for i in range(0, len(REFUSED), 3)]
        datagrams += [b"ok.%d:1|c" % i for i in range(20)]
        relay.send(datagrams, pace=1000)
        _wait_for(lambda: _stats(relay.admin_port)["metrics_received"] == len(REFUSED) + 20)
        relay.sinks.drain(quiet=0.5)
        stats = _stats(relay.admin_port)
        assert stats["metrics_refused"] == len(REFUSED)
        assert stats["metrics_forwarded"] == 20
        received = [line for index in range(2) for line in relay.sinks.lines(index)]
        assert sorted(received) == sorted(b"ok.%d:1|c" % i for i in range(20))
    finally:
        err = relay.stop()
    assert "Traceback" not in err

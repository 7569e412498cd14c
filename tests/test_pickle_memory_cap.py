"""The pickle relay caps the memory of unfinished frames across all clients
(issue 19, item 5): a real `carbonscale relay pickle` process, real sockets
holding frames half-sent, a real line sink."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time

import pytest
from pickle_relay_harness import LineSink, RelayProcess, frame

NOW = 1_700_000_000


def _payload(prefix: str) -> bytes:
    return pickle.dumps([(f"{prefix}.m{i:04d}", (NOW, i)) for i in range(250)], protocol=2)


def _is_open(sock, wait: float = 0.3) -> bool:
    """True while the relay keeps the connection (no close, no reset)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


@pytest.fixture
def sink():
    s = LineSink()
    yield s
    s.close()


def test_unfinished_frames_are_capped_across_connections(sink):
    payloads = {name: frame(_payload(name)) for name in ("a", "b", "c", "d", "e")}
    size = len(payloads["a"])
    assert {len(p) for p in payloads.values()} == {size}
    held = size - 500  # each stalled client sends all but the last 500 bytes
    # Room for three stalled frames, not four.
    limit = 3 * held + 100
    relay = RelayProcess(
        sink.port, "--max-frame", str(size), "--max-buffered", str(limit), "--idle-timeout", "0"
    )
    try:
        stalled = {}
        for name in ("a", "b", "c"):
            stalled[name] = relay.connect()
            stalled[name].sendall(payloads[name][:held])
        time.sleep(0.3)
        assert all(_is_open(sock) for sock in stalled.values())
        # The fourth stalled frame would take the total over the limit: its
        # connection is closed and counted; the others are untouched.
        fourth = relay.connect()
        fourth.sendall(payloads["d"][:held])
        assert not _is_open(fourth, wait=5)
        fourth.close()
        assert all(_is_open(sock) for sock in stalled.values())
        # The stalled ones finish: every point of theirs arrives.
        for name, sock in stalled.items():
            sock.sendall(payloads[name][held:])
            sock.close()
        assert sink.wait_for(lambda s: len(s.lines(exclude=b"carbon.relays.")) == 750)
        # Memory freed: a new client's frame, sent in two parts, is taken.
        late = relay.connect()
        late.sendall(payloads["e"][:held])
        time.sleep(0.2)
        late.sendall(payloads["e"][held:])
        late.close()
        assert sink.wait_for(lambda s: len(s.lines(b"e.")) == 250)
        counters = relay.stop()
    finally:
        relay.kill()
    assert counters["frames_refused_memory"] == 1
    assert counters["frames"] == 4 and counters["points"] == 1000
    assert counters["buffered"] == 0
    assert sink.lines(b"d.") == []
    assert any(
        "unfinished frames of all clients would hold" in line
        and f"over the {limit} byte limit (--max-buffered); connection closed" in line
        for line in relay.log
    ), relay.log


def test_max_buffered_below_max_frame_is_a_one_line_error():
    done = subprocess.run(
        [*[sys.executable, "-m", "carbonscale"], "relay", "pickle", "--max-buffered", "1000"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "carbonscale: error: --max-buffered (1000) must be at least --max-frame (1048576), "
        "or one frame of the largest size could never arrive\n"
    )

"""`carbonscale relay pickle`: decoding that never runs code, and the daemon's behaviour.

The unit part checks carbonscale.relay.lines directly (the restricted
unpickler, both formatters); the rest runs the real daemon as a process
between a real TCP sender and a real TCP line sink.
"""

from __future__ import annotations

import copyreg
import math
import os
import pickle
import random
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pickle_relay_harness import LineSink, RelayProcess, frame, free_port, send_and_wait_close

from carbonscale.relay import lines
from carbonscale.relay.lines import MalformedFrame, decode_frame, format_points_py

NOW = 1_700_000_000
MAX_NAME = lines.DEFAULT_MAX_NAME
MAX_OUTPUT = lines.DEFAULT_MAX_OUTPUT


def decode(payload: bytes) -> tuple[bytes, int, int]:
    return decode_frame(payload, NOW)


# ---------------------------------------------------------------- code never runs


class _Touch:
    """Pickles to `os.system("touch <marker>")`: REDUCE on the global os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_pickles(marker) -> dict[str, bytes]:
    """Every way a pickle can reach a callable: each would create `marker` if unpickled."""
    cmd = f"touch {marker}".encode()
    out = {
        f"reduce os.system protocol {p}": pickle.dumps([_Touch(marker)], protocol=p)
        for p in range(pickle.HIGHEST_PROTOCOL + 1)
    }
    # GLOBAL + REDUCE, hand-written (protocol 0 text opcodes).
    out["GLOBAL posix.system REDUCE"] = b"cposix\nsystem\n(S'" + cmd + b"'\ntR."
    out["GLOBAL builtins.eval REDUCE"] = (
        b'cbuiltins\neval\n(S\'__import__("os").system("' + cmd + b"\")'\ntR."
    )
    # STACK_GLOBAL (protocol 4).
    out["STACK_GLOBAL os.system REDUCE"] = (
        b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(cmd)]) + cmd + b"\x85R."
    )
    # INST: find_class then call, in one opcode.
    out["INST os.system"] = b"(S'" + cmd + b"'\nios\nsystem\n."
    # OBJ: the class comes from GLOBAL.
    out["OBJ with GLOBAL subprocess.Popen"] = (
        b"(csubprocess\nPopen\n(S'touch'\nS'" + str(marker).encode() + b"'\nlo."
    )
    # NEWOBJ / NEWOBJ_EX need a class, i.e. a global.
    out["NEWOBJ builtins.object"] = b"\x80\x02cbuiltins\nobject\n)\x81."
    out["NEWOBJ_EX builtins.object"] = b"\x80\x04cbuiltins\nobject\n)}\x92."
    # BUILD with a global target (setstate on a class).
    out["BUILD on a global"] = b"\x80\x02cos\nsystem\n}b."
    # A harmless global is refused all the same: none is ever needed.
    out["GLOBAL collections.OrderedDict"] = b"\x80\x02ccollections\nOrderedDict\n)R."
    # Persistent ids (PERSID text, BINPERSID binary).
    out["PERSID"] = b"P" + cmd + b"\n."
    out["BINPERSID"] = b"\x80\x02X\x04\x00\x00\x00evil" + b"Q."
    # Protocol 5 out-of-band buffers: no `buffers` are ever given.
    out["NEXT_BUFFER"] = b"\x80\x05\x97."
    out["READONLY_BUFFER"] = b"\x80\x05\x97\x98."
    return out


def test_every_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    for label, payload in _hostile_pickles(marker).items():
        with pytest.raises(MalformedFrame):
            decode(payload)
        assert not marker.exists(), f"{label}: code ran"
    # Sanity of the fixture itself: the unrestricted unpickler does run it.
    pickle.loads(_hostile_pickles(marker)["GLOBAL posix.system REDUCE"])
    assert marker.exists()


def test_extension_registry_codes_go_through_find_class_too(tmp_path):
    # EXT1 names a registered (module, name); the C unpickler resolves it with
    # find_class, so even a registered os.system is refused.
    marker = tmp_path / "marker"
    copyreg.add_extension("os", "system", 0xF0)
    try:
        payload = b"\x80\x02\x82\xf0(S'touch " + str(marker).encode() + b"'\ntR."
        with pytest.raises(MalformedFrame, match=r"os\.system refused"):
            decode(payload)
    finally:
        copyreg.remove_extension("os", "system", 0xF0)
    assert not marker.exists()


def test_reduce_and_build_without_globals_have_nothing_to_call():
    # Without globals the stack only ever holds data: REDUCE on a list, BUILD
    # on a dict fail instead of calling anything.
    with pytest.raises(MalformedFrame, match="not callable"):
        decode(b"\x80\x02]q\x00)R.")
    with pytest.raises(MalformedFrame):
        decode(b"\x80\x02}q\x00}q\x01X\x01\x00\x00\x00aK\x01sb.")


def test_unpickling_stays_in_c_for_honest_frames(monkeypatch):
    calls = []
    monkeypatch.setattr(
        lines.RestrictedUnpickler, "find_class", lambda self, m, n: calls.append((m, n))
    )
    payload = pickle.dumps([("a.b", (1, 2.5))] * 10, protocol=2)
    assert decode(payload)[1] == 10
    assert calls == []


# ---------------------------------------------------------------- what frames may hold


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol(protocol):
    data = [("a.b", (NOW, 1.5)), ("c.d", (NOW + 60, 2))]
    assert decode(pickle.dumps(data, protocol=protocol)) == (
        b"a.b 1.5 1700000000\nc.d 2 1700000060\n",
        2,
        0,
    )


def test_tuples_lists_several_points_string_numbers_and_python2_str():
    data = (
        ["lists", [NOW, 3]],
        ("several", [(NOW, 1), (NOW + 60, 2.25)]),
        ("spread", (NOW, 1), (NOW + 60, 2)),
        ("strings", ("1700000000", "4.5")),
        (b"py2.bytes", (b"1700000000.9", b" 7 ")),
        ("now", (-1, 8)),
    )
    # Protocol 4: Python 3 writes bytes at protocol 2 through the global
    # _codecs.encode, which is refused like every other (Python 2 str is fine).
    out, points, invalid = decode(pickle.dumps(data, protocol=4))
    assert out.decode().splitlines() == [
        "lists 3 1700000000",
        "several 1 1700000000",
        "several 2.25 1700000060",
        "spread 1 1700000000",
        "spread 2 1700000060",
        "strings 4.5 1700000000",
        "py2.bytes 7 1700000000",
        f"now 8 {NOW}",
    ]
    assert (points, invalid) == (8, 0)


def test_python2_protocol2_str_arrives_as_bytes():
    # What a Python 2 carbon sends: SHORT_BINSTRING names, even non-UTF-8 ones.
    payload = b"\x80\x02]q\x00U\x05a.\xff.bq\x01J\x00\xf1SeK\x07\x86\x86a."
    assert decode(payload) == (b"a.\xff.b 7 1700000000\n", 1, 0)


@pytest.mark.parametrize(
    "entry",
    [
        ("has space", (NOW, 1)),
        ("new\nline", (NOW, 1)),
        ("tab\tname", (NOW, 1)),
        ("", (NOW, 1)),
        ("x" * (MAX_NAME + 1), (NOW, 1)),
        ("lone\udc80surrogate", (NOW, 1)),
        (7, (NOW, 1)),
        ("nan", (NOW, float("nan"))),
        ("inf", (NOW, float("inf"))),
        ("notnum", (NOW, "abc")),
        ("nonefield", (None, 1)),
        ("bigts", (10**30, 1)),
        ("hugevalue", (NOW, 10**400)),
        ("threefield", (NOW, 1, 2)),
        ("short", (NOW,)),
        ("empty", ()),
        ("dict", {"a": 1}),
        "just a string",
        ("only",),
    ],
)
def test_a_bad_entry_is_skipped_and_counted(entry):
    good = ("good.metric", (NOW, 1))
    out, points, invalid = decode(pickle.dumps([good, entry, good], protocol=2))
    assert out == b"good.metric 1 1700000000\n" * 2
    assert (points, invalid) == (2, 1)


def test_a_bad_name_skips_every_point_of_its_entry():
    out, points, invalid = decode(pickle.dumps([("a b", [(1, 1), (2, 2), (3, 3)])]))
    assert (out, points, invalid) == (b"", 0, 3)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        pickle.dumps({"a": (1, 2)}),
        pickle.dumps("a.b 1 2"),
        pickle.dumps(None),
        pickle.dumps([("a", (1, 2))]) + b"trailing",
        pickle.dumps([("a", (1, 2))])[:-3],
    ],
)
def test_a_malformed_frame_is_refused_whole(payload):
    with pytest.raises(MalformedFrame):
        decode(payload)


def test_memo_references_cannot_amplify_a_frame_without_bound():
    # A small frame naming one long path a million times through the memo.
    name = "n" * 4000
    entry = (name, (1, 1))
    payload = pickle.dumps([entry] * 100_000, protocol=2)
    assert len(payload) < 300_000
    with pytest.raises(MalformedFrame, match="more than"):
        decode_frame(payload, NOW, max_output=64 * 1024 * 1024)


# A mutated frame the fuzz run found: LONG_BINPUT 1078405844 in 200 bytes made
# CPython's unpickler allocate and zero a 16 GiB memo (43 s, 16 GiB RSS).
MEMO_BOMBS = [
    b"\x80\x02]r\xd4*G@.",  # LONG_BINPUT 1078405844
    b"\x80\x02]r\xff\xff\xff\xff.",  # LONG_BINPUT 2**32 - 1
    b"(lp999999999\n.",  # PUT, protocol 0
    b"(lp99999999999999999999999\n.",  # PUT past 64 bits
]


@pytest.mark.parametrize("payload", MEMO_BOMBS)
def test_a_memo_index_past_the_frame_is_refused_before_any_allocation(payload):
    started = time.monotonic()
    with pytest.raises(MalformedFrame, match="memo index past the frame"):
        decode(payload)
    assert time.monotonic() - started < 1


def test_honest_memo_indices_pass_the_check():
    # LONG_BINPUT (indices >= 256) and protocol 0 PUT, as carbon clients send them.
    entries = [(f"a.b{i}", (NOW, float(i))) for i in range(2000)]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        _data, points, invalid = decode(pickle.dumps(entries, protocol=protocol))
        assert (points, invalid) == (2000, 0)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 5))
def test_c_and_python_memo_checks_agree(tail, protocol):
    """The twins take the same decision on mutated pickles."""
    if lines.IMPLEMENTATION != "C":
        pytest.fail("the C extension was not built")
    for payload in (tail, pickle.dumps([("a", (1, 2))] * 3, protocol=protocol)[:-1] + tail):
        outcomes = []
        for check in (lines.check_memo, lines.check_memo_py):
            try:
                check(payload)
                outcomes.append(None)
            except ValueError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1], payload


def test_c_and_python_formatters_agree_on_values():
    if lines.IMPLEMENTATION != "C":
        pytest.fail("the C formatter was not built: pip install -e . needs gcc and Python headers")
    rng = random.Random(6)
    values = []
    for _ in range(200_000):
        r = rng.random()
        if r < 0.3:
            values.append(rng.random() * 10 ** rng.randrange(-6, 18))
        elif r < 0.5:
            values.append(struct.unpack("d", rng.randbytes(8))[0])
        elif r < 0.7:
            values.append(round(rng.uniform(-1e6, 1e6), rng.randrange(0, 17)))
        elif r < 0.85:
            base = 10.0 ** rng.randrange(-5, 17) * rng.choice([1, 2.0 ** rng.randrange(-3, 4)])
            values.append(math.nextafter(base, rng.choice([0, math.inf])))
        else:
            values.append(rng.randrange(-(2**63), 2**63))
    data = [("m", (NOW, v)) for v in values]
    c = lines.format_points(data, NOW, MAX_NAME, 1 << 30)
    assert c == format_points_py(data, NOW, MAX_NAME, 1 << 30)
    # And every written value reads back as exactly the double it was.
    for line, v in zip(c[0].splitlines(), (v for v in values if _finite(v)), strict=True):
        assert float(line.split()[1]) == float(v)


def _finite(v) -> bool:
    return isinstance(v, int) or math.isfinite(v)


_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.sampled_from(["1700000000", "-1", " 2.5 ", "nan", "1e400", "x", "a.b", "a b"]),
    st.none(),
    st.booleans(),
)
_trees = st.recursive(
    _scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.lists(kids, max_size=4).map(tuple)),
    max_leaves=12,
)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(st.lists(_trees, max_size=8))
def test_c_and_python_formatters_agree_on_any_structure(frame_obj):
    c = py = None
    try:
        c = lines.format_points(frame_obj, NOW, 16, 1 << 20)
    except ValueError as exc:
        c = ("ValueError", str(exc))
    try:
        py = format_points_py(frame_obj, NOW, 16, 1 << 20)
    except ValueError as exc:
        py = ("ValueError", str(exc))
    assert c == py


# ---------------------------------------------------------------- the daemon


@pytest.fixture
def sink():
    s = LineSink()
    yield s
    s.close()


@pytest.fixture
def relay(sink, request):
    extra = getattr(request, "param", ())
    r = RelayProcess(sink.port, *extra)
    yield r
    r.kill()


def _points(n, prefix="t"):
    return [(f"{prefix}.m{i:06d}", (NOW, i)) for i in range(n)]


def test_frames_from_several_clients_arrive_as_lines(relay, sink):
    socks = [relay.connect() for _ in range(3)]
    for k, sock in enumerate(socks):
        for p in range(6):
            sock.sendall(frame(pickle.dumps(_points(500, f"c{k}p{p}"), protocol=p)))
    for sock in socks:
        sock.close()
    assert sink.wait_for(lambda s: len(s.lines()) >= 9000)
    counters = relay.stop()
    received = sink.lines(exclude=b"carbon.relays.")
    assert len(received) == len(set(received)) == 9000
    assert b"c2p5.m000499 499 1700000000" in received
    assert counters["frames"] == 18
    assert counters["points"] == counters["sent"] - counters["self_points"] == 9000


def test_hostile_pickles_close_their_connection_and_nothing_runs(relay, sink, tmp_path):
    marker = tmp_path / "marker"
    hostile = _hostile_pickles(marker)
    for payload in hostile.values():
        # An honest frame first: the connection carries on until the hostile one.
        data = frame(pickle.dumps(_points(2), protocol=2)) + frame(payload)
        data += frame(pickle.dumps(_points(5, "after"), protocol=2))
        assert send_and_wait_close(relay, data)
    assert relay.alive()
    # The relay still serves, and nothing after a hostile frame was taken.
    assert send_and_wait_close(relay, frame(pickle.dumps(_points(3, "last"))))
    assert sink.wait_for(lambda s: len(s.lines(b"last.")) == 3)
    counters = relay.stop()
    assert not marker.exists()
    assert counters["frames_malformed"] == len(hostile)
    assert counters["points"] == 2 * len(hostile) + 3
    assert sink.lines(b"after.") == []


def test_oversized_frame_closes_the_connection(sink):
    relay = RelayProcess(sink.port, "--max-frame", "1000")
    try:
        small = frame(pickle.dumps(_points(3)))
        big = pickle.dumps(_points(200))
        assert len(big) > 1000
        assert send_and_wait_close(relay, small + frame(big) + small)
        # A length header alone is enough to refuse: no need to wait for 4 GiB.
        assert send_and_wait_close(relay, b"\xff\xff\xff\xff")
        counters = relay.stop()
    finally:
        relay.kill()
    assert counters["frames_oversized"] == 2
    assert counters["frames"] == 1
    assert len(sink.lines(b"t.")) == 3


def test_partial_frames_across_reads_are_reassembled(relay, sink):
    data = b"".join(frame(pickle.dumps(_points(50, f"p{i}"), protocol=4)) for i in range(20))
    sock = relay.connect()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(0, len(data), 7):
        sock.sendall(data[i : i + 7])
        if i % 700 == 0:
            time.sleep(0.001)
    sock.close()
    assert sink.wait_for(lambda s: len(s.lines()) >= 1000)
    assert relay.stop()["points"] == 1000


def test_a_full_queue_makes_senders_wait_and_loses_nothing():
    port = free_port()
    relay = RelayProcess(port, "--queue-size", "1000", "--reconnect-interval", "0.1")
    try:
        # Nothing listens upstream: the first frame fills the queue half, and
        # from then on the relay reads nothing more; the rest waits in TCP.
        sock = relay.connect()
        for i in range(5):
            sock.sendall(frame(pickle.dumps(_points(500, f"f{i}"))))
        time.sleep(1)
        sink = LineSink(port)
        try:
            assert sink.wait_for(lambda s: len(s.lines(exclude=b"carbon.relays.")) >= 2500)
            sock.close()
            counters = relay.stop()
        finally:
            sink.close()
    finally:
        relay.kill()
    assert counters["points"] == 2500
    assert counters["dropped_overflow"] == 0
    assert counters["backpressure"] >= 1
    expected = [f"{n} {v} {t}".encode() for i in range(5) for n, (t, v) in _points(500, f"f{i}")]
    assert sorted(sink.lines(exclude=b"carbon.relays.")) == sorted(expected)
    assert counters["upstream_errors"] >= 1


def test_what_cannot_fit_the_queue_is_dropped_and_counted_the_rest_delivered():
    port = free_port()
    relay = RelayProcess(port, "--queue-size", "1000", "--reconnect-interval", "0.1")
    try:
        # One frame larger than the whole queue: already read, it cannot wait.
        assert send_and_wait_close(relay, frame(pickle.dumps(_points(1500, "big"))))
        assert send_and_wait_close(relay, frame(pickle.dumps(_points(400, "small"))))
        sink = LineSink(port)
        try:
            assert sink.wait_for(lambda s: len(s.lines(b"small.")) >= 400)
            counters = relay.stop()
        finally:
            sink.close()
    finally:
        relay.kill()
    assert counters["points"] == 1900
    assert counters["dropped_overflow"] == 1500
    assert not sink.lines(b"big.")
    assert counters["points"] + counters["self_points"] == (
        counters["sent"]
        + counters["dropped_overflow"]
        + counters["dropped_shutdown"]
        + counters["queued"]
    )


def test_upstream_restart_loses_no_queued_point(relay, sink):
    first = frame(pickle.dumps(_points(300, "before")))
    assert send_and_wait_close(relay, first)
    assert sink.wait_for(lambda s: len(s.lines(b"before.")) == 300)
    port = sink.port
    sink.close()
    time.sleep(0.3)
    # carbon-c-relay is away: these wait in the queue.
    assert send_and_wait_close(relay, frame(pickle.dumps(_points(400, "during"))))
    again = LineSink(port)
    try:
        assert again.wait_for(lambda s: len(s.lines(b"during.")) == 400)
        counters = relay.stop()
        assert counters["dropped_overflow"] == 0
        assert counters["upstream_connects"] >= 2
        assert len(set(again.lines(b"during."))) == 400
    finally:
        again.close()


def test_sigterm_drains_the_queue_then_counts_what_could_not_go():
    port = free_port()
    relay = RelayProcess(port, "--drain-timeout", "1", "--reconnect-interval", "0.1")
    try:
        assert send_and_wait_close(relay, frame(pickle.dumps(_points(700))))
        started = time.monotonic()
        counters = relay.stop()
    finally:
        relay.kill()
    assert time.monotonic() - started < 10
    # 700 points plus the final counters had nowhere to go.
    assert counters["dropped_shutdown"] == 700 + counters["self_points"]
    assert counters["queued"] == 0 and counters["sent"] == 0


def test_sigterm_delivers_everything_queued_when_upstream_is_up(relay, sink):
    sock = relay.connect()
    for i in range(40):
        sock.sendall(frame(pickle.dumps(_points(500, f"d{i:02d}"))))
    sock.close()
    time.sleep(0.2)
    counters = relay.stop()
    assert counters["dropped_shutdown"] == 0
    assert len(sink.lines(exclude=b"carbon.relays.")) == counters["points"] == 20_000
    # The final counters went out too, as carbon.relays.<host>.pickle.*.
    assert sink.lines(b"carbon.relays.test.pickle.points 20000 ")


def test_own_counters_are_sent_every_interval(sink):
    relay = RelayProcess(sink.port, stats_interval=0.3)
    try:
        assert send_and_wait_close(relay, frame(pickle.dumps(_points(10))))
        assert sink.wait_for(
            lambda s: len(s.lines(b"carbon.relays.test.pickle.frames ")) >= 2, timeout=10
        )
    finally:
        relay.kill()
    names = {line.split()[0].decode() for line in sink.lines(b"carbon.relays.test.pickle.")}
    assert {
        f"carbon.relays.test.pickle.{n}" for n in ("points", "invalid", "dropped_overflow", "sent")
    } <= names
    latest = sink.lines(b"carbon.relays.test.pickle.points ")[-1].split()
    assert latest[1] == b"10" and abs(int(latest[2]) - time.time()) < 60


def test_idle_clients_are_disconnected(sink):
    relay = RelayProcess(sink.port, "--idle-timeout", "1")
    try:
        sock = relay.connect()
        sock.settimeout(15)
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert 0.9 < time.monotonic() - started < 10
    finally:
        relay.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "2004"], "--listen wants [HOST]:PORT"),
        (["--upstream", ":2003"], "--upstream wants HOST:PORT"),
        (["--queue-size", "0"], "--queue-size must be >= 1"),
        (["--stats-interval", "0"], "--stats-interval must be > 0"),
        (["--stats-prefix", "a b"], "--stats-prefix must be"),
    ],
)
def test_bad_options_are_one_line_errors(args, message):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "carbonscale", "relay", "pickle", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"carbonscale: error: {message}"] or (
        message in done.stderr and "Traceback" not in done.stderr
    )


def test_port_in_use_is_a_one_line_error(sink):
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "carbonscale",
            "relay",
            "pickle",
            "--listen",
            f"127.0.0.1:{sink.port}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "carbonscale: error: cannot listen on 127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr

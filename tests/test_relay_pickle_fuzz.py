"""Fuzz the running pickle relay: 100,000+ random and mutated frames.

Every frame's fate is predicted first by an oracle (the same restricted
unpickler, then the pure Python formatter rather than the C one the daemon
uses): oversized, malformed (both close the connection), or so many points
written and so many skipped. The relay must survive all of it, its counters
must equal the oracle's sums exactly, and the sink must hold exactly the
predicted lines, in order. Nothing may run: hostile pickles aim at a marker.
"""

from __future__ import annotations

import pickle
import random
import re
import struct
import time

import pytest
from pickle_relay_harness import LineSink, RelayProcess, send_and_wait_close

from carbonscale.relay import lines

FRAMES = 100_000
MAX_FRAME = 64 * 1024
SENTINEL_NOW = 4_000_000_000  # the oracle's "now"; the relay's differs
STATS = b"carbon.relays.test.pickle."

NAMES = [
    "a.b",
    "servers.web01.cpu.user",
    "x" * 300,
    "ünïcode.name",
    "with space",
    "new\nline",
    "",
    "tab\t",
    "del\x7f",
    "a" * 5000,
    b"bytes.name",
    b"bad\xffutf8",
    7,
    None,
    1.5,
]
NUMBERS = [
    0,
    -1,
    1,
    1_700_000_000,
    1_699_999_999.75,
    2**63,
    -(2**63),
    10**30,
    3.14159,
    0.1 + 0.2,
    1e-7,
    1e300,
    float("nan"),
    float("inf"),
    "1700000000",
    " 42 ",
    "1e3",
    "abc",
    "",
    b"12.5",
    b"x",
    True,
    None,
    [],
    (1,),
]


def random_point(rng):
    point = [rng.choice(NUMBERS), rng.choice(NUMBERS)]
    if rng.random() < 0.8:  # mostly good ones
        point = [rng.choice([1_700_000_000, 1_700_000_060, "1700000120", -1]), rng.random() * 100]
    if rng.random() < 0.05:
        point.append(1)
    return tuple(point) if rng.random() < 0.7 else point


def random_entry(rng):
    name = rng.choice(NAMES) if rng.random() < 0.3 else f"fuzz.m{rng.randrange(10**6)}"
    shape = rng.random()
    if shape < 0.6:
        entry = [name, random_point(rng)]
    elif shape < 0.75:
        entry = [name, [random_point(rng) for _ in range(rng.randrange(0, 5))]]
    elif shape < 0.9:
        entry = [name, *(random_point(rng) for _ in range(rng.randrange(2, 5)))]
    else:
        entry = rng.choice([[name], [], name, 5, {"a": 1}, [name, 1]])
        return entry
    return tuple(entry) if rng.random() < 0.7 else entry


def random_payload(rng, hostile):
    kind = rng.random()
    if kind < 0.01:
        return rng.choice(hostile)
    if kind < 0.04:
        return rng.randbytes(rng.randrange(0, 200))
    if kind < 0.05:
        return b""
    size = 500 if rng.random() < 0.01 else rng.randrange(0, 12)
    obj = [random_entry(rng) for _ in range(size)]
    if rng.random() < 0.3:
        obj = tuple(obj)
    if rng.random() < 0.02:
        obj = rng.choice([{"a": obj}, "text", 42, None])
    payload = pickle.dumps(obj, protocol=rng.randrange(pickle.HIGHEST_PROTOCOL + 1))
    if rng.random() < 0.5:
        payload = mutate(rng, payload)
    return payload


def mutate(rng, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a byte
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:  # insert bytes
            data[pos:pos] = rng.randbytes(rng.randrange(1, 5))
        elif op == 2:  # delete a range
            del data[pos : pos + rng.randrange(1, 8)]
        elif op == 3:  # truncate
            del data[pos:]
        elif op == 4:  # duplicate a slice
            data[pos:pos] = data[pos : pos + rng.randrange(1, 30)]
        else:  # trailing garbage
            data += rng.randbytes(rng.randrange(1, 6))
    return bytes(data)


def oracle(payload: bytes):
    """('oversized'|'malformed', None) or ('ok', (line bytes, points, invalid))."""
    if len(payload) > MAX_FRAME:
        return "oversized", None
    try:
        obj = lines.unpickle(payload)
        return "ok", lines.format_points_py(
            obj, SENTINEL_NOW, lines.DEFAULT_MAX_NAME, lines.DEFAULT_MAX_OUTPUT
        )
    except (lines.MalformedFrame, ValueError):
        return "malformed", None


def normalise(data: bytes, start: float, end: float) -> list[bytes]:
    """Lines with a timestamp the relay made up for -1 (now) made comparable."""
    out = []
    low, high = int(start) - 2, int(end) + 2
    for line in data.split(b"\n")[:-1]:
        name, value, ts = line.rsplit(b" ", 2)
        if int(ts) == SENTINEL_NOW or low <= int(ts) <= high:
            ts = b"NOW"
        out.append(b"%s %s %s" % (name, value, ts))
    return out


@pytest.mark.slow
def test_fuzzed_frames_leave_the_relay_alive_and_every_point_counted(tmp_path):
    rng = random.Random(20261123)
    marker = tmp_path / "marker"
    cmd = f"touch {marker}".encode()
    hostile = [
        b"cposix\nsystem\n(S'" + cmd + b"'\ntR.",
        b"(S'" + cmd + b"'\nios\nsystem\n.",
        b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.",
    ]
    sink = LineSink()
    relay = RelayProcess(sink.port, "--max-frame", str(MAX_FRAME), "--idle-timeout", "0")
    expected = {"frames": 0, "frames_malformed": 0, "frames_oversized": 0}
    points = invalid = 0
    expected_lines = bytearray()
    started = time.time()
    try:
        batch = bytearray()
        sent_frames = 0
        connections = 0

        def flush():
            nonlocal connections
            if batch:
                send_and_wait_close(relay, bytes(batch))
                batch.clear()
                connections += 1

        while sent_frames < FRAMES:
            if rng.random() < 0.005:  # a length over the limit, with or without a body
                length = rng.choice([MAX_FRAME + 1, 2 * MAX_FRAME, 0xFFFFFFFF])
                body = rng.randbytes(64) if length > 2 * MAX_FRAME else rng.randbytes(length)
                batch += struct.pack("!L", length) + body
                expected["frames_oversized"] += 1
                sent_frames += 1
                flush()
                continue
            payload = random_payload(rng, hostile)
            fate, result = oracle(payload)
            batch += struct.pack("!L", len(payload)) + payload
            sent_frames += 1
            if fate == "ok":
                expected["frames"] += 1
                expected_lines += result[0]
                points += result[1]
                invalid += result[2]
                if len(batch) > 256 * 1024 or rng.random() < 0.01:
                    flush()
            else:
                expected[f"frames_{fate}"] += 1
                flush()  # the relay closes the connection after this one
            if sent_frames % 20_000 == 0:
                assert relay.alive(), f"relay died after {sent_frames} frames: {relay.log[-5:]}"
        flush()
        assert relay.alive()
        assert sink.wait_for(lambda s: len(s.lines(exclude=STATS)) >= points, timeout=60)
        counters = relay.stop()
    finally:
        relay.kill()
        sink.close()
    ended = time.time()

    assert not marker.exists()
    assert counters["frames"] == expected["frames"]
    assert counters["frames_malformed"] == expected["frames_malformed"]
    assert counters["frames_oversized"] == expected["frames_oversized"]
    assert counters["points"] == points
    assert counters["invalid"] == invalid
    assert counters["dropped_overflow"] == counters["dropped_shutdown"] == 0
    assert counters["points"] + counters["self_points"] == counters["sent"] + counters["queued"]
    assert counters["queued"] == 0
    received = bytes(sink.data)
    assert received.count(b"\n") == counters["sent"]
    ours = b"".join(
        line + b"\n" for line in received.split(b"\n")[:-1] if not line.startswith(STATS)
    )
    assert normalise(ours, started, ended) == normalise(bytes(expected_lines), started, ended)
    # Enough of each kind happened for this to mean something.
    assert sent_frames >= FRAMES
    assert expected["frames_malformed"] > 10_000 and expected["frames_oversized"] > 100
    assert points > 100_000 and invalid > 10_000
    assert connections > 10_000
    print(
        f"fuzz: {sent_frames} frames over {connections} connections in {ended - started:.0f}s: "
        f"{counters['frames']} decoded, {counters['frames_malformed']} malformed, "
        f"{counters['frames_oversized']} oversized; {points} points written, {invalid} skipped"
    )
    assert re.search(r"stopped: ", "\n".join(relay.log))

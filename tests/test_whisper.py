"""carbonscale.whisper fill and verify against whisper's own reads and writes.

The oracle reads every archive with whisper.fetch and applies the fill rules
of carbonscale/whisper.py's docstring point by point with whisper.aggregate;
files are built with whisper.create and whisper.update_many. The C merge and
its numpy twin must return the same writes, byte for byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import whisper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbonscale import CarbonscaleError
from carbonscale import whisper as W

NOW = 1_700_000_000
CLI = [sys.executable, "-m", "carbonscale", "whisper"]
METHODS = list(whisper.aggregationMethods)


# ----- the oracle -------------------------------------------------------------


def fetch_archives(path: str, now: int) -> list[dict[int, float]]:
    """{interval: value} of every archive's window, read by whisper.fetch."""
    info = whisper.info(path)
    series = []
    for archive in info["archives"]:
        (start, end, step), values = whisper.fetch(path, now - archive["retention"], now, now=now)
        assert step == archive["secondsPerPoint"]
        series.append(
            {t: v for t, v in zip(range(start, end, step), values, strict=True) if v is not None}
        )
    return series


def propagated(method: str, xff: float, cells: list[float | None]) -> float | None:
    """whisper's __propagate rule for one coarse interval."""
    known = [v for v in cells if v is not None]
    if not known or len(known) / len(cells) < xff:
        return None
    return whisper.aggregate(method, known, cells)


def oracle_fill(src: str, dst: str, now: int) -> list[dict[int, float]]:
    """What every DST archive's window holds after a fill, by the documented rules."""
    src_info, dst_info = whisper.info(src), whisper.info(dst)
    src_series, dst_series = fetch_archives(src, now), fetch_archives(dst, now)
    method, xff = dst_info["aggregationMethod"], dst_info["xFilesFactor"]
    finest = dst_info["archives"][0]
    finest_start = now - now % finest["secondsPerPoint"] - finest["retention"]
    finest_start += finest["secondsPerPoint"]
    merged_archives = []
    for index, archive in enumerate(dst_info["archives"]):
        step, points = archive["secondsPerPoint"], archive["points"]
        end = now - now % step
        merged = dict(dst_series[index])
        previous = dst_info["archives"][index - 1] if index else None
        for t in range(end - (points - 1) * step, end + step, step):
            if t in merged:
                continue
            value = None
            if previous and t >= finest_start and step % previous["secondsPerPoint"] == 0:
                fine = previous["secondsPerPoint"]
                cells = [merged_archives[-1].get(t + c * fine) for c in range(step // fine)]
                value = propagated(method, xff, cells)
            if value is None:
                for s_index, s_archive in enumerate(src_info["archives"]):
                    s_step = s_archive["secondsPerPoint"]
                    if s_step == step and t in src_series[s_index]:
                        value = src_series[s_index][t]
                        break
                if value is None:
                    for s_index, s_archive in enumerate(src_info["archives"]):
                        s_step = s_archive["secondsPerPoint"]
                        if s_step >= step or step % s_step:
                            continue
                        cells = [
                            src_series[s_index].get(t + c * s_step) for c in range(step // s_step)
                        ]
                        value = propagated(method, xff, cells)
                        if value is not None:
                            break
            if value is not None:
                merged[t] = value
        merged_archives.append(merged)
    return merged_archives


def same_series(got: dict[int, float], want: dict[int, float]) -> bool:
    if got.keys() != want.keys():
        return False
    return all(
        (math.isnan(got[t]) and math.isnan(want[t]))
        or math.isclose(got[t], want[t], rel_tol=1e-12, abs_tol=1e-300)
        for t in got
    )


def make(path: Path, archives, points, xff=0.5, method="average", now=NOW) -> str:
    whisper.create(str(path), archives, xFilesFactor=xff, aggregationMethod=method)
    if points:
        whisper.update_many(str(path), points, now=now)
    return str(path)


# ----- property test ------------------------------------------------------------

STEPS = [1, 2, 5, 10, 60]


@st.composite
def schemas(draw):
    """Valid whisper archive lists: each step a multiple of the previous, more retention."""
    count = draw(st.integers(1, 3))
    archives = []
    step = draw(st.sampled_from(STEPS))
    points = draw(st.integers(5, 40))
    archives.append((step, points))
    for _ in range(count - 1):
        step *= draw(st.sampled_from([2, 3, 5]))
        # strictly more retention than the finer archive; whisper wants the finer
        # archive to hold at least one coarse interval (points >= 5 >= factor)
        minimum = max(5, archives[-1][0] * archives[-1][1] // step + 1)
        points = draw(st.integers(minimum, minimum + 30))
        archives.append((step, points))
    return archives


values = st.one_of(
    st.just(0.0),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.integers(-5, 5).map(float),
)


@st.composite
def whisper_files(draw):
    archives = draw(schemas())
    retention = max(s * p for s, p in archives)
    ages = draw(st.lists(st.integers(0, retention + 20), max_size=60))
    # and a dense recent run, so that finer archives have whole intervals to aggregate
    step = archives[0][0]
    ages += [draw(st.integers(0, 30)) + i * step for i in range(draw(st.integers(0, 80)))]
    points = [(NOW - age, draw(values)) for age in ages]
    return archives, draw(st.floats(0, 1)), draw(st.sampled_from(METHODS)), points


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(src=whisper_files(), dst=whisper_files(), now_shift=st.integers(0, 200))
def test_fill_matches_the_oracle_and_the_twins_agree(tmp_path, src, dst, now_shift):
    now = NOW + now_shift
    for name in ("s.wsp", "d.wsp"):
        (tmp_path / name).unlink(missing_ok=True)
    src_path = make(tmp_path / "s.wsp", src[0], src[3], src[1], src[2])
    dst_path = make(tmp_path / "d.wsp", dst[0], dst[3], dst[1], dst[2])
    before = fetch_archives(dst_path, now)
    expected = oracle_fill(src_path, dst_path, now)
    header_before = Path(dst_path).read_bytes()[: 16 + 12 * len(dst[0])]

    src_bytes, dst_bytes = Path(src_path).read_bytes(), Path(dst_path).read_bytes()
    numpy_plan = W.plan_fill_numpy(
        src_bytes, W.parse_header(src_bytes), dst_bytes, W.parse_header(dst_bytes), now
    )
    if W._whisper is not None:
        assert W._whisper.plan(src_bytes, dst_bytes, now) == numpy_plan

    result = W.fill_file(src_path, dst_path, now)
    assert result.status in (W.FILLED, W.UNCHANGED)
    assert result.points == numpy_plan[0]
    # the fill wrote exactly the twin's writes, and nothing else
    planned = bytearray(dst_bytes)
    for offset, data in numpy_plan[1]:
        planned[offset : offset + len(data)] = data
    assert Path(dst_path).read_bytes() == planned
    after = fetch_archives(dst_path, now)
    for index, (got, want) in enumerate(zip(after, expected, strict=True)):
        assert same_series(got, want), f"archive {index}"
        # every point DST had is untouched (0.0 included)
        for t, v in before[index].items():
            assert got[t] == v or (math.isnan(v) and math.isnan(got[t]))
    assert Path(dst_path).read_bytes()[: len(header_before)] == header_before
    assert W.verify_file(src_path, dst_path, now).missing == 0
    # a second fill has nothing left to do
    assert W.fill_file(src_path, dst_path, now).status == W.UNCHANGED


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(src=whisper_files(), dst=whisper_files(), now_shift=st.integers(-100, 200))
def test_verify_twins_agree(tmp_path, src, dst, now_shift):
    """The C count and verify_data_numpy: the same checked, missing, unchecked and
    examples, before a fill (points missing) and after it (none)."""
    if W._whisper is None:
        pytest.skip("the C merge is not built")
    now = NOW + now_shift
    for name in ("s.wsp", "d.wsp"):
        (tmp_path / name).unlink(missing_ok=True)
    src_path = make(tmp_path / "s.wsp", src[0], src[3], src[1], src[2])
    dst_path = make(tmp_path / "d.wsp", dst[0], dst[3], dst[1], dst[2])
    for _ in ("before", "after"):
        src_bytes, dst_bytes = Path(src_path).read_bytes(), Path(dst_path).read_bytes()
        args = (src_bytes, W.parse_header(src_bytes), dst_bytes, W.parse_header(dst_bytes), now)
        got, want = W.verify_data(*args, "m"), W.verify_data_numpy(*args, "m")
        fields = ("checked", "missing", "unchecked", "examples", "error")
        assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
        W.fill_file(src_path, dst_path, now)
    assert got.missing == 0


# ----- explicit cases -------------------------------------------------------------

SCHEMA = [(60, 60), (300, 48), (3600, 24)]


def test_zero_in_dst_is_a_value_and_is_kept(tmp_path):
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, 7.0) for i in range(50)])
    dst = make(tmp_path / "d.wsp", SCHEMA, [(NOW - i * 60, 0.0) for i in range(0, 50, 2)])
    W.fill_file(src, dst, NOW)
    finest = fetch_archives(dst, NOW)[0]
    for i in range(50):
        t = (NOW - i * 60) // 60 * 60
        assert finest[t] == (0.0 if i % 2 == 0 else 7.0)


def test_zero_in_src_fills_a_gap(tmp_path):
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, 0.0) for i in range(10)])
    dst = make(tmp_path / "d.wsp", SCHEMA, [(NOW, 1.0)])
    assert W.fill_file(src, dst, NOW).points > 0
    finest = fetch_archives(dst, NOW)[0]
    assert [finest[(NOW - i * 60) // 60 * 60] for i in range(1, 10)] == [0.0] * 9


def test_wrapped_archives(tmp_path):
    """Files written for longer than their retention: the base slot is mid-window."""
    old = NOW - 10_000
    src = make(tmp_path / "s.wsp", SCHEMA, [(old + i * 60, float(i)) for i in range(160)], now=NOW)
    whisper.update_many(src, [(NOW - i * 60, float(-i)) for i in range(40)], now=NOW)
    dst = make(tmp_path / "d.wsp", SCHEMA, [(old + i * 60, 5.0) for i in range(100, 167)], now=NOW)
    whisper.update_many(dst, [(NOW - i * 60, 1.5) for i in range(0, 40, 3)], now=NOW)
    expected = oracle_fill(src, dst, NOW)
    W.fill_file(src, dst, NOW)
    assert all(same_series(g, w) for g, w in zip(fetch_archives(dst, NOW), expected, strict=True))
    assert W.verify_file(src, dst, NOW).missing == 0


def test_empty_archives(tmp_path):
    src = make(tmp_path / "s.wsp", SCHEMA, [])
    dst = make(tmp_path / "d.wsp", SCHEMA, [])
    before = Path(dst).read_bytes()
    assert W.fill_file(src, dst, NOW).status == W.UNCHANGED
    assert Path(dst).read_bytes() == before
    # empty DST, full SRC: every archive gets SRC's points, base at slot 0
    full = make(tmp_path / "f.wsp", SCHEMA, [(NOW - i * 60, float(i)) for i in range(3000)])
    expected = oracle_fill(full, dst, NOW)
    W.fill_file(full, dst, NOW)
    assert all(same_series(g, w) for g, w in zip(fetch_archives(dst, NOW), expected, strict=True))


def test_stale_slots_of_an_empty_archive_never_become_points(tmp_path):
    """An empty DST archive (no base) with stale bytes is written whole, zeros around
    the filled slots; an all-zero one gets only its runs. The twins agree on both."""
    schema = [(60, 60), (300, 200), (3600, 24)]
    src = make(tmp_path / "s.wsp", schema, [(NOW - i * 60, 5.0) for i in range(180)])
    zero = make(tmp_path / "zero.wsp", schema, [])
    stale = Path(tmp_path / "stale.wsp")
    shutil.copyfile(zero, stale)
    info = whisper.info(zero)["archives"][1]  # 300 s x 200, empty
    offset, size, rows = info["offset"], info["size"], info["points"]
    start = NOW - NOW % 300 - (rows - 1) * 300

    def written_whole(path: str) -> bool:
        src_bytes, dst_bytes = Path(src).read_bytes(), Path(path).read_bytes()
        plan = W.plan_fill_numpy(
            src_bytes, W.parse_header(src_bytes), dst_bytes, W.parse_header(dst_bytes), NOW
        )
        if W._whisper is not None:
            assert W._whisper.plan(src_bytes, dst_bytes, NOW) == plan
        return any(o <= offset and o + len(d) >= offset + size for o, d in plan[1])

    assert not written_whole(zero)
    assert W.fill_file(src, zero, NOW).status == W.FILLED
    # the first filled row went to slot 0; the slot 5 before the end stands for the
    # row 5 before it, which SRC does not fill: a stale slot there, with its timestamp
    first = (struct.unpack_from(">L", Path(zero).read_bytes(), offset)[0] - start) // 300
    assert first > 5
    data = bytearray(stale.read_bytes())
    data[offset + (rows - 5) * 12 : offset + (rows - 4) * 12] = struct.pack(
        ">Ld", start + (first - 5) * 300, 99.0
    )
    stale.write_bytes(data)
    assert written_whole(str(stale))
    assert W.fill_file(src, str(stale), NOW).status == W.FILLED
    coarse = fetch_archives(str(stale), NOW)[1]
    assert start + (first - 5) * 300 not in coarse, "the stale slot must not read as a point"
    assert coarse == fetch_archives(zero, NOW)[1]
    assert stale.read_bytes() == Path(zero).read_bytes()


def test_schema_mismatch_aggregates_finer_and_never_spreads_coarse(tmp_path):
    # SRC: 60 s then 600 s; DST: 120 s then 1200 s, sum, xff 0.5
    src = make(
        tmp_path / "s.wsp", [(60, 100), (600, 100)], [(NOW - i * 60, 1.0) for i in range(6000)]
    )
    dst = make(tmp_path / "d.wsp", [(30, 100), (120, 100), (1200, 100)], [], 0.5, "sum")
    W.fill_file(src, dst, NOW)
    fine, mid, coarse = fetch_archives(dst, NOW)
    assert fine == {}, "60 s data must never be spread into a 30 s archive"
    # 120 s intervals within SRC's 60 s window (6000 s): two points summed; the
    # 600 s SRC archive is coarser and never used for them
    assert set(mid.values()) <= {1.0, 2.0} and list(mid.values()).count(2.0) >= 49
    assert len(mid) <= 51
    # 1200 s, DST's sum: recomputed from the merged 120 s archive inside the
    # finest window, else the finest SRC archive that divides 1200 s: twenty
    # 60 s points (20.0) within its 6000 s, two 600 s averages (2.0) beyond
    assert len(coarse) in (50, 51)
    values = list(coarse.values())
    assert values.count(2.0) >= 44 and values.count(20.0) >= 3
    fresh = make(tmp_path / "e.wsp", [(30, 100), (120, 100), (1200, 100)], [], 0.5, "sum")
    expected = oracle_fill(src, fresh, NOW)
    assert all(same_series(g, w) for g, w in zip((fine, mid, coarse), expected, strict=True))


def test_missing_dst_becomes_an_exact_copy(tmp_path):
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, float(i)) for i in range(100)])
    os.chmod(src, 0o640)
    dst = tmp_path / "deep" / "er" / "d.wsp"
    assert W.fill_file(src, str(dst), NOW).status == W.COPIED
    assert dst.read_bytes() == Path(src).read_bytes()
    assert dst.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in dst.parent.iterdir()] == ["d.wsp"], "no temporary file left"


def test_dst_appearing_during_the_copy_is_filled_not_replaced(tmp_path, monkeypatch):
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, 2.0) for i in range(10)])
    dst = tmp_path / "d.wsp"
    real_link = os.link

    def carbon_creates_it_first(source, target):
        make(Path(target), SCHEMA, [(NOW, 9.0)])
        return real_link(source, target)

    monkeypatch.setattr(W.files.os, "link", carbon_creates_it_first)
    result = W.fill_file(src, str(dst), NOW)
    monkeypatch.undo()
    assert result.status == W.FILLED
    finest = fetch_archives(str(dst), NOW)[0]
    assert finest[NOW // 60 * 60] == 9.0 and finest[(NOW - 60) // 60 * 60] == 2.0


def truncate(path: str, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def test_truncated_src_is_skipped_and_dst_untouched(tmp_path):
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, 1.0) for i in range(10)])
    dst = make(tmp_path / "d.wsp", SCHEMA, [(NOW, 3.0)])
    truncate(src, os.path.getsize(src) - 5)
    before = Path(dst).read_bytes()
    result = W.fill_file(src, dst, NOW)
    assert result.status == W.SKIPPED and "corrupt SRC" in result.reason
    assert "truncated" in result.reason
    assert Path(dst).read_bytes() == before


def test_corrupt_dst_is_never_overwritten_unless_moved_aside(tmp_path):
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, 1.0) for i in range(10)])
    dst = make(tmp_path / "d.wsp", SCHEMA, [(NOW, 3.0)])
    truncate(dst, 100)
    broken = Path(dst).read_bytes()
    result = W.fill_file(src, dst, NOW)
    assert result.status == W.SKIPPED and "corrupt DST" in result.reason
    assert Path(dst).read_bytes() == broken
    result = W.fill_file(src, dst, NOW, move_corrupt=True)
    assert result.status == W.REPLACED
    assert Path(dst).read_bytes() == Path(src).read_bytes()
    (aside,) = tmp_path.glob("d.wsp.corrupt-*")
    assert aside.read_bytes() == broken


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:10], "truncated header"),
        (lambda b: b"\x00\x00\x00\x09" + b[4:], "aggregation"),
        (lambda b: b[:12] + b"\x00\x00\x00\x00" + b[16:], "archive count"),
        (lambda b: b[:16] + b"\x00\x00\x00\x01" + b[20:], "starts at"),
        (lambda b: b + b"x", "trailing"),
    ],
)
def test_parse_header_refuses_corrupt_files(tmp_path, mangle, message):
    data = Path(make(tmp_path / "s.wsp", SCHEMA, [])).read_bytes()
    W.parse_header(data)
    with pytest.raises(W.CorruptWhisper, match=message):
        W.parse_header(mangle(data))


def fill_while_a_writer_holds(locked: str, src: str, dst: str, points: list) -> W.FillResult:
    """fill_file(src, dst) started while a carbon writer (WHISPER_LOCK_WRITES) holds
    LOCK_EX on `locked`: the fill must still be waiting after 0.5 s; the writer then
    writes `points` with whisper's own code and unlocks. The fill's result."""
    results = []
    with open(locked, "r+b") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: results.append(W.fill_file(src, dst, NOW)))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and not results, f"fill must wait for the lock on {locked}"
        whisper.LOCK = False  # whisper must not lock again: the writer holds the lock
        whisper.file_update_many(writer, points, now=NOW)
        writer.flush()
        fcntl.flock(writer.fileno(), fcntl.LOCK_UN)
    worker.join(10)
    assert results, "the fill did not finish once the lock was released"
    return results[0]


def test_fill_waits_for_a_writer_holding_the_lock(tmp_path):
    """A carbon writer (WHISPER_LOCK_WRITES) holds LOCK_EX: fill waits, then merges
    with what the writer wrote; nothing is corrupted."""
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, 1.0) for i in range(1, 50)])
    dst = make(tmp_path / "d.wsp", SCHEMA, [])
    result = fill_while_a_writer_holds(dst, src, dst, [(NOW - 120, 42.0), (NOW, 43.0)])
    assert result.status == W.FILLED
    finest = fetch_archives(dst, NOW)[0]
    assert finest[(NOW - 120) // 60 * 60] == 42.0, "the writer's point survives"
    assert finest[NOW // 60 * 60] == 43.0
    assert finest[(NOW - 60) // 60 * 60] == 1.0
    assert whisper.info(dst) is not None
    # and the lock was released: another writer gets it at once
    with open(dst, "r+b") as again:
        fcntl.flock(again.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_fill_waits_for_a_writer_of_src_and_reads_what_it_wrote(tmp_path):
    """SRC is read under LOCK_SH: a carbon writer holding LOCK_EX on SRC is waited for."""
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, 1.0) for i in range(1, 5)])
    dst = make(tmp_path / "d.wsp", SCHEMA, [(NOW, 3.0)])
    result = fill_while_a_writer_holds(src, src, dst, [(NOW - 600, 7.0)])
    assert result.status == W.FILLED
    finest = fetch_archives(dst, NOW)[0]
    assert finest[(NOW - 600) // 60 * 60] == 7.0 and finest[NOW // 60 * 60] == 3.0


def test_hard_linked_src_and_dst_are_skipped_not_deadlocked(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    src = make(tmp_path / "src" / "m.wsp", SCHEMA, [(NOW - 60, 1.0)])
    os.link(src, tmp_path / "dst" / "m.wsp")
    summary = W.fill(str(tmp_path / "src"), str(tmp_path / "dst"), now=NOW)
    (result,) = summary.results
    assert result.status == W.SKIPPED and "same file" in result.reason


WRITE_FAILS = """
import fcntl, json, resource, signal, sys
from carbonscale import whisper as W
if sys.argv[3] == "numpy":
    W.merge._whisper = None
# A file size limit below every archive: each write of the fill fails with EFBIG,
# a real failed pwrite (in the C merge's writer or in apply_writes).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
result = W.fill_file(sys.argv[1], sys.argv[2], %d)
with open(sys.argv[2], "r+b") as again:
    fcntl.flock(again.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still locked
with open(sys.argv[1], "r+b") as again:
    fcntl.flock(again.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
print(json.dumps(result._asdict()))
"""


@pytest.mark.parametrize("merge", ["c", "numpy"])
def test_locks_released_when_the_write_fails(tmp_path, merge):
    if merge == "c" and W._whisper is None:
        pytest.skip("the C merge is not built")
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, 1.0) for i in range(5)])
    dst = make(tmp_path / "d.wsp", SCHEMA, [(NOW, 3.0)])
    before = Path(dst).read_bytes()
    run = subprocess.run(
        [sys.executable, "-c", WRITE_FAILS % NOW, src, dst, merge],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["status"] == W.SKIPPED and "File too large" in result["reason"]
    assert Path(dst).read_bytes() == before, "nothing was written"


def test_verify_counts_missing_points(tmp_path):
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, 1.0) for i in range(20)])
    dst = make(tmp_path / "d.wsp", SCHEMA, [(NOW - i * 60, 1.0) for i in range(10)])
    result = W.verify_file(src, dst, NOW)
    assert result.missing > 0 and not result.ok
    assert result.examples and all(t % 60 == 0 for t in result.examples)
    W.fill_file(src, dst, NOW)
    result = W.verify_file(src, dst, NOW)
    assert result.ok and result.checked >= 20


def test_fill_snapshot_checks_dst_under_the_fills_lock(tmp_path):
    """A snapshot in memory fills DST by fill_file's rules; its check runs while DST
    is still locked (a carbon writer's LOCK_EX would wait) and sees the filled bytes.
    A missing DST is linked into place with the given mode and checked as it is."""
    src = make(tmp_path / "s.wsp", SCHEMA, [(NOW - i * 60, float(i)) for i in range(30)])
    dst = make(tmp_path / "d.wsp", SCHEMA, [(NOW - i * 60, 7.0) for i in range(5)])
    data = Path(src).read_bytes()
    header = W.parse_header(data)
    seen = []

    def check(current, current_header) -> str:
        with open(dst, "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        seen.append(bytes(current))
        found = W.verify_data(data, header, current, current_header, NOW, "m")
        return "" if found.ok else f"{found.missing} missing"

    before = fetch_archives(dst, NOW)
    result, problem = W.fill_snapshot(data, header, dst, NOW, "m", 0o640, check)
    assert (result.status, problem) == (W.FILLED, "")
    assert seen == [Path(dst).read_bytes()]
    after = fetch_archives(dst, NOW)
    assert all(after[0][t] == v for t, v in before[0].items())  # DST's points kept
    assert after[0][NOW - NOW % 60 - 29 * 60] == 29.0  # SRC's history filled in

    missing = str(tmp_path / "new" / "m.wsp")
    result, problem = W.fill_snapshot(data, header, missing, NOW, "m", 0o640, lambda c, h: "no")
    assert (result.status, problem) == (W.COPIED, "no")  # the check ran on the copy
    assert Path(missing).read_bytes() == data
    assert os.stat(missing).st_mode & 0o777 == 0o640


# ----- trees and the CLI --------------------------------------------------------------


def build_tree(root: Path, now: int = NOW) -> tuple[Path, Path]:
    src, dst = root / "src", root / "dst"
    for index in range(12):
        relative = Path(f"a/b{index % 3}/m{index}.wsp")
        for tree in (src, dst):
            (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        make(src / relative, SCHEMA, [(now - i * 60, float(index)) for i in range(5, 55)], now=now)
        if index % 4:
            make(dst / relative, SCHEMA, [(now - i * 60, 0.0) for i in range(5)], now=now)
    return src, dst


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_cli_fills_a_tree_then_verify_passes(tmp_path, jobs):
    src, dst = build_tree(tmp_path)
    (src / "a" / "not-whisper.txt").write_text("ignored")
    missing = run(["verify", "--json", "--now", str(NOW), str(src), str(dst)])
    assert missing.returncode == 1
    report = json.loads(missing.stdout)
    assert report["points_missing"] > 0 and len(report["dst_missing"]) == 3
    done = run(["fill", "--json", "--jobs", jobs, "--now", str(NOW), str(src), str(dst)])
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["files"], summary["copied"], summary["filled"]) == (12, 3, 9)
    checked = run(["verify", "--json", "--now", str(NOW), str(src), str(dst)])
    assert checked.returncode == 0, checked.stdout
    assert json.loads(checked.stdout)["points_missing"] == 0
    assert not (dst / "a" / "not-whisper.txt").exists()


def test_cli_progress_on_a_terminal_and_quiet_in_logs(tmp_path):
    """A progress line (files/s, ETA) on a terminal; in a log only the summary."""
    src, dst = build_tree(tmp_path)
    args = [*CLI, "fill", "--now", str(NOW), str(src), str(dst)]
    terminal, child_side = pty.openpty()
    try:
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=child_side, timeout=120)
    finally:
        os.close(child_side)
    seen = b""
    with contextlib.suppress(OSError):  # EIO once the buffered output is read
        while chunk := os.read(terminal, 4096):
            seen += chunk
    os.close(terminal)
    assert done.returncode == 0
    assert re.search(rb"\d+/12 files, \d+ files/s, ETA \S+", seen), seen
    logged = run(["verify", "--now", str(NOW), str(src), str(dst)])
    assert logged.returncode == 0 and "files/s" not in logged.stderr
    assert logged.stdout.startswith("verify: 12 files")


def test_cli_dry_run_writes_nothing(tmp_path):
    src, dst = build_tree(tmp_path)
    before = {p: p.read_bytes() for p in dst.rglob("*.wsp")}
    done = run(["fill", "--dry-run", "--json", "--now", str(NOW), str(src), str(dst)])
    assert done.returncode == 0
    summary = json.loads(done.stdout)
    assert summary["dry_run"] and summary["points"] > 0 and summary["copied"] == 3
    assert {p: p.read_bytes() for p in dst.rglob("*.wsp")} == before


def test_cli_reports_skipped_files_and_exits_1(tmp_path):
    src, dst = build_tree(tmp_path)
    truncate(str(src / "a/b1/m1.wsp"), 50)
    done = run(["fill", "--now", str(NOW), str(src), str(dst)])
    assert done.returncode == 1
    assert "carbonscale: skipped a/b1/m1.wsp: corrupt SRC" in done.stderr
    assert "1 skipped" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fill", "/nonexistent/src", "/tmp/x"], "does not exist"),
        (["fill", "--jobs", "0", "{src}", "{dst}"], "--jobs"),
        (["fill", "{src}", "{file}"], "is not"),
        (["fill", "{file}", "{src}"], "is a file but DST"),
        (["fill", "{file}", "{file}"], "same file"),
        (["fill", "{corrupt}", "{tmp}/new.wsp"], "corrupt SRC"),
        (["verify", "{file}", "{corrupt}"], "corrupt DST"),
        (["verify", "--now", "-5", "{src}", "{dst}"], "--now"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    src, dst = build_tree(tmp_path)
    file = src / "a/b0/m0.wsp"
    corrupt = tmp_path / "corrupt.wsp"
    shutil.copyfile(file, corrupt)
    truncate(str(corrupt), 30)
    names = {"src": src, "dst": dst, "file": file, "corrupt": corrupt, "tmp": tmp_path}
    done = run([a.format(**names) for a in args])
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("carbonscale: error: ")
    assert message in done.stderr


def test_resolve_pair_refuses_the_same_tree(tmp_path):
    with pytest.raises(CarbonscaleError, match="same directory"):
        W.resolve_pair(str(tmp_path), str(tmp_path))


def test_run_jobs_on_threads_keeps_job_order_and_raises_a_workers_error():
    seen = []
    results = W.run_jobs(lambda n: n * n, list(range(50)), 4, seen.append, threads=True)
    assert results == [n * n for n in range(50)] and sorted(seen) == sorted(results)

    def bug(n: int) -> int:
        if n == 7:
            raise ZeroDivisionError("a bug, not a bad file")
        return n

    with pytest.raises(ZeroDivisionError, match="a bug"):
        W.run_jobs(bug, list(range(20)), 3, threads=True)

"""carbonscale.flap with the seed's parameters: half-life 60 s, reuse 10, suppress 25."""

import json
import math
import multiprocessing

import pytest

from carbonscale import CarbonscaleError
from carbonscale.flap import FlapDamper, FlapState, FlapStore

LN2 = math.log(2)


@pytest.fixture
def damper():
    return FlapDamper(half_life=60.0, reuse_limit=10.0, suppress_limit=25.0, penalty=10.0)


def test_decay_follows_the_formula(damper):
    state = damper.event(FlapState(), now=1000.0)
    assert state.penalty == 10.0
    for dt in (0.0, 1.0, 30.0, 60.0, 120.0, 3600.0):
        expected = 10.0 * math.exp(-dt * LN2 / 60.0)
        assert damper.decayed(state, 1000.0 + dt) == pytest.approx(expected, rel=1e-12)
    assert damper.decayed(state, 1060.0) == pytest.approx(5.0)


def test_burst_crosses_suppress_limit(damper):
    state = FlapState()
    damper.event(state, 0.0)
    damper.event(state, 1.0)
    # 10 * 2^(-1/60) + 10 = 19.88: still under 25, not suppressed yet.
    assert not state.suppressed
    damper.event(state, 2.0)
    assert state.penalty == pytest.approx(10 * 2 ** (-2 / 60) + 10 * 2 ** (-1 / 60) + 10)
    assert state.penalty > 25.0
    assert state.suppressed


def test_recovers_exactly_when_penalty_drops_below_reuse(damper):
    state = FlapState()
    for t in (0.0, 1.0, 2.0):
        damper.event(state, t)
    peak, at = state.penalty, state.updated
    release = at + 60.0 * math.log2(peak / 10.0)
    assert damper.release_time(state) == pytest.approx(release)
    # Just before the formula's crossing the state is still suppressed ...
    probe = FlapState(**vars(state))
    assert damper.is_suppressed(probe, release - 1e-6)
    assert damper.decayed(FlapState(**vars(state)), release - 1e-6) > 10.0
    # ... and just after it is released.
    probe = FlapState(**vars(state))
    assert not damper.is_suppressed(probe, release + 1e-6)
    assert probe.penalty < 10.0


def test_observe_counts_changes_not_checks(damper):
    state = FlapState()
    # The first result and repeats of it are not events.
    for t in range(5):
        assert damper.observe(state, True, float(t))
    assert state.penalty == 0.0
    # up/down/up/down within seconds: four changes, suppressed after the third.
    results = [damper.observe(state, up, 10.0 + i) for i, up in enumerate([False, True, False])]
    assert results == [False, True, False]
    assert state.suppressed
    # Up again but suppressed: held out of the pool.
    assert damper.observe(state, True, 14.0) is False


def test_event_while_suppressed_pushes_release_later(damper):
    state = FlapState()
    for t in (0.0, 1.0, 2.0):
        damper.event(state, t)
    first_release = damper.release_time(state)
    damper.event(state, 30.0)
    assert state.suppressed
    assert damper.release_time(state) > first_release


def test_clock_going_backwards_does_not_decay_or_grow(damper):
    state = FlapState()
    for t in (100.0, 101.0, 102.0):
        damper.event(state, t)
    before = state.penalty
    assert damper.decayed(state, 50.0) == before
    assert damper.is_suppressed(state, 50.0)
    assert state.penalty == before
    # Decay is measured from the new (earlier) time on.
    assert damper.decayed(state, 110.0) == pytest.approx(before * 2 ** (-60 / 60))


def test_huge_gap_decays_to_zero_without_error(damper):
    state = FlapState()
    for t in (0.0, 1.0, 2.0):
        damper.event(state, t)
    assert damper.decayed(state, 1e12) == 0.0
    assert not damper.is_suppressed(state, 1e12)


def test_penalty_ceiling_bounds_hold_down(damper):
    state = FlapState()
    for t in range(1000):
        damper.event(state, float(t) * 0.01)
    assert state.penalty == damper.max_penalty == 100.0
    # From the ceiling: log2(100/10) half-lives.
    assert damper.release_time(state) - state.updated == pytest.approx(60.0 * math.log2(10))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"half_life": 0},
        {"reuse_limit": 30, "suppress_limit": 25},
        {"penalty": -1},
        {"max_penalty": 20},
    ],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(CarbonscaleError):
        FlapDamper(**kwargs)


def test_store_keeps_state_across_runs(tmp_path, damper):
    path = str(tmp_path / "flap.json")
    for i, up in enumerate([True, False, True, False]):
        with FlapStore(path) as store:
            damper.observe(store.get("relay1:8125"), up, float(i))
    with FlapStore(path) as store:
        state = store.get("relay1:8125")
        assert state.suppressed
        assert state.up is False
    assert json.loads((tmp_path / "flap.json").read_text())["relay1:8125"]["suppressed"] is True


def test_store_survives_a_damaged_file(tmp_path):
    path = tmp_path / "flap.json"
    path.write_text("{not json")
    with FlapStore(str(path)) as store:
        assert store.get("x") == FlapState()
    assert json.loads(path.read_text()) == {"x": vars(FlapState())}


def _bump(path, name, rounds):
    damper = FlapDamper(max_penalty=1e9, suppress_limit=1e8, reuse_limit=1)
    for _ in range(rounds):
        with FlapStore(path) as store:
            state = store.get(name)
            # No decay between events: same timestamp, so penalties add up.
            damper.event(state, 0.0)


def test_store_serializes_concurrent_checkers(tmp_path):
    path = str(tmp_path / "flap.json")
    workers = [multiprocessing.Process(target=_bump, args=(path, "shared", 50)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    with FlapStore(path) as store:
        assert store.get("shared").penalty == pytest.approx(4 * 50 * 10.0)

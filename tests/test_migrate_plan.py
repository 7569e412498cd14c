"""carbonscale.migrate.plan's vectorized model against its definition, metric by metric.

Listings with copies where the old ring put them, strays, lost copies, names
with bytes >= 0x80 and paths carbon could not have written; the reference
walks every name with Ring.locate and the rules of the plan's docstring (a
metric is placed when its holders are exactly its owners and, with an old
ring, its owner hosts did not change)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from carbonscale.migrate.plan import _sort_by_key, compute_plan
from carbonscale.migrate.transport import Listing
from carbonscale.ring import Ring

HOSTS = [f"10.0.0.{i}" for i in range(1, 6)]


def members(hosts: list[str]) -> list[str]:
    return [f"{h}:{port}={h.rsplit('.', 1)[1]}{x}" for h in hosts
            for port, x in ((2103, "a"), (2203, "b"))]  # fmt: skip


def listing(paths: list[bytes], sizes: list[int]) -> Listing:
    block = b"".join(p + b"\n" for p in paths)
    count = len(paths)
    return Listing(block, count, np.array(sizes, np.int64), np.zeros(count, np.int64), 1 << 50)


def owner_hosts(ring: Ring, name: bytes) -> frozenset[str]:
    return frozenset(m.host for m in ring.locate(name))


def reference(new: Ring, old: Ring | None, copies: dict[bytes, dict[str, int]]) -> dict:
    """{name: (owners, holders, largest size)} of the metrics that are work."""
    work = {}
    for name, held in copies.items():
        owners, holders = owner_hosts(new, name), frozenset(held)
        moved = old is not None and owner_hosts(old, name) != owners
        # a single owner holding the only copy has nothing to pull from anyone
        alone = owners == holders and len(owners) == 1
        if holders != owners or (moved and not alone):
            work[name] = (owners, holders, max(held.values()))
    return work


CASES = [  # old ring, new ring: (hash, compat, hosts) each; replication
    (("carbon_ch", "carbon-c-relay", HOSTS[:3]), ("carbon_ch", "carbon-c-relay", HOSTS[:5]), 2),
    (("carbon_ch", "carbon", HOSTS[:4]), ("carbon_ch", "carbon", HOSTS[1:4]), 2),
    (("fnv1a_ch", "carbon-c-relay", HOSTS[:3]), ("fnv1a_ch", "carbon", HOSTS[:4]), 1),
    (("jump_fnv1a_ch", "carbon-c-relay", HOSTS[:3]), ("jump_fnv1a_ch", "carbon-c-relay", HOSTS), 2),
    (("carbon_ch", "carbon-c-relay", HOSTS[:4]), ("jump_fnv1a_ch", "carbon-c-relay", HOSTS[:4]), 1),
    (None, ("fnv1a_ch", "carbon-c-relay", HOSTS[:4]), 2),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("odd_paths", [False, True])
def test_the_plan_is_its_definition_metric_by_metric(case, odd_paths):
    old_spec, new_spec, replication = CASES[case]
    rnd = random.Random(case * 2 + odd_paths)
    new = Ring(members(new_spec[2]), new_spec[0], new_spec[1], replication)
    old = Ring(members(old_spec[2]), old_spec[0], old_spec[1], replication) if old_spec else None
    suffixes = [b"", "é".encode(), b"\xff\x80", b"-x_1"]
    names = {b"app%d.web%d.cpu%s" % (rnd.randrange(10**6), i % 7, rnd.choice(suffixes))
             for i in range(3000)}  # fmt: skip
    copies: dict[bytes, dict[str, int]] = {}
    for name in sorted(names):
        where = owner_hosts(old or new, name)
        draw = rnd.random()
        if draw < 0.1:  # strays, a lost copy, a copy only where no ring puts it
            where = frozenset(rnd.sample(HOSTS, rnd.randint(1, len(HOSTS))))
        copies[name] = {host: rnd.choice([4096, 8192, 12288]) for host in where}
    paths: dict[str, list[bytes]] = {h: [] for h in HOSTS}
    sizes: dict[str, list[int]] = {h: [] for h in HOSTS}
    for name, held in copies.items():
        for host, size in held.items():
            paths[host].append(name.replace(b".", b"/") + b".wsp")
            sizes[host].append(size)
    skipped = 0
    if odd_paths:  # carbon never writes these: left out, counted
        for host in HOSTS[:2]:
            paths[host] += [b"a.b/c.wsp", b"no_suffix", b"x/y.wsp.tmp"]
            sizes[host] += [1, 2, 3]
            skipped += 3
    listings = {}
    for host in HOSTS:
        order = list(range(len(paths[host])))
        rnd.shuffle(order)  # a listing is in directory order, not name order
        listings[host] = listing([paths[host][i] for i in order], [sizes[host][i] for i in order])
    endpoints = {h: f"{h}:7000" for h in HOSTS}

    plan = compute_plan(new, listings, endpoints, old, allow_jump_reshuffle=True)

    bit = {h: 1 << i for i, h in enumerate(plan.hosts)}
    found = {
        name: (
            frozenset(h for h in HOSTS if owners & bit[h]),
            frozenset(h for h in HOSTS if holders & bit[h]),
            size,
        )
        for name, owners, holders, size in zip(
            plan.names, plan.owners.tolist(), plan.holders.tolist(), plan.sizes.tolist(),
            strict=True,
        )
    }  # fmt: skip
    expected = reference(new, old, copies)
    assert len(found) == len(plan.names)  # every metric at most once
    assert found == expected and 0 < len(expected) < len(copies)
    summary = plan.summary
    assert summary["metrics"] == len(copies) and summary["work"] == len(expected)
    assert summary["copies"] == sum(len(p) for p in paths.values())
    assert summary["not_carbon_paths"] == skipped
    if old is not None:
        changed = sum(owner_hosts(old, n) != owner_hosts(new, n) for n in copies)
        assert summary["owner_change"] == changed


def test_two_names_with_one_join_key_are_refused(monkeypatch):
    from carbonscale import CarbonscaleError
    from carbonscale.migrate import plan as planning

    # Every name gets one 64-bit key: the 32-bit check tells the names apart.
    monkeypatch.setattr(planning, "fnv1a_64_batch", lambda names: np.zeros(len(names), np.uint64))
    ring = Ring(members(HOSTS[:2]), "carbon_ch", replication=1)
    listings = {h: listing([b"a/b.wsp", b"c/d.wsp"], [1, 1]) for h in HOSTS[:2]}
    with pytest.raises(CarbonscaleError, match="share a 64-bit name key"):
        compute_plan(ring, listings, {h: f"{h}:7000" for h in HOSTS[:2]})


@pytest.mark.parametrize("spread", [1, 1 << 12, 1 << 40, (1 << 64) - 1])
def test_sort_by_key_is_a_stable_key_sort(spread):
    """Keys sharing their high bits (the packed sort's blind spot) come out in
    key order too, equal keys in index order."""
    rng = np.random.default_rng(spread % 1000)
    key = rng.integers(0, spread, 20000, dtype=np.uint64, endpoint=True)
    key = np.concatenate([key, key[:5000], key[:100]])
    rng.shuffle(key)
    order, ordered = _sort_by_key(key)
    expected = np.lexsort((np.arange(len(key)), key))
    assert (order == expected).all() and (ordered == key[expected]).all()
    assert _sort_by_key(np.zeros(0, np.uint64))[0].tolist() == []

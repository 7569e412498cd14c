"""carbonscale.ring against the real programs: carbon-c-relay -t and carbon's hashing.

Every comparison is name by name, owner by owner, primary first; the count
of differences must be 0. Configurations are random but seeded, so a failure
is reproducible from the test id.
"""

from __future__ import annotations

import random
import subprocess
from types import SimpleNamespace

import pytest
from carbon.hashing import ConsistentHashRing
from carbon.routers import ConsistentHashingRouter
from relay_oracle import RELAY, needs_relay, relay_test_owners, write_cluster_config

from carbonscale import CarbonscaleError
from carbonscale import ring as ringmod
from carbonscale.ring import RELAY_MAX_MEMBERS, Ring, parse_member

# Names: dotted ASCII paths plus about 12% with multi-byte UTF-8 (é, ü, CJK,
# emoji) and some with bytes >= 0x80 in every position, which carbon-c-relay
# hashes through a signed char.
WORDS = ["servers", "prod", "web", "db", "cpu", "load", "p99", "eu-west", "a", "x_y", "_"]
UNICODE = ["é", "ü", "ß", "中文", "ñandú", "🚀", "Ωmega", "ÿ"]


def make_names(rng: random.Random, count: int) -> list[str]:
    names = []
    for i in range(count):
        parts = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.12:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(UNICODE))
        names.append(".".join(parts) + f".{i}")
    return names


def make_members(rng: random.Random, count: int, kind: str) -> list[str]:
    """Members of one cluster: distinct host:port, instances of the given kind."""
    members = []
    for i in range(count):
        host = (
            f"10.{rng.randrange(4)}.{i // 250}.{i % 250 + 1}" if rng.random() < 0.8 else f"node{i}"
        )
        port = rng.choice([2003, 2103, 2203, 2004 + i])
        if kind == "none":
            instance = None
        elif kind == "numeric":
            # small range: repeated instances collide in fnv1a_ch on purpose;
            # leading zeros test carbon-c-relay's integer reading of them
            instance = rng.choice(
                [str(rng.randrange(40)), f"0{rng.randrange(40)}", f"-{rng.randrange(9)}"]
            )
        elif kind == "alpha":
            instance = rng.choice(["a", "b", "c", "cache", "zz"]) + rng.choice(["", str(i)])
        else:  # mixed: numbers, words, and members without an instance
            instance = rng.choice(
                [
                    None,
                    str(rng.randrange(30)),
                    f"+{rng.randrange(5)}",
                    rng.choice("abz") + str(i),
                    f"7x{i}",
                ]
            )
        members.append(f"{host}:{port}" + ("" if instance is None else f"={instance}"))
    return members


def relay_placement(
    tmp_path, hash_type: str, replication: int, members: list[str], names: list[str]
):
    """What carbon-c-relay -t says: {metric: [ip:port, ...]}."""
    config = write_cluster_config(tmp_path / "relay.conf", hash_type, replication, members)
    return relay_test_owners(config, names)


RELAY_CASES = [
    # (hash, seed): 12 clusters per hash, 2..64 members, 8,400 names each:
    # 100,800 names per hash type, 302,400 placements in all.
    (hash_type, seed)
    for hash_type in ("carbon_ch", "fnv1a_ch", "jump_fnv1a_ch")
    for seed in range(12)
]


@needs_relay
@pytest.mark.parametrize(("hash_type", "seed"), RELAY_CASES)
def test_relay_agrees_name_by_name(tmp_path, hash_type, seed):
    rng = random.Random(f"{hash_type}-{seed}")
    count = [2, 3, 5, 8, 12, 16, 24, 32, 40, 48, 60, 64][seed]
    kind = ["none", "numeric", "alpha", "mixed"][seed % 4]
    replication = 1 + seed % 3 if count >= 3 else 1
    members = make_members(rng, count, kind)
    names = make_names(rng, 8400)
    expected = relay_placement(tmp_path, hash_type, replication, members, names)
    assert len(expected) == len(names), "carbon-c-relay did not route every name"
    ring = Ring(members, hash_type, "carbon-c-relay", replication)
    rows = ring.locate_batch([n.encode() for n in names])
    differences = [
        (name, expected[name], [ring.members[i].address for i in row])
        for name, row in zip(names, rows.tolist(), strict=True)
        if [ring.members[i].address for i in row] != expected[name]
    ]
    assert differences == [], f"{len(differences)} differences, first: {differences[:3]}"


@needs_relay
def test_relay_refuses_more_than_64_members_and_so_do_we(tmp_path):
    members = [f"10.9.0.{i + 1}:2003" for i in range(RELAY_MAX_MEMBERS + 1)]
    config = tmp_path / "big.conf"
    config.write_text(
        "cluster c carbon_ch\n  " + "\n  ".join(members) + "\n  ;\nmatch * send to c stop;\n"
    )
    run = subprocess.run(
        [RELAY, "-t", "-f", str(config)], input=b"a\n", capture_output=True, check=False
    )
    assert b"CONN_DESTS_SIZE" in run.stdout + run.stderr
    with pytest.raises(CarbonscaleError, match="at most 64"):
        Ring(members, "carbon_ch")
    Ring(members[:RELAY_MAX_MEMBERS], "carbon_ch")  # 64 is fine


def carbon_router(hash_type: str, replication: int, diverse: bool, members, ring=None):
    """carbon's router; given `ring` (another router's), it shares that ring.

    carbon builds a ring in O(members^2 x replicas) steps where replica
    positions collide (fnv1a_ch hashes the instance only, so 100 hosts without
    instances collide on every replica): 3 minutes for 100 members. The
    DIVERSE_REPLICAS setting only changes how getDestinations walks the ring,
    so both settings are checked against one build."""
    settings = SimpleNamespace(
        REPLICATION_FACTOR=replication, DIVERSE_REPLICAS=diverse, ROUTER_HASH_TYPE=hash_type
    )
    router = ConsistentHashingRouter(settings)
    if ring is not None:
        router.ring, router.instance_ports = ring.ring, ring.instance_ports
        return router
    for member in members:
        router.addDestination((member.host, member.port, member.instance))
    return router


CARBON_CASES = [(hash_type, seed) for hash_type in ("carbon_ch", "fnv1a_ch") for seed in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize(("hash_type", "seed"), CARBON_CASES)
def test_carbon_router_agrees_name_by_name(hash_type, seed):
    """carbon's ConsistentHashingRouter: 2..128 members, several instances per
    host (DIVERSE_REPLICAS matters), with and without DIVERSE_REPLICAS, 4,200
    names a case and setting: 100,800 in all."""
    rng = random.Random(f"carbon-{hash_type}-{seed}")
    count = [2, 7, 20, 50, 100, 128][seed]
    kind = ["none", "numeric", "alpha", "mixed"][seed % 4]
    # Without instances every member needs its own host.
    hosts = count if kind == "none" else max(3, count // 3)
    members = []
    seen = set()
    while len(members) < count:
        index = rng.randrange(hosts)
        host = f"10.20.{index // 250}.{index % 250 + 1}"
        instance = {
            "none": None,
            "numeric": str(rng.randrange(1000)),
            "alpha": rng.choice("abcdefgh") + str(rng.randrange(100)),
            "mixed": rng.choice([None, str(rng.randrange(50)), "x" + str(rng.randrange(50))]),
        }[kind]
        if (host, instance) in seen:
            continue
        seen.add((host, instance))
        members.append(
            parse_member(
                f"{host}:{rng.choice([2003, 2004])}" + (f":{instance}" if instance else "")
            )
        )
    distinct_hosts = len({m.host for m in members})
    built = None
    differences = []
    for diverse in (True, False):
        replication = min(1 + seed % 3, distinct_hosts if diverse else len(members))
        router = carbon_router(hash_type, replication, diverse, members, ring=built)
        built = router
        ring = Ring(members, hash_type, "carbon", replication, diverse_replicas=diverse)
        names = make_names(rng, 4200)
        rows = ring.locate_batch([n.encode() for n in names])
        for name, row in zip(names, rows.tolist(), strict=True):
            expected = [(h, p) for h, p, _ in router.getDestinations(name)]
            mine = [(ring.members[i].host, ring.members[i].port) for i in row]
            if mine != expected:
                differences.append((diverse, name, expected, mine))
    assert differences == [], f"{len(differences)} differences, first: {differences[:3]}"


# carbon's published tests (lib/carbon/tests/test_hashing.py), against our ring.


@pytest.mark.parametrize("nodes", range(2, 10))
def test_carbon_vector_positional_integrity(nodes):
    members = [f"192.168.10.{10 + n}:2003:{10 + n}" for n in range(nodes)]
    ring = Ring(members, "carbon_ch", "carbon")
    positions = ring.ring_positions.tolist()
    assert len(positions) == len(set(positions)) == 100 * nodes
    # ... and they are carbon's own positions.
    theirs = ConsistentHashRing([])
    for n in range(nodes):
        theirs.add_node((f"192.168.10.{10 + n}", f"{10 + n}"))
    assert positions == [entry[0] for entry in theirs.ring]


def test_carbon_vector_insensitivity_to_node_order():
    nodes = [f"192.168.10.{10 + n}:2003:{10 + n}" for n in range(1, 11)]
    rng = random.Random(7)
    first = nodes[:]
    rng.shuffle(first)
    second = nodes[:]
    rng.shuffle(second)
    ring1, ring2 = Ring(first, "carbon_ch", "carbon"), Ring(second, "carbon_ch", "carbon")
    for key in range(0, 101):
        assert ring1.locate(str(key)) == ring2.locate(str(key))


def test_the_implementations_really_differ_at_collisions():
    """Why compat exists: the same members, carbon vs carbon-c-relay placement."""
    rng = random.Random(11)
    members = [f"10.30.0.{i + 1}:2003={c}" for i, c in enumerate("abcdefghijkl")]
    names = [n.encode() for n in make_names(rng, 20000)]
    relay = Ring(members, "carbon_ch", "carbon-c-relay").locate_batch(names)[:, 0]
    carbon = Ring(members, "carbon_ch", "carbon").locate_batch(names)[:, 0]
    differ = int((relay != carbon).sum())
    assert 0 < differ < len(names) * 0.05


def test_batch_twins_match_the_c_loops(monkeypatch):
    """The numpy/hashlib fallbacks give the same placement as the C extension."""
    if ringmod._ringhash is None:
        pytest.skip("the C extension is not built here")
    rng = random.Random(3)
    names = [n.encode() for n in make_names(rng, 5000)]
    members = make_members(rng, 30, "mixed")
    expected = {h: Ring(members, h, replication=3).locate_batch(names) for h in ringmod.HASH_TYPES}
    monkeypatch.setattr(ringmod.hashes, "_ringhash", None)
    for hash_type, rows in expected.items():
        assert (Ring(members, hash_type, replication=3).locate_batch(names) == rows).all()

"""carbonscale.ring's parsing and primitives, and the `carbonscale ring` verbs.

The name-by-name comparisons with carbon-c-relay and carbon live in
test_ring_oracles.py; here the CLI is run as a user runs it (a subprocess), and
its answers are checked against the library and against carbon-c-relay -t.
"""

from __future__ import annotations

import io
import random
import subprocess
import sys

import pytest
from relay_oracle import needs_relay, relay_test_owners

from carbonscale import CarbonscaleError
from carbonscale.relay_names import relay_key
from carbonscale.ring import (
    Member,
    Ring,
    fnv1a_32,
    fnv1a_64,
    parse_member,
    parse_relay_config,
    select_cluster,
)

CLI = [sys.executable, "-m", "carbonscale"]


def run(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, input=stdin, capture_output=True, check=False, timeout=120)


def relay_name(name: str) -> str:
    """The name carbon-c-relay routes and writes (its rewrite: 'é' -> '__')."""
    return relay_key(name.encode()).decode()


def names(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    parts = ["servers", "web", "db", "cpu", "load", "héllo", "日本", "requests", "p99"]
    return [
        ".".join(rng.choice(parts) for _ in range(rng.randint(2, 5))) + f".{i}"
        for i in range(count)
    ]


# --------------------------------------------------------------------------
# Members


@pytest.mark.parametrize(
    ("text", "member"),
    [
        ("host", Member("host", 2003, None)),
        ("host:2103", Member("host", 2103, None)),
        ("host=a", Member("host", 2003, "a")),
        ("host:2103=a", Member("host", 2103, "a")),
        ("host:2104:a", Member("host", 2104, "a")),
        ("10.0.0.1:2103=054", Member("10.0.0.1", 2103, "054")),
        ("[2001:db8::1]", Member("2001:db8::1", 2003, None)),
        ("[2001:db8::1]:2103", Member("2001:db8::1", 2103, None)),
        ("[2001:db8::1]:2103=b", Member("2001:db8::1", 2103, "b")),
        ("[2001:db8::1]:2104:b", Member("2001:db8::1", 2104, "b")),
    ],
)
def test_parse_member_accepts_both_syntaxes(text, member):
    assert parse_member(text) == member


def test_member_prints_in_relay_syntax():
    assert str(parse_member("[::1]:2103:a")) == "[::1]:2103=a"
    assert parse_member("h").address == "h:2003"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "a b",
        "host:",
        "host:0",
        "host:65536",
        "host:x",
        "host=",
        "host:2103:",
        "[::1",
        "[::1]2003",
        "a:1:2:3",
        "host:2103:a=b",
        "2001:db8::1",
        ":2003",
    ],
)
def test_parse_member_refuses_bad_members(text):
    with pytest.raises(CarbonscaleError):
        parse_member(text)


# --------------------------------------------------------------------------
# FNV-1a: the published vectors (Fowler/Noll/Vo test suite)


@pytest.mark.parametrize(
    ("data", "h32", "h64"),
    [
        (b"", 0x811C9DC5, 0xCBF29CE484222325),
        (b"a", 0xE40C292C, 0xAF63DC4C8601EC8C),
        (b"foobar", 0xBF9CF968, 0x85944171F73967E8),
    ],
)
def test_fnv1a_published_vectors(data, h32, h64):
    assert fnv1a_32(data) == h32
    assert fnv1a_64(data) == h64


def test_signed_char_only_changes_non_ascii():
    assert fnv1a_32(b"abc", signed_char=True) == fnv1a_32(b"abc")
    assert fnv1a_32("é".encode(), signed_char=True) != fnv1a_32("é".encode())


# --------------------------------------------------------------------------
# Relay config parsing


RELAY_CONFIG = """\
# comment
cluster old
    carbon_ch replication 2
        10.0.0.1:2103=a
        10.0.0.1:2203=b
        10.0.0.2:2103=a
    ;
cluster "new"
    jump_fnv1a_ch
        10.0.0.1:2103=a 10.0.0.2:2103=a 10.0.0.3:2103=a
    ;
match * send to old stop;
"""


def test_parse_relay_config_reads_clusters():
    clusters = parse_relay_config(RELAY_CONFIG)
    assert set(clusters) == {"old", "new"}
    assert clusters["old"].hash_type == "carbon_ch"
    assert clusters["old"].replication == 2
    assert [str(m) for m in clusters["old"].members][1] == "10.0.0.1:2203=b"
    assert clusters["new"].hash_type == "jump_fnv1a_ch"
    assert len(clusters["new"].members) == 3
    with pytest.raises(CarbonscaleError, match="--cluster"):
        select_cluster(clusters, None, "relay.conf")
    with pytest.raises(CarbonscaleError):
        select_cluster(clusters, "nope", "relay.conf")


# --------------------------------------------------------------------------
# locate


MEMBERS = ["10.0.0.1:2103=a", "10.0.0.1:2203=b", "10.0.0.2:2103=a", "10.0.0.2:2203=b", "[::1]:2103"]


@pytest.mark.parametrize("hash_type", ["carbon_ch", "fnv1a_ch", "jump_fnv1a_ch"])
def test_locate_prints_metric_and_owners_primary_first(hash_type):
    sample = names(3000)
    # Line protocol input: only the first field is the metric.
    stdin = "".join(f"{n} 1.5 1700000000\n" for n in sample).encode()
    result = run(["ring", "locate", "--hash", hash_type, "--replication", "2", *MEMBERS], stdin)
    assert result.returncode == 0, result.stderr
    ring = Ring([parse_member(m) for m in MEMBERS], hash_type, replication=2)
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(sample)
    for line, name in zip(lines, sample, strict=False):
        fields = line.split("\t")
        assert fields[0] == relay_name(name)
        assert fields[1:] == [m.address for m in ring.locate(relay_name(name))]
        assert len(set(fields[1:])) == 2


@needs_relay
@pytest.mark.parametrize("cluster", ["old", "new"])
def test_locate_with_relay_config_matches_the_relay(tmp_path, cluster):
    config = tmp_path / "relay.conf"
    # The relay routes everything to the cluster under test.
    config.write_text(RELAY_CONFIG.replace("send to old", f"send to {cluster}"))
    sample = names(2000, seed=3)
    ours = run(
        ["ring", "locate", "--relay-config", str(config), "--cluster", cluster],
        "\n".join(sample).encode(),
    )
    assert ours.returncode == 0, ours.stderr
    # -t routes names as given; the live relay (and locate) the rewritten ones.
    relay = relay_test_owners(config, [relay_name(name) for name in sample])
    located = {}
    for line in ours.stdout.decode().splitlines():
        metric, *owners = line.split("\t")
        located[metric] = owners
    assert located == relay


def test_locate_skips_blank_lines_and_keeps_order():
    result = run(["ring", "locate", "--hash", "fnv1a_ch", "a", "b"], b"x.y\n\n   \nz.w 1 2\n")
    assert result.returncode == 0
    assert [line.split("\t")[0] for line in result.stdout.decode().splitlines()] == ["x.y", "z.w"]


# --------------------------------------------------------------------------
# diff


def test_diff_lists_exactly_the_metrics_that_move():
    old = ["s1:2103=a", "s1:2203=b", "s2:2103=a", "s2:2203=b"]
    new = [*old, "s3:2103=a", "s3:2203=b"]
    sample = names(4000, seed=11)
    result = run(
        ["ring", "diff", "--hash", "carbon_ch", "--replication", "2", "--old", *old, "--new", *new],
        "\n".join(sample).encode(),
    )
    assert result.returncode == 0, result.stderr
    old_ring = Ring([parse_member(m) for m in old], "carbon_ch", replication=2)
    new_ring = Ring([parse_member(m) for m in new], "carbon_ch", replication=2)
    expected = {}
    for name in map(relay_name, sample):
        before = [m.address for m in old_ring.locate(name)]
        after = [m.address for m in new_ring.locate(name)]
        if before != after:
            expected[name] = (before, after)
    moved = {}
    for line in result.stdout.decode().splitlines():
        metric, before, after = line.split("\t")
        moved[metric] = (before.split(","), after.split(","))
    assert moved == expected
    summary = result.stderr.decode()
    assert f"moved {len(expected)} of {len(sample)} metrics" in summary
    # Adding members never moves a metric between two old members' primaries.
    matrix = _matrix(summary)
    for src, row in matrix.items():
        for dst, count in row.items():
            if dst != src and not dst.startswith("s3:"):
                assert count == 0, (src, dst)
    assert sum(sum(row.values()) for row in matrix.values()) == len(sample)


def _matrix(summary: str) -> dict[str, dict[str, int]]:
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("primary owner"))
    header = lines[start + 1].split()
    matrix = {}
    for line in lines[start + 2 :]:
        cells = line.split()
        if len(cells) != len(header) + 1:
            break
        matrix[cells[0]] = dict(zip(header, map(int, cells[1:]), strict=False))
    return matrix


def test_diff_summary_only_on_stdout():
    result = run(
        [
            "ring",
            "diff",
            "--hash",
            "fnv1a_ch",
            "--old",
            "a",
            "b",
            "--new",
            "a",
            "b",
            "c",
            "--summary",
        ],
        "\n".join(names(500)).encode(),
    )
    assert result.returncode == 0
    assert result.stdout.decode().startswith("moved ")
    assert result.stderr == b""


def test_diff_between_relay_configs(tmp_path):
    config = tmp_path / "relay.conf"
    config.write_text(RELAY_CONFIG)
    result = run(
        [
            "ring",
            "diff",
            "--old-relay-config",
            str(config),
            "--old-cluster",
            "old",
            "--new-relay-config",
            str(config),
            "--new-cluster",
            "new",
            "--summary",
        ],
        "\n".join(names(500)).encode(),
    )
    assert result.returncode == 0, result.stderr
    assert "moved " in result.stdout.decode()


# --------------------------------------------------------------------------
# balance


def test_balance_reports_shares_and_a_better_suggestion():
    members = [f"10.0.0.{i}:2103=a" for i in range(1, 7)]
    result = run(
        [
            "ring",
            "balance",
            "--hash",
            "carbon_ch",
            "--sample",
            "5000",
            "--suggest-instances",
            *members,
        ]
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode() + result.stderr.decode()
    shares = [line for line in out.splitlines() if line.startswith("10.0.0.")]
    assert len(shares) >= 6
    ring_share = sum(float(line.split()[1].rstrip("%")) for line in shares[:6])
    assert abs(ring_share - 100.0) < 0.01
    before_after = next(line for line in out.splitlines() if line.startswith("suggested"))
    before, after = (
        float(x) for x in before_after.split("positions ")[1].split(")")[0].split(" -> ")
    )
    assert after <= before


def test_balance_reads_names_from_stdin():
    result = run(
        ["ring", "balance", "--hash", "fnv1a_ch", "--names", "-", "a", "b", "c"],
        "\n".join(names(900)).encode(),
    )
    assert result.returncode == 0, result.stderr
    assert "names: 900" in result.stdout.decode()


# --------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback, nothing half-printed


BAD = [
    (["ring", "locate", "--hash", "carbon_ch", "x", "y", "x"], b"a\n", "duplicate member"),
    (
        ["ring", "locate", "--hash", "carbon_ch", "--replication", "3", "x", "y"],
        b"a\n",
        "replication 3",
    ),
    (["ring", "locate", "--hash", "carbon_ch", "--replication", "0", "x"], b"a\n", "replication"),
    (["ring", "locate", "--hash", "fnv1a_ch", *[f"h{i}" for i in range(65)]], b"a\n", "at most 64"),
    (
        ["ring", "locate", "--hash", "fnv1a_ch", *[f"h{i}" for i in range(129)]],
        b"a\n",
        "at most 64",
    ),
    (["ring", "locate", "--hash", "jump_fnv1a_ch", "--compat", "carbon", "a", "b"], b"a\n", "jump"),
    (["ring", "locate", "--hash", "fnv1a_ch"], b"a\n", "no members"),
    (["ring", "locate", "--hash", "fnv1a_ch", "x:99999"], b"a\n", "port"),
    # carbon's relay hashes names as given (carbon-c-relay rewrites bad bytes to '_')
    (
        ["ring", "locate", "--hash", "fnv1a_ch", "--compat", "carbon", "a", "b"],
        b"ok\n\xff\xfe.bad\n",
        "UTF-8",
    ),
    (["ring", "locate", "--relay-config", "/nonexistent/relay.conf"], b"a\n", "cannot read"),
    (["ring", "diff", "--hash", "fnv1a_ch", "--old", "a"], b"a\n", "new"),
]


@pytest.mark.parametrize(("args", "stdin", "message"), BAD)
def test_bad_input_is_one_clear_line_and_exit_2(args, stdin, message):
    result = run(args, stdin)
    err = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, err)
    assert "Traceback" not in err
    assert err.startswith("carbonscale: error:") or "usage:" in err
    assert message.lower() in err.lower()


def test_unknown_hash_is_refused_by_the_parser():
    result = run(["ring", "locate", "--hash", "md5", "a"], b"a\n")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr.decode()


def test_relay_config_without_clusters_is_refused(tmp_path):
    config = tmp_path / "relay.conf"
    config.write_text("match * send to nowhere;\n")
    result = run(["ring", "locate", "--relay-config", str(config)], b"a\n")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr.decode()


@needs_relay
def test_shared_fnv1a_instances_are_shadowed_here_and_in_the_relay(tmp_path):
    """fnv1a_ch keys on the instance alone: two members named `a` collide on every
    entry, the relay never sends to the second, and we warn about it."""
    members = ["10.1.0.1:2103=a", "10.1.0.2:2103=a", "10.1.0.3:2103=b"]
    config = tmp_path / "relay.conf"
    config.write_text(
        "cluster c fnv1a_ch\n  " + "\n  ".join(members) + "\n  ;\nmatch * send to c stop;\n"
    )
    sample = names(500, seed=5)
    relay_owners = {o for owners in relay_test_owners(config, sample).values() for o in owners}
    assert "10.1.0.2:2103" not in relay_owners
    result = run(["ring", "locate", "--hash", "fnv1a_ch", *members], "\n".join(sample).encode())
    assert result.returncode == 0
    assert "10.1.0.2:2103" not in result.stdout.decode()
    assert "warning" in result.stderr.decode() and "10.1.0.2:2103=a" in result.stderr.decode()


@pytest.mark.parametrize("hash_type", ["carbon_ch", "fnv1a_ch", "jump_fnv1a_ch"])
def test_c_block_loop_equals_the_python_path(hash_type):
    """_ringhash.locate_block (the locate verb's C loop) against names_in + join_lines."""
    from carbonscale.ring.locate import Locator, locate_stream

    ring = Ring([parse_member(m) for m in MEMBERS], hash_type, replication=3)
    fast = Locator(ring)
    assert fast.block_args is not None, "the C loop is built"
    slow = Locator(ring)
    slow.block_args = None
    lines = [f"{n} 1 1700000000" for n in names(20000, seed=9)]
    lines[10:10] = ["", "   ", "\tlead.tab 1", "trail.space   ", "cr.end\r", "vt\x0bsep", "ff\x0c"]
    data = ("\n".join(lines)).encode()  # the last line has no newline
    outputs = []
    for locator in (fast, slow):
        out = io.BytesIO()
        locate_stream(locator, io.BytesIO(data), out)
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]
    assert outputs[0].count(b"\n") == len(lines) - 2

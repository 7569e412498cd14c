"""carbonscale.relay_names: the name carbon-c-relay 3.7.3 routes and writes.

The rules are a port of dispatcher.c (dispatch_received_metrics); the proof
is a live relay (not -t, which skips the rewrite) sending random byte
strings to TCP sinks: every line must arrive exactly as relay_line predicts,
at exactly the members `carbonscale ring locate` names.
"""

from __future__ import annotations

import random
import subprocess
from collections import Counter

import pytest
from ansible_runner import BIN
from line_samples import random_name
from relay_oracle import needs_relay, relay_test_owners, write_cluster_config
from relay_sinks import Sinks, free_port, running_relay, send, wait_for

from carbonscale.relay_names import relay_key, relay_line, rewrite_block, split_lines
from carbonscale.ring import Ring, parse_member

# ----- the rules, from dispatcher.c -----------------------------------------


@pytest.mark.parametrize(
    ("line", "sent", "name"),
    [
        ("ä.ö.ü 1 2".encode(), b"__.__.__ 1 2", b"__.__.__"),  # every byte >= 0x80
        (b"disk.sda%.io(ms) 1 2", b"disk.sda_.io_ms_ 1 2", b"disk.sda_.io_ms_"),
        (b"a:b#c-d_e 1 2", b"a:b#c-d_e 1 2", b"a:b#c-d_e"),  # the default -c "-_:#"
        (b"..a...b. 1 2", b"a.b 1 2", b"a.b"),  # leading, repeated and trailing dots
        (b" \ta  \t 1   2", b"a 1 2", b"a"),  # leading blanks, tabs, repeated spaces
        (b"a.b;tag=x\xff..y 1 2", b"a.b;tag=x\xff.y 1 2", b"a.b"),  # tags: not rewritten
        (b"a.;t=1 1 2", b"a.;t=1 1 2", b"a."),  # a dot before the tags stays
        (b";t=1 1 2", b";t=1 1 2", b""),  # no name at all, still routed
        (b"a\x00b 1 2", b"a_b 1 2", b"a_b"),
        (b"a 1;x 2", b"a 1;x 2", b"a 1"),  # a ';' after the space ends the routed name
    ],
)
def test_relay_line_follows_the_dispatcher(line, sent, name):
    out, end = relay_line(line)
    assert out == sent
    assert out[:end] == name


@pytest.mark.parametrize(
    "line", [b"", b"   ", b"...", b"name.only", b"x" * 40000 + b" 1 2", b". . ."]
)
def test_relay_line_discards_what_the_relay_discards(line):
    assert relay_line(line) is None


def test_allowed_chars_and_tags_follow_the_c_option():
    assert relay_line(b"a%b;c 1 2", b"%") == (b"a%b;c 1 2", 3)
    # with ';' allowed there are no tags: it is part of the name
    assert relay_line(b"a%b;c 1 2", b";") == (b"a_b;c 1 2", 5)


ALPHABET = [bytes([b]) for b in range(256)] + [b"a", b"b", b".", b"..", b" ", b";", b"\t"] * 20


@pytest.mark.parametrize("allowed", [b"-_:#", b"-_:#;", b"%()", b""])
def test_fast_key_equals_the_dispatcher_port(allowed):
    """relay_key (whole-block regex passes) against relay_line (the byte loop)."""
    rng = random.Random(allowed)
    checked = 0
    for _ in range(50_000):
        line = b"".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24)))
        line = line.replace(b"\n", b"").replace(b"\r", b"")
        ref = relay_line(line, allowed) or relay_line(line + b" 1", allowed)
        expected = ref[0][: ref[1]] if ref else b""
        if b" " in expected:
            expected = b""  # "name value;..." is routed by no name locate can print
        assert relay_key(line, allowed) == expected, line
        checked += 1
    assert checked == 50_000


BLOCK_PIECES = [b"a", b"b", b".", b"..", b" ", b";", b"\t", b"x", b"\xc3\xa4", b"\r", b"%"]


@pytest.mark.parametrize("allowed", [b"-_:#", b"-_:#;"])
def test_a_block_gives_the_names_of_its_lines(allowed):
    """rewrite_block on many lines at once (the locate path) against relay_key per line."""
    rng = random.Random(allowed + b"block")
    for _ in range(20):
        lines = [b"".join(rng.choice(BLOCK_PIECES) for _ in range(12)) for _ in range(500)]
        pieces = [piece for line in lines for piece in split_lines(line)]
        expected = [key for key in (relay_key(piece, allowed) for piece in pieces) if key]
        block = rewrite_block(b"\n".join(lines), allowed)
        assert [line.split()[0] for line in block.splitlines() if line.split()] == expected


def test_rewrite_block_leaves_clean_blocks_alone_and_rewrites_the_rest():
    clean = b"".join(b"servers.web%d.cpu 1.5 1700000000\n" % i for i in range(1000))
    assert rewrite_block(clean) is clean
    dirty = clean + "ä.x 1 2\n\r\n...\n;t=1 1 2\n".encode()
    names = [line.split()[0] for line in rewrite_block(dirty).splitlines() if line.split()]
    assert names[:1000] == [b"servers.web%d.cpu" % i for i in range(1000)]
    assert names[1000:] == [b"__.x"]


# ----- the live relay ---------------------------------------------------------


def expected_lines(data: bytes) -> list[tuple[bytes, bytes]]:
    """(line as sent by the relay, routed name) for every line it accepts."""
    routed = []
    for line in split_lines(data):
        result = relay_line(line)
        if result is not None:
            routed.append((result[0], result[0][: result[1]]))
    return routed


@needs_relay
@pytest.mark.parametrize(
    ("hash_type", "replication"), [("carbon_ch", 1), ("fnv1a_ch", 2), ("jump_fnv1a_ch", 1)]
)
def test_live_relay_writes_where_locate_says(tmp_path, hash_type, replication):
    sinks = Sinks(5)
    try:
        members = [f"127.0.0.1:{port}=i{n}" for n, port in enumerate(sinks.ports)]
        port = free_port()
        config = write_cluster_config(tmp_path / "relay.conf", hash_type, replication, members)
        config.write_text(
            f"listen type linemode 127.0.0.1:{port} proto tcp ;\n" + config.read_text()
        )
        rng = random.Random(hash_type)
        data = b"".join(random_name(rng, i) + b" %d 1700000000\n" % i for i in range(10_000))
        routed = expected_lines(data)
        with running_relay(["-f", str(config), "-H", "test", "-w", "2"], port):
            send(port, data)
            total = len(routed) * replication
            arrived = wait_for(lambda: sum(len(sinks.lines(p)) for p in sinks.ports) >= total)
        received = {p: Counter(sinks.lines(p)) for p in sinks.ports}
    finally:
        sinks.close()
    assert arrived, "the relay did not deliver every line"

    locate = subprocess.run(
        [BIN / "carbonscale", "ring", "locate", "--relay-config", str(config)],
        input=data,
        capture_output=True,
        check=True,
    )
    owners = {}
    for row in locate.stdout.splitlines():
        name, *addresses = row.split(b"\t")
        owners[name] = [a.decode() for a in addresses]
    # Names locate cannot print (none, or "name value" from a ';' after the
    # space) are placed by the library's ring on the name the relay hashes.
    ring = Ring([parse_member(m) for m in members], hash_type, replication=replication)
    unprintable = Counter()
    expected = {p: Counter() for p in sinks.ports}
    for line, name in routed:
        if name and b" " not in name:
            where = owners[name]
        else:
            unprintable[line] += 1
            where = [ring.members[i].address for i in ring.locate_batch([name])[0]]
        for address in where:
            expected[int(address.rsplit(":", 1)[1])][line] += 1
    assert received == expected
    # What hashing the name as sent (the old locate, and -t) gets wrong.
    sent_names = [line.split()[0] for line in data.splitlines() if line.split()]
    rewritten = [relay_key(name) for name in sent_names]
    rows_raw = ring.locate_batch(sent_names)[:, 0]
    rows_rewritten = ring.locate_batch(rewritten)[:, 0]
    renamed = sum(a != b for a, b in zip(sent_names, rewritten, strict=True))
    misplaced = int((rows_raw != rows_rewritten).sum())
    print(
        f"{hash_type}: {len(routed)} of 10000 lines routed, {sum(unprintable.values())} without "
        f"a printable name, 0 differences; {renamed} names renamed by the relay, "
        f"{misplaced} of them on another member than their raw name hashes to"
    )
    assert len(routed) > 9_800
    assert misplaced > 1_000  # the test would fail against a locate without the rewrite


@needs_relay
def test_raw_names_is_what_the_relay_test_mode_does(tmp_path):
    """-t skips the rewrite: --raw-names agrees with it, the default with -t on rewritten names."""
    config = write_cluster_config(
        tmp_path / "relay.conf", "fnv1a_ch", 1, [f"10.0.0.{i}:2003=n{i}" for i in range(1, 9)]
    )
    names = [f"servers.{w}.ünï{i}" for i in range(300) for w in ("web", "db")]
    relay_raw = relay_test_owners(config, names)
    relay_rewritten = relay_test_owners(config, [relay_key(n.encode()).decode() for n in names])

    def locate(*flags):
        out = subprocess.run(
            [BIN / "carbonscale", "ring", "locate", *flags, "--relay-config", str(config)],
            input="\n".join(names).encode() + b"\n",
            capture_output=True,
            check=True,
        ).stdout.decode()
        return {row.split("\t")[0]: row.split("\t")[1:] for row in out.splitlines()}

    assert locate("--raw-names") == relay_raw
    assert locate() == relay_rewritten
    assert locate() != {relay_key(k.encode()).decode(): v for k, v in relay_raw.items()}


def test_locate_takes_any_bytes_in_relay_mode():
    """Invalid UTF-8 is routed by the relay (as '_'), so locate answers for it."""
    result = subprocess.run(
        [BIN / "carbonscale", "ring", "locate", "--hash", "fnv1a_ch", "a", "b"],
        input=b"ok\n\xff\xfe.bad 1 2\n",
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [row.split(b"\t")[0] for row in result.stdout.splitlines()] == [b"ok", b"__.bad"]


def test_allowed_chars_is_the_relays_c_option():
    def first_fields(*flags: str) -> list[bytes]:
        result = subprocess.run(
            [BIN / "carbonscale", "ring", "locate", "--hash", "carbon_ch", *flags, "a", "b"],
            input=b"a%b:c 1 2\n",
            capture_output=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return [row.split(b"\t")[0] for row in result.stdout.splitlines()]

    assert first_fields() == [b"a_b:c"]
    assert first_fields("--allowed-chars", "%") == [b"a%b_c"]
    assert first_fields("--compat", "carbon") == [b"a%b:c"]
    bad = subprocess.run(
        [BIN / "carbonscale", "ring", "locate", "--hash", "carbon_ch", "--allowed-chars", " ", "a"],
        input=b"x\n",
        capture_output=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith(b"carbonscale: error:") and b"Traceback" not in bad.stderr

"""Lines as clients really send them: random byte-string names, and lines
carbon-cache cannot store. Shared by the unit tests against a live relay
(test_relay_names.py, test_relay_role.py) and the cluster scenario's check
through the VIP (molecule/cluster/tests/test_names_and_bad_values.py).
"""

from __future__ import annotations

import random

UTF8 = ["ä", "ö", "ü", "ß", "é", "中文", "🚀", "Ωmega"]
PUNCT = [*"%()[]{}<>!?*+=,/\\|'\"`$&@~^ :#-_;", "\t", "  ", "\x00", "\x0b", "\x7f"]
WORDS = ["servers", "web01", "cpu", "load", "p99", "eu-west", "a", "x_y", "disk.sda"]


def random_name(rng: random.Random, index: int, line_breaks: bool = True) -> bytes:
    """A name of words, UTF-8, punctuation, invalid UTF-8 and empty components,
    ending in `.index`; with line_breaks, 1 in 100 holds a '\\n' or '\\r'."""
    parts = []
    for _ in range(rng.randint(1, 7)):
        roll = rng.random()
        if roll < 0.45:
            parts.append(rng.choice(WORDS).encode())
        elif roll < 0.6:
            parts.append(rng.choice(UTF8).encode())
        elif roll < 0.8:
            parts.append(rng.choice(PUNCT).encode())
        elif roll < 0.9:  # invalid UTF-8: lone continuation and lead bytes
            parts.append(bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(1, 3))))
        else:
            parts.append(b"")  # an empty component
    name = b"".join(part + rng.choice([b".", b".", b".", b"..", b""]) for part in parts)
    if rng.random() < 0.3:
        name = b"." + name
    if line_breaks and rng.random() < 0.01 and b";" not in name:
        # A line break inside: two lines, the first without a value (discarded).
        # Not with a ';': the relay keeps a discarded line's tag state for the
        # next line (dispatcher.c resets it only after routing a line).
        name = name.replace(b".", rng.choice([b"\n", b"\r"]), 1)
    return name + b".%d" % index


GOOD_VALUES = [b"1", b"-1.5", b"+3", b".5", b"7.", b"1e-7", b"1.5e+21", b"9.99e299", b"2E99"]
GOOD_VALUES += [b"1" + b"0" * 199, b"0.000001", b"-0", b"1e-400", b"-9.5e299"]
GOOD_TIMESTAMPS = [b"1700000000", b"1700000000.25", b"-1", b"1000000000", b"9999999999"]
BAD_VALUES = [b"inf", b"-inf", b"+inf", b"Infinity", b"nan", b"NaN", b"1e400", b"1e300"]
BAD_VALUES += [b"1" + b"0" * 200, b"12e299", b"1e+300", b"0x10", b"1_000", b"1,5", b"abc", b"\xff"]
BAD_TIMESTAMPS = [b"1e20", b"-5", b"0", b"999999999", b"10000000000", b"1.7e9", b"now", b"-1.5"]


def name_of_length(prefix: bytes, length: int) -> bytes:
    """prefix, then components of 'c's (200 at most) up to exactly length bytes."""
    name = prefix.rstrip(b".")
    while len(name) < length:
        room = length - len(name) - (1 if name else 0)
        # Never leave room for only a dot: the last component gets at least 2 bytes.
        take = room if room <= 200 else min(200, room - 2)
        name += (b"." if name else b"") + b"c" * take
    return name


def good_and_bad_lines(
    prefix: bytes = b"", timestamp: bytes = b"1700000000"
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(lines carbon-cache stores, lines it cannot, lines the relay discards itself),
    every name under prefix (b"" or ending in '.')."""
    ok, bad_ = prefix + b"ok.", prefix + b"bad."
    good = [ok + b"value.%d %s %s" % (i, v, timestamp) for i, v in enumerate(GOOD_VALUES)]
    good += [ok + b"ts.%d 1 %s" % (i, t) for i, t in enumerate(GOOD_TIMESTAMPS)]
    good += [
        ok + b"tagged;dc=eu;role=web 1 " + timestamp,
        ok + "rewritten.äöü.(x)%y 1 ".encode() + timestamp,
        ok + b"d" * 255 + b"." + b"f" * 251 + b" 1 " + timestamp,  # longest components
        name_of_length(ok + b"long.", 1024) + b" 1 " + timestamp,  # the longest name
    ]
    bad = [bad_ + b"value.%d %s %s" % (i, v, timestamp) for i, v in enumerate(BAD_VALUES)]
    bad += [bad_ + b"ts.%d 1 %s" % (i, t) for i, t in enumerate(BAD_TIMESTAMPS)]
    bad += [
        bad_ + b"no.timestamp 1",
        bad_ + b"extra.field 1 " + timestamp + b" 1",
        bad_ + b"d" * 256 + b".x 1 " + timestamp,  # a directory name over 255 bytes
        bad_ + b"f" * 252 + b" 1 " + timestamp,  # a file name over 255 with .wsp
        name_of_length(bad_ + b"long.", 1025) + b" 1 " + timestamp,  # a byte too long
        name_of_length(bad_ + b"huge.", 10_240) + b" 1 " + timestamp,  # a 10 KB name
        b";dc=eu 1 " + timestamp,  # tags without a name
        bad_ + b"semicolon 1;x=1 " + timestamp,  # routed by "bad.semicolon 1"
    ]
    discarded = [bad_ + b"no.value", b"", b"   "]
    return good, bad, discarded

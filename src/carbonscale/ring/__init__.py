"""Consistent-hash ring placement, bit-exact with carbon-c-relay and carbon.

Three hash types exist in the wild under the same names, and two
implementations resolve them differently (see shared/reference/hashing.md):

* ``carbon_ch``: position = first two bytes of MD5, 100 ring entries a member,
  keyed by the Python repr of ``(host, instance)`` plus ``:i``.
* ``fnv1a_ch``: position = 32-bit FNV-1a folded to 16 bits; entry keys
  ``"i-instance"`` (carbon-c-relay: ``"i-host:port"`` without an instance).
* ``jump_fnv1a_ch``: 64-bit FNV-1a of the metric, then Google's jump hash
  over the members in carbon-c-relay's bucket order (carbon has no jump).

Compat ``carbon-c-relay`` (the relay we deploy, 3.7.3): entries sorted by
(position, host, instance or port); every run of equal positions points at
its first entry; metric bytes are read through a signed ``char``; replicas
are distinct members. Compat ``carbon`` (the Python relay): a taken position
moves +1 until free, in member order; replicas skip servers already used when
``diverse_replicas`` (carbon's DIVERSE_REPLICAS, default True).

Public interface (other modules import these; keep them stable):

* ``parse_member(text) -> Member`` and ``Member`` (host, port, instance)
* ``Ring(members, hash_type, compat, replication, diverse_replicas)`` with
  ``locate(name) -> list[Member]`` and ``locate_batch(names) -> ndarray``
  (member indices, shape (n, replication), primary first)
* ``fnv1a_64(data, signed_char=False)``, ``fnv1a_64_batch(names, ...)``,
  ``jump_hash(key, buckets)``, ``jump_hash_batch(keys, buckets)``,
  ``xorshift64(key)``: the statsd relay hashes with these (StatsRelay reads
  bytes unsigned: ``signed_char=False``).
* ``parse_relay_config(text) -> dict[str, ClusterSpec]`` for carbon-c-relay
  configurations.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from carbonscale import CarbonscaleError

try:  # the per-name loops in C; the numpy batch functions below are its twin
    from carbonscale import _ringhash
except ImportError:  # pragma: no cover - an install without the extension
    _ringhash = None

HASH_TYPES = ("carbon_ch", "fnv1a_ch", "jump_fnv1a_ch")
COMPATS = ("carbon-c-relay", "carbon")
DEFAULT_PORT = 2003
RING_REPLICAS = 100
# carbon-c-relay's CONN_DESTS_SIZE: members a cluster may have. 64 in 3.7.3 and
# upstream router.h (measured: 65 members make 3.7.3 print "nodes in use
# exceeds CONN_DESTS_SIZE" and abort), although shared/reference says 128.
RELAY_MAX_MEMBERS = 64
POSITIONS = 65536

FNV32_OFFSET = 0x811C9DC5
FNV32_PRIME = 0x01000193
FNV64_OFFSET = 14695981039346656037
FNV64_PRIME = 1099511628211
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
JUMP_MULTIPLIER = 2862933555777941757
XORSHIFT_MULTIPLIER = 2685821657736338717


# --------------------------------------------------------------------------
# Members


@dataclass(frozen=True)
class Member:
    """A ring member: where metrics go (host:port) and what is hashed (host, instance)."""

    host: str
    port: int = DEFAULT_PORT
    instance: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` as carbon-c-relay prints it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def relay_syntax(self) -> str:
        """``host:port[=instance]``, carbon-c-relay's cluster member syntax."""
        return self.address + (f"={self.instance}" if self.instance is not None else "")

    def __str__(self) -> str:
        return self.relay_syntax


_PORT_RE = re.compile(r"[0-9]{1,5}")


def _port(text: str, member: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 0 < int(text) < 65536:
        raise CarbonscaleError(f"member {member!r}: port {text!r} is not a number in 1-65535")
    return int(text)


def parse_member(text: str) -> Member:
    """Parse ``host[:port][=instance]``, ``host:port[:instance]`` or ``[v6]:port...``."""
    raw = text.strip()
    if not raw or any(ch.isspace() for ch in raw):
        raise CarbonscaleError(f"member {text!r}: empty or contains whitespace")
    instance: str | None = None
    rest = raw
    if "=" in rest:
        rest, _, instance = rest.partition("=")
        if not instance:
            raise CarbonscaleError(f"member {text!r}: empty instance after '='")
    if rest.startswith("["):
        host, sep, after = rest[1:].partition("]")
        if not sep or not host:
            raise CarbonscaleError(f"member {text!r}: unclosed '[' in IPv6 address")
        port = DEFAULT_PORT
        if after:
            if not after.startswith(":"):
                raise CarbonscaleError(f"member {text!r}: expected ':port' after ']'")
            port_text, _, carbon_instance = after[1:].partition(":")
            port = _port(port_text, text)
            if carbon_instance:
                if instance is not None:
                    raise CarbonscaleError(f"member {text!r}: two instances given")
                instance = carbon_instance
        return Member(host, port, instance)
    parts = rest.split(":")
    if len(parts) > 3 or (len(parts) == 3 and instance is not None):
        raise CarbonscaleError(f"member {text!r}: too many ':' (IPv6 addresses need [brackets])")
    host = parts[0]
    if not host:
        raise CarbonscaleError(f"member {text!r}: empty host")
    port = _port(parts[1], text) if len(parts) >= 2 else DEFAULT_PORT
    if len(parts) == 3:
        if not parts[2]:
            raise CarbonscaleError(f"member {text!r}: empty instance after the port")
        instance = parts[2]
    return Member(host, port, instance)


# --------------------------------------------------------------------------
# Hash primitives (scalar and numpy batch forms)


def _byte_operand(byte: int, signed_char: bool, mask: int) -> int:
    """What carbon-c-relay XORs in: a `char`, signed on x86, sign-extended to the hash width."""
    if signed_char and byte >= 0x80:
        return (mask & ~0xFF) | byte
    return byte


def fnv1a_32(data: bytes, signed_char: bool = False) -> int:
    h = FNV32_OFFSET
    for byte in data:
        h = ((h ^ _byte_operand(byte, signed_char, MASK32)) * FNV32_PRIME) & MASK32
    return h


def fnv1a_64(data: bytes, signed_char: bool = False) -> int:
    """64-bit FNV-1a. carbon-c-relay 3.7.3 sign-extends bytes >= 0x80 to all 64 bits
    (measured against its -t output; the 32-bit-only extension of older sources
    places non-ASCII names differently)."""
    h = FNV64_OFFSET
    for byte in data:
        h = ((h ^ _byte_operand(byte, signed_char, MASK64)) * FNV64_PRIME) & MASK64
    return h


def fnv1a_position(data: bytes, signed_char: bool = False) -> int:
    h = fnv1a_32(data, signed_char)
    return (h >> 16) ^ (h & 0xFFFF)


def md5_position(data: bytes) -> int:
    digest = hashlib.md5(data).digest()
    return (digest[0] << 8) | digest[1]


def jump_hash(key: int, buckets: int) -> int:
    """Google's jump consistent hash as carbon-c-relay computes it (doubles)."""
    if buckets <= 0:
        raise ValueError("jump_hash needs at least one bucket")
    b, j = -1, 0
    key &= MASK64
    while j < buckets:
        b = j
        key = (key * JUMP_MULTIPLIER + 1) & MASK64
        j = int(float(b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def xorshift64(key: int) -> int:
    """The rehash carbon-c-relay applies between jump replicas."""
    key ^= key >> 12
    key ^= (key << 25) & MASK64
    key ^= key >> 27
    return (key * XORSHIFT_MULTIPLIER) & MASK64


def _fnv1a_batch(names: Sequence[bytes], bits: int, signed_char: bool) -> np.ndarray:
    """FNV-1a of many names at once, column by column within groups of equal length.

    Equal lengths need no padding: each group is gathered from one joined
    buffer as a (length, count) matrix whose rows are byte columns, so each
    step is one contiguous numpy operation over the whole group.
    """
    dtype = np.uint32 if bits == 32 else np.uint64
    offset, prime = (FNV32_OFFSET, FNV32_PRIME) if bits == 32 else (FNV64_OFFSET, FNV64_PRIME)
    count = len(names)
    result = np.full(count, offset, dtype=dtype)
    if not count:
        return result
    lengths = np.fromiter(map(len, names), dtype=np.int64, count=count)
    flat = np.frombuffer(b"".join(names), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    bounds = np.flatnonzero(np.diff(sorted_lengths)) + 1
    group_starts = np.concatenate(([0], bounds)).tolist()
    group_ends = np.concatenate((bounds, [count])).tolist()
    wide = np.int32 if bits == 32 else np.int64
    prime_arr = dtype(prime)
    with np.errstate(over="ignore"):
        for first, last in zip(group_starts, group_ends, strict=True):
            width = int(sorted_lengths[first])
            if width == 0:
                continue
            rows = order[first:last]
            columns = flat[np.arange(width)[:, None] + starts[rows]]
            if signed_char:
                # carbon-c-relay reads a signed char, sign-extended to the hash width.
                columns = columns.view(np.int8).astype(wide).view(dtype)
            else:
                columns = columns.astype(dtype)
            h = np.full(len(rows), offset, dtype=dtype)
            for column in columns:
                h ^= column
                h *= prime_arr
            result[rows] = h
    return result


def fnv1a_32_batch(names: Sequence[bytes], signed_char: bool = False) -> np.ndarray:
    if _ringhash is not None:
        return np.frombuffer(_ringhash.fnv1a(list(names), 32, signed_char), dtype=np.uint32)
    return _fnv1a_batch(names, 32, signed_char)


def fnv1a_64_batch(names: Sequence[bytes], signed_char: bool = False) -> np.ndarray:
    if _ringhash is not None:
        return np.frombuffer(_ringhash.fnv1a(list(names), 64, signed_char), dtype=np.uint64)
    return _fnv1a_batch(names, 64, signed_char)


def jump_hash_batch(keys: np.ndarray, buckets: int) -> np.ndarray:
    """jump_hash over an array of uint64 keys (same doubles, same truncation).

    b and j stay doubles (they are small integers, exactly representable):
    floor() of the positive product is the C cast. Keys whose jump left the
    range are done and dropped from the working arrays.
    """
    if buckets <= 0:
        raise ValueError("jump_hash needs at least one bucket")
    result = np.empty(keys.shape, dtype=np.int64)
    idx = np.arange(keys.size)
    key = keys.astype(np.uint64, copy=True)
    j = np.zeros(keys.shape, dtype=np.float64)
    b = j
    mult, one, shift = np.uint64(JUMP_MULTIPLIER), np.uint64(1), np.uint64(33)
    with np.errstate(over="ignore"):
        while idx.size:
            b = j
            key *= mult
            key += one
            den = (key >> shift).astype(np.float64)
            den += 1.0
            j = np.floor((b + 1.0) * (2147483648.0 / den))
            done = j >= buckets
            if done.any():
                result[idx[done]] = b[done]
                keep = ~done
                idx, key, b, j = idx[keep], key[keep], b[keep], j[keep]
    return result


def xorshift64_batch(keys: np.ndarray) -> np.ndarray:
    k = keys.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        k ^= k >> np.uint64(12)
        k ^= k << np.uint64(25)
        k ^= k >> np.uint64(27)
        k *= np.uint64(XORSHIFT_MULTIPLIER)
    return k


try:  # CPython's own MD5 beats OpenSSL's per-call overhead on short names
    from _md5 import md5 as _fast_md5
except ImportError:  # pragma: no cover - builds without the builtin module
    _fast_md5 = hashlib.md5


def md5_positions(names: Iterable[bytes]) -> np.ndarray:
    """carbon_ch positions (first two bytes of MD5) of many names."""
    if _ringhash is not None:
        return np.frombuffer(_ringhash.md5_positions(list(names)), dtype=np.int64)
    return _md5_positions_hashlib(names)


def _md5_positions_hashlib(names: Iterable[bytes]) -> np.ndarray:
    md5 = _fast_md5
    digests = b"".join([md5(n).digest() for n in names])
    pairs = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 16)[:, :2].astype(np.int64)
    return (pairs[:, 0] << 8) | pairs[:, 1]


# --------------------------------------------------------------------------
# carbon-c-relay's jump bucket order: its comparator is not a total order when
# numeric and non-numeric instances mix, so the order is whatever glibc 2.36's
# qsort (a top-down merge sort) makes of it. Emulate both exactly.

_C_SPACE = " \t\n\v\f\r"
_LONG_MAX = (1 << 63) - 1
_LONG_MIN = -(1 << 63)


def _strtol(text: bytes) -> tuple[int, bool]:
    """(value, whole string consumed) as C's strtol(s, &end, 10) with *end == 0."""
    i = 0
    while i < len(text) and chr(text[i]) in _C_SPACE:
        i += 1
    sign = 1
    if i < len(text) and text[i] in b"+-":
        sign = -1 if text[i] == ord("-") else 1
        i += 1
    start = i
    while i < len(text) and 0x30 <= text[i] <= 0x39:
        i += 1
    if i == start:
        # No digits: strtol sets end to the start of the string.
        return 0, len(text) == 0
    value = max(_LONG_MIN, min(_LONG_MAX, sign * int(text[start:i])))
    return value, i == len(text)


def _to_int32(value: int) -> int:
    value &= MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def relay_canonical(member: Member) -> Member:
    """The member as carbon-c-relay's config parser keeps it.

    Its lexer reads an all-digit instance as an integer into a C int (strtol,
    then 32-bit truncation) and hashes the printed number: "054" is "54",
    "4294967296" is "0". Signed or non-digit instances are kept as written.
    """
    instance = member.instance
    if instance is None or not instance.isascii() or not instance.isdigit():
        return member
    canonical = str(_to_int32(min(int(instance), _LONG_MAX)))
    return member if canonical == instance else Member(member.host, member.port, canonical)


def _jump_cmp(left: tuple[int, Member], right: tuple[int, Member]) -> int:
    """carbon-c-relay's entrycmp_jump_fnv1a on (config index, member)."""
    (pos_l, m_l), (pos_r, m_r) = left, right
    if m_l.instance is None and m_r.instance is None:
        return pos_l - pos_r
    if m_l.instance is None:
        return 1
    if m_r.instance is None:
        return -1
    inst_l, inst_r = m_l.instance.encode(), m_r.instance.encode()
    val_l, whole_l = _strtol(inst_l)
    if whole_l:
        val_r, whole_r = _strtol(inst_r)
        if whole_r:
            diff = (val_l - val_r) & MASK64  # C's long subtraction wraps
            return _to_int32(diff)
    return (inst_l > inst_r) - (inst_l < inst_r)


def _glibc_msort(items: list, cmp) -> list:
    """glibc 2.36 msort_with_tmp: n1 = n/2 left, merge takes left on cmp <= 0."""
    if len(items) <= 1:
        return list(items)
    half = len(items) // 2
    left, right = _glibc_msort(items[:half], cmp), _glibc_msort(items[half:], cmp)
    merged, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        if cmp(left[i], right[j]) <= 0:
            merged.append(left[i])
            i += 1
        else:
            merged.append(right[j])
            j += 1
    return merged + left[i:] + right[j:]


def jump_bucket_order(members: Sequence[Member]) -> list[int]:
    """Member indices in carbon-c-relay's jump bucket order."""
    entries = list(enumerate(members))
    return [index for index, _ in _glibc_msort(entries, _jump_cmp)]


# --------------------------------------------------------------------------
# The ring


def _carbon_key(host: str, instance: str | None) -> str:
    """carbon's ring key prefix: the Python repr of the (server, instance) tuple."""
    return str((host, instance))


def _relay_key(host: str, instance: str | None) -> str:
    """carbon-c-relay's imitation of that repr (always single quotes, no escaping)."""
    return f"('{host}', {'None' if instance is None else chr(39) + instance + chr(39)})"


class Ring:
    """Placement of metric names onto members for one hash type and compat mode."""

    def __init__(
        self,
        members: Sequence[Member | str],
        hash_type: str = "carbon_ch",
        compat: str = "carbon-c-relay",
        replication: int = 1,
        diverse_replicas: bool = True,
    ) -> None:
        if hash_type not in HASH_TYPES:
            raise CarbonscaleError(
                f"unknown hash {hash_type!r}: choose one of {', '.join(HASH_TYPES)}"
            )
        if compat not in COMPATS:
            raise CarbonscaleError(f"unknown compat {compat!r}: choose one of {', '.join(COMPATS)}")
        if compat == "carbon" and hash_type == "jump_fnv1a_ch":
            raise CarbonscaleError(
                "jump_fnv1a_ch exists only in carbon-c-relay; carbon has no jump hash"
            )
        parsed = [m if isinstance(m, Member) else parse_member(m) for m in members]
        if compat == "carbon-c-relay":
            parsed = [relay_canonical(m) for m in parsed]
        self.members = parsed
        self.hash_type = hash_type
        self.compat = compat
        self.replication = replication
        self.diverse_replicas = diverse_replicas and compat == "carbon"
        self._validate()
        self.signed_char = compat == "carbon-c-relay"
        if hash_type == "jump_fnv1a_ch":
            self.bucket_order = np.array(jump_bucket_order(self.members), dtype=np.int64)
        else:
            self._build_ring()

    # ----- validation

    def _validate(self) -> None:
        if not self.members:
            raise CarbonscaleError("a ring needs at least one member")
        if self.compat == "carbon-c-relay" and len(self.members) > RELAY_MAX_MEMBERS:
            raise CarbonscaleError(
                f"{len(self.members)} members: carbon-c-relay accepts at most "
                f"{RELAY_MAX_MEMBERS} in one cluster (CONN_DESTS_SIZE); split the ring "
                f"or use --compat carbon"
            )
        seen: dict[tuple, Member] = {}
        for member in self.members:
            # carbon keys destinations by (server, instance); the relay by the line.
            key = (
                (member.host, member.instance)
                if self.compat == "carbon"
                else (member.host, member.port, member.instance)
            )
            if key in seen:
                raise CarbonscaleError(f"duplicate member {member} (same as {seen[key]})")
            seen[key] = member
        if not isinstance(self.replication, int) or self.replication < 1:
            raise CarbonscaleError(f"replication must be >= 1, got {self.replication}")
        if self.replication > len(self.members):
            raise CarbonscaleError(
                f"replication {self.replication} is greater than the {len(self.members)} members"
            )
        if self.diverse_replicas:
            hosts = len({m.host for m in self.members})
            if self.replication > hosts:
                raise CarbonscaleError(
                    f"replication {self.replication} with DIVERSE_REPLICAS needs "
                    f"{self.replication} distinct hosts, the members have {hosts}"
                )

    # ----- ring construction (carbon_ch, fnv1a_ch)

    def _entry_key(self, member: Member, replica: int) -> bytes:
        if self.hash_type == "carbon_ch":
            prefix = (
                _carbon_key(member.host, member.instance)
                if self.compat == "carbon"
                else _relay_key(member.host, member.instance)
            )
            return f"{prefix}:{replica}".encode()
        if self.compat == "carbon":
            return f"{replica}-{member.instance}".encode()
        if member.instance is None:
            return f"{replica}-{member.host}:{member.port}".encode()
        return f"{replica}-{member.instance}".encode()

    def _position(self, key: bytes) -> int:
        if self.hash_type == "carbon_ch":
            return md5_position(key)
        return fnv1a_position(key, self.compat == "carbon-c-relay")

    def _build_ring(self) -> None:
        if self.compat == "carbon":
            positions: list[int] = []
            owners: list[int] = []
            taken: set[int] = set()
            for index, member in enumerate(self.members):
                for replica in range(RING_REPLICAS):
                    pos = self._position(self._entry_key(member, replica))
                    while pos in taken:
                        pos += 1
                    taken.add(pos)
                    at = bisect_left(positions, pos)
                    positions.insert(at, pos)
                    owners.insert(at, index)
            self.collisions = 0
        else:
            entries = []
            for index, member in enumerate(self.members):
                # Ties on position sort by host, then (carbon_ch) instance with
                # a missing one last, or (fnv1a_ch) port.
                if self.hash_type == "fnv1a_ch":
                    tiebreak: tuple = (member.port,)
                elif member.instance is None:
                    tiebreak = (1, b"")
                else:
                    tiebreak = (0, member.instance.encode())
                for replica in range(RING_REPLICAS):
                    pos = self._position(self._entry_key(member, replica))
                    entries.append((pos, member.host.encode(), tiebreak, index))
            # glibc's qsort here is a stable merge sort; so is Python's sort.
            entries.sort(key=lambda e: e[:3])
            positions = [e[0] for e in entries]
            owners = [e[3] for e in entries]
            self.collisions = 0
            for i in range(1, len(entries)):
                if positions[i] == positions[i - 1]:
                    owners[i] = owners[i - 1]
                    self.collisions += 1
        self.ring_positions = np.array(positions, dtype=np.int64)
        self.ring_owners = np.array(owners, dtype=np.int64)
        self._owner_rows = self._walk_all()
        # Metric positions are 16-bit: precompute the start entry of each.
        starts = np.searchsorted(self.ring_positions, np.arange(POSITIONS), side="left")
        starts[starts >= len(positions)] = 0
        self._start_of_position = starts

    def _walk_all(self) -> np.ndarray:
        """Owner indices for a walk starting at each ring entry: shape (entries, R)."""
        n = len(self.ring_owners)
        owners = self.ring_owners.tolist()
        rows = np.empty((n, self.replication), dtype=np.int64)
        for start in range(n):
            rows[start] = self._walk(owners, start, n)
        return rows

    def _walk(self, owners: list[int], start: int, n: int) -> list[int]:
        found: list[int] = []
        if self.compat == "carbon":
            # carbon's get_nodes stops one entry short of a full circle;
            # DIVERSE_REPLICAS then skips servers already used.
            last = (start - 1) % n
            index = start
            seen: set[int] = set()
            hosts: set[str] = set()
            while len(seen) < len(self.members) and index != last:
                owner = owners[index]
                if owner not in seen:
                    seen.add(owner)
                    host = self.members[owner].host
                    if not self.diverse_replicas or host not in hosts:
                        hosts.add(host)
                        found.append(owner)
                        if len(found) == self.replication:
                            return found
                index = (index + 1) % n
        else:
            for step in range(n):
                owner = owners[(start + step) % n]
                if owner not in found:
                    found.append(owner)
                    if len(found) == self.replication:
                        return found
        raise CarbonscaleError(
            f"the ring cannot give {self.replication} distinct owners: every position of "
            f"some members collides with another member's (try other instance names)"
        )

    # ----- lookups

    def positions(self, names: Sequence[bytes]) -> np.ndarray:
        """16-bit ring positions of metric names (carbon_ch and fnv1a_ch)."""
        if self.hash_type == "carbon_ch":
            return md5_positions(names)
        h = fnv1a_32_batch(names, self.signed_char).astype(np.int64)
        return (h >> 16) ^ (h & 0xFFFF)

    def locate_batch(self, names: Sequence[bytes]) -> np.ndarray:
        """Owner member indices for each name, shape (len(names), replication)."""
        if self.hash_type == "jump_fnv1a_ch":
            return self._jump_batch(names)
        return self._owner_rows[self._start_of_position[self.positions(names)]]

    def _jump_batch(self, names: Sequence[bytes]) -> np.ndarray:
        keys = fnv1a_64_batch(names, signed_char=True)
        if _ringhash is not None:
            packed = _ringhash.jump_replicas(
                keys.tobytes(), self.bucket_order.astype(np.int64).tobytes(), self.replication
            )
            return np.frombuffer(packed, dtype=np.int64).reshape(len(names), self.replication)
        return self._jump_replicas_numpy(keys)

    def _jump_replicas_numpy(self, keys: np.ndarray) -> np.ndarray:
        """carbon-c-relay's jump replicas: after each pick, the picked bucket takes
        the last bucket's member and the next jump runs over one bucket less.

        The per-name bucket lists are kept virtually: the base order plus the
        (slot, member) overrides the picks made, so no (names x members) matrix.
        """
        count = len(self.members)
        order = self.bucket_order
        result = np.empty((len(keys), self.replication), dtype=np.int64)
        overrides: list[tuple[np.ndarray, np.ndarray]] = []

        def member_at(slot: np.ndarray | int) -> np.ndarray:
            slots = np.broadcast_to(slot, keys.shape)
            value = order[slots]
            for where, member in overrides:
                value = np.where(slots == where, member, value)
            return value

        for replica in range(self.replication):
            alive = count - replica
            chosen = jump_hash_batch(keys, alive)
            result[:, replica] = member_at(chosen)
            if replica + 1 < self.replication:
                overrides.append((chosen, member_at(alive - 1)))
                keys = xorshift64_batch(keys)
        return result

    def locate(self, name: str | bytes) -> list[Member]:
        data = name.encode() if isinstance(name, str) else name
        return [self.members[i] for i in self.locate_batch([data])[0]]

    def shadowed_members(self) -> list[Member]:
        """Members that own no ring entry, so receive nothing.

        A member whose every ring key equals another's loses all collisions:
        with fnv1a_ch the key is the instance alone, so ``s1:2103=a`` and
        ``s2:2103=a`` collide on all 100 entries and s2 never gets a metric.
        carbon-c-relay accepts such a cluster silently; we say so.
        """
        if self.hash_type == "jump_fnv1a_ch":
            return []
        owning = set(self.ring_owners.tolist())
        return [m for i, m in enumerate(self.members) if i not in owning]

    def primary_share_of_positions(self) -> np.ndarray:
        """Fraction of the 65536 metric positions whose primary is each member."""
        if self.hash_type == "jump_fnv1a_ch":
            raise CarbonscaleError("jump_fnv1a_ch has no ring positions")
        primaries = self._owner_rows[self._start_of_position, 0]
        return np.bincount(primaries, minlength=len(self.members)) / POSITIONS


# --------------------------------------------------------------------------
# carbon-c-relay configuration files


@dataclass
class ClusterSpec:
    name: str
    hash_type: str
    replication: int = 1
    members: list[Member] = field(default_factory=list)

    def ring(self) -> Ring:
        return Ring(self.members, self.hash_type, "carbon-c-relay", self.replication)


# Options that may follow a member on its line, with how many arguments each takes.
_MEMBER_OPTIONS = {"proto": 1, "type": 1, "transport": 1, "ssl": 0, "mtls": 2}
_CLUSTER_KINDS = {"forward", "any_of", "failover", "file", "lb"}


def _tokens(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        # carbon-c-relay accepts any word quoted ("new" is the cluster new).
        out.extend(
            token[1:-1] if token.startswith('"') else token
            for token in re.findall(r'"[^"]*"|;|[^\s;]+', line)
        )
    return out


def parse_relay_config(text: str) -> dict[str, ClusterSpec]:
    """The consistent-hash clusters of a carbon-c-relay configuration, by name."""
    tokens = _tokens(text)
    clusters: dict[str, ClusterSpec] = {}
    i = 0
    while i < len(tokens):
        if tokens[i] != "cluster":
            i += 1
            continue
        if i + 2 >= len(tokens):
            raise CarbonscaleError("relay config: 'cluster' without a name and type")
        name, kind = tokens[i + 1], tokens[i + 2]
        end = tokens.index(";", i) if ";" in tokens[i:] else None
        if end is None:
            raise CarbonscaleError(f"relay config: cluster {name} is not closed with ';'")
        body = tokens[i + 3 : end]
        i = end + 1
        if kind not in HASH_TYPES:
            if kind not in _CLUSTER_KINDS:
                raise CarbonscaleError(f"relay config: cluster {name} has unknown type {kind!r}")
            continue
        spec = ClusterSpec(name, kind)
        j = 0
        if j < len(body) and body[j] == "replication":
            if j + 1 >= len(body) or not body[j + 1].isdigit():
                raise CarbonscaleError(f"relay config: cluster {name}: replication needs a number")
            spec.replication = int(body[j + 1])
            j += 2
        if j < len(body) and body[j] == "dynamic":
            j += 1
        while j < len(body):
            token = body[j]
            if token in _MEMBER_OPTIONS:
                j += 1 + _MEMBER_OPTIONS[token]
                continue
            spec.members.append(parse_member(token))
            j += 1
        if not spec.members:
            raise CarbonscaleError(f"relay config: cluster {name} has no members")
        clusters[name] = spec
    return clusters


def select_cluster(clusters: dict[str, ClusterSpec], name: str | None, source: str) -> ClusterSpec:
    """The cluster asked for, or the only consistent-hash cluster there is."""
    if not clusters:
        raise CarbonscaleError(f"{source}: no carbon_ch, fnv1a_ch or jump_fnv1a_ch cluster")
    if name is not None:
        if name not in clusters:
            raise CarbonscaleError(
                f"{source}: no consistent-hash cluster {name!r} (have: {', '.join(clusters)})"
            )
        return clusters[name]
    if len(clusters) > 1:
        raise CarbonscaleError(
            f"{source} has several consistent-hash clusters ({', '.join(clusters)}): "
            f"choose one with --cluster"
        )
    return next(iter(clusters.values()))


# --------------------------------------------------------------------------
# Balance: how evenly a carbon_ch ring spreads, and instance names that fix it


def position_spans(positions: np.ndarray) -> np.ndarray:
    """How many of the 65536 metric positions land on each (sorted) ring entry.

    A metric goes to the first entry at or after its position, wrapping to
    the first entry, so entry i owns (pos[i-1], pos[i]] and entry 0 also owns
    everything after the last entry.
    """
    capped = np.minimum(positions, POSITIONS - 1)  # carbon's +1 walk may pass 65535
    spans = np.diff(capped, prepend=capped[-1] - POSITIONS)
    return spans


def carbon_ch_shares(members: Sequence[Member], compat: str = "carbon-c-relay") -> np.ndarray:
    """Primary share of ring positions per member for carbon_ch, without a full Ring."""
    ring = Ring(members, "carbon_ch", compat, 1)
    return ring.primary_share_of_positions()


def _relay_entries(host: str, instance: str | None, replicas: int = RING_REPLICAS) -> np.ndarray:
    key = _relay_key(host, instance)
    return np.array([md5_position(f"{key}:{i}".encode()) for i in range(replicas)], np.int64)


def candidate_instances(limit: int) -> list[str]:
    """Short instance names to try: a..z, then aa..zz, ..."""
    names: list[str] = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    width = 1
    while len(names) < limit:
        for index in range(len(letters) ** width):
            name, rest = "", index
            for _ in range(width):
                rest, digit = divmod(rest, len(letters))
                name = letters[digit] + name
            names.append(name)
            if len(names) == limit:
                break
        width += 1
    return names


def _max_min(shares: np.ndarray) -> float:
    low = shares.min()
    return float("inf") if low == 0 else float(shares.max() / low)


def _shares_from_positions(positions: list[np.ndarray], count: int) -> np.ndarray:
    """carbon-c-relay carbon_ch primary shares from each member's entry positions."""
    pos = np.concatenate(positions)
    owner = np.repeat(np.arange(count), [p.size for p in positions])
    # Ties sort by host then instance in the relay; for a balance estimate the
    # first-listed owner of a tie is close enough and ties are rare (~1%).
    order = np.lexsort((owner, pos))
    pos, owner = pos[order], owner[order]
    spans = position_spans(pos)
    return np.bincount(owner, weights=spans, minlength=count) / POSITIONS


def suggest_instances(
    members: Sequence[Member], candidates: int = 702, rounds: int = 2
) -> tuple[list[Member], float, float]:
    """Instance names that even out a carbon_ch ring (buckytools' findhash idea).

    Hill-climbs one member at a time over `candidates` short names, keeping a
    name when it lowers the max/min primary share; names stay unique per host.
    Returns (members with suggested instances, max/min before, max/min after);
    both ratios are computed exactly with a full Ring.
    """
    current = list(members)
    before = _max_min(carbon_ch_shares(current))
    names = candidate_instances(candidates)
    cache: dict[tuple[str, str], np.ndarray] = {}

    def entries(host: str, instance: str | None) -> np.ndarray:
        if (host, instance) not in cache:
            cache[(host, instance)] = _relay_entries(host, instance)
        return cache[(host, instance)]

    positions = [entries(m.host, m.instance) for m in current]
    best_ratio = _max_min(_shares_from_positions(positions, len(current)))
    for _ in range(rounds):
        improved = False
        for index, member in enumerate(current):
            taken = {m.instance for m in current if m.host == member.host and m is not member}
            for name in names:
                if name in taken or name == member.instance:
                    continue
                trial = positions.copy()
                trial[index] = entries(member.host, name)
                ratio = _max_min(_shares_from_positions(trial, len(current)))
                if ratio < best_ratio - 1e-12:
                    best_ratio, positions = ratio, trial
                    current[index] = Member(member.host, member.port, name)
                    member = current[index]
                    improved = True
        if not improved:
            break
    after = _max_min(carbon_ch_shares(current))
    return current, before, after


# --------------------------------------------------------------------------
# Diff: what a member change moves


@dataclass
class RingDiff:
    """Running totals of old -> new placement over batches of names.

    A metric moves when its set of owners changes (a new replica order alone
    moves no data). `matrix` counts names by (old primary, new primary).
    """

    old: Ring
    new: Ring
    total: int = 0
    moved: int = 0
    matrix: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, names: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Account a batch; return (indices of moved names, old rows, new rows)."""
        old_rows, new_rows = self.old.locate_batch(names), self.new.locate_batch(names)
        pairs = np.stack([old_rows[:, 0], new_rows[:, 0]], axis=1)
        keys, counts = np.unique(pairs, axis=0, return_counts=True)
        for (src, dst), count in zip(keys.tolist(), counts.tolist(), strict=True):
            self.matrix[(src, dst)] = self.matrix.get((src, dst), 0) + count
        changed = np.nonzero((np.sort(old_rows, axis=1) != np.sort(new_rows, axis=1)).any(axis=1))[
            0
        ]
        self.total += len(names)
        self.moved += changed.size
        return changed, old_rows, new_rows

    @property
    def fraction(self) -> float:
        return self.moved / self.total if self.total else 0.0

    def matrix_by_label(self) -> dict[str, dict[str, int]]:
        """{old member: {new member: names}} with relay-syntax labels."""
        table: dict[str, dict[str, int]] = {}
        for (src, dst), count in sorted(self.matrix.items()):
            row = table.setdefault(self.old.members[src].relay_syntax, {})
            row[self.new.members[dst].relay_syntax] = count
        return table

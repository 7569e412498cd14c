"""Hash primitives of the three ring hashes, scalar and numpy batch forms.

The per-name loops run in C (`carbonscale._ringhash`) when it is built; the
numpy batch functions here are its twin and fallback. Every use of the C
extension goes through this module's `_ringhash`, so setting it to None
switches the whole ring (placement and `carbonscale ring locate`) to the twins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

try:  # the per-name loops in C; the numpy batch functions below are its twin
    from carbonscale import _ringhash
except ImportError:  # pragma: no cover - an install without the extension
    _ringhash = None

POSITIONS = 65536  # carbon_ch and fnv1a_ch place names on 16-bit positions
FNV32_OFFSET = 0x811C9DC5
FNV32_PRIME = 0x01000193
FNV64_OFFSET = 14695981039346656037
FNV64_PRIME = 1099511628211
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
JUMP_MULTIPLIER = 2862933555777941757
XORSHIFT_MULTIPLIER = 2685821657736338717


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


def jump_replicas(keys: np.ndarray, bucket_order: np.ndarray, replication: int) -> np.ndarray:
    """Member indices of `replication` jump replicas per 64-bit key, shape (keys, R),
    in C when built, else with `jump_replicas_numpy`."""
    if _ringhash is not None:
        packed = _ringhash.jump_replicas(
            keys.tobytes(), bucket_order.astype(np.int64).tobytes(), replication
        )
        return np.frombuffer(packed, dtype=np.int64).reshape(len(keys), replication)
    return jump_replicas_numpy(keys, bucket_order, replication)


def jump_replicas_numpy(keys: np.ndarray, order: np.ndarray, replication: int) -> np.ndarray:
    """carbon-c-relay's jump replicas: after each pick, the picked bucket takes
    the last bucket's member and the next jump runs over one bucket less.

    The per-name bucket lists are kept virtually: the base order plus the
    (slot, member) overrides the picks made, so no (names x members) matrix.
    """
    count = len(order)
    result = np.empty((len(keys), replication), dtype=np.int64)
    overrides: list[tuple[np.ndarray, np.ndarray]] = []

    def member_at(slot: np.ndarray | int) -> np.ndarray:
        slots = np.broadcast_to(slot, keys.shape)
        value = order[slots]
        for where, member in overrides:
            value = np.where(slots == where, member, value)
        return value

    for replica in range(replication):
        alive = count - replica
        chosen = jump_hash_batch(keys, alive)
        result[:, replica] = member_at(chosen)
        if replica + 1 < replication:
            overrides.append((chosen, member_at(alive - 1)))
            keys = xorshift64_batch(keys)
    return result

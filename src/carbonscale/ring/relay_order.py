"""carbon-c-relay's jump bucket order, and members as its config parser keeps them.

Its comparator is not a total order when numeric and non-numeric instances
mix, so the order is whatever glibc 2.36's qsort (a top-down merge sort) makes
of it. Emulate both exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from carbonscale.ring.hashes import MASK32, MASK64
from carbonscale.ring.members import Member

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

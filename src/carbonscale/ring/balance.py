"""How evenly a carbon_ch ring spreads, and instance names that fix it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from carbonscale.ring.hashes import POSITIONS, md5_position
from carbonscale.ring.members import Member
from carbonscale.ring.placement import RING_REPLICAS, Ring, _relay_key


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

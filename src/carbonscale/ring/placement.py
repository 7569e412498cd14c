"""The ring: placement of metric names onto members for one hash type and compat."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.ring import hashes
from carbonscale.ring.hashes import (
    POSITIONS,
    fnv1a_32_batch,
    fnv1a_64_batch,
    fnv1a_position,
    md5_position,
    md5_positions,
)
from carbonscale.ring.members import Member, parse_member
from carbonscale.ring.relay_order import jump_bucket_order, relay_canonical

HASH_TYPES = ("carbon_ch", "fnv1a_ch", "jump_fnv1a_ch")
COMPATS = ("carbon-c-relay", "carbon")
RING_REPLICAS = 100
# carbon-c-relay's CONN_DESTS_SIZE: members a cluster may have. 64 in 3.7.3 and
# upstream router.h (measured: 65 members make 3.7.3 print "nodes in use
# exceeds CONN_DESTS_SIZE" and abort), although shared/reference says 128.
RELAY_MAX_MEMBERS = 64


def setting_errors(hash_type: str, compat: str) -> list[str]:
    """What is wrong with a hash type and compat mode, one line each."""
    errors = []
    if hash_type not in HASH_TYPES:
        errors.append(f"unknown hash {hash_type!r}: choose one of {', '.join(HASH_TYPES)}")
    if compat not in COMPATS:
        errors.append(f"unknown compat {compat!r}: choose one of {', '.join(COMPATS)}")
    if compat == "carbon" and hash_type == "jump_fnv1a_ch":
        errors.append("jump_fnv1a_ch exists only in carbon-c-relay; carbon has no jump hash")
    return errors


def member_errors(
    members: Sequence[Member], compat: str, replication: int, diverse_replicas: bool
) -> list[str]:
    """What is wrong with a ring's members and replication, one line each: among
    them carbon-c-relay's limits (CONN_DESTS_SIZE members, distinct members,
    1 <= replication <= members). `diverse_replicas` is carbon's DIVERSE_REPLICAS."""
    errors = []
    if not members:
        errors.append("a ring needs at least one member")
    if compat == "carbon-c-relay" and len(members) > RELAY_MAX_MEMBERS:
        errors.append(
            f"{len(members)} members: carbon-c-relay accepts at most "
            f"{RELAY_MAX_MEMBERS} in one cluster (CONN_DESTS_SIZE); split the ring "
            f"or use --compat carbon"
        )
    seen: dict[tuple, Member] = {}
    for member in members:
        # carbon keys destinations by (server, instance); the relay by the line.
        key = (
            (member.host, member.instance)
            if compat == "carbon"
            else (member.host, member.port, member.instance)
        )
        if key in seen:
            errors.append(f"duplicate member {member} (same as {seen[key]})")
        else:
            seen[key] = member
    if not isinstance(replication, int) or replication < 1:
        errors.append(f"replication must be >= 1, got {replication}")
        return errors
    if members and replication > len(members):
        errors.append(f"replication {replication} is greater than the {len(members)} members")
    if diverse_replicas and members:
        hosts = len({m.host for m in members})
        if replication > hosts:
            errors.append(
                f"replication {replication} with DIVERSE_REPLICAS needs "
                f"{replication} distinct hosts, the members have {hosts}"
            )
    return errors


def ring_errors(
    members: Sequence[Member | str],
    hash_type: str = "carbon_ch",
    compat: str = "carbon-c-relay",
    replication: int = 1,
    diverse_replicas: bool = True,
) -> list[str]:
    """Every reason `Ring(members, hash_type, compat, replication, diverse_replicas)`
    would refuse, one line each (empty when it builds): what Ring raises first is
    the first of these. carbon-c-relay's limits live here once; the relay role
    checks its clusters with this (the carbon_ring_errors filter)."""
    errors = setting_errors(hash_type, compat)
    parsed = []
    for member in members:
        try:
            parsed.append(member if isinstance(member, Member) else parse_member(member))
        except CarbonscaleError as exc:
            errors.append(str(exc))
    if compat == "carbon-c-relay":
        parsed = [relay_canonical(m) for m in parsed]
    diverse = diverse_replicas and compat == "carbon"
    return errors + member_errors(parsed, compat, replication, diverse)


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
        errors = setting_errors(hash_type, compat)
        if errors:
            raise CarbonscaleError(errors[0])
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
        errors = member_errors(self.members, self.compat, self.replication, self.diverse_replicas)
        if errors:
            raise CarbonscaleError(errors[0])

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

    @property
    def key_kind(self) -> tuple:
        """What `placement_keys` computes: two rings of one kind read the same keys
        (two carbon_ch rings both place a name by its MD5 position)."""
        if self.hash_type == "carbon_ch":
            return ("md5_position",)
        if self.hash_type == "fnv1a_ch":
            return ("fnv1a_position", self.signed_char)
        return ("fnv1a_64", True)

    def placement_keys(self, names: Sequence[bytes]) -> np.ndarray:
        """All a name's placement depends on: its 16-bit position (carbon_ch,
        fnv1a_ch) or its 64-bit FNV-1a (jump_fnv1a_ch, bytes read signed as the
        relay does). `locate_keys` places them."""
        if self.hash_type == "jump_fnv1a_ch":
            return fnv1a_64_batch(names, signed_char=True)
        return self.positions(names)

    def locate_keys(self, keys: np.ndarray) -> np.ndarray:
        """Owner member indices of placement keys, shape (len(keys), replication)."""
        if self.hash_type == "jump_fnv1a_ch":
            return hashes.jump_replicas(keys, self.bucket_order, self.replication)
        return self._owner_rows[self._start_of_position[keys]]

    def locate_batch(self, names: Sequence[bytes]) -> np.ndarray:
        """Owner member indices for each name, shape (len(names), replication)."""
        return self.locate_keys(self.placement_keys(names))

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

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
  (member indices, shape (n, replication), primary first); the same in two
  steps, ``placement_keys(names)`` (what placement reads of a name, shared by
  rings of one ``key_kind``) then ``locate_keys(keys)``
* ``fnv1a_64(data, signed_char=False)``, ``fnv1a_64_batch(names, ...)``,
  ``jump_hash(key, buckets)``, ``jump_hash_batch(keys, buckets)``,
  ``xorshift64(key)``: the statsd relay hashes with these (StatsRelay reads
  bytes unsigned: ``signed_char=False``).
* ``parse_relay_config(text) -> dict[str, ClusterSpec]`` for carbon-c-relay
  configurations.

The package, one module per concern (import the names from here):

* ``members``: ``Member`` and ``parse_member``
* ``hashes``: the hash primitives, their numpy twins and the C extension
* ``relay_order``: carbon-c-relay's jump bucket order and instance canonicalisation
* ``placement``: ``Ring``
* ``relay_config``: ``parse_relay_config``, ``select_cluster``
* ``balance``: shares of a carbon_ch ring and ``suggest_instances``
* ``diff``: ``RingDiff``
* ``build`` (``make_ring``) and ``locate`` (``Locator``, ``read_names``) are the
  operator-facing layer over these, imported from their modules.
"""

from __future__ import annotations

from carbonscale.ring.balance import (
    candidate_instances,
    carbon_ch_shares,
    position_spans,
    suggest_instances,
)
from carbonscale.ring.diff import (
    RingDiff,
)
from carbonscale.ring.hashes import (
    FNV32_OFFSET,
    FNV32_PRIME,
    FNV64_OFFSET,
    FNV64_PRIME,
    JUMP_MULTIPLIER,
    MASK32,
    MASK64,
    POSITIONS,
    XORSHIFT_MULTIPLIER,
    _ringhash,
    fnv1a_32,
    fnv1a_32_batch,
    fnv1a_64,
    fnv1a_64_batch,
    fnv1a_position,
    jump_hash,
    jump_hash_batch,
    jump_replicas,
    jump_replicas_numpy,
    md5_position,
    md5_positions,
    xorshift64,
    xorshift64_batch,
)
from carbonscale.ring.members import (
    DEFAULT_PORT,
    Member,
    parse_member,
)
from carbonscale.ring.placement import (
    COMPATS,
    HASH_TYPES,
    RELAY_MAX_MEMBERS,
    RING_REPLICAS,
    Ring,
    member_errors,
    ring_errors,
    setting_errors,
)
from carbonscale.ring.relay_config import (
    ClusterSpec,
    parse_relay_config,
    select_cluster,
)
from carbonscale.ring.relay_order import (
    jump_bucket_order,
    relay_canonical,
)

__all__ = [
    "COMPATS",
    "DEFAULT_PORT",
    "FNV32_OFFSET",
    "FNV32_PRIME",
    "FNV64_OFFSET",
    "FNV64_PRIME",
    "HASH_TYPES",
    "JUMP_MULTIPLIER",
    "MASK32",
    "MASK64",
    "POSITIONS",
    "RELAY_MAX_MEMBERS",
    "RING_REPLICAS",
    "XORSHIFT_MULTIPLIER",
    "ClusterSpec",
    "Member",
    "Ring",
    "RingDiff",
    "_ringhash",
    "candidate_instances",
    "carbon_ch_shares",
    "fnv1a_32",
    "fnv1a_32_batch",
    "fnv1a_64",
    "fnv1a_64_batch",
    "fnv1a_position",
    "jump_bucket_order",
    "jump_hash",
    "jump_hash_batch",
    "jump_replicas",
    "jump_replicas_numpy",
    "md5_position",
    "md5_positions",
    "member_errors",
    "parse_member",
    "parse_relay_config",
    "position_spans",
    "relay_canonical",
    "ring_errors",
    "select_cluster",
    "setting_errors",
    "suggest_instances",
    "xorshift64",
    "xorshift64_batch",
]

"""carbon-c-relay configuration files: their consistent-hash clusters."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from carbonscale import CarbonscaleError
from carbonscale.ring.members import Member, parse_member
from carbonscale.ring.placement import HASH_TYPES, Ring


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

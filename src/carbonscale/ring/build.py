"""A Ring from what an operator gives: members and options, or a carbon-c-relay
config file; and the warning for members that can never receive a metric.

The `carbonscale ring` verbs, the carbon_ring module and the migration tools
all build their rings here, so they read members and relay configs one way.
"""

from __future__ import annotations

from collections.abc import Sequence

from carbonscale import CarbonscaleError
from carbonscale.ring import Ring, parse_member, parse_relay_config, select_cluster


def make_ring(
    members: Sequence[str],
    hash_type: str | None,
    compat: str,
    replication: int,
    relay_config: str | None = None,
    cluster: str | None = None,
    what: str = "",
) -> Ring:
    """A ring from members and options, or from a carbon-c-relay config file."""
    if relay_config:
        if members:
            raise CarbonscaleError(f"give {what}members or a relay config, not both")
        try:
            with open(relay_config, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise CarbonscaleError(
                f"cannot read relay config {relay_config}: {exc.strerror}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise CarbonscaleError(f"relay config {relay_config} is not valid UTF-8") from exc
        return select_cluster(parse_relay_config(text), cluster, relay_config).ring()
    if not hash_type:
        raise CarbonscaleError("--hash is required without a relay config")
    if not members:
        raise CarbonscaleError(f"no {what}members given")
    return Ring([parse_member(m) for m in members], hash_type, compat, replication)


def shadowed_warning(ring: Ring) -> str | None:
    """A warning naming members that can never receive a metric, if any."""
    shadowed = ring.shadowed_members()
    if not shadowed:
        return None
    why = " (fnv1a_ch hashes the instance alone: give every member its own instance)"
    return (
        f"{len(shadowed)} member(s) own no ring position and receive nothing: "
        + ", ".join(str(m) for m in shadowed)
        + (why if ring.hash_type == "fnv1a_ch" else "")
    )

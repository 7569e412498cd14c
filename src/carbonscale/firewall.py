"""Who may reach a storage node's carbon-cache ports: the sources of its firewall.

roles/carbon_storage renders an nftables table whose address sets come from
here (the Ansible filter `firewall_sources` is `sources_from_inventory`): the
`carbonscale_address` of every host in the given groups (relays, query and
storage by default), plus the operator's extra addresses and networks.

nftables refuses overlapping elements in one interval set ("conflicting
intervals"), and an operator's network often contains an inventory host, so
the sources are collapsed into the fewest disjoint networks first, split by
family (an `inet` table keeps IPv4 and IPv6 sets apart).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from carbonscale import CarbonscaleError
from carbonscale.inventory import host_address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_source(text: object, what: str) -> Network:
    """One address or network (CIDR, host bits zero) as a network; `what` names it in errors."""
    if not isinstance(text, str) or not text.strip():
        raise CarbonscaleError(f"{what}: expected an IP address or network, got {text!r}")
    try:
        return ipaddress.ip_network(text.strip().strip("[]"), strict=True)
    except ValueError as exc:
        # ip_network says "... has host bits set" for 10.0.0.1/8: likely a typo
        # for a host or a network, so it is refused rather than widened.
        raise CarbonscaleError(f"{what}: {text!r} is not an IP address or network ({exc})") from exc


def collapse(networks: Sequence[Network]) -> dict[str, list[str]]:
    """{'ipv4': [...], 'ipv6': [...]}: disjoint networks covering exactly `networks`,
    sorted, a single host written as a bare address (nft's own notation)."""
    found: dict[str, list[str]] = {"ipv4": [], "ipv6": []}
    for family, version in (("ipv4", 4), ("ipv6", 6)):
        same = [net for net in networks if net.version == version]
        for net in ipaddress.collapse_addresses(same):
            single = net.prefixlen == net.max_prefixlen
            found[family].append(str(net.network_address) if single else str(net))
    return found


def sources_from_inventory(
    groups: Mapping[str, Sequence[str]],
    group_names: Sequence[str],
    hostvars: Mapping,
    extra: Sequence[object] = (),
) -> dict[str, list[str]]:
    """The firewall's allowed sources: every host of `group_names` (a group the
    inventory does not have adds nobody) at its carbonscale_address, and
    `extra` addresses or networks, collapsed per family (see `collapse`)."""
    if isinstance(extra, str | bytes) or not isinstance(extra, Sequence):
        raise CarbonscaleError(f"allowed sources must be a list of addresses, got {extra!r}")
    networks: list[Network] = []
    for group in group_names:
        for host in groups.get(group) or []:
            address = host_address(host, hostvars, f"{group} host")
            networks.append(parse_source(address, f"{group} host {host} carbonscale_address"))
    for position, text in enumerate(extra):
        networks.append(parse_source(text, f"allowed sources[{position}]"))
    return collapse(networks)

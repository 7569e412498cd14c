"""What the Ansible inventory says about a host, read one way by every filter.

The ring members (filter carbon_ring_members), the statsd relay's backends
(filter statsd_backends) and the LVS real servers (filter
carbonscale_addresses) all reach a host at `host_address`.
"""

from __future__ import annotations

from collections.abc import Mapping

from carbonscale import CarbonscaleError


def host_address(host: str, hostvars: Mapping, what: str = "host") -> str:
    """The address other tiers reach `host` at: carbonscale_address, else the
    gathered default IPv4 address. `what` names the host in errors ("storage
    host")."""
    if host not in hostvars:
        raise CarbonscaleError(f"{what} {host} is not in the inventory")
    found = hostvars[host]
    address = found.get("carbonscale_address") or (
        (found.get("ansible_default_ipv4") or {}).get("address")
    )
    if not address:
        raise CarbonscaleError(
            f"{what} {host} has no carbonscale_address (and no gathered default IPv4 "
            "address): set carbonscale_address in the inventory"
        )
    return str(address)


def bracket(address: str) -> str:
    """An IPv6 address in brackets, for `host:port` syntax; others unchanged."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address

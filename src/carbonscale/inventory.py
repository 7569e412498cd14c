"""What the Ansible inventory says about a host, read one way by every filter.

The ring members (filter carbon_ring_members), the statsd relay's backends
(filter statsd_backends) and the LVS real servers (filter
carbonscale_addresses) all reach a host at `host_address`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from carbonscale import CarbonscaleError
from carbonscale.relay.statsd.backends import parse_backend, parse_backends


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


def backends_from_inventory(
    hosts: Sequence[str], hostvars: Mapping, default_instances: Sequence[Mapping] | None = None
) -> list[str]:
    """Backend specs of the statsd daemons on `hosts`, in inventory order.

    For each host (in the given order), each entry of its `statsd_instances`
    (`{name, port, admin_port}`, in list order; `default_instances` when the
    host does not set it) becomes `<carbonscale_address>:<port>:<admin_port>`
    (the default IPv4 address when carbonscale_address is unset). Every relay
    derives the same list from the same inventory, so they all hash alike.
    The Ansible filter `statsd_backends` is this function.
    """
    specs: list[str] = []
    for host in hosts:
        address = bracket(host_address(host, hostvars, "statsd host"))
        hv = hostvars[host]
        instances = hv.get("statsd_instances") or default_instances
        if not instances:
            raise CarbonscaleError(f"statsd host {host}: statsd_instances is not set or empty")
        for position, inst in enumerate(instances):
            where = f"statsd host {host}: statsd_instances[{position}]"
            if not isinstance(inst, Mapping):
                raise CarbonscaleError(f"{where} must be a mapping with name, port, admin_port")
            ports = inst.get("port"), inst.get("admin_port")
            if not all(isinstance(p, int) and not isinstance(p, bool) for p in ports):
                raise CarbonscaleError(f"{where} needs integer port and admin_port, got {ports}")
            specs.append(parse_backend(f"{address}:{ports[0]}:{ports[1]}").spec)
    parse_backends(specs)
    return specs

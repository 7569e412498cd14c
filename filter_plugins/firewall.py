"""Ansible filter over carbonscale.firewall: who may reach the storage ports.

    {{ groups | firewall_sources(['relays', 'query', 'storage'], hostvars, ['10.9.0.0/16']) }}
      -> {"ipv4": ["10.0.0.21", "10.0.0.22", "10.9.0.0/16"], "ipv6": []}

Each host of the groups at its carbonscale_address, plus the extra addresses
and networks, collapsed into disjoint networks per family (nftables refuses
overlapping interval elements). Runs on the controller with the project
venv's python.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

try:
    from carbonscale import CarbonscaleError
    from carbonscale.firewall import sources_from_inventory

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the controller's python
    IMPORT_ERROR = exc


def firewall_sources(groups, group_names, hostvars, extra=()) -> dict[str, list[str]]:
    if IMPORT_ERROR is not None:
        raise AnsibleFilterError(
            "the firewall_sources filter needs the carbonscale package in the python that "
            f"runs ansible ({IMPORT_ERROR}); run ansible from the project venv (make venv)"
        )
    try:
        return sources_from_inventory(groups, group_names, hostvars, extra)
    except CarbonscaleError as exc:
        raise AnsibleFilterError(f"firewall_sources: {exc}") from exc


class FilterModule:
    def filters(self):
        return {"firewall_sources": firewall_sources}

"""Ansible filter over carbonscale.inventory: the addresses other tiers reach hosts at.

    {{ groups['relays'] | carbonscale_addresses(hostvars) }}
      -> ["10.0.0.21", "10.0.0.22"]

Each host's carbonscale_address, else its gathered default IPv4 address, in
the order given: the same rule as the ring members and the statsd backends.
Runs on the controller with the project venv's python.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

try:
    from carbonscale import CarbonscaleError
    from carbonscale.inventory import host_address

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the controller's python
    IMPORT_ERROR = exc


def carbonscale_addresses(hosts, hostvars) -> list[str]:
    if IMPORT_ERROR is not None:
        raise AnsibleFilterError(
            "the carbonscale_addresses filter needs the carbonscale package in the python "
            f"that runs ansible ({IMPORT_ERROR}); run ansible from the project venv (make venv)"
        )
    try:
        return [host_address(host, hostvars) for host in hosts]
    except CarbonscaleError as exc:
        raise AnsibleFilterError(f"carbonscale_addresses: {exc}") from exc


class FilterModule:
    def filters(self):
        return {"carbonscale_addresses": carbonscale_addresses}

"""Ansible filter over carbonscale.inventory: the statsd relay's backends.

    {{ groups['relays'] | statsd_backends(hostvars, statsd_instances) }}
      -> ["10.0.0.21:8127:8128", "10.0.0.21:8129:8130", "10.0.0.22:8127:8128", ...]

Every statsd daemon (`statsd_instances` of each host, the third argument when
a host does not set it) as `<carbonscale_address>:<port>:<admin_port>`, hosts
in the order given, instances in list order: the hash order of
`carbonscale relay statsd`, the same on every relay. Runs on the controller
with the project venv's python.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

try:
    from carbonscale import CarbonscaleError
    from carbonscale.inventory import backends_from_inventory

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the controller's python
    IMPORT_ERROR = exc


def statsd_backends(hosts: list[str], hostvars, default_instances=None) -> list[str]:
    if IMPORT_ERROR is not None:
        raise AnsibleFilterError(
            "the statsd_backends filter needs the carbonscale package in the python that runs "
            f"ansible ({IMPORT_ERROR}); run ansible from the project venv (make venv)"
        )
    try:
        return backends_from_inventory(list(hosts), hostvars, default_instances)
    except CarbonscaleError as exc:
        raise AnsibleFilterError(f"statsd_backends: {exc}") from exc


class FilterModule:
    def filters(self):
        return {"statsd_backends": statsd_backends}

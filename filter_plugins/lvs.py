"""Ansible filters over carbonscale.lvs: what is wrong with the LVS services.

    {{ lvs_director_services | lvs_service_errors(lvs_director_vips, ansible_facts) }}
      -> ["lvs_director_services[1] (pickle): TCP port 2003 is already used by ...", ...]

Empty when the services, the VIPs and the director's networks (from its
facts; None skips that check) fit together. The lvs_director role fails with
these messages before it renders anything. Runs on the controller with the
project venv's python.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

try:
    from carbonscale.lvs import interface_networks, service_errors

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the controller's python
    IMPORT_ERROR = exc


def lvs_service_errors(services, vips, facts=None) -> list[str]:
    if IMPORT_ERROR is not None:
        raise AnsibleFilterError(
            "the lvs_service_errors filter needs the carbonscale package in the python that "
            f"runs ansible ({IMPORT_ERROR}); run ansible from the project venv (make venv)"
        )
    networks = interface_networks(dict(facts)) if facts else None
    return service_errors(
        list(services) if isinstance(services, list) else services, vips, networks
    )


class FilterModule:
    def filters(self):
        return {"lvs_service_errors": lvs_service_errors}

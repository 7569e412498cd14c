"""Ansible filter over carbonscale.storage: what is wrong with a carbon_instances list.

    {{ carbon_instances | carbon_instances_errors }}  -> [] when valid

The role asserts the result is empty and prints every line, so an operator
sees all duplicate names and port clashes at once, before anything changes.
Runs on the controller with the project venv's python.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

try:
    from carbonscale.storage import instance_errors

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the controller's python
    IMPORT_ERROR = exc


def carbon_instances_errors(instances: object) -> list[str]:
    """Readable problems with a carbon_instances value; [] when it is valid."""
    if IMPORT_ERROR is not None:
        raise AnsibleFilterError(
            "carbon_instances_errors needs the carbonscale package in the python that runs "
            f"ansible ({IMPORT_ERROR}); run ansible from the project venv (make venv)"
        )
    return instance_errors(instances)


class FilterModule:
    def filters(self) -> dict:
        return {"carbon_instances_errors": carbon_instances_errors}

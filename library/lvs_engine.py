#!/usr/bin/python
"""Ansible module lvs_engine: the data path of an LVS director on this kernel."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: lvs_engine
short_description: Decide between IPVS and the userspace (nginx stream) data path
description:
  - Looks for IPVS in the running kernel (C(/proc/net/ip_vs), loading C(ip_vs)
    when it is a module) and resolves I(requested) with C(carbonscale.lvs).
  - C(auto) gives C(ipvs) when the kernel has it and C(nginx) otherwise, with a
    warning that names the reason; C(ipvs) fails on a kernel without IPVS;
    C(nginx) always gives C(nginx).
  - Changes nothing on the host (loading a module aside), so it runs the same
    in check mode. Run it with C(/opt/carbonscale/venv/bin/python).
options:
  requested:
    description: The C(lvs_engine) variable.
    type: str
    choices: [auto, ipvs, nginx]
    default: auto
attributes:
  check_mode:
    description: Runs the same in check mode (it only reads the kernel).
    support: full
  diff_mode:
    description: Nothing on the host changes, so there is no diff.
    support: none
author: carbonscale
"""

EXAMPLES = r"""
- name: Choose the data path (IPVS, or nginx stream where the kernel has no IPVS)
  lvs_engine:
    requested: auto
  register: lvs_engine_resolved
  vars:
    ansible_python_interpreter: /opt/carbonscale/venv/bin/python
"""

RETURN = r"""
engine:
  description: C(ipvs) or C(nginx).
  type: str
  returned: success
  sample: nginx
ipvs:
  description: Whether the kernel has IPVS.
  type: bool
  returned: always
  sample: false
reason:
  description: How IPVS was found, or why it is missing.
  type: str
  returned: always
  sample: >-
    the kernel has no IPVS (/proc/net/ip_vs is missing;
    modprobe: FATAL: Module ip_vs not found)
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.carbonscale_import import fail_without_carbonscale  # noqa: E402

try:
    from carbonscale import CarbonscaleError
    from carbonscale.lvs import ipvs_available, resolve_engine

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the node's python
    IMPORT_ERROR = exc


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "requested": {"type": "str", "choices": ["auto", "ipvs", "nginx"], "default": "auto"}
        },
        supports_check_mode=True,
    )
    fail_without_carbonscale(module, IMPORT_ERROR)
    has_ipvs, reason = ipvs_available()
    try:
        engine = resolve_engine(module.params["requested"], has_ipvs, reason)
    except CarbonscaleError as exc:
        module.fail_json(msg=str(exc), ipvs=has_ipvs, reason=reason)
    if engine.warning:
        module.warn(engine.warning)
    module.exit_json(changed=False, engine=engine.name, ipvs=has_ipvs, reason=reason)


if __name__ == "__main__":
    main()

"""The storage node's carbon-cache instances: what a valid `carbon_instances` is.

The list is the ring's source (relay members are address:line_port=name) and
each entry becomes a systemd unit `carbon-cache@<name>` and a `[cache:<name>]`
section of carbon.conf, so a name must be safe in all three places and every
port must belong to exactly one listener on the host.
"""

from __future__ import annotations

import re

#: Letters, digits, '_' and '-': valid as a systemd instance, a carbon.conf
#: section suffix and a carbon-c-relay instance string alike.
INSTANCE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
PORT_KEYS = ("line_port", "pickle_port", "query_port")


def instance_errors(instances: object) -> list[str]:
    """Every problem with a carbon_instances value, one readable line each ([] if valid)."""
    if not isinstance(instances, list) or not instances:
        return [
            "carbon_instances must be a non-empty list like "
            "[{name: a, line_port: 2103, pickle_port: 2104, query_port: 7102}]"
        ]
    errors: list[str] = []
    names: dict[str, int] = {}
    ports: dict[int, str] = {}
    for position, instance in enumerate(instances):
        where = f"carbon_instances[{position}]"
        if not isinstance(instance, dict):
            errors.append(f"{where} must be a mapping with name, {', '.join(PORT_KEYS)}")
            continue
        name = instance.get("name")
        if not isinstance(name, str) or not INSTANCE_NAME.match(name):
            errors.append(
                f"{where}: name {name!r} must be 1-32 letters, digits, '_' or '-' "
                "(it names a systemd unit, a carbon.conf section and a ring member)"
            )
        else:
            where = f"carbon_instances[{position}] ({name})"
            if name in names:
                errors.append(
                    f"{where}: duplicate name, also carbon_instances[{names[name]}]: "
                    "two instances would share a unit and a ring position"
                )
            else:
                names[name] = position
        unknown = sorted(set(instance) - {"name", *PORT_KEYS})
        if unknown:
            errors.append(f"{where}: unknown keys {', '.join(unknown)}")
        for key in PORT_KEYS:
            port = instance.get(key)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                errors.append(f"{where}: {key} must be a port number 1-65535, got {port!r}")
                continue
            label = f"{where} {key}"
            if port in ports:
                errors.append(f"{label} {port} clashes with {ports[port]}")
            else:
                ports[port] = label
    return errors

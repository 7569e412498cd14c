"""Ansible filters over carbonscale.ring: ring members from the inventory, and owners.

    {{ groups['storage'] | carbon_ring_members(hostvars) }}
      -> ["10.0.0.31:2103=a", "10.0.0.31:2203=b", ...]
    {{ 'servers.web1.cpu' | carbon_ring_owners(members, hash='jump_fnv1a_ch', replication=2) }}
      -> ["10.0.0.32:2203", "10.0.0.31:2103"]
    {{ members | carbon_ring_errors(hash='fnv1a_ch', replication=2) }}
      -> [] when carbon-c-relay can run the cluster, else one line per problem

Members are `<carbonscale_address>:<line_port>=<name>` for each storage host
(in the order given), then each of its `carbon_instances` (in list order).
This is the only place that turns the inventory into ring members; the relay
role renders its clusters with it and `carbonscale ring` reads those configs.
Runs on the controller with the project venv's python.
"""

from __future__ import annotations

from functools import lru_cache

from ansible.errors import AnsibleFilterError

try:
    from carbonscale import CarbonscaleError
    from carbonscale.inventory import bracket, host_address
    from carbonscale.relay_names import DEFAULT_ALLOWED_CHARS, relay_key
    from carbonscale.ring import Member, Ring, parse_member, ring_errors
    from carbonscale.ring.build import shadowed_warning

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the controller's python
    IMPORT_ERROR = exc


def _require_carbonscale() -> None:
    if IMPORT_ERROR is not None:
        raise AnsibleFilterError(
            "the carbon_ring filters need the carbonscale package in the python that runs "
            f"ansible ({IMPORT_ERROR}); run ansible from the project venv (make venv)"
        )


def _instance_member(host: str, address: str, instance: object, position: int) -> Member:
    where = f"storage host {host}: carbon_instances[{position}]"
    if not isinstance(instance, dict):
        raise AnsibleFilterError(f"{where} must be a mapping with name and line_port")
    name, port = instance.get("name"), instance.get("line_port")
    if not isinstance(name, str) or not name or any(ch.isspace() for ch in name):
        raise AnsibleFilterError(f"{where} needs a name without whitespace, got {name!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise AnsibleFilterError(f"{where} ({name}) needs line_port in 1-65535, got {port!r}")
    try:
        # An IPv6 carbonscale_address needs brackets in member syntax.
        return parse_member(f"{bracket(address)}:{port}={name}")
    except CarbonscaleError as exc:
        raise AnsibleFilterError(f"{where}: {exc}") from exc


def carbon_ring_members(storage_hosts: list[str], hostvars: dict) -> list[str]:
    """Ring members, in relay syntax, from the storage hosts' carbon_instances."""
    _require_carbonscale()
    if not storage_hosts:
        raise AnsibleFilterError("carbon_ring_members: no storage hosts given")
    members: list[Member] = []
    for host in storage_hosts:
        try:
            address = host_address(host, hostvars, "storage host")
        except CarbonscaleError as exc:
            raise AnsibleFilterError(str(exc)) from exc
        facts = hostvars[host]
        instances = facts.get("carbon_instances")
        if not isinstance(instances, list) or not instances:
            raise AnsibleFilterError(
                f"storage host {host} has no carbon_instances list "
                f"(e.g. [{{name: a, line_port: 2103, pickle_port: 2104, query_port: 7102}}])"
            )
        members.extend(
            _instance_member(host, str(address), instance, i)
            for i, instance in enumerate(instances)
        )
    seen: dict[tuple[str, int], Member] = {}
    for member in members:
        key = (member.host, member.port)
        if key in seen:
            raise AnsibleFilterError(
                f"ring members {seen[key]} and {member} share {member.address}: "
                f"every carbon-cache instance needs its own line_port"
            )
        seen[key] = member
    return [member.relay_syntax for member in members]


@lru_cache(maxsize=32)
def _ring(members: tuple[str, ...], hash_type: str, replication: int, compat: str) -> Ring:
    return Ring(list(members), hash_type, compat, replication)


def carbon_ring_owners(
    metric: str,
    members: list[str],
    hash: str = "carbon_ch",  # the keyword operators know from relay configs
    replication: int = 1,
    compat: str = "carbon-c-relay",
    allowed_chars: str | None = None,
) -> list[str]:
    """host:port of the owners of a metric, primary first.

    carbon-c-relay rewrites the name before hashing it (carbonscale.relay_names;
    allowed_chars is its -c, default "-_:#"); carbon's relay hashes it as given.
    """
    _require_carbonscale()
    try:
        ring = _ring(tuple(members), hash, int(replication), compat)
        name = str(metric).encode("utf-8", "surrogateescape")
        if compat == "carbon-c-relay":
            allowed = DEFAULT_ALLOWED_CHARS if allowed_chars is None else allowed_chars
            name = relay_key(name, allowed)
        return [member.address for member in ring.locate(name)]
    except CarbonscaleError as exc:
        raise AnsibleFilterError(f"carbon_ring_owners: {exc}") from exc


def carbon_ring_shadowed(
    members: list[str],
    hash: str = "carbon_ch",
    replication: int = 1,
    compat: str = "carbon-c-relay",
) -> list[str]:
    """Members that would receive no metric (their every ring key collides).

    A relay role asserts this is empty before rendering: carbon-c-relay accepts
    such a cluster silently (fnv1a_ch keys on the instance alone, so `a` on two
    hosts is one member twice).
    """
    _require_carbonscale()
    try:
        ring = _ring(tuple(members), hash, int(replication), compat)
    except CarbonscaleError as exc:
        raise AnsibleFilterError(f"carbon_ring_shadowed: {exc}") from exc
    return [member.relay_syntax for member in ring.shadowed_members()]


def carbon_ring_errors(
    members: list[str],
    hash: str = "carbon_ch",
    replication: int = 1,
    compat: str = "carbon-c-relay",
) -> list[str]:
    """Why a cluster cannot be rendered, one line each; [] when it can.

    The checks are carbonscale.ring's (`ring_errors`: hash type, member syntax,
    1 to RELAY_MAX_MEMBERS members for carbon-c-relay, no duplicates,
    1 <= replication <= members), then members that would receive no metric
    (`carbon_ring_shadowed`), which carbon-c-relay accepts silently.
    """
    _require_carbonscale()
    if isinstance(members, str) or not isinstance(members, (list, tuple)):
        return [f"members must be a list of host:port[=instance], got {members!r}"]
    try:
        replication = int(replication)
    except (TypeError, ValueError):
        return [f"replication must be a number, got {replication!r}"]
    errors = ring_errors([str(m) for m in members], str(hash), str(compat), replication)
    if errors:
        return errors
    try:
        warning = shadowed_warning(_ring(tuple(map(str, members)), hash, replication, compat))
    except CarbonscaleError as exc:  # e.g. replicas that collide on every position
        return [str(exc)]
    return [warning] if warning else []


class FilterModule:
    def filters(self):
        return {
            "carbon_ring_errors": carbon_ring_errors,
            "carbon_ring_members": carbon_ring_members,
            "carbon_ring_owners": carbon_ring_owners,
            "carbon_ring_shadowed": carbon_ring_shadowed,
        }

#!/usr/bin/python
"""Ansible module carbon_ring: where metrics live, and what a member change moves."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: carbon_ring
short_description: Locate metrics on a consistent-hash ring, or diff two rings
description:
  - Answers, for a list or file of metric names, which ring members own each
    metric (I(action=locate)) or which metrics move between an old and a new
    member set (I(action=diff)), exactly as carbon-c-relay (or carbon) places
    them. Uses C(carbonscale.ring); run it with the project venv's python on the
    controller, or with C(/opt/carbonscale/venv/bin/python) on a node.
  - With I(dest), writes the answer as a TSV file (locate C(metric<TAB>owner...),
    diff C(metric<TAB>old owners<TAB>new owners)); check mode reports whether the
    file would change, and diff mode shows how.
options:
  action:
    description: C(locate) or C(diff).
    type: str
    choices: [locate, diff]
    default: locate
  hash:
    description: Hash type (ignored with I(relay_config)).
    type: str
    choices: [carbon_ch, fnv1a_ch, jump_fnv1a_ch]
  compat:
    description: Whose placement to follow.
    type: str
    choices: [carbon-c-relay, carbon]
    default: carbon-c-relay
  replication:
    description: Copies of each metric.
    type: int
    default: 1
  members:
    description: Members, C(host[:port][=instance]) or C(host:port[:instance]).
    type: list
    elements: str
  relay_config:
    description: Take hash, replication and members from this carbon-c-relay config.
    type: path
  cluster:
    description: Cluster of I(relay_config) to use (needed when it has several).
    type: str
  new_members:
    description: The new member set for I(action=diff).
    type: list
    elements: str
  new_relay_config:
    description: The new ring from a carbon-c-relay config, for I(action=diff).
    type: path
  new_cluster:
    description: Cluster of I(new_relay_config).
    type: str
  new_hash:
    description: Hash of the new ring (default I(hash)).
    type: str
    choices: [carbon_ch, fnv1a_ch, jump_fnv1a_ch]
  new_replication:
    description: Replication of the new ring (default I(replication)).
    type: int
  names:
    description: Metric names.
    type: list
    elements: str
  names_file:
    description: File of metric names, one per line (the first field of each line).
    type: path
  allowed_chars:
    description:
      - carbon-c-relay's C(-c) option. With I(compat=carbon-c-relay) names are
        rewritten as that relay does before it hashes them (other bytes become
        C(_), repeated and trailing dots go, tags after C(;) are not part of the
        name) and reported as rewritten.
    type: str
    default: "-_:#"
  dest:
    description: Write the answer to this TSV file (atomically).
    type: path
  max_results:
    description: Return per-metric results only up to this many names (counts always).
    type: int
    default: 10000
attributes:
  check_mode:
    description: Computes the answer and reports whether I(dest) would change; writes nothing.
    support: full
  diff_mode:
    description: Shows the change of I(dest), its first 50 lines before and after.
    support: partial
author: carbonscale
"""

EXAMPLES = r"""
- name: Where do these metrics live on the running relay?
  carbon_ring:
    relay_config: /etc/carbon-c-relay.conf
    names: [servers.web1.cpu.user, servers.web2.cpu.user]
  register: placement

- name: Plan an expansion from the storage group to the storage group plus storage4
  carbon_ring:
    action: diff
    hash: carbon_ch
    members: "{{ groups['storage'] | carbon_ring_members(hostvars) }}"
    new_members: "{{ (groups['storage'] + ['storage4']) | carbon_ring_members(hostvars) }}"
    names_file: /var/tmp/metric-names.txt
    dest: /var/tmp/moves.tsv
  delegate_to: localhost
"""

RETURN = r"""
count:
  description: Metric names read.
  type: int
  returned: always
  sample: 2
owners:
  description: For locate, metric -> list of host:port, primary first (up to max_results).
  type: dict
  returned: action is locate
  sample: {servers.web1.cpu.user: ["10.0.0.32:2203", "10.0.0.31:2103"]}
per_member:
  description: For locate, primary-owned names per member (relay syntax).
  type: dict
  returned: action is locate
  sample: {"10.0.0.31:2103=a": 1, "10.0.0.32:2203=b": 1}
moved:
  description: For diff, the moving metrics (up to max_results) with old and new owners.
  type: list
  elements: dict
  returned: action is diff
  sample: [{metric: servers.web1.cpu.user, old: ["10.0.0.31:2103"], new: ["10.0.0.34:2103"]}]
moved_count:
  description: For diff, how many metrics change owners.
  type: int
  returned: action is diff
  sample: 1
moved_fraction:
  description: For diff, moved_count / count.
  type: float
  returned: action is diff
  sample: 0.5
matrix:
  description: For diff, names by old primary -> new primary (relay syntax).
  type: dict
  returned: action is diff
  sample: {"10.0.0.31:2103=a": {"10.0.0.31:2103=a": 1, "10.0.0.34:2103=a": 1}}
"""

import os  # noqa: E402
import tempfile  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.carbonscale_import import fail_without_carbonscale  # noqa: E402

try:
    from carbonscale import CarbonscaleError
    from carbonscale.ring import RingDiff
    from carbonscale.ring.build import make_ring, shadowed_warning
    from carbonscale.ring.locate import names_in, read_names

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    IMPORT_ERROR = exc

DIFF_PREVIEW_LINES = 50


def _names(module: AnsibleModule) -> list[bytes]:
    # carbon-c-relay rewrites names before it hashes them; carbon does not.
    params = module.params
    allowed = params["allowed_chars"].encode() if params["compat"] == "carbon-c-relay" else None
    if params["names"] is not None:
        text = "\n".join(params["names"]) + "\n"
        return names_in(text.encode("utf-8"), 1, allowed)
    path = params["names_file"]
    try:
        with open(path, "rb") as handle:
            return [name for block in read_names(handle, allowed) for name in block]
    except OSError as exc:
        raise CarbonscaleError(f"cannot read names file {path}: {exc.strerror}") from exc


def _ring(module: AnsibleModule, side: str):
    params = module.params
    prefix = "new_" if side == "new" else ""
    ring = make_ring(
        params[f"{prefix}members"] or [],
        params[f"{prefix}hash"] or params["hash"],
        params["compat"],
        params[f"{prefix}replication"] or params["replication"],
        params[f"{prefix}relay_config"],
        params[f"{prefix}cluster"],
        f"{side} " if side == "new" else "",
    )
    warning = shadowed_warning(ring)
    if warning:
        module.warn(f"{side} ring: {warning}")
    return ring


def _locate(module: AnsibleModule, names: list[bytes]) -> tuple[dict, str]:
    ring = _ring(module, "old")
    rows = ring.locate_batch(names)
    addresses = [m.address for m in ring.members]
    limit = module.params["max_results"]
    owners = {
        name.decode(): [addresses[i] for i in row]
        for name, row in zip(names[:limit], rows[:limit].tolist(), strict=True)
    }
    per_member = {m.relay_syntax: 0 for m in ring.members}
    for index in rows[:, 0].tolist():
        per_member[ring.members[index].relay_syntax] += 1
    text = "".join(
        name.decode() + "\t" + "\t".join(addresses[i] for i in row) + "\n"
        for name, row in zip(names, rows.tolist(), strict=True)
    )
    return {"count": len(names), "owners": owners, "per_member": per_member}, text


def _diff(module: AnsibleModule, names: list[bytes]) -> tuple[dict, str]:
    old, new = _ring(module, "old"), _ring(module, "new")
    diff = RingDiff(old, new)
    changed, old_rows, new_rows = diff.add(names)
    old_addr = [m.address for m in old.members]
    new_addr = [m.address for m in new.members]
    moves = [
        (names[i].decode(), [old_addr[j] for j in old_rows[i]], [new_addr[j] for j in new_rows[i]])
        for i in changed.tolist()
    ]
    limit = module.params["max_results"]
    result = {
        "count": diff.total,
        "moved": [{"metric": m, "old": o, "new": n} for m, o, n in moves[:limit]],
        "moved_count": diff.moved,
        "moved_fraction": diff.fraction,
        "matrix": diff.matrix_by_label(),
    }
    text = "".join(f"{m}\t{','.join(o)}\t{','.join(n)}\n" for m, o, n in moves)
    return result, text


def _write(module: AnsibleModule, dest: str, text: str, result: dict) -> None:
    try:
        with open(dest, encoding="utf-8") as handle:
            before = handle.read()
    except FileNotFoundError:
        before = None
    except OSError as exc:
        module.fail_json(msg=f"cannot read {dest}: {exc.strerror}", **result)
    result["changed"] = before != text
    if module._diff and result["changed"]:
        preview = lambda s: "".join((s or "").splitlines(True)[:DIFF_PREVIEW_LINES])  # noqa: E731
        result["diff"] = {
            "before_header": dest,
            "after_header": dest,
            "before": preview(before),
            "after": preview(text),
        }
    if not result["changed"] or module.check_mode:
        return
    directory = os.path.dirname(os.path.abspath(dest))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".carbon_ring-", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except OSError as exc:
        module.fail_json(msg=f"cannot write {dest}: {exc.strerror}", **result)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "action": {"type": "str", "choices": ["locate", "diff"], "default": "locate"},
            "hash": {"type": "str", "choices": ["carbon_ch", "fnv1a_ch", "jump_fnv1a_ch"]},
            "compat": {
                "type": "str",
                "choices": ["carbon-c-relay", "carbon"],
                "default": "carbon-c-relay",
            },
            "replication": {"type": "int", "default": 1},
            "members": {"type": "list", "elements": "str"},
            "relay_config": {"type": "path"},
            "cluster": {"type": "str"},
            "new_members": {"type": "list", "elements": "str"},
            "new_relay_config": {"type": "path"},
            "new_cluster": {"type": "str"},
            "new_hash": {"type": "str", "choices": ["carbon_ch", "fnv1a_ch", "jump_fnv1a_ch"]},
            "new_replication": {"type": "int"},
            "names": {"type": "list", "elements": "str"},
            "names_file": {"type": "path"},
            "allowed_chars": {"type": "str", "default": "-_:#"},
            "dest": {"type": "path"},
            "max_results": {"type": "int", "default": 10000},
        },
        mutually_exclusive=[
            ("members", "relay_config"),
            ("new_members", "new_relay_config"),
            ("names", "names_file"),
        ],
        required_one_of=[("names", "names_file"), ("members", "relay_config")],
        required_if=[("action", "diff", ("new_members", "new_relay_config"), True)],
        supports_check_mode=True,
    )
    fail_without_carbonscale(module, IMPORT_ERROR)
    try:
        names = _names(module)
        action = _locate if module.params["action"] == "locate" else _diff
        result, text = action(module, names)
    except CarbonscaleError as exc:
        module.fail_json(msg=str(exc))
    result["changed"] = False
    if module.params["dest"]:
        _write(module, module.params["dest"], text, result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

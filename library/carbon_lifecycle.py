#!/usr/bin/python
"""Ansible module carbon_lifecycle: where a storage move (expand, decommission) stands."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: carbon_lifecycle
short_description: Start, continue and record the phases of a storage move
description:
  - Thin glue over C(carbonscale.migrate.lifecycle), for C(expand.yml) and C(decommission.yml).
  - I(step=begin) reads the ring every relay runs now from their live configs (I(configs);
    they must agree), and returns the move in progress recorded in I(state), or a new one
    from that ring to I(target) (saved, unless in check mode). Nothing to move when the
    relays already run I(target).
  - I(step=mark) records I(phase) done (phases in order; a phase done already is no change).
  - I(step=finish) closes the move (the state file is kept beside itself, with I(outcome)).
  - Each step returns the move's summary and C(relays), the clusters the relays must run
    for the next phase (or, with I(rollback), for the old ring).
  - Run it where the state file lives, with the python of the carbonscale venv.
options:
  step:
    description: What to do.
    type: str
    required: true
    choices: [begin, mark, finish]
  state:
    description: The move's state file.
    type: path
    required: true
  action:
    description: The move (begin).
    type: str
    choices: [expand, decommission]
  configs:
    description: Every relay's live carbon-c-relay config, C({relay: text}) (begin).
    type: dict
    default: {}
  cluster:
    description: The relays' cluster name.
    type: str
    default: storage
  migration_cluster:
    description: The name of the second cluster during dual writes.
    type: str
    default: storage_next
  target:
    description: The target ring's members (begin; for decommission already without the hosts).
    type: list
    elements: str
    default: []
  remove:
    description: Ring addresses of the hosts a decommission removes (begin); target is then
      the live ring without them.
    type: list
    elements: str
    default: []
  phase:
    description: The phase done (mark).
    type: str
  info:
    description: What the phase measured, kept in the state (mark).
    type: dict
    default: {}
  rollback:
    description: Return the clusters of the old ring in C(relays).
    type: bool
    default: false
  outcome:
    description: How the move ended (finish).
    type: str
    default: done
author: carbonscale
"""

EXAMPLES = r"""
- name: Read the live ring and the move in progress
  carbon_lifecycle:
    step: begin
    state: /var/lib/carbonscale/lifecycle/move.json
    action: expand
    configs: "{{ relay_configs }}"
    target: "{{ groups['storage'] | carbon_ring_members(hostvars) }}"
  vars:
    ansible_python_interpreter: /opt/carbonscale/venv/bin/python
"""

RETURN = r"""
move:
  description: The move (action, old, new, hash, replication, done, next, added_hosts,
    removed_hosts, hosts, phases); empty when there is nothing to move.
  type: dict
  returned: always
relays:
  description: C(members) and C(migration_members) the relays must run now.
  type: dict
  returned: when there is a move
message:
  description: Why there is nothing to move, or what was done.
  type: str
  returned: always
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

try:
    from carbonscale import CarbonscaleError
    from carbonscale.migrate import lifecycle

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    IMPORT_ERROR = exc


def _answer(move, message: str, rollback: bool, changed: bool) -> dict:
    if move is None:
        return {"changed": False, "move": {}, "message": message}
    return {
        "changed": changed,
        "move": move.summary(),
        "relays": move.relay_rings(rollback),
        "message": message,
    }


def run(module: AnsibleModule) -> dict:
    params = module.params
    step, path, rollback = params["step"], params["state"], params["rollback"]
    if step == "begin":
        if not params["action"]:
            raise CarbonscaleError("step begin needs action (expand or decommission)")
        live = lifecycle.live_cluster(params["configs"], params["cluster"])
        target = params["target"]
        if params["remove"]:
            target = lifecycle.decommission_plan_target(
                live, params["remove"], lifecycle.Move.load(path)
            )
            if target is None:
                removed = ", ".join(params["remove"])
                return _answer(None, f"{removed}: not in the ring the relays run", False, False)
        if not target:
            raise CarbonscaleError("step begin needs target or remove")
        move, message = lifecycle.begin(
            path, params["action"], live, target, params["cluster"], params["migration_cluster"]
        )
        started = move is not None and message == "started"
        if started and not module.check_mode:
            move.save()
        return _answer(move, message, rollback, started)
    move = lifecycle.Move.load(path)
    if move is None:
        raise CarbonscaleError(f"no move in progress ({path} does not exist)")
    if step == "mark":
        if not params["phase"]:
            raise CarbonscaleError("step mark needs phase")
        changed = not move.is_done(params["phase"])
        move.mark(params["phase"], params["info"])
        if changed and not module.check_mode:
            move.save()
        return _answer(move, f"phase {params['phase']} done", rollback, changed)
    if module.check_mode:
        return _answer(move, f"the move would end: {params['outcome']}", rollback, True)
    answer = _answer(move, "", rollback, True)
    answer["message"] = f"the move ended ({params['outcome']}): {move.archive(params['outcome'])}"
    return answer


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "step": {"type": "str", "required": True, "choices": ["begin", "mark", "finish"]},
            "state": {"type": "path", "required": True},
            "action": {"type": "str", "choices": ["expand", "decommission"]},
            "configs": {"type": "dict", "default": {}},
            "cluster": {"type": "str", "default": "storage"},
            "migration_cluster": {"type": "str", "default": "storage_next"},
            "target": {"type": "list", "elements": "str", "default": []},
            "remove": {"type": "list", "elements": "str", "default": []},
            "phase": {"type": "str"},
            "info": {"type": "dict", "default": {}},
            "rollback": {"type": "bool", "default": False},
            "outcome": {"type": "str", "default": "done"},
        },
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg=f"carbon_lifecycle needs the carbonscale package ({IMPORT_ERROR}); run it with "
            "ansible_python_interpreter=/opt/carbonscale/venv/bin/python"
        )
    try:
        module.exit_json(**run(module))
    except CarbonscaleError as exc:
        module.fail_json(msg=str(exc))


if __name__ == "__main__":
    main()

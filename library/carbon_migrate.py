#!/usr/bin/python
"""Ansible module carbon_migrate: one step of a migration (plan, sync, verify, cleanup)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: carbon_migrate
short_description: Move metrics to their owners under a new ring, one step at a time
description:
  - Thin glue over C(carbonscale.migrate); the same steps as C(carbonscale migrate).
  - I(step=plan) (on the controller or any host) lists every storage host's whisper tree
    through its C(carbonscale migrate serve) service and writes the plan I(plan) - every
    metric whose copies are not exactly on its new owners' hosts.
  - I(step=sync) (on each destination) pulls each moved file straight from its source
    host, fills it into the live file under carbon's lock and checks every point;
    I(step=verify) checks again against fresh snapshots; I(step=cleanup) (on hosts that
    no longer own a metric) moves copies verified on every owner to a quarantine;
    I(step=purge) deletes that quarantine. A journal in I(state_dir) makes every step
    resumable; failed items are retried by the next run and reported.
  - Check mode runs nothing but the plan - for I(step=plan) the plan is computed and
    not written; for the other steps the work the plan gives this host is counted.
    Diff mode shows the moves (up to I(max_results)).
  - Run it with the python of the carbonscale venv on the node
    (C(ansible_python_interpreter=/opt/carbonscale/venv/bin/python)).
options:
  step:
    description: The step to run.
    type: str
    required: true
    choices: [plan, sync, verify, cleanup, purge]
  plan:
    description: The plan file (written by I(step=plan), read by the others).
    type: path
    required: true
  secret_file:
    description: The file holding the services' shared secret.
    type: path
    required: true
  host:
    description: This host's name in the plan (its ring address). Steps other than plan.
    type: str
  root:
    description: This host's whisper root. Steps other than plan.
    type: path
    default: /var/lib/graphite/whisper
  state_dir:
    description: Where this host's journal lives. Steps other than plan.
    type: path
    default: /var/lib/carbonscale/migrate
  jobs:
    description: Batches in flight.
    type: int
    default: 4
  batch:
    description: Files per request to a peer.
    type: int
    default: 200
  carbon:
    description: C(HOST:PORT) of a carbon line receiver for the step's counters.
    type: str
  hash:
    description: Hash of the rings (plan; without relay configs).
    type: str
    choices: [carbon_ch, fnv1a_ch, jump_fnv1a_ch]
  replication:
    description: Replication of the rings (plan; without relay configs).
    type: int
    default: 1
  new_members:
    description: Members of the new ring, C(host:port=instance) (plan).
    type: list
    elements: str
    default: []
  old_members:
    description: Members of the old ring (plan; lets owners that changed pull history).
    type: list
    elements: str
    default: []
  new_relay_config:
    description: A carbon-c-relay config holding the new ring (plan).
    type: path
  old_relay_config:
    description: A carbon-c-relay config holding the old ring (plan).
    type: path
  relay_config:
    description: The live relay config; the new ring must agree with it (plan).
    type: path
  cluster:
    description: The cluster to read from the relay configs.
    type: str
  hosts:
    description:
      - Storage hosts as C(NAME=ADDRESS:PORT) (plan). Ring hosts default to C(NAME:2099);
        add hosts that hold stray copies.
    type: list
    elements: str
    default: []
  allow_jump_reshuffle:
    description: Accept a jump_fnv1a_ch removal that remaps about half the metrics.
    type: bool
    default: false
  reserve:
    description: Bytes every destination must keep free after the move (plan).
    type: int
    default: 0
  label:
    description:
      - A word recorded in the plan (plan). Two plans with the same moves get different ids,
        so a second pass of the same moves (a delta fill) is not taken as done by the journal.
    type: str
  exclude_prefixes:
    description:
      - Metric name prefixes left out of the plan (plan), e.g. C(carbon.agents.) - carbon's
        own metrics live on the host that made them, whatever the ring says.
    type: list
    elements: str
    default: []
  max_results:
    description: Report at most this many failures and moves.
    type: int
    default: 100
author: carbonscale
"""

EXAMPLES = r"""
- name: Plan the move to the new ring (on the controller)
  carbon_migrate:
    step: plan
    plan: /var/lib/carbonscale/plan.tsv
    secret_file: /etc/carbonscale/migrate.secret
    old_relay_config: /etc/carbon-c-relay.conf.old
    new_relay_config: /etc/carbon-c-relay.conf
  delegate_to: localhost
  run_once: true

- name: Pull, fill and check what this host now owns
  carbon_migrate:
    step: sync
    plan: /var/lib/carbonscale/plan.tsv
    secret_file: /etc/carbonscale/migrate.secret
    host: "{{ carbonscale_address }}"
  # as the whisper tree's owner: the files it creates are carbon's, and the
  # file service (same user) can read the journal for status
  become: true
  become_user: _graphite
  vars:
    ansible_python_interpreter: "{{ carbonscale_python }}"
"""

RETURN = r"""
plan_id:
  description: The plan's id (a digest of its content).
  type: str
  returned: always
summary:
  description: The plan's summary (metrics, work, pairs, strays, free space).
  type: dict
  returned: when step is plan
result:
  description: The step's counts (items, done, failed, files, points, bytes, seconds).
  type: dict
  returned: when step is sync, verify or cleanup and not in check mode
work:
  description: In check mode, the items the plan gives this host for the step.
  type: int
  returned: when step is not plan and in check mode
"""

import os  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

try:
    from carbonscale import CarbonscaleError
    from carbonscale.migrate import counter_sender, engine
    from carbonscale.migrate import plan as planning
    from carbonscale.migrate._ringglue import make_ring
    from carbonscale.migrate.transport import read_secret
    from carbonscale.ring import parse_relay_config, select_cluster

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    IMPORT_ERROR = exc


def _ring(params: dict, side: str):
    members, config = params[f"{side}_members"], params[f"{side}_relay_config"]
    if not members and not config:
        return None
    return make_ring(
        members, params["hash"], "carbon-c-relay", params["replication"], config,
        params["cluster"], f"{side} ",
    )  # fmt: skip


def run_plan(module: AnsibleModule) -> dict:
    params = module.params
    new, old = _ring(params, "new"), _ring(params, "old")
    if params["relay_config"]:
        try:
            with open(params["relay_config"], encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CarbonscaleError(f"cannot read {params['relay_config']}: {exc}") from exc
        live = select_cluster(parse_relay_config(text), params["cluster"], params["relay_config"])
        if new is None:
            new = live.ring()
        else:
            planning.check_live(new, live.ring(), params["relay_config"])
    if new is None:
        raise CarbonscaleError("give the new ring: new_members, new_relay_config or relay_config")
    endpoints = {h: f"{h}:2099" for ring in (new, old) if ring for h in planning.ring_hosts(ring)}
    endpoints.update(planning.parse_hosts(params["hosts"]))
    listings = planning.collect_listings(endpoints, {}, read_secret(params["secret_file"]))
    listings = {
        host: planning.without_prefixes(listing, params["exclude_prefixes"])
        for host, listing in listings.items()
    }
    plan = planning.compute_plan(
        new, listings, endpoints, old, params["allow_jump_reshuffle"], params["reserve"]
    )
    if params["label"]:
        plan.summary["label"] = params["label"]
    result = {"summary": plan.summary, "changed": bool(plan.names)}
    if module._diff:
        moves = [
            f"{name.decode()}: {','.join(plan.host_set(int(h)))} -> "
            f"{','.join(plan.host_set(int(o)))}\n"
            for name, o, h in zip(
                plan.names[: params["max_results"]], plan.owners, plan.holders, strict=False
            )
        ]
        result["diff"] = {"before": "", "after": "".join(moves)}
    if not module.check_mode:
        result["plan_id"] = planning.write_plan(plan, params["plan"])
    return result


def run_step(module: AnsibleModule) -> dict:
    params = module.params
    if not params["host"]:
        raise CarbonscaleError(f"step {params['step']} needs host (this host's name in the plan)")
    plan = planning.PlanFile(params["plan"])
    plan.check_host(params["host"])
    step = params["step"]
    limit = params["max_results"]
    if module.check_mode or module._diff:
        if step == "cleanup":
            items = [(m, "") for m in engine.cleanup_items(plan, params["host"])]
        else:
            items = engine.sync_items(plan, params["host"])[0]
    if module.check_mode:
        result = {"plan_id": plan.plan_id, "work": len(items), "changed": bool(items)}
    else:
        counters = None
        if params["carbon"]:
            from carbonscale.sender import parse_address

            counters = counter_sender(parse_address(params["carbon"]))
        context = engine.Context(
            plan, params["host"], params["root"], params["state_dir"],
            read_secret(params["secret_file"]), jobs=params["jobs"], batch=params["batch"],
            progress=False, counters=counters,
        )  # fmt: skip
        if step == "purge":
            removed = engine.purge(context)
            return {"plan_id": plan.plan_id, "purged": removed, "changed": bool(removed)}
        done = {"sync": engine.sync, "verify": engine.verify, "cleanup": engine.cleanup}[step](
            context
        )
        report = done.as_dict()
        report["failed"] = report["failed"][:limit]
        result = {"plan_id": plan.plan_id, "result": report}
        result["changed"] = bool(done.files) and step != "verify"
        if done.failed:
            module.fail_json(msg=f"{step}: {len(done.failed)} item(s) failed", **result)
    if module._diff and step != "purge":
        arrow = "quarantine" if step == "cleanup" else "pull from"
        lines = [f"{metric}: {arrow} {peer}\n".replace(" \n", "\n") for metric, peer in items]
        result["diff"] = {"before": "", "after": "".join(lines[:limit])}
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "step": {
                "type": "str",
                "required": True,
                "choices": ["plan", "sync", "verify", "cleanup", "purge"],
            },
            "plan": {"type": "path", "required": True},
            "secret_file": {"type": "path", "required": True, "no_log": False},
            "host": {"type": "str"},
            "root": {"type": "path", "default": "/var/lib/graphite/whisper"},
            "state_dir": {"type": "path", "default": "/var/lib/carbonscale/migrate"},
            "jobs": {"type": "int", "default": 4},
            "batch": {"type": "int", "default": 200},
            "carbon": {"type": "str"},
            "hash": {"type": "str", "choices": ["carbon_ch", "fnv1a_ch", "jump_fnv1a_ch"]},
            "replication": {"type": "int", "default": 1},
            "new_members": {"type": "list", "elements": "str", "default": []},
            "old_members": {"type": "list", "elements": "str", "default": []},
            "new_relay_config": {"type": "path"},
            "old_relay_config": {"type": "path"},
            "relay_config": {"type": "path"},
            "cluster": {"type": "str"},
            "hosts": {"type": "list", "elements": "str", "default": []},
            "allow_jump_reshuffle": {"type": "bool", "default": False},
            "reserve": {"type": "int", "default": 0},
            "label": {"type": "str"},
            "exclude_prefixes": {"type": "list", "elements": "str", "default": []},
            "max_results": {"type": "int", "default": 100},
        },
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg=f"carbon_migrate needs the carbonscale package ({IMPORT_ERROR}); on a node run "
            "it with ansible_python_interpreter=/opt/carbonscale/venv/bin/python"
        )
    try:
        if module.params["step"] == "plan":
            result = run_plan(module)
        else:
            if not os.path.isdir(module.params["root"]):
                raise CarbonscaleError(f"whisper root {module.params['root']} is not a directory")
            result = run_step(module)
    except CarbonscaleError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()

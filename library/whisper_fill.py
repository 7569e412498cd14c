#!/usr/bin/python
"""Ansible module whisper_fill: merge whisper history on a node, then verify it."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: whisper_fill
short_description: Fill whisper files or trees from a source copy, and verify the result
description:
  - Fills every empty slot of the whisper file (or every C(*.wsp) under the tree)
    I(dst) from I(src), with C(carbonscale.whisper). A point present in I(dst) is
    never changed (0.0 included), finer source data is aggregated with the
    destination's method and xFilesFactor, coarse data is never spread into finer
    archives, and a missing destination becomes an exact copy written atomically.
    Destination files are written under flock(LOCK_EX), the lock carbon takes
    with WHISPER_LOCK_WRITES.
  - Then, unless I(verify=false), checks that every source point within the
    destination's retention is present at the same precision.
  - Check mode reports what would be filled or copied and writes nothing.
  - Run it with the python of the carbonscale venv on the node
    (C(ansible_python_interpreter=/opt/carbonscale/venv/bin/python)).
options:
  src:
    description:
      - Source whisper file or directory (for example a staging copy of the old
        owner's files).
    type: path
    required: true
  dst:
    description: Destination whisper file or directory (the live files of the new owner).
    type: path
    required: true
  jobs:
    description: Files handled in parallel.
    type: int
    default: 1
  move_corrupt:
    description:
      - Rename a corrupt destination to C(<dst>.corrupt-<unix time>) and copy the
        source in its place.
    type: bool
    default: false
  verify:
    description: Verify after filling (in check mode, verify the files as they are).
    type: bool
    default: true
  max_results:
    description: Report at most this many files per list (skipped, missing).
    type: int
    default: 100
attributes:
  check_mode:
    description: Reports what would be filled or copied and writes nothing.
    support: full
  diff_mode:
    description: Whisper files are binary; the counts are the report, not a diff.
    support: none
author: carbonscale
"""

EXAMPLES = r"""
- name: Merge the staged history of moved metrics into the live whisper tree
  whisper_fill:
    src: /var/lib/graphite/staging
    dst: /var/lib/graphite/whisper
    jobs: 2
  vars:
    ansible_python_interpreter: "{{ carbonscale_python }}"
  register: fill

- name: What would a fill do (nothing is written)
  whisper_fill:
    src: /var/lib/graphite/staging
    dst: /var/lib/graphite/whisper
  check_mode: true
  vars:
    ansible_python_interpreter: "{{ carbonscale_python }}"
"""

RETURN = r"""
files:
  description: Source whisper files considered.
  type: int
  returned: always
  sample: 1200
filled:
  description: Destination files that got (or, in check mode, would get) points.
  type: int
  returned: always
  sample: 340
points:
  description: Points written (or that would be written).
  type: int
  returned: always
  sample: 48210
copied:
  description: Destination files created as copies of their source.
  type: int
  returned: always
  sample: 12
replaced:
  description: Corrupt destination files moved aside and replaced by a copy.
  type: int
  returned: always
  sample: 0
unchanged:
  description: Destination files that needed nothing.
  type: int
  returned: always
  sample: 848
skipped_files:
  description: Files skipped (corrupt or unreadable), with the reason (up to max_results).
  type: list
  elements: dict
  returned: always
  sample: [{path: servers/web1/cpu.wsp, reason: "truncated header (8 bytes)"}]
verify:
  description: The verification (points_checked, points_missing, dst_missing, errors, missing).
  type: dict
  returned: when verify is true
  sample:
    ok: true
    files: 1200
    points_checked: 1440000
    points_missing: 0
    points_unchecked: 0
    files_with_missing_points: 0
    dst_missing: []
    errors: []
    missing: []
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.carbonscale_import import fail_without_carbonscale  # noqa: E402

try:
    from carbonscale import CarbonscaleError
    from carbonscale.whisper import fill, verify

    IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    IMPORT_ERROR = exc


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "src": {"type": "path", "required": True},
            "dst": {"type": "path", "required": True},
            "jobs": {"type": "int", "default": 1},
            "move_corrupt": {"type": "bool", "default": False},
            "verify": {"type": "bool", "default": True},
            "max_results": {"type": "int", "default": 100},
        },
        supports_check_mode=True,
    )
    fail_without_carbonscale(module, IMPORT_ERROR)
    params = module.params
    if not 1 <= params["jobs"] <= 256:
        module.fail_json(msg=f"jobs must be within 1..256, not {params['jobs']}")
    limit = params["max_results"]
    try:
        summary = fill(
            params["src"],
            params["dst"],
            jobs=params["jobs"],
            dry_run=module.check_mode,
            move_corrupt=params["move_corrupt"],
        )
        result = summary.as_dict()
        # "skipped" means a skipped task to Ansible: the files go under another key
        result["skipped_files"] = result.pop("skipped")[:limit]
        result["changed"] = bool(result["points"] or result["copied"] or result["replaced"])
        if params["verify"]:
            result["verify"] = verify(params["src"], params["dst"], jobs=params["jobs"]).as_dict(
                limit
            )
    except CarbonscaleError as exc:
        module.fail_json(msg=str(exc))
    problems = []
    if result["skipped_files"]:
        problems.append(f"{len(summary.skipped)} file(s) skipped")
    checked = result.get("verify")
    if checked and not module.check_mode and not checked["ok"]:
        problems.append(
            f"verify: {checked['points_missing']} point(s) missing, "
            f"{len(checked['dst_missing'])} DST missing, {len(checked['errors'])} error(s)"
        )
    if problems:
        module.fail_json(msg="; ".join(problems), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

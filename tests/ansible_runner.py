"""ansible-playbook from the project venv, with the project's ansible.cfg.

The tests that drive roles and playbooks on localhost (preflight, the storage,
relay and LVS roles' checks) read one thing back: the exit code and the
output, whitespace collapsed so a message wrapped by Ansible's callback still
matches. `role_vars_task` is the first task of the plays that run a role's
tasks or templates outside the role. `module_task` runs one task of one of
our modules (library/) and returns its result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_playbook(args: list[str], cwd: Path = ROOT) -> tuple[int, str]:
    """`ansible-playbook ARGS` in cwd: (exit code, output on one line)."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    proc = subprocess.run(
        [BIN / "ansible-playbook", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())


def role_vars_task(role: str) -> str:
    """A play task (YAML, indented for `tasks:`) loading ROLE's defaults and vars.

    include_vars outranks play vars: a play that sets the inventory's values
    must do so with set_fact after this task.
    """
    return f"""    - name: The role's defaults and variables
      ansible.builtin.include_vars: "{{{{ item }}}}"
      loop:
        - {ROOT}/roles/{role}/defaults/main.yml
        - {ROOT}/roles/{role}/vars/main.yml
"""


def module_task(tmp_path: Path, module: str, args: str, *extra: str) -> dict:
    """One task of MODULE (args: its YAML lines, indented for the task) run on
    localhost by ansible-playbook EXTRA: the task's result for localhost."""
    (tmp_path / "play.yml").write_text(
        f"- name: {module} glue\n  hosts: localhost\n  gather_facts: false\n  tasks:\n"
        f"    - name: Run {module}\n      {module}:\n{args}"
    )
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_LIBRARY=str(ROOT / "library"),
        ANSIBLE_STDOUT_CALLBACK="json",
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
    )
    # No other callback (make molecule-* enables profile_tasks) may write into the JSON.
    env.pop("ANSIBLE_CALLBACKS_ENABLED", None)
    run = subprocess.run(
        [BIN / "ansible-playbook", "-i", "localhost,", "-c", "local", "play.yml", *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    report = json.loads(run.stdout[run.stdout.index("{") :])
    return report["plays"][0]["tasks"][0]["hosts"]["localhost"]

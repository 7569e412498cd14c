"""ansible-playbook from the project venv, with the project's ansible.cfg.

The tests that drive roles and playbooks on localhost (preflight, the storage,
relay and LVS roles' checks) read one thing back: the exit code and the
output, whitespace collapsed so a message wrapped by Ansible's callback still
matches. `role_vars_task` is the first task of the plays that run a role's
tasks or templates outside the role.
"""

from __future__ import annotations

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

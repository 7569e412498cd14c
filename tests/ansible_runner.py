"""ansible-playbook from the project venv, with the project's ansible.cfg.

The tests that drive roles and playbooks on localhost (preflight, the storage
and relay roles' checks) read one thing back: the exit code and the output,
whitespace collapsed so a message wrapped by Ansible's callback still matches.
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

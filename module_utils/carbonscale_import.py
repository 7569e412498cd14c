"""What the carbonscale modules do when the python running them lacks carbonscale.

Every module imports its carbonscale names at the top inside
``try: ... except ImportError as exc: IMPORT_ERROR = exc`` (the module must
load to report anything) and calls ``fail_without_carbonscale(module,
IMPORT_ERROR)`` first thing in ``main``: one clear line instead of a traceback,
naming the interpreter that has the package. Wired in through ansible.cfg's
``module_utils`` (and ANSIBLE_MODULE_UTILS for molecule).
"""

from __future__ import annotations

# Where the carbonscale role installs the package on every node (carbonscale_venv).
NODE_PYTHON = "/opt/carbonscale/venv/bin/python"


def fail_without_carbonscale(module, import_error: ImportError | None) -> None:
    """Fail the task in one line when `import_error` says carbonscale is missing."""
    if import_error is not None:
        module.fail_json(
            msg=f"{module._name} needs the carbonscale package ({import_error}); on a node "
            f"run it with ansible_python_interpreter={NODE_PYTHON}"
        )

"""carbon-c-relay's own answer to "where does this metric go": its -t mode."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

RELAY = shutil.which("carbon-c-relay")
needs_relay = pytest.mark.skipif(RELAY is None, reason="carbon-c-relay is not installed")


def relay_test_owners(config: Path, names: list[str]) -> dict[str, list[str]]:
    """Run `carbon-c-relay -t -f config` on names: {metric: [ip:port, ...]}, primary first."""
    out = subprocess.run(
        [RELAY, "-t", "-f", str(config)],
        input=("\n".join(names) + "\n").encode(),
        capture_output=True,
        check=True,
        timeout=300,
    ).stdout.decode()
    placement = {}
    # Only the blocks that route to a hash cluster: a config may also print
    # validate blocks and multi-expression match rules.
    for block in re.split(r"(?m)^match\n", out)[1:]:
        lines = block.strip().splitlines()
        if len(lines) > 2 and "-> " in lines[0] and "_ch(" in lines[1]:
            placement[lines[0].split("-> ", 1)[1]] = [line.strip() for line in lines[2:-1]]
    return placement


def write_cluster_config(path: Path, hash_type: str, replication: int, members: list[str]) -> Path:
    """A one-cluster relay config sending everything to cluster `c`."""
    path.write_text(
        f"cluster c {hash_type} replication {replication}\n    "
        + "\n    ".join(members)
        + "\n    ;\nmatch * send to c stop;\n"
    )
    return path

"""This host's whisper tree seen through the ring: which metrics it holds and
which of them the ring gives to it."""

from __future__ import annotations

import os

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.migrate.plan import metric_path, names_of
from carbonscale.migrate.transport import walk_tree
from carbonscale.ring import Ring


def check_root(root: str) -> None:
    if not os.path.isdir(root):
        raise CarbonscaleError(f"whisper root {root} is not a directory")


def tree_files(root: str) -> tuple[list[str], np.ndarray]:
    """Relative paths of every carbon whisper file under root, and their sizes.

    Only `a/b/c.wsp` paths with no other '.' (carbon never writes a metric elsewhere);
    dot-directories (the migration's staging and quarantine) are skipped."""
    check_root(root)
    paths, sizes = [], []
    for path, size, _ in walk_tree(root):
        if path.count(".") == 1:
            paths.append(path)
            sizes.append(size)
    return paths, np.asarray(sizes, dtype=np.int64)


def metric_names(paths: list[str]) -> list[bytes]:
    return names_of([p.encode("utf-8", "surrogateescape") for p in paths])


def owned_mask(ring: Ring, names: list[bytes], host: str) -> np.ndarray:
    """True where the ring gives the name to a member on `host`."""
    if host not in {m.host for m in ring.members}:
        raise CarbonscaleError(
            f"{host} is not a ring member host (members: "
            + ", ".join(sorted({m.host for m in ring.members}))
            + ")"
        )
    if not names:
        return np.zeros(0, dtype=bool)
    rows = ring.locate_batch(names)
    on_host = np.array([m.host == host for m in ring.members], dtype=bool)
    return on_host[rows].any(axis=1)


__all__ = ["check_root", "metric_names", "metric_path", "owned_mask", "tree_files"]

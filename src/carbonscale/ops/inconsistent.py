"""Files on a host that the ring does not give to it: what a migration's cleanup
would remove once every owner holds their points."""

from __future__ import annotations

from collections.abc import Mapping

from carbonscale.ops.tree import metric_names, owned_mask, tree_files
from carbonscale.ring import Ring


def inconsistent_here(root: str, ring: Ring, host: str, listed: bool = False) -> dict:
    paths, sizes = tree_files(root)
    names = metric_names(paths)
    stray = ~owned_mask(ring, names, host)
    report = {
        "host": host,
        "files": len(paths),
        "inconsistent": int(stray.sum()),
        "inconsistent_bytes": int(sizes[stray].sum()),
    }
    if listed:
        report["metrics"] = sorted(n.decode("utf-8", "surrogateescape") for n, s in zip(
            names, stray.tolist(), strict=True) if s)  # fmt: skip
    return report


def inconsistent_table(reports: Mapping[str, dict], listed: bool = False) -> str:
    lines = [f"{'host':<24} {'files':>10} {'inconsistent':>13} {'bytes':>14}"]
    for host, report in sorted(reports.items()):
        lines.append(
            f"{host:<24} {report['files']:>10} {report['inconsistent']:>13} "
            f"{report['inconsistent_bytes']:>14}"
        )
    if listed:
        for host, report in sorted(reports.items()):
            lines.extend(f"{host}\t{name}" for name in report.get("metrics", []))
    return "\n".join(lines)

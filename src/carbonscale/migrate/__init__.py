"""Migrations: move every metric to its owners under a new ring, node to node,
losing no point.

* `carbonscale.migrate.plan`: the one model (target ring + what every host
  holds -> per metric the owners to fill and the strays to remove) and the
  plan file every step reads.
* `carbonscale.migrate.transport`: the read-only, authenticated file service
  each storage host runs (`carbonscale migrate serve`) and its client.
* `carbonscale.migrate.journal`: what is done, crash-safe (sqlite3, WAL).
* `carbonscale.migrate.engine`: sync, verify, cleanup and status on a host.
"""

from __future__ import annotations

import sys
import time

from carbonscale import CarbonscaleError
from carbonscale.gen import Point, send


def counter_sender(address: tuple[str, int], prefix: str = "carbonscale.migrate"):
    """A callback sending a step's counters to carbon's line protocol, like the
    relays' own `carbonscale.*` counters: `<prefix>.<host>.<phase>.<counter>`."""

    def report(result) -> None:
        host = result.host.replace(".", "_").replace(":", "_")
        stamp = int(time.time())
        base = f"{prefix}.{host}.{result.phase}"
        values = {
            "done": result.done,
            "failed": len(result.failed),
            "files": result.files,
            "points": result.points,
            "bytes": result.bytes,
            "seconds": round(result.seconds, 3),
        }
        points = [Point(f"{base}.{key}", value, stamp) for key, value in values.items()]
        try:
            send(points, address)
        except CarbonscaleError as exc:  # counters are for dashboards: never stop the move
            print(f"carbonscale: warning: migration counters not sent: {exc}", file=sys.stderr)

    return report

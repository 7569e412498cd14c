"""Migration status from a host's own journal (carbonscale.migrate.journal)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from carbonscale.migrate.journal import Journal


def migration_here(state_dir: str, plan_id: str | None = None) -> dict:
    """{plan: {phase: {pending, done, failed}}}; {} when this host never migrated."""
    if not os.path.exists(os.path.join(state_dir, "journal.sqlite")):
        return {}
    journal = Journal(state_dir, "")
    try:
        return journal.counts(plan_id)
    finally:
        journal.close()


def migration_table(reports: Mapping[str, dict]) -> str:
    lines = []
    for host, plans in sorted(reports.items()):
        if not plans:
            lines.append(f"{host}  no migration recorded")
        for plan_id, phases in sorted(plans.items()):
            for phase, counts in sorted(phases.items()):
                lines.append(
                    f"{host}  {plan_id}  {phase:<8} done {counts['done']}  "
                    f"pending {counts['pending']}  failed {counts['failed']}"
                )
    return "\n".join(lines)

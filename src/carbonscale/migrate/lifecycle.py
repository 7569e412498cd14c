"""Growing and shrinking the storage tier under live traffic: the phases of a
move and where a move stands, for `expand.yml` and `decommission.yml`.

The old ring is the one the relays run (read from their live carbon-c-relay
configs, which must agree); the target ring is the inventory's storage group
(expand) or that group without the hosts being removed (decommission). A move
goes through PHASES in order, each one started only when the previous one is
recorded done, and the record (a small JSON state file, written atomically)
is what makes a rerun continue where the last run stopped and what a rollback
returns to:

  deploy   new storage hosts run carbon-cache, the migration file service and
           graphite-web, and the query tier lists them (before they hold data)
  copy     history copied to the new owners (plan + sync) before they receive
           traffic: carbon drops points for files MAX_CREATES_PER_MINUTE does
           not let it create yet, so the files must exist first
  dual     relays write to both rings, relay by relay
  delta    what the old owners received before their relay wrote to both
           (once their carbon-cache wrote it out) filled into the new owners
  cutover  relays on the new ring only, relay by relay
  final    a last delta fill, then verify on every destination
  cleanup  copies on hosts that no longer own a metric go to a quarantine

Until cleanup starts, a rollback puts the relays back on the old ring (relay
by relay) and then fills the old owners from the new owners' copies (a plan
whose target is the old ring): before cutover the old owners had every point
already, after it the new owners alone received for a while. The new hosts'
copies stay where they are (a later move's plan treats them as strays).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from carbonscale import CarbonscaleError
from carbonscale.atomicfile import write_atomically
from carbonscale.ring import Ring, parse_member, parse_relay_config

PHASES = ("deploy", "copy", "dual", "delta", "cutover", "final", "cleanup")
ACTIONS = ("expand", "decommission")
STATE_VERSION = 1
# carbon-cache writes its own metrics (carbon.agents.<host>-<instance>.*)
# straight into its own cache: they live on the host that made them, whatever
# the ring says, and a move must leave them there.
LOCAL_PREFIXES = ("carbon.agents.",)


@dataclass(frozen=True)
class LiveCluster:
    """The cluster every relay runs now, and whether a second (dual-write)
    cluster is there too."""

    hash_type: str
    replication: int
    members: tuple[str, ...]
    extra: tuple[str, ...]  # other consistent-hash clusters in the configs

    def ring(self) -> Ring:
        return Ring(list(self.members), self.hash_type, "carbon-c-relay", self.replication)


def live_cluster(configs: dict[str, str], cluster: str) -> LiveCluster:
    """The cluster `cluster` that every relay's config ({relay: text}) holds;
    a CarbonscaleError naming the relays when they differ."""
    if not configs:
        raise CarbonscaleError("no relay config to read the live ring from (no relays?)")
    seen: dict[tuple, list[str]] = {}
    extras: set[str] = set()
    for relay, text in sorted(configs.items()):
        try:
            clusters = parse_relay_config(text)
        except CarbonscaleError as exc:
            raise CarbonscaleError(f"relay {relay}: {exc}") from exc
        if cluster not in clusters:
            have = ", ".join(clusters) or "none"
            raise CarbonscaleError(
                f"relay {relay}: no consistent-hash cluster {cluster!r} in its config (has: {have})"
            )
        spec = clusters[cluster]
        key = (spec.hash_type, spec.replication, tuple(m.relay_syntax for m in spec.members))
        seen.setdefault(key, []).append(relay)
        extras.update(name for name in clusters if name != cluster)
    if len(seen) > 1:
        described = "; ".join(
            f"{', '.join(relays)}: {key[0]} replication {key[1]}, {' '.join(key[2])}"
            for key, relays in seen.items()
        )
        raise CarbonscaleError(
            f"the relays disagree on cluster {cluster!r} ({described}): make them agree "
            "(site.yml --tags relays) or finish the move that left them so"
        )
    (hash_type, replication, members), _ = next(iter(seen.items()))
    return LiveCluster(hash_type, replication, members, tuple(sorted(extras)))


def member_host(member: str) -> str:
    return parse_member(member).host


def hosts_of(members: list[str] | tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for member in members:
        host = member_host(member)
        if host not in found:
            found.append(host)
    return found


def decommission_target(members: list[str], removed_hosts: list[str]) -> list[str]:
    """`members` without those on `removed_hosts` (ring addresses)."""
    missing = [h for h in removed_hosts if h not in hosts_of(members)]
    if missing:
        raise CarbonscaleError(
            f"{', '.join(missing)}: not in the ring the relays run ({' '.join(members)})"
        )
    kept = [m for m in members if member_host(m) not in removed_hosts]
    if not kept:
        raise CarbonscaleError("removing every storage host would leave the ring empty")
    return kept


def decommission_plan_target(
    live: LiveCluster, removed_hosts: list[str], recorded: Move | None
) -> list[str] | None:
    """The target of a decommission: the recorded move's (a rerun), else the live
    ring without `removed_hosts`; None when none of them is in the live ring any
    more (the decommission is done: a rerun has nothing to move)."""
    if recorded is not None:
        return recorded.new
    live_hosts = hosts_of(live.members)
    if not any(h in live_hosts for h in removed_hosts):
        return None
    return decommission_target(list(live.members), removed_hosts)


@dataclass
class RingChange:
    added: list[str]
    removed: list[str]
    added_hosts: list[str]
    removed_hosts: list[str]

    @property
    def empty(self) -> bool:
        return not self.added and not self.removed


def ring_change(old: list[str] | tuple[str, ...], new: list[str] | tuple[str, ...]) -> RingChange:
    old_hosts, new_hosts = hosts_of(old), hosts_of(new)
    return RingChange(
        [m for m in new if m not in old],
        [m for m in old if m not in new],
        [h for h in new_hosts if h not in old_hosts],
        [h for h in old_hosts if h not in new_hosts],
    )


class Move:
    """A move's state file: action, old and new rings, the phases done (with
    when and how long), and the plan ids used."""

    def __init__(self, path: str, data: dict) -> None:
        self.path, self.data = path, data

    # ----- the file

    @classmethod
    def load(cls, path: str) -> Move | None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CarbonscaleError(f"cannot read the move state {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise CarbonscaleError(f"{path} is not a carbonscale move state (version 1)")
        return cls(path, data)

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        text = json.dumps(self.data, indent=1, sort_keys=True) + "\n"
        write_atomically(self.path, text, durable=True)

    def archive(self, outcome: str) -> str:
        """Close the move: the state file is renamed beside itself with its
        outcome, so a next run starts a new move and the history stays."""
        self.data["outcome"] = outcome
        self.data["finished"] = time.time()
        self.save()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.data["finished"]))
        done = f"{self.path}.{stamp}.{outcome}"
        os.replace(self.path, done)
        return done

    # ----- the move

    @property
    def action(self) -> str:
        return self.data["action"]

    @property
    def old(self) -> list[str]:
        return self.data["old"]

    @property
    def new(self) -> list[str]:
        return self.data["new"]

    @property
    def done(self) -> list[str]:
        return [entry["phase"] for entry in self.data["phases"]]

    @property
    def next_phase(self) -> str | None:
        done = self.done
        return PHASES[len(done)] if len(done) < len(PHASES) else None

    def is_done(self, phase: str) -> bool:
        return phase in self.done

    def mark(self, phase: str, info: dict | None = None, now: float | None = None) -> None:
        if phase not in PHASES:
            raise CarbonscaleError(f"unknown phase {phase!r} (phases: {', '.join(PHASES)})")
        if self.is_done(phase):
            return
        if phase != self.next_phase:
            raise CarbonscaleError(
                f"phase {phase} cannot be done before {self.next_phase}: "
                f"done so far: {', '.join(self.done) or 'none'}"
            )
        now = time.time() if now is None else now
        last = self.data["phases"][-1]["at"] if self.data["phases"] else self.data["started"]
        entry = {"phase": phase, "at": now, "seconds": round(now - last, 3)}
        if info:
            entry["info"] = info
        self.data["phases"].append(entry)

    def relay_rings(self, rollback: bool = False) -> dict:
        """What the relays must run for the next phase: `members` (the cluster
        they route by) and `migration_members` (the second cluster of a dual
        write, empty for none)."""
        if rollback:
            if self.is_done("cleanup"):
                raise CarbonscaleError(
                    "the move's cleanup is done: the old owners' copies are in quarantine; "
                    "a rollback now is a new move (decommission the added hosts)"
                )
            return {"members": self.old, "migration_members": []}
        if self.is_done("cutover"):
            return {"members": self.new, "migration_members": []}
        if self.is_done("copy"):
            return {"members": self.old, "migration_members": self.new}
        return {"members": self.old, "migration_members": []}

    def summary(self) -> dict:
        change = ring_change(self.old, self.new)
        return {
            "action": self.action,
            "old": self.old,
            "new": self.new,
            "hash": self.data["hash"],
            "replication": self.data["replication"],
            "done": self.done,
            "next": self.next_phase,
            "added_hosts": change.added_hosts,
            "removed_hosts": change.removed_hosts,
            "hosts": hosts_of([*self.old, *self.new]),
            "phases": self.data["phases"],
            "started": self.data["started"],
        }

    def describe(self) -> str:
        """One line per phase for `carbonscale migrate status --move`."""
        change = ring_change(self.old, self.new)
        lines = [
            f"move {self.action} started {_when(self.data['started'])}: "
            f"+{len(change.added_hosts)} host(s) {' '.join(change.added_hosts) or '-'}, "
            f"-{len(change.removed_hosts)} host(s) {' '.join(change.removed_hosts) or '-'}"
        ]
        for entry in self.data["phases"]:
            lines.append(
                f"  {entry['phase']:<8} done {_when(entry['at'])} ({entry['seconds']:.1f} s)"
            )
        lines.append(f"  next: {self.next_phase or 'nothing (the move is complete)'}")
        if "outcome" in self.data:
            lines.append(f"  outcome: {self.data['outcome']}")
        return "\n".join(lines)


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def begin(
    path: str,
    action: str,
    live: LiveCluster,
    target: list[str],
    cluster_name: str,
    migration_cluster_name: str,
    now: float | None = None,
) -> tuple[Move | None, str]:
    """The move to run: the one recorded in `path` (a rerun continues it) or a
    new one from the live ring to `target`. (None, reason) when there is
    nothing to move. Nothing is written here: the caller saves the move."""
    if action not in ACTIONS:
        raise CarbonscaleError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    move = Move.load(path)
    if move is not None:
        if move.action != action or move.new != list(target):
            raise CarbonscaleError(
                f"a move is in progress ({move.action} to {' '.join(move.new)}, done: "
                f"{', '.join(move.done) or 'nothing'}; state {path}): rerun that one to finish "
                "it, or run it with -e rollback=true to return to the old ring"
            )
        return move, "continued"
    if migration_cluster_name in live.extra:
        raise CarbonscaleError(
            f"the relays write to a second cluster {migration_cluster_name!r} but no move is "
            f"recorded in {path}: a move was started elsewhere; put the relays back on one "
            "ring (site.yml --tags relays) first"
        )
    if list(live.members) == list(target):
        return None, f"the relays already run the target ring ({' '.join(target)})"
    Ring(list(target), live.hash_type, "carbon-c-relay", live.replication)  # refuse it early
    change = ring_change(live.members, target)
    if action == "expand" and change.removed_hosts:
        raise CarbonscaleError(
            f"expand would remove {', '.join(change.removed_hosts)} from the ring: use "
            "decommission.yml -e node=... for that"
        )
    if action == "decommission" and change.added_hosts:
        raise CarbonscaleError(
            f"decommission would add {', '.join(change.added_hosts)} to the ring: "
            "run expand.yml for that first"
        )
    now = time.time() if now is None else now
    data = {
        "version": STATE_VERSION,
        "action": action,
        "cluster": cluster_name,
        "hash": live.hash_type,
        "replication": live.replication,
        "old": list(live.members),
        "new": list(target),
        "started": now,
        "phases": [],
    }
    return Move(path, data), "started"


def read_status(path: str) -> str:
    move = Move.load(path)
    if move is None:
        return f"no move in progress ({path} does not exist)"
    return move.describe()

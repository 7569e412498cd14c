"""The one model of a migration: where every metric must be, and where it is.

Given the target ring and a listing of every storage host's whisper tree, a
metric is *placed* when the hosts holding a copy are exactly the hosts of its
owners and (with the old ring given) its owner hosts did not change: a new
owner that has been receiving since the switch holds a file, but not the
history. Otherwise every owner host pulls from every other host holding a copy
(so each owner ends with the union of all copies' points) and the copies on
hosts that do not own it are strays, removed only after verification.
Expansion, decommission, a changed instance list, replication 1 -> 2 and the
leftovers of old failovers are all this one convergence.

Everything here is vectorized over names: a 64-bit FNV-1a key per listed
name joins the hosts' listings (np.unique over keys, not a dict of names;
equal keys with different names, about one in a million at ten million names,
are detected and resolved exactly), owners come from Ring.locate_batch, and
host sets are bit masks (at most 64 storage hosts).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.migrate._ringglue import join_lines
from carbonscale.migrate.transport import DEFAULT_PORT, Listing
from carbonscale.ring import Ring, fnv1a_64_batch

MAX_HOSTS = 64
PLAN_MAGIC = "# carbonscale migrate plan 1"
LOCATE_CHUNK = 1 << 20


def metric_path(name: str) -> str:
    """carbon's file for a metric name, relative to the whisper root."""
    return name.replace(".", "/") + ".wsp"


def ring_hosts(ring: Ring) -> list[str]:
    hosts: list[str] = []
    for member in ring.members:
        if member.host not in hosts:
            hosts.append(member.host)
    return hosts


def describe_ring(ring: Ring) -> dict:
    return {
        "hash": ring.hash_type,
        "replication": ring.replication,
        "compat": ring.compat,
        "members": [m.relay_syntax for m in ring.members],
    }


def names_of_paths(paths: list[bytes]) -> tuple[list[bytes], np.ndarray]:
    """Metric names of listed paths, and the indices of the paths kept: a path that is
    not carbon's path of a name (a '.' outside the '.wsp' suffix) is left out."""
    block = b"\n".join(paths) + b"\n" if paths else b""
    if block.count(b".") == len(paths):  # the common case: every path is carbon's
        names = block.replace(b".wsp\n", b"\n").replace(b"/", b".").split(b"\n")[:-1]
        return names, np.arange(len(paths))
    keep = [i for i, p in enumerate(paths) if p.count(b".") == 1 and p.endswith(b".wsp")]
    names = [paths[i][:-4].replace(b"/", b".") for i in keep]
    return names, np.asarray(keep, dtype=np.int64)


class Plan:
    """The work of a migration. Per metric that is not placed: `names` (bytes),
    `owners` and `holders` (uint64 host masks), `sizes` (largest copy, bytes).
    `hosts[i]` is bit i; `endpoints` where each host's file service listens."""

    def __init__(
        self,
        hosts: list[str],
        endpoints: dict[str, str],
        names: list[bytes],
        owners: np.ndarray,
        holders: np.ndarray,
        sizes: np.ndarray,
        summary: dict,
    ) -> None:
        self.hosts = hosts
        self.endpoints = endpoints
        self.names = names
        self.owners = owners
        self.holders = holders
        self.sizes = sizes
        self.summary = summary

    def host_set(self, mask: int) -> list[str]:
        return [h for i, h in enumerate(self.hosts) if mask >> i & 1]


def _bits(indices: np.ndarray) -> np.ndarray:
    return np.left_shift(np.uint64(1), indices.astype(np.uint64))


def owner_masks(ring: Ring, names: list[bytes], host_index: dict[str, int]) -> np.ndarray:
    """uint64 host mask of each name's owners (replicas on one host are one copy)."""
    member_host = np.array([host_index[m.host] for m in ring.members], dtype=np.int64)
    masks = np.zeros(len(names), dtype=np.uint64)
    for start in range(0, len(names), LOCATE_CHUNK):
        rows = ring.locate_batch(names[start : start + LOCATE_CHUNK])
        chunk = np.zeros(len(rows), dtype=np.uint64)
        for column in range(rows.shape[1]):
            chunk |= _bits(member_host[rows[:, column]])
        masks[start : start + len(rows)] = chunk
    return masks


def _popcount(masks: np.ndarray) -> np.ndarray:
    counts = np.zeros(masks.shape, dtype=np.int64)
    rest = masks.copy()
    while rest.any():
        counts += (rest & np.uint64(1)).astype(np.int64)
        rest >>= np.uint64(1)
    return counts


def join_listings(
    listings: dict[str, Listing], host_index: dict[str, int]
) -> tuple[list[bytes], np.ndarray, np.ndarray, int]:
    """(unique names, holder masks, largest size, paths left out) over all hosts."""
    all_names: list[bytes] = []
    keys, masks, sizes = [], [], []
    skipped = 0
    for host, listing in listings.items():
        names, kept = names_of_paths(listing.paths)
        skipped += len(listing.paths) - len(names)
        all_names.extend(names)
        keys.append(fnv1a_64_batch(names))
        masks.append(np.full(len(names), np.uint64(1) << np.uint64(host_index[host])))
        sizes.append(listing.sizes[kept])
    if not all_names:
        return [], np.zeros(0, np.uint64), np.zeros(0, np.int64), skipped
    key = np.concatenate(keys)
    mask = np.concatenate(masks)
    size = np.concatenate(sizes)
    del keys, masks, sizes
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    del key
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(order))))
    firsts = order[starts]
    # Equal keys must be equal names: check every duplicate against its group's first.
    dups = np.flatnonzero(np.diff(np.append(starts, len(order))) > 1)
    if dups.size:
        first_of = order[starts[group]]
        later = np.flatnonzero(order != first_of)
        a, b = order[later].tolist(), first_of[later].tolist()
        if any(all_names[i] != all_names[j] for i, j in zip(a, b, strict=True)):
            return _join_exactly(all_names, np.concatenate([mask]), size, skipped)
    names = [all_names[i] for i in firsts.tolist()]
    holders = np.bitwise_or.reduceat(mask[order], starts)
    largest = np.maximum.reduceat(size[order], starts)
    return names, holders, largest, skipped


def _join_exactly(
    all_names: list[bytes], mask: np.ndarray, size: np.ndarray, skipped: int
) -> tuple[list[bytes], np.ndarray, np.ndarray, int]:
    """The join by name itself: only when two different names share a 64-bit key."""
    index: dict[bytes, int] = {}
    for name in all_names:
        index.setdefault(name, len(index))
    group = np.fromiter((index[n] for n in all_names), dtype=np.int64, count=len(all_names))
    holders = np.zeros(len(index), dtype=np.uint64)
    np.bitwise_or.at(holders, group, mask)
    largest = np.zeros(len(index), dtype=np.int64)
    np.maximum.at(largest, group, size)
    return list(index), holders, largest, skipped


def jump_reshuffle(old: Ring, new: Ring, names: list[bytes]) -> dict | None:
    """Numbers of a jump_fnv1a_ch member removal that is not the last bucket, else None.

    Jump hash moves only the removed buckets' names when the removed members are the
    last ones in bucket order; removing any other remaps about half of everything,
    including moves between members that stay."""
    if old.hash_type != "jump_fnv1a_ch" or new.hash_type != "jump_fnv1a_ch":
        return None
    new_set = set(new.members)
    order = [old.members[i] for i in old.bucket_order.tolist()]
    removed = [m for m in order if m not in new_set]
    if not removed:
        return None
    survivors = [m for m in order if m in new_set]
    if order[: len(survivors)] == survivors:
        return None  # only the last buckets go: their names move, nothing else
    moved = between = 0
    old_index = {m: i for i, m in enumerate(old.members)}
    new_to_old = np.array([old_index.get(m, -1) for m in new.members], dtype=np.int64)
    removed_index = {old_index[m] for m in removed}
    removed_arr = np.array(sorted(removed_index), dtype=np.int64)
    for start in range(0, len(names), LOCATE_CHUNK):
        chunk = names[start : start + LOCATE_CHUNK]
        before = old.locate_batch(chunk)[:, 0]
        after = new_to_old[new.locate_batch(chunk)[:, 0]]
        change = before != after
        moved += int(change.sum())
        between += int((change & ~np.isin(before, removed_arr)).sum())
    return {
        "removed": [str(m) for m in removed],
        "names": len(names),
        "moved": moved,
        "between_survivors": between,
    }


def compute_plan(
    new: Ring,
    listings: dict[str, Listing],
    endpoints: dict[str, str],
    old: Ring | None = None,
    allow_jump_reshuffle: bool = False,
) -> Plan:
    """The plan for `listings` ({host: listing}) under the target ring `new`.

    `endpoints` names every host there is ({host: address:port}); a listing of a
    host not in it is refused (an unknown host), as is a ring member host without
    a listing (its copies would be missed)."""
    hosts = list(endpoints)
    if len(hosts) > MAX_HOSTS:
        raise CarbonscaleError(f"{len(hosts)} storage hosts: a plan handles at most {MAX_HOSTS}")
    host_index = {h: i for i, h in enumerate(hosts)}
    for host in listings:
        if host not in host_index:
            raise CarbonscaleError(f"unknown host {host}: not a ring member host nor a --host")
    for ring in (new, old):
        for host in ring_hosts(ring) if ring else []:
            if host not in listings:
                raise CarbonscaleError(
                    f"no listing of ring host {host}: its copies would be missed"
                )
    names, holders, sizes, skipped = join_listings(listings, host_index)
    owners = owner_masks(new, names, host_index)
    summary: dict = {
        "metrics": len(names),
        "copies": int(sum(len(listing) for listing in listings.values())),
        "not_carbon_paths": skipped,
        "new_ring": describe_ring(new),
        "old_ring": describe_ring(old) if old else None,
    }
    if old is not None:
        reshuffle = jump_reshuffle(old, new, names)
        if reshuffle:
            summary["jump_reshuffle"] = reshuffle
            if not allow_jump_reshuffle:
                raise CarbonscaleError(jump_message(reshuffle) + "; pass --allow-jump-reshuffle")
        old_owners = owner_masks(old, names, host_index)
        changed = old_owners != owners
        summary["owner_change"] = int(changed.sum())
        # A new owner that already holds a file (carbon created it at the switch)
        # still lacks the history: owners that changed always pull.
        single = (owners & (owners - np.uint64(1))) == 0
        pulls = (holders != 0) & ~((owners == holders) & single)
        work = np.flatnonzero((holders != owners) | (changed & pulls))
    else:
        work = np.flatnonzero(holders != owners)
    plan = Plan(
        hosts,
        endpoints,
        [names[i] for i in work.tolist()],
        owners[work],
        holders[work],
        sizes[work],
        summary,
    )
    summary.update(_pair_summary(plan, listings))
    summary["moved_fraction"] = round(len(work) / len(names), 6) if names else 0.0
    short = {h: v for h, v in summary["free"].items() if v["needed"] > v["free"]}
    if short:
        raise CarbonscaleError(
            "not enough free space: "
            + "; ".join(
                f"{h} needs {v['needed']} bytes, has {v['free']} free" for h, v in short.items()
            )
        )
    return plan


def jump_message(numbers: dict) -> str:
    share = numbers["moved"] / numbers["names"] if numbers["names"] else 0.0
    return (
        f"jump_fnv1a_ch: removing {', '.join(numbers['removed'])} (not the last bucket) "
        f"remaps {numbers['moved']} of {numbers['names']} metrics ({share:.1%}), "
        f"{numbers['between_survivors']} of them between members that stay; replace the "
        "member (a new host under the same instance) instead"
    )


def _combos(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (owners, holders, size) rows of the plan and each metric's row."""
    table = np.stack([plan.owners, plan.holders, plan.sizes.astype(np.uint64)], axis=1)
    if not len(table):
        return table, np.zeros(0, np.int64)
    combos, inverse = np.unique(table, axis=0, return_inverse=True)
    return combos, inverse.reshape(-1)


def _pair_summary(plan: Plan, listings: dict[str, Listing]) -> dict:
    combos, inverse = _combos(plan)
    counts = np.bincount(inverse, minlength=len(combos)) if len(combos) else []
    pairs: dict[tuple[str, str], list[int]] = {}
    strays: dict[str, int] = {}
    needed = dict.fromkeys(plan.hosts, 0)
    for (owners, holders, size), count in zip(combos.tolist(), list(counts), strict=True):
        count = int(count)
        for dst in plan.host_set(owners):
            bit = 1 << plan.hosts.index(dst)
            if not holders & bit:
                needed[dst] += size * count
            for src in plan.host_set(holders):
                if src != dst:
                    entry = pairs.setdefault((src, dst), [0, 0])
                    entry[0] += count
                    entry[1] += size * count
        for src in plan.host_set(holders & ~owners):
            strays[src] = strays.get(src, 0) + count
    free = {
        h: {"needed": needed[h], "free": int(listings[h].free) if h in listings else 0}
        for h in plan.hosts
        if needed[h]
    }
    return {
        "work": len(plan.names),
        "pairs": [
            {"src": s, "dst": d, "files": c, "bytes": b} for (s, d), (c, b) in sorted(pairs.items())
        ],
        "strays": strays,
        "free": free,
    }


# ----- the plan file -------------------------------------------------------------


def write_plan(plan: Plan, path: str) -> str:
    """Write the plan (atomically); return its id (a digest of the content).

    A header line, one JSON line (hosts, endpoints, summary), then one line a
    metric: `name<TAB>owner hosts<TAB>holder hosts<TAB>bytes` (hosts comma-separated)."""
    combos, inverse = _combos(plan)
    suffixes = [
        (f"\t{','.join(plan.host_set(o))}\t{','.join(plan.host_set(h))}\t{s}\n").encode()
        for o, h, s in combos.tolist()
    ]
    body = join_lines(plan.names, suffixes, inverse) if plan.names else b""
    head = json.dumps(
        {"hosts": plan.hosts, "endpoints": plan.endpoints, "summary": plan.summary},
        sort_keys=True,
    ).encode()
    digest = hashlib.sha256(head + b"\n" + body).hexdigest()[:16]
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".plan.", dir=parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(f"{PLAN_MAGIC} {digest}\n".encode())
            out.write(head + b"\n")
            out.write(body)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest


class PlanRow:
    __slots__ = ("holders", "name", "owners", "size")

    def __init__(self, name: str, owners: list[str], holders: list[str], size: int) -> None:
        self.name, self.owners, self.holders, self.size = name, owners, holders, size

    @property
    def path(self) -> str:
        return metric_path(self.name)


class PlanFile:
    """A written plan: `plan_id`, `hosts`, `endpoints`, `summary`, and its rows."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                magic = handle.readline().decode("utf-8", "replace").rstrip("\n")
                head = handle.readline()
        except OSError as exc:
            raise CarbonscaleError(f"cannot read plan {path}: {exc.strerror}") from exc
        if not magic.startswith(PLAN_MAGIC + " "):
            raise CarbonscaleError(f"{path} is not a carbonscale migrate plan")
        self.plan_id = magic.rsplit(" ", 1)[1]
        try:
            info = json.loads(head)
        except ValueError as exc:
            raise CarbonscaleError(f"plan {path}: bad header") from exc
        self.hosts: list[str] = info["hosts"]
        self.endpoints: dict[str, str] = info["endpoints"]
        self.summary: dict = info["summary"]

    def check_host(self, host: str) -> None:
        if host not in self.hosts:
            raise CarbonscaleError(
                f"unknown host {host}: the plan's hosts are {', '.join(self.hosts)}"
            )

    def rows(self) -> Iterator[PlanRow]:
        with open(self.path, "rb") as handle:
            handle.readline()
            handle.readline()
            for line in handle:
                name, owners, holders, size = line.rstrip(b"\n").split(b"\t")
                yield PlanRow(
                    name.decode("utf-8", "surrogateescape"),
                    owners.decode().split(",") if owners else [],
                    holders.decode().split(",") if holders else [],
                    int(size),
                )


def parse_hosts(entries: list[str], port: int = DEFAULT_PORT) -> dict[str, str]:
    """`NAME[=ADDRESS:PORT]` entries as {name: endpoint} (default NAME:port)."""
    found: dict[str, str] = {}
    for entry in entries:
        name, sep, endpoint = entry.partition("=")
        if not name or (sep and not endpoint):
            raise CarbonscaleError(f"--host {entry!r}: expected NAME or NAME=ADDRESS:PORT")
        found[name] = endpoint if sep else f"{name}:{port}"
    return found

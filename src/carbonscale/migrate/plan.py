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
name joins the hosts' listings (one sort of the keys, not a dict of names;
two different names with one key, about one chance in a million at ten
million names, are detected by a second hash and refused), owners come from
Ring.locate_batch, and host sets are bit masks (at most 64 storage hosts).
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import tempfile
from collections.abc import Iterator

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.migrate._ringglue import join_lines
from carbonscale.migrate.transport import DEFAULT_PORT, Client, Listing, decode_listing
from carbonscale.ring import Ring, fnv1a_32_batch, fnv1a_64_batch

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


def carbon_paths(listing: Listing) -> tuple[list[bytes], np.ndarray | None]:
    """A listing's paths that are carbon's path of a metric name, and their indices
    (None: all of them). A path with a '.' outside its '.wsp' suffix is left out:
    carbon would never write a metric to it."""
    block = listing.block
    paths = block.split(b"\n")[:-1]
    if block.count(b".") == listing.count == block.count(b".wsp\n"):  # the common case
        return paths, None
    keep = [i for i, p in enumerate(paths) if p.count(b".") == 1 and p.endswith(b".wsp")]
    return [paths[i] for i in keep], np.asarray(keep, dtype=np.int64)


def without_prefixes(listing: Listing, prefixes: list[str] | tuple[str, ...]) -> Listing:
    """The listing without the metrics whose names start with one of `prefixes`
    (e.g. carbon's own `carbon.agents.`, which live where carbon made them)."""
    if not prefixes:
        return listing
    starts = tuple(prefix.replace(".", "/").encode() for prefix in prefixes)
    paths = listing.paths
    keep = [i for i, path in enumerate(paths) if not path.startswith(starts)]
    if len(keep) == len(paths):
        return listing
    index = np.asarray(keep, dtype=np.int64)
    block = b"".join(paths[i] + b"\n" for i in keep)
    return Listing(block, len(keep), listing.sizes[index], listing.mtimes[index], listing.free)


def names_of(paths: list[bytes]) -> list[bytes]:
    """Metric names of carbon paths (`a/b/c.wsp` -> `a.b.c`), a few C passes."""
    if not paths:
        return []
    block = b"\n".join(paths) + b"\n"
    return block.replace(b".wsp\n", b"\n").replace(b"/", b".").split(b"\n")[:-1]


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
        self.combos: tuple[np.ndarray, np.ndarray] | None = None

    def host_set(self, mask: int) -> list[str]:
        return [h for i, h in enumerate(self.hosts) if mask >> i & 1]


def _bits(indices: np.ndarray) -> np.ndarray:
    return np.left_shift(np.uint64(1), indices.astype(np.uint64))


def _masks(rows: np.ndarray, member_host: np.ndarray) -> np.ndarray:
    """uint64 host mask of each owner row (replicas on one host are one copy)."""
    masks = np.zeros(len(rows), dtype=np.uint64)
    for column in range(rows.shape[1]):
        masks |= _bits(member_host[rows[:, column]])
    return masks


def _pick(items: list, indices: np.ndarray) -> list:
    """items at indices, by itemgetter (a C loop, not a Python one)."""
    if len(indices) == 0:
        return []
    if len(indices) == 1:
        return [items[int(indices[0])]]
    return list(operator.itemgetter(*indices.tolist())(items))


class _Owners:
    """Owner rows of a ring for chunks of names. Two carbon_ch (or fnv1a_ch) rings
    place a name by the same 16-bit position: it is hashed once for both (the
    per-position owner table is what Ring.locate_batch indexes, as Locator does)."""

    def __init__(self, new: Ring, old: Ring | None) -> None:
        self.new, self.old = new, old
        self.shared = (
            old is not None
            and new.hash_type == old.hash_type != "jump_fnv1a_ch"
            and new.signed_char == old.signed_char
        )

    def rows(self, names: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.shared:
            old_rows = self.old.locate_batch(names) if self.old is not None else None
            return self.new.locate_batch(names), old_rows
        positions = self.new.positions(names)
        return (
            self.new._owner_rows[self.new._start_of_position[positions]],
            self.old._owner_rows[self.old._start_of_position[positions]],
        )


class _Join:
    """Every host's listing joined by name, without a Python object per listed copy.

    Pass one hashes each host's paths (64-bit FNV-1a, with a 32-bit FNV-1a as a
    check) and groups equal keys with one sort: holder masks and sizes
    per metric. Each metric is represented by its first copy in host order; pass two
    splits each host's paths again and names only the metrics it represents."""

    def __init__(self, listings: dict[str, Listing], host_index: dict[str, int]) -> None:
        self.listings = listings
        keys, checks, hosts, sizes = [], [], [], []
        self.skipped = 0
        for host, listing in listings.items():
            paths, kept = carbon_paths(listing)
            self.skipped += listing.count - len(paths)
            keys.append(fnv1a_64_batch(paths))  # a path names its metric as well as the name
            checks.append(fnv1a_32_batch(paths))
            hosts.append(np.full(len(paths), host_index[host], dtype=np.int64))
            sizes.append(listing.sizes if kept is None else listing.sizes[kept])
            del paths
        key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        del keys
        host = np.concatenate(hosts) if hosts else np.zeros(0, np.int64)
        local = np.concatenate([np.arange(len(h)) for h in hosts]) if hosts else host
        order = np.argsort(key)  # any copy may represent its metric
        sorted_key = key[order]
        del key
        first = np.ones(len(order), dtype=bool)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        del sorted_key
        starts = np.flatnonzero(first)
        check = np.concatenate(checks)[order] if checks else np.zeros(0, np.uint32)
        group = np.cumsum(first) - 1
        self.collision = bool((check != check[starts][group]).any())
        del check, group, first
        self.holders = (
            np.bitwise_or.reduceat(_bits(host[order]), starts) if len(starts) else _bits(host)
        )
        self.sizes = (
            np.maximum.reduceat(np.concatenate(sizes)[order], starts)
            if len(starts)
            else np.zeros(0, np.int64)
        )
        representative = order[starts]
        self.rep_host = host[representative]
        self.rep_local = local[representative]

    def __len__(self) -> int:
        return len(self.rep_host)

    def by_host(self, host_index: dict[str, int]) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """(metric indices, their names) host by host: every metric once."""
        for host, listing in self.listings.items():
            metrics = np.flatnonzero(self.rep_host == host_index[host])
            if not len(metrics):
                continue
            paths, _ = carbon_paths(listing)
            picked = _pick(paths, self.rep_local[metrics])
            del paths
            yield metrics, names_of(picked)


class _Reshuffle:
    """Counts of a jump_fnv1a_ch member removal that is not the last bucket.

    Jump hash moves only the removed buckets' names when the removed members are the
    last ones in bucket order; removing any other remaps about half of everything,
    including moves between members that stay."""

    def __init__(self, old: Ring, new: Ring) -> None:
        self.active = False
        if old.hash_type != "jump_fnv1a_ch" or new.hash_type != "jump_fnv1a_ch":
            return
        new_set = set(new.members)
        order = [old.members[i] for i in old.bucket_order.tolist()]
        self.removed = [m for m in order if m not in new_set]
        survivors = [m for m in order if m in new_set]
        if not self.removed or order[: len(survivors)] == survivors:
            return
        self.active = True
        old_index = {m: i for i, m in enumerate(old.members)}
        self.new_to_old = np.array([old_index.get(m, -1) for m in new.members], dtype=np.int64)
        self.removed_index = np.array(sorted(old_index[m] for m in self.removed), np.int64)
        self.names = self.moved = self.between = 0

    def add(self, old_rows: np.ndarray, new_rows: np.ndarray) -> None:
        before = old_rows[:, 0]
        change = before != self.new_to_old[new_rows[:, 0]]
        self.names += len(before)
        self.moved += int(change.sum())
        self.between += int((change & ~np.isin(before, self.removed_index)).sum())

    def numbers(self) -> dict:
        return {
            "removed": [str(m) for m in self.removed],
            "names": self.names,
            "moved": self.moved,
            "between_survivors": self.between,
        }


def compute_plan(
    new: Ring,
    listings: dict[str, Listing],
    endpoints: dict[str, str],
    old: Ring | None = None,
    allow_jump_reshuffle: bool = False,
    reserve: int = 0,
) -> Plan:
    """The plan for `listings` ({host: listing}) under the target ring `new`.

    `endpoints` names every host there is ({host: address:port}); a listing of a
    host not in it is refused (an unknown host), as is a ring member host without
    a listing (its copies would be missed). A destination must keep `reserve`
    bytes free after the files it receives (carbon keeps creating files, and a
    full disk fails every write)."""
    if reserve < 0:
        raise CarbonscaleError(f"reserve must be 0 or more bytes, not {reserve}")
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
                raise CarbonscaleError(f"no listing of ring host {host}: its copies are unknown")
    joined = _Join(listings, host_index)
    if joined.collision:
        raise CarbonscaleError(
            "two different metric names share a 64-bit name key (about one chance in a "
            "million at ten million names): plan the hosts in two parts"
        )
    count = len(joined)
    owners = np.zeros(count, dtype=np.uint64)
    changed = np.zeros(count, dtype=bool)
    new_host = np.array([host_index[m.host] for m in new.members], dtype=np.int64)
    old_host = np.array([host_index[m.host] for m in old.members], np.int64) if old else None
    reshuffle = _Reshuffle(old, new) if old else None
    locator = _Owners(new, old)
    work_names: list[bytes] = []
    work_metrics = []
    holders = joined.holders
    for metrics, names in joined.by_host(host_index):
        for start in range(0, len(names), LOCATE_CHUNK):
            chunk = names[start : start + LOCATE_CHUNK]
            rows = metrics[start : start + LOCATE_CHUNK]
            new_rows, old_rows = locator.rows(chunk)
            mask = _masks(new_rows, new_host)
            owners[rows] = mask
            held = holders[rows]
            work = held != mask
            if old is not None:
                moved = _masks(old_rows, old_host) != mask
                changed[rows] = moved
                # A new owner that already holds a file (carbon created it at the
                # switch) still lacks the history: owners that changed always pull.
                single = (mask & (mask - np.uint64(1))) == 0
                pulls = (held != 0) & ~((mask == held) & single)
                work |= moved & pulls
                if reshuffle.active:
                    reshuffle.add(old_rows, new_rows)
            picked = np.flatnonzero(work)
            work_names.extend(_pick(chunk, picked))
            work_metrics.append(rows[picked])
    summary: dict = {
        "metrics": count,
        "copies": int(sum(len(listing) for listing in listings.values())),
        "not_carbon_paths": joined.skipped,
        "new_ring": describe_ring(new),
        "old_ring": describe_ring(old) if old else None,
    }
    if reshuffle is not None and reshuffle.active:
        summary["jump_reshuffle"] = reshuffle.numbers()
        if not allow_jump_reshuffle:
            raise CarbonscaleError(
                jump_message(summary["jump_reshuffle"]) + "; pass --allow-jump-reshuffle"
            )
    if old is not None:
        summary["owner_change"] = int(changed.sum())
    work = np.concatenate(work_metrics) if work_metrics else np.zeros(0, np.int64)
    plan = Plan(
        hosts, endpoints, work_names, owners[work], holders[work], joined.sizes[work], summary
    )
    summary.update(_pair_summary(plan, listings))
    summary["moved_fraction"] = round(len(work) / count, 6) if count else 0.0
    summary["reserve"] = reserve
    short = {h: v for h, v in summary["free"].items() if v["needed"] + reserve > v["free"]}
    if short:
        kept = f" and keeps {reserve} free" if reserve else ""
        raise CarbonscaleError(
            "not enough free space: "
            + "; ".join(
                f"{h} needs {v['needed']} bytes{kept}, has {v['free']} free"
                for h, v in short.items()
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
    """Distinct (owners, holders, size) rows of the plan and each metric's row
    (computed once: the summary and the plan file both use them)."""
    if plan.combos is None:
        table = np.stack([plan.owners, plan.holders, plan.sizes.astype(np.uint64)], axis=1)
        if not len(table):
            plan.combos = (table, np.zeros(0, np.int64))
            return plan.combos
        order = np.lexsort((table[:, 2], table[:, 1], table[:, 0]))
        ordered = table[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.cumsum(first) - 1
        plan.combos = (ordered[first], inverse)
    return plan.combos


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


def read_listing(path: str) -> Listing:
    try:
        with open(path, "rb") as handle:
            return decode_listing(handle.read(), path)
    except OSError as exc:
        raise CarbonscaleError(f"cannot read listing {path}: {exc.strerror}") from exc


def collect_listings(
    endpoints: dict[str, str], files: dict[str, str], secret: bytes | None
) -> dict[str, Listing]:
    """Every host's listing: from a saved file when given ({host: path}), else asked
    of the host's service."""
    listings = {}
    for host, path in files.items():
        if host not in endpoints:
            raise CarbonscaleError(f"unknown host {host}: not a ring member host nor a --host")
        listings[host] = read_listing(path)
    for host, endpoint in endpoints.items():
        if host not in listings:
            if secret is None:
                raise CarbonscaleError(f"no listing of {host}: give its file or the secret")
            listings[host] = Client(host, endpoint, secret).listing()
    return listings


def check_live(new: Ring, live: Ring, source: str) -> None:
    """The new ring must place like the relays will: same hash and replication."""
    for what in ("hash_type", "replication"):
        if getattr(new, what) != getattr(live, what):
            raise CarbonscaleError(
                f"the new ring's {what.replace('_type', '')} is {getattr(new, what)} but the "
                f"live relay config {source} says {getattr(live, what)}"
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

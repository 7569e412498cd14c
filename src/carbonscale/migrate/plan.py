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
the rings' placement keys (Ring.placement_keys, hashed once per listed copy
and shared by two rings of one kind), and host sets are bit masks (at most 64
storage hosts).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.atomicfile import write_atomically
from carbonscale.migrate._ringglue import join_lines
from carbonscale.migrate.transport import DEFAULT_PORT, Client, Listing, decode_listing
from carbonscale.ring import POSITIONS, Ring, fnv1a_32_batch, fnv1a_64_batch

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


def carbon_names(listing: Listing) -> tuple[list[bytes], np.ndarray | None]:
    """The metric names of a listing's paths that are carbon's path of a metric
    name, and those paths' line indices (None: all of them). A path with a '.'
    outside its '.wsp' suffix is left out: carbon would never write a metric to it."""
    block = listing.block
    if block.count(b".") == listing.count == block.count(b".wsp\n"):  # the common case
        # Every line ends in the only '.wsp\n' and has no other '.': one split names them.
        names = block.replace(b"/", b".").split(b".wsp\n")
        names.pop()
        return names, None
    paths = listing.paths
    keep = [i for i, p in enumerate(paths) if p.count(b".") == 1 and p.endswith(b".wsp")]
    return names_of([paths[i] for i in keep]), np.asarray(keep, dtype=np.int64)


def paths_at(listing: Listing, lines: np.ndarray) -> list[bytes]:
    """The listing's paths on the given line indices, without splitting all of it."""
    if not len(lines):
        return []
    ends = np.flatnonzero(np.frombuffer(listing.block, dtype=np.uint8) == ord("\n"))
    starts = np.concatenate(([0], ends[:-1] + 1))
    block = listing.block
    return [block[s:e] for s, e in zip(starts[lines].tolist(), ends[lines].tolist(), strict=True)]


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


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _sort_by_key(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `key` in (key, index) order, and the keys in that order.

    One np.sort of uint64 values holding a key's high bits above its index
    (several times faster than an argsort, and stable); the few runs of equal
    high bits holding different keys (about a hundred at twenty million keys)
    are then put in key order."""
    index_bits = max(1, (len(key) - 1).bit_length())
    low = np.uint64((1 << index_bits) - 1)
    packed = key & ~low
    packed |= np.arange(len(key), dtype=np.uint64)
    packed.sort()
    order = (packed & low).astype(np.int64)
    del packed
    ordered = key[order]
    step = ordered[1:] ^ ordered[:-1]  # 0 < step <= low: a new key, same high bits
    mixed = np.flatnonzero((step != 0) & (step <= low))
    del step
    if len(mixed):
        # Keys are in order of their high bits: a run of equal high bits spans
        # from the first key >= high to the last key <= high | low.
        high = np.unique(ordered[mixed] & ~low)
        starts = np.searchsorted(ordered, high, side="left")
        ends = np.searchsorted(ordered, high | low, side="right")
        runs = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)])
        resorted = runs[np.lexsort((order[runs], ordered[runs]))]
        order[runs] = order[resorted]
        ordered[runs] = ordered[resorted]
    return order, ordered


class _Join:
    """Every host's listing joined by name, without keeping a Python object per copy.

    One pass over the hosts: each host's names are split out of its listing once,
    hashed (a 64-bit FNV-1a key with a 32-bit FNV-1a as its check) and given the
    rings' placement keys (one array per key kind), then dropped. One stable sort
    of the keys groups the copies of each metric: its holder mask, largest size
    and placement keys. Each metric is represented by its first copy in listing
    order, whose line `names` reads back for the metrics that are work."""

    def __init__(
        self, listings: dict[str, Listing], host_index: dict[str, int], rings: list[Ring]
    ) -> None:
        self.listings = list(listings.values())
        self.kept: list[np.ndarray | None] = []
        kinds = {ring.key_kind: ring for ring in rings}
        keys, checks, counts, sizes = [], [], [], []
        placement: dict[tuple, list[np.ndarray]] = {kind: [] for kind in kinds}
        self.skipped = 0
        for listing in self.listings:
            names, kept = carbon_names(listing)
            self.kept.append(kept)
            self.skipped += listing.count - len(names)
            counts.append(len(names))
            keys.append(fnv1a_64_batch(names))
            checks.append(fnv1a_32_batch(names))
            for kind, ring in kinds.items():
                found = ring.placement_keys(names)
                if ring.hash_type != "jump_fnv1a_ch":
                    found = found.astype(np.uint16)  # a 16-bit position: 2 bytes a copy
                placement[kind].append(found)
            sizes.append(listing.sizes if kept is None else listing.sizes[kept])
            del names
        # In (key, copy) order a metric's first copy in listing order comes first.
        order, sorted_key = _sort_by_key(_concat(keys, np.uint64))
        del keys
        first = np.ones(len(order), dtype=bool)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        del sorted_key
        check = _concat(checks, np.uint32)[order]
        del checks
        # Two names with one key: copies of one group whose checks differ.
        self.collision = bool((~first[1:] & (check[1:] != check[:-1])).any())
        del check
        starts = np.flatnonzero(first)
        del first
        copy_listing = np.repeat(np.arange(len(counts), dtype=np.uint8), counts)[order]
        listing_bits = _bits(np.array([host_index[h] for h in listings], dtype=np.int64))
        self.holders = (
            np.bitwise_or.reduceat(listing_bits[copy_listing], starts)
            if len(starts)
            else np.zeros(0, np.uint64)
        )
        self.sizes = (
            np.maximum.reduceat(_concat(sizes, np.int64)[order], starts)
            if len(starts)
            else np.zeros(0, np.int64)
        )
        del sizes
        representative = order[starts]
        del order
        self.rep_listing = copy_listing[starts]
        offsets = np.cumsum([0, *counts[:-1]], dtype=np.int64)
        self.rep_local = representative - offsets[self.rep_listing]
        self.placement = {
            kind: _concat(parts, np.uint16)[representative] for kind, parts in placement.items()
        }

    def __len__(self) -> int:
        return len(self.rep_listing)

    def keys(self, ring: Ring) -> np.ndarray:
        """Every metric's placement keys for `ring`."""
        return self.placement[ring.key_kind]

    def names(self, metrics: np.ndarray) -> tuple[np.ndarray, list[bytes]]:
        """The names of `metrics`, read from their representatives' listings: the
        metrics reordered listing by listing (in metric order within one), and
        their names."""
        metrics = metrics[np.argsort(self.rep_listing[metrics], kind="stable")]
        found: list[bytes] = []
        bounds = np.searchsorted(self.rep_listing[metrics], np.arange(len(self.listings) + 1))
        for index, listing in enumerate(self.listings):
            local = self.rep_local[metrics[bounds[index] : bounds[index + 1]]]
            kept = self.kept[index]
            found += names_of(paths_at(listing, local if kept is None else kept[local]))
        return metrics, found


class _Owners:
    """Owner host masks of a ring's placement keys. A 16-bit position's owners are
    looked up in a table of all 65536 (what Ring.locate_keys would give); jump
    keys are placed in chunks."""

    def __init__(self, ring: Ring, member_host: np.ndarray) -> None:
        self.ring, self.member_host = ring, member_host
        self.table = None
        if ring.hash_type != "jump_fnv1a_ch":
            self.table = _masks(ring.locate_keys(np.arange(POSITIONS)), member_host)

    def masks(self, keys: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return self.table[keys]
        masks = np.zeros(len(keys), dtype=np.uint64)
        for start in range(0, len(keys), LOCATE_CHUNK):
            rows = self.ring.locate_keys(keys[start : start + LOCATE_CHUNK])
            masks[start : start + LOCATE_CHUNK] = _masks(rows, self.member_host)
        return masks


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
    joined = _Join(listings, host_index, [ring for ring in (new, old) if ring is not None])
    if joined.collision:
        raise CarbonscaleError(
            "two different metric names share a 64-bit name key (about one chance in a "
            "million at ten million names): plan the hosts in two parts"
        )
    count = len(joined)
    new_host = np.array([host_index[m.host] for m in new.members], dtype=np.int64)
    owners = _Owners(new, new_host).masks(joined.keys(new))
    holders = joined.holders
    work = holders != owners
    reshuffle = _Reshuffle(old, new) if old else None
    if old is not None:
        old_host = np.array([host_index[m.host] for m in old.members], np.int64)
        changed = _Owners(old, old_host).masks(joined.keys(old)) != owners
        # A new owner that already holds a file (carbon created it at the
        # switch) still lacks the history: owners that changed always pull.
        single = (owners & (owners - np.uint64(1))) == 0
        pulls = (holders != 0) & ~((owners == holders) & single)
        work |= changed & pulls
        del single, pulls
        if reshuffle.active:
            new_keys, old_keys = joined.keys(new), joined.keys(old)
            for start in range(0, count, LOCATE_CHUNK):
                part = slice(start, start + LOCATE_CHUNK)
                reshuffle.add(old.locate_keys(old_keys[part]), new.locate_keys(new_keys[part]))
    work, work_names = joined.names(np.flatnonzero(work))
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
    write_atomically(path, [f"{PLAN_MAGIC} {digest}\n".encode(), head + b"\n", body])
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

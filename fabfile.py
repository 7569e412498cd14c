"""Operator tasks over the Ansible inventory (Fabric 3): `fab --list`.

Thin glue: hosts, groups and their variables come from Ansible's own inventory
parser (`-i/--inventory`, default inventories/lab, or $CARBONSCALE_INVENTORY);
the ring is the relays' ring (the carbon_ring_members filter over the storage
hosts' carbon_instances, the relays' carbon_relay_hash and replication); each
task runs a `carbonscale ops` verb over SSH on every host in parallel and merges
their JSON with carbonscale.ops. A host that does not answer is named with the
reason on stderr while the others still report, and the task exits 1; bad input
(an unknown host or group, a file that is not a capture) is one line, exit 2.

    fab lookup -m carbon.agents.a.cpu -m app.x.requests
    fab du --window 86400
    fab inconsistent --list
    fab hot-metrics --seconds 30      (or --pcap FILE, analysed here)
    fab relays
    fab migration-status
    fab stacks storage1 --instance a  (every thread's stack of carbon-cache@a there)
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

from fabric import Connection, task
from invoke.exceptions import Exit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # filter_plugins: the ring members' one computation

DEFAULT_INVENTORY = os.environ.get("CARBONSCALE_INVENTORY", os.path.join(HERE, "inventories/lab"))
CONNECT_TIMEOUT = 10
COMMON_HELP = {
    "inventory": "Ansible inventory (default inventories/lab or $CARBONSCALE_INVENTORY)",
    "on": "hosts or groups, comma-separated (default: the task's tier)",
    "json": "print the merged result as JSON",
}


class Cluster:
    """The inventory as Ansible reads it: hosts, groups, each host's variables."""

    def __init__(self, source: str) -> None:
        if not os.path.exists(source):
            raise Exit(f"fab: error: inventory {source} does not exist", code=2)
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.vars.manager import VariableManager

        loader = DataLoader()
        self.inventory = InventoryManager(loader=loader, sources=[source])
        variables = VariableManager(loader=loader, inventory=self.inventory)
        self.source = source
        self.hostvars = {
            host.name: variables.get_vars(host=host) for host in self.inventory.get_hosts()
        }
        self.groups = {
            name: [h.name for h in group.get_hosts()]
            for name, group in self.inventory.groups.items()
        }

    def select(self, pattern: str) -> list[str]:
        """Hosts of comma-separated host and group names, in inventory order."""
        chosen: list[str] = []
        for item in filter(None, (p.strip() for p in pattern.split(","))):
            if item in self.groups:
                found = self.groups[item]
            elif item in self.hostvars:
                found = [item]
            else:
                raise Exit(
                    f"fab: error: no host or group {item!r} in inventory {self.source}", code=2
                )
            chosen.extend(h for h in found if h not in chosen)
        if not chosen:
            raise Exit(f"fab: error: {pattern!r} names no host in {self.source}", code=2)
        return chosen

    def var(self, host: str, name: str, default=None):
        return self.hostvars[host].get(name, default)

    def tier_var(self, group: str, name: str, default=None):
        """A variable as the first host of a group sees it (group_vars of that tier)."""
        hosts = self.groups.get(group) or []
        return self.var(hosts[0], name, default) if hosts else default

    def ring(self) -> tuple[list[str], str, int]:
        """The relays' ring: members (carbon_ring_members over the storage hosts),
        hash and replication (the relays' group_vars)."""
        from ansible.errors import AnsibleFilterError

        from filter_plugins.carbon_ring import carbon_ring_members

        try:
            members = carbon_ring_members(self.groups.get("storage", []), self.hostvars)
        except AnsibleFilterError as exc:
            raise Exit(f"fab: error: the ring: {exc}", code=2) from None
        hash_type = str(self.tier_var("relays", "carbon_relay_hash", "carbon_ch"))
        return members, hash_type, int(self.tier_var("relays", "carbon_relay_replication", 1))

    def ring_args(self) -> list[str]:
        """The ring as `carbonscale ops` options."""
        members, hash_type, replication = self.ring()
        args = ["--hash", hash_type, "--replication", str(replication)]
        for member in members:
            args += ["--member", member]
        return args

    def relay_ports(self) -> dict[str, int]:
        """The relays' line, pickle and statsd ports (their roles' variables)."""
        # The public line port is the relay front's (roles/pickle_relay), not
        # carbon-c-relay's, which sits behind it on loopback.
        pickle_listen = str(self.tier_var("relays", "pickle_relay_listen", ":2004"))
        line_listen = str(self.tier_var("relays", "pickle_relay_line_listen", ":2003"))
        return {
            "line": int(line_listen.rpartition(":")[2]),
            "pickle": int(pickle_listen.rpartition(":")[2]),
            "statsd": int(self.tier_var("relays", "statsd_relay_port", 8125)),
        }

    def address(self, host: str) -> str:
        from carbonscale import CarbonscaleError
        from carbonscale.inventory import host_address

        try:
            return host_address(host, self.hostvars)
        except CarbonscaleError as exc:
            raise Exit(f"fab: error: {exc}", code=2) from None

    def connection(self, host: str) -> Connection:
        hv = self.hostvars[host]
        key = hv.get("ansible_ssh_private_key_file") or hv.get("ansible_private_key_file")
        return Connection(
            host=str(hv.get("ansible_host", host)),
            port=int(hv.get("ansible_port", 22)),
            user=hv.get("ansible_user"),
            connect_timeout=CONNECT_TIMEOUT,
            connect_kwargs={"key_filename": key, "look_for_keys": not key} if key else {},
        )

    def carbonscale(self, host: str) -> str:
        venv = self.var(host, "carbonscale_venv", "/opt/carbonscale/venv")
        return f"{venv}/bin/carbonscale"


def connect_failure(exc: Exception) -> str:
    """Why a connection failed, in the socket's words (paramiko wraps them)."""
    errors = getattr(exc, "errors", None)  # NoValidConnectionsError: per address
    if errors:
        exc = next(iter(errors.values()))
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def run_everywhere(cluster: Cluster, hosts: list[str], command_of) -> tuple[dict, dict]:
    """Run command_of(host) on every host in parallel: (JSON answers, failures)."""

    def one(host: str):
        command = command_of(host)
        try:
            with cluster.connection(host) as connection:
                result = connection.run(command, hide=True, warn=True, in_stream=False)
        except Exception as exc:
            hv = cluster.hostvars[host]
            where = f"{hv.get('ansible_host', host)}:{hv.get('ansible_port', 22)}"
            return host, None, f"cannot reach {where}: {connect_failure(exc)}"
        if result.exited != 0:
            lines = result.stderr.strip().splitlines() or [f"exit {result.exited}"]
            return host, None, lines[-1]
        try:
            return host, json.loads(result.stdout), None
        except ValueError:
            return host, None, f"not a JSON answer: {result.stdout[:200]!r}"

    answers, failures = {}, {}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        for host, answer, failure in pool.map(one, hosts):
            if failure is None:
                answers[host] = answer
            else:
                failures[host] = failure
    return answers, failures


def report(merged, table: str, failures: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(merged, indent=1, sort_keys=True, default=str))
    elif table:
        print(table)
    for host, reason in sorted(failures.items()):
        print(f"fab: {host}: {reason}", file=sys.stderr)
    if failures:
        raise Exit(code=1)


def _verb(cluster: Cluster, host: str, verb: str, *args: str) -> str:
    return shlex.join([cluster.carbonscale(host), "ops", verb, *args, "--json"])


def _root(cluster: Cluster, host: str) -> list[str]:
    return [
        "--root",
        str(cluster.var(host, "carbon_storage_whisper_dir", "/var/lib/graphite/whisper")),
    ]


@task(iterable=["metric"], help={"metric": "a metric name (repeat)", **COMMON_HELP})
def lookup(c, metric, inventory=DEFAULT_INVENTORY, on="storage", json=False):
    """Where metrics live: owners, their files, stray copies.

    Owners of each metric by the ring; on each owner, the file's size and newest
    point; every stray copy on other hosts."""
    from carbonscale.ops.lookup import lookup_table, merge_lookups

    if not metric:
        raise Exit("fab: error: give at least one --metric NAME", code=2)
    cluster = Cluster(inventory)
    hosts = cluster.select(on)
    ring = cluster.ring_args()
    answers, failures = run_everywhere(
        cluster,
        hosts,
        lambda h: _verb(
            cluster, h, "lookup", *_root(cluster, h), *ring, "--self", cluster.address(h), *metric
        ),
    )
    merged = merge_lookups(answers)
    report(merged, lookup_table(merged), failures, json)


@task(help={"window": "growth window in seconds (default a day)", **COMMON_HELP})
def du(c, inventory=DEFAULT_INVENTORY, on="storage", window=86400, json=False):
    """Which host fills up next: bytes, free space, growth, full date.

    Whisper bytes and files per host (per instance where they differ), free space,
    growth over the window and the date each host fills up, soonest first."""
    from carbonscale.ops.du import du_table

    cluster = Cluster(inventory)
    hosts = cluster.select(on)
    ring = cluster.ring_args()

    def command(host: str) -> str:
        state = cluster.var(host, "migrate_transport_state_dir", "/var/lib/carbonscale/migrate")
        history = os.path.join(os.path.dirname(str(state).rstrip("/")), "du-history.json")
        return _verb(cluster, host, "du", *_root(cluster, host), *ring,
                     "--self", cluster.address(host), "--history", history,
                     "--window", str(window))  # fmt: skip

    answers, failures = run_everywhere(cluster, hosts, command)
    report(answers, du_table(answers), failures, json)


@task(help={"list": "name every such metric", **COMMON_HELP})
def inconsistent(c, inventory=DEFAULT_INVENTORY, on="storage", list=False, json=False):
    """Files on hosts that do not own them, per host.

    What a migration's cleanup removes; --list names them."""
    from carbonscale.ops.inconsistent import inconsistent_table

    cluster = Cluster(inventory)
    hosts = cluster.select(on)
    ring = cluster.ring_args()
    extra = ["--list"] if list else []
    answers, failures = run_everywhere(
        cluster,
        hosts,
        lambda h: _verb(
            cluster,
            h,
            "inconsistent",
            *_root(cluster, h),
            *ring,
            "--self",
            cluster.address(h),
            *extra,
        ),
    )
    report(answers, inconsistent_table(answers, list), failures, json)


@task(
    name="hot-metrics",
    help={
        "seconds": "capture the relays' line, pickle and statsd traffic this long (tcpdump)",
        "pcap": "analyse this capture file here instead",
        "top": "metrics and prefixes shown",
        **COMMON_HELP,
    },
)
def hot_metrics(c, seconds=0, pcap="", inventory=DEFAULT_INVENTORY, on="relays", top=20,
                json=False):  # fmt: skip
    """Top metrics and prefixes by points/s, load per instance.

    From the relays' traffic (--seconds) or a capture file (--pcap): top metrics
    and prefixes by points/s, and the load each storage instance (by the ring) and
    statsd daemon (by the statsd relay) would get from them."""
    from carbonscale import CarbonscaleError
    from carbonscale.inventory import backends_from_inventory
    from carbonscale.ops import hotmetrics

    if bool(seconds) == bool(pcap):
        raise Exit("fab: error: give --seconds N or --pcap FILE", code=2)
    cluster = Cluster(inventory)
    ring = cluster.ring_args()
    relays = cluster.groups.get("relays", [])
    try:
        backends = backends_from_inventory(relays, cluster.hostvars) if relays else []
    except CarbonscaleError as exc:
        raise Exit(f"fab: error: statsd backends: {exc}", code=2) from None
    statsd = [arg for spec in backends for arg in ("--statsd-backend", spec)]
    ports = cluster.relay_ports()
    port_args = [a for kind, port in ports.items() for a in (f"--{kind}-port", str(port))]
    if pcap:
        from carbonscale.ring.build import make_ring

        members, hash_type, replication = cluster.ring()
        allowed = str(cluster.tier_var("relays", "carbon_relay_allowed_chars", "-_:#"))
        try:
            decoder = hotmetrics.decode_capture(
                pcap, hotmetrics.Decoder([ports["line"]], [ports["pickle"]], [ports["statsd"]])
            )
            answer = hotmetrics.analyse(
                decoder, make_ring(members, hash_type, "carbon-c-relay", replication),
                allowed.encode(), backends, None, 0,
            )  # fmt: skip
        except CarbonscaleError as exc:
            raise Exit(f"fab: error: {exc}", code=2) from None
        answers, failures = {"capture": answer}, {}
    else:
        hosts = cluster.select(on)
        answers, failures = run_everywhere(
            cluster,
            hosts,
            lambda h: _verb(
                cluster,
                h,
                "hot-metrics",
                "--seconds",
                str(seconds),
                "--top",
                "0",
                *ring,
                *statsd,
                *port_args,
            ),
        )
    merged = hotmetrics.merge_hot(answers, int(top))
    report(merged, hotmetrics.hot_table(merged), failures, json)


@task(help=COMMON_HELP)
def relays(c, inventory=DEFAULT_INVENTORY, on="storage", json=False):
    """Per relay: received, sent, dropped, queued.

    From the relays' own counters (carbon-c-relay, pickle relay, statsd relay),
    read in the storage hosts' whisper trees where they are stored."""
    from carbonscale.ops.relays import merge_relays, relays_table

    cluster = Cluster(inventory)
    hosts = cluster.select(on)
    answers, failures = run_everywhere(
        cluster, hosts, lambda h: _verb(cluster, h, "relays", *_root(cluster, h))
    )
    merged = merge_relays(answers)
    report(merged, relays_table(merged), failures, json)


@task(name="migration-status", help={"plan": "only this plan id", **COMMON_HELP})
def migration_status(c, inventory=DEFAULT_INVENTORY, on="storage", plan="", json=False):
    """Migration done / pending / failed per host, plan and phase.

    From each storage host's migration journal."""
    from carbonscale.ops.migration import migration_table

    cluster = Cluster(inventory)
    hosts = cluster.select(on)
    extra = ["--plan-id", plan] if plan else []

    def command(host: str) -> str:
        state = cluster.var(host, "migrate_transport_state_dir", "/var/lib/carbonscale/migrate")
        return _verb(cluster, host, "migration-status", "--state-dir", str(state), *extra)

    answers, failures = run_everywhere(cluster, hosts, command)
    report(answers, migration_table(answers), failures, json)


@task(
    # invoke's positional arguments cannot be optional: the instance is --instance.
    # inventory comes first in the signature so that -i is --inventory, as in
    # the other tasks.
    positional=["host"],
    help={
        "host": "a host (or group) of the inventory",
        "instance": "a carbon-cache instance there (default: every instance and carbonscale "
        "daemon running there)",
        "unit": "or a carbonscale daemon's unit, e.g. carbonscale-pickle-relay",
        "timeout": "seconds to wait for each dump (default 10)",
        "inventory": COMMON_HELP["inventory"],
        "json": COMMON_HELP["json"],
    },
)
def stacks(c, host, inventory=DEFAULT_INVENTORY, instance="", unit="", timeout=10, json=False):
    """Every thread's stack of carbon-cache instances and carbonscale daemons.

    Signals the daemon (SIGUSR2, whose handler the roles install), reads the
    dump back from its journal and prints it: what carbon's writer thread, or
    a relay's, is doing right now."""
    from carbonscale.ops.stacks import stacks_table

    cluster = Cluster(inventory)
    hosts = cluster.select(host)
    extra = ["--timeout", str(timeout)]
    if instance:
        for name in hosts:
            instances = [i.get("name") for i in cluster.var(name, "carbon_instances") or []]
            if instance not in instances:
                raise Exit(
                    f"fab: error: {name} has no carbon-cache instance {instance!r} "
                    f"(its carbon_instances: {', '.join(instances) or 'none'})",
                    code=2,
                )
        extra += ["--instance", instance]
    if unit:
        extra += ["--unit", unit]
    answers, failures = run_everywhere(
        cluster, hosts, lambda h: _verb(cluster, h, "stacks", *extra)
    )
    report(answers, stacks_table(answers), failures, json)

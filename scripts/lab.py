"""The lab behind `make lab` (run through scripts/lab.sh, with the venv's python).

    up       check, start the containers (playbooks/lab.yml), run site.yml, report
    status   the topology and where to send metrics
    check    only the checks: the inventory, and what on this machine is in the way
    destroy  remove the lab's containers and network (playbooks/lab-destroy.yml)
    expand   expand.yml adds the spare storage host while a stream goes through the VIP
    shrink   decommission.yml removes it again, the same way

Every lab host comes from the inventory (`ansible-inventory --list`): its
container is named ansible_host and gets carbonscale_address on one docker
network; nothing else lists the hosts. The lab publishes no host ports: the
controller reaches the hosts' addresses through the docker bridge. What can be
in the way is a docker network or a route of this machine overlapping the
lab's subnet, or a container with a lab host's name that the lab did not make.

The smoke test is the cluster scenario's placement test
(molecule/cluster/tests/test_placement.py) run against the lab inventory: one
check, two users. So are expand and shrink: the cluster scenario's lifecycle
check (molecule/cluster/tests/test_lifecycle.py) with one move, uninterrupted.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Label value on every container and network the lab creates; destroy removes
# exactly those.
OWNER = "carbonscale-lab"
PLACEMENT_TEST = "molecule/cluster/tests/test_placement.py"
LIFECYCLE_TEST = "molecule/cluster/tests/test_lifecycle.py"


class LabError(Exception):
    """Something the user must fix; the message says what to do."""


@dataclass(frozen=True)
class LabHost:
    name: str
    container: str
    address: str
    groups: tuple[str, ...]
    # lvs_vips as Ansible resolves it for this host (group_vars included).
    vips: tuple[str, ...] = ()


def inventory_path() -> str:
    return os.environ.get("CARBONSCALE_LAB_INVENTORY", "inventories/lab")


def network_name() -> str:
    return os.environ.get("CARBONSCALE_LAB_NETWORK", "carbonscale-lab")


def ansible_env() -> dict[str, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def read_inventory(inventory: str) -> dict:
    proc = subprocess.run(
        [BIN / "ansible-inventory", "-i", inventory, "--list"],
        cwd=ROOT,
        env=dict(ansible_env(), ANSIBLE_VERBOSITY="0"),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LabError(f"cannot read the inventory {inventory}: {last}")
    return json.loads(proc.stdout)


def lab_hosts(inventory: dict, source: str) -> list[LabHost]:
    """The lab's hosts in inventory order, each with every group it is in."""
    order: list[str] = []
    member_of: dict[str, list[str]] = {}

    def walk(group: str) -> None:
        node = inventory.get(group, {})
        for host in node.get("hosts", []):
            if host not in member_of:
                order.append(host)
                member_of[host] = []
            if group not in ("all", "ungrouped") and group not in member_of[host]:
                member_of[host].append(group)
        for child in node.get("children", []):
            walk(child)

    walk("all")
    hostvars = inventory.get("_meta", {}).get("hostvars", {})
    hosts = []
    for name in order:
        found = hostvars.get(name, {})
        for var in ("ansible_host", "carbonscale_address"):
            if not found.get(var):
                raise LabError(
                    f"{name} has no {var} in {source}: the lab names each host's container "
                    f"after ansible_host and gives it carbonscale_address; set both in hosts.yml"
                )
        hosts.append(
            LabHost(
                name,
                found["ansible_host"],
                found["carbonscale_address"],
                tuple(member_of[name]),
                tuple(str(vip) for vip in found.get("lvs_vips") or ()),
            )
        )
    if not hosts:
        raise LabError(f"the inventory {source} has no hosts")
    return hosts


def lab_subnet(hosts: list[LabHost], source: str) -> ipaddress.IPv4Network:
    """The one /24 every lab address is in; docker's gateway takes .1."""
    try:
        addresses = {h.name: ipaddress.IPv4Address(h.address) for h in hosts}
    except ipaddress.AddressValueError as exc:
        raise LabError(f"{source}: {exc}; carbonscale_address must be an IPv4 address") from exc
    subnets = {ipaddress.IPv4Network(f"{a}/24", strict=False) for a in addresses.values()}
    if len(subnets) != 1:
        found = ", ".join(sorted(str(s) for s in subnets))
        raise LabError(
            f"the lab's hosts must share one /24 (one docker network), but {source} spreads "
            f"them over {found}: give every host an address in the same /24"
        )
    (subnet,) = subnets
    reserved = {subnet.network_address, subnet.network_address + 1, subnet.broadcast_address}
    for name, address in addresses.items():
        if address in reserved:
            raise LabError(
                f"{name}: {address} is the network, gateway (.1) or broadcast address of {subnet}; "
                f"give it another address in {source}"
            )
    for attr in ("address", "container"):
        values = [getattr(h, attr) for h in hosts]
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise LabError(f"{source}: more than one host has the {attr} {', '.join(dupes)}")
    return subnet


def docker(*args: str) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"docker {' '.join(args[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout


def docker_inspect(kind: str, ids: list[str]) -> list[dict]:
    """Each object that still exists: one listed a moment ago may be gone now
    (another tool removing its network), and that is not an error."""
    found = []
    for ident in ids:
        proc = subprocess.run(["docker", kind, "inspect", ident], capture_output=True, text=True)
        if proc.returncode == 0:
            found += json.loads(proc.stdout)
        elif "not found" not in proc.stderr and "No such" not in proc.stderr:
            raise LabError(f"docker {kind} inspect failed: {proc.stderr.strip()}")
    return found


def owner_of(obj: dict) -> str:
    labels = obj.get("Labels") or obj.get("Config", {}).get("Labels") or {}
    return labels.get("owner", "")


def conflicts(hosts: list[LabHost], subnet, network: str, source: str) -> list[str]:
    """What on this machine is in the lab's way, each as a message saying what to do."""
    problems = []
    nets = docker_inspect("network", docker("network", "ls", "-q").split())
    for net in nets:
        subnets = [
            ipaddress.ip_network(c["Subnet"], strict=False)
            for c in (net.get("IPAM") or {}).get("Config") or []
            if c.get("Subnet") and ":" not in c["Subnet"]
        ]
        name = net["Name"]
        if name == network:
            if owner_of(net) != OWNER:
                problems.append(
                    f"a docker network named {name} exists that the lab did not create: "
                    f"remove it (docker network rm {name}) if nothing needs it, or pick another "
                    f"name with CARBONSCALE_LAB_NETWORK=<name>"
                )
            elif subnet not in subnets:
                problems.append(
                    f"the lab's network {name} has {', '.join(map(str, subnets))} but {source} "
                    f"now puts the hosts in {subnet}: remove the old lab (make lab-destroy), "
                    "then make lab"
                )
            continue
        for other in subnets:
            if other.overlaps(subnet):
                problems.append(
                    f"docker network {name} uses {other}, which overlaps the lab's {subnet}: "
                    f"remove it (docker network rm {name}) if nothing needs it, or move the lab "
                    f"to a free /24 by changing the addresses in {source}/hosts.yml"
                )
    problems += route_conflicts(subnet, source)
    existing = set(docker("ps", "-a", "--format", "{{.Names}}").split())
    mine = [h.container for h in hosts if h.container in existing]
    for container in docker_inspect("container", mine):
        name = container["Name"].lstrip("/")
        if owner_of(container) != OWNER:
            problems.append(
                f"a container named {name} exists that the lab did not create "
                f"(image {container['Config']['Image']}): remove it (docker rm -f {name}) if "
                f"nothing needs it, or rename the lab host's ansible_host in {source}/hosts.yml"
            )
    return problems


def route_conflicts(subnet, source: str) -> list[str]:
    """Routes of this machine (a VPN, a LAN) into the lab's subnet; docker's own
    bridges are checked as docker networks above."""
    proc = subprocess.run(["ip", "-j", "-4", "route", "show"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(
            "lab: note: `ip -j route` failed; this machine's routes were not checked",
            file=sys.stderr,
        )
        return []
    problems = []
    for route in json.loads(proc.stdout or "[]"):
        dev = route.get("dev", "")
        if route.get("dst") in (None, "default") or dev.startswith(("br-", "docker")):
            continue
        other = ipaddress.ip_network(route["dst"], strict=False)
        if other.overlaps(subnet):
            problems.append(
                f"this machine routes {other} through {dev}, which overlaps the lab's {subnet}: "
                f"move the lab to a free /24 by changing the addresses in {source}/hosts.yml"
            )
    return problems


def ansible_playbook(playbook: str, inventory: str, extra_vars: dict | None = None, quiet=False):
    cmd = [str(BIN / "ansible-playbook"), "-i", inventory, playbook]
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    started = time.monotonic()
    # quiet: the output is shown only when the playbook fails.
    proc = subprocess.run(cmd, cwd=ROOT, env=ansible_env(), capture_output=quiet, text=True)
    if proc.returncode != 0:
        if quiet:
            print(proc.stdout + proc.stderr, file=sys.stderr)
        raise LabError(f"{' '.join(cmd[1:4])} failed (exit {proc.returncode}); the reason is above")
    return time.monotonic() - started


# The relays are LVS direct-routing real servers: the VIP on lo must never be
# answered for in ARP. A container's /proc/sys is read-only, so docker sets
# these at creation; roles/lvs_realserver persists them and finds them set.
REALSERVER_SYSCTLS = {
    f"net.ipv4.conf.{dev}.{key}": value
    for dev in ("all", "lo")
    for key, value in (("arp_ignore", "1"), ("arp_announce", "2"))
}


def lab_vars(hosts: list[LabHost], network: str) -> dict:
    return {
        "lab_owner": OWNER,
        "lab_network": network,
        "lab_containers": [
            {
                "name": h.container,
                "networks": [{"name": network, "ipv4_address": h.address}],
                **({"sysctls": REALSERVER_SYSCTLS} if "relays" in h.groups else {}),
            }
            for h in hosts
        ],
    }


def load(check_conflicts: bool):
    source = inventory_path()
    hosts = lab_hosts(read_inventory(source), source)
    subnet = lab_subnet(hosts, source)
    network = network_name()
    if check_conflicts:
        problems = conflicts(hosts, subnet, network, source)
        if problems:
            raise LabError(
                "something on this machine is in the lab's way:\n  - " + "\n  - ".join(problems)
            )
    return source, hosts, subnet, network


def container_state(container: str) -> str:
    proc = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Status}}", container], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else "absent"


def listening(container: str) -> dict[str, list[int]]:
    """Ports a host listens on beyond loopback, measured with ss inside it."""
    proc = subprocess.run(
        ["docker", "exec", container, "ss", "-Hltnu"], capture_output=True, text=True
    )
    ports: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] not in ports:
            continue
        address, _, port = fields[4].rpartition(":")
        if address.strip("[]").startswith(("127.", "::1")):
            continue
        ports[fields[0]].add(int(port))
    return {proto: sorted(found) for proto, found in ports.items()}


def topology(hosts, subnet, network, source) -> tuple[str, dict[str, dict[str, list[int]]]]:
    rows = [("host", "groups", "container", "address", "state", "listening (beyond loopback)")]
    ports = {}
    for h in hosts:
        state = container_state(h.container)
        ports[h.name] = listening(h.container) if state == "running" else {"tcp": [], "udp": []}
        shown = "; ".join(
            f"{proto} {' '.join(map(str, found))}"
            for proto, found in ports[h.name].items()
            if found
        )
        rows.append((h.name, ",".join(h.groups), h.container, h.address, state, shown or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        f"The lab: {len(hosts)} hosts from {source} on docker network {network} ({subnet})",
        "",
    ]
    for row in rows:
        lines.append(
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )
    return "\n".join(lines), ports


def where_to_send(hosts, ports) -> str:
    """Where metrics go in, from what actually listens (not from what should)."""
    front = {"tcp 2003 (line)": [], "tcp 2004 (pickle)": [], "udp 8125 (statsd)": []}
    for h in hosts:
        if "relays" not in h.groups and "lvs" not in h.groups:
            continue
        for label, proto, port in (
            ("tcp 2003 (line)", "tcp", 2003),
            ("tcp 2004 (pickle)", "tcp", 2004),
            ("udp 8125 (statsd)", "udp", 8125),
        ):
            if port in ports[h.name][proto]:
                front[label].append(f"{h.address}:{port}")
    lines = ["Where to send metrics:"]
    if any(front.values()):
        lines += [f"  {label}: {', '.join(a) or 'nothing listens'}" for label, a in front.items()]
        vips = sorted({vip for h in hosts if "lvs" in h.groups for vip in h.vips})
        if vips:
            lines.append(
                f"  LVS VIP {', '.join(vips)}: tcp 2003, tcp 2004, udp 8125 (the front door:"
                " the virtual services of the VRRP master)"
            )
    else:
        lines.append("  no relay listens on 2003/2004/8125 yet (the relay tier is not deployed).")
        direct = [
            f"{h.address}:{p}"
            for h in hosts
            if "storage" in h.groups
            for p in ports[h.name]["tcp"]
            if p not in (8080,)
        ]
        if direct:
            lines.append(f"  storage nodes listen directly on: {', '.join(direct)}")
    web = [
        f"http://{h.address}:8080/"
        for h in hosts
        if 8080 in ports[h.name]["tcp"] and "query" in h.groups
    ]
    if web:
        lines.append(f"Graphite-web (query nodes): {', '.join(web)}")
        lines.append(f"Cluster dashboard: {web[0]}dashboard/carbonscale")
    return "\n".join(lines)


def smoke(source: str) -> tuple[str, str]:
    """Run the placement test against the lab: (passed|failed|not checked, what it checked)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "smoke.json"
        proc = subprocess.run(
            [
                str(BIN / "pytest"),
                "-p",
                "no:cacheprovider",
                "-q",
                "-rs",
                "--connection=ansible",
                f"--ansible-inventory={source}",
                PLACEMENT_TEST,
            ],
            cwd=ROOT,
            env=dict(ansible_env(), CARBONSCALE_SMOKE_REPORT=str(report)),
            capture_output=True,
            text=True,
        )
        found = json.loads(report.read_text()) if report.exists() else {}
    status, lines = found.get("status", "failed"), found.get("lines", [])
    if proc.returncode != 0:
        status = "failed"
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
        lines = [*lines, "the placement test failed:", *tail]
    return status, "\n".join(lines)


def cmd_check() -> int:
    source, hosts, subnet, network = load(check_conflicts=True)
    print(f"lab: {len(hosts)} hosts in {source}; nothing in the way of {network} ({subnet})")
    return 0


def cmd_up() -> int:
    started = time.monotonic()
    source = inventory_path()
    print(f"lab: checking the inventory {source} (playbooks/preflight.yml)", flush=True)
    ansible_playbook("playbooks/preflight.yml", source, quiet=True)
    source, hosts, subnet, network = load(check_conflicts=True)
    print(f"lab: starting {len(hosts)} hosts on {network} ({subnet})", flush=True)
    took = ansible_playbook("playbooks/lab.yml", source, lab_vars(hosts, network))
    print(
        f"lab: hosts up in {took:.0f} s; deploying: ansible-playbook -i {source} site.yml",
        flush=True,
    )
    took = ansible_playbook("site.yml", source)
    print(f"lab: site.yml converged in {took:.0f} s", flush=True)
    table, ports = topology(hosts, subnet, network, source)
    print("\n" + table + "\n")
    print(where_to_send(hosts, ports) + "\n")
    print(
        "Smoke test (metrics sent to the front door, found on disk where the ring says):",
        flush=True,
    )
    status, what = smoke(source)
    print("  " + what.replace("\n", "\n  "))
    outcome = {
        "passed": "ready, smoke test passed",
        "not checked": "deployed; smoke test NOT CHECKED (tiers missing, see above)",
    }.get(status, "deployed, but the smoke test FAILED")
    print(
        f"\nlab: {outcome}, in {time.monotonic() - started:.0f} s. Remove it with: make lab-destroy"
    )
    return 1 if status == "failed" else 0


def move(verb: str) -> int:
    """Run the lifecycle check's one move against the lab, its report printed as
    it comes: points sent, found on their owners, lost, left on non-owners, the
    longest gap a graph showed, each phase's time and files/s."""
    source, hosts, _, _ = load(check_conflicts=False)
    if not any("storage_spare" in h.groups for h in hosts):
        raise LabError(f"{source} has no host in group storage_spare to add or remove")
    print(f"lab: {verb}: ansible-playbook {'expand' if verb == 'expand' else 'decommission'}.yml"
          " under a stream through the VIP (about 10 minutes)", flush=True)  # fmt: skip
    proc = subprocess.run(
        [str(BIN / "pytest"), "-p", "no:cacheprovider", "-q", "-s", "--connection=ansible",
         f"--ansible-inventory={source}", LIFECYCLE_TEST],
        cwd=ROOT,
        env=dict(ansible_env(), CARBONSCALE_LAB_MOVE=verb),
    )  # fmt: skip
    if proc.returncode != 0:
        print(f"lab: {verb} FAILED (the check's report is above)", file=sys.stderr)
        return 1
    print(
        f"lab: {verb} done."
        + (" `make lab-shrink` takes the spare out again." if verb == "expand" else "")
    )
    return 0


def cmd_expand() -> int:
    return move("expand")


def cmd_shrink() -> int:
    return move("shrink")


def cmd_status() -> int:
    source, hosts, subnet, network = load(check_conflicts=False)
    table, ports = topology(hosts, subnet, network, source)
    print(table + "\n")
    print(where_to_send(hosts, ports))
    return 0


def cmd_destroy() -> int:
    source = inventory_path()
    ansible_playbook("playbooks/lab-destroy.yml", source, {"lab_owner": OWNER})
    print("lab: removed (containers and network labelled owner=carbonscale-lab)")
    return 0


def main(argv: list[str]) -> int:
    verbs = {
        "up": cmd_up,
        "status": cmd_status,
        "check": cmd_check,
        "destroy": cmd_destroy,
        "expand": cmd_expand,
        "shrink": cmd_shrink,
    }
    if len(argv) != 1 or argv[0] not in verbs:
        print(f"usage: lab.py {{{','.join(verbs)}}}", file=sys.stderr)
        return 2
    try:
        return verbs[argv[0]]()
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

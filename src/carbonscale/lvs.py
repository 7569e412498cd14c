"""The LVS tier's decisions: service checks, the data path, keepalived's config test.

- `service_errors`: what IPVS or keepalived would do wrong with a service list
  (port clashes, UDP with persistence, unknown schedulers, a VIP outside every
  network of the director), as one clear message per problem.
- `resolve_engine`: `auto` takes IPVS when the kernel has it and the userspace
  data path (nginx stream) when it has not, with the reason; `ipvs` on a kernel
  without IPVS is an error.
- `keepalived_config_test`: `keepalived --config-test`, working around
  keepalived 2.2.7 killing its own config test whenever a script runs as a
  non-root user (keepalived issues #2587 and #2617, fixed in 2.2.8).
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import subprocess
import tempfile
from dataclasses import dataclass

from carbonscale import CarbonscaleError

# The schedulers of the IPVS kernel modules (ip_vs_<name>) keepalived accepts.
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh")
# A service without a scheduler: keepalived's and the userspace pool's.
DEFAULT_SCHEDULER = "wlc"
METHODS = ("DR", "NAT", "TUN")
PROTOCOLS = ("TCP", "UDP")
CHECKS = ("tcp", "statsd")
ENGINES = ("auto", "ipvs", "nginx")
IPVS_PROC = "/proc/net/ip_vs"


def _where(index: int, service: dict) -> str:
    name = service.get("name") if isinstance(service, dict) else None
    return f"lvs_director_services[{index}]" + (f" ({name})" if name else "")


def service_errors(services: list, vips: list, networks: list[str] | None = None) -> list[str]:
    """Every problem of a service list, one message each; empty when it is fine.

    `networks` are the director's interface networks (`10.0.0.0/24`); a VIP
    outside all of them would never be answered for (ARP on a link the VIP
    is not part of). None skips that check (no facts).
    """
    errors: list[str] = []
    if not isinstance(services, list) or not services:
        return ["lvs_director_services must be a non-empty list of services"]
    if not isinstance(vips, list) or not vips:
        errors.append("lvs_vips must list at least one virtual IP address")
        vips = []
    parsed_networks = [ipaddress.ip_network(n, strict=False) for n in networks or []]
    for vip in vips:
        try:
            address = ipaddress.ip_address(str(vip))
        except ValueError:
            errors.append(f"lvs_vips: {vip!r} is not an IP address")
            continue
        if networks is not None and not any(address in net for net in parsed_networks):
            errors.append(
                f"lvs_vips: {vip} is outside every network of this director "
                f"({', '.join(networks) or 'no IPv4 networks'}): no interface could answer for it"
            )
    seen: dict[tuple[str, int], str] = {}
    for index, service in enumerate(services):
        where = _where(index, service)
        if not isinstance(service, dict):
            errors.append(f"{where} must be a mapping")
            continue
        protocol = str(service.get("protocol", "")).upper()
        port = service.get("port")
        if protocol not in PROTOCOLS:
            errors.append(f"{where}: protocol must be TCP or UDP, got {service.get('protocol')!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            errors.append(f"{where}: port must be in 1-65535, got {port!r}")
        elif protocol in PROTOCOLS:
            key = (protocol, port)
            if key in seen:
                errors.append(f"{where}: {protocol} port {port} is already used by {seen[key]}")
            else:
                seen[key] = where
        scheduler = service.get("scheduler", DEFAULT_SCHEDULER)
        if scheduler not in SCHEDULERS:
            errors.append(
                f"{where}: unknown scheduler {scheduler!r} (IPVS has {', '.join(SCHEDULERS)})"
            )
        method = str(service.get("method", "DR")).upper()
        if method not in METHODS:
            errors.append(f"{where}: method must be one of {', '.join(METHODS)}, got {method!r}")
        persistence = service.get("persistence_timeout", 0) or 0
        if protocol == "UDP" and persistence:
            errors.append(
                f"{where}: UDP with persistence_timeout {persistence} would pin every "
                "datagram of a client to one relay; statsd needs one-packet scheduling "
                "(ops) and no persistence"
            )
        if service.get("ops") and protocol != "UDP":
            errors.append(f"{where}: ops (one-packet scheduling) is for UDP services only")
        check = service.get("check", "tcp")
        if check not in CHECKS:
            errors.append(f"{where}: check must be one of {', '.join(CHECKS)}, got {check!r}")
        elif check == "tcp" and protocol == "UDP":
            errors.append(
                f"{where}: a UDP service needs check statsd (an admin port), "
                "a TCP connect says nothing about a UDP listener"
            )
    return errors


def interface_networks(facts: dict) -> list[str]:
    """IPv4 networks of every interface in Ansible facts (primary and secondary)."""
    networks = []
    for name in facts.get("interfaces", []):
        iface = facts.get(name.replace("-", "_"), {})
        for addr in [iface.get("ipv4"), *iface.get("ipv4_secondaries", [])]:
            if isinstance(addr, dict) and addr.get("network") and addr.get("netmask"):
                net = ipaddress.ip_network(f"{addr['network']}/{addr['netmask']}", strict=False)
                # The VIP itself, held by a master as a /32, is no network.
                if net.prefixlen < 32 and str(net) not in networks:
                    networks.append(str(net))
    return networks


def ipvs_available(proc: str = IPVS_PROC) -> tuple[bool, str]:
    """Whether this kernel has IPVS (loading ip_vs when it is a module), and why not."""
    if os.path.exists(proc):
        return True, f"{proc} exists"
    try:
        loaded = subprocess.run(
            ["modprobe", "ip_vs"], capture_output=True, text=True, timeout=30, check=False
        )
        detail = loaded.stderr.strip() or f"modprobe exited {loaded.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        detail = f"modprobe ip_vs could not run: {exc}"
    if os.path.exists(proc):
        return True, "loaded the ip_vs module"
    return False, f"the kernel has no IPVS ({proc} is missing; {detail})"


@dataclass
class Engine:
    name: str  # ipvs or nginx
    warning: str | None = None


def resolve_engine(requested: str, has_ipvs: bool, reason: str) -> Engine:
    """The data path to deploy for `lvs_engine` on a kernel with or without IPVS."""
    if requested not in ENGINES:
        raise CarbonscaleError(f"lvs_engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    if requested == "nginx":
        return Engine("nginx")
    if has_ipvs:
        return Engine("ipvs")
    if requested == "ipvs":
        raise CarbonscaleError(
            f"lvs_engine is ipvs but {reason}: load ip_vs on a kernel that has it, "
            "or set lvs_engine: auto (or nginx) for the userspace data path"
        )
    return Engine(
        "nginx",
        warning=(
            f"{reason}: the virtual servers run in userspace (nginx stream, TCP and UDP) "
            "and keepalived does VRRP only; set lvs_engine: ipvs to refuse this"
        ),
    )


# keepalived 2.2.7's config test kills itself (SIGTERM, exit 143) whenever a
# script would run as a non-root user: the script-security check signals a
# main pid that a config test never set. 2.2.8 fixed it (commit aae8e91).
_SCRIPT_USER = re.compile(r"^(\s*script_user)\s+(\S+).*$", re.MULTILINE)


def _version(text: str) -> tuple[int, ...]:
    match = re.search(r"Keepalived v(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


def keepalived_config_test(path: str, keepalived: str = "keepalived") -> tuple[int, str]:
    """Run `keepalived --config-test -f path`; (exit code, what it printed).

    On keepalived < 2.2.8 a config with a non-root script user is tested as a
    copy whose script_user is root: the same parse, and root's script
    security rules are the stricter ones (no path component writable by
    anyone but root).
    """
    try:
        version = subprocess.run(
            [keepalived, "--version"], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise CarbonscaleError(f"cannot run {keepalived}: {exc.strerror}") from exc
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise CarbonscaleError(f"cannot read {path}: {exc.strerror}") from exc
    target = path
    copy = None
    script_user = _SCRIPT_USER.search(text)
    if _version(version.stdout + version.stderr) < (2, 2, 8) and script_user:
        # The one check the root copy would skip: keepalived refuses a
        # script user that does not exist.
        try:
            pwd.getpwnam(script_user.group(2))
        except KeyError:
            return 1, f"{path}: script_user {script_user.group(2)} does not exist\n"
        fd, copy = tempfile.mkstemp(prefix=".config-test-", dir=os.path.dirname(path) or ".")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(_SCRIPT_USER.sub(r"\1 root", text))
        target = copy
    try:
        result = subprocess.run(
            [keepalived, "--config-test", "-f", target],
            capture_output=True,
            text=True,
            check=False,
            # Its own process group: a config test that signals its group
            # must not take the caller with it.
            start_new_session=True,
        )
    finally:
        if copy:
            os.unlink(copy)
    output = result.stdout + result.stderr
    return result.returncode, output.replace(copy, path) if copy else output

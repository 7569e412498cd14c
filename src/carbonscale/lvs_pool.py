"""The userspace LVS pool: real servers behind nginx's stream module.

Where the kernel has no IPVS, the lvs_director role runs this daemon
(`carbonscale health pool CONFIG`): it checks every real server with the
probes of `carbonscale.health` through flap damping (`carbonscale.flap`) and
rewrites nginx's upstreams when the usable set changes, marking `down` the
servers that failed their check or are suppressed for flapping; nginx
validates every new file before the reload. A service never loses its last
server that is up to damping, and a host's planned restart (planned.json
next to the flap state) adds no penalty.

Every round also proves this director's own data path: a connection through
nginx to a relay on each TCP service port (`carbonscale.health.proxied_path`).
The verdict goes to a status file (`ok EPOCH` or `fail EPOCH why`) that
keepalived's track script only reads: a fork of a tiny shell script, light
on a loaded machine, where a Python check per second timed out. A status
that is old (this daemon stuck or gone) fails the track script too.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from carbonscale import CarbonscaleError
from carbonscale.atomicfile import write_atomically
from carbonscale.flap import (
    FlapDamper,
    FlapStore,
    PlannedRestarts,
    key_host,
    last_resort,
)
from carbonscale.health import PROBES, damper_from, proxied_path
from carbonscale.lvs import DEFAULT_SCHEDULER

log = logging.getLogger("carbonscale.lvs_pool")

# IPVS schedulers and the nginx upstream balancing that comes closest. nginx
# has no per-datagram scheduling knob: with `proxy_responses 0` every UDP
# datagram is its own session, which is what IPVS's `ops` does.
NGINX_BALANCE = {
    "rr": "",
    "wrr": "",
    "fo": "",
    "ovf": "",
    "lc": "least_conn;",
    "wlc": "least_conn;",
    "lblc": "least_conn;",
    "lblcr": "least_conn;",
    "sed": "least_conn;",
    "nq": "least_conn;",
    "sh": "hash $remote_addr consistent;",
    "dh": "hash $remote_addr consistent;",
    "mh": "hash $remote_addr consistent;",
}


@dataclass
class PoolService:
    name: str
    protocol: str
    port: int
    scheduler: str
    persistence_timeout: int
    check: str
    check_port: int
    servers: list[tuple[str, int]]  # (address, weight)

    @property
    def upstream(self) -> str:
        return f"carbonscale_{self.name}"

    @property
    def balance(self) -> str:
        # Persistence keeps a client on one server: hash on its address.
        if self.persistence_timeout > 0:
            return "hash $remote_addr consistent;"
        return NGINX_BALANCE[self.scheduler]

    def key(self, address: str) -> str:
        return f"{self.check}/{address}:{self.check_port}"


@dataclass
class Pool:
    """Real servers behind nginx's stream module, checked with flap damping.

    Config (JSON, written by the lvs_director role): services [{name,
    protocol, port, scheduler, persistence_timeout, check, check_port,
    servers: [{address, weight}]}] (a service without servers takes the
    top-level `servers`), upstreams (the file nginx includes in its
    stream block), state (flap state file), interval, timeout, flap {...},
    test and reload (argv lists), path {status, ports, host, hold}: the
    proxied-path check of this director's nginx and its status file.
    """

    services: list[PoolService]
    upstreams: str
    state_path: str
    damper: FlapDamper
    interval: float = 1.0
    timeout: float = 1.0
    test_cmd: list[str] = field(default_factory=lambda: ["nginx", "-t", "-q"])
    reload_cmd: list[str] = field(
        default_factory=lambda: ["systemctl", "try-reload-or-restart", "nginx"]
    )
    source: str = "?"
    path_status: str | None = None
    path_ports: list[int] = field(default_factory=list)
    path_host: str = "127.0.0.1"
    path_hold: float = 0.3

    @classmethod
    def load(cls, path: str) -> Pool:
        try:
            with open(path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except OSError as exc:
            raise CarbonscaleError(f"cannot read pool config {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise CarbonscaleError(f"pool config {path} is not JSON: {exc}") from exc
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "?") -> Pool:
        try:
            services = []
            for svc in raw["services"]:
                scheduler = svc.get("scheduler", DEFAULT_SCHEDULER)
                if scheduler not in NGINX_BALANCE:
                    raise CarbonscaleError(
                        f"{source}: service {svc['name']}: unknown scheduler {scheduler!r}"
                    )
                check = svc.get("check", "tcp")
                if check not in PROBES:
                    raise CarbonscaleError(
                        f"{source}: service {svc['name']}: unknown check {check!r}"
                    )
                protocol = svc["protocol"].upper()
                if protocol not in ("TCP", "UDP"):
                    raise CarbonscaleError(
                        f"{source}: service {svc['name']}: protocol must be TCP or UDP"
                    )
                services.append(
                    PoolService(
                        name=svc["name"],
                        protocol=protocol,
                        port=int(svc["port"]),
                        scheduler=scheduler,
                        persistence_timeout=int(svc.get("persistence_timeout", 0)),
                        check=check,
                        check_port=int(svc.get("check_port") or svc["port"]),
                        servers=[
                            (s["address"], int(s.get("weight", 1)))
                            for s in svc.get("servers", raw.get("servers", []))
                        ],
                    )
                )
            kwargs = {}
            if "test" in raw:
                kwargs["test_cmd"] = list(raw["test"])
            if "reload" in raw:
                kwargs["reload_cmd"] = list(raw["reload"])
            if raw.get("path"):
                path = raw["path"]
                kwargs["path_status"] = str(path["status"])
                kwargs["path_ports"] = [int(p) for p in path["ports"]]
                kwargs["path_host"] = str(path.get("host", "127.0.0.1"))
                kwargs["path_hold"] = float(path.get("hold", 0.3))
            return cls(
                services=services,
                upstreams=raw["upstreams"],
                state_path=raw["state"],
                damper=damper_from(raw.get("flap", {})),
                interval=float(raw.get("interval", 1.0)),
                timeout=float(raw.get("timeout", 1.0)),
                source=source,
                **kwargs,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CarbonscaleError(f"{source}: bad pool config: {exc!r}") from exc

    # -- checks

    def probe_all(self) -> dict[str, bool]:
        """Probe every distinct check target once, concurrently."""
        targets = {}
        for svc in self.services:
            for address, _ in svc.servers:
                targets[svc.key(address)] = (svc.check, address, svc.check_port)
        with ThreadPoolExecutor(max_workers=min(32, len(targets) or 1)) as pool:
            results = pool.map(
                lambda t: PROBES[t[0]](t[1], t[2], self.timeout), list(targets.values())
            )
            return dict(zip(targets, results, strict=True))

    def check_round(self, now: float | None = None) -> dict[str, bool]:
        """One round: probe, damp, persist; usable flag by check key."""
        probed = self.probe_all()
        now = time.time() if now is None else now
        planned = PlannedRestarts.beside(self.state_path).active(now)
        usable = {}
        with FlapStore(self.state_path) as store:
            for key, up in probed.items():
                usable[key] = self.damper.observe(
                    store.get(key), up, now, planned=key_host(key) in planned
                )
            for svc in self.services:
                keys = [svc.key(address) for address, _ in svc.servers]
                kept = last_resort([(k, store.get(k)) for k in keys], now, self.damper)
                if kept is not None:
                    usable[kept] = True
                    log.warning(
                        "%s: every server that is up is suppressed for flapping; "
                        "%s stays in the pool (lowest penalty)",
                        svc.name,
                        kept,
                    )
        return usable

    # -- nginx

    def render(self, usable: dict[str, bool] | None) -> str:
        """nginx upstream blocks; `usable` None puts every server in the pool."""
        lines = [
            "# Written by `carbonscale health pool "
            + self.source
            + "`: a server marked down failed its check",
            "# or is suppressed for flapping. Rewritten on every change; do not edit.",
        ]
        for svc in self.services:
            lines.append(f"upstream {svc.upstream} {{")
            if svc.balance:
                lines.append(f"    {svc.balance}")
            for address, weight in svc.servers:
                down = usable is not None and not usable.get(svc.key(address), False)
                mark = " down" if down else ""
                lines.append(f"    server {address}:{svc.port} weight={weight}{mark};")
            lines.append("}")
        return "\n".join(lines) + "\n"

    def current(self) -> str | None:
        try:
            with open(self.upstreams, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def _write(self, text: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.upstreams)), exist_ok=True)
        write_atomically(self.upstreams, text, 0o644)

    def init(self) -> bool:
        """Write the upstreams with every server in the pool unless the file
        already lists exactly the config's upstreams and servers (down or not).
        nginx needs the file to start, and a changed config must not leave it
        naming upstreams or servers that are gone. True when written."""
        everyone = self.render(None)
        current = self.current()
        if current is not None and current.replace(" down;", ";") == everyone:
            return False
        self._write(everyone)
        return True

    def apply(self, text: str) -> bool:
        """Install new upstreams: nginx validates before the reload; a refused
        file is put back as it was. True when nginx took it."""
        previous = self.current()
        self._write(text)
        test = subprocess.run(self.test_cmd, capture_output=True, text=True, check=False)
        if test.returncode != 0:
            log.error("nginx refused the new upstreams, kept the old ones: %s", test.stderr.strip())
            if previous is None:
                os.unlink(self.upstreams)
            else:
                self._write(previous)
            return False
        reload = subprocess.run(self.reload_cmd, capture_output=True, text=True, check=False)
        if reload.returncode != 0:
            log.error("reloading nginx failed: %s", reload.stderr.strip())
            return False
        return True

    def step(self, now: float | None = None, applied: str | None = None) -> str | None:
        """Check once and apply a changed pool. Returns the text nginx runs with."""
        usable = self.check_round(now)
        text = self.render(usable)
        if text != applied:
            for svc in self.services:
                for address, _ in svc.servers:
                    log.info(
                        "%s %s:%d %s",
                        svc.name,
                        address,
                        svc.port,
                        "in pool" if usable[svc.key(address)] else "out of pool",
                    )
            if self.apply(text):
                return text
            return None  # try again next round
        return applied

    # -- this director's own data path

    def check_path(self, now: float | None = None) -> tuple[bool, str]:
        """Probe nginx's proxied path on every path port; write the status file."""
        with ThreadPoolExecutor(max_workers=len(self.path_ports) or 1) as pool:
            results = list(
                pool.map(
                    lambda port: proxied_path(self.path_host, port, self.timeout, self.path_hold),
                    self.path_ports,
                )
            )
        verdicts = zip(self.path_ports, results, strict=True)
        failed = [f"{port}: {why}" for port, (ok, why) in verdicts if not ok]
        ok = not failed
        why = "; ".join(failed) or "every port proxies to a relay"
        stamp = int(time.time() if now is None else now)
        if self.path_status:
            os.makedirs(os.path.dirname(os.path.abspath(self.path_status)), exist_ok=True)
            line = f"ok {stamp}" if ok else f"fail {stamp} {why}"
            write_atomically(self.path_status, line + "\n", 0o644)
        return ok, why

    def run(self, rounds: int | None = None) -> None:
        applied = None
        done = 0
        path_ok = None
        while rounds is None or done < rounds:
            started = time.monotonic()
            applied = self.step(applied=applied)
            if self.path_ports:
                ok, why = self.check_path()
                if ok != path_ok:
                    (log.info if ok else log.error)("data path through nginx: %s", why)
                path_ok = ok
            done += 1
            if rounds is None or done < rounds:
                time.sleep(max(0.0, self.interval - (time.monotonic() - started)))

"""Health probes and pools shared by the LVS checks and the statsd relay.

statsd's admin port answers `health` with `health: up` (or `down`); Graphite's
TCP listeners are healthy when they accept a connection.

Every check of the LVS tier goes through the seed's flap damping
(`carbonscale.flap`): keepalived's MISC_CHECK runs `carbonscale health statsd`
once per check with its state kept in a file (`damped_check`), next to the
planned restarts (`carbonscale.flap.PlannedRestarts`); where the
kernel has no IPVS, the userspace pool daemon (`carbonscale.lvs_pool`,
`carbonscale health pool`) runs these probes itself.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

from carbonscale import CarbonscaleError
from carbonscale.flap import (
    FlapDamper,
    FlapState,
    FlapStore,
    PlannedRestarts,
    last_resort,
)

log = logging.getLogger("carbonscale.health")


def tcp_connect(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connection to host:port is accepted within `timeout`."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def statsd_admin_health(host: str, port: int, timeout: float = 1.0) -> bool:
    """Ask a statsd-style admin port `health`; True when the reply is `health: up`.

    A backend that accepts the connection but does not answer within
    `timeout` is down: a wedged daemon must leave the pool.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"health\n")
            reply = b""
            while b"\n" not in reply and len(reply) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    # statsd answers "health: up" or "health: down"; anything else (an error
    # line, a different service on that port) is not a healthy statsd.
    words = reply.split(b"\n", 1)[0].replace(b":", b" ").split()
    return words[-1:] == [b"up"]


def proxied_path(host: str, port: int, timeout: float = 1.0, hold: float = 0.3) -> tuple[bool, str]:
    """Whether a TCP proxy (the directors' nginx) on host:port reaches a relay.

    An accepting proxy proves nothing by itself: nginx accepts, then closes
    the client when it cannot open a socket to a relay (EMFILE) or reach
    any; a proxy out of descriptors does not accept at all and the kernel
    completes the handshake into the backlog. So: connect; the connection
    must stay open for `hold` seconds (nginx closes or resets at once when
    no relay can be reached); then half-close, and the proxy must answer
    with its own close within `timeout` (a connection nobody accepted never
    sees one). The relays speak only after their client, so no data is
    sent and none arrives. Returns (ok, what happened).
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return False, f"connect failed: {exc.strerror or exc}"
    with sock:
        sock.settimeout(hold)
        try:
            data = sock.recv(1)
        except TimeoutError:
            data = None  # still open: the proxy holds a connection to a relay
        except OSError as exc:
            return False, f"reset within {hold:g} s: {exc.strerror or exc}"
        if data == b"":
            return False, f"closed by the proxy within {hold:g} s (no relay reachable)"
        if data:
            return True, "the relay answered"
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        try:
            data = sock.recv(1)
        except TimeoutError:
            return False, (
                f"no close within {timeout:g} s of ours: the proxy never accepted "
                "the connection (out of descriptors?)"
            )
        except OSError as exc:
            return False, f"reset after our close: {exc.strerror or exc}"
    return True, "proxied to a relay and closed cleanly"


PROBES = {"tcp": tcp_connect, "statsd": statsd_admin_health}


def damper_from(params: dict) -> FlapDamper:
    """A FlapDamper from a mapping with optional half_life, reuse_limit,
    suppress_limit, penalty, max_penalty (the seed's values by default)."""
    known = {"half_life", "reuse_limit", "suppress_limit", "penalty", "max_penalty"}
    unknown = set(params) - known
    if unknown:
        raise CarbonscaleError(f"unknown flap parameter(s): {', '.join(sorted(unknown))}")
    return FlapDamper(**{k: float(v) for k, v in params.items() if v is not None})


@dataclass
class CheckResult:
    """One damped check: the raw probe result and whether the server may be used."""

    up: bool
    usable: bool
    state: FlapState
    release: float | None
    # Up and suppressed, but used: no other server of the service is usable.
    last_resort: bool = False

    def describe(self, damper: FlapDamper) -> str:
        if self.last_resort:
            return (
                f"up, suppressed for flapping (penalty {self.state.penalty:.1f}) but kept: "
                "no other server of this service is usable"
            )
        if self.usable:
            return "up"
        if not self.up:
            return f"down (penalty {self.state.penalty:.1f})"
        return (
            f"up but suppressed for flapping: penalty {self.state.penalty:.1f} "
            f"> reuse limit {damper.reuse_limit:g} until {self.release:.1f}"
        )


def damped_check(
    kind: str,
    host: str,
    port: int,
    damper: FlapDamper,
    state_path: str | None,
    timeout: float = 1.0,
    now: float | None = None,
    peer_max_age: float = 30.0,
) -> CheckResult:
    """Probe host:port once (`kind` tcp or statsd) through flap damping.

    With `state_path` the damping state is read from and written back to that
    file (keyed `kind/host:port`), so one-shot checkers such as keepalived's
    MISC_CHECK see every earlier run; without it the check is undamped. A
    change while the host's restart is planned (planned.json next to the
    state) adds no penalty. The other servers of the service are the store's
    entries of the same check and port checked within `peer_max_age` seconds;
    when none of them is usable, a suppressed server that is up may be the
    last resort (`carbonscale.flap.last_resort`).
    """
    try:
        probe = PROBES[kind]
    except KeyError:
        raise CarbonscaleError(f"unknown check {kind!r}: use one of {', '.join(PROBES)}") from None
    up = probe(host, port, timeout)
    if state_path is None:
        return CheckResult(up, up, FlapState(up=up), None)
    now = time.time() if now is None else now
    planned = host in PlannedRestarts.beside(state_path).active(now)
    key = f"{kind}/{host}:{port}"
    with FlapStore(state_path) as store:
        state = store.get(key)
        usable = damper.observe(state, up, now, planned=planned)
        kept = False
        if up and not usable:
            suffix = f":{port}"
            peers = [
                (name, st)
                for name, st in sorted(store.states.items())
                if name.startswith(f"{kind}/")
                and name.endswith(suffix)
                and (name == key or (st.updated is not None and now - st.updated <= peer_max_age))
            ]
            kept = last_resort(peers, now, damper) == key
        return CheckResult(up, usable or kept, state, damper.release_time(state), kept)

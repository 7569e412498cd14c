"""The statsd daemons behind the relay: `host:port[:admin_port]`, parsed once.

Light on purpose: the controller's statsd_backends filter (through
carbonscale.inventory) imports this and nothing of the daemon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from carbonscale import CarbonscaleError


@dataclass(frozen=True)
class Backend:
    """A statsd daemon: UDP `host:port`, and its admin port for health checks."""

    host: str
    port: int
    admin_port: int | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def spec(self) -> str:
        """The command-line form, `host:port[:admin_port]`."""
        return self.address + (f":{self.admin_port}" if self.admin_port else "")

    @property
    def metric_name(self) -> str:
        """The backend as one Graphite path component."""
        return "".join(c if c.isalnum() or c in "-" else "_" for c in self.address)

    def __str__(self) -> str:
        return self.spec


def _port(text: str, spec: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise CarbonscaleError(f"statsd backend {spec!r}: {what} {text!r} is not in 1-65535")
    return int(text)


def parse_backend(text: str) -> Backend:
    """`host:port[:admin_port]`, IPv6 as `[addr]:port[:admin_port]`."""
    spec = text.strip()
    if not spec or any(c.isspace() for c in spec):
        raise CarbonscaleError(f"statsd backend {text!r}: empty or contains whitespace")
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not host or not rest.startswith(":"):
            raise CarbonscaleError(f"statsd backend {text!r}: expected [ipv6]:port[:admin_port]")
        parts = [host, *rest[1:].split(":")]
    else:
        parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise CarbonscaleError(
            f"statsd backend {text!r}: expected host:port[:admin_port] "
            "(IPv6 addresses in [brackets])"
        )
    port = _port(parts[1], text, "port")
    admin = _port(parts[2], text, "admin port") if len(parts) == 3 else None
    return Backend(parts[0], port, admin)


def parse_backends(texts: Sequence[str]) -> list[Backend]:
    backends = [parse_backend(t) for t in texts]
    if not backends:
        raise CarbonscaleError("the statsd relay needs at least one backend")
    seen: set[tuple[str, int]] = set()
    for backend in backends:
        key = (backend.host, backend.port)
        if key in seen:
            raise CarbonscaleError(
                f"statsd backend {backend.address} is listed twice: "
                "each daemon must appear once, in the same order on every relay"
            )
        seen.add(key)
    return backends

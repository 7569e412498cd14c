"""Ring members: `host[:port][=instance]`, parsed once for every tool."""

from __future__ import annotations

import re
from dataclasses import dataclass

from carbonscale import CarbonscaleError

DEFAULT_PORT = 2003


@dataclass(frozen=True)
class Member:
    """A ring member: where metrics go (host:port) and what is hashed (host, instance)."""

    host: str
    port: int = DEFAULT_PORT
    instance: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` as carbon-c-relay prints it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def relay_syntax(self) -> str:
        """``host:port[=instance]``, carbon-c-relay's cluster member syntax."""
        return self.address + (f"={self.instance}" if self.instance is not None else "")

    def __str__(self) -> str:
        return self.relay_syntax


_PORT_RE = re.compile(r"[0-9]{1,5}")


def _port(text: str, member: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 0 < int(text) < 65536:
        raise CarbonscaleError(f"member {member!r}: port {text!r} is not a number in 1-65535")
    return int(text)


def parse_member(text: str) -> Member:
    """Parse ``host[:port][=instance]``, ``host:port[:instance]`` or ``[v6]:port...``."""
    raw = text.strip()
    if not raw or any(ch.isspace() for ch in raw):
        raise CarbonscaleError(f"member {text!r}: empty or contains whitespace")
    instance: str | None = None
    rest = raw
    if "=" in rest:
        rest, _, instance = rest.partition("=")
        if not instance:
            raise CarbonscaleError(f"member {text!r}: empty instance after '='")
    if rest.startswith("["):
        host, sep, after = rest[1:].partition("]")
        if not sep or not host:
            raise CarbonscaleError(f"member {text!r}: unclosed '[' in IPv6 address")
        port = DEFAULT_PORT
        if after:
            if not after.startswith(":"):
                raise CarbonscaleError(f"member {text!r}: expected ':port' after ']'")
            port_text, _, carbon_instance = after[1:].partition(":")
            port = _port(port_text, text)
            if carbon_instance:
                if instance is not None:
                    raise CarbonscaleError(f"member {text!r}: two instances given")
                instance = carbon_instance
        return Member(host, port, instance)
    parts = rest.split(":")
    if len(parts) > 3 or (len(parts) == 3 and instance is not None):
        raise CarbonscaleError(f"member {text!r}: too many ':' (IPv6 addresses need [brackets])")
    host = parts[0]
    if not host:
        raise CarbonscaleError(f"member {text!r}: empty host")
    port = _port(parts[1], text) if len(parts) >= 2 else DEFAULT_PORT
    if len(parts) == 3:
        if not parts[2]:
            raise CarbonscaleError(f"member {text!r}: empty instance after the port")
        instance = parts[2]
    return Member(host, port, instance)

"""The relay's settings and their defaults (the CLI's defaults are these)."""

from __future__ import annotations

from dataclasses import dataclass

from carbonscale.relay.statsd.backends import Backend

DEFAULT_PORT = 8125

DEFAULT_ADMIN_PORT = 8126

DEFAULT_PACKET_SIZE = 1400

DEFAULT_RCVBUF = 32 * 1024 * 1024

DEFAULT_CACHE_SIZE = 500_000


@dataclass
class RelayConfig:
    backends: list[Backend]
    listen: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    admin_listen: str = "0.0.0.0"
    admin_port: int = DEFAULT_ADMIN_PORT
    workers: int = 1
    packet_size: int = DEFAULT_PACKET_SIZE
    rcvbuf: int = DEFAULT_RCVBUF
    cache_size: int = DEFAULT_CACHE_SIZE
    check_interval: float = 5.0
    check_timeout: float = 1.0
    flap_state: str | None = None
    carbon: tuple[str, int] | None = ("127.0.0.1", 2003)
    stats_interval: float = 60.0
    stats_prefix: str = "carbonscale.statsd_relay"

"""The pickle relay's settings, its defaults and its address parsing: what the
CLI needs to build and check them, without the daemon's asyncio imports."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from carbonscale import CarbonscaleError
from carbonscale.relay import lines


@dataclass
class Settings:
    listen: tuple[str | None, int] = (None, 2004)
    # The line protocol front (carbon-c-relay's public port): lines are passed
    # through whole, so carbon-c-relay can restart behind it without a sender
    # noticing (see carbonscale.relay.front). None: pickle only.
    line_listen: tuple[str | None, int] | None = None
    # Longest line the front holds while waiting for its newline; a longer
    # one is skipped up to its newline and counted (lines_oversized).
    max_line: int = 65536
    # Where `carbonscale relay hold` asks the relay to stop writing to
    # carbon-c-relay, and where the relay says it has (None: no hold).
    hold_dir: str | None = None
    # carbon-c-relay unreachable this many seconds outside a hold: listeners
    # and clients closed until it is back, so the directors take this relay
    # out of their pools (0: never; the relay then only queues).
    close_after: float = 0.0
    upstream: tuple[str, int] = ("127.0.0.1", 2003)
    max_frame: int = lines.DEFAULT_MAX_FRAME
    # Bytes of unfinished frames held for all clients together: 64 frames of
    # carbon's largest size. Beyond it the client that pushed over is closed.
    max_buffered: int = 64 * lines.DEFAULT_MAX_FRAME
    max_name: int = lines.DEFAULT_MAX_NAME
    max_output: int = lines.DEFAULT_MAX_OUTPUT
    queue_size: int = 1_000_000
    batch_size: int = 2500
    stats_interval: float = 60.0
    stats_prefix: str = field(default_factory=lambda: default_stats_prefix(socket.gethostname()))
    idle_timeout: float = 600.0
    drain_timeout: float = 30.0
    reconnect_interval: float = 1.0
    connect_timeout: float = 5.0
    backlog: int = 1024

    def validate(self) -> None:
        for name in (
            "max_frame",
            "max_name",
            "max_output",
            "max_line",
            "queue_size",
            "batch_size",
            "backlog",
        ):
            if getattr(self, name) < 1:
                raise CarbonscaleError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_buffered < self.max_frame:
            raise CarbonscaleError(
                f"--max-buffered ({self.max_buffered}) must be at least --max-frame "
                f"({self.max_frame}), or one frame of the largest size could never arrive"
            )
        for name in ("stats_interval", "reconnect_interval", "connect_timeout"):
            if getattr(self, name) <= 0:
                raise CarbonscaleError(f"--{name.replace('_', '-')} must be > 0")
        for name in ("idle_timeout", "drain_timeout", "close_after"):
            if getattr(self, name) < 0:
                raise CarbonscaleError(f"--{name.replace('_', '-')} must be >= 0")
        if not self.stats_prefix or any(c.isspace() for c in self.stats_prefix):
            raise CarbonscaleError("--stats-prefix must be a non-empty name without whitespace")


def default_stats_prefix(hostname: str) -> str:
    """carbon.relays.<host>.pickle, the host's dots made underscores like carbon-c-relay's own."""
    return f"carbon.relays.{hostname.replace('.', '_')}.pickle"


def parse_hostport(text: str, option: str, allow_any: bool = False) -> tuple[str | None, int]:
    """HOST:PORT, [IPv6]:PORT, or :PORT (every interface) when allow_any."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or (not host and not allow_any):
        form = "[HOST]:PORT" if allow_any else "HOST:PORT"
        raise CarbonscaleError(f"{option} wants {form}, got {text!r}")
    return (host or None), int(port)

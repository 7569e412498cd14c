"""The relay's front: carbon's pickle protocol (and the line protocol) in, carbon-c-relay's line
protocol out.

carbon-c-relay speaks only the line protocol, while carbon daemons and many
clients send pickle frames (a 4-byte big-endian length, then a pickled list of
`(path, (timestamp, value))`). This daemon sits on port 2004 of every relay
node and forwards what it decodes to the local carbon-c-relay on 2003.

With `line_listen` it also owns the line port (2003): lines are passed through
whole and unparsed (carbon-c-relay checks them), so carbon-c-relay can sit on
a loopback port behind it and restart without a sender noticing: see
`carbonscale.relay.hold` for the hold that makes such a restart lossless.

One thread, one asyncio loop: per frame the C unpickler and the C formatter
(`carbonscale.relay.lines`) do the work, so the loop itself stays cheap.

What happens to every point, and the counter that says so:
- a frame over `max_frame` bytes: `frames_oversized`, connection closed;
- data that would make the unfinished frames of all clients together hold
  more than `max_buffered` bytes: `frames_refused_memory`, the connection
  that pushed over is closed (a slow or stalled sender cannot make the relay
  hold `max_frame` per connection without bound);
- a frame that does not unpickle to a list (or needs a global, or has bytes
  after its end): `frames_malformed`, connection closed;
- a point that cannot be written (bad name, non-number, NaN): `invalid`;
- a line-protocol line longer than `max_line`: `lines_oversized` (skipped up
  to its newline, the connection stays);
- a good point: `points` (a line-protocol line: `lines`), then `sent` once
  the kernel took its whole line,
  or `dropped_overflow` when the queue (`queue_size` points) is full while
  carbon-c-relay is away or slow, or `dropped_shutdown` when SIGTERM's drain
  ran out of time. The relay's own counters are `self_points`.
Before the queue is full, clients wait: at half full no client is read (their
TCP windows close and senders block, `backpressure` counts the times) until
it is down to a quarter; only what was already read when it filled is dropped.
At any quiet moment: points + lines + self_points = sent + dropped_overflow
+ dropped_shutdown + queued.

The upstream connection is retried every `reconnect_interval` seconds; a
line half-written when it broke is written again whole on the next one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import socket
import time

from carbonscale import CarbonscaleError
from carbonscale.relay import hold, lines
from carbonscale.relay.pickle_settings import (  # noqa: F401 (their old home)
    Settings,
    default_stats_prefix,
    parse_hostport,
)

log = logging.getLogger("carbonscale.relay.pickle")

COUNTERS = (
    "connections",
    "frames",
    "frames_malformed",
    "frames_oversized",
    "frames_refused_memory",
    "points",
    "invalid",
    "lines",
    "lines_oversized",
    "sent",
    "dropped_overflow",
    "dropped_shutdown",
    "self_points",
    "upstream_connects",
    "upstream_errors",
    "holds",
    "backpressure",
    "closed_front",
)
GAUGES = ("queued", "clients", "buffered", "held")
# How often the hold directory is looked at: a hold is in force at most this
# much (plus the batch under way) after it is asked for.
HOLD_POLL_SECONDS = 0.05


class Throttled:
    """At most one log line per key every `every` seconds, with how many were held back."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.last: dict[str, float] = {}
        self.held: collections.Counter[str] = collections.Counter()

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -self.every) < self.every:
            self.held[key] += 1
            return
        held = self.held.pop(key, 0)
        self.last[key] = now
        log.warning("%s%s", message, f" ({held} more like it not logged)" if held else "")


class Upstream:
    """One connection to carbon-c-relay fed from a bounded queue of formatted frames."""

    def __init__(self, relay: PickleRelay) -> None:
        self.relay = relay
        self.settings = relay.settings
        self.counters = relay.counters
        self.loop = asyncio.get_running_loop()
        self.queue: collections.deque[tuple[bytes, int]] = collections.deque()
        self.queued = 0  # points in self.queue
        self.pending = b""  # the batch being written, self.offset bytes of it done
        self.offset = 0
        self.sock: socket.socket | None = None
        self.waiting_writable = False
        self.lost = asyncio.Event()
        # A hold (carbonscale.relay.hold): asked for, then in force once the
        # batch being written is whole; while in force nothing is written and
        # no connection is made.
        self.hold_asked = False
        self.held = False
        # Clients are not read while the queue is over half full.
        self.paused = False
        self.released = asyncio.Event()
        self.released.set()

    # -- the queue

    def enqueue(self, data: bytes, count: int) -> None:
        if self.queued + count > self.settings.queue_size:
            self.counters["dropped_overflow"] += count
            self.relay.throttled.warning(
                "overflow",
                f"queue full ({self.queued} points): dropped {count} points "
                f"({'carbon-c-relay unreachable' if self.sock is None else 'carbon-c-relay slow'})",
            )
            return
        self.queue.append((data, count))
        self.queued += count
        if not self.paused and self.queued >= self.settings.queue_size // 2:
            # Half full: senders wait (their TCP windows close) rather than
            # have points dropped; reading resumes at a quarter.
            self.paused = True
            self.counters["backpressure"] += 1
            self.relay.pause_clients()

    def pending_points(self) -> int:
        return self.queued + self.pending.count(b"\n", self.offset)

    def kick(self) -> None:
        if self.sock is not None and not self.waiting_writable:
            self._flush()

    def _next_batch(self) -> bool:
        if not self.queue:
            self.pending, self.offset = b"", 0
            return False
        parts, count = [], 0
        batch_size = self.settings.batch_size
        while self.queue and (not parts or count + self.queue[0][1] <= batch_size):
            data, n = self.queue.popleft()
            parts.append(data)
            count += n
        self.queued -= count
        if self.paused and self.queued <= self.settings.queue_size // 4:
            self.paused = False
            # Soon, not now: resumed clients queue (and kick) from inside this
            # batch's making otherwise.
            self.loop.call_soon(self.relay.resume_clients)
        self.pending = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset = 0
        return True

    def _flush(self) -> None:
        sock = self.sock
        while sock is not None and not self.held:
            if self.offset >= len(self.pending):
                if self.hold_asked:
                    # Every line written is whole: the hold is in force.
                    self._enter_hold()
                    return
                if not self._next_batch():
                    return
            try:
                sent = sock.send(memoryview(self.pending)[self.offset :])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._disconnect(f"write failed: {exc}")
                return
            if sent:
                # A point is sent once its newline is: partial lines wait.
                self.counters["sent"] += self.pending.count(b"\n", self.offset, self.offset + sent)
                self.offset += sent
            if self.offset < len(self.pending):
                self.waiting_writable = True
                self.loop.add_writer(sock, self._writable)
                return

    def _writable(self) -> None:
        if self.sock is not None:
            self.loop.remove_writer(self.sock)
        self.waiting_writable = False
        self._flush()

    def _readable(self) -> None:
        # carbon-c-relay never talks back: readable means closed (or reset).
        try:
            data = self.sock.recv(4096) if self.sock is not None else b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._disconnect(f"connection error: {exc}")
            return
        if not data:
            self._disconnect("closed by carbon-c-relay")

    # -- the hold

    def ask_hold(self) -> None:
        if self.hold_asked:
            return
        self.hold_asked = True
        self.released.clear()
        if self.sock is None or self.offset >= len(self.pending):
            self._enter_hold()
        else:
            self.kick()  # the batch under way is finished first; _flush then holds

    def _enter_hold(self) -> None:
        if not self.held:
            self.held = True
            self.counters["holds"] += 1
            self.relay.hold_entered()

    def release(self) -> None:
        if not self.hold_asked:
            return
        self.hold_asked = self.held = False
        self.released.set()
        self.kick()

    def _disconnect(self, why: str) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.counters["upstream_errors"] += 1
        with contextlib.suppress(Exception):
            self.loop.remove_writer(sock)
            self.loop.remove_reader(sock)
        self.waiting_writable = False
        sock.close()
        # Whatever the kernel took is gone with the connection; a line cut in
        # half is written again whole on the next one.
        self.offset = self.pending.rfind(b"\n", 0, self.offset) + 1
        host, port = self.settings.upstream
        self.relay.throttled.warning("upstream", f"upstream {host}:{port}: {why}")
        self.lost.set()
        self.relay.upstream_lost()

    # -- the connection

    async def run(self) -> None:
        host, port = self.settings.upstream
        while True:
            await self.released.wait()
            try:
                infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, kind, proto, _, address = infos[0]
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                try:
                    await asyncio.wait_for(
                        self.loop.sock_connect(sock, address), self.settings.connect_timeout
                    )
                except BaseException:
                    sock.close()
                    raise
            except (TimeoutError, OSError) as exc:
                self.counters["upstream_errors"] += 1
                self.relay.throttled.warning(
                    "upstream", f"upstream {host}:{port}: cannot connect: {exc or 'timeout'}"
                )
                self.relay.upstream_lost()
                await asyncio.sleep(self.settings.reconnect_interval)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            self.lost.clear()
            self.counters["upstream_connects"] += 1
            log.info("upstream %s:%s connected", host, port)
            self.relay.upstream_back()
            self.loop.add_reader(sock, self._readable)
            self._flush()
            await self.lost.wait()
            if self.hold_asked:
                # carbon-c-relay restarting behind a hold: the release says
                # when it is ready; connecting earlier is what can crash it.
                self._enter_hold()
                continue
            await asyncio.sleep(self.settings.reconnect_interval)

    def discard(self) -> None:
        """Forget everything not yet sent (counted by the caller)."""
        self.queue.clear()
        self.queued = 0
        self.pending, self.offset = b"", 0

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.sock)
                self.loop.remove_reader(self.sock)
            self.sock.close()
            self.sock = None


class Client(asyncio.Protocol):
    """What the relay does with any client: pause, resume, count, close."""

    relay: PickleRelay
    kind = "client"  # the key of its throttled log lines
    transport: asyncio.Transport | None = None
    peer = "?"
    closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.relay.counters["connections"] += 1
        self.relay.clients.add(self)
        if self.relay.upstream.paused:
            self.pause()

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def reject(self, why: str | None) -> None:
        """A reset: what the sender had in flight is refused with its connection."""
        if why:
            self.relay.throttled.warning(self.kind, f"{self.peer}: {why}; connection closed")
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """A FIN, not a reset: the sender sees the end and connects again elsewhere."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class PickleClient(Client):
    """One sender: splits the byte stream into frames and hands each to the relay."""

    kind = "frame"

    def __init__(self, relay: PickleRelay) -> None:
        self.relay = relay
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed = False
        self.last_active = time.monotonic()
        # Bytes of this client's unfinished frame counted in relay.buffered.
        self.held = 0

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.relay.clients.discard(self)
        self.buffer.clear()
        self._account()

    def _account(self) -> None:
        self.relay.buffered += len(self.buffer) - self.held
        self.held = len(self.buffer)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_active = time.monotonic()
        relay = self.relay
        buffer = self.buffer
        buffer += data
        size = len(buffer)
        pos = 0
        max_frame = relay.settings.max_frame
        upstream = relay.upstream
        while size - pos >= 4:
            if upstream.paused:
                # Frames already read wait here, not in a queue that is full.
                break
            length = int.from_bytes(buffer[pos : pos + 4], "big")
            if length > max_frame:
                relay.counters["frames_oversized"] += 1
                self.reject(f"frame of {length} bytes is over the {max_frame} byte limit")
                break
            end = pos + 4 + length
            if end > size:
                break
            frame = bytes(buffer[pos + 4 : end])
            pos = end
            if not relay.handle_frame(frame, self.peer):
                self.reject(None)
                break
        if self.closed:
            buffer.clear()
        else:
            del buffer[:pos]
        self._account()
        limit = relay.settings.max_buffered
        if buffer and relay.buffered > limit:
            relay.counters["frames_refused_memory"] += 1
            self.reject(
                f"unfinished frames of all clients would hold {relay.buffered} bytes, over the "
                f"{limit} byte limit (--max-buffered)"
            )
            buffer.clear()
            self._account()
        relay.upstream.kick()

    def resume(self) -> None:
        super().resume()
        if self.buffer and not self.closed:
            self.data_received(b"")  # the frames read before the pause


def _lines_shorter_than(chunk: bytes, max_line: int) -> bool:
    """True when no line of chunk can be longer than max_line (False: maybe one is).

    Every run of 2w bytes holds a whole block of w bytes starting at a
    multiple of w; so when each such block holds a newline, no line reaches
    2w = max_line bytes. One find per block, each ending at the block's first
    newline: a cheap look at every chunk instead of a split.
    """
    width = max(1, max_line // 2)
    find = chunk.find
    return all(
        find(b"\n", pos, pos + width) >= 0 for pos in range(0, len(chunk) - width + 1, width)
    )


class LineClient(Client):
    """One line-protocol sender: whole lines go to the queue as they arrive, unparsed."""

    kind = "line"

    def __init__(self, relay: PickleRelay) -> None:
        self.relay = relay
        self.partial = b""  # the start of a line whose newline has not come yet
        self.skipping = False  # inside a line over max_line, dropped up to its newline
        self.last_active = time.monotonic()

    def connection_lost(self, exc) -> None:
        # A last line without its newline is not a line (carbon-c-relay's rule too).
        self.closed = True
        self.relay.clients.discard(self)
        self.partial = b""

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_active = time.monotonic()
        max_line = self.relay.settings.max_line
        start = 0
        if self.skipping or self.partial:
            first = data.find(b"\n")
            if first < 0:
                if not self.skipping:
                    self._keep_partial(self.partial + data)
                return
            if self.skipping:
                self.skipping = False
            elif len(self.partial) + first > max_line:
                self.partial = b""
                self._oversized(1)
            else:
                # The line the last read began: its own small write.
                self._forward(self.partial + data[: first + 1])
            self.partial = b""
            start = first + 1
        end = data.rfind(b"\n")
        if end >= start:
            self._forward(data[start : end + 1])
            start = end + 1
        if start < len(data):
            self._keep_partial(data[start:])

    def _keep_partial(self, rest: bytes) -> None:
        if len(rest) > self.relay.settings.max_line:
            self._oversized(1)
            self.partial, self.skipping = b"", True
        else:
            self.partial = rest

    def _forward(self, chunk: bytes) -> None:
        """Whole lines to the queue; lines over max_line are left out and counted."""
        relay = self.relay
        max_line = relay.settings.max_line
        if len(chunk) > max_line and not _lines_shorter_than(chunk, max_line):
            kept = [line for line in chunk.split(b"\n")[:-1] if len(line) <= max_line]
            self._oversized(chunk.count(b"\n") - len(kept))
            chunk = b"".join(line + b"\n" for line in kept)
        count = chunk.count(b"\n")
        if count:
            relay.counters["lines"] += count
            relay.upstream.enqueue(chunk, count)
            relay.upstream.kick()

    def _oversized(self, count: int) -> None:
        relay = self.relay
        relay.counters["lines_oversized"] += count
        relay.throttled.warning(
            "line", f"{self.peer}: {count} line(s) over {relay.settings.max_line} bytes skipped"
        )


class PickleRelay:
    def __init__(self, settings: Settings) -> None:
        settings.validate()
        self.settings = settings
        self.counters: collections.Counter[str] = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self.clients: set[PickleClient | LineClient] = set()
        # Bytes of unfinished frames held for all clients (max_buffered caps it).
        self.buffered = 0
        self.throttled = Throttled()
        self.upstream: Upstream | None = None
        self.server: asyncio.AbstractServer | None = None
        self.line_server: asyncio.AbstractServer | None = None
        self.listening = False
        self.close_timer: asyncio.TimerHandle | None = None
        self.reopening: asyncio.Task | None = None
        self.stopping: asyncio.Event | None = None

    def handle_frame(self, frame: bytes, peer: str) -> bool:
        """Decode one frame and queue its lines; False when the connection must close."""
        settings = self.settings
        try:
            data, count, invalid = lines.decode_frame(
                frame, int(time.time()), settings.max_name, settings.max_output
            )
        except lines.MalformedFrame as exc:
            self.counters["frames_malformed"] += 1
            self.throttled.warning("frame", f"{peer}: malformed frame ({exc}); connection closed")
            return False
        counters = self.counters
        counters["frames"] += 1
        counters["points"] += count
        if invalid:
            counters["invalid"] += invalid
            self.throttled.warning("invalid", f"{peer}: skipped {invalid} invalid points")
        if count:
            self.upstream.enqueue(data, count)
        return True

    def snapshot(self) -> dict[str, int]:
        values = dict(self.counters)
        values["queued"] = self.upstream.pending_points() if self.upstream else 0
        values["clients"] = len(self.clients)
        values["buffered"] = self.buffered
        values["held"] = int(bool(self.upstream and self.upstream.held))
        return values

    def pause_clients(self) -> None:
        log.info("queue half full (%d points): clients wait", self.upstream.queued)
        for client in self.clients:
            client.pause()

    def resume_clients(self) -> None:
        for client in list(self.clients):
            if self.upstream.paused:
                return  # full again: the rest stay paused
            client.resume()

    # -- the hold (carbonscale.relay.hold)

    def hold_entered(self) -> None:
        log.info("hold: nothing more written to carbon-c-relay until released")
        hold.write_ack(self.settings.hold_dir, self.upstream.pending_points())

    async def _watch_hold(self) -> None:
        """Follow the hold directory: a request holds, its removal or its end releases."""
        hold_dir = self.settings.hold_dir
        hold.remove_ack(hold_dir)
        while True:
            until = hold.requested_until(hold_dir, time.time())
            upstream = self.upstream
            if until is not None and not upstream.hold_asked:
                log.info("hold asked for, until %s at the latest", time.ctime(until))
                upstream.ask_hold()
            elif until is None and upstream.hold_asked:
                upstream.release()
                hold.remove_ack(hold_dir)
                log.info("hold released: %d points queued", upstream.pending_points())
            await asyncio.sleep(HOLD_POLL_SECONDS)

    def report(self) -> None:
        """Queue the relay's own counters (cumulative, like carbon-c-relay's) as metrics."""
        now = int(time.time())
        values = self.snapshot()
        names = COUNTERS + GAUGES
        prefix = self.settings.stats_prefix
        data = "".join(f"{prefix}.{name} {values[name]} {now}\n" for name in names).encode()
        self.counters["self_points"] += len(names)
        self.upstream.enqueue(data, len(names))
        self.upstream.kick()

    async def _report_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval)
            self.report()

    async def _close_idle_clients(self) -> None:
        timeout = self.settings.idle_timeout
        while True:
            await asyncio.sleep(max(1.0, timeout / 10))
            cutoff = time.monotonic() - timeout
            for client in list(self.clients):
                if client.last_active < cutoff:
                    log.info("%s: idle for %ss, closing", client.peer, timeout)
                    client.reject(None)

    async def serve(self, ready: asyncio.Event | None = None) -> dict[str, int]:
        loop = asyncio.get_running_loop()
        settings = self.settings
        self.stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stopping.set)
        self.upstream = Upstream(self)
        bound = await self._listen()
        log.info(
            "listening on %s, forwarding to %s:%s (%s formatter)",
            bound,
            *settings.upstream,
            lines.IMPLEMENTATION,
        )
        tasks = [
            asyncio.create_task(self.upstream.run()),
            asyncio.create_task(self._report_every_interval()),
        ]
        if settings.idle_timeout:
            tasks.append(asyncio.create_task(self._close_idle_clients()))
        if settings.hold_dir is not None:
            tasks.append(asyncio.create_task(self._watch_hold()))
        if ready is not None:
            ready.set()
        await self.stopping.wait()
        await self._drain()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.upstream.close()
        return self.snapshot()

    async def _listen(self) -> str:
        """Open the listeners (pickle, and line when asked for); where they listen."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        wanted = [(settings.listen, lambda: PickleClient(self))]
        if settings.line_listen is not None:
            wanted.append((settings.line_listen, lambda: LineClient(self)))
        servers = []
        for (host, port), protocol in wanted:
            try:
                server = await loop.create_server(
                    protocol, host, port, reuse_address=True, backlog=settings.backlog
                )
            except OSError as exc:
                for opened in servers:
                    opened.close()
                where = f"{host or '*'}:{port}"
                raise CarbonscaleError(f"cannot listen on {where}: {exc.strerror}") from None
            servers.append(server)
        self.server = servers[0]
        self.line_server = servers[1] if len(servers) > 1 else None
        self.listening = True
        return ", ".join(
            "{}:{}".format(*sock.getsockname()[:2]) for server in servers for sock in server.sockets
        )

    def _close_listeners(self) -> None:
        for server in (self.server, self.line_server):
            if server is not None:
                server.close()
        self.listening = False

    # -- the listeners follow carbon-c-relay (settings.close_after)

    def upstream_lost(self) -> None:
        """carbon-c-relay is away; outside a hold, close the front if it stays away."""
        if not self.settings.close_after or self.upstream.hold_asked:
            return
        if self.close_timer is None and self.listening:
            self.close_timer = asyncio.get_running_loop().call_later(
                self.settings.close_after, self._close_front
            )

    def upstream_back(self) -> None:
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        if not self.listening and not self.stopping.is_set():
            self.reopening = asyncio.create_task(self._reopen())

    def _close_front(self) -> None:
        """Unplanned, carbon-c-relay gone for close_after seconds: the relay cannot
        deliver, so it must look down to the directors (closed ports) and its
        senders must go to another relay. What is queued stays queued."""
        self.close_timer = None
        if self.upstream.sock is not None or self.upstream.hold_asked or not self.listening:
            return
        self._close_listeners()
        self.counters["closed_front"] += 1
        clients = list(self.clients)
        for client in clients:
            client.close()
        log.warning(
            "carbon-c-relay unreachable for %gs outside a hold: listeners closed, %d clients "
            "closed, %d points queued for when it is back",
            self.settings.close_after,
            len(clients),
            self.upstream.pending_points(),
        )

    async def _reopen(self) -> None:
        try:
            bound = await self._listen()
        except CarbonscaleError as exc:
            log.error("carbon-c-relay is back, but the listeners cannot reopen: %s", exc)
            self.stopping.set()
            return
        log.info("carbon-c-relay is back: listening again on %s", bound)

    async def _drain(self) -> None:
        """Stop taking data, then give carbon-c-relay everything queued (up to drain_timeout)."""
        if self.close_timer is not None:
            self.close_timer.cancel()
        self._close_listeners()
        for client in list(self.clients):
            client.reject(None)
        # A hold ends with the relay: what is queued goes now or never.
        self.upstream.release()
        if self.settings.hold_dir is not None:
            hold.remove_ack(self.settings.hold_dir)
        self.report()  # the final counters travel with the rest
        deadline = time.monotonic() + self.settings.drain_timeout
        log.info("stopping: draining %d queued points", self.upstream.pending_points())
        while self.upstream.pending_points() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.upstream.pending_points()
        if left:
            self.counters["dropped_shutdown"] += left
            self.upstream.discard()
            log.warning(
                "stopping: carbon-c-relay took not all points within %ss: %d dropped",
                self.settings.drain_timeout,
                left,
            )


def summary(values: dict[str, int]) -> str:
    return " ".join(f"{name}={values[name]}" for name in COUNTERS + GAUGES)


def run(settings: Settings) -> dict[str, int]:
    """Serve until SIGTERM or SIGINT; the final counters."""
    relay = PickleRelay(settings)
    values = asyncio.run(relay.serve())
    log.info("stopped: %s", summary(values))
    return values

#!/usr/bin/env python3
"""statsd relay throughput: `carbonscale relay statsd` against statsd's proxy.js.

Both relays get the same thing in the same run: one metric per datagram
(`bench.metric.NNNNNN:1|c`, --names distinct names), sent by one process with
sendmmsg (carbonscale.relay.udpio), to --backends counting sinks standing in
for statsd daemons (each also answers `health` on an admin port, which both
relays check). The sinks count metric lines, whatever the batching. Each
relay is pinned to CPU 1; the sender and the sinks share CPU 0.

Three measurements, each --repeat times:

1. The sender alone, straight into one sink: what the sender itself reaches.
2. Saturation: --blast datagrams at the sender's full speed into each relay;
   packets/s forwarded = metrics the sinks counted / time from the first send
   to the last arrival; loss = 1 - counted / sent. Ratio = ours / proxy.js.
3. The goal rate: --rate datagrams/s (default 200,000) for --seconds into
   each relay, paced in 1 ms steps; loss must be 0 for ours.

proxy.js is statsd 0.9.0's (npm), installed into .cache/statsd-0.9.0 on first
use (needs node and npm: scripts/host-deps.sh), run with forkCount 0 as its
example config has it. Goal (issue 6): ours >= 5x proxy.js, 0 loss at
200,000 packets/s. The machine is shared: look at every repeat, not one.

    .venv/bin/python bench/statsd_relay.py [--repeat 3] [--rate 200000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from carbonscale.relay import udpio

ROOT = Path(__file__).resolve().parent.parent
STATSD_VERSION = "0.9.0"
STATSD_DIR = ROOT / ".cache" / f"statsd-{STATSD_VERSION}"
PACKAGE = f"statsd@{STATSD_VERSION}"
PROXY_JS = STATSD_DIR / "node_modules" / "statsd" / "proxy.js"
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RELAY_CPU = 1
LOAD_CPU = 0


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def big_buffer(sock: socket.socket, size: int = 64 << 20) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def pin(cpu: int) -> None:
    if cpu < os.cpu_count():
        os.sched_setaffinity(0, {cpu})


# ---------------------------------------------------------------- sinks


def sink_main(ports: list[int], admin_ports: list[int], conn, cpu: int) -> None:
    """Count metric lines on each UDP port; answer `health` on the admin ports."""
    pin(cpu)
    socks = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        big_buffer(sock)
        sock.bind(("127.0.0.1", port))
        sock.setblocking(False)
        socks.append(sock)

    def admin(port: int) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(64)
        while True:
            client, _ = server.accept()
            with client:
                try:
                    client.recv(256)
                    client.sendall(b"health: up\n")
                except OSError:
                    pass

    for port in admin_ports:
        threading.Thread(target=admin, args=(port,), daemon=True).start()
    lines = [0] * len(socks)
    first = last = 0.0
    fds = [s.fileno() for s in socks]
    recv_many = udpio.recv_many
    conn.send("ready")
    while True:
        ready, _, _ = select.select([*fds, conn], [], [], 0.2)
        for fd in ready:
            if fd is conn:
                command = conn.recv()
                if command == "stop":
                    return
                conn.send({"lines": sum(lines), "first": first, "last": last})
                if command == "reset":
                    lines = [0] * len(socks)
                    first = last = 0.0
                continue
            index = fds.index(fd)
            while True:
                count, data = recv_many(fd, 256)
                if not count:
                    break
                split = data.split(b"\n")
                lines[index] += len(split) - split.count(b"")
                last = time.monotonic()
                if not first:
                    first = last


class Sinks:
    def __init__(self, count: int, cpu: int = LOAD_CPU) -> None:
        self.ports = [free_port(socket.SOCK_DGRAM) for _ in range(count)]
        self.admin_ports = [free_port() for _ in range(count)]
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=sink_main, args=(self.ports, self.admin_ports, child, cpu))
        self.proc.start()
        assert self.conn.recv() == "ready"

    def report(self, reset: bool = False) -> dict:
        self.conn.send("reset" if reset else "report")
        return self.conn.recv()

    def settle(self, quiet: float = 1.0, timeout: float = 120.0) -> dict:
        """The counts once nothing arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        previous = -1
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.report()
            if now["lines"] == previous:
                return now
            previous = now["lines"]
        return self.report()

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(5)


# ---------------------------------------------------------------- sender


def datagrams(names: int) -> list[bytes]:
    return [b"bench.metric.%06d:1|c" % i for i in range(names)]


def send(port: int, payload: list[bytes], total: int, rate: float) -> tuple[int, float, float]:
    """Send `total` datagrams (cycling `payload`), at `rate`/s or flat out (0).

    Returns (sent, start, seconds). Runs in a child process pinned to the
    load CPU, so the measuring process stays out of the way.
    """
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()

    def run() -> None:
        pin(LOAD_CPU)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        sock.connect(("127.0.0.1", port))
        fd = sock.fileno()
        step = 1024 if not rate else max(1, int(rate / 1000))
        batches = [
            [payload[(i + j) % len(payload)] for j in range(step)]
            for i in range(0, len(payload), step)
        ]
        send_many = udpio.send_many
        sent = 0
        start = time.monotonic()
        b = 0
        while sent < total:
            batch = batches[b % len(batches)]
            b += 1
            if total - sent < len(batch):
                batch = batch[: total - sent]
            if rate:
                due = start + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            with contextlib.suppress(OSError):  # ENOBUFS: the datagrams were not sent
                sent += send_many(fd, batch)
        child.send((sent, start, time.monotonic() - start))

    proc = ctx.Process(target=run)
    proc.start()
    result = parent.recv()
    proc.join()
    return result


# ---------------------------------------------------------------- relays


def wait_health(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"health\r\n")
                if b"up" in sock.recv(64):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"bench: admin port {port} never said up")


def start_ours(sinks: Sinks) -> tuple[subprocess.Popen, int]:
    port, admin = free_port(socket.SOCK_DGRAM), free_port()
    backends = [f"127.0.0.1:{p}:{a}" for p, a in zip(sinks.ports, sinks.admin_ports, strict=True)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "carbonscale",
            "relay",
            "statsd",
            *backends,
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--admin-listen",
            "127.0.0.1",
            "--admin-port",
            str(admin),
            "--carbon",
            "none",
        ],
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: pin(RELAY_CPU),
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    wait_health(admin, proc)
    return proc, port


def ensure_proxy_js() -> None:
    if PROXY_JS.exists():
        return
    if not shutil.which("npm") or not shutil.which("node"):
        raise SystemExit("bench: node and npm are needed for proxy.js (scripts/host-deps.sh)")
    STATSD_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", PACKAGE],
        cwd=STATSD_DIR,
        check=True,
    )


def start_proxy(sinks: Sinks, workdir: str) -> tuple[subprocess.Popen, int]:
    port, admin = free_port(socket.SOCK_DGRAM), free_port()
    config = {
        "nodes": [
            {"host": "127.0.0.1", "port": p, "adminport": a}
            for p, a in zip(sinks.ports, sinks.admin_ports, strict=True)
        ],
        "server": "./servers/udp",
        "host": "127.0.0.1",
        "port": port,
        "udp_version": "udp4",
        "mgmt_port": admin,
        "mgmt_address": "127.0.0.1",
        "forkCount": 0,
        "checkInterval": 1000,
        "cacheSize": 10000,
    }
    path = Path(workdir) / "proxyConfig.js"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        ["node", str(PROXY_JS), str(path)],
        cwd=PROXY_JS.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: pin(RELAY_CPU),
    )
    wait_health(admin, proc)
    time.sleep(1.5)  # its first health round marks the nodes up
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- measurements


def measure(sinks: Sinks, port: int, payload, total: int, rate: float) -> dict:
    sinks.report(reset=True)
    sent, start, seconds = send(port, payload, total, rate)
    counted = sinks.settle()
    span = max(counted["last"] - start, seconds, 1e-9)
    return {
        "sent": sent,
        "send_rate": sent / seconds,
        "forwarded": counted["lines"],
        "forward_rate": counted["lines"] / span,
        "loss": 1 - counted["lines"] / sent if sent else 0.0,
    }


def fmt(result: dict) -> str:
    return (
        f"sent {result['sent']:>9,} at {result['send_rate']:>9,.0f}/s, "
        f"forwarded {result['forwarded']:>9,} = {result['forward_rate']:>9,.0f} packets/s, "
        f"loss {result['loss']:.3%}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--names", type=int, default=10000)
    parser.add_argument("--blast", type=int, default=1_000_000, help="datagrams at full speed")
    parser.add_argument("--rate", type=float, default=200_000)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    ensure_proxy_js()
    payload = datagrams(args.names)
    print(
        f"statsd relay bench: {args.backends} counting sinks, one metric per datagram, "
        f"{args.names} names; relays on CPU {RELAY_CPU}, sender and sinks on CPU {LOAD_CPU}; "
        f"recvmmsg/sendmmsg extension: {'yes' if udpio.HAVE_C else 'no (Python fallback)'}"
    )
    ratios, ours_paced_losses, sender_rates = [], [], []
    sinks = Sinks(args.backends)
    # The sender's own reach: into one sink on the other CPU.
    alone_sink = Sinks(1, cpu=RELAY_CPU)
    workdir = tempfile.mkdtemp(prefix="statsd-bench-")
    try:
        for round_ in range(1, args.repeat + 1):
            print(f"--- round {round_}/{args.repeat}")
            alone = measure(alone_sink, alone_sink.ports[0], payload, args.blast, 0)
            sender_rates.append(alone["send_rate"])
            print(f"  sender alone -> sink      {fmt(alone)}")
            ours, ours_port = start_ours(sinks)
            try:
                ours_blast = measure(sinks, ours_port, payload, args.blast, 0)
                print(f"  carbonscale, full speed   {fmt(ours_blast)}")
                ours_paced = measure(
                    sinks, ours_port, payload, int(args.rate * args.seconds), args.rate
                )
                print(f"  carbonscale, {args.rate:,.0f}/s  {fmt(ours_paced)}")
            finally:
                stop(ours)
            proxy, proxy_port = start_proxy(sinks, workdir)
            try:
                proxy_blast = measure(sinks, proxy_port, payload, args.blast, 0)
                print(f"  proxy.js, full speed      {fmt(proxy_blast)}")
                proxy_paced = measure(
                    sinks, proxy_port, payload, int(args.rate * args.seconds), args.rate
                )
                print(f"  proxy.js, {args.rate:,.0f}/s     {fmt(proxy_paced)}")
            finally:
                stop(proxy)
            ratio = ours_blast["forward_rate"] / max(proxy_blast["forward_rate"], 1e-9)
            ratios.append(ratio)
            ours_paced_losses.append(ours_paced["loss"])
            print(f"  ratio (forwarded packets/s at full speed): {ratio:.1f}x")
    finally:
        sinks.stop()
        alone_sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    ratio_ok = min(ratios) >= 5
    loss_ok = max(ours_paced_losses) == 0
    print(
        f"summary: the sender alone reaches {statistics.median(sender_rates):,.0f} packets/s "
        f"(median); ratio median {statistics.median(ratios):.1f}x, min {min(ratios):.1f}x "
        f"(goal >= 5x: {'met' if ratio_ok else 'MISSED'}); loss at {args.rate:,.0f} packets/s: "
        f"{', '.join(f'{x:.3%}' for x in ours_paced_losses)} "
        f"(goal 0: {'met' if loss_ok else 'MISSED'})"
    )
    return 0 if ratio_ok and loss_ok else 1


if __name__ == "__main__":
    sys.exit(main())

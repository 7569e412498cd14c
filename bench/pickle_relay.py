#!/usr/bin/env python3
"""Pickle relay throughput: `carbonscale relay pickle` against carbon's own carbon-relay.py.

Both relays get the same thing in the same run: one TCP sender pushing
frames of 500 points (pickle protocol 2, carbon's) as fast as the relay
takes them for --seconds, and a line-protocol sink behind the relay counting
lines. The relay under test is pinned to one CPU; the sender and the sink
share the other(s). Throughput = lines the sink received / the time from the
first to the last of them. carbon-relay.py (PyPI carbon, from .venv) runs
with RELAY_METHOD = consistent-hashing to one destination,
DESTINATION_PROTOCOL = line, flow control on and a queue of 10 million points
(with carbon's default 1000 it drops what arrives while the queue is full).

Goal (issue 6): >= 1,000,000 points/s on one core and >= 5x carbon-relay.py.
The machine is shared: run it twice when numbers look off.

    .venv/bin/python bench/pickle_relay.py [--seconds 8] [--carbon-seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CARBON_RELAY = Path(PYTHON).with_name("carbon-relay.py")
POINTS_PER_FRAME = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: process {proc.args[:3]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench: nothing listens on {port} after {timeout}s")


def make_frames(count: int, seed: int = 6) -> bytes:
    """`count` distinct frames of 500 points, as a sender would write them."""
    rng = random.Random(seed)
    now = int(time.time())
    out = []
    for f in range(count):
        points = []
        for i in range(POINTS_PER_FRAME):
            kind = i % 3
            if kind == 0:
                value = rng.randrange(100000)  # counters
            elif kind == 1:
                value = round(rng.uniform(0, 1000), 2)  # gauges
            else:
                value = rng.random() * 100  # rates: full-precision floats
            name = f"bench.host{f % 97:03d}.app{i % 13}.metric{f * POINTS_PER_FRAME + i:07d}"
            points.append((name, (now - 60, value)))
        payload = pickle.dumps(points, protocol=2)
        out.append(struct.pack("!L", len(payload)) + payload)
    return b"".join(out)


# ---------------------------------------------------------------- helpers run as processes


def sink_main(port: int) -> None:
    """Count lines from every connection; stdin gives the expected total, then we report."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin, selectors.EVENT_READ, "control")
    received, first, last, expected = 0, None, None, None
    print("ready", flush=True)
    while True:
        idle_deadline = (last or time.time()) + 15
        if expected is not None and (received >= expected or time.time() > idle_deadline):
            break
        for key, _ in sel.select(timeout=0.5):
            if key.data == "accept":
                conn, _ = listener.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "data")
            elif key.data == "control":
                line = sys.stdin.readline()
                expected = int(line) if line.strip() else 0
                sel.unregister(sys.stdin)
            else:
                try:
                    data = key.fileobj.recv(1 << 20)
                except ConnectionError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    continue
                n = data.count(b"\n")
                if n:
                    now = time.time()
                    if first is None:
                        first = now
                    last = now
                    received += n
    print(json.dumps({"received": received, "first": first, "last": last}), flush=True)


def send_main(port: int, seconds: float, frames: int) -> None:
    data = make_frames(frames)
    per_round = frames * POINTS_PER_FRAME
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sent = 0
    start = time.time()
    while time.time() - start < seconds:
        sock.sendall(data)
        sent += per_round
    end = time.time()
    sock.close()
    print(json.dumps({"sent": sent, "start": start, "end": end}), flush=True)


# ---------------------------------------------------------------- the runs


def pinned(cpus: set[int]):
    return lambda: os.sched_setaffinity(0, cpus)


def measure(name: str, relay_cmd: list[str], listen: int, sink_port: int, args, cpus) -> dict:
    relay_cpu, other_cpus = cpus
    sink = subprocess.Popen(
        [PYTHON, __file__, "_sink", str(sink_port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=pinned(other_cpus),
    )
    assert sink.stdout.readline().strip() == "ready"
    relay = subprocess.Popen(
        relay_cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=pinned({relay_cpu}),
        cwd=ROOT,
    )
    try:
        wait_port(listen, relay)
        time.sleep(0.5)  # carbon connects to its destination after it listens
        sender = subprocess.run(
            [PYTHON, __file__, "_send", str(listen), str(args.seconds_for[name]), str(args.frames)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            preexec_fn=pinned(other_cpus),
        )
        sent = json.loads(sender.stdout)
        sink.stdin.write(f"{sent['sent']}\n")
        sink.stdin.flush()
        result = json.loads(sink.stdout.readline())
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            _, relay_err = relay.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            relay.kill()
            _, relay_err = relay.communicate()
        sink.kill()
        sink.wait()
    elapsed = (result["last"] or 0) - (result["first"] or 0)
    rate = result["received"] / elapsed if elapsed > 0 else 0.0
    summary = next((line for line in relay_err.splitlines() if "stopped:" in line), "")
    return {
        "name": name,
        "sent": sent["sent"],
        "received": result["received"],
        "seconds": elapsed,
        "rate": rate,
        "relay_summary": summary.split("stopped: ", 1)[-1],
    }


def carbon_conf(tmp: Path, pickle_port: int, line_port: int, sink_port: int) -> Path:
    for sub in ("storage/whisper", "log", "run"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    conf = tmp / "carbon.conf"
    conf.write_text(
        f"""[cache]
STORAGE_DIR = {tmp}/storage
LOCAL_DATA_DIR = {tmp}/storage/whisper
LOG_DIR = {tmp}/log
PID_DIR = {tmp}/run

[relay]
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {line_port}
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {pickle_port}
RELAY_METHOD = consistent-hashing
REPLICATION_FACTOR = 1
DESTINATIONS = 127.0.0.1:{sink_port}
DESTINATION_PROTOCOL = line
MAX_DATAPOINTS_PER_MESSAGE = 500
MAX_QUEUE_SIZE = 10000000
USE_FLOW_CONTROL = True
CARBON_METRIC_INTERVAL = 0
LOG_LISTENER_CONN_SUCCESS = False
"""
    )
    # carbon-relay.py refuses to start without it, though a relay never reads it.
    (tmp / "storage-schemas.conf").write_text("[default]\npattern = .*\nretentions = 60s:1d\n")
    return conf


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_sink":
        sink_main(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_send":
        send_main(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="sending time per relay")
    parser.add_argument("--carbon-seconds", type=float, help="for carbon (default --seconds)")
    parser.add_argument("--frames", type=int, default=40, help="distinct frames cycled")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU the relay is pinned to")
    parser.add_argument("--skip-carbon", action="store_true")
    args = parser.parse_args()
    args.seconds_for = {
        "carbonscale relay pickle": args.seconds,
        "carbon-relay.py": args.carbon_seconds or args.seconds,
    }
    all_cpus = os.sched_getaffinity(0)
    if args.cpu not in all_cpus:
        parser.error(f"CPU {args.cpu} is not available (have {sorted(all_cpus)})")
    other = (all_cpus - {args.cpu}) or all_cpus
    cpus = (args.cpu, other)
    from carbonscale.relay import lines

    print(
        f"pickle relay bench: frames of {POINTS_PER_FRAME} points, pickle protocol 2, "
        f"relay on CPU {args.cpu}, sender and sink on CPU {sorted(other)}; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
        f"{lines.IMPLEMENTATION} formatter"
    )
    results = []
    listen, sink_port = free_port(), free_port()
    ours = [
        PYTHON,
        "-m",
        "carbonscale",
        "relay",
        "pickle",
        "--listen",
        f"127.0.0.1:{listen}",
        "--upstream",
        f"127.0.0.1:{sink_port}",
        "--stats-interval",
        "3600",
        "--idle-timeout",
        "0",
        # The sink leaves once it has every point, so the final counters that
        # SIGTERM queues have nowhere to go: do not wait 30 s for them.
        "--drain-timeout",
        "1",
    ]
    results.append(measure("carbonscale relay pickle", ours, listen, sink_port, args, cpus))
    if not args.skip_carbon:
        tmp = Path(tempfile.mkdtemp(prefix="bench-carbon-"))
        try:
            listen, line_port, sink_port = free_port(), free_port(), free_port()
            conf = carbon_conf(tmp, listen, line_port, sink_port)
            theirs = [
                PYTHON,
                str(CARBON_RELAY),
                f"--config={conf}",
                "--nodaemon",
                f"--pidfile={tmp}/run/relay.pid",
                f"--logdir={tmp}/log",
                "start",
            ]
            results.append(measure("carbon-relay.py", theirs, listen, sink_port, args, cpus))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        lost = r["sent"] - r["received"]
        print(
            f"{r['name']:26s} {r['rate']:>12,.0f} points/s  "
            f"({r['received']:,} of {r['sent']:,} points in {r['seconds']:.2f} s"
            f"{f', {lost:,} NOT RECEIVED' if lost else ''})"
        )
        if r["relay_summary"]:
            print(f"{'':26s} relay counters: {r['relay_summary']}")
    ours_rate = results[0]["rate"]
    verdict = ours_rate >= 1_000_000
    if len(results) > 1 and results[1]["rate"]:
        ratio = ours_rate / results[1]["rate"]
        print(f"ratio: {ratio:.1f}x carbon-relay.py")
        verdict = verdict and ratio >= 5
    verdict_text = "met" if verdict else "NOT met"
    print(f"goal (>= 1,000,000 points/s on one core, >= 5x carbon): {verdict_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

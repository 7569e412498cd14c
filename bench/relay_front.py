#!/usr/bin/env python3
"""Line front throughput: `carbonscale relay pickle --line-listen` against carbon-c-relay.

On a relay node every line-protocol point now passes the front (line 2003)
before carbon-c-relay (behind it on loopback), so that carbon-c-relay can
restart without a sender losing a line. The front must not be what limits
the relay tier: here it moves lines at least as fast as carbon-c-relay routes
them with one worker.

Both get the same thing in the same run: one TCP sender pushing 100-byte
lines as fast as they are taken for --seconds, and a line sink behind counting
lines. The program under test is pinned to one CPU (carbon-c-relay with
`-w 1`, forwarding everything to the sink); the sender and the sink share the
other(s). Throughput = lines the sink received / the time from the first to
the last of them.

    .venv/bin/python bench/relay_front.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pickle_relay import PYTHON, ROOT, free_port, pinned, sink_main, wait_port

LINES_PER_ROUND = 20000


def make_lines(seed: int = 7) -> bytes:
    rng = random.Random(seed)
    now = int(time.time())
    return "".join(
        f"servers.host{rng.randrange(500):03d}.cpu{rng.randrange(64):02d}."
        f"metric{rng.randrange(10000):05d}.value {rng.uniform(0, 1000):.6f} {now}\n"
        for _ in range(LINES_PER_ROUND)
    ).encode()


def send_main(port: int, seconds: float) -> None:
    data = make_lines()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sent = 0
    start = time.time()
    while time.time() - start < seconds:
        sock.sendall(data)
        sent += LINES_PER_ROUND
    sock.close()
    print(json.dumps({"sent": sent}), flush=True)


def measure(name: str, cmd: list[str], listen: int, sink_port: int, seconds: float, cpus) -> dict:
    cpu, others = cpus
    sink = subprocess.Popen(
        [PYTHON, str(ROOT / "bench" / "pickle_relay.py"), "_sink", str(sink_port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=pinned(others),
    )
    assert sink.stdout.readline().strip() == "ready"
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=pinned({cpu})
    )
    try:
        wait_port(listen, proc)
        time.sleep(0.5)  # both connect to the sink after they listen
        sender = subprocess.run(
            [PYTHON, __file__, "_send", str(listen), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            preexec_fn=pinned(others),
        )
        sent = json.loads(sender.stdout)["sent"]
        sink.stdin.write(f"{sent}\n")
        sink.stdin.flush()
        result = json.loads(sink.stdout.readline())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        sink.kill()
        sink.wait()
    elapsed = (result["last"] or 0) - (result["first"] or 0)
    return {
        "name": name,
        "sent": sent,
        "received": result["received"],
        "rate": result["received"] / elapsed if elapsed > 0 else 0.0,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_send":
        send_main(int(sys.argv[2]), float(sys.argv[3]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_sink":
        sink_main(int(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="sending time per program")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU the program is pinned to")
    args = parser.parse_args()
    relay = shutil.which("carbon-c-relay")
    if relay is None:
        sys.exit("bench: carbon-c-relay is not installed (scripts/host-deps.sh installs it)")
    all_cpus = os.sched_getaffinity(0)
    if args.cpu not in all_cpus:
        parser.error(f"CPU {args.cpu} is not available (have {sorted(all_cpus)})")
    cpus = (args.cpu, (all_cpus - {args.cpu}) or all_cpus)
    print(
        f"line front bench: {LINES_PER_ROUND}-line rounds of ~100-byte lines, program on CPU "
        f"{args.cpu}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    results = []
    listen, sink_port = free_port(), free_port()
    front = [
        PYTHON, "-m", "carbonscale", "relay", "pickle",
        "--listen", f"127.0.0.1:{free_port()}", "--line-listen", f"127.0.0.1:{listen}",
        "--upstream", f"127.0.0.1:{sink_port}", "--stats-interval", "3600",
        "--idle-timeout", "0", "--drain-timeout", "1",
    ]  # fmt: skip
    results.append(measure("front (relay pickle --line-listen)", front, listen, sink_port,
                           args.seconds, cpus))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-front-") as tmp:
        listen, sink_port = free_port(), free_port()
        config = Path(tmp) / "relay.conf"
        config.write_text(
            f"listen type linemode 127.0.0.1:{listen} proto tcp;\n"
            f"cluster sink forward 127.0.0.1:{sink_port};\n"
            "match * send to sink stop;\n"
        )
        theirs = [relay, "-f", str(config), "-w", "1", "-H", "bench", "-q", "10000000"]
        results.append(measure("carbon-c-relay -w 1", theirs, listen, sink_port, args.seconds,
                               cpus))  # fmt: skip
    for result in results:
        print(
            f"  {result['name']:<36} {result['rate']:>12,.0f} lines/s "
            f"({result['received']:,} of {result['sent']:,} arrived)"
        )
    ratio = results[0]["rate"] / results[1]["rate"] if results[1]["rate"] else float("inf")
    print(f"front / carbon-c-relay (one worker): {ratio:.2f}x (goal >= 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stop the VRRP master and time the VIP's move (molecule/lvs side_effect).

Before: which director holds the VIP (VRRP must have elected lvs-director1,
the higher priority), and a line metric sent through it. Then `docker stop
lvs-director1` (systemd halts: keepalived leaves with a priority-0 advert)
and, from the moment the stop is issued, poll lvs-director2 until the VIP is
on its interface, then until the VIP's line port takes a metric again.
Writes the measurements as JSON to argv[1]; the verify step asserts them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

VIP = "172.31.5.100"
DIRECTORS = ("lvs-director1", "lvs-director2")


def holds_vip(container: str) -> bool:
    out = subprocess.run(
        ["docker", "exec", container, "ip", "-4", "-o", "address", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return f" {VIP}/32 " in out


def send_line(name: str, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((VIP, 2003), timeout=timeout) as sock:
            sock.sendall(f"{name} 1 {int(time.time())}\n".encode())
        return True
    except OSError:
        return False


def main(out: str) -> int:
    record: dict = {"holders_before": [d for d in DIRECTORS if holds_vip(d)]}
    record["sent_before"] = "molecule.lvs.failover.before"
    record["sent_before_ok"] = send_line(record["sent_before"], timeout=3)
    time.sleep(1)  # let the pool's nginx pass it on before the host halts

    started = time.monotonic()
    stop = subprocess.Popen(["docker", "stop", DIRECTORS[0]], stdout=subprocess.DEVNULL)
    moved = None
    while time.monotonic() - started < 30:
        if holds_vip(DIRECTORS[1]):
            moved = time.monotonic() - started
            break
        time.sleep(0.05)
    record["vip_moved_after"] = moved
    resumed = None
    record["sent_after"] = "molecule.lvs.failover.after"
    while moved is not None and time.monotonic() - started < 60:
        if send_line(record["sent_after"]):
            resumed = time.monotonic() - started
            break
        time.sleep(0.1)
    record["line_resumed_after"] = resumed
    stop.wait(timeout=120)
    record["holders_after"] = [d for d in DIRECTORS[1:] if holds_vip(d)]
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    print(json.dumps(record))
    return 0 if moved is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

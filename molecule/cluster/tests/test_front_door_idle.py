"""2,000 idle connections held open on the VIP's line port do not keep a new
sender out: every new connection is accepted and every point it sends is on
disk. (Before the directors' nginx got the descriptors it asks for, 1,000 idle
connections made it refuse every new sender.)
"""

from __future__ import annotations

import json

from cluster_hosts import setting, vip, wait_for

IDLE = 2000
SENDERS = 50
SCRIPT = "/tmp/carbonscale-idle-door.py"

# Opens IDLE connections and keeps them, then SENDERS new connections each
# send one point; prints how many of each were refused.
IDLE_SCRIPT = r"""
import json, resource, socket, sys, time
door, prefix, idle, senders, stamp = sys.argv[1:6]
host, port = door.rsplit(":", 1)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
held, idle_refused = [], 0
for _ in range(int(idle)):
    try:
        held.append(socket.create_connection((host, int(port)), 5))
    except OSError:
        idle_refused += 1
time.sleep(2)
refused, errors = 0, []
for n in range(int(senders)):
    try:
        with socket.create_connection((host, int(port)), 5) as sock:
            sock.sendall(f"{prefix}.m{n} {n} {stamp}\n".encode())
    except OSError as exc:
        refused += 1
        errors.append(str(exc))
time.sleep(2)
still_open = 0
for sock in held:
    sock.setblocking(False)
    try:
        still_open += sock.recv(1) != b""
    except BlockingIOError:
        still_open += 1
    except OSError:
        pass
    sock.close()
print(json.dumps({"idle_refused": idle_refused, "held": len(held), "still_open": still_open,
                  "refused": refused, "errors": errors[:3]}))
"""


def test_idle_connections_on_the_vip_do_not_refuse_new_senders(cluster):
    address = vip(cluster)
    assert address, "this check goes through the directors' VIP"
    storage = cluster.group("storage")
    sender = cluster.host(storage[0])  # a relay carries the VIP on lo
    now = int(sender.check_output("date +%s"))
    prefix = f"molecule.idle.run{now}"
    sender.run(f"cat > {SCRIPT} <<'EOF'\n{IDLE_SCRIPT}\nEOF")
    done = sender.run(f"python3 {SCRIPT} {address}:2003 {prefix} {IDLE} {SENDERS} {now}")
    assert done.rc == 0, done.stderr
    outcome = json.loads(done.stdout)
    print(f"\n{IDLE} idle connections on {address}:2003, then {SENDERS} new senders: {outcome}")
    assert outcome["idle_refused"] == 0, outcome
    assert outcome["refused"] == 0, outcome
    # The idle ones were kept open while the new senders came and went.
    assert outcome["still_open"] == IDLE, outcome

    def landed() -> set[str]:
        found = set()
        for host in storage:
            root = setting(cluster, host, "carbon_storage", "carbon_storage_whisper_dir")
            top = f"{root}/{prefix.replace('.', '/')}"
            out = cluster.host(host).run(
                f'for f in {top}/*.wsp; do [ -e "$f" ] && python3 -c \'import sys, whisper; '
                "print(sys.argv[1], [v for v in whisper.fetch(sys.argv[1], 0)[1] "
                'if v is not None])\' "$f"; done'
            )
            for line in out.stdout.splitlines():
                path, values = line.split(" ", 1)
                metric = path.rsplit("/", 1)[1][: -len(".wsp")]
                if values.strip() == f"[{float(metric[1:])}]":
                    found.add(metric)
        return found

    want = {f"m{n}" for n in range(SENDERS)}

    def all_landed() -> set[str] | None:
        found = landed()
        return found if found >= want else None

    got = wait_for(all_landed, 90, step=3) or landed()
    missing = sorted(want - got)
    assert not missing, f"{len(missing)} of {SENDERS} points missing, e.g. {missing[:5]}"

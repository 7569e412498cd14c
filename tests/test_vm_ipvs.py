"""IPVS for real: the lvs_director role's keepalived carries packets.

The guest (tests/vm_lab.py) runs the lvs_director role with `lvs_engine:
ipvs`: keepalived holds the VIP on lvsbr0 and runs the virtual servers (line
and pickle TCP wlc with TCP_CHECK, statsd UDP rr `ops` with the flap-damped
MISC_CHECK) over two DR real servers in network namespaces, which record
what reaches them (tests/vm_realserver_sink.py).
"""

from __future__ import annotations

import re
import time

import pytest
from vm_harness import VM
from vm_lab import CLIENT, REAL, VIP

pytestmark = pytest.mark.vm

CLIENT_SCRIPT = r"""
import pickle, socket, struct, sys
vip = sys.argv[1]
for n in range(20):
    with socket.create_connection((vip, 2003), timeout=10) as s:
        s.sendall(b"vmtest.line.n%02d %d 1700000000\n" % (n, n))
for n in range(10):
    body = pickle.dumps([("vmtest.pickle.n%02d" % n, (1700000000, n))], protocol=2)
    with socket.create_connection((vip, 2004), timeout=10) as s:
        s.sendall(struct.pack("!L", len(body)) + body)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 40125))
for n in range(40):
    u.sendto(b"vmtest.statsd.n%02d:1|c" % n, (vip, 8125))
"""


@pytest.fixture
def vm(director_vm):
    return director_vm


def table(vm: VM) -> dict[str, list[str]]:
    """`ipvsadm -Ln`: virtual service -> its real servers' addresses."""
    services: dict[str, list[str]] = {}
    current = None
    for line in vm.out("ipvsadm -Ln").splitlines():
        service = re.match(r"^(TCP|UDP)\s+(\S+)", line)
        if service:
            current = f"{service[1]} {service[2]}"
            services[current] = []
        real = re.match(r"^\s+->\s+(\d+\.\d+\.\d+\.\d+):\d+", line)
        if real and current:
            services[current].append(real[1])
    return services


def wait_table(vm: VM, service: str, want: set[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while set(table(vm).get(service, [])) != want:
        assert time.monotonic() < deadline, (
            f"{service}: real servers {table(vm).get(service)} never became {sorted(want)}\n"
            + vm.out("ipvsadm -Ln; journalctl -u keepalived --no-pager -n 30")
        )
        time.sleep(2)


def received(vm: VM, port: int) -> dict[str, list[str]]:
    out = {}
    for name in REAL:
        text = vm.ssh(f"cat /run/sink-{name}.log", check=False).stdout
        lines = [line.split(" ", 2) for line in text.splitlines()]
        out[name] = [fields[2] for fields in lines if fields[0] == str(port)]
    return out


def test_ipvs_carries_line_pickle_and_statsd_to_both_real_servers(vm):
    every = set(REAL.values())
    for service in (f"TCP {VIP}:2003", f"TCP {VIP}:2004", f"UDP {VIP}:8125"):
        wait_table(vm, service, every)
    print(vm.out("ipvsadm -Ln"))
    assert "ops" in vm.out("ipvsadm -Ln -u " + VIP + ":8125")
    vm.ssh("cat > /root/client.py", input=CLIENT_SCRIPT)
    vm.ssh(f"ip netns exec client python3 /root/client.py {VIP}")
    time.sleep(2)

    line = received(vm, 2003)
    assert sorted(line["rs1"] + line["rs2"]) == [
        f"vmtest.line.n{n:02d} {n} 1700000000" for n in range(20)
    ]
    assert line["rs1"] and line["rs2"], line
    pickled = received(vm, 2004)
    assert len(pickled["rs1"]) + len(pickled["rs2"]) == 10
    statsd = received(vm, 8125)
    # One client, one source port: without ops IPVS would send every datagram
    # of this "connection" to one real server.
    sent = [f"vmtest.statsd.n{n:02d}:1|c" for n in range(40)]
    assert sorted(statsd["rs1"] + statsd["rs2"]) == sent
    assert statsd["rs1"] and statsd["rs2"], {k: len(v) for k, v in statsd.items()}
    print(
        f"line {len(line['rs1'])}/{len(line['rs2'])}, pickle {len(pickled['rs1'])}/"
        f"{len(pickled['rs2'])}, statsd {len(statsd['rs1'])}/{len(statsd['rs2'])} (rs1/rs2)"
    )
    # The real servers answered the client directly (DR): the sinks saw the
    # client's own address, not the director's.
    sources = vm.out("cut -d' ' -f2 /run/sink-rs1.log /run/sink-rs2.log | sort -u").split()
    assert sources == [CLIENT], sources


def test_a_failing_tcp_check_takes_the_real_server_out_and_back(vm):
    every = set(REAL.values())
    reject = (
        "nft add table inet t && nft add chain inet t in '{ type filter hook input priority 0; }'"
        " && nft add rule inet t in tcp dport 2003 reject with tcp reset"
    )
    vm.ssh(f'ip netns exec rs2 sh -c "{reject}"')
    wait_table(vm, f"TCP {VIP}:2003", {REAL["rs1"]})
    print("rs2 refuses 2003:\n" + vm.out("ipvsadm -Ln -t " + VIP + ":2003"))
    assert set(table(vm)[f"TCP {VIP}:2004"]) == every
    vm.ssh("ip netns exec rs2 nft delete table inet t")
    wait_table(vm, f"TCP {VIP}:2003", every)
    print("rs2 accepts again:\n" + vm.out("ipvsadm -Ln -t " + VIP + ":2003"))


def test_the_flap_damped_misc_check_runs_as_the_script_user(vm):
    every = set(REAL.values())
    vm.ssh("touch /run/sink-rs2.log.down")
    wait_table(vm, f"UDP {VIP}:8125", {REAL["rs1"]})
    print("rs2's statsd says down:\n" + vm.out("ipvsadm -Ln -u " + VIP + ":8125"))
    vm.ssh("rm /run/sink-rs2.log.down")
    wait_table(vm, f"UDP {VIP}:8125", every, timeout=180)
    print("rs2's statsd up, reused after damping:\n" + vm.out("ipvsadm -Ln -u " + VIP + ":8125"))
    owner = vm.out("stat -c %U /var/lib/carbonscale/lvs/flap.json").strip()
    assert owner == "keepalived_script"

#!/usr/bin/env python3
"""hot-metrics decode speed: packets/s of `carbonscale ops hot-metrics --pcap` on one core.

Writes a pcap (dpkt.pcap.Writer) of --packets Ethernet frames as a relay sees
them: a third statsd UDP datagrams (1-4 lines each), a third line-protocol TCP
segments and a third pickle TCP segments (full 1448-byte segments over 250
connections each, lines and frames of 60 points cut across segments, as
carbon's senders batch them), then times, in the same run and on the same file:

- dpkt bare: `for ts, buf in dpkt.pcap.Reader(f): pass`, the anchor (reading the
  records and nothing else);
- dpkt objects: dpkt.ethernet.Ethernet(buf) per record, down to the payload (how
  a script over dpkt usually decodes, no reassembly, no counting);
- ours, dpkt full decode: carbonscale.ops.hotmetrics decode_capture(full_dpkt=True)
  + analyse, counting in Python: the same dpkt reading and layers as "dpkt
  objects" for every record (how hot-metrics decoded before its bulk path), then
  our TCP reassembly, lines, pickle frames (the pickle relay's decoder), statsd
  lines, ranking and projection on a ring (--reference-runs 0 leaves it out);
- ours, Python: the bulk path as it was before carbonscale._hotcount, its twin
  (Decoder(native=False), pcaprecords' Python record walk): dpkt reads the file
  header, the records are walked in bulk, the IPv4 TCP/UDP headers read with
  numpy (dpkt's full decode for any other frame), in-order TCP segments joined
  per connection, names counted by hash with numpy, pickle frames through the
  pickle relay's decoder;
- ours: decode_capture + analyse as `carbonscale ops hot-metrics --pcap` runs them:
  the bulk path with names and pickle frames counted in C (carbonscale._hotcount).

Each timing is the best of --runs (--reference-runs for the full decode, which is
slow), wall clock and CPU time of this process: the machine is shared, and CPU
time is what one core spends whatever else runs. All of ours are checked: the
points they count must equal the points written, and their reports must be equal.

Goal (issue 17): ours >= 500,000 packets/s on one core.

    .venv/bin/python bench/hot_metrics.py [--packets 300000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import sys
import tempfile
import time

import dpkt

from carbonscale.ops import hotmetrics, pcaprecords
from carbonscale.ring import Ring

MAC = b"\x02\x00\x00\x00\x00\x01"
MSS = 1448  # TCP payload per segment, as on an Ethernet path


def frame(src: int, sport: int, dport: int, payload: bytes, seq: int | None) -> bytes:
    if seq is None:
        transport = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
        transport.ulen = len(transport)
        proto = dpkt.ip.IP_PROTO_UDP
    else:
        transport = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, flags=dpkt.tcp.TH_ACK,
                                 data=payload)  # fmt: skip
        proto = dpkt.ip.IP_PROTO_TCP
    ip = dpkt.ip.IP(src=struct.pack(">I", 0x0A000000 + src), dst=b"\x0a\x00\x01\x01",
                    p=proto, data=transport)  # fmt: skip
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(src=MAC, dst=MAC, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def write_capture(path: str, packets: int) -> int:
    """The capture; the number of points in it (whole lines and frames sent)."""
    points = 0
    # Per TCP connection: bytes generated, bytes sent, (end offset, points) of each unit.
    streams: dict[tuple[int, int], list] = {}
    start = 1_700_000_000.0
    with open(path, "wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        for i in range(packets):
            client = i % 250
            stamp = start + i * 1e-6
            if i % 3 == 0:
                count = 1 + i % 4
                lines = b"".join(b"app.svc%d.req%d:1|c\n" % (client, j) for j in range(count))
                writer.writepkt(frame(client, 40000 + client, 8125, lines, None), stamp)
                points += count
                continue
            dport = 2003 if i % 3 == 1 else 2004
            key = (client, dport)
            if key not in streams:
                syn = dpkt.ethernet.Ethernet(frame(client, 40000 + client, dport, b"", 999))
                syn.data.data.flags = dpkt.tcp.TH_SYN
                writer.writepkt(bytes(syn), stamp)
                streams[key] = [b"", 0, []]
            stream = streams[key]
            while len(stream[0]) - stream[1] < MSS:
                serial = len(stream[2])
                if dport == 2003:
                    for j in range(10):
                        stream[0] += b"host%d.cpu.core%d.user 12.5 1700000000\n" % (
                            client, (serial + j) % 64)  # fmt: skip
                        stream[2].append((len(stream[0]), 1))
                    continue
                body = pickle.dumps(
                    [(f"host{client}.disk.sd{j}.ops", (1700000000, 1.0)) for j in range(60)], 2
                )
                stream[0] += struct.pack(">I", len(body)) + body
                stream[2].append((len(stream[0]), 60))
            segment = stream[0][stream[1] : stream[1] + MSS]
            writer.writepkt(frame(client, 40000 + client, dport, segment, 1000 + stream[1]), stamp)
            stream[1] += len(segment)
    for _, sent, units in streams.values():
        points += sum(count for end, count in units if end <= sent)
    return points


def python_twin(ours) -> dict:
    """ours without carbonscale._hotcount: the Python record walk and counting."""
    record_starts, pcaprecords.record_starts = pcaprecords.record_starts, None
    try:
        return ours(native=False)
    finally:
        pcaprecords.record_starts = record_starts


def best(runs: int, work) -> tuple[float, float, object]:
    """The shortest wall-clock and CPU times of `runs` runs, and the last result."""
    walls, cpus, result = [], [], None
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = work()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - started_cpu)
    return min(walls), min(cpus), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reference-runs", type=int, default=1)
    args = parser.parse_args()
    if hotmetrics._hotcount is None:
        print("FAILED: carbonscale._hotcount is not built (pip install -e .)", file=sys.stderr)
        return 1
    ring = Ring([f"10.0.2.{h}:{p}={n}" for h in (1, 2, 3) for p, n in ((2103, "a"), (2203, "b"))],
                "carbon_ch", "carbon-c-relay", 1)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "relay.pcap")
        points = write_capture(path, args.packets)
        with open(path, "rb") as handle:
            total = sum(1 for _ in dpkt.pcap.Reader(handle))

        def bare() -> int:
            with open(path, "rb") as handle:
                return sum(1 for _ in dpkt.pcap.Reader(handle))

        def objects() -> int:
            size = 0
            with open(path, "rb") as handle:
                for _, buf in dpkt.pcap.Reader(handle):
                    size += len(dpkt.ethernet.Ethernet(buf).data.data.data)
            return size

        def ours(full_dpkt: bool = False, native: bool = True) -> dict:
            decoder = hotmetrics.Decoder(native=native)
            hotmetrics.decode_capture(path, decoder, full_dpkt=full_dpkt)
            return hotmetrics.analyse(decoder, ring, b"-_:#", ["10.0.1.1:8127", "10.0.1.1:8129"])

        timings = {
            "dpkt bare": best(args.runs, bare),
            "dpkt objects": best(args.runs, objects),
        }
        if args.reference_runs:
            timings["ours, dpkt full decode"] = best(
                args.reference_runs, lambda: ours(full_dpkt=True, native=False)
            )
        timings["ours, Python"] = best(args.runs, lambda: python_twin(ours))
        timings["ours"] = best(args.runs, ours)
    report = timings["ours"][2]
    for label, (_, _, answer) in timings.items():
        if not label.startswith("ours"):
            continue
        counted = sum(answer["points"].values())
        if counted != points:
            print(f"FAILED: {label} counted {counted} points, the capture holds {points}",
                  file=sys.stderr)  # fmt: skip
            return 1
        if answer != report:
            print(f"FAILED: the report of {label} differs from ours", file=sys.stderr)
            return 1
    print(f"capture: {total} packets, {points} points (statsd, line, pickle)")
    print(f"{'':<23} {'wall s':>8} {'packets/s':>12} {'CPU s':>8} {'packets/s':>12}")
    for label, (wall, cpu, _) in timings.items():
        print(f"{label:<23} {wall:8.3f} {total / wall:12,.0f} {cpu:8.3f} {total / cpu:12,.0f}")
    ours_s, ours_cpu = timings["ours"][:2]
    print(f"ours: {points / ours_s:,.0f} points/s counted, ranked and projected "
          f"({points / ours_cpu:,.0f} per CPU second)")  # fmt: skip
    for label in ("ours, Python", "ours, dpkt full decode", "dpkt bare"):
        if label in timings:
            wall, cpu = timings[label][:2]
            print(f"ours / {label}: {wall / ours_s:.2f}x the speed (CPU {cpu / ours_cpu:.2f}x)")
    for label, rate in (("wall", total / ours_s), ("CPU", total / ours_cpu)):
        print(f"goal >= 500,000 packets/s ({label}): {'met' if rate >= 500_000 else 'NOT met'} "
              f"({rate:,.0f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

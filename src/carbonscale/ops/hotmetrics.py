"""The hot metrics of a packet capture: points/s per metric and per prefix over the
line (TCP or UDP), pickle (TCP) and statsd (UDP) traffic a relay receives, and
the load they put on each storage instance (by the ring, after the relay's name
rewrite) and each statsd daemon (by the statsd relay's placement).

Captures are decoded with dpkt: records from dpkt.pcap.Reader or
dpkt.pcapng.Reader, the link layer by the capture's link type (Ethernet, Linux
cooked v1 and v2, loopback, raw IP), then dpkt's IP/IP6 and TCP/UDP. What is
ours is above the transport: TCP payloads are reassembled per connection in
sequence order before they are cut into lines and pickle frames (decoded by the
pickle relay's own decoder); a connection seen from its middle starts at its
first newline (line) or is skipped (pickle: no frame boundary to start from).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import dpkt

from carbonscale import CarbonscaleError
from carbonscale.relay import lines as relay_lines
from carbonscale.relay.statsd.backends import parse_backends
from carbonscale.relay.statsd.placement import primary
from carbonscale.relay_names import rewrite_block
from carbonscale.ring import Ring

LINE_PORTS = (2003,)
PICKLE_PORTS = (2004,)
STATSD_PORTS = (8125,)
PROTOCOLS = ("line", "pickle", "statsd")

_IP, _IP6 = dpkt.ip.IP, dpkt.ip6.IP6
_TCP, _UDP = dpkt.tcp.TCP, dpkt.udp.UDP
_SYN, _FIN, _RST = dpkt.tcp.TH_SYN, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST
_IPV6_FRAGMENT = dpkt.ip.IP_PROTO_FRAGMENT
# Out-of-order segments held per connection before it is given up as lossy.
MAX_PENDING = 256


def _raw_ip(frame: bytes):
    return (_IP if frame[:1] and frame[0] >> 4 == 4 else _IP6)(frame)


def _network_layer(header) -> Callable[[bytes], object]:
    def decode(frame: bytes):
        return header(frame).data

    return decode


# Link type (pcap LINKTYPE_*) -> frame -> the dpkt network-layer packet.
_LINK_TYPES = {
    dpkt.pcap.DLT_EN10MB: _network_layer(dpkt.ethernet.Ethernet),
    dpkt.pcap.DLT_LINUX_SLL: _network_layer(dpkt.sll.SLL),
    dpkt.pcap.DLT_LINUX_SLL2: _network_layer(dpkt.sll2.SLL2),
    dpkt.pcap.DLT_NULL: _network_layer(dpkt.loopback.Loopback),
    dpkt.pcap.DLT_LOOP: _network_layer(dpkt.loopback.Loopback),
    # Raw IP: LINKTYPE_RAW, and the DLT_RAW values of BSDs (dpkt.pcap.DLT_RAW is the
    # one of the platform it runs on, not of the one that wrote the capture).
    101: _raw_ip,
    12: _raw_ip,
    14: _raw_ip,
}


class CaptureStats:
    def __init__(self) -> None:
        self.packets = 0
        self.first = None
        self.last = None
        self.skipped = Counter()


def open_capture(path: str, stats: CaptureStats) -> tuple[int, Iterable[tuple[float, bytes]]]:
    """The link type and the (timestamp, frame) records of a pcap or pcapng file."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (read by the generator)
    except OSError as exc:
        raise CarbonscaleError(f"cannot read capture {path}: {exc.strerror}") from exc
    try:
        reader = dpkt.pcap.Reader(handle)
    except (ValueError, dpkt.dpkt.NeedData, dpkt.dpkt.UnpackError):
        handle.seek(0)
        try:
            reader = dpkt.pcapng.Reader(handle)
        except (ValueError, dpkt.dpkt.NeedData, dpkt.dpkt.UnpackError):
            handle.close()
            raise CarbonscaleError(f"{path} is not a pcap or pcapng capture") from None
    return reader.datalink(), _records(reader, handle, stats)


def _records(reader, handle, stats: CaptureStats) -> Iterator[tuple[float, bytes]]:
    with handle:
        try:
            yield from reader
        except (dpkt.dpkt.NeedData, dpkt.dpkt.UnpackError, ValueError):
            stats.skipped["truncated record at the end"] += 1


class _Stream:
    __slots__ = ("buffer", "next_seq", "pending", "synced")

    def __init__(self, next_seq: int | None, synced: bool) -> None:
        self.next_seq = next_seq
        self.buffer = b""
        self.pending: dict[int, bytes] = {}
        self.synced = synced


class Decoder:
    """Decodes frames (dpkt, down to TCP/UDP) into line-protocol text per protocol
    (pickle frames through the pickle relay's own decoder) and statsd datagrams."""

    def __init__(
        self,
        line_ports: Sequence[int] = LINE_PORTS,
        pickle_ports: Sequence[int] = PICKLE_PORTS,
        statsd_ports: Sequence[int] = STATSD_PORTS,
    ) -> None:
        self.kind = {p: "line" for p in line_ports}
        self.kind.update({p: "pickle" for p in pickle_ports})
        self.kind.update({p: "statsd" for p in statsd_ports})
        self.chunks: dict[str, list[bytes]] = {p: [] for p in PROTOCOLS}
        self.streams: dict[tuple, _Stream] = {}
        self.stats = CaptureStats()

    # ----- all records

    def feed(self, linktype: int, records: Iterable[tuple[float, bytes]]) -> None:
        """Every record: dpkt decodes link, IP and TCP/UDP; datagrams are taken whole,
        TCP segments go through the reassembly."""
        network_layer = _LINK_TYPES.get(linktype)
        if network_layer is None:
            raise CarbonscaleError(f"link type {linktype} is not supported (Ethernet, Linux "
                                   "cooked, loopback and raw IP are)")  # fmt: skip
        skipped = self.stats.skipped
        kinds = self.kind
        tcp = self.tcp
        statsd_chunks, line_chunks = self.chunks["statsd"], self.chunks["line"]
        count = 0
        first = last = None
        for stamp, frame in records:
            if first is None:
                first = stamp
            last = stamp
            count += 1
            try:
                ip = network_layer(frame)
            except (dpkt.dpkt.UnpackError, IndexError):
                skipped["undecodable frames"] += 1
                continue
            kind = type(ip)
            if kind is _IP:
                if ip.mf or ip.offset:
                    skipped["IP fragments"] += 1
                    continue
            elif kind is _IP6:
                if _IPV6_FRAGMENT in ip.extension_hdrs:
                    skipped["IP fragments"] += 1
                    continue
            else:
                skipped["not IP"] += 1
                continue
            segment = ip.data
            kind = type(segment)
            if kind is _UDP:
                protocol = kinds.get(segment.dport)
                if protocol == "statsd" or protocol == "line":
                    payload = segment.data
                    chunks = statsd_chunks if protocol == "statsd" else line_chunks
                    chunks.append(payload if payload[-1:] == b"\n" else payload + b"\n")
                elif protocol is None:
                    skipped["other ports"] += 1
                else:
                    skipped["pickle over UDP"] += 1
            elif kind is _TCP:
                protocol = kinds.get(segment.dport)
                if protocol is None or protocol == "statsd":
                    skipped["other ports"] += 1
                else:
                    tcp(protocol, (ip.src, segment.sport, ip.dst, segment.dport), segment)
            else:
                skipped["not TCP or UDP"] += 1
        stats = self.stats
        stats.packets += count
        if first is not None:
            stats.first = first if stats.first is None else min(stats.first, first)
            stats.last = last if stats.last is None else max(stats.last, last)

    # ----- TCP reassembly

    def tcp(self, kind: str, key: tuple, segment: dpkt.tcp.TCP) -> None:
        flags, seq, payload = segment.flags, segment.seq, segment.data
        streams = self.streams
        if flags & _SYN:
            streams[key] = _Stream((seq + 1) & 0xFFFFFFFF, True)
            return
        stream = streams.get(key)
        if stream is None:
            if not payload:
                return
            stream = streams[key] = _Stream(seq, False)
        if payload:
            if stream.synced and seq == stream.next_seq and not stream.pending:
                self.in_order(kind, stream, payload)
            else:
                self.segment(kind, stream, seq, payload)
        if flags & (_FIN | _RST):
            del streams[key]

    def in_order(self, kind: str, stream: _Stream, payload: bytes) -> None:
        """The next segment of a synced connection, nothing pending: the common case,
        without the general segment()."""
        stream.next_seq = (stream.next_seq + len(payload)) & 0xFFFFFFFF
        buffered = stream.buffer
        if kind == "pickle":
            joined = buffered + payload if buffered else payload
            # A frame is complete when its length prefix is covered.
            if len(joined) < 4 or int.from_bytes(joined[:4], "big") + 4 > len(joined):
                stream.buffer = joined
            else:
                stream.buffer = self.pickle_frames(stream, joined)
            return
        if payload[-1:] == b"\n" and not buffered:
            self.chunks["line"].append(payload)
            return
        joined = buffered + payload
        cut = joined.rfind(b"\n") + 1
        if cut:
            self.chunks["line"].append(joined[:cut])
        stream.buffer = joined[cut:]

    def segment(self, kind: str, stream: _Stream, seq: int, payload: bytes) -> None:
        ahead = (seq - stream.next_seq) & 0xFFFFFFFF
        if ahead and ahead < 0x80000000:
            if len(stream.pending) >= MAX_PENDING:
                self.stats.skipped["connections given up (lost segments)"] += 1
                stream.pending.clear()
                stream.buffer, stream.synced = b"", False
                stream.next_seq = seq
            else:
                stream.pending[seq] = payload
                return
        elif ahead:  # a retransmission: keep what is new
            behind = 0x100000000 - ahead
            if behind >= len(payload):
                return
            payload = payload[behind:]
        data = stream.buffer + payload
        stream.next_seq = (stream.next_seq + len(payload)) & 0xFFFFFFFF
        while stream.pending:
            more = stream.pending.pop(stream.next_seq, None)
            if more is None:
                break
            data += more
            stream.next_seq = (stream.next_seq + len(more)) & 0xFFFFFFFF
        if kind == "line":
            if not stream.synced:
                cut = data.find(b"\n")
                if cut < 0:
                    stream.buffer = b""
                    return
                data, stream.synced = data[cut + 1 :], True
            cut = data.rfind(b"\n")
            if cut >= 0:
                self.chunks["line"].append(data[: cut + 1])
                data = data[cut + 1 :]
            stream.buffer = data
        else:
            stream.buffer = self.pickle_frames(stream, data)

    def pickle_frames(self, stream: _Stream, data: bytes) -> bytes:
        if not stream.synced:
            self.stats.skipped["pickle connections seen from their middle"] += 1
            return b""
        offset = 0
        while len(data) - offset >= 4:
            length = int.from_bytes(data[offset : offset + 4], "big")
            if len(data) - offset - 4 < length:
                break
            frame = data[offset + 4 : offset + 4 + length]
            offset += 4 + length
            try:
                text, _, invalid = relay_lines.decode_frame(frame, int(time.time()))
            except relay_lines.MalformedFrame:
                self.stats.skipped["malformed pickle frames"] += 1
                stream.synced = False
                return b""
            if invalid:
                self.stats.skipped["invalid pickle points"] += invalid
            self.chunks["pickle"].append(text)
        return data[offset:]

    def names(self, protocol: str) -> list[bytes]:
        """The metric name of every point of a protocol (statsd: the text before ':')."""
        block = b"".join(self.chunks[protocol])
        if not block:
            return []
        if protocol == "statsd":
            return [line.split(b":", 1)[0] for line in block.split(b"\n") if line]
        return [fields[0] for fields in map(bytes.split, block.split(b"\n")) if fields]


def decode_capture(path: str, decoder: Decoder | None = None) -> Decoder:
    decoder = decoder or Decoder()
    linktype, records = open_capture(path, decoder.stats)
    decoder.feed(linktype, records)
    return decoder


def capture(
    seconds: float, interface: str, ports: Iterable[int], path: str, line_port: int = 2003
) -> None:
    """Capture the relay ports' traffic with tcpdump for `seconds` into path.

    Loopback-to-loopback line traffic is left out: it is the pickle relay handing its
    points to the local carbon-c-relay, which would count them twice."""
    ports = sorted(set(ports))
    expression = "(" + " or ".join(f"dst port {p}" for p in ports) + ")"
    expression += f" and not (src net 127.0.0.0/8 and dst net 127.0.0.0/8 and dst port {line_port})"
    command = ["tcpdump", "-i", interface, "-s", "0", "-B", "65536", "-w", path, "-U", "-q"]
    try:
        process = subprocess.Popen([*command, expression], stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise CarbonscaleError("tcpdump is not installed on this host") from exc
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.terminate()
        _, err = process.communicate()
        return
    _, err = process.communicate()
    raise CarbonscaleError(f"tcpdump stopped: {err.decode(errors='replace').strip()}")


def _prefix(name: bytes, depth: int) -> bytes:
    return b".".join(name.split(b".", depth)[:depth])


def analyse(
    decoder: Decoder,
    ring: Ring | None = None,
    allowed_chars: bytes | None = None,
    statsd_backends: Sequence[str] = (),
    seconds: float | None = None,
    top: int = 20,
    prefix_depth: int = 2,
) -> dict:
    """Points/s per metric, per prefix and per protocol, and the projected load per
    storage instance (line and pickle points by the ring) and per statsd daemon."""
    stats = decoder.stats
    span = seconds or ((stats.last - stats.first) if stats.first is not None else 0.0)
    span = span if span > 0 else 1.0
    counts: Counter[bytes] = Counter()
    carbon: Counter[bytes] = Counter()
    statsd: Counter[bytes] = Counter()
    per_protocol = {}
    for protocol in PROTOCOLS:
        names = decoder.names(protocol)
        per_protocol[protocol] = len(names)
        (statsd if protocol == "statsd" else carbon).update(names)
    counts.update(carbon)
    counts.update(statsd)
    prefixes: Counter[bytes] = Counter()
    for name, count in counts.items():
        prefixes[_prefix(name, prefix_depth)] += count

    def ranked(counter: Counter, limit: int) -> list[list]:
        items = counter.most_common(limit or None)
        return [[n.decode("utf-8", "replace"), c, c / span] for n, c in items]

    report = {
        "seconds": span,
        "packets": stats.packets,
        "skipped": dict(stats.skipped),
        "points": per_protocol,
        "points_per_s": {p: c / span for p, c in per_protocol.items()},
        "top_metrics": ranked(counts, top),
        "top_prefixes": ranked(prefixes, top),
        "prefix_depth": prefix_depth,
    }
    if ring is not None:
        report["instances"] = instance_load(ring, carbon, span, allowed_chars)
    if statsd_backends:
        report["statsd_daemons"] = statsd_load(statsd_backends, statsd, span)
    return report


def instance_load(
    ring: Ring, counts: Mapping[bytes, int], span: float, allowed_chars: bytes | None
) -> dict[str, list]:
    """[points, points/s] each ring member receives (every replica counts)."""
    load = {m.relay_syntax: [0, 0.0] for m in ring.members}
    names = list(counts)
    if not names:
        return load
    routed = names
    if allowed_chars is not None:
        routed = rewrite_block(b"\n".join(names) + b"\n", allowed_chars).split(b"\n")[:-1]
    rows = ring.locate_batch(routed).tolist()
    for name, row in zip(names, rows, strict=True):
        for index in row:
            load[ring.members[index].relay_syntax][0] += counts[name]
    for entry in load.values():
        entry[1] = entry[0] / span
    return load


def statsd_load(specs: Sequence[str], counts: Mapping[bytes, int], span: float) -> dict:
    """[points, points/s] each statsd daemon receives from the statsd relay (every
    backend up: StatsRelay's jump placement)."""
    backends = parse_backends(list(specs))
    load = {b.spec: [0, 0.0] for b in backends}
    for name, count in counts.items():
        load[backends[primary(name, len(backends))].spec][0] += count
    for entry in load.values():
        entry[1] = entry[0] / span
    return load


def merge_hot(reports: Mapping[str, dict], top: int = 20) -> dict:
    """The relays' reports summed (each relay sees its own share of the traffic)."""
    merged: dict = {"relays": sorted(reports), "points": Counter(), "points_per_s": Counter()}
    metrics: Counter[str] = Counter()
    prefixes: Counter[str] = Counter()
    instances: Counter[str] = Counter()
    daemons: Counter[str] = Counter()
    for report in reports.values():
        merged["points"].update(report["points"])
        merged["points_per_s"].update(report["points_per_s"])
        metrics.update({n: r for n, _, r in report["top_metrics"]})
        prefixes.update({n: r for n, _, r in report["top_prefixes"]})
        instances.update({m: v[1] for m, v in report.get("instances", {}).items()})
        daemons.update({m: v[1] for m, v in report.get("statsd_daemons", {}).items()})
    merged["points"] = dict(merged["points"])
    merged["points_per_s"] = dict(merged["points_per_s"])
    merged["top_metrics"] = metrics.most_common(top)
    merged["top_prefixes"] = prefixes.most_common(top)
    merged["instances"] = dict(sorted(instances.items()))
    merged["statsd_daemons"] = dict(sorted(daemons.items()))
    return merged


def hot_table(merged: Mapping) -> str:
    lines = ["points/s by protocol: " + ", ".join(
        f"{p} {r:.1f}" for p, r in merged["points_per_s"].items())]  # fmt: skip
    lines.append(f"{'top metrics':<60} {'points/s':>12}")
    lines.extend(f"{n:<60} {r:>12.2f}" for n, r in merged["top_metrics"])
    lines.append(f"{'top prefixes':<60} {'points/s':>12}")
    lines.extend(f"{n:<60} {r:>12.2f}" for n, r in merged["top_prefixes"])
    if merged.get("instances"):
        lines.append(f"{'storage instance (projected by the ring)':<60} {'points/s':>12}")
        lines.extend(f"{m:<60} {r:>12.2f}" for m, r in merged["instances"].items())
    if merged.get("statsd_daemons"):
        lines.append(f"{'statsd daemon (projected)':<60} {'points/s':>12}")
        lines.extend(f"{m:<60} {r:>12.2f}" for m, r in merged["statsd_daemons"].items())
    return "\n".join(lines)


def temporary_capture_path() -> str:
    fd, path = tempfile.mkstemp(prefix="carbonscale-hot-", suffix=".pcap")
    os.close(fd)
    return path

"""The hot metrics of a packet capture: points/s per metric and per prefix over the
line (TCP or UDP), pickle (TCP) and statsd (UDP) traffic a relay receives, and
the load they put on each storage instance (by the ring, after the relay's name
rewrite) and each statsd daemon (by the statsd relay's placement).

Captures are read with dpkt: pcapng through dpkt.pcapng.Reader; classic pcap is
opened (magic, byte order, link type, timestamp precision checked) by
dpkt.pcap.Reader and its records are then walked with dpkt's own record header
format in one loop, which runs several times faster than building a dpkt object
per record and per protocol layer (bench/hot_metrics.py measures both). TCP
payloads are reassembled per connection in sequence order before they are cut
into lines and pickle frames; a connection seen from its middle starts at its
first newline (line) or is skipped (pickle: no frame boundary to start from).
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence

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

# Link types (pcap LINKTYPE_*): where the IP header starts, and how to tell its version.
_ETHERNET, _SLL, _SLL2, _NULL, _LOOP = 1, 113, 276, 0, 108
_RAW = (12, 14, 101)
_IPV4, _IPV6, _VLAN = 0x0800, 0x86DD, 0x8100
_TCP, _UDP = 6, 17
_SYN, _FIN, _RST = 0x02, 0x01, 0x04
# source port, destination port, sequence number, data offset byte, flags byte
_TCP_HEADER = struct.Struct(">HHI4xBB")
# Out-of-order segments held per connection before it is given up as lossy.
MAX_PENDING = 256


class CaptureStats:
    def __init__(self) -> None:
        self.packets = 0
        self.first = None
        self.last = None
        self.skipped = Counter()


def _classic_records(handle, stats: CaptureStats) -> Iterator[tuple[float, bytes]]:
    """(timestamp, frame) of every record of a classic pcap, after dpkt.pcap.Reader
    has checked the file header (the handle is positioned after it)."""
    data = handle.read()
    handle.seek(0)
    magic = handle.read(4)
    little = struct.unpack("<I", magic)[0] in (
        dpkt.pcap.TCPDUMP_MAGIC,
        dpkt.pcap.TCPDUMP_MAGIC_NANO,
    )
    nano = struct.unpack("<I" if little else ">I", magic)[0] == dpkt.pcap.TCPDUMP_MAGIC_NANO
    fields = "".join(f for _, f, _ in dpkt.pcap.PktHdr.__hdr__)
    header = struct.Struct(("<" if little else ">") + fields)
    size = header.size
    divisor = 1e9 if nano else 1e6
    unpack = header.unpack_from
    offset, end = 0, len(data)
    while offset + size <= end:
        sec, frac, caplen, _ = unpack(data, offset)
        offset += size
        if offset + caplen > end:
            stats.skipped["truncated record at the end"] += 1
            return
        yield sec + frac / divisor, data[offset : offset + caplen]
        offset += caplen
    if offset != end:
        stats.skipped["truncated record at the end"] += 1


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
        return reader.datalink(), _pcapng_records(reader, stats)
    return reader.datalink(), _classic_records(handle, stats)


def _pcapng_records(reader, stats: CaptureStats) -> Iterator[tuple[float, bytes]]:
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
    """Decodes frames into line-protocol text per protocol (pickle frames through the
    pickle relay's own decoder) and statsd datagrams."""

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

    # ----- link and network layers

    def frame(self, linktype: int, frame: bytes) -> None:
        if linktype == _ETHERNET:
            ethertype = frame[12] << 8 | frame[13] if len(frame) >= 14 else 0
            offset = 14
            if ethertype == _VLAN and len(frame) >= 18:
                ethertype, offset = frame[16] << 8 | frame[17], 18
        elif linktype == _SLL:
            ethertype, offset = (frame[14] << 8 | frame[15], 16) if len(frame) >= 16 else (0, 0)
        elif linktype == _SLL2:
            ethertype, offset = (frame[0] << 8 | frame[1], 20) if len(frame) >= 20 else (0, 0)
        elif linktype in (_NULL, _LOOP):
            offset = 4
            ethertype = _IPV4 if len(frame) > 4 and frame[4] >> 4 == 4 else _IPV6
        elif linktype in _RAW:
            offset = 0
            ethertype = _IPV4 if frame and frame[0] >> 4 == 4 else _IPV6
        else:
            raise CarbonscaleError(f"link type {linktype} is not supported (Ethernet, Linux "
                                   "cooked, loopback and raw IP are)")  # fmt: skip
        if ethertype == _IPV4:
            self.ipv4(frame, offset)
        elif ethertype == _IPV6:
            self.ipv6(frame, offset)
        else:
            self.stats.skipped["not IP"] += 1

    def ipv4(self, frame: bytes, offset: int) -> None:
        if len(frame) < offset + 20:
            self.stats.skipped["short IP header"] += 1
            return
        header = (frame[offset] & 15) * 4
        end = offset + (frame[offset + 2] << 8 | frame[offset + 3])
        if frame[offset + 6] & 0x3F or frame[offset + 7]:
            self.stats.skipped["IP fragments"] += 1
            return
        proto = frame[offset + 9]
        src, dst = frame[offset + 12 : offset + 16], frame[offset + 16 : offset + 20]
        self.transport(frame, offset + header, min(end, len(frame)), proto, src, dst)

    def ipv6(self, frame: bytes, offset: int) -> None:
        if len(frame) < offset + 40:
            self.stats.skipped["short IP header"] += 1
            return
        end = offset + 40 + (frame[offset + 4] << 8 | frame[offset + 5])
        proto = frame[offset + 6]
        src, dst = frame[offset + 8 : offset + 24], frame[offset + 24 : offset + 40]
        self.transport(frame, offset + 40, min(end, len(frame)), proto, src, dst)

    # ----- transport

    def transport(self, frame: bytes, at: int, end: int, proto: int, src, dst) -> None:
        if proto == _UDP:
            if end < at + 8:
                return
            kind = self.kind.get(frame[at + 2] << 8 | frame[at + 3])
            if kind is None:
                self.stats.skipped["other ports"] += 1
            elif kind == "pickle":
                self.stats.skipped["pickle over UDP"] += 1
            else:
                payload = frame[at + 8 : end]
                self.chunks[kind].append(payload if payload.endswith(b"\n") else payload + b"\n")
            return
        if proto != _TCP or end < at + 20:
            self.stats.skipped["not TCP or UDP"] += 1
            return
        dport = frame[at + 2] << 8 | frame[at + 3]
        kind = self.kind.get(dport)
        if kind is None or kind == "statsd":
            self.stats.skipped["other ports"] += 1
            return
        sport = frame[at] << 8 | frame[at + 1]
        seq = int.from_bytes(frame[at + 4 : at + 8], "big")
        flags = frame[at + 13]
        payload = frame[at + (frame[at + 12] >> 4) * 4 : end]
        key = (src, sport, dst, dport)
        stream = self.streams.get(key)
        if flags & _SYN:
            self.streams[key] = _Stream((seq + 1) & 0xFFFFFFFF, True)
            return
        if stream is None:
            if not payload:
                return
            stream = self.streams[key] = _Stream(seq, False)
        if payload:
            self.segment(kind, stream, seq, payload)
        if flags & (_FIN | _RST):
            del self.streams[key]

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

    # ----- all records

    def feed(self, linktype: int, records: Iterable[tuple[float, bytes]]) -> None:
        """Every record; Ethernet + IPv4 without options' surprises takes the inlined
        path below (the common case on a relay), everything else self.frame()."""
        stats = self.stats
        slow = self.frame
        kinds = self.kind
        streams = self.streams
        segment = self.segment
        statsd_chunks, line_chunks = self.chunks["statsd"], self.chunks["line"]
        tcp_header = _TCP_HEADER.unpack_from
        ethernet = linktype == _ETHERNET
        count = 0
        first = last = None
        for stamp, data in records:
            if first is None:
                first = stamp
            last = stamp
            count += 1
            # Ethernet, IPv4, not a fragment: bytes 12-13 0x0800, 20 & 0x3f and 21 zero.
            if not (ethernet and data[12:14] == b"\x08\x00" and len(data) >= 34
                    and not (data[20] & 0x3F or data[21])):  # fmt: skip
                slow(linktype, data)
                continue
            at = 14 + (data[14] & 15) * 4
            end = min(14 + (data[16] << 8 | data[17]), len(data))
            proto = data[23]
            if proto == _UDP:
                kind = kinds.get(data[at + 2] << 8 | data[at + 3])
                if kind == "statsd" or kind == "line":
                    payload = data[at + 8 : end]
                    chunks = statsd_chunks if kind == "statsd" else line_chunks
                    chunks.append(payload if payload[-1:] == b"\n" else payload + b"\n")
                    continue
                slow(linktype, data)
                continue
            if proto != _TCP or end < at + 20:
                slow(linktype, data)
                continue
            sport, dport, seq, offset, flags = tcp_header(data, at)
            kind = kinds.get(dport)
            if kind is None or kind == "statsd" or flags & (_SYN | _FIN | _RST):
                slow(linktype, data)
                continue
            payload = data[at + (offset >> 4) * 4 : end]
            if not payload:
                continue
            key = (data[26:30], sport, data[30:34], dport)
            stream = streams.get(key)
            if stream is None:
                stream = streams[key] = _Stream(seq, False)
            if stream.synced and seq == stream.next_seq and not stream.pending:
                # In order: the common case, without the general segment().
                stream.next_seq = (seq + len(payload)) & 0xFFFFFFFF
                if kind == "pickle":
                    buffered = stream.buffer
                    joined = buffered + payload if buffered else payload
                    # A frame is complete when its length prefix is covered.
                    if len(joined) < 4 or int.from_bytes(joined[:4], "big") + 4 > len(joined):
                        stream.buffer = joined
                    else:
                        stream.buffer = self.pickle_frames(stream, joined)
                    continue
                if payload[-1:] == b"\n" and not stream.buffer:
                    line_chunks.append(payload)
                    continue
                joined = stream.buffer + payload
                cut = joined.rfind(b"\n") + 1
                if cut:
                    line_chunks.append(joined[:cut])
                stream.buffer = joined[cut:]
                continue
            segment(kind, stream, seq, payload)
        stats.packets += count
        if first is not None:
            stats.first = first if stats.first is None else min(stats.first, first)
            stats.last = last if stats.last is None else max(stats.last, last)

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

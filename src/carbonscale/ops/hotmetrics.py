"""The hot metrics of a packet capture: points/s per metric and per prefix over the
line (TCP or UDP), pickle (TCP) and statsd (UDP) traffic a relay receives, and
the load they put on each storage instance (by the ring, after the relay's name
rewrite) and each statsd daemon (by the statsd relay's placement).

Captures are read with dpkt, two ways that give the same report (tested equal):

- dpkt's full decode (Decoder.feed_dpkt): records from dpkt.pcap.Reader or
  dpkt.pcapng.Reader, the link layer by the capture's link type (Ethernet, Linux
  cooked v1 and v2, loopback, raw IP), then dpkt's IP/IP6 and TCP/UDP objects;
- the bulk path, what decode_capture uses: dpkt reads a classic pcap's file
  header and its records are walked in large blocks (pcaprecords); the headers of
  plain IPv4 TCP/UDP frames (Ethernet, Linux cooked, raw IP; no IP options, not a
  fragment) are read at fixed offsets with numpy for a whole batch, and every
  other frame (VLAN, IPv6, options, fragments, loopback, pcapng) goes through
  dpkt's full decode. A dpkt object per packet is what cost the time.

What is ours is above the transport: TCP payloads are reassembled per connection
in sequence order before they are cut into lines and pickle frames (decoded by
the pickle relay's own decoder); a connection seen from its middle starts at its
first newline (line) or is skipped (pickle: no frame boundary to start from).
Segments that continue a connection back to back are joined at once, the others
go segment by segment. Points are counted per name as the text and frames come,
in C (carbonscale._hotcount: line and statsd names, and the pickle frames of the
shapes carbon's senders write, any other frame through the pickle relay's
decoder); without it (Decoder(native=False), or the extension not built) the text
is kept and counted with numpy (namecount), the frames decoded by the pickle
relay's decoder. Both count the same (tested equal).
"""

from __future__ import annotations

import heapq
import os
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import dpkt
import numpy as np

from carbonscale import CarbonscaleError
from carbonscale.ops import pcaprecords
from carbonscale.ops.namecount import count_names, reference_names
from carbonscale.relay import lines as relay_lines
from carbonscale.relay.statsd.backends import parse_backends
from carbonscale.relay.statsd.placement import primary
from carbonscale.relay_names import rewrite_block
from carbonscale.ring import Ring

try:
    from carbonscale import _hotcount
except ImportError:  # a checkout whose extension was not compiled
    _hotcount = None

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

    def span(self, first, last, count: int) -> None:
        self.packets += count
        if first is not None:
            self.first = first if self.first is None else min(self.first, first)
            self.last = last if self.last is None else max(self.last, last)


def open_capture(path: str, stats: CaptureStats) -> tuple[int, Iterable[tuple[float, bytes]]]:
    """The link type and the (timestamp, frame) records of a pcap or pcapng file, read
    by dpkt record by record."""
    handle = _open(path)
    return _dpkt_reader(path, handle, stats)


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CarbonscaleError(f"cannot read capture {path}: {exc.strerror}") from exc


def _dpkt_reader(path: str, handle, stats: CaptureStats):
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


# Link types whose IPv4 packets the bulk path reads: (link header length, offset
# of its 2-byte EtherType, None for raw IP).
_BULK_LINKS = {
    dpkt.pcap.DLT_EN10MB: (14, 12),
    dpkt.pcap.DLT_LINUX_SLL: (16, 14),
    dpkt.pcap.DLT_LINUX_SLL2: (20, 0),
    101: (0, None),
    12: (0, None),
    14: (0, None),
}
_KIND_CODES = {"line": 1, "pickle": 2, "statsd": 3}
_CLOSING = _SYN | _FIN | _RST
_FRAME_LENGTH = struct.Struct(">I").unpack_from
# Records decoded per batch when they come one by one (pcapng, feed()).
BATCH_RECORDS = 1 << 16


class Decoder:
    """Decodes frames down to TCP/UDP into line-protocol text per protocol (pickle
    frames through the pickle relay's own decoder) and statsd datagrams.

    Two ways down to the transport give the same text: `feed_dpkt` has dpkt decode
    every frame (link layer, IP/IP6, TCP/UDP objects); `feed` and `feed_batches` read
    the fixed-offset headers of plain IPv4 TCP/UDP frames of a batch with numpy
    (Ethernet, Linux cooked or raw IP; no IP options, not a fragment) and hand
    every other frame (VLAN, IPv6, options, fragments, other link types) to dpkt's
    full decode. TCP segments of one connection in a batch that follow each other
    without a gap or a SYN/FIN/RST are joined at once; anything else goes through
    the segment-by-segment reassembly."""

    def __init__(
        self,
        line_ports: Sequence[int] = LINE_PORTS,
        pickle_ports: Sequence[int] = PICKLE_PORTS,
        statsd_ports: Sequence[int] = STATSD_PORTS,
        native: bool = True,
    ) -> None:
        self.kind = {p: "line" for p in line_ports}
        self.kind.update({p: "pickle" for p in pickle_ports})
        self.kind.update({p: "statsd" for p in statsd_ports})
        self.kind_codes = np.zeros(65536, np.uint8)
        for port, kind in self.kind.items():
            self.kind_codes[port] = _KIND_CODES[kind]
        self.chunks: dict[str, list[bytes]] = {p: [] for p in PROTOCOLS}
        # With native, text and pickle frames are counted in C as they come
        # (nothing goes to chunks); else the text is kept for namecount.
        self.native = None
        if native and _hotcount is not None:
            self.native = {p: _hotcount.Counts(p == "statsd") for p in PROTOCOLS}
        self.streams: dict[tuple, _Stream] = {}
        self.stats = CaptureStats()

    # ----- all records, dpkt's full decode

    @staticmethod
    def network_layer(linktype: int) -> Callable[[bytes], object]:
        network_layer = _LINK_TYPES.get(linktype)
        if network_layer is None:
            raise CarbonscaleError(f"link type {linktype} is not supported (Ethernet, Linux "
                                   "cooked, loopback and raw IP are)")  # fmt: skip
        return network_layer

    def feed_dpkt(self, linktype: int, records: Iterable[tuple[float, bytes]]) -> None:
        """Every record through dpkt's full decode (the reference of the bulk path)."""
        network_layer = self.network_layer(linktype)
        transport = self.transport
        count = 0
        first = last = None
        for stamp, frame in records:
            if first is None:
                first = stamp
            last = stamp
            count += 1
            transport(network_layer, frame)
        self.stats.span(first, last, count)

    def transport(self, network_layer, frame: bytes, tcp_segments: list | None = None) -> None:
        """One frame decoded by dpkt: a datagram is taken whole, a TCP segment goes
        through the reassembly (or onto tcp_segments as (key, kind, flags, seq,
        payload), for the caller to order)."""
        skipped = self.stats.skipped
        try:
            ip = network_layer(frame)
        except (dpkt.dpkt.UnpackError, IndexError):
            skipped["undecodable frames"] += 1
            return
        kind = type(ip)
        if kind is _IP:
            if ip.mf or ip.offset:
                skipped["IP fragments"] += 1
                return
        elif kind is _IP6:
            if _IPV6_FRAGMENT in ip.extension_hdrs:
                skipped["IP fragments"] += 1
                return
        else:
            skipped["not IP"] += 1
            return
        segment = ip.data
        kind = type(segment)
        if kind is _UDP:
            protocol = self.kind.get(segment.dport)
            if protocol == "statsd" or protocol == "line":
                payload = segment.data
                self.text(protocol, payload if payload[-1:] == b"\n" else payload + b"\n")
            elif protocol is None:
                skipped["other ports"] += 1
            else:
                skipped["pickle over UDP"] += 1
        elif kind is _TCP:
            protocol = self.kind.get(segment.dport)
            if protocol is None or protocol == "statsd":
                skipped["other ports"] += 1
                return
            key = (ip.src, segment.sport, ip.dst, segment.dport)
            if tcp_segments is None:
                self.tcp(protocol, key, segment.flags, segment.seq, segment.data)
            else:
                tcp_segments.append((key, protocol, segment.flags, segment.seq, segment.data))
        else:
            skipped["not TCP or UDP"] += 1

    # ----- all records, in batches

    def feed(self, linktype: int, records: Iterable[tuple[float, bytes]]) -> None:
        """Records from any reader, decoded in batches."""
        self.feed_batches(linktype, _record_batches(records))

    def feed_batches(self, linktype: int, batches: Iterable[pcaprecords.Batch]) -> None:
        """Batches of records, read in capture order: one feed (the capture's first and
        last record give its time span, as dpkt's record by record feeds do)."""
        network_layer = self.network_layer(linktype)
        count = 0
        first = last = None
        for batch in batches:
            if first is None:
                first = batch.first
            last = batch.last
            count += len(batch.starts)
            self._batch(network_layer, linktype, batch)
        self.stats.span(first, last, count)

    def _batch(self, network_layer, linktype: int, batch: pcaprecords.Batch) -> None:
        count = len(batch.starts)
        if not count:
            return
        buffer, starts, lengths = batch.buffer, batch.starts, batch.lengths
        skipped = self.stats.skipped
        raw = np.frombuffer(buffer, np.uint8)
        bulk = np.zeros(count, bool)
        link = _BULK_LINKS.get(linktype)
        if link is not None:
            header, type_at = link
            rows = np.flatnonzero(lengths >= header + 28)
            ip = starts[rows] + header
            limit = len(raw) - 1

            def byte(offset: int) -> np.ndarray:
                return raw[np.minimum(ip + offset, limit)]

            ok = byte(0) == 0x45  # IPv4 without options
            if type_at is not None:
                ok &= (byte(type_at - header) == 8) & (byte(type_at - header + 1) == 0)
            ok &= ((byte(6) & 0x3F) == 0) & (byte(7) == 0)  # no MF flag, no offset
            proto = byte(9)
            is_tcp = proto == 6
            ok &= is_tcp | (proto == 17)
            total = byte(2).astype(np.int64) << 8 | byte(3)
            captured = lengths[rows] - header
            ip_length = np.where(total == 0, captured, np.minimum(total, captured))
            tcp_header = (byte(32) >> 4).astype(np.int64) * 4
            ok &= np.where(is_tcp, (tcp_header >= 20) & (ip_length >= 20 + tcp_header),
                           ip_length >= 28)  # fmt: skip
            rows, ip, ip_length, is_tcp = rows[ok], ip[ok], ip_length[ok], is_tcp[ok]
            tcp_header = tcp_header[ok]
            bulk[rows] = True
            ports = raw[ip + 20].astype(np.int64) << 24 | raw[ip + 21].astype(np.int64) << 16
            ports |= raw[ip + 22].astype(np.int64) << 8 | raw[ip + 23]
            kinds = self.kind_codes[ports & 0xFFFF]
            payload_start = ip + np.where(is_tcp, 20 + tcp_header, 28)
            payload_end = ip + ip_length
            self._datagrams(raw, buffer, ~is_tcp, kinds, payload_start, payload_end)
            tcp_rows = is_tcp & ((kinds == 1) | (kinds == 2))
            skipped_tcp = int(np.count_nonzero(is_tcp)) - int(np.count_nonzero(tcp_rows))
            if skipped_tcp:
                skipped["other ports"] += skipped_tcp
            segments = _flows(buffer, raw, rows[tcp_rows], ip[tcp_rows], ports[tcp_rows],
                              kinds[tcp_rows], payload_start[tcp_rows],
                              payload_end[tcp_rows])  # fmt: skip
        else:
            segments = None
        dpkt_segments: dict[tuple, list] = {}
        found: list = []
        for row in np.flatnonzero(~bulk).tolist():
            start = int(starts[row])
            self.transport(network_layer, buffer[start : start + int(lengths[row])], found)
            for key, *segment in found:
                dpkt_segments.setdefault(key, []).append((row, *segment))
            found.clear()
        self._segments(buffer, segments, dpkt_segments)

    def _datagrams(self, raw, buffer, is_udp, kinds, payload_start, payload_end) -> None:
        skipped = self.stats.skipped
        other = int(np.count_nonzero(is_udp & (kinds == 0)))
        if other:
            skipped["other ports"] += other
        pickle_udp = int(np.count_nonzero(is_udp & (kinds == 2)))
        if pickle_udp:
            skipped["pickle over UDP"] += pickle_udp
        for code, protocol in ((1, "line"), (3, "statsd")):
            chosen = is_udp & (kinds == code)
            if not chosen.any():
                continue
            begins, ends = payload_start[chosen], payload_end[chosen]
            if self.native is not None:
                self.native[protocol].add_spans(buffer, begins.tolist(), ends.tolist())
                continue
            terminated = (ends > begins) & (raw[np.maximum(ends - 1, 0)] == 10)
            spans = zip(begins.tolist(), ends.tolist(), terminated.tolist(), strict=True)
            self.chunks[protocol].extend(
                buffer[b:e] if t else buffer[b:e] + b"\n" for b, e, t in spans
            )

    def _segments(self, buffer: bytes, segments, dpkt_segments: dict[tuple, list]) -> None:
        """Every connection's segments of a batch, in capture order per connection."""
        tcp = self.tcp
        if segments is not None:
            for key, kind, rows, flags, seqs, begins, ends, tail in segments:
                extra = dpkt_segments.pop(key, None)
                if extra is not None:  # some of its frames were dpkt's: one by one, in order
                    merged = [(r, f, s, buffer[b:e]) for r, f, s, b, e in
                              zip(rows, flags, seqs, begins, ends, strict=True)]  # fmt: skip
                    merged.extend((r, f, s, p) for r, _, f, s, p in extra)
                    merged.sort(key=lambda item: item[0])
                    for _, f, s, p in merged:
                        tcp(kind, key, f, s, p)
                    continue
                at = 0
                while at < tail:
                    tcp(kind, key, flags[at], seqs[at], buffer[begins[at] : ends[at]])
                    at += 1
                stream = self.streams.get(key)
                while at < len(rows):
                    if (stream is not None and stream.synced and not stream.pending
                            and stream.next_seq == seqs[at]):  # fmt: skip
                        self._joined(kind, stream, buffer, seqs, begins[at:], ends[at:])
                        break
                    tcp(kind, key, flags[at], seqs[at], buffer[begins[at] : ends[at]])
                    stream = self.streams.get(key)
                    at += 1
        for key, items in dpkt_segments.items():
            for _, kind, flags, seq, payload in items:
                tcp(kind, key, flags, seq, payload)

    def _joined(self, kind: str, stream: _Stream, buffer: bytes, seqs, begins, ends) -> None:
        """Segments that continue a synced stream back to back, at once."""
        stream.next_seq = (seqs[-1] + ends[-1] - begins[-1]) & 0xFFFFFFFF
        if kind == "pickle":
            if self.native is not None:
                data = _hotcount.join_spans(stream.buffer, buffer, begins, ends)
            else:
                parts = [stream.buffer]
                parts.extend(buffer[b:e] for b, e in zip(begins, ends, strict=True))
                data = b"".join(parts)
            offset = len(stream.buffer)
            stream.buffer, broken_at = self._pickle_frames(stream, data)
            if broken_at is not None:
                # segment() would have counted each later segment as seen from its middle
                later = 0
                for b, e in zip(begins, ends, strict=True):
                    later += offset >= broken_at
                    offset += e - b
                if later:
                    self.stats.skipped["pickle connections seen from their middle"] += later
            return
        if self.native is not None:
            stream.buffer = self.native["line"].add_segments(stream.buffer, buffer, begins, ends)
            return
        last = len(begins) - 1
        while last >= 0:
            cut = buffer.rfind(b"\n", begins[last], ends[last]) + 1
            if cut:
                break
            last -= 1
        if last < 0:
            parts = [stream.buffer]
            parts.extend(buffer[b:e] for b, e in zip(begins, ends, strict=True))
            stream.buffer = b"".join(parts)
            return
        parts = [stream.buffer]
        parts.extend(buffer[b:e] for b, e in zip(begins[:last], ends[:last], strict=True))
        parts.append(buffer[begins[last] : cut])
        self.chunks["line"].append(b"".join(parts))
        rest = [buffer[cut : ends[last]]]
        rest.extend(buffer[b:e] for b, e in zip(begins[last + 1 :], ends[last + 1 :],
                                                 strict=True))  # fmt: skip
        stream.buffer = b"".join(rest)

    # ----- TCP reassembly, segment by segment

    def tcp(self, kind: str, key: tuple, flags: int, seq: int, payload: bytes) -> None:
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
            self.text("line", payload)
            return
        joined = buffered + payload
        cut = joined.rfind(b"\n") + 1
        if cut:
            self.text("line", joined[:cut])
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
                self.text("line", data[: cut + 1])
                data = data[cut + 1 :]
            stream.buffer = data
        else:
            stream.buffer = self.pickle_frames(stream, data)

    def pickle_frames(self, stream: _Stream, data: bytes) -> bytes:
        return self._pickle_frames(stream, data)[0]

    def _pickle_frames(self, stream: _Stream, data: bytes) -> tuple[bytes, int | None]:
        """The frames of data decoded; (what is left, None), or (b"", the end of the
        malformed frame) when one was and the stream lost its frame boundaries."""
        if not stream.synced:
            self.stats.skipped["pickle connections seen from their middle"] += 1
            return b"", None
        offset, size, now = 0, len(data), int(time.time())
        native = self.native["pickle"] if self.native is not None else None
        while size - offset >= 4:
            if native is not None:
                # C counts the frames it knows; the first it does not comes here.
                offset, unknown, invalid = native.add_pickle_frames(
                    data, offset, relay_lines.DEFAULT_MAX_NAME, relay_lines.DEFAULT_MAX_OUTPUT
                )
                if invalid:
                    self.stats.skipped["invalid pickle points"] += invalid
                if not unknown:
                    break
            length = _FRAME_LENGTH(data, offset)[0]
            if size - offset - 4 < length:
                break
            frame = data[offset + 4 : offset + 4 + length]
            offset += 4 + length
            try:
                text, _, invalid = relay_lines.decode_frame(frame, now)
            except relay_lines.MalformedFrame:
                self.stats.skipped["malformed pickle frames"] += 1
                stream.synced = False
                return b"", offset
            if invalid:
                self.stats.skipped["invalid pickle points"] += invalid
            self.text("pickle", text)
        return data[offset:], None

    def text(self, protocol: str, text: bytes) -> None:
        """Whole lines of a protocol's text, counted now (native) or kept."""
        if self.native is None:
            self.chunks[protocol].append(text)
        else:
            self.native[protocol].add_text(text)

    def names(self, protocol: str) -> list[bytes]:
        """The metric name of every point of a protocol (statsd: the text before ':');
        those counted in C come grouped by name."""
        block = b"".join(self.chunks[protocol])
        names = reference_names(block, protocol == "statsd") if block else []
        if self.native is not None:
            names.extend(Counter(self.native[protocol].items()).elements())
        return names

    def counts(self, protocol: str) -> Counter[bytes]:
        """Points per metric name of a protocol (what Counter(names()) would be)."""
        counts = count_names(self.chunks[protocol], protocol == "statsd")
        if self.native is not None:
            counts.update(self.native[protocol].items())
        return counts


def decode_capture(path: str, decoder: Decoder | None = None, full_dpkt: bool = False) -> Decoder:
    """The capture decoded: a classic pcap in bulk (pcaprecords, Decoder.feed_batches),
    pcapng record by record through dpkt's reader; with full_dpkt, every record
    through dpkt's reader and full decode (Decoder.feed_dpkt, the reference)."""
    decoder = decoder or Decoder()
    handle = _open(path)
    header = None if full_dpkt else pcaprecords.file_header(handle)
    if header is None:
        handle.seek(0)
        linktype, records = _dpkt_reader(path, handle, decoder.stats)
        (decoder.feed_dpkt if full_dpkt else decoder.feed)(linktype, records)
        return decoder
    linktype, order, divisor = header
    with handle:
        decoder.feed_batches(
            linktype, pcaprecords.batches(handle, order, divisor, decoder.stats.skipped)
        )
    return decoder


def _record_batches(records: Iterable[tuple[float, bytes]]) -> Iterator[pcaprecords.Batch]:
    batch: list[tuple[float, bytes]] = []
    for record in records:
        batch.append(record)
        if len(batch) == BATCH_RECORDS:
            yield pcaprecords.Batch.of_frames(batch)
            batch = []
    if batch:
        yield pcaprecords.Batch.of_frames(batch)


def _flows(buffer, raw, rows, ip, ports, kinds, begins, ends) -> Iterator[tuple]:
    """The bulk path's TCP segments per connection: (key, kind, rows, flags, seqs,
    payload begins, payload ends, tail), each list in capture order; the segments
    from `tail` on follow each other without a gap and carry no SYN, FIN or RST.
    Segments without payload or any of those flags change nothing and are left out."""
    flags = raw[ip + 33]
    seqs = raw[ip + 24].astype(np.int64) << 24 | raw[ip + 25].astype(np.int64) << 16
    seqs |= raw[ip + 26].astype(np.int64) << 8 | raw[ip + 27]
    flagged = (flags & _CLOSING) != 0
    keep = flagged | (ends > begins)
    if not keep.all():
        rows, ip, ports, kinds = rows[keep], ip[keep], ports[keep], kinds[keep]
        begins, ends = begins[keep], ends[keep]
        flags, seqs, flagged = flags[keep], seqs[keep], flagged[keep]
    if not len(rows):
        return
    words = np.ndarray((len(raw) - 7,), "<u8", buffer, 0, (1,))
    addresses = words[ip + 12]
    order = np.lexsort((ports, addresses))  # stable: capture order within a connection
    rows, ip, ports, kinds = rows[order], ip[order], ports[order], kinds[order]
    begins, ends = begins[order], ends[order]
    flags, seqs, flagged, addresses = flags[order], seqs[order], flagged[order], addresses[order]
    count = len(rows)
    first = np.ones(count, bool)
    first[1:] = (addresses[1:] != addresses[:-1]) | (ports[1:] != ports[:-1])
    follows = np.zeros(count, bool)
    follows[1:] = seqs[1:] == (seqs[:-1] + (ends[:-1] - begins[:-1])) & 0xFFFFFFFF
    breaks = np.flatnonzero(first | flagged | ~follows)
    tail_from = np.where(flagged[breaks], breaks + 1, breaks)
    flow_starts = np.flatnonzero(first)
    flow_ends = np.append(flow_starts[1:], count)
    last_break = np.searchsorted(breaks, flow_ends) - 1
    tails = (tail_from[last_break] - flow_starts).tolist()
    names = {1: "line", 2: "pickle"}
    for start, end, tail in zip(flow_starts.tolist(), flow_ends.tolist(), tails, strict=True):
        at = int(ip[start])
        port_pair = int(ports[start])
        key = (buffer[at + 12 : at + 16], port_pair >> 16, buffer[at + 16 : at + 20],
               port_pair & 0xFFFF)  # fmt: skip
        yield (key, names[int(kinds[start])], rows[start:end].tolist(),
               flags[start:end].tolist(), seqs[start:end].tolist(),
               begins[start:end].tolist(), ends[start:end].tolist(), tail)  # fmt: skip


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


def _most_points_first(item: tuple[bytes, int]) -> tuple[int, bytes]:
    return -item[1], item[0]


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
        names = decoder.counts(protocol)
        per_protocol[protocol] = sum(names.values())
        (statsd if protocol == "statsd" else carbon).update(names)
    counts.update(carbon)
    counts.update(statsd)
    prefixes: Counter[bytes] = Counter()
    for name, count in counts.items():
        prefixes[_prefix(name, prefix_depth)] += count

    def ranked(counter: Counter, limit: int) -> list[list]:
        # Most points first; equal counts by name, whatever order the points came in.
        # (the top ones by a heap: sorting every name costs more than the count)
        order = _most_points_first
        items = (
            heapq.nsmallest(limit, counter.items(), order)
            if limit
            else sorted(counter.items(), key=order)
        )
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

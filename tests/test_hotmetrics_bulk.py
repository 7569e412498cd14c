"""hot-metrics' bulk decode (numpy-read headers, joined TCP segments, names counted by
hash) against dpkt's full decode of every frame, on one capture of mixed traffic:
plain IPv4 TCP and UDP, a VLAN-tagged frame, IPv6, IP options, a fragment, lines
and pickle frames cut across segments, segments out of order and retransmitted,
a connection seen from its middle, a malformed pickle frame, other ports."""

from __future__ import annotations

import pickle
import random
import struct
from collections import Counter

import dpkt
import pytest

from carbonscale.ops import hotmetrics, namecount, pcaprecords
from carbonscale.ring import Ring

MAC = b"\x02\x00\x00\x00\x00\x01"
RELAY4 = b"\x0a\x00\x01\x01"
RELAY6 = bytes(15) + b"\x02"


def _transport(sport: int, dport: int, payload: bytes, seq: int | None, flags: int):
    if seq is None:
        udp = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
        udp.ulen = len(udp)
        return dpkt.ip.IP_PROTO_UDP, udp
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, flags=flags, data=payload)
    return dpkt.ip.IP_PROTO_TCP, tcp


def ipv4(client: int, sport: int, dport: int, payload: bytes = b"", seq: int | None = None,
         flags: int = dpkt.tcp.TH_ACK, options: bytes = b"", vlan: bool = False,
         ) -> bytes:  # fmt: skip
    proto, transport = _transport(sport, dport, payload, seq, flags)
    ip = dpkt.ip.IP(src=bytes([10, 0, 0, client]), dst=RELAY4, p=proto, data=transport)
    if options:
        ip.opts = options
        ip.hl = 5 + len(options) // 4
    ip.len = len(ip)
    if vlan:  # an 802.1Q tag before the IPv4 EtherType
        return MAC + MAC + struct.pack(">HHH", 0x8100, 42, 0x0800) + bytes(ip)
    return bytes(dpkt.ethernet.Ethernet(src=MAC, dst=MAC, type=0x0800, data=ip))


def ipv6(client: int, sport: int, dport: int, payload: bytes, seq: int | None = None) -> bytes:
    proto, transport = _transport(sport, dport, payload, seq, dpkt.tcp.TH_ACK)
    ip = dpkt.ip6.IP6(src=bytes(15) + bytes([client]), dst=RELAY6, nxt=proto, p=proto,
                      hlim=64, data=transport)  # fmt: skip
    ip.plen = len(transport)
    return bytes(dpkt.ethernet.Ethernet(src=MAC, dst=MAC, type=0x86DD, data=ip))


def _pickle_frame(points: list) -> bytes:
    body = pickle.dumps(points, 2)
    return struct.pack(">I", len(body)) + body


def mixed_traffic() -> tuple[list[bytes], Counter]:
    """Frames in capture order, and the points per name a correct decode finds."""
    frames: list[bytes] = []
    truth: Counter[str] = Counter()
    syn = dpkt.tcp.TH_SYN

    # Line protocol from client 1: SYN, then lines cut across segments; one of its
    # segments arrives VLAN-tagged (dpkt decodes that frame, numpy the others).
    stream = b"".join(b"web.a.requests 1 1700000000\n" for _ in range(40))
    stream += b"split.across.segments 2 1700000000\n"
    stream += b"".join(b"web.b%d.requests 3 1700000000\n" % (i % 7) for i in range(60))
    truth.update({"web.a.requests": 40, "split.across.segments": 1})
    truth.update(f"web.b{i % 7}.requests" for i in range(60))
    frames.append(ipv4(1, 40001, 2003, seq=999, flags=syn))
    cut = stream.index(b"split.across.segments") + 8  # inside the name
    pieces = [stream[:500], stream[500:cut], stream[cut:1900], stream[1900:]]
    seq = 1000
    for number, piece in enumerate(pieces):
        frames.append(ipv4(1, 40001, 2003, piece, seq, vlan=number == 2))
        seq += len(piece)
    frames.append(ipv4(1, 40001, 2003, b"", seq, flags=dpkt.tcp.TH_FIN | dpkt.tcp.TH_ACK))

    # Line protocol from client 2, seen from its middle (no SYN): the text before the
    # first newline is a line's end and is not counted. Segments out of order, one
    # retransmitted, one carrying IP options (dpkt decodes it).
    stream = b"ame.cut.off 1 1700000000\n" + b"".join(
        b"db.c%d.queries\t4 1700000000\n" % (i % 3) for i in range(90)
    )
    truth.update(f"db.c{i % 3}.queries" for i in range(90))
    parts = [stream[i : i + 333] for i in range(0, len(stream), 333)]
    seqs = [5000 + sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    order = [0, 2, 1, 3, 3, 4, 5, 6, 7][: len(parts) + 1]
    for number, index in enumerate(order):
        options = b"\x01\x01\x01\x00" if number == 5 else b""
        frames.append(ipv4(2, 40002, 2003, parts[index], seqs[index], options=options))
    for index in range(max(order) + 1, len(parts)):
        frames.append(ipv4(2, 40002, 2003, parts[index], seqs[index]))

    # Pickle from client 3: SYN, frames cut across segments.
    stream = b"".join(
        _pickle_frame([(f"db.d{j}.latency", (1700000000, 1.0)) for j in range(25)])
        for _ in range(6)
    )
    truth.update({f"db.d{j}.latency": 6 for j in range(25)})
    frames.append(ipv4(3, 40003, 2004, seq=0, flags=syn))
    seq = 1
    for at in range(0, len(stream), 700):
        frames.append(ipv4(3, 40003, 2004, stream[at : at + 700], seq))
        seq += len(stream[at : at + 700])

    # Pickle from client 4: one good frame, a malformed one, then more (lost).
    good = _pickle_frame([("web.e.errors", (1700000000, 2.0))] * 10)
    truth["web.e.errors"] = 10
    stream = good + struct.pack(">I", 8) + b"garbage!" + good + good
    frames.append(ipv4(4, 40004, 2004, seq=0, flags=syn))
    seq = 1
    for at in range(0, len(stream), 60):
        frames.append(ipv4(4, 40004, 2004, stream[at : at + 60], seq))
        seq += len(stream[at : at + 60])

    # Line protocol over IPv6 TCP, and statsd over IPv4 and IPv6 UDP.
    frames.append(ipv6(5, 40005, 2003, b"", 99))  # a bare ACK: no stream
    frames.append(ipv6(5, 40005, 2003, b"x\nv6.line.metric 1 1700000000\n", 100))
    truth["v6.line.metric"] = 1
    for i in range(30):
        frames.append(ipv4(6, 41000 + i, 8125, b"api.f.hits:1|c\napi.g.hits:%d|ms" % i))
        frames.append(ipv4(6, 41000 + i, 8125, b"\n\napi.f.hits:2|c\n"))
    truth.update({"api.f.hits": 60, "api.g.hits": 30})
    frames.append(ipv6(7, 42000, 8125, b"v6.statsd:1|c"))
    truth["v6.statsd"] = 1
    # Line protocol over UDP, other ports, a fragment, pickle over UDP.
    frames.append(ipv4(8, 43000, 2003, b"  udp.line 1 1700000000\n\n"))
    truth["udp.line"] = 1
    frames.append(ipv4(8, 43001, 9999, b"other.port 1 1\n"))
    frames.append(ipv4(8, 43002, 2004, b"pickle over udp"))
    fragment = dpkt.ethernet.Ethernet(ipv4(8, 43003, 8125, b"frag:1|c"))
    fragment.data.mf = 1
    frames.append(bytes(fragment))
    frames.append(ipv4(8, 43004, 2003, b"x" * 10, 7, options=b""))  # from its middle, no \n
    return frames, truth


def write_capture(path, frames: list[bytes], truncated: bytes = b"") -> None:
    """A pcap of the frames a millisecond apart, but the last one stamped as the
    second (stamps from several interfaces need not be in order: the span is still
    the first record's stamp to the last one's)."""
    stamps = [1_700_000_000 + number * 0.001 for number in range(len(frames))]
    stamps[-1] = stamps[min(1, len(stamps) - 1)]
    with open(path, "wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        for frame, stamp in zip(frames, stamps, strict=True):
            writer.writepkt(frame, stamp)
        handle.write(truncated)


RING = Ring([f"10.0.2.{h}:2103=a" for h in (1, 2, 3)], "carbon_ch", "carbon-c-relay", 1)


def _report(path, full_dpkt: bool) -> dict:
    decoder = hotmetrics.decode_capture(str(path), full_dpkt=full_dpkt)
    return hotmetrics.analyse(decoder, RING, b"-_:#", ["10.0.1.1:8127", "10.0.1.2:8127"], top=0)


@pytest.mark.parametrize("block_bytes", [pcaprecords.BLOCK_BYTES, 700])
def test_bulk_decode_reports_what_dpkts_full_decode_does(tmp_path, monkeypatch, block_bytes):
    # 700-byte blocks: records and TCP connections are cut across many batches.
    monkeypatch.setattr(pcaprecords, "BLOCK_BYTES", block_bytes)
    frames, truth = mixed_traffic()
    path = tmp_path / "mixed.pcap"
    write_capture(path, frames, truncated=b"\x01\x02\x03")
    full, bulk = _report(path, True), _report(path, False)
    assert bulk == full
    assert {n: c for n, c, _ in bulk["top_metrics"]} == dict(truth)
    assert bulk["packets"] == len(frames)
    assert bulk["seconds"] == pytest.approx(0.001, abs=1e-5)
    skipped = bulk["skipped"]
    assert skipped["truncated record at the end"] == 1
    assert skipped["IP fragments"] == 1
    assert skipped["other ports"] == 1
    assert skipped["pickle over UDP"] == 1
    assert skipped["malformed pickle frames"] == 1
    assert skipped["pickle connections seen from their middle"] > 0


def test_a_record_cut_short_at_the_end_is_read_as_far_as_it_goes(tmp_path):
    frames = [ipv4(1, 40000, 8125, b"whole:1|c"), ipv4(1, 40000, 8125, b"cut.short:1|c")]
    path = tmp_path / "cut.pcap"
    write_capture(path, frames)
    with open(path, "r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 4)  # the last datagram loses "1|c" and more
    full, bulk = _report(path, True), _report(path, False)
    assert bulk == full
    assert bulk["packets"] == 2


def test_pcapng_and_records_fed_one_by_one_decode_alike(tmp_path):
    frames, truth = mixed_traffic()
    path = tmp_path / "mixed.pcapng"
    with open(path, "wb") as handle:
        writer = dpkt.pcapng.Writer(handle)
        for number, frame in enumerate(frames):
            writer.writepkt(frame, 1_700_000_000 + number)
    assert _report(path, False) == _report(path, True)
    decoder = hotmetrics.Decoder()
    decoder.feed(1, [(float(n), f) for n, f in enumerate(frames)])
    assert sum(decoder.counts("line").values()) == len(decoder.names("line"))
    counts = Counter()
    for protocol in hotmetrics.PROTOCOLS:
        counts.update({n.decode(): c for n, c in decoder.counts(protocol).items()})
    assert counts == truth


def _random_text(rng: random.Random, statsd: bool) -> list[bytes]:
    names = [b"a", b"web.b.requests", b"x" * 200, b"db.%d.q" % 7, b"\xc3\xa9t\xc3\xa9", b"a\x00b"]
    names += [b"n%d.%s" % (i, b"y" * (i * 5)) for i in range(30)]
    chunks = []
    for _ in range(300):
        lines = []
        for _ in range(rng.randint(1, 20)):
            name = rng.choice(names)
            shape = rng.random()
            if statsd:
                line = name + (b":1|c" if shape < 0.8 else b"" if shape < 0.9 else b":x:y")
                line = b"" if shape > 0.97 else line
            else:
                line = name + b" 1 1700000000"
                if shape > 0.95:
                    line = b"  " + line
                elif shape > 0.9:
                    line = b""
                elif shape > 0.88:
                    line = name.replace(b".", b"\t", 1) + b" 1 2"
            lines.append(line + b"\n")
        chunks.append(b"".join(lines))
    return chunks


@pytest.mark.parametrize("statsd", [False, True])
def test_names_counted_by_hash_equal_the_line_by_line_count(monkeypatch, statsd):
    monkeypatch.setattr(namecount, "BLOCK_BYTES", 4096)
    rng = random.Random(17)
    chunks = _random_text(rng, statsd)
    expected = Counter(namecount.reference_names(b"".join(chunks), statsd))
    assert namecount.count_names(chunks, statsd) == expected
    # Without the tabs no block falls back: only long names and lines that begin
    # with a space are counted line by line.
    plain = [c.replace(b"\t", b".") for c in chunks]
    counter = namecount.NameCounter(statsd)
    counter.add_chunks(plain)
    assert counter.result() == Counter(namecount.reference_names(b"".join(plain), statsd))
    lines = b"".join(plain).split(b"\n")
    odd = {line.split()[0] for line in lines if line[:1] == b" "}
    odd |= {n for n in counter.result() if len(n) > namecount.MAX_HASHED_NAME}
    assert counter.exact and set(counter.exact) <= odd

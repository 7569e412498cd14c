"""hot-metrics' bulk decode (numpy-read headers, joined TCP segments) counting in C
(carbonscale._hotcount) and in Python (names counted by hash, pickle frames through
the pickle relay's decoder), against dpkt's full decode of every frame, on one
capture of mixed traffic: plain IPv4 TCP and UDP, a VLAN-tagged frame, IPv6, IP
options, a fragment, lines and pickle frames cut across segments, segments out of
order and retransmitted, a connection seen from its middle, malformed and truncated
pickle frames, pickle protocols 0 to 4, names that are not UTF-8, other ports. The C
pickle decoder is also checked frame by frame against the pickle relay's decoder."""

from __future__ import annotations

import pickle
import random
import struct
from collections import Counter

import dpkt
import pytest

from carbonscale.ops import hotmetrics, namecount, pcaprecords
from carbonscale.relay import lines as relay_lines
from carbonscale.ring import Ring

# The C counter is what `carbonscale ops hot-metrics` runs: it must be built here.
Counts = hotmetrics._hotcount.Counts

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


def _framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _pickle_frame(points: list, protocol: int = 2) -> bytes:
    return _framed(pickle.dumps(points, protocol))


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

    # Pickle from client 9: the protocols and shapes senders write, frames C knows and
    # frames it leaves to the pickle relay's decoder, in one connection.
    shared = "db.g.shared"  # one str object: the later entries refer to it by the memo
    stream = b"".join(
        [
            _pickle_frame([("p0.name", (1700000000, 1.5)), ("p0.name", (1, 2))], 0),
            _pickle_frame([("p1.name", (1700000000, 1))] * 3, 1),
            _pickle_frame([(shared, (1700000000, float(i))) for i in range(4)], 2),
            _pickle_frame([("p4.name", [(1, 2), (3, 4)]), ("p4.name", (5, 6), (7, 8))], 4),
            _pickle_frame([("nan.value", (1, float("nan"))), ("ok.value", (1, 1))], 2),
            _pickle_frame([("string.numbers", ("1700000000", "2.5"))], 2),
            _pickle_frame([("big.int", (1700000000, 2**70)), ("bad name", (1, 1))], 2),
            _pickle_frame([(b"caf\xe9.bytes", (1, 1)), ("caf\u00e9.str", (1, 1))], 3),
            # Python 2's cPickle: str names are SHORT_BINSTRING, here not UTF-8.
            _framed(b"\x80\x02]q\x01(U\x04\xff\xfe.xq\x02K\x01K\x02\x86q\x03\x86q\x04e."),
            # BINUNICODE of a surrogate: unpickled (surrogatepass), not a name to write.
            _framed(b"\x80\x02]q\x00X\x05\x00\x00\x00\xed\xa0\x80.sK\x01K\x02\x86\x86a."),
        ]
    )
    truth.update({"p0.name": 2, "p1.name": 3, shared: 4, "p4.name": 4, "ok.value": 1})
    truth.update({"string.numbers": 1, "big.int": 1, "caf\ufffd.bytes": 1, "café.str": 1})
    truth["\ufffd\ufffd.x"] = 1
    frames.append(ipv4(9, 40009, 2004, seq=0, flags=syn))
    seq = 1
    for at in range(0, len(stream), 97):
        frames.append(ipv4(9, 40009, 2004, stream[at : at + 97], seq))
        seq += len(stream[at : at + 97])
    # Client 10: a BINUNICODE name that is not UTF-8 makes its frame malformed; the
    # connection's later frames are lost. Client 11: its last frame is cut short.
    bad_utf8 = b"\x80\x02]q\x00X\x03\x00\x00\x00\xff.sK\x01K\x02\x86\x86a."
    stream = _pickle_frame([("before.bad", (1, 1))], 2)
    stream += _framed(bad_utf8) + _pickle_frame([("after.bad", (1, 1))], 2)
    truth["before.bad"] = 1
    frames.append(ipv4(10, 40010, 2004, seq=0, flags=syn))
    frames.append(ipv4(10, 40010, 2004, stream, 1))
    whole = _pickle_frame([("whole.frame", (1, 1))], 2)
    cut = _pickle_frame([("cut.frame", (1, 1))] * 5, 2)[:-9]
    truth["whole.frame"] = 1
    frames.append(ipv4(11, 40011, 2004, seq=0, flags=syn))
    frames.append(ipv4(11, 40011, 2004, whole + cut[:40], 1))
    frames.append(ipv4(11, 40011, 2004, cut[40:], 1 + len(whole) + 40))
    # Names that are not UTF-8 in line protocol and statsd.
    frames.append(ipv4(12, 40012, 2003, b"caf\xe9.line 1 1700000000\n"))
    frames.append(ipv4(12, 40013, 8125, b"\xff.statsd:1|c"))
    truth.update({"caf\ufffd.line": 1, "\ufffd.statsd": 1})
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


def _report(path, full_dpkt: bool, native: bool = True) -> dict:
    decoder = hotmetrics.Decoder(native=native)
    hotmetrics.decode_capture(str(path), decoder, full_dpkt=full_dpkt)
    assert (decoder.native is not None) == native
    return hotmetrics.analyse(decoder, RING, b"-_:#", ["10.0.1.1:8127", "10.0.1.2:8127"], top=0)


@pytest.mark.parametrize("block_bytes", [pcaprecords.BLOCK_BYTES, 700, 1999])
def test_bulk_decode_reports_what_dpkts_full_decode_does(tmp_path, monkeypatch, block_bytes):
    # Small blocks: records, TCP connections and pickle frames are cut across batches.
    monkeypatch.setattr(pcaprecords, "BLOCK_BYTES", block_bytes)
    frames, truth = mixed_traffic()
    path = tmp_path / "mixed.pcap"
    write_capture(path, frames, truncated=b"\x01\x02\x03")
    full = _report(path, True, native=False)
    assert _report(path, True) == full
    assert _report(path, False, native=False) == full
    bulk = _report(path, False)
    assert bulk == full
    assert {n: c for n, c, _ in bulk["top_metrics"]} == dict(truth)
    assert bulk["packets"] == len(frames)
    assert bulk["seconds"] == pytest.approx(0.001, abs=1e-5)
    skipped = bulk["skipped"]
    assert skipped["truncated record at the end"] == 1
    assert skipped["IP fragments"] == 1
    assert skipped["other ports"] == 1
    assert skipped["pickle over UDP"] == 1
    assert skipped["malformed pickle frames"] == 2
    assert skipped["pickle connections seen from their middle"] > 0
    # NaN, a bad name, the surrogate name
    assert skipped["invalid pickle points"] == 3


def test_the_python_record_walk_finds_what_the_c_one_does(tmp_path, monkeypatch):
    frames, _ = mixed_traffic()
    path = tmp_path / "mixed.pcap"
    write_capture(path, frames, truncated=b"\x01\x02\x03")
    monkeypatch.setattr(pcaprecords, "BLOCK_BYTES", 1999)
    expected = _report(path, False)
    monkeypatch.setattr(pcaprecords, "record_starts", None)
    assert _report(path, False) == expected


def test_a_record_cut_short_at_the_end_is_read_as_far_as_it_goes(tmp_path):
    frames = [ipv4(1, 40000, 8125, b"whole:1|c"), ipv4(1, 40000, 8125, b"cut.short:1|c")]
    path = tmp_path / "cut.pcap"
    write_capture(path, frames)
    with open(path, "r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 4)  # the last datagram loses "1|c" and more
    full, bulk = _report(path, True, native=False), _report(path, False)
    assert bulk == full
    assert _report(path, False, native=False) == full
    assert bulk["packets"] == 2


def test_pcapng_and_records_fed_one_by_one_decode_alike(tmp_path):
    frames, truth = mixed_traffic()
    path = tmp_path / "mixed.pcapng"
    with open(path, "wb") as handle:
        writer = dpkt.pcapng.Writer(handle)
        for number, frame in enumerate(frames):
            writer.writepkt(frame, 1_700_000_000 + number)
    assert _report(path, False) == _report(path, True, native=False)
    decoder = hotmetrics.Decoder()
    decoder.feed(1, [(float(n), f) for n, f in enumerate(frames)])
    assert sum(decoder.counts("line").values()) == len(decoder.names("line"))
    counts = Counter()
    for protocol in hotmetrics.PROTOCOLS:
        counts.update(
            {n.decode("utf-8", "replace"): c for n, c in decoder.counts(protocol).items()}
        )
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


@pytest.mark.parametrize("statsd", [False, True])
def test_c_counts_what_the_line_by_line_reference_does(statsd):
    rng = random.Random(29)
    chunks = _random_text(rng, statsd)
    chunks.append(b"no.newline.at.the.end 1 2" if not statsd else b"no.newline:1|c")
    expected = Counter(namecount.reference_names(b"".join(chunks), statsd))
    counts = Counts(statsd)
    for chunk in chunks[:-1]:
        counts.add_text(chunk)
    counts.add_text(chunks[-1])
    assert counts.items() == expected
    assert counts.points == sum(expected.values())
    # One stream cut anywhere into segments: its lines up to the last newline are
    # counted, the rest comes back.
    stream = b"".join(chunks[:-1]) + b"tail.without.newline"
    cuts = sorted(rng.sample(range(6, len(stream)), 200))
    begins, ends = [5, *cuts], [*cuts, len(stream)]
    counts = Counts(statsd)
    rest = counts.add_segments(stream[:5], stream, begins, ends)
    assert rest == b"tail.without.newline"
    whole = stream[: stream.rfind(b"\n") + 1]
    assert counts.items() == Counter(namecount.reference_names(whole, statsd))
    spans = Counts(statsd)
    spans.add_spans(stream, begins, ends)
    pieces = b"\n".join(stream[b:e] for b, e in zip(begins, ends, strict=True))
    assert spans.items() == Counter(namecount.reference_names(pieces, statsd))


def _random_points(rng: random.Random) -> list:
    """A frame's worth of datapoints in every shape format_points reads, valid or not."""
    names = ["a.b", "c", "caf\u00e9.x", "bad name", "", "x" * 5000, "ok.%d", b"raw\xff.n"]
    numbers = [1, -1, 0, 2**31, 2**62, -(2**63), 2**63, 1.5, float("nan"), float("inf"),
               -0.0, 1e300, 9.3e18, None, True, "1", b"2", (1, 2), []]  # fmt: skip

    def name():
        chosen = rng.choice(names)
        return chosen % rng.randint(0, 99) if chosen == "ok.%d" else chosen

    def point():
        if rng.random() < 0.8:
            pair = (rng.choice(numbers), rng.choice(numbers))
            return pair if rng.random() < 0.5 else list(pair)
        return rng.choice([(1,), (1, 2, 3), 5, ()])

    def entry():
        shape = rng.random()
        if shape < 0.5:
            return (name(), point())
        if shape < 0.7:
            return (name(), [point() for _ in range(rng.randint(0, 4))])
        if shape < 0.85:
            return (name(), *(point() for _ in range(rng.randint(0, 4))))
        return rng.choice([[name(), point()], (name(),), name(), 5, None, (name(), [])])

    points = [entry() for _ in range(rng.randint(0, 8))]
    if rng.random() < 0.3:  # one object many times: the memo
        points += [(name(), (1, 2.0))] * 3
    return tuple(points) if rng.random() < 0.05 else points


def test_c_pickle_frames_count_what_the_pickle_relay_decodes():
    """Random frames of every protocol, one in three with bytes overwritten: each frame
    C counts must give the points and invalid points decode_frame's text gives; the
    others it must leave to decode_frame (never guess, never drop)."""
    rng = random.Random(17)
    known = 0
    for _ in range(6000):
        body = pickle.dumps(_random_points(rng), rng.randint(0, 5))
        if rng.random() < 0.3:
            body = bytearray(body)
            for _ in range(rng.randint(1, 3)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body)
        frame = struct.pack(">I", len(body)) + body
        counts = Counts()
        offset, unknown, invalid = counts.add_pickle_frames(
            frame + frame[:-1], 0, relay_lines.DEFAULT_MAX_NAME, relay_lines.DEFAULT_MAX_OUTPUT
        )
        if unknown:
            assert offset == 0 and not counts.items()
            continue
        known += 1
        assert offset == len(frame)  # the cut copy after it is left for later
        text, points, expected_invalid = relay_lines.decode_frame(body, 0)
        assert counts.items() == Counter(namecount.reference_names(text, False))
        assert (counts.points, invalid) == (points, expected_invalid)
    assert known > 1000  # string numbers, long ints and the like are the rest


def test_c_pickle_frames_known_and_unknown_in_one_block():
    frames = [_pickle_frame([("a.b", (1, 2))] * 2), _pickle_frame([("s", ("1", "2"))])]
    frames.append(_pickle_frame([("c.d", (1, 2))], 4))
    data = b"".join(frames)
    counts = Counts()
    limits = relay_lines.DEFAULT_MAX_NAME, relay_lines.DEFAULT_MAX_OUTPUT
    assert counts.add_pickle_frames(data, 0, *limits) == (len(frames[0]), True, 0)
    after = len(frames[0]) + len(frames[1])
    assert counts.add_pickle_frames(data, after, *limits) == (len(data), False, 0)
    assert counts.items() == {b"a.b": 2, b"c.d": 1}
    # A frame larger than decode_frame may write is its to refuse.
    long_name = "n" * 4000
    frame = _pickle_frame([(long_name, (1, 2))] * 20000)
    assert Counts().add_pickle_frames(frame, 0, 4096, 1 << 20)[1] is True

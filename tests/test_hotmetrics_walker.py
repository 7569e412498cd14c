"""hot-metrics' C walk of a classic pcap (carbonscale._hotcount.Walker: the records,
the link layers, IPv4 and IPv6 TCP and UDP, TCP stream order, pickle frames) against
its twin, the Python bulk path, and dpkt's full decode of every frame: streams in the
orders a network delivers them (reordered, duplicated, retransmitted over what was
already there, sequence numbers wrapping, connections closed and opened again), more
segments out of order than are held, every link type the walk decodes, and captures
with bytes overwritten or cut off anywhere (never a crash, the same report)."""

from __future__ import annotations

import random
import struct
from collections import Counter

import dpkt
import pytest
from test_hotmetrics_bulk import _pickle_frame, _report, ipv4, ipv6, mixed_traffic, write_capture

from carbonscale import CarbonscaleError, _hotcount
from carbonscale.ops import hotmetrics

Counts, Walker = _hotcount.Counts, _hotcount.Walker
SYN, FIN, RST, ACK = dpkt.tcp.TH_SYN, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST, dpkt.tcp.TH_ACK


def _all_agree(path) -> dict:
    """The walk's report, checked equal to the twin's and to dpkt's full decode's."""
    full = _report(path, True, native=False)
    assert _report(path, False, native=False) == full
    walked = _report(path, False)
    assert walked == full
    return walked


def _delivered(stream: bytes, first_seq: int, size: int, rng: random.Random) -> list:
    """(seq, payload) of a stream cut into segments of `size`, as a network may deliver
    them: neighbours swapped, segments sent twice, and retransmissions that begin in
    bytes already sent and carry new ones."""
    segments = [((first_seq + at) & 0xFFFFFFFF, stream[at : at + size])
                for at in range(0, len(stream), size)]  # fmt: skip
    order = list(segments)
    for i in range(0, len(order) - 1, 3):
        if rng.random() < 0.5:
            order[i], order[i + 1] = order[i + 1], order[i]
    delivered = []
    for number, (seq, payload) in enumerate(order):
        delivered.append((seq, payload))
        shape = rng.random()
        if shape < 0.15:
            delivered.append((seq, payload))
        elif shape < 0.3 and number + 1 < len(order):
            after_seq, after = order[number + 1]
            if after_seq == (seq + len(payload)) & 0xFFFFFFFF:
                delivered.append(((after_seq - 7) & 0xFFFFFFFF, payload[-7:] + after[:11]))
    return delivered


def _lines(prefix: str, count: int) -> tuple[bytes, Counter]:
    names = [f"{prefix}.m{i % 13}.value" for i in range(count)]
    text = b"".join(b"%s %d 1700000000\n" % (n.encode(), i) for i, n in enumerate(names))
    return text, Counter(names)


def _frames(prefix: str, count: int) -> tuple[bytes, Counter]:
    points = [(f"{prefix}.p{i % 11}.value", (1700000000, float(i))) for i in range(count)]
    stream = b"".join(_pickle_frame(points[at : at + 7], 2) for at in range(0, count, 7))
    return stream, Counter(name for name, _ in points)


def test_streams_in_network_order_decode_alike_and_whole(tmp_path, monkeypatch):
    rng = random.Random(41)
    per_connection: list[list[bytes]] = []
    truth: Counter[str] = Counter()

    def connection(frame, stream: bytes, first_seq: int, size: int, close: int = 0):
        frames = [frame(b"", (first_seq - 1) & 0xFFFFFFFF, SYN)]
        frames += [frame(p, s, ACK) for s, p in _delivered(stream, first_seq, size, rng)]
        if close:
            frames.append(frame(b"", (first_seq + len(stream)) & 0xFFFFFFFF, close | ACK))
        per_connection.append(frames)

    # Line protocol over IPv4, its sequence numbers wrapping past 2**32.
    text, names = _lines("wrap", 300)
    truth += names
    connection(lambda p, s, f: ipv4(1, 40001, 2003, p, s, f), text, 0xFFFFF000, 301, FIN)
    # Pickle over IPv6, every frame cut across segments.
    stream, names = _frames("six", 200)
    truth += names
    connection(lambda p, s, f: ipv6(2, 40002, 2004, p, s, f), stream, 5000, 233)
    # Line protocol, every frame VLAN-tagged.
    text, names = _lines("vlan", 200)
    truth += names
    connection(lambda p, s, f: ipv4(3, 40003, 2003, p, s, f, vlan=True), text, 1, 97, RST)
    # The same ports again after the FIN: a new connection from its SYN.
    text, names = _lines("again", 50)
    truth += names
    connection(lambda p, s, f: ipv4(1, 40001, 2003, p, s, f), text, 77, 120)
    # Interleaved as captured: each connection in its own order, the ports' reuse after.
    frames = []
    queues = [list(c) for c in per_connection[:3]]
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        frames.append(queue.pop(0))
    frames += per_connection[3]
    path = tmp_path / "network.pcap"
    write_capture(path, frames)

    def refused(*args, **kwargs):
        raise AssertionError("the C walk was not taken")

    monkeypatch.setattr(hotmetrics.Decoder, "feed_batches", refused)
    walked = _report(path, False)
    monkeypatch.undo()
    assert walked == _all_agree(path)
    assert {n: c for n, c, _ in walked["top_metrics"]} == dict(truth)
    assert walked["skipped"] == {}


def test_more_segments_out_of_order_than_are_held(tmp_path):
    text, _ = _lines("held", 2000)
    segments = [(1 + at, text[at : at + 50]) for at in range(0, len(text), 50)]
    assert len(segments) > hotmetrics.MAX_PENDING + 2
    frames = [ipv4(1, 40001, 2003, b"", 0, SYN)]
    # The first segment comes last: everything after it is held until there is no room.
    frames += [ipv4(1, 40001, 2003, p, s) for s, p in segments[1:]]
    frames.append(ipv4(1, 40001, 2003, segments[0][1], segments[0][0]))
    path = tmp_path / "held.pcap"
    write_capture(path, frames)
    walked = _all_agree(path)
    assert walked["skipped"]["connections given up (lost segments)"] == 1
    assert 0 < walked["points"]["line"] < 2000


def _link_frame(linktype: int, frame: bytes) -> bytes:
    """An Ethernet frame of the helpers as the link type carries it (without its VLAN
    tag, if it has one)."""
    ethertype, packet = frame[12:14], frame[14:]
    if ethertype == b"\x81\x00":
        ethertype, packet = frame[16:18], frame[18:]
    if linktype == dpkt.pcap.DLT_LINUX_SLL:
        return struct.pack(">HHH8s", 0, 1, 6, b"\x02" * 6 + b"\0\0") + ethertype + packet
    if linktype == dpkt.pcap.DLT_LINUX_SLL2:
        return ethertype + struct.pack(">HIHBB8s", 0, 3, 1, 0, 6, b"\x02" * 6 + b"\0\0") + packet
    if linktype == 101:
        return packet
    # Ethernet with two VLAN tags (QinQ): dpkt's to decode
    return frame[:12] + struct.pack(">HHHH", 0x88A8, 7, 0x8100, 42) + frame[12:]


@pytest.mark.parametrize("linktype", [113, 276, 101, 1])
def test_every_link_type_decodes_alike(tmp_path, linktype):
    frames, truth = mixed_traffic()
    path = tmp_path / f"link{linktype}.pcap"
    with open(path, "wb") as handle:
        writer = dpkt.pcap.Writer(handle, linktype=linktype)
        for number, frame in enumerate(frames):
            writer.writepkt(_link_frame(linktype, frame), 1_700_000_000 + number / 1000)
    walked = _all_agree(path)
    assert {n: c for n, c, _ in walked["top_metrics"]} == dict(truth)


def _mixed_capture(tmp_path) -> bytes:
    frames, _ = mixed_traffic()
    path = tmp_path / "mixed.pcap"
    write_capture(path, frames)
    return path.read_bytes()


def test_captures_with_bytes_overwritten_decode_alike(tmp_path):
    """Bytes overwritten mostly in the frames' first 60 (link, IP and TCP/UDP headers),
    some in record headers: never a crash, the same report as dpkt's full decode."""
    capture = _mixed_capture(tmp_path)
    starts, at = [], 24
    while at + 16 <= len(capture):
        starts.append(at)
        at += 16 + struct.unpack_from("<I", capture, at + 8)[0]
    rng = random.Random(5)
    path = tmp_path / "overwritten.pcap"
    for _ in range(60):
        data = bytearray(capture)
        for _ in range(rng.randint(1, 4)):
            record = rng.choice(starts)
            offset = (
                record + rng.randrange(16 + 60)
                if rng.random() < 0.8
                else rng.randrange(24, len(data))
            )
            data[min(offset, len(data) - 1)] = rng.randrange(256)
        path.write_bytes(bytes(data))
        _all_agree(path)


def test_a_capture_cut_off_anywhere_decodes_alike(tmp_path):
    capture = _mixed_capture(tmp_path)
    path = tmp_path / "cut.pcap"
    for end in [24, 25, 39, 40, 41, 100, *range(len(capture) - 300, len(capture), 7)]:
        path.write_bytes(capture[:end])
        walked = _all_agree(path)
        if end == 24:
            assert walked["packets"] == 0


def test_a_file_that_is_not_a_capture_is_refused(tmp_path):
    path = tmp_path / "notes.pcap"
    path.write_bytes(b"\xd4\xc3\xb2" + bytes(40))  # no magic number of pcap or pcapng
    with pytest.raises(CarbonscaleError, match="is not a pcap or pcapng capture"):
        hotmetrics.decode_capture(str(path))


def test_the_walker_refuses_what_it_cannot_use():
    counts = [Counts(), Counts(), Counts(True)]
    with pytest.raises(TypeError, match="not initialised"):
        Walker.__new__(Walker).walk(b"", 0, False, 1)
    with pytest.raises(ValueError, match="65536"):
        Walker(*counts, b"\0" * 10, None, None, 4096, 1 << 20)
    kinds = bytearray(65536)
    kinds[2003] = 1
    record = struct.pack("<IIII", 0, 0, 20, 20) + bytes(20)  # too short: for dpkt
    walker = Walker(*counts, bytes(kinds), None, lambda frame: 5, 4096, 1 << 20)
    with pytest.raises(TypeError, match="sequence of segments"):
        walker.walk(record, 0, False, 1)
    walker = Walker(*counts, bytes(kinds), None, lambda frame: [(b"\0" * 4, 1, b"", 2003)],
                    4096, 1 << 20)  # fmt: skip
    with pytest.raises(TypeError):
        walker.walk(record, 0, False, 1)
    with pytest.raises(ValueError, match="offset"):
        walker.walk(record, len(record) + 1, False, 1)


def test_prefixes_and_ranking_in_c_are_pythons(monkeypatch):
    rng = random.Random(3)
    fields = [b"a", b"bb", b"", b"caf\xc3\xa9", b"\xff", b"x y"]
    counts = Counter()
    for _ in range(3000):
        name = b".".join(rng.choice(fields) for _ in range(rng.randint(1, 5)))
        counts[name] += rng.choice([1, 1, 2, 7, 2**40])
    in_c = {(d, limit): (hotmetrics._prefix_counts(counts, d), hotmetrics._top(counts, limit))
            for d in (1, 2, 3, 9) for limit in (0, 1, 20, 10**6)}  # fmt: skip
    monkeypatch.setattr(hotmetrics, "_hotcount", None)
    for (depth, limit), (prefixes, ranked) in in_c.items():
        assert prefixes == hotmetrics._prefix_counts(counts, depth)
        assert ranked == hotmetrics._top(counts, limit)
    assert hotmetrics._top(Counter(), 0) == []

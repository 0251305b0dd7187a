"""The C data-plane engine's pure per-packet functions, driven through cffi with no I/O.

The same C functions the workers use, fed crafted and hostile bytes: route lookup against a
reference model, every drop reason, TTL/checksum arithmetic, ICMP errors, TSO splitting and
TCP coalescing.
"""

from __future__ import annotations

import random
import struct
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlane.engine import EngineError, Route
from tests.engine_probe import ProbeEngine, coalesce
from tests.packets import (
    IP,
    MTU,
    NET,
    TUN_ADDR,
    bad_csum,
    csum,
    ipv4,
    tcp_pseudo,
    tcp_segment,
    tcp_valid,
    tso_frame,
    udp_packet,
    vnet_hdr,
)


@pytest.fixture
def engine() -> ProbeEngine:
    e = ProbeEngine([], -1, MTU, TUN_ADDR, icmp_rate=1000, icmp_burst=1000)
    e.set_routes(
        [
            Route(NET("10.1.2.0/24"), IP("192.168.0.2"), 8285),
            Route(NET("10.1.3.0/24"), IP("192.168.0.3"), 9000),
        ]
    )
    return e


# ---------------------------------------------------------------- checksum


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 600) | st.integers(0, 65535),
    seed=st.integers(0, 2**32),
    offset=st.integers(0, 7),
)
def test_checksum_matches_reference_at_any_length_and_alignment(
    size: int, seed: int, offset: int
) -> None:
    """The C sum (scalar, and AVX2 from 256 bytes on) against RFC 1071 done in Python."""
    from tests._engine_test import ffi, lib

    data = random.Random(seed).randbytes(size)
    if seed % 3 == 0:
        data = b"\xff" * size  # all ones: the carry-heavy case
    buf = ffi.new("uint8_t[]", offset + len(data) + 1)
    ffi.memmove(buf + offset, data, len(data))
    assert lib.fl_checksum(buf + offset, len(data)) == csum(data)


# ---------------------------------------------------------------- route lookup


def reference_lookup(routes: list[tuple[int, int, int, int]], dst: int) -> tuple[int, int] | None:
    """Longest prefix wins; among duplicates of one prefix the last one given."""
    best: dict[tuple[int, int], tuple[int, int]] = {}
    for net, plen, hop, port in routes:
        mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0
        best[(net & mask, plen)] = (hop, port)
    for plen in range(32, -1, -1):
        mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0
        if (dst & mask, plen) in best:
            return best[(dst & mask, plen)]
    return None


route_st = st.tuples(
    st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(1, 2**32 - 1), st.integers(1, 65535)
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    routes=st.lists(route_st, max_size=40),
    probes=st.lists(st.integers(0, 2**32 - 1), max_size=20),
    data=st.data(),
)
def test_lookup_matches_longest_prefix_reference(routes, probes, data) -> None:
    e = ProbeEngine([], -1, MTU, TUN_ADDR)
    # Route() normalises to the network address, so give it masked nets
    rs = []
    for net, plen, hop, port in routes:
        mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0
        rs.append(Route(NET((net & mask, plen)), IP(hop), port))
    e.set_routes(rs)
    # probe random addresses and addresses inside the table's networks
    for net, plen, _, _ in routes:
        probes.append(net ^ data.draw(st.integers(0, 2 ** (32 - plen) - 1)))
    for dst in probes:
        want = reference_lookup(routes, dst)
        got = e.lookup(IP(dst))
        assert (None if got is None else (int(got[0]), got[1])) == want


def test_route_port_validated() -> None:
    e = ProbeEngine([], -1, MTU, TUN_ADDR)
    with pytest.raises(ValueError):
        e.set_routes([Route(NET("10.0.0.0/8"), IP("1.2.3.4"), 0)])


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match="MTU"):
        ProbeEngine([], -1, 10, TUN_ADDR)
    with pytest.raises(EngineError, match="fd"):
        ProbeEngine([-1], 3, MTU, TUN_ADDR)


def test_route_swap_under_concurrent_lookups() -> None:
    """Readers in other threads keep seeing one whole table or the other, never garbage."""
    e = ProbeEngine([], -1, MTU, TUN_ADDR)
    a = [Route(NET(f"10.{i}.0.0/16"), IP("192.168.0.1"), 1) for i in range(50)]
    b = [Route(NET(f"10.{i}.0.0/16"), IP("192.168.0.2"), 2) for i in range(50)]
    stop = threading.Event()
    bad: list[Any] = []

    def reader() -> None:
        while not stop.is_set():
            got = e.lookup(IP("10.7.1.1"))
            if got not in ((IP("192.168.0.1"), 1), (IP("192.168.0.2"), 2)):
                bad.append(got)

    e.set_routes(a)
    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(300):
        e.set_routes(b if i % 2 else a)
    stop.set()
    for t in threads:
        t.join()
    assert not bad
    assert e.counters()["route_updates"] == 301


# ---------------------------------------------------------------- encap verdicts


def test_forward_decrements_ttl_with_valid_checksum(engine: ProbeEngine) -> None:
    pkt = udp_packet("10.1.1.5", "10.1.2.9", ttl=64)
    verdict, out, dest, icmp = engine.encap_verdict(pkt)
    assert verdict == "forward" and dest == (IP("192.168.0.2"), 8285) and icmp == b""
    assert out[8] == 63 and csum(out[:20]) == 0
    assert out[:8] == pkt[:8] and out[9:10] == pkt[9:10] and out[12:] == pkt[12:]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ttl=st.integers(2, 255),
    tos=st.integers(0, 255),
    ident=st.integers(0, 65535),
    size=st.integers(0, 1400),
    df=st.booleans(),
    proto=st.sampled_from([6, 17, 47, 0, 255]),
)
def test_incremental_checksum_equals_recomputed(
    engine: ProbeEngine, ttl, tos, ident, size, df, proto
) -> None:
    pkt = ipv4(
        "10.1.1.5", "10.1.3.1", bytes(size), ttl=ttl, tos=tos, ident=ident, df=df, proto=proto
    )
    verdict, out, dest, _ = engine.encap_verdict(pkt)
    assert verdict == "forward" and dest == (IP("192.168.0.3"), 9000)
    want = bytearray(pkt[:20])
    want[8] = ttl - 1
    want[10:12] = b"\0\0"
    assert struct.unpack("!H", out[10:12])[0] == csum(bytes(want))


def check_icmp(reply: bytes, orig: bytes, type_: int, code: int, mtu: int = 0) -> None:
    assert reply[0] == 0x45 and reply[9] == 1 and csum(reply[:20]) == 0
    assert struct.unpack("!H", reply[2:4])[0] == len(reply)
    assert reply[12:16] == TUN_ADDR.packed and reply[16:20] == orig[12:16]
    ic = reply[20:]
    assert ic[0] == type_ and ic[1] == code and csum(ic) == 0
    assert struct.unpack("!H", ic[6:8])[0] == mtu
    ihl = (orig[0] & 15) * 4
    assert ic[8:] == orig[: ihl + 8]


def test_no_route_answers_net_unreachable(engine: ProbeEngine) -> None:
    pkt = udp_packet("10.1.1.5", "10.9.9.9")
    verdict, _, _, icmp = engine.encap_verdict(pkt)
    assert verdict == "drop_tx_no_route"
    check_icmp(icmp, pkt, 3, 0)


def test_no_route_quote_keeps_ip_options(engine: ProbeEngine) -> None:
    pkt = udp_packet("10.1.1.5", "10.9.9.9", options=b"\x01\x01\x01\x00")
    verdict, _, _, icmp = engine.encap_verdict(pkt)
    assert verdict == "drop_tx_no_route"
    check_icmp(icmp, pkt, 3, 0)
    assert len(icmp) == 20 + 8 + 24 + 8


@pytest.mark.parametrize("ttl", [0, 1])
def test_ttl_expiry_answers_time_exceeded(engine: ProbeEngine, ttl: int) -> None:
    pkt = udp_packet("10.1.1.5", "10.1.2.9", ttl=ttl)
    verdict, _, _, icmp = engine.encap_verdict(pkt)
    assert verdict == "drop_tx_ttl_expired"
    check_icmp(icmp, pkt, 11, 0)


def test_too_big_with_df_answers_frag_needed(engine: ProbeEngine) -> None:
    pkt = udp_packet("10.1.1.5", "10.1.2.9", size=MTU - 28 + 1, df=True)
    assert len(pkt) == MTU + 1
    verdict, _, _, icmp = engine.encap_verdict(pkt)
    assert verdict == "drop_tx_too_big"
    check_icmp(icmp, pkt, 3, 4, mtu=MTU)
    ok = udp_packet("10.1.1.5", "10.1.2.9", size=MTU - 28, df=True)
    assert engine.encap_verdict(ok)[0] == "forward"


def test_too_big_without_df_dropped_silently(engine: ProbeEngine) -> None:
    pkt = udp_packet("10.1.1.5", "10.1.2.9", size=MTU)
    assert engine.encap_verdict(pkt)[::3] == ("drop_tx_oversize", b"")


@pytest.mark.parametrize(
    "pkt",
    [
        # ICMP errors (dest unreachable, time exceeded) are never answered
        ipv4("10.1.1.5", "10.9.9.9", bytes([3, 1, 0, 0]) + bytes(32), proto=1),
        ipv4("10.1.1.5", "10.9.9.9", bytes([11, 0, 0, 0]) + bytes(32), proto=1),
        # nor non-first fragments, nor odd sources
        udp_packet("10.1.1.5", "10.9.9.9", frag_off=100),
        udp_packet("0.0.0.0", "10.9.9.9"),
        udp_packet("0.1.2.3", "10.9.9.9"),
        udp_packet("127.0.0.1", "10.9.9.9"),
        udp_packet("224.0.0.1", "10.9.9.9"),
        udp_packet("240.0.0.1", "10.9.9.9"),
        udp_packet("255.255.255.255", "10.9.9.9"),
        udp_packet("10.1.1.5", "255.255.255.255"),
    ],
    ids=[
        "icmp-unreach",
        "icmp-time-exceeded",
        "fragment",
        "src-zero",
        "src-this-network",
        "src-loopback",
        "src-multicast",
        "src-reserved",
        "src-bcast",
        "dst-bcast",
    ],
)
def test_no_icmp_about_icmp_errors_fragments_or_odd_addresses(
    engine: ProbeEngine, pkt: bytes
) -> None:
    verdict, _, _, icmp = engine.encap_verdict(pkt)
    assert verdict == "drop_tx_no_route" and icmp == b""


def test_icmp_echo_request_without_route_is_answered(engine: ProbeEngine) -> None:
    pkt = ipv4("10.1.1.5", "10.9.9.9", bytes([8, 0, 0, 0]) + bytes(32), proto=1)
    assert engine.encap_verdict(pkt)[3] != b""


def test_icmp_rate_limited() -> None:
    e = ProbeEngine([], -1, MTU, TUN_ADDR, icmp_rate=1, icmp_burst=3)
    pkt = udp_packet("10.1.1.5", "10.9.9.9")
    replies = [e.encap_verdict(pkt)[3] for _ in range(10)]
    assert sum(1 for r in replies if r) == 3
    c = e.counters()
    assert c["icmp_sent"] == 3 and c["icmp_suppressed"] == 7 and c["drop_tx_no_route"] == 10


def _icmp_slot(src: str) -> int:
    """The rate-limit bucket of an inner source (mirrors icmp_take_token in packet.c)."""
    return ((int(IP(src)) * 0x9E3779B1) & 0xFFFFFFFF) >> 26


def test_icmp_budget_is_per_source_and_frag_needed_has_its_own() -> None:
    """One container flooding unroutable packets uses up only its own budget: another
    source still gets its errors, and path MTU discovery ("fragmentation needed") is never
    suppressed by the other kinds of error."""
    e = ProbeEngine([], -1, MTU, TUN_ADDR, icmp_rate=1, icmp_burst=3)
    e.set_routes([Route(NET("10.1.2.0/24"), IP("192.168.0.2"), 8285)])
    flooder = "10.1.1.5"
    other = next(
        f"10.1.1.{i}" for i in range(6, 250) if _icmp_slot(f"10.1.1.{i}") != _icmp_slot(flooder)
    )
    replies = [e.encap_verdict(udp_packet(flooder, "10.9.9.9"))[3] for _ in range(10)]
    assert sum(1 for r in replies if r) == 3
    verdict, _, _, icmp = e.encap_verdict(udp_packet(other, "10.9.9.9"))
    assert verdict == "drop_tx_no_route" and icmp != b""
    big = udp_packet(flooder, "10.1.2.7", size=MTU, df=True)
    verdict, _, _, icmp = e.encap_verdict(big)
    assert verdict == "drop_tx_too_big" and icmp[20] == 3 and icmp[21] == 4
    c = e.counters()
    assert c["icmp_sent"] == 5 and c["icmp_suppressed"] == 7


@pytest.mark.parametrize(
    "pkt,reason",
    [
        (b"", "drop_tx_malformed"),
        (b"\x60" + bytes(39), "drop_tx_not_ipv4"),
        (b"\x45" + bytes(10), "drop_tx_malformed"),
        (udp_packet("10.1.1.5", "10.1.2.9")[:-1], "drop_tx_malformed"),
        (b"\x44" + udp_packet("10.1.1.5", "10.1.2.9")[1:], "drop_tx_malformed"),
        (b"\x4f" + udp_packet("10.1.1.5", "10.1.2.9", size=0)[1:], "drop_tx_malformed"),
    ],
    ids=["empty", "ipv6", "short", "total-length", "ihl-4", "ihl-past-end"],
)
def test_encap_header_checks(engine: ProbeEngine, pkt: bytes, reason: str) -> None:
    assert engine.encap_verdict(pkt)[0] == reason


# ---------------------------------------------------------------- decap verdicts

GOOD = udp_packet("10.1.2.9", "10.1.1.5")


@pytest.mark.parametrize(
    "pkt,src,reason",
    [
        (GOOD, "192.168.0.2", "deliver"),
        (GOOD, "192.168.0.3:9000", "deliver"),
        (GOOD, "192.168.0.3", "drop_rx_source_port"),
        (GOOD, "192.168.0.2:9000", "drop_rx_source_port"),
        (GOOD, "192.168.0.99", "drop_rx_foreign_source"),
        (b"\x60" + GOOD[1:], "192.168.0.2", "drop_rx_not_ipv4"),
        (b"", "192.168.0.2", "drop_rx_malformed"),
        (GOOD[:19], "192.168.0.2", "drop_rx_malformed"),
        (GOOD[:-1], "192.168.0.2", "drop_rx_malformed"),
        (GOOD + b"\0", "192.168.0.2", "drop_rx_malformed"),
        (b"\x44" + GOOD[1:], "192.168.0.2", "drop_rx_malformed"),
        (bad_csum(GOOD), "192.168.0.2", "drop_rx_bad_checksum"),
    ],
    ids=[
        "ok",
        "ok-other-peer",
        "other-peer-wrong-port",
        "wrong-port",
        "foreign",
        "ipv6",
        "empty",
        "short",
        "truncated",
        "trailing",
        "ihl-4",
        "bad-checksum",
    ],
)
def test_decap_checks(engine: ProbeEngine, pkt: bytes, src: str, reason: str) -> None:
    addr, _, port = src.partition(":")
    assert engine.decap_verdict(pkt, IP(addr), int(port or 8285)) == reason


def test_decap_inner_source_must_belong_to_the_sending_peer() -> None:
    """A peer may only send inner sources from its own subnets (or from outside the Network):
    never another peer's pods, never ours, never an unleased part of the Network."""
    e = ProbeEngine([], -1, MTU, TUN_ADDR, network=NET("10.1.0.0/16"))
    e.set_routes(
        [
            Route(NET("10.1.2.0/24"), IP("192.168.0.2"), 8285),
            Route(NET("10.1.4.0/24"), IP("192.168.0.2"), 8285),
            Route(NET("10.1.3.0/24"), IP("192.168.0.3"), 8285),
        ]
    )
    peer = IP("192.168.0.2")
    for src, verdict in (
        ("10.1.2.9", "deliver"),
        ("10.1.4.1", "deliver"),
        ("10.1.3.9", "drop_rx_inner_source"),  # the other peer's pod
        ("10.1.1.5", "drop_rx_inner_source"),  # one of ours
        ("10.1.200.1", "drop_rx_inner_source"),  # unleased
        ("192.0.2.1", "deliver"),
        ("10.2.0.1", "deliver"),
    ):  # outside
        assert e.decap_verdict(udp_packet(src, "10.1.1.5"), peer) == verdict, src
    assert e.counters()["drop_rx_inner_source"] == 3
    # with no Network known (a test engine) only the outer checks apply
    e2 = ProbeEngine([], -1, MTU, TUN_ADDR)
    e2.set_routes([Route(NET("10.1.2.0/24"), IP("192.168.0.2"), 8285)])
    assert e2.decap_verdict(udp_packet("10.1.3.9", "10.1.1.5"), peer) == "deliver"


@settings(max_examples=300, deadline=None)
@given(
    routes=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 3)), max_size=12),
    inner=st.integers(0, 2**32 - 1),
    sender=st.integers(1, 3),
)
def test_decap_inner_source_matches_model(routes, inner, sender) -> None:
    """Property: delivered iff the inner source is outside the Network or its longest-prefix
    route leads to the sending peer."""
    e = ProbeEngine([], -1, MTU, TUN_ADDR, network=NET("10.1.0.0/16"))
    table = {NET(f"10.1.{third}.0/24"): IP(f"192.168.0.{peer}") for third, peer in routes}
    e.set_routes([Route(net, hop, 8285) for net, hop in table.items()])
    src, hop = IP(inner), IP(f"192.168.0.{sender}")
    if hop not in table.values():
        return  # not a peer at all: the outer check, tested elsewhere
    outside = src not in NET("10.1.0.0/16")
    owner = next((h for n, h in table.items() if src in n), None)
    want = "deliver" if outside or owner == hop else "drop_rx_inner_source"
    assert e.decap_verdict(udp_packet(str(src), "10.1.1.5"), hop) == want


def test_decap_source_check_can_be_disabled() -> None:
    e = ProbeEngine([], -1, MTU, TUN_ADDR, check_source=False)
    assert e.decap_verdict(GOOD, IP("203.0.113.1")) == "deliver"


def test_decap_source_check_follows_the_current_table(engine: ProbeEngine) -> None:
    engine.set_routes([Route(NET("10.1.3.0/24"), IP("192.168.0.3"), 9000)])
    assert engine.decap_verdict(GOOD, IP("192.168.0.2")) == "drop_rx_foreign_source"
    assert engine.decap_verdict(GOOD, IP("192.168.0.3"), 9000) == "deliver"


def test_drop_counters_exact(engine: ProbeEngine) -> None:
    for _ in range(5):
        engine.decap_verdict(GOOD, IP("1.1.1.1"))
    for _ in range(3):
        engine.decap_verdict(b"\x45", IP("192.168.0.2"))
    c = engine.counters()
    assert c["drop_rx_foreign_source"] == 5 and c["drop_rx_malformed"] == 3
    assert sum(v for k, v in c.items() if k.startswith("drop_")) == 8


# ---------------------------------------------------------------- hostile bytes


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=2000))
def test_hostile_bytes_never_crash(engine: ProbeEngine, data: bytes) -> None:
    engine.encap_verdict(data)
    assert engine.decap_verdict(data, IP("192.168.0.2")) in (
        "deliver",
        "drop_rx_not_ipv4",
        "drop_rx_malformed",
        "drop_rx_bad_checksum",
    )
    engine.split(data)
    coalesce([data, data])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pos=st.lists(st.integers(0, 2000), max_size=6),
    vals=st.lists(st.integers(0, 255), min_size=6, max_size=6),
    cut=st.integers(0, 2100),
)
def test_mutated_frames_never_crash(engine: ProbeEngine, pos, vals, cut) -> None:
    """Valid-looking vnet/TCP frames with a few bytes changed: split and coalesce survive."""
    mutable = bytearray(tso_frame(bytes(1500), 500))
    for p, v in zip(pos, vals, strict=False):
        if p < len(mutable):
            mutable[p] = v
    frame = bytes(mutable[:cut])
    res = engine.split(frame)
    if isinstance(res, list):
        assert all(len(p) <= MTU for p in res)
    seg = tcp_segment("10.1.2.7", "10.1.1.5", 1, bytes(100))
    coalesce([frame[10:], seg, frame[10:]])


# ---------------------------------------------------------------- TSO split


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(1, 65000),
    mss=st.integers(100, MTU - 40),
    flags=st.sampled_from([0x10, 0x18, 0x19, 0x98]),
    seed=st.integers(0, 1000),
    ts=st.booleans(),
)
def test_tso_split_gives_valid_mtu_packets(engine: ProbeEngine, size, mss, flags, seed, ts) -> None:
    options = b"\x01\x01\x08\x0a" + struct.pack("!II", 111, 222) if ts else b""
    if 40 + len(options) + size > 65535:
        size = 65535 - 40 - len(options)
    mss = min(mss, MTU - 40 - len(options))
    payload = random.Random(seed).randbytes(size)
    frame = tso_frame(payload, mss, flags=flags, seq=2**32 - 1000, options=options)
    pkts = engine.split(frame)
    assert isinstance(pkts, list)
    assert len(pkts) == (size + mss - 1) // mss
    got = b""
    hl = 40 + len(options)
    for i, p in enumerate(pkts):
        assert len(p) <= MTU and csum(p[:20]) == 0 and tcp_valid(p)
        assert p[8] == 63  # TTL decremented once per wire packet
        assert struct.unpack("!H", p[2:4])[0] == len(p)
        assert struct.unpack("!H", p[4:6])[0] == (7 + i) & 0xFFFF
        assert struct.unpack("!I", p[24:28])[0] == (2**32 - 1000 + i * mss) & 0xFFFFFFFF
        last, first = i == len(pkts) - 1, i == 0
        want = flags & ~(0 if last else 0x09) & ~(0 if first else 0x80)
        assert p[33] == want
        assert p[40:hl] == options
        got += p[hl:]
    assert got == payload


def test_split_of_plain_needs_csum_packet_completes_checksum(engine: ProbeEngine) -> None:
    pkt = bytearray(udp_packet("10.1.1.5", "10.1.2.9", size=100))
    # UDP checksum as the kernel leaves it with CHECKSUM_PARTIAL: the pseudo-header sum
    s = sum(struct.unpack("!6H", bytes(pkt[12:20]) + struct.pack("!HH", 17, 108)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    pkt[26:28] = struct.pack("!H", s)
    frame = vnet_hdr(flags=1, csum_start=20, csum_offset=6) + bytes(pkt)
    res = engine.split(frame)
    assert isinstance(res, list)
    (out,) = res
    pseudo = out[12:20] + struct.pack("!BBH", 0, 17, 108)
    assert csum(pseudo + out[20:]) == 0 and out[26:28] != pkt[26:28]


def test_split_refuses_unknown_gso_types(engine: ProbeEngine) -> None:
    frame = tso_frame(bytes(3000), 1000)
    assert engine.split(frame[:1] + b"\x03" + frame[2:]) == "drop_tx_bad_vnet"  # UDP (UFO)
    assert engine.split(frame[:1] + b"\x04" + frame[2:]) == "drop_tx_bad_vnet"  # TCPV6
    assert engine.split(frame[:1] + b"\x05" + frame[2:]) == "drop_tx_bad_vnet"  # UDP_L4


def test_split_of_frame_without_route_drops(engine: ProbeEngine) -> None:
    frame = bytearray(tso_frame(bytes(3000), 1000))
    frame[10 + 16 : 10 + 20] = IP("10.200.0.1").packed
    assert engine.split(bytes(frame)) == "drop_tx_no_route"


def test_split_with_oversized_segments_and_df_says_too_big(engine: ProbeEngine) -> None:
    assert engine.split(tso_frame(bytes(5000), MTU - 39)) == "drop_tx_too_big"


# ---------------------------------------------------------------- RX coalescing


def stream(
    n: int, mss: int = 1000, seq: int = 100, last_psh: bool = True, **kw: Any
) -> list[bytes]:
    out = []
    for i in range(n):
        flags = 0x18 if (last_psh and i == n - 1) else 0x10
        out.append(
            tcp_segment(
                "10.1.2.7",
                "10.1.1.5",
                seq + i * mss,
                bytes([i % 256]) * mss,
                flags=flags,
                ident=i,
                **kw,
            )
        )
    return out


def parse_frame(f: bytes) -> tuple[tuple[int, ...], bytes]:
    return struct.unpack("<BBHHHH", f[:10]), f[10:]


def test_coalesce_merges_a_run_into_one_gso_frame() -> None:
    segs = stream(10)
    frames = coalesce(segs)
    assert len(frames) == 1
    (flags, gso, hdr_len, gso_size, cstart, coff), pkt = parse_frame(frames[0])
    assert (flags, gso, hdr_len, gso_size, cstart, coff) == (1, 1, 40, 1000, 20, 16)
    assert len(pkt) == 40 + 10 * 1000 and struct.unpack("!H", pkt[2:4])[0] == len(pkt)
    assert csum(pkt[:20]) == 0 and pkt[33] == 0x18
    assert pkt[40:] == b"".join(s[40:] for s in segs)
    # the TCP checksum field holds the pseudo-header sum, as NEEDS_CSUM requires
    partial = ~csum(tcp_pseudo(pkt[12:16], pkt[16:20], len(pkt) - 20)) & 0xFFFF
    assert struct.unpack("!H", pkt[36:38])[0] == partial


def test_coalesce_respects_flow_and_sequence_boundaries() -> None:
    a = stream(3, last_psh=False)
    gap = stream(2, seq=100 + 3 * 1000 + 1)  # hole in the sequence space
    other = stream(2, seq=100, ack=5)  # different ack: another "flow state"
    udp = udp_packet("10.1.2.7", "10.1.1.5")
    frames = coalesce(a + gap + [udp] + other)
    kinds = [(parse_frame(f)[0][1], len(parse_frame(f)[1])) for f in frames]
    assert kinds == [(1, 3040), (1, 2040), (0, len(udp)), (1, 2040)]


def test_coalesce_never_merges_bad_checksums_or_after_psh_or_short() -> None:
    segs = stream(4, last_psh=False)
    segs[2] = tcp_segment("10.1.2.7", "10.1.1.5", 2100, bytes([2]) * 1000, ident=2, good_csum=False)
    frames = coalesce(segs)
    assert [len(parse_frame(f)[1]) for f in frames] == [2040, 1040, 1040]
    assert parse_frame(frames[1])[1] == segs[2]  # passed through untouched, the kernel drops it
    psh = stream(2, last_psh=False)
    psh[0] = tcp_segment("10.1.2.7", "10.1.1.5", 100, bytes(1000), flags=0x18, ident=0)
    assert len(coalesce(psh)) == 2
    short = stream(3, last_psh=False)
    short[1] = tcp_segment("10.1.2.7", "10.1.1.5", 1100, bytes(500), ident=1)
    short[2] = tcp_segment("10.1.2.7", "10.1.1.5", 1600, bytes(1000), ident=2)
    assert [len(parse_frame(f)[1]) for f in coalesce(short)] == [1540, 1040]


def test_coalesce_stops_below_64k() -> None:
    frames = coalesce(stream(60, mss=1400))
    sizes = [len(parse_frame(f)[1]) for f in frames]
    assert all(s <= 65535 for s in sizes) and len(frames) == 2
    assert sum(s - 40 for s in sizes) == 60 * 1400


def test_engine_changes_become_log_lines() -> None:
    """The daemon's periodic look at the engine: drops by reason and offload changes, nothing
    when nothing changed."""
    from fastlane.engine import describe_changes

    e = ProbeEngine([], -1, MTU, TUN_ADDR)
    e.set_routes([Route(NET("10.1.2.0/24"), IP("192.168.0.2"), 8285)])
    before, feats = e.counters(), {"gso": True, "tso": True}
    assert describe_changes(before, e.counters(), feats, feats) == []
    for _ in range(3):
        e.decap_verdict(udp_packet("10.1.9.9", "10.1.1.5"), IP("192.168.0.77"))
    e.encap_verdict(udp_packet("10.1.1.5", "10.9.9.9"))
    lines = describe_changes(before, e.counters(), feats, {"gso": False, "tso": True})
    assert lines == [
        "udp engine: gso off",
        "udp engine: drop_rx_foreign_source=+3 drop_tx_no_route=+1",
    ]
    assert describe_changes(e.counters(), e.counters(), {"gso": False}, {"gso": True}) == [
        "udp engine: gso on again"
    ]


def test_every_counter_has_a_unique_name() -> None:
    """engine.h's counter enum and engine.c's names are kept in step by hand: a missing or
    repeated name would hide a counter from /metrics and the logs."""
    from fastlane.engine import COUNTER_NAMES

    names = COUNTER_NAMES[1:]  # index 0 means "forward"
    assert all(names) and len(set(names)) == len(names)
    assert all(n.startswith("drop_") for n in names[names.index("drop_tx_not_ipv4") :])

"""Writes the seed corpora of the libFuzzer harnesses: csrc/fuzz/corpus/<harness>/<name>.

Run from anywhere: `python3 csrc/fuzz/make_corpus.py` (stdlib only; the output is deterministic,
so re-running it on an unchanged script changes nothing). Each seed is a valid or edge-case
input in the layout the harness's header comment describes: well-formed packets with correct
checksums, each drop reason, TSO frames and TCP runs that split or merge, and event streams for
whole TX/RX rounds, so the fuzzer starts past the checks a random input never gets through.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

OUT = Path(__file__).resolve().parent / "corpus"

ROUTED = "10.1.2.3"  # fuzz harnesses: 10.1.2/24 -> 192.0.2.3 (packet) / 127.0.0.4 (rounds)
UNROUTED = "192.168.7.7"
SRC = "10.1.0.5"  # inside the flannel Network 10/8
PEER_SRC = "10.7.0.9"  # an inner source the fuzz_rounds peer 127.0.0.2 (10/8) may send from


def ip(a: str) -> bytes:
    return bytes(int(x) for x in a.split("."))


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(
    src: str,
    dst: str,
    payload: bytes,
    *,
    proto: int = 17,
    ttl: int = 64,
    ident: int = 1,
    df: bool = False,
    frag: int = 0,
    options: bytes = b"",
    tos: int = 0,
    total: int | None = None,
) -> bytes:
    ihl = 5 + len(options) // 4
    flags = (0x4000 if df else 0) | frag
    tot = ihl * 4 + len(payload) if total is None else total
    h = (
        struct.pack(
            "!BBHHHBBH4s4s", 0x40 | ihl, tos, tot, ident, flags, ttl, proto, 0, ip(src), ip(dst)
        )
        + options
    )
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def udp(src: str, dst: str, size: int = 32, **kw) -> bytes:
    body = bytes(i & 0xFF for i in range(size))
    return ipv4(src, dst, struct.pack("!HHHH", 1234, 5678, 8 + size, 0) + body, **kw)


def tcp(
    src: str,
    dst: str,
    seq: int,
    payload: bytes,
    *,
    flags: int = 0x10,
    options: bytes = b"",
    good: bool = True,
    partial: bool = False,
    **kw,
) -> bytes:
    """A TCP segment; partial=True leaves only the pseudo-header sum in the checksum field,
    as a NEEDS_CSUM frame from a TUN has it."""
    doff = (20 + len(options)) // 4
    t = (
        struct.pack("!HHIIBBHHH", 40000, 5201, seq & 0xFFFFFFFF, 1000, doff << 4, flags, 512, 0, 0)
        + options
    )
    pseudo = ip(src) + ip(dst) + struct.pack("!BBH", 0, 6, len(t) + len(payload))
    if partial:
        c = ~csum(pseudo) & 0xFFFF
    else:
        c = csum(pseudo + t + payload) ^ (0 if good else 0x5555)
    t = t[:16] + struct.pack("!H", c) + t[18:]
    return ipv4(src, dst, t + payload, proto=6, df=True, **kw)


def vnet(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
    little: bool = True,
) -> bytes:
    return struct.pack(
        "<BBHHHH" if little else "!BBHHHH",
        flags,
        gso_type,
        hdr_len,
        gso_size,
        csum_start,
        csum_offset,
    )


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


TS = b"\x01\x01\x08\x0a" + b"\x00\x00\x00\x01\x00\x00\x00\x02"  # NOP NOP timestamps


def tso(
    size: int,
    mss: int,
    *,
    flags: int = 0x18,
    dst: str = ROUTED,
    options: bytes = b"",
    gso_type: int = 1,
    df: bool = True,
    ttl: int = 64,
) -> tuple[bytes, bytes]:
    """(vnet header, packet) of a TSO frame as a TUN with TSO hands it over."""
    p = tcp(SRC, dst, 5000, payload(size), flags=flags, options=options, partial=True, ttl=ttl)
    if not df:
        p = p[:6] + b"\0\0" + p[8:]
        p = p[:10] + b"\0\0" + p[12:]
        p = p[:10] + struct.pack("!H", csum(p[:20])) + p[12:]
    hdr = 40 + len(options)
    return vnet(1, gso_type, hdr, mss, 20, 16), p


def stream(n: int, mss: int = 1000, seq: int = 100, last_psh: bool = True, **kw) -> list[bytes]:
    return [
        tcp(
            PEER_SRC,
            "10.0.0.1",
            seq + i * mss,
            payload(mss, i),
            flags=0x18 if (last_psh and i == n - 1) else 0x10,
            **kw,
        )
        for i in range(n)
    ]


# ------------------------------------------------------------------ fuzz_packet


def packet_seeds() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    b = struct.pack
    # 0 checksum: lengths around the 8/32/256-byte steps of the implementation, every alignment
    for n, align in [(0, 0), (1, 1), (33, 7), (255, 1), (256, 0), (257, 2), (1500, 4), (4099, 3)]:
        s[f"csum-{n}-a{align}"] = bytes([0, align]) + payload(n, n)
    s["csum-ones"] = bytes([0, 0]) + b"\xff" * 600
    # 1 ip_check
    good = udp(SRC, ROUTED)
    for name, p in [
        ("ok", good),
        ("ipv6", b"\x60" + good[1:]),
        ("short", good[:19]),
        ("ihl4", b"\x44" + good[1:]),
        ("ihl15", b"\x4f" + good[1:]),
        ("tot-long", good + b"xx"),
        ("tot-short", good[:-1]),
        ("options", ipv4(SRC, ROUTED, b"abcd", options=b"\x01\x01\x01\x00")),
    ]:
        s[f"ipcheck-{name}"] = bytes([1, 1]) + p
        if name.startswith("tot"):
            s[f"ipcheck-{name}-loose"] = bytes([1, 0]) + p
    # 2 tx: each verdict
    tx = {
        "ok": udp(SRC, ROUTED),
        "ok-32": udp(SRC, "10.2.3.4", 100),
        "no-route": udp(SRC, UNROUTED),
        "no-route-options": ipv4(SRC, UNROUTED, b"x" * 20, options=b"\x94\x04\x00\x00"),
        "ttl1": udp(SRC, ROUTED, ttl=1),
        "ttl0": udp(SRC, ROUTED, ttl=0),
        "too-big-df": udp(SRC, ROUTED, 1400, df=True),
        "too-big": udp(SRC, ROUTED, 1400),
        "icmp-error-no-route": ipv4(SRC, UNROUTED, b"\x03\x01\0\0\0\0\0\0" + good[:28], proto=1),
        "echo-no-route": ipv4(SRC, UNROUTED, b"\x08\0\0\0\0\1\0\1", proto=1),
        "fragment-no-route": udp(SRC, UNROUTED, frag=0x2005),
        "loopback-src": udp("127.0.0.1", UNROUTED),
        "multicast-dst": udp(SRC, "224.0.0.5"),
        "not-ipv4": b"\x60" + good[1:],
        "bad-csum": good[:10] + b"\0\0" + good[12:],
    }
    for name, p in tx.items():
        s[f"tx-{name}"] = bytes([2]) + p
    # 3 rx: src and port of the datagram, then the packet
    peer, port = ip("192.0.2.1"), b(">H", 8285)
    rx = {
        "ok": peer + port + udp("10.0.5.1", "10.1.0.9"),
        "foreign": ip("198.51.100.1") + port + udp("10.0.5.1", "10.1.0.9"),
        "wrong-port": peer + b(">H", 9999) + udp("10.0.5.1", "10.1.0.9"),
        "inner-elsewhere": ip("192.0.2.3") + b(">H", 9000) + udp("10.0.5.1", "10.1.0.9"),
        "inner-outside": peer + port + udp("172.16.0.1", "10.1.0.9"),
        "bad-csum": peer + port + good[:10] + b"\0\0" + good[12:],
        "truncated": peer + port + good[:-3],
        "empty": peer + port,
    }
    for name, p in rx.items():
        s[f"rx-{name}"] = bytes([3]) + p
    # 4 vnet_csum: the packet carries only the pseudo-header sum where NEEDS_CSUM points
    u = udp(SRC, ROUTED, 40)
    t = tcp(SRC, ROUTED, 1, payload(300), partial=True)
    for name, v, p in [
        ("udp", vnet(1, 0, 0, 0, 20, 6, False), u),
        ("tcp", vnet(1, 0, 0, 0, 20, 16, False), t),
        ("past-end", vnet(1, 0, 0, 0, 20, 400, False), u),
        ("start-past-end", vnet(1, 0, 0, 0, 9000, 0, False), u),
        ("odd", vnet(1, 0, 0, 0, 21, 5, False), u),
        ("no-flag", vnet(0, 0, 0, 0, 20, 6, False), u),
    ]:
        s[f"vnet-{name}"] = bytes([4]) + v + p
    # 5 split: frames as the TUN gives them (vnet header little endian, as the engine reads it)
    frames = {
        "tso-3000-1000": tso(3000, 1000),
        "tso-ts-opts": tso(4000, 1348, options=TS),
        "tso-tiny-mss": tso(300, 1, flags=0x19),
        "tso-ecn-cwr": tso(2000, 500, flags=0x90, gso_type=0x81),
        "tso-fin-psh": tso(1001, 1000, flags=0x19),
        "tso-no-payload": tso(0, 1000),
        "tso-mss0": tso(100, 0),
        "tso-too-big-df": tso(3000, 1400),
        "tso-too-big": tso(3000, 1400, df=False),
        "tso-no-route": tso(2000, 1000, dst=UNROUTED),
        "tso-ttl1": tso(2000, 1000, ttl=1),
        "tso-big": tso(20000, 1448, options=TS),
        "tso-unknown-type": tso(2000, 1000, gso_type=3),
        "tso-udp": (vnet(1, 1, 28, 100, 20, 6), udp(SRC, ROUTED, 500)),
        "none-needs-csum": (vnet(1, 0, 0, 0, 20, 6), udp(SRC, ROUTED, 40)),
        "none-plain": (vnet(), udp(SRC, ROUTED, 40)),
    }
    for name, (v, p) in frames.items():
        # the harness reads the vnet fields big endian and stores them natively
        fields = struct.unpack("<BBHHHH", v)
        s[f"split-{name}"] = bytes([5]) + struct.pack("!BBHHHH", *fields) + p

    def coalesce(pkts: list[bytes], fix: int = 0) -> bytes:
        return bytes([6, fix, len(pkts)]) + b"".join(b(">H", len(p)) + p for p in pkts)

    st = stream(8)
    s["coalesce-run"] = coalesce(st)
    s["coalesce-run-fix"] = coalesce(st, 1)
    s["coalesce-ts"] = coalesce(stream(6, 1000, options=TS))
    s["coalesce-psh-middle"] = coalesce(stream(3, last_psh=True) + stream(3, seq=3100))
    s["coalesce-gap"] = coalesce(stream(3) + stream(3, seq=9000))
    s["coalesce-short-last"] = coalesce(
        stream(4, last_psh=False) + [tcp(PEER_SRC, "10.0.0.1", 4100, payload(10))]
    )
    s["coalesce-bad-csum"] = coalesce(
        stream(2, last_psh=False) + [tcp(PEER_SRC, "10.0.0.1", 2100, payload(1000), good=False)]
    )
    s["coalesce-two-flows"] = coalesce(
        [x for pair in zip(stream(4), stream(4, seq=7), strict=False) for x in pair]
    )
    s["coalesce-mixed"] = coalesce([udp(SRC, "10.0.0.1"), *stream(3, last_psh=False), b"", b"\x45"])
    s["coalesce-64k"] = coalesce(stream(50, 1400, last_psh=False))
    # 7 icmp: type, code, mtu, then the packet it is about
    for name, hdr, p in [
        ("unreach", b"\x03\x00\x00\x00", udp(SRC, UNROUTED)),
        ("ttl", b"\x0b\x00\x00\x00", udp(SRC, ROUTED, ttl=1)),
        ("frag", b"\x03\x04" + b(">H", 1400), udp(SRC, ROUTED, 1400, df=True)),
        ("options", b"\x03\x00\x00\x00", ipv4(SRC, UNROUTED, b"12345678", options=b"\x01" * 40)),
        ("header-only", b"\x03\x00\x00\x00", ipv4(SRC, UNROUTED, b"")),
    ]:
        s[f"icmp-{name}"] = bytes([7]) + hdr + p

    def routes(rs: list[tuple[str, int, str, int]], probes: list[str]) -> bytes:
        out = bytes([8, len(rs)])
        for net, ln, hop, port in rs:
            out += ip(net) + bytes([ln]) + ip(hop) + b(">H", port)
        return out + b"".join(ip(p) for p in probes)

    s["routes-flannel"] = routes(
        [(f"10.5.{i}.0", 24, f"192.0.2.{i + 1}", 8285) for i in range(8)], ["10.5.3.9", "10.5.9.1"]
    )
    s["routes-nested"] = routes(
        [
            ("0.0.0.0", 0, "192.0.2.9", 1),
            ("10.0.0.0", 8, "192.0.2.1", 2),
            ("10.1.0.0", 16, "192.0.2.2", 3),
            ("10.1.2.3", 32, "192.0.2.3", 4),
        ],
        ["10.1.2.3", "10.1.2.4", "10.9.9.9", "8.8.8.8"],
    )
    s["routes-duplicates"] = routes(
        [
            ("10.1.0.0", 16, "192.0.2.1", 1),
            ("10.1.255.0", 16, "192.0.2.2", 2),
            ("10.1.0.0", 16, "192.0.2.3", 3),
        ],
        ["10.1.0.1"],
    )
    s["routes-bad-len"] = routes(
        [("10.1.0.0", 16, "192.0.2.1", 1), ("10.2.0.0", 0xA1, "192.0.2.2", 2)], []
    )
    s["routes-empty"] = routes([], ["10.1.0.1"])
    return s


# ------------------------------------------------------------------ fuzz_rounds


class Ev:
    """An event stream for fuzz_rounds (see its header comment)."""

    def __init__(self, config: int, mtu_index: int = 0) -> None:
        self.b = bytearray([config, mtu_index])

    def poll(self, ev: int) -> Ev:
        self.b.append(ev)
        return self

    def read(self, frame: bytes | None = None, kind: int = 3) -> Ev:
        if frame is None:
            self.b.append(kind if kind < 3 else 0)
        else:
            self.b += bytes([kind]) + struct.pack(">H", len(frame)) + frame
        return self

    def recv(self, msgs: list[tuple[bytes, str, int, int, int]] | None = None, k: int = 0) -> Ev:
        """msgs: (data, src, port, flags, gro segment size); None = EAGAIN (k=0) or EIO (k=1)."""
        if msgs is None:
            self.b.append(k)
            return self
        self.b.append(len(msgs) + 1)
        for data, src, port, flags, gro in msgs:
            self.b += struct.pack(">H", len(data)) + data + bytes([flags])
            if flags & 2:
                self.b += struct.pack(">H", gro)
            self.b += ip(src) + struct.pack(">H", port)
        return self

    def send(self, r: int = 255) -> Ev:
        self.b.append(r)
        return self

    def write(self, r: int = 255) -> Ev:
        self.b.append(r)
        return self

    def bytes(self) -> bytes:
        return bytes(self.b)


VNET_ALL = 0x1F | 0x40  # vnet_hdr, TSO, GSO, GRO, offload, check_source
PEER, PORT = "127.0.0.2", 8285  # the fuzz_rounds routes: 10/8 -> 127.0.0.2:8285


def rounds_seeds() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    nv = vnet()  # GSO_NONE, as the TUN prefixes plain packets
    pkts = [udp(SRC, f"10.{1 + i % 3}.2.{i}", 40 + i) for i in range(6)]
    # combined worker, plain TUN, no offload: a few packets out, a few in
    e = Ev(0x40).poll(0x07)
    for p in pkts:
        e.read(p)
    e.read().send().recv(
        [(udp(PEER_SRC, "10.0.0.1"), PEER, PORT, 0, 0)] * 3
    ).write().write().write()
    s["plain-both"] = e.read().recv().bytes()
    # the same with vnet headers
    e = Ev(VNET_ALL).poll(0x07)
    for p in pkts:
        e.read(nv + p)
    s["vnet-both"] = e.read().send().recv().bytes()
    # TSO frames: split, GSO sends
    e = Ev(VNET_ALL).poll(0x05)
    for size, mss, opts in [(3000, 1000, b""), (8000, 1348, TS), (200, 1, b"")]:
        v, p = tso(size, mss, options=opts)
        e.read(v + p)
    s["tso-gso"] = e.read().send().recv().bytes()
    # TSO with EAGAIN, ENOBUFS, partial sends, a GSO failure (EIO), then success
    e = Ev(VNET_ALL).poll(0x05)
    v, p = tso(6000, 1000)
    e.read(v + p).read().send(0).poll(0x04).send(1).poll(0x04).send(2).send(7).send()
    s["tso-eagain-gso-fail"] = e.bytes()
    # flush waits that serve RX: socket readable but not writable while sending
    e = Ev(VNET_ALL).poll(0x05)
    for p in pkts:
        e.read(nv + p)
    e.read().send(0).poll(0x02).recv([(udp(PEER_SRC, "10.0.0.1"), PEER, PORT, 0, 0)]).write()
    s["wait-serves-rx"] = e.poll(0x04).send().bytes()
    # GRO: one buffer of a TCP run, coalesced into one GSO frame for the TUN
    run = b"".join(stream(6, 1000))
    e = Ev(VNET_ALL).poll(0x02).read().recv([(run, PEER, PORT, 2, 1040)]).write()
    s["gro-coalesce"] = e.recv().bytes()
    run_ts = b"".join(stream(8, 1000, options=TS))
    s["gro-coalesce-ts"] = (
        Ev(VNET_ALL).poll(0x02).read().recv([(run_ts, PEER, PORT, 2, 1052)]).write().bytes()
    )
    # GRO of tiny segments, a truncated datagram, an empty one, foreign and wrong-port senders
    tiny = b"".join(udp(PEER_SRC, "10.0.0.1", 0) for _ in range(40))
    e = (
        Ev(VNET_ALL)
        .poll(0x02)
        .read()
        .recv(
            [
                (tiny, PEER, PORT, 2, 28),
                (udp(PEER_SRC, "10.0.0.1"), PEER, PORT, 1, 0),
                (b"", PEER, PORT, 0, 0),
                (udp(PEER_SRC, "10.0.0.1"), "198.51.100.7", PORT, 0, 0),
                (udp(PEER_SRC, "10.0.0.1"), PEER, 1234, 0, 0),
                (udp(PEER_SRC, "10.0.0.1")[:-1], PEER, PORT, 2, 7),
            ]
        )
    )
    s["rx-hostile"] = e.write(0).write(1).write().bytes()
    # ICMP errors written back into the TUN
    e = Ev(VNET_ALL).poll(0x01)
    for p in [udp(SRC, UNROUTED), udp(SRC, ROUTED, ttl=1), udp(SRC, ROUTED, 1400, df=True)]:
        e.read(nv + p).write()
    s["icmp-back"] = e.read().bytes()
    # bad vnet headers and read errors: EINTR, EIO (back-off), POLLNVAL
    e = Ev(VNET_ALL).poll(0x01).read(b"\x01\x02").read(vnet(0, 3) + udp(SRC, ROUTED))
    e.read(vnet(1, 0, 0, 0, 20, 400) + udp(SRC, ROUTED)).read(kind=1).read(kind=2).poll(0).poll(
        0xFD
    )
    s["tx-errors"] = e.bytes()
    # recvmmsg errors with and without a pending SO_ERROR
    s["rx-errors"] = (
        Ev(0x40).poll(0x02).read().recv(k=1).send(1).poll(0x02).read().recv(k=1).send(0).bytes()
    )
    # separate RX thread and two queues: the loops run one after the other on slices
    e = Ev(VNET_ALL | 0x20 | 0x80).poll(0x01)
    for p in pkts:
        e.read(nv + p)
    e.read().send()
    tx = e.bytes()[2:]
    rx = Ev(0).poll(0x02).recv([(run, PEER, PORT, 2, 1040)]).write().recv().bytes()[2:]
    n = max(len(tx), len(rx))  # the harness gives each worker loop an equal slice
    s["rx-thread-2q"] = bytes([VNET_ALL | 0x20 | 0x80, 0]) + b"".join(
        x + bytes(n - len(x)) for x in (tx, tx, rx)
    )
    # small MTU: 576 (mtu index 1)
    e = Ev(VNET_ALL, 1).poll(0x01)
    v, p = tso(3000, 536)
    s["mtu576-tso"] = (
        e.read(v + p).read(nv + udp(SRC, ROUTED, 600, df=True)).write().read().send().bytes()
    )
    return s


def main() -> None:
    for name, seeds in [("fuzz_packet", packet_seeds()), ("fuzz_rounds", rounds_seeds())]:
        d = OUT / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for seed_name, data in sorted(seeds.items()):
            (d / seed_name).write_bytes(data)
        print(f"{d}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()

"""Packet builders for the engine tests: IPv4/UDP/TCP with real checksums, vnet headers, TSO frames.

Shared by the packet-level and the traffic suites (a helper module, not a test module).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
TUN_ADDR = IP("10.1.1.0")
MTU = 1472


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
    frag_off: int = 0,
    mf: bool = False,
    tos: int = 0,
    options: bytes = b"",
) -> bytes:
    ihl = 5 + len(options) // 4
    flags = (0x4000 if df else 0) | (0x2000 if mf else 0) | frag_off
    hdr = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            tos,
            ihl * 4 + len(payload),
            ident,
            flags,
            ttl,
            proto,
            0,
            IP(src).packed,
            IP(dst).packed,
        )
        + options
    )
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


def udp_packet(src: str, dst: str, size: int = 32, **kw: Any) -> bytes:
    body = bytes(range(256)) * (size // 256 + 1)
    return ipv4(src, dst, struct.pack("!HHHH", 1234, 5678, 8 + size, 0) + body[:size], **kw)


def tcp_pseudo(src: bytes, dst: bytes, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, 6, length)


def tcp_segment(
    src: str,
    dst: str,
    seq: int,
    payload: bytes,
    *,
    flags: int = 0x10,
    ack: int = 1000,
    options: bytes = b"",
    ttl: int = 64,
    ident: int = 7,
    good_csum: bool = True,
) -> bytes:
    doff = (20 + len(options)) // 4
    tcp = (
        struct.pack("!HHIIBBHHH", 40000, 5201, seq & 0xFFFFFFFF, ack, doff << 4, flags, 512, 0, 0)
        + options
    )
    c = csum(tcp_pseudo(IP(src).packed, IP(dst).packed, len(tcp) + len(payload)) + tcp + payload)
    if not good_csum:
        c ^= 0x5555
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    return ipv4(src, dst, tcp + payload, proto=6, ttl=ttl, ident=ident, df=True)


def tcp_valid(pkt: bytes) -> bool:
    ihl = (pkt[0] & 15) * 4
    return csum(tcp_pseudo(pkt[12:16], pkt[16:20], len(pkt) - ihl) + pkt[ihl:]) == 0


def vnet_hdr(
    *,
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def tso_frame(
    payload: bytes,
    gso_size: int,
    *,
    flags: int = 0x18,
    seq: int = 5000,
    options: bytes = b"",
    ttl: int = 64,
) -> bytes:
    """A TCP frame as the kernel hands it to a TUN with TSO: NEEDS_CSUM, pseudo-header sum."""
    pkt = bytearray(
        tcp_segment("10.1.1.5", "10.1.2.7", seq, payload, flags=flags, options=options, ttl=ttl)
    )
    tcp_len = len(pkt) - 20
    s = sum(struct.unpack("!6H", pkt[12:20] + struct.pack("!HH", 6, tcp_len)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    pkt[36:38] = struct.pack("!H", s)  # not complemented: the partial sum, like the kernel's
    hdr_len = 20 + 20 + len(options)
    return vnet_hdr(
        flags=1, gso_type=1, hdr_len=hdr_len, gso_size=gso_size, csum_start=20, csum_offset=16
    ) + bytes(pkt)


def bad_csum(p: bytes) -> bytes:
    return p[:10] + bytes([p[10] ^ 1]) + p[11:]

"""The engine's test entry points, from the tests' own cffi module (tests._engine_test).

build.py builds that module from the same C sources as fastlane._engine plus csrc/testapi.c,
so these calls run the workers' own per-packet code with no I/O while the shipped module
carries none of them. `ProbeEngine` is a full Engine (routes, counters, start/stop) on that
module with the probes added.
"""

from __future__ import annotations

import ipaddress

from fastlane.engine import REASONS, Engine
from tests._engine_test import ffi, lib


class ProbeEngine(Engine):
    """An Engine from the tests' module, with the per-packet probes."""

    _ffi = ffi
    _lib = lib

    def lookup(self, dst: ipaddress.IPv4Address) -> tuple[ipaddress.IPv4Address, int] | None:
        hop = ffi.new("uint32_t *")
        port = ffi.new("uint16_t *")
        if not lib.fl_lookup(self._e, int(dst), hop, port):
            return None
        return ipaddress.IPv4Address(hop[0]), port[0]

    def encap_verdict(
        self, packet: bytes
    ) -> tuple[str, bytes, tuple[ipaddress.IPv4Address, int] | None, bytes]:
        """(verdict, packet after TTL change, destination, ICMP error or b"")."""
        buf = ffi.new("uint8_t[]", max(len(packet), 1))
        ffi.memmove(buf, packet, len(packet))
        hop = ffi.new("uint32_t *")
        port = ffi.new("uint16_t *")
        icmp = ffi.new("uint8_t[]", 128)
        icmp_len = ffi.new("int *")
        v = lib.fl_tx_packet(self._e, buf, len(packet), hop, port, icmp, icmp_len)
        out = bytes(ffi.buffer(buf, len(packet)))
        reply = bytes(ffi.buffer(icmp, icmp_len[0]))
        if v == 0:
            return "forward", out, (ipaddress.IPv4Address(hop[0]), port[0]), reply
        return REASONS[v], out, None, reply

    def decap_verdict(self, packet: bytes, src: ipaddress.IPv4Address, src_port: int = 8285) -> str:
        """What the RX worker would do with this datagram payload from src:src_port."""
        v = lib.fl_rx_packet(self._e, packet, len(packet), int(src), src_port)
        return "deliver" if v == 0 else REASONS[v]

    def split(self, frame: bytes) -> list[bytes] | str:
        """TSO-split a vnet_hdr frame as the TX worker would; a drop reason on refusal."""
        cap = 2 * len(frame) + 65536
        out = ffi.new("uint8_t[]", cap)
        lens = ffi.new("int[]", 4096)
        n = lib.fl_test_split(self._e, frame, len(frame), out, cap, lens, 4096)
        if n < 0:
            return REASONS.get(-n, "error")
        pkts, off = [], 0
        for i in range(n):
            pkts.append(bytes(ffi.buffer(out + off, lens[i])))
            off += lens[i]
        return pkts


def coalesce(packets: list[bytes]) -> list[bytes]:
    """The frames (vnet header + packet) the RX worker would write to a vnet_hdr TUN."""
    data = b"".join(packets)
    lens = ffi.new("int[]", [len(p) for p in packets] or [0])
    cap = len(data) + 64 * (len(packets) + 1)
    out = ffi.new("uint8_t[]", cap)
    out_lens = ffi.new("int[]", max(len(packets), 1))
    n = lib.fl_test_coalesce(data, lens, len(packets), out, cap, out_lens, max(len(packets), 1))
    frames, off = [], 0
    for i in range(n):
        frames.append(bytes(ffi.buffer(out + off, out_lens[i])))
        off += out_lens[i]
    return frames

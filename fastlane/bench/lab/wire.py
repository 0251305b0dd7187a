"""What crosses the underlay "wire": a capture of the frames on the switch's ports.

Why: the bench's `nic` underlay promises that every frame between a host and the switch is one
packet of at most the MTU, as on a real NIC, instead of the 64 KiB GSO frames a plain veth
carries. This module checks that promise from outside the hosts: it opens a raw AF_PACKET
socket on each switch port (inside the switch namespace) and looks at every frame.

PACKET_VNET_HDR makes the kernel prefix each frame with its virtio_net_hdr, whose gso_type says
whether the frame is still a GSO super-frame (one the kernel would segment later); a frame of a
GSO kind the header cannot express makes recv fail with EINVAL, which counts as GSO too.

Run it inside a namespace (the topology's switch) while traffic flows:

    ip netns exec <switch netns> python -m fastlane.bench.lab.wire --seconds 3 p0 p1

It prints one JSON object (see `WireStats`).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import select
import socket
import struct
import sys
import time

__all__ = ["WireStats", "capture"]

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_VNET_HDR = 15
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
ETH_HLEN = 14
ETH_ZLEN = 60  # a frame padded up to the Ethernet minimum may carry a shorter IP packet


@dataclasses.dataclass
class WireStats:
    """Frames seen on the captured ports (both directions; a frame crossing the switch is seen
    on the port it enters and on the port it leaves)."""

    frames: int = 0
    ipv4: int = 0  # frames carrying IPv4
    max_l3: int = 0  # largest frame minus its Ethernet header, in bytes
    over_mtu: int = 0  # frames whose payload exceeds the MTU
    gso: int = 0  # frames still marked GSO (or of a GSO kind recv cannot describe)
    not_one_ipv4: int = 0  # IPv4 frames whose IP total length is not the frame's payload

    def nic_like(self) -> bool:
        return self.over_mtu == 0 and self.gso == 0 and self.not_one_ipv4 == 0


def _classify(stats: WireStats, frame: bytes, size: int, mtu: int) -> None:
    stats.frames += 1
    l3 = size - ETH_HLEN
    stats.max_l3 = max(stats.max_l3, l3)
    if l3 > mtu:
        stats.over_mtu += 1
    if len(frame) < ETH_HLEN + 20 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return
    stats.ipv4 += 1
    total = struct.unpack_from("!H", frame, ETH_HLEN + 2)[0]
    if total != l3 and not (size <= ETH_ZLEN and total < l3):
        stats.not_one_ipv4 += 1


def capture(ifnames: list[str], seconds: float, mtu: int) -> WireStats:
    """Capture on `ifnames` (in the calling process's namespace) for `seconds`."""
    stats = WireStats()
    socks = []
    try:
        for name in ifnames:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            socks.append(s)
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind((name, 0))
            s.setblocking(False)
        print("capturing", file=sys.stderr, flush=True)  # the caller may start traffic now
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(socks, [], [], left)
            for s in ready:
                while True:
                    try:
                        n = s.recv_into(buf, len(buf), socket.MSG_TRUNC)  # n: untruncated
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.EINVAL:  # a GSO frame virtio_net_hdr cannot express
                            stats.frames += 1
                            stats.gso += 1
                            continue
                        raise
                    if n < VNET_HDR.size:
                        continue
                    gso_type = VNET_HDR.unpack_from(buf)[1]
                    frame = bytes(view[VNET_HDR.size : min(n, len(buf), VNET_HDR.size + 64)])
                    _classify(stats, frame, n - VNET_HDR.size, mtu)
                    if gso_type != 0:
                        stats.gso += 1
    finally:
        for s in socks:
            s.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastlane.bench.lab.wire",
        description="count frames on interfaces; prints JSON",
    )
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("ifnames", nargs="+")
    a = p.parse_args(argv)
    stats = capture(a.ifnames, a.seconds, a.mtu)
    print(json.dumps(dataclasses.asdict(stats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

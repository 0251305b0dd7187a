"""Flow steering over a multi-queue TUN (csrc/tun_batch.c, fl_tun_steer).

The kernel's own steering sends a flow to the queue its packets were last written on, and the
engine writes every decapsulated packet on queue 0, so without a program every TCP flow ends up
on queue 0's worker. The steering program pins each flow by a fixed hash. Here real packets
from a namespace's stack reach a two-queue TUN, and the queue each arrives on must be the one
the model below computes: the same queue for every packet of a flow (and for every fragment of
a datagram), and flows spread over both queues.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlane.tun import open_tun
from tests.engine_probe import ProbeEngine
from tests.fixtures_engine import in_netns, needs_net, sh

QUEUES = 2
GOLDEN = 0x9E3779B1


def steer_hash(pkt: bytes) -> int:
    """What the steering program returns for an IPv4 packet (the kernel takes it mod queues)."""
    if len(pkt) < 20:
        return 0
    ihl = (pkt[0] & 0x0F) * 4
    h = int.from_bytes(pkt[12:16], "big") ^ int.from_bytes(pkt[16:20], "big")
    frag = int.from_bytes(pkt[6:8], "big") & 0x3FFF
    if frag == 0 and pkt[9] in (6, 17):
        if len(pkt) < ihl + 4:
            return 0  # the program's load fails: queue 0
        ports = int.from_bytes(pkt[ihl : ihl + 4], "big")
        h ^= ports ^ (ports >> 16)
    return ((h * GOLDEN) & 0xFFFFFFFF) >> 16


def _ip(src: str, dst: str, proto: int, frag: int, payload: bytes) -> bytes:
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            1,
            frag,
            64,
            proto,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + payload
    )


@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.sampled_from([6, 17]),
)
def test_a_flow_and_its_fragments_hash_alike(sport: int, dport: int, ipid: int, proto: int) -> None:
    """Model properties: ports count only for unfragmented TCP/UDP; a datagram's fragments all
    hash by addresses alone, so they stay together; the hash never depends on the payload."""
    ports = struct.pack("!HH", sport, dport)
    whole = _ip("10.1.1.2", "10.1.2.3", proto, 0, ports + b"x" * 20)
    again = _ip("10.1.1.2", "10.1.2.3", proto, 0, ports + b"y" * 900)
    assert steer_hash(whole) == steer_hash(again)
    first = _ip("10.1.1.2", "10.1.2.3", proto, 0x2000, ports + b"z" * 8)  # MF set
    later = _ip("10.1.1.2", "10.1.2.3", proto, 0x0001, b"w" * 8)
    icmp = _ip("10.1.1.2", "10.1.2.3", 1, 0, b"\x08\x00" + b"\x00" * 6)
    assert steer_hash(first) == steer_hash(later) == steer_hash(icmp)


@pytest.fixture
def steered_tun() -> Iterator[tuple[str, list[int]]]:
    ns = f"flsteer-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    fds: list[int] = []
    try:
        name, fds = in_netns(ns, lambda: open_tun("flst%d", queues=QUEUES))
        assert ProbeEngine._lib.fl_tun_steer(fds[0]) == 0
        for cmd in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "addr", "add", "10.77.0.1/24", "dev", name),
            ("ip", "link", "set", name, "up", "mtu", "1400"),
        ):
            sh("ip", "netns", "exec", ns, *cmd)
        yield ns, fds
    finally:
        for fd in fds:
            os.close(fd)
        sh("ip", "netns", "del", ns, check=False)


def _drain(fds: list[int], want: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """(queue, packet) for every packet read, until `want` packets or the timeout."""
    got: list[tuple[int, bytes]] = []
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while len(got) < want:
        ready = poller.poll(timeout * 1000)
        if not ready:
            break
        for fd, _ in ready:
            try:
                pkt = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if pkt[0] >> 4 == 4:  # the kernel's own IPv6 chatter is not ours
                got.append((fds.index(fd), pkt))
    return got


@needs_net
def test_each_flow_lands_on_its_hashed_queue(steered_tun) -> None:
    ns, fds = steered_tun
    flows, per_flow = 32, 3
    script = (
        "import socket\n"
        f"for port in range(40000, 40000 + {flows}):\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "    s.bind(('10.77.0.1', port))\n"
        f"    for i in range({per_flow}):\n"
        "        s.sendto(b'f' * 100, ('10.77.0.2', 9000 + port % 7))\n"
        # one datagram over the MTU without DF: fragments, which must stay together
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.IPPROTO_IP, 10, 0)\n"  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT
        "s.sendto(b'g' * 3000, ('10.77.0.2', 9999))\n"
    )
    subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", script], check=True, timeout=30)
    got = [(q, p) for q, p in _drain(fds, flows * per_flow + 3) if p[9] == 17]
    udp = [(q, p) for q, p in got if int.from_bytes(p[6:8], "big") & 0x3FFF == 0]
    frags = [(q, p) for q, p in got if int.from_bytes(p[6:8], "big") & 0x3FFF]
    assert len(udp) == flows * per_flow and len(frags) == 3, [p[:28].hex() for _, p in got]
    for q, p in got:
        assert q == steer_hash(p) % QUEUES, p[:28].hex()
    by_flow: dict[bytes, set[int]] = {}
    for q, p in udp:
        by_flow.setdefault(p[20:24], set()).add(q)
    assert all(len(qs) == 1 for qs in by_flow.values())
    assert len({q for q, _ in frags}) == 1
    spread = [sum(1 for qs in by_flow.values() if q in qs) for q in range(QUEUES)]
    assert min(spread) >= flows // 4, spread


@needs_net
def test_replies_written_on_queue_0_do_not_move_a_flow(steered_tun) -> None:
    """The kernel's own steering would learn queue 0 from these writes; the program ignores them."""
    ns, fds = steered_tun
    script = (
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('10.77.0.1', 5555))\n"  # a fixed port: the same flows every run
        "for port in range(41000, 41016):\n"
        "    s.sendto(b'a', ('10.77.0.2', port))\n"
        "time.sleep(0.5)\n"
        "for port in range(41000, 41016):\n"
        "    s.sendto(b'b', ('10.77.0.2', port))\n"
    )
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", script])
    try:
        first = _drain(fds, 16)
        # a reply from each destination written on queue 0, as the engine's RX path does
        for _, p in first:
            sport, dport = struct.unpack("!HH", p[20:24])
            udp = struct.pack("!HHHH", dport, sport, 9, 0) + b"r"  # no UDP checksum: allowed
            reply = _ip("10.77.0.2", "10.77.0.1", 17, 0, udp)
            os.write(fds[0], reply[:10] + _csum(reply[:20]) + reply[12:])
        second = _drain(fds, 16)
    finally:
        proc.wait(10)
    assert len(first) == len(second) == 16
    assert {q for q, _ in second} == {0, 1}
    for q, p in first + second:
        assert q == steer_hash(p) % QUEUES


def _csum(header: bytes) -> bytes:
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return struct.pack("!H", ~s & 0xFFFF)

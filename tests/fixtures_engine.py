"""Two namespaces joined by a veth pair with a TUN and an Engine in each, for the traffic tests.

Loaded from tests/conftest.py (`pytest_plugins`); `pair_factory` tears down every pair it made,
pass or fail.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fastlane.bench.lab.topology import Topology
from fastlane.engine import Engine, Route
from fastlane.tun import open_tun, open_udp_socket
from tests.packets import IP, MTU, NET

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _net_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if shutil.which("ip") is None or shutil.which("ping") is None:
        return "needs iproute2 and ping"
    return None


needs_net = pytest.mark.skipif(_net_skip_reason() is not None, reason=_net_skip_reason() or "")


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run fn in a throwaway thread that entered netns ns (sockets/TUNs bind to it)."""
    box: dict[str, Any] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            box["v"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["e"] = exc
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("v")


UNDER = ["10.99.0.1", "10.99.0.2"]
OVER = ["10.1.1.0", "10.1.2.0"]
PORT = 8285
#: the flannel Network of the pair: the engines' inner source check covers it
NETWORK = NET("10.1.0.0/16")


#: each host's underlay device (the lab topology's)
UNDER_DEV = "eth0"


class Pair:
    """Two hosts of a lab topology (fastlane.bench.lab.topology), a TUN and an Engine (or a
    custom peer) in each.

    Host i has underlay UNDER[i] on UNDER_DEV and overlay address OVER[i] on its TUN, a route
    for 10.1.0.0/16 into the TUN, and routes 10.1.1.0/24 -> host 0, 10.1.2.0/24 -> host 1.
    The namespaces come from the topology, whose manifest lets a later run's cleanup_stale()
    remove them if this run is killed.
    """

    def __init__(
        self,
        *,
        vnet: bool = True,
        offload: bool = True,
        tun_mtu: int = MTU,
        engine_mtu: int = MTU,
        custom_b: bool = False,
        queues: int = 1,
        rx_thread: bool = False,
        **engine_kw: Any,
    ) -> None:
        self.topo = Topology(hosts=2, underlay="10.99.0.0/24", switch_ip=False)
        self.ns = [h.netns for h in self.topo.hosts]
        self.vnet, self.offload = vnet, offload
        self.tun_mtu, self.engine_mtu = tun_mtu, engine_mtu
        self.custom_b = custom_b
        self.queues = queues
        self.rx_thread = rx_thread
        self.engine_kw = engine_kw
        self.engines: list[Engine] = []
        self.socks: list[socket.socket] = []
        self.tun_fds: list[list[int]] = []

    def routes(self) -> list[Route]:
        return [
            Route(NET("10.1.1.0/24"), IP(UNDER[0]), PORT),
            Route(NET("10.1.2.0/24"), IP(UNDER[1]), PORT),
        ]

    def setup(self) -> None:
        self.topo.setup()
        assert [str(h.ip) for h in self.topo.hosts] == UNDER
        for i, n in enumerate(self.ns):
            vnet = self.vnet and not (i == 1 and self.custom_b)
            name, fds = in_netns(n, lambda: open_tun("flt%d", queues=self.queues, vnet_hdr=vnet))
            self.tun_fds.append(fds)
            self.socks.append(in_netns(n, lambda: open_udp_socket(UNDER[i], PORT)))
            sh("ip", "-n", n, "addr", "add", f"{OVER[i]}/32", "dev", name)
            sh("ip", "-n", n, "link", "set", name, "mtu", str(self.tun_mtu), "up")
            sh("ip", "-n", n, "route", "add", "10.1.0.0/16", "dev", name)
            # ICMP errors come from the TUN's own address: without accept_local the kernel
            # drops them as martians (fib_validate_source rejects a local source address)
            sh("ip", "netns", "exec", n, "sysctl", "-qw", f"net.ipv4.conf.{name}.accept_local=1")
            if i == 1 and self.custom_b:
                continue
            e = Engine(
                fds,
                self.socks[i].fileno(),
                self.engine_mtu,
                IP(OVER[i]),
                offload=self.offload,
                rx_thread=self.rx_thread,
                network=NETWORK,
                **self.engine_kw,
            )
            e.set_routes(self.routes())
            e.start()
            self.engines.append(e)

    def teardown(self) -> None:
        for e in self.engines:
            e.stop()
        for s in self.socks:
            s.close()
        for fds in self.tun_fds:
            for fd in fds:
                os.close(fd)
        self.topo.teardown()

    def exec(
        self, i: int, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns[i], *args, check=check, timeout=timeout)

    def ping(self, i: int, *args: str, count: int = 3) -> subprocess.CompletedProcess:
        return self.exec(
            i, "ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", *args, check=False
        )


@pytest.fixture
def pair_factory(net_capable: None) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def make(**kw: Any) -> Pair:
        p = Pair(**kw)
        made.append(p)
        p.setup()
        return p

    try:
        yield make
    finally:
        for p in made:
            p.teardown()


MODES: dict[str, dict[str, Any]] = {
    "plain": dict(vnet=False, offload=False),
    "gso-gro": dict(vnet=False, offload=True),
    "vnet-no-offload": dict(vnet=True, offload=False),
    "tso": dict(vnet=True, offload=True),
    "tso-2queues": dict(vnet=True, offload=True, queues=2),
    "tso-rx-thread": dict(vnet=True, offload=True, rx_thread=True),
}


def tcp_transfer(
    pair: Pair, src: int, dst: int, size: int, seed: int, *, mss: int = 0, timeout: float = 60
) -> tuple[str, str]:
    """Send `size` pseudo-random bytes over TCP from host src to host dst's overlay address.

    Sockets are made inside the namespaces, then driven from ordinary threads. Returns the
    sha256 of what was sent and of what arrived.
    """
    lsock = in_netns(pair.ns[dst], lambda: socket.create_server((OVER[dst], 0)))
    port = lsock.getsockname()[1]
    lsock.settimeout(timeout)

    def mk_client() -> socket.socket:
        c = socket.socket()
        if mss:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        c.bind((OVER[src], 0))
        return c

    client = in_netns(pair.ns[src], mk_client)
    client.settimeout(timeout)
    got = hashlib.sha256()
    err: list[BaseException] = []

    def receive() -> None:
        try:
            conn, _ = lsock.accept()
            conn.settimeout(timeout)
            with conn:
                while chunk := conn.recv(1 << 20):
                    got.update(chunk)
        except BaseException as exc:  # noqa: BLE001
            err.append(exc)

    t = threading.Thread(target=receive)
    t.start()
    sent = hashlib.sha256()
    rng = random.Random(seed)
    try:
        client.connect((OVER[dst], port))
        left = size
        while left:
            block = rng.randbytes(min(left, 1 << 20))
            sent.update(block)
            client.sendall(block)
            left -= len(block)
        client.shutdown(socket.SHUT_WR)
        t.join(timeout)
    finally:
        client.close()
        lsock.close()
    assert not err, err
    assert not t.is_alive(), "receiver did not finish"
    return sent.hexdigest(), got.hexdigest()

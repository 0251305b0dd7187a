"""`udp`: flanneld's udp backend, with the per-packet work in the C engine.

Host set-up is flanneld's: a TUN `flannel0` holding the lease's network address as a
/32, a route for the whole overlay Network through it, MTU = underlay MTU - 28, and a
UDP socket bound to the interface address on Backend.Port (8285). Everything
per-packet happens in the engine's C threads; this module only turns the lease table
into the engine's route table, whole. A swap of a large table costs tens of ms of
Python, so changes are coalesced: one swap right away when idle, and under a stream of
changes at most one per swap's duration, covering everything that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from pyroute2 import IPRoute

from fastlane.backend.base import Backend, BackendError, bool_option, int_option
from fastlane.lease import Lease
from fastlane.leasetable import LeaseTable, TableChange
from fastlane.supervise import spawn

if TYPE_CHECKING:  # the C extension loads only once udp is chosen
    from fastlane.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_PORT = 8285
#: 20 bytes of IPv4 header + 8 of UDP header around each packet.
ENCAP_OVERHEAD = 28


class UdpBackend(Backend):
    lease_type = ""  # flanneld's udp backend writes no BackendType
    #: seconds between looks at the engine's counters for the log (drops, offload changes)
    WATCH_INTERVAL = 30.0

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        if (
            cfg.enable_ipv6
        ):  # flanneld's udp is IPv4-only too (dual-stack: vxlan, wireguard, host-gw)
            raise BackendError(
                "the udp backend is IPv4 only (as flanneld's); set EnableIPv6 to false or use another backend"
            )
        self.port = int_option(cfg, "Port", DEFAULT_PORT, 1, 65535)
        self.check_source = bool_option(cfg, "CheckSource", True)
        from fastlane.engine import MAX_QUEUES  # the C extension: only once udp is chosen

        self.queues = int_option(cfg, "Queues", 1, 1, MAX_QUEUES)
        self.offload = bool_option(cfg, "Offload", True)
        self.engine: Engine | None = None
        self.ifname: str | None = None
        self._fds: list[int] = []
        self._sock: socket.socket | None = None
        self._watch: asyncio.Task[None] | None = None
        self._table: LeaseTable | None = None
        self._swap_handle: asyncio.TimerHandle | None = None
        self._next_swap = 0.0  # loop time before which no swap starts

    @property
    def mtu(self) -> int:
        return self.ctx.iface.mtu - ENCAP_OVERHEAD

    def _configure(self, ifname: str, lease: Lease) -> None:
        """Address, MTU, up, and the overlay route, as flanneld's configureIface does."""
        net = self.ctx.config.network
        assert net is not None  # an IPv6-only config is refused in __init__
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, mtu=self.mtu)
            ipr.addr("replace", index=idx, address=str(lease.subnet4.network_address), prefixlen=32)
            ipr.link("set", index=idx, state="up")
            ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen, oif=idx)
        # The engine answers ICMP errors (net unreachable, frag needed, time exceeded) from
        # the TUN's own address, as flanneld does; without accept_local the kernel drops
        # them as martians (a local source arriving from outside) and pings hang silently.
        try:
            with open(f"/proc/sys/net/ipv4/conf/{ifname}/accept_local", "w") as f:
                f.write("1")
        except OSError as exc:
            log.warning(
                "cannot set accept_local on %s (%s): ICMP errors may be dropped", ifname, exc
            )

    async def start(self, lease: Lease, table: LeaseTable) -> None:
        from fastlane.engine import Engine, EngineError, Route  # loads the C extension
        from fastlane.tun import open_tun, open_udp_socket

        self._Route = Route
        try:
            self.ifname, self._fds = open_tun(
                "flannel%d", queues=self.queues, vnet_hdr=self.offload
            )
        except OSError as exc:
            raise BackendError(f"cannot create TUN device: {exc.strerror or exc}") from None
        try:
            await asyncio.to_thread(self._configure, self.ifname, lease)
            self._sock = open_udp_socket(str(self.ctx.iface.address), self.port)
        except OSError as exc:
            self._close()
            raise BackendError(
                f"cannot set up {self.ifname} / udp {self.ctx.iface.address}:{self.port}: "
                f"{exc.strerror or exc}"
            ) from None
        try:
            self.engine = Engine(
                self._fds,
                self._sock.fileno(),
                self.mtu,
                lease.subnet4.network_address,
                check_source=self.check_source,
                offload=self.offload,
                network=self.ctx.config.network,
            )
            table.subscribe(self._on_change)
            self.engine.start()
        except EngineError as exc:
            self._close()
            raise BackendError(f"udp engine: {exc}") from None
        # supervised: an unexpected error is logged and the loop restarted (fastlane.supervise)
        self._watch = spawn("udp engine watch", self._watch_engine)
        log.info(
            "udp backend: %s mtu %d, udp %s:%d, engine features %s",
            self.ifname,
            self.mtu,
            self.ctx.iface.address,
            self.port,
            ",".join(k for k, v in self.engine.features.items() if v) or "none",
        )

    def _on_change(self, table: LeaseTable, change: TableChange) -> None:
        # Why not swap here: one watch event is one change, and at 100 changes/s with
        # thousands of leases, one swap each would need more than all of the loop's time;
        # the backlog (and the lag of every route) would grow without bound.
        self._table = table
        if self._swap_handle is None:
            loop = asyncio.get_running_loop()
            self._swap_handle = loop.call_at(max(loop.time(), self._next_swap), self._swap)
        for lease in change.added:
            if self.routable(lease):
                log.info("route %s -> %s:%d", lease.subnet, lease.attrs.public_ip, self.port)
        for lease in change.removed:
            log.info("route %s removed", lease.subnet)

    def _swap(self) -> None:
        """Install the table as it is now; the next swap waits as long as this one took."""
        self._swap_handle = None
        table = self._table
        if table is None or self.engine is None:
            return
        start = time.monotonic()
        routes = [
            self._Route(lease.subnet4, lease.attrs.public_ip, self.port)
            for lease in table.leases()
            if self.routable(lease)
        ]
        try:
            self.engine.set_routes(routes)
        except Exception:  # the next change retries with the whole table
            log.exception("udp backend: route table swap failed")
        end = time.monotonic()
        self._next_swap = asyncio.get_running_loop().time() + (end - start)

    def _close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _watch_engine(self) -> None:
        """Log what changed in the engine every WATCH_INTERVAL seconds: drops by reason and
        offloads that paused or came back. The engine itself never logs (it has no Python
        and must not block on stderr), so this is how its events reach the operator."""
        from fastlane.engine import describe_changes

        assert self.engine is not None
        before, features = self.engine.counters(), self.engine.features
        while True:
            await asyncio.sleep(self.WATCH_INTERVAL)
            after, now = self.engine.counters(), self.engine.features
            for line in describe_changes(before, after, features, now):
                log.warning(line)
            before, features = after, now

    async def stop(self) -> None:
        if self._swap_handle is not None:
            self._swap_handle.cancel()
            self._swap_handle = None
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except asyncio.CancelledError:
                pass
            self._watch = None
        if self.engine is not None:
            self.engine.stop()
            log.info(
                "udp engine counters at exit: %s",
                " ".join(f"{k}={v}" for k, v in sorted(self.engine.counters().items()) if v),
            )
        self._close()

    def counters(self) -> dict[str, int]:
        return self.engine.counters() if self.engine is not None else {}

"""`KernelBackend`: what host-gw and vxlan share. They forward in the kernel, so all they do
is turn the lease table into netlink state. That work runs on one worker thread (sync
pyroute2 cannot run inside the event loop, and a single worker keeps updates in the order
the watcher saw them); the subscriber callback only queues a job, so a slow or failing
netlink call never blocks or kills the watcher.

Like flanneld, stop() leaves every route in place: peers stay reachable while the
daemon restarts, and the restarted daemon replaces the entries with identical ones.
Unlike flanneld, entries that outlived a peer's lease while the daemon was down are
swept on the first full table, and a route someone deleted is re-added on the next
periodic check (flanneld does the latter for host-gw only, every 10 s).

The sweep deletes only what fastlane (or flanneld before it) could have written: on the
vxlan device, neighbours and vxlan-shaped routes inside the Network and the FDB entries
of those VTEPs; on the underlay interface, routes of exactly the host-gw shape (see
`owned_routes`). Anything else an operator added stays, as it does with flanneld.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from fastlane.backend.base import Backend, BackendError
from fastlane.lease import Lease
from fastlane.leasetable import LeaseTable, TableChange
from fastlane.supervise import spawn

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address
IPv6Network = ipaddress.IPv6Network
IPv6Address = ipaddress.IPv6Address

#: main routing table; RTPROT_BOOT is what Go's netlink leaves in place (shown as no proto).
MAIN_TABLE = 254
RTPROT_BOOT = 3
RTN_UNICAST = 1
#: the metric the kernel gives an IPv6 route added without one
IP6_RT_PRIO_USER = 1024

_TRANSIENT = {errno.EBUSY, errno.EAGAIN, errno.ENOBUFS, errno.EINTR}
_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV}


def netlink_call(what: str, fn: Callable[[], Any], *, missing_ok: bool = False) -> Any:
    """Run one netlink request; retry transient failures; one-line error otherwise.

    flanneld wraps each call in retry.Do; retrying EINVAL or ENETUNREACH cannot help, so
    only the errors that can go away by themselves are retried here.
    """
    for attempt in range(4):
        try:
            return fn()
        except NetlinkError as exc:
            if missing_ok and exc.code in _GONE:
                return None
            if exc.code in _TRANSIENT and attempt < 3:
                time.sleep(0.05 * (attempt + 1))
                continue
            raise KernelError(f"{what}: {_strerror(exc)}") from None


def _strerror(exc: NetlinkError) -> str:
    try:
        return (
            exc.args[1] if len(exc.args) > 1 else (str(exc) or errno.errorcode.get(exc.code, "?"))
        )
    except Exception:  # pragma: no cover - defensive
        return str(exc)


def _gateway_routes(ipr: IPRoute, oif: int, cfg, v6: bool, owned: bool) -> dict[Any, Any]:
    """Routes out of `oif` via a gateway to a (IPv6)SubnetLen subnet of the (IPv6)Network;
    with `owned`, only those of the shape fastlane and flanneld write (`_owned_shape`)."""
    family = socket.AF_INET6 if v6 else socket.AF_INET
    network = cfg.ipv6_network if v6 else cfg.network
    plen = cfg.ipv6_subnet_len if v6 else cfg.subnet_len
    net_type, addr_type = (IPv6Network, IPv6Address) if v6 else (IPv4Network, IPv4Address)
    found: dict[Any, Any] = {}
    if network is None:
        return found
    for r in ipr.get_routes(family=family, oif=oif, table=MAIN_TABLE):
        if owned and not _owned_shape(r, family):
            continue
        dst, gw = r.get_attr("RTA_DST"), r.get_attr("RTA_GATEWAY")
        if dst is None or gw is None or r["dst_len"] != plen:
            continue
        net = net_type((dst, r["dst_len"]))
        if net.subnet_of(network):
            found[net] = addr_type(gw)
    return found


def overlay_routes(ipr: IPRoute, oif: int, cfg) -> dict[IPv4Network, IPv4Address]:
    """Routes out of `oif` that look like flannel's: via a gateway, to a SubnetLen subnet of Network."""
    return _gateway_routes(ipr, oif, cfg, v6=False, owned=False)


def overlay_routes6(ipr: IPRoute, oif: int, cfg) -> dict[IPv6Network, IPv6Address]:
    """overlay_routes for IPv6: to an IPv6SubnetLen subnet of IPv6Network, via a gateway."""
    return _gateway_routes(ipr, oif, cfg, v6=True, owned=False)


def _owned_shape(r, family: int) -> bool:
    """Main table, proto boot, unicast, one gateway, and the default metric (none for IPv4;
    IPv6 routes added without one get the kernel's 1024)."""
    metric = r.get_attr("RTA_PRIORITY")
    return (
        r["proto"] == RTPROT_BOOT
        and r["type"] == RTN_UNICAST
        and (r.get_attr("RTA_TABLE") or r["table"]) == MAIN_TABLE
        and (not metric if family == socket.AF_INET else metric in (None, 0, IP6_RT_PRIO_USER))
        and r.get_attr("RTA_MULTIPATH") is None
    )


def owned_routes(ipr: IPRoute, oif: int, cfg) -> dict[IPv4Network, IPv4Address]:
    """Routes out of `oif` of exactly the shape fastlane and flanneld write, and so the
    only ones a sweep may delete: main table, proto boot, unicast, no metric, one
    gateway, to a SubnetLen subnet of the Network. A route with another proto (`ip route
    add ... proto static`), table, metric or length is the operator's."""
    return _gateway_routes(ipr, oif, cfg, v6=False, owned=True)


def owned_routes6(ipr: IPRoute, oif: int, cfg) -> dict[IPv6Network, IPv6Address]:
    """owned_routes for IPv6: to an IPv6SubnetLen subnet of IPv6Network, metric 1024."""
    return _gateway_routes(ipr, oif, cfg, v6=True, owned=True)


class KernelError(Exception):
    """One netlink operation failed (logged as one line, never fatal once running)."""


class KernelBackend(Backend):
    """A backend whose data plane is kernel state derived from the lease table."""

    #: Seconds between checks that the kernel still holds what we programmed.
    RECONCILE_INTERVAL = 5.0

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.lease: Lease | None = None
        self._table: LeaseTable | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._swept = False
        self._ignored: set[tuple[str, str]] = set()
        self._counts = {"peers": 0, "netlink_errors": 0, "repairs": 0, "swept": 0}
        self.log = logging.getLogger(type(self).__module__)  # log lines name the backend

    # ---- hooks for subclasses (all run on the worker thread) ------------------------

    def _setup(self, ipr: IPRoute, lease: Lease) -> None:
        """Host configuration that must exist before peers are programmed."""

    def _program(self, ipr: IPRoute, lease: Lease) -> None:
        raise NotImplementedError

    def _unprogram(self, ipr: IPRoute, lease: Lease) -> None:
        raise NotImplementedError

    def _reconcile(self, ipr: IPRoute, leases: list[Lease]) -> None:
        """Repair what someone else removed."""

    def _sweep(self, ipr: IPRoute, leases: list[Lease]) -> None:
        """Remove entries for subnets that are no longer leased."""

    # ---- the worker -------------------------------------------------------------------

    def _run_job(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            with IPRoute() as ipr:
                fn(ipr, *args)
        except KernelError as exc:
            self._counts["netlink_errors"] += 1
            self.log.error("%s", exc)
        except Exception:  # a bug here must not stop later updates
            self._counts["netlink_errors"] += 1
            self.log.exception(
                "%s backend: unexpected error applying lease changes", self.lease_type
            )

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self._worker is None:
            return
        try:
            self._worker.submit(self._run_job, fn, *args)
        except RuntimeError:  # shut down: the daemon is stopping
            pass

    def _type_ok(self, lease: Lease) -> bool:
        """flanneld ignores peers of another backend type, with a warning."""
        btype = lease.attrs.backend_type
        if btype == self.lease_type:
            return True
        if (lease.name, btype) not in self._ignored:
            self._ignored.add((lease.name, btype))
            self.log.warning(
                "ignoring non-%s subnet %s: type=%s", self.lease_type, lease.name, btype or '""'
            )
        return False

    def _accepts(self, lease: Lease) -> bool:
        """The IPv4 half of this lease is ours to route (IPv4 enabled, our type, routable)."""
        if not self.ctx.config.enable_ipv4:
            return False
        return self._type_ok(lease) and self.routable(lease)

    def _accepts6(self, lease: Lease) -> bool:
        """The IPv6 half of this lease is ours to route (IPv6 enabled, our type, routable)."""
        if not self.ctx.config.enable_ipv6:
            return False
        return self._type_ok(lease) and self.routable6(lease)

    def _apply(self, ipr: IPRoute, change: TableChange, full: list[Lease] | None) -> None:
        for lease in change.removed:
            try:
                self._unprogram(ipr, lease)
            except KernelError as exc:
                self._counts["netlink_errors"] += 1
                self.log.error("%s", exc)
        for lease in change.added:
            try:
                self._program(ipr, lease)
            except KernelError as exc:
                self._counts["netlink_errors"] += 1
                self.log.error("%s", exc)
        if full is not None:
            self._sweep(ipr, full)

    def _on_change(self, table: LeaseTable, change: TableChange) -> None:
        # The first call carries the whole table (the watcher's first snapshot): only
        # then do we know which leftover entries belong to no lease.
        full = None
        if not self._swept:
            self._swept = True
            full = table.leases()
        self._submit(self._apply, change, full)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.RECONCILE_INTERVAL)
            if self._table is not None:
                self._submit(self._reconcile, self._table.leases())

    async def _call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a job on the worker and wait for it, letting KernelError out."""

        def job() -> None:
            with IPRoute() as ipr:
                fn(ipr, *args)

        assert self._worker is not None
        await asyncio.get_running_loop().run_in_executor(self._worker, job)

    # ---- Backend ----------------------------------------------------------------------

    async def start(self, lease: Lease, table: LeaseTable) -> None:
        self.lease = lease
        self._table = table
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"{self.lease_type}-netlink")
        try:
            await self._call(self._setup, lease)
        except KernelError as exc:
            raise BackendError(str(exc)) from None
        table.subscribe(self._on_change)
        # supervised: an unexpected error is logged and the loop restarted (fastlane.supervise)
        self._task = spawn(f"{self.lease_type} reconcile", self._reconcile_loop)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await asyncio.to_thread(worker.shutdown, True)

    def counters(self) -> dict[str, int]:
        return dict(self._counts)


# ---- VTEP entries, either family (vxlan.py's flannel.<VNI> and flannel-v6.<VNI>) ----

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04


def _family_kw(v6: bool) -> dict[str, Any]:
    return {"family": socket.AF_INET6} if v6 else {}


def vtep_route(index: int, subnet: IPv4Network | IPv6Network) -> dict[str, Any]:
    """`<subnet> via <subnet address> dev <vtep> onlink`: flanneld's route to a vxlan peer."""
    return dict(
        **_family_kw(subnet.version == 6),
        dst=str(subnet.network_address),
        dst_len=subnet.prefixlen,
        gateway=str(subnet.network_address),
        oif=index,
        flags=RTNH_F_ONLINK,
        table=MAIN_TABLE,
        proto=RTPROT_BOOT,
    )


def direct_route(
    subnet: IPv4Network | IPv6Network, gw: IPv4Address | IPv6Address
) -> dict[str, Any]:
    """`<subnet> via <peer's public address>`: DirectRouting's route to an on-link peer."""
    return dict(
        **_family_kw(subnet.version == 6),
        dst=str(subnet.network_address),
        dst_len=subnet.prefixlen,
        gateway=str(gw),
        table=MAIN_TABLE,
        proto=RTPROT_BOOT,
    )


def vtep_neigh(
    ipr: IPRoute, op: str, index: int, subnet: IPv4Network | IPv6Network, mac: str
) -> None:
    """The permanent neighbour `<peer subnet address> -> VtepMAC` ("replace"), or its removal;
    messages as flanneld's (AddARP/AddV6ARP)."""
    dst, v6 = str(subnet.network_address), subnet.version == 6
    kind = "V6ARP" if v6 else "ARP"
    if op == "replace":
        netlink_call(
            f"Add{kind} failed for {dst} -> {mac}",
            lambda: ipr.neigh(
                "replace",
                **_family_kw(v6),
                dst=dst,
                lladdr=mac,
                ifindex=index,
                state=NUD_PERMANENT,
            ),
        )
    else:
        netlink_call(
            f"Del{kind} failed for {dst}",
            lambda: ipr.neigh("del", **_family_kw(v6), dst=dst, ifindex=index),
            missing_ok=True,
        )


def vtep_fdb(ipr: IPRoute, op: str, index: int, mac: str, ip: IPv4Address | IPv6Address) -> None:
    """The permanent FDB entry `VtepMAC -> peer's public address` ("replace"), or its removal;
    messages as flanneld's (AddFDB/AddV6FDB)."""
    kind = "V6FDB" if ip.version == 6 else "FDB"
    if op == "replace":
        netlink_call(
            f"Add{kind} failed for {mac} -> {ip}",
            lambda: ipr.fdb(
                "replace",
                ifindex=index,
                lladdr=mac,
                dst=str(ip),
                state=NUD_PERMANENT,
                flags=NTF_SELF,
            ),
        )
    else:
        netlink_call(
            f"Del{kind} failed for {mac} -> {ip}",
            lambda: ipr.fdb("del", ifindex=index, lladdr=mac, dst=str(ip)),
            missing_ok=True,
        )

"""`host-gw`: one kernel route per peer subnet, via the peer's address on the underlay.

IPv6 (EnableIPv6) as flanneld's RouteNetwork: `<peer IPv6 subnet> via <peer PublicIPv6> dev
<iface>` for every host-gw lease with both, kept and swept like the IPv4 routes (the
kernel refuses a gateway that is not on the interface's link, as for IPv4).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pyroute2 import IPRoute

from fastlane.backend.base import BackendError
from fastlane.backend.kernel import (
    MAIN_TABLE,
    RTPROT_BOOT,
    KernelBackend,
    netlink_call,
    overlay_routes,
    overlay_routes6,
    owned_routes,
    owned_routes6,
)
from fastlane.lease import Lease

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address
IPv6Network = ipaddress.IPv6Network
IPv6Address = ipaddress.IPv6Address


class HostGwBackend(KernelBackend):
    """flanneld's host-gw: `ip route replace <peer subnet> via <peer PublicIP> dev <iface>`."""

    lease_type = "host-gw"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        if ctx.config.enable_ipv4 and ctx.public_ip != ctx.iface.address:
            raise BackendError(
                f"your PublicIP ({ctx.public_ip}) differs from interface IP ({ctx.iface.address}), "
                "meaning that probably you're on a NAT, which is not supported by host-gw backend"
            )
        # subnet -> gateway we installed
        self._routes: dict[IPv4Network, IPv4Address] = {}
        self._routes6: dict[IPv6Network, IPv6Address] = {}

    @property
    def mtu(self) -> int:
        return self.ctx.iface.mtu

    def _route(
        self, subnet: IPv4Network | IPv6Network, gw: IPv4Address | IPv6Address
    ) -> dict[str, Any]:
        return dict(
            dst=str(subnet.network_address),
            dst_len=subnet.prefixlen,
            gateway=str(gw),
            oif=self.ctx.iface.index,
            table=MAIN_TABLE,
            proto=RTPROT_BOOT,
        )

    def _program(self, ipr: IPRoute, lease: Lease) -> None:
        if self.ctx.config.enable_ipv6 and lease.ipv6_subnet is not None:
            self._program6(ipr, lease)
        if not self.ctx.config.enable_ipv4 or lease.subnet is None:
            return
        if not self._accepts(lease):
            if lease.subnet4 in self._routes:  # it switched backend type: drop our route
                self._unprogram(ipr, lease)
            return
        gw = lease.attrs.public_ip
        netlink_call(
            f"host-gw: cannot add route {lease.subnet4} via {gw} dev {self.ctx.iface.name}",
            lambda: ipr.route("replace", **self._route(lease.subnet4, gw)),
        )
        self._routes[lease.subnet4] = gw
        self._counts["peers"] = len(self._routes) + len(self._routes6)
        log.info("subnet added: %s via %s", lease.subnet4, gw)

    def _program6(self, ipr: IPRoute, lease: Lease) -> None:
        sub = lease.ipv6_subnet
        assert sub is not None
        gw = lease.attrs.public_ipv6
        if not self._accepts6(lease) or gw is None:
            if sub in self._routes6:
                self._unprogram6(ipr, lease)
            return
        netlink_call(
            f"host-gw: cannot add route {sub} via {gw} dev {self.ctx.iface.name}",
            lambda: ipr.route("replace", **self._route(sub, gw)),
        )
        self._routes6[sub] = gw
        self._counts["peers"] = len(self._routes) + len(self._routes6)
        log.info("subnet added: %s via %s", sub, gw)

    def _unprogram6(self, ipr: IPRoute, lease: Lease) -> None:
        sub = lease.ipv6_subnet
        if sub is None or not self.ctx.config.enable_ipv6:
            return
        gw = self._routes6.pop(sub, None)
        self._counts["peers"] = len(self._routes) + len(self._routes6)
        if gw is None:
            if lease.attrs.backend_type != self.lease_type or lease.attrs.public_ipv6 is None:
                return
            gw = lease.attrs.public_ipv6
        netlink_call(
            f"host-gw: cannot delete route {sub} via {gw}",
            lambda: ipr.route("del", **self._route(sub, gw)),
            missing_ok=True,
        )
        log.info("subnet removed: %s", sub)

    def _unprogram(self, ipr: IPRoute, lease: Lease) -> None:
        self._unprogram6(ipr, lease)
        if not self.ctx.config.enable_ipv4 or lease.subnet is None:
            return
        gw = self._routes.pop(lease.subnet4, None)
        self._counts["peers"] = len(self._routes) + len(self._routes6)
        if gw is None:
            if lease.attrs.backend_type != self.lease_type:
                return
            gw = lease.attrs.public_ip
        netlink_call(
            f"host-gw: cannot delete route {lease.subnet4} via {gw}",
            lambda: ipr.route("del", **self._route(lease.subnet4, gw)),
            missing_ok=True,
        )
        log.info("subnet removed: %s", lease.subnet4)

    def _our_routes(self, ipr: IPRoute) -> dict[IPv4Network, IPv4Address]:
        return overlay_routes(ipr, self.ctx.iface.index, self.ctx.config)

    def _our_routes6(self, ipr: IPRoute) -> dict[IPv6Network, IPv6Address]:
        return overlay_routes6(ipr, self.ctx.iface.index, self.ctx.config)

    def _reconcile(self, ipr: IPRoute, leases: list[Lease]) -> None:
        """Re-add any route of ours that went missing, in each family that has routes (the
        IPv6 listing is skipped when there is nothing to compare it with)."""
        Routes = Mapping[Any, Any]  # IPv4 or IPv6 subnet -> gateway
        families: list[tuple[Routes, Callable[[IPRoute], Routes]]] = [
            (self._routes, self._our_routes)
        ]
        if self._routes6:
            families.append((self._routes6, self._our_routes6))
        for wanted, listing in families:
            present = listing(ipr)
            for subnet, gw in list(wanted.items()):
                if present.get(subnet) != gw:
                    log.warning("route %s via %s went missing; re-adding it", subnet, gw)
                    self._counts["repairs"] += 1
                    netlink_call(
                        f"host-gw: cannot re-add route {subnet} via {gw}",
                        lambda: ipr.route("replace", **self._route(subnet, gw)),
                    )

    def _sweep(self, ipr: IPRoute, leases: list[Lease]) -> None:
        """Routes of the host-gw shape to subnets no lease of ours explains (owned_routes:
        another proto, table or metric marks a route as the operator's)."""
        lease = self.lease
        families = (
            (owned_routes, self._routes, lease.subnet if lease else None),
            (owned_routes6, self._routes6, lease.ipv6_subnet if lease else None),
        )
        for owned, ours, own in families:
            for subnet, gw in owned(ipr, self.ctx.iface.index, self.ctx.config).items():
                if subnet in ours or subnet == own:
                    continue
                log.info("removing stale route %s via %s (no lease holds it)", subnet, gw)
                self._counts["swept"] += 1
                netlink_call(
                    f"host-gw: cannot delete stale route {subnet}",
                    lambda: ipr.route("del", **self._route(subnet, gw)),
                    missing_ok=True,
                )

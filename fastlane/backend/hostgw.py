"""`host-gw`: one kernel route per peer subnet, via the peer's address on the underlay."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from pyroute2 import IPRoute

from fastlane.backend.base import BackendError
from fastlane.backend.kernel import (
    MAIN_TABLE,
    RTPROT_BOOT,
    KernelBackend,
    netlink_call,
    overlay_routes,
    owned_routes,
)
from fastlane.lease import Lease

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address


class HostGwBackend(KernelBackend):
    """flanneld's host-gw: `ip route replace <peer subnet> via <peer PublicIP> dev <iface>`."""

    lease_type = "host-gw"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        if (
            ctx.config.enable_ipv6
        ):  # the data model is there (leases, subnet.env); v6 routes are not yet
            raise BackendError(
                "host-gw backend: IPv6 (EnableIPv6) is not supported yet by fastlane"
            )
        if ctx.public_ip != ctx.iface.address:
            raise BackendError(
                f"your PublicIP ({ctx.public_ip}) differs from interface IP ({ctx.iface.address}), "
                "meaning that probably you're on a NAT, which is not supported by host-gw backend"
            )
        # subnet -> gateway we installed
        self._routes: dict[IPv4Network, IPv4Address] = {}

    @property
    def mtu(self) -> int:
        return self.ctx.iface.mtu

    def _route(self, subnet: IPv4Network, gw: IPv4Address) -> dict[str, Any]:
        return dict(
            dst=str(subnet.network_address),
            dst_len=subnet.prefixlen,
            gateway=str(gw),
            oif=self.ctx.iface.index,
            table=MAIN_TABLE,
            proto=RTPROT_BOOT,
        )

    def _program(self, ipr: IPRoute, lease: Lease) -> None:
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
        self._counts["peers"] = len(self._routes)
        log.info("subnet added: %s via %s", lease.subnet4, gw)

    def _unprogram(self, ipr: IPRoute, lease: Lease) -> None:
        gw = self._routes.pop(lease.subnet4, None)
        self._counts["peers"] = len(self._routes)
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

    def _reconcile(self, ipr: IPRoute, leases: list[Lease]) -> None:
        present = self._our_routes(ipr)
        for subnet, gw in list(self._routes.items()):
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
        own = self.lease.subnet if self.lease else None
        for subnet, gw in owned_routes(ipr, self.ctx.iface.index, self.ctx.config).items():
            if subnet in self._routes or subnet == own:
                continue
            log.info("removing stale route %s via %s (no lease holds it)", subnet, gw)
            self._counts["swept"] += 1
            netlink_call(
                f"host-gw: cannot delete stale route {subnet}",
                lambda: ipr.route("del", **self._route(subnet, gw)),
                missing_ok=True,
            )

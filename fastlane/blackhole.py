"""-ip-blackhole-route: a blackhole route for the node's own subnet, as flanneld adds it.

flanneld v0.28 (main.go, pkg/ip.AddBlackholeV4Route), whatever the backend: every
-iptables-resync seconds, if the main table holds no blackhole route for the lease's
subnet, add `blackhole <subnet>` (protocol boot, like Go's netlink). It is meant for
nodes without a bridge holding the subnet (Canal): traffic for an address of the subnet
that no local pod has is dropped here instead of following the default route out. It is
never removed (flanneld does not remove it either); a failure (a bridge already holds the
same prefix: "File exists") is logged and tried again next period.

With EnableIPv6 the lease's IPv6 subnet gets one too (flanneld's AddBlackholeV6Route, on
the same period).
"""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

MAIN_TABLE = 254
RTN_BLACKHOLE = 6
RTPROT_BOOT = 3


class RouteError(Exception):
    """The route could not be read or added (one-line message)."""


Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _family(subnet: Subnet) -> int:
    return socket.AF_INET6 if subnet.version == 6 else socket.AF_INET


def present(ipr: IPRoute, subnet: Subnet) -> bool:
    for r in ipr.get_routes(family=_family(subnet), table=MAIN_TABLE):
        if (
            r["type"] == RTN_BLACKHOLE
            and r["dst_len"] == subnet.prefixlen
            and r.get_attr("RTA_DST") == str(subnet.network_address)
        ):
            return True
    return False


def ensure(subnet: Subnet) -> bool:
    """Add the blackhole route if it is missing; True if it was added."""
    try:
        with IPRoute() as ipr:
            if present(ipr, subnet):
                return False
            ipr.route(
                "add",
                family=_family(subnet),
                dst=str(subnet.network_address),
                dst_len=subnet.prefixlen,
                type=RTN_BLACKHOLE,
                proto=RTPROT_BOOT,
                table=MAIN_TABLE,
            )
            return True
    except NetlinkError as exc:
        reason = exc.args[1] if len(exc.args) > 1 else exc
        raise RouteError(f"blackhole route for {subnet}: {reason}") from None

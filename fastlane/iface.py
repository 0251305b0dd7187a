"""Which interface carries the overlay, and which address this node advertises.

flanneld's order: each -iface (a name or an address) in turn, then each -iface-regex
(matched against addresses, then names), else the interface of the default route.
-public-ip overrides only the advertised address (NAT), not the interface.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pyroute2 import IPRoute


class InterfaceError(Exception):
    """No interface matches what the operator asked for."""


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    address: ipaddress.IPv4Address  # the interface's own first IPv4 address
    mtu: int


def _links() -> list[Interface]:
    """Every link with an IPv4 address (first address per link, like flanneld)."""
    with IPRoute() as ipr:
        names = {l["index"]: (l.get_attr("IFLA_IFNAME"), l.get_attr("IFLA_MTU")) for l in ipr.get_links()}
        out, seen = [], set()
        for a in ipr.get_addr(family=2):
            idx = a["index"]
            if idx in seen or idx not in names:
                continue
            seen.add(idx)
            name, mtu = names[idx]
            out.append(Interface(name, idx, ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS")), mtu))
        return out


def _default_route_index() -> int | None:
    with IPRoute() as ipr:
        for r in ipr.get_default_routes(family=2):
            oif = r.get_attr("RTA_OIF")
            if oif:
                return oif
    return None


def choose(ifaces: list[str], regexes: list[str]) -> Interface:
    links = _links()
    for spec in ifaces:
        try:
            ip = ipaddress.IPv4Address(spec)
        except ValueError:
            ip = None
        for link in links:
            if (ip is not None and link.address == ip) or link.name == spec:
                return link
        # An address may be a secondary one: look it up across all addresses.
        if ip is not None:
            with IPRoute() as ipr:
                for a in ipr.get_addr(family=2, address=str(ip)):
                    for link in links:
                        if link.index == a["index"]:
                            return Interface(link.name, link.index, ip, link.mtu)
    if ifaces:
        raise InterfaceError(f"no interface matches -iface {','.join(ifaces)}")
    for pattern in regexes:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise InterfaceError(f"bad -iface-regex {pattern!r}: {exc}") from None
        for link in links:
            if rx.search(str(link.address)):
                return link
        for link in links:
            if rx.search(link.name):
                return link
    if regexes:
        raise InterfaceError(f"no interface matches -iface-regex {','.join(regexes)}")
    index = _default_route_index()
    for link in links:
        if link.index == index:
            return link
    raise InterfaceError(
        "no default route interface found (use -iface or -iface-regex to choose one)"
    )

"""Which interface carries the overlay, and which of its addresses this node uses.

The rules are flanneld v0.28's (main.go and pkg/ipmatch.LookupExtIface, pkg/ip/iface.go),
because "drop-in" means a node with several NICs picks the same one after the swap:

- None of -iface, -iface-regex, -iface-can-reach given: the interface that owns
  -public-ip if that is set (none does: an error), else the interface of the first
  default route in the main table.
- Otherwise, in this order, the first that works: every -iface (an IPv4 address: the
  interface holding it, with that address; a name: that interface), every -iface-regex
  (first matched against every usable address of every interface, in interface index
  order, then against the names), then -iface-can-reach (the interface and source address
  of the kernel's route to that IP, as `ip route get` shows). A spec that finds nothing is
  logged and the next one tried; when all fail, that is the error. An empty spec
  (`-iface=` on the command line) means what flanneld's lookup of "" means: the
  default-route interface, at that point of the order.
- When the rule named an interface but not an address, the address is the interface's
  best IPv4 address: global or link-local unicast and not deprecated, global before
  link-local, permanent (configured) before dynamic (DHCP), non-temporary before temporary;
  ties keep the kernel's order (primary first).

-public-ip only changes the advertised address (NAT) once an interface is chosen.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

IPv4Address = ipaddress.IPv4Address

IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80
MAIN_TABLE = 254
_LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")


class InterfaceError(Exception):
    """No interface matches what the operator asked for (one-line message)."""


class _Miss(Exception):
    """One spec found nothing; the next one is tried."""


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    address: IPv4Address  # the interface address in use (flanneld's IfaceAddr)
    mtu: int


@dataclass(frozen=True)
class _Addr:
    ip: IPv4Address
    flags: int


@dataclass
class _Link:
    index: int
    name: str
    mtu: int
    addrs: list[_Addr] = field(default_factory=list)


def _global_unicast(ip: IPv4Address) -> bool:
    """Go's net.IP.IsGlobalUnicast for IPv4 (private ranges included)."""
    return not (
        ip.is_loopback
        or ip.is_multicast
        or ip.is_unspecified
        or ip == IPv4Address("255.255.255.255")
        or ip in _LINK_LOCAL
    )


def usable_addresses(addrs: list[_Addr]) -> list[IPv4Address]:
    """flanneld's GetInterfaceIP4Addrs: filter, then order by preference (stable)."""
    ok = [
        a
        for a in addrs
        if (_global_unicast(a.ip) or a.ip in _LINK_LOCAL) and not a.flags & IFA_F_DEPRECATED
    ]
    ok.sort(
        key=lambda a: (
            a.ip in _LINK_LOCAL,
            not a.flags & IFA_F_PERMANENT,
            bool(a.flags & IFA_F_TEMPORARY),
        )
    )
    return [a.ip for a in ok]


class _Host:
    """The links and addresses of this network namespace, read once per choice."""

    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr
        self.links: list[_Link] = []
        for msg in ipr.get_links():
            self.links.append(
                _Link(msg["index"], msg.get_attr("IFLA_IFNAME"), msg.get_attr("IFLA_MTU") or 0)
            )
        self.links.sort(key=lambda link: link.index)
        by_index = {link.index: link for link in self.links}
        for msg in ipr.get_addr(family=socket.AF_INET):
            link = by_index.get(msg["index"])
            raw = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if link is None or raw is None:
                continue
            flags = msg.get_attr("IFA_FLAGS")
            link.addrs.append(_Addr(IPv4Address(raw), msg["flags"] if flags is None else flags))

    def _link(self, index: int) -> _Link:
        for link in self.links:
            if link.index == index:
                return link
        raise _Miss(f"no interface with index {index}")

    def _best(self, link: _Link, address: IPv4Address | None = None) -> Interface:
        if address is None:
            usable = usable_addresses(link.addrs)
            if not usable:
                raise _Miss(f"failed to find IPv4 address for interface {link.name}")
            address = usable[0]
        if not link.mtu:
            raise _Miss(f"failed to determine MTU for {link.name}")
        return Interface(link.name, link.index, address, link.mtu)

    def by_ip(self, spec: str, ip: IPv4Address) -> Interface:
        for link in self.links:
            if any(a.ip == ip for a in link.addrs):
                return self._best(link, ip)
        raise _Miss(f"error looking up interface {spec}: no interface with given IP found")

    def by_name(self, name: str) -> Interface:
        for link in self.links:
            if link.name == name:
                return self._best(link)
        raise _Miss(f"error looking up interface {name}: no such network interface")

    def by_spec(self, spec: str) -> Interface:
        """One -iface value: "" (default route), an IP address or a name."""
        if spec == "":
            return self.default()
        try:
            ip = ipaddress.ip_address(spec)
        except ValueError:
            return self.by_name(spec)
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is None:
                raise _Miss(f"error looking up interface {spec}: no interface with given IP found")
            ip = ip.ipv4_mapped
        return self.by_ip(spec, ip)

    def by_regex(self, pattern: str) -> Interface:
        if pattern == "":
            return self.default()
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise _Miss(f"could not compile the IP address regex '{pattern}': {exc}") from None
        for link in self.links:
            for ip in usable_addresses(link.addrs):
                if rx.search(str(ip)):
                    return self._best(link, ip)
        for link in self.links:
            if rx.search(link.name):
                return self._best(link)
        available = ", ".join(
            f"{link.name}:[{' '.join(map(str, usable_addresses(link.addrs)))}]"
            for link in self.links
        )
        raise _Miss(
            f"could not match pattern {pattern} to any of the available network "
            f"interfaces ({available})"
        )

    def can_reach(self, target: str) -> Interface:
        try:
            ip = IPv4Address(target)
        except ValueError:
            raise _Miss(f"couldn't lookup route to {target!r}: not an IPv4 address") from None
        try:
            routes = self.ipr.route("get", dst=str(ip))
        except NetlinkError as exc:
            reason = exc.args[1] if len(exc.args) > 1 else exc
            raise _Miss(f"couldn't lookup route to {ip}: {reason}") from None
        for r in routes:
            oif = r.get_attr("RTA_OIF")
            src = r.get_attr("RTA_PREFSRC")
            return self._best(self._link(oif), IPv4Address(src) if src else None)
        raise _Miss("no interface with given IP found")

    def default(self) -> Interface:
        for r in self.ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            if r["dst_len"] != 0:
                continue
            oif = r.get_attr("RTA_OIF")
            if not oif:
                raise _Miss(
                    "failed to get default interface: found default route but could not "
                    "determine interface"
                )
            return self._best(self._link(oif))
        raise _Miss("failed to get default interface: unable to find default route")


def choose(
    ifaces: list[str], regexes: list[str], can_reach: str = "", public_ip: IPv4Address | None = None
) -> Interface:
    """The interface and address flanneld would use; InterfaceError (one line) if none."""
    try:
        with IPRoute() as ipr:
            host = _Host(ipr)
            if not ifaces and not regexes and not can_reach:
                try:
                    if public_ip is not None:
                        return host.by_ip(str(public_ip), public_ip)
                    return host.default()
                except _Miss as exc:
                    hint = (
                        ""
                        if public_ip is not None
                        else " (use -iface or -iface-regex to choose one)"
                    )
                    raise InterfaceError(
                        f"failed to find any valid interface to use: {exc}{hint}"
                    ) from None
            misses: list[str] = []
            for kind, specs, lookup in (
                ("-iface", ifaces, host.by_spec),
                ("-iface-regex", regexes, host.by_regex),
                ("-iface-can-reach", [can_reach] if can_reach else [], host.can_reach),
            ):
                for spec in specs:
                    try:
                        return lookup(spec)
                    except _Miss as exc:
                        log.info(
                            "could not find valid interface matching %s %s: %s", kind, spec, exc
                        )
                        misses.append(f"{kind}={spec}: {exc}")
            raise InterfaceError(
                "failed to find interface to use that matches the interfaces "
                "and/or regexes provided (" + "; ".join(misses) + ")"
            )
    except NetlinkError as exc:
        reason = exc.args[1] if len(exc.args) > 1 else exc
        raise InterfaceError(f"cannot read the host's interfaces: {reason}") from None

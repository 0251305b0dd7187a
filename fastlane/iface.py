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

With IPv6 enabled (flanneld's dual or IPv6 stack, pkg/ipmatch and ip.GetInterfaceIP6Addrs),
the chosen interface's IPv6 address is picked the same way: global unicast or link-local,
not deprecated (and, unlike flanneld, not tentative or DAD-failed: such an address cannot
carry traffic yet), global before link-local, permanent before dynamic, non-temporary
before temporary. An -iface that is an IPv6 address names the interface holding it and that
address. In an IPv6-only network (EnableIPv4 false) the default interface is the one of the
first IPv6 default route, and -iface-regex is matched against IPv6 addresses. In a dual-stack
network -iface-regex matches an interface by address only when one usable IPv4 address and
one usable IPv6 address of that interface both match (those two are used; an interface
lacking either family is skipped), before the names are tried; the default-route interface
must carry both default routes. -iface-can-reach takes an IPv4 or IPv6 target: the interface
of `ip route get <target>`, the route's source as the IPv4 address for an IPv4 target, and the
interface's best IPv6 address (flanneld ignores the route's IPv6 source). Two of flanneld's
slips are not copied: an IPv6 target's source is not used as the IPv4 (PublicIP) address
(flanneld would advertise an IPv6 address there; fastlane takes the interface's best IPv4
address), and a dual-stack regex that matched only the IPv4 address of one interface does
not leak that address onto an interface later matched by name. -public-ipv6 only changes the
advertised IPv6 address.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, field
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
UNSPECIFIED_V4 = IPv4Address("0.0.0.0")
_IP = TypeVar("_IP", IPv4Address, IPv6Address)

IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
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
    address: IPv4Address  # the interface address in use (flanneld's IfaceAddr); 0.0.0.0: none
    mtu: int
    address6: IPv6Address | None = None  # flanneld's IfaceV6Addr (IPv6 enabled only)


@dataclass(frozen=True)
class _Addr:
    ip: IPv4Address
    flags: int


@dataclass(frozen=True)
class _Addr6:
    ip: IPv6Address
    flags: int


@dataclass
class _Link:
    index: int
    name: str
    mtu: int
    addrs: list[_Addr] = field(default_factory=list)
    addrs6: list[_Addr6] = field(default_factory=list)


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


def usable_addresses6(addrs: list[_Addr6]) -> list[IPv6Address]:
    """flanneld's GetInterfaceIP6Addrs (global or link-local unicast, not deprecated, in its
    order of preference), without tentative or DAD-failed addresses."""
    bad = IFA_F_DEPRECATED | IFA_F_TENTATIVE | IFA_F_DADFAILED
    ok = [
        a
        for a in addrs
        if not a.flags & bad
        and (a.ip.is_link_local or _global_unicast6(a.ip))
        and a.ip.ipv4_mapped is None
    ]
    ok.sort(
        key=lambda a: (
            a.ip.is_link_local,
            not a.flags & IFA_F_PERMANENT,
            bool(a.flags & IFA_F_TEMPORARY),
        )
    )
    return [a.ip for a in ok]


def _first_match(rx: re.Pattern[str], ips: list[_IP]) -> _IP | None:
    """flanneld's matchIP: the first address (in preference order) the regex matches."""
    for ip in ips:
        if rx.search(str(ip)):
            return ip
    return None


def _global_unicast6(ip: IPv6Address) -> bool:
    """Go's net.IP.IsGlobalUnicast for IPv6 (unique-local fd00::/8 included)."""
    return not (ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local)


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
        for msg in ipr.get_addr(family=socket.AF_INET6):
            link = by_index.get(msg["index"])
            raw = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if link is None or raw is None:
                continue
            flags = msg.get_attr("IFA_FLAGS")
            link.addrs6.append(
                _Addr6(IPv6Address(raw.split("%")[0]), msg["flags"] if flags is None else flags)
            )
        #: which families to look up (set by choose)
        self.ipv4, self.ipv6 = True, False
        self.public_ipv6: IPv6Address | None = None

    def _link(self, index: int) -> _Link:
        for link in self.links:
            if link.index == index:
                return link
        raise _Miss(f"no interface with index {index}")

    def _best(
        self,
        link: _Link,
        address: IPv4Address | None = None,
        address6: IPv6Address | None = None,
    ) -> Interface:
        if address is None:
            usable = usable_addresses(link.addrs)
            if usable:
                address = usable[0]
            elif self.ipv4:
                raise _Miss(f"failed to find IPv4 address for interface {link.name}")
            else:  # an IPv6-only network: no IPv4 address needed
                address = UNSPECIFIED_V4
        if address6 is None and self.ipv6:
            usable6 = usable_addresses6(link.addrs6)
            if usable6:
                address6 = usable6[0]
            elif self.public_ipv6 is None:  # -public-ipv6 given: advertised as it is
                raise _Miss(f"failed to find IPv6 address for interface {link.name}")
        if not link.mtu:
            raise _Miss(f"failed to determine MTU for {link.name}")
        return Interface(link.name, link.index, address, link.mtu, address6)

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
                return self.by_ip6(spec, ip)
            ip = ip.ipv4_mapped
        return self.by_ip(spec, ip)

    def by_ip6(self, spec: str, ip: IPv6Address) -> Interface:
        for link in self.links:
            if any(a.ip == ip for a in link.addrs6):
                return self._best(link, None, ip)
        raise _Miss(f"error looking up v6 interface {spec}: no interface with given IPv6 found")

    def by_regex(self, pattern: str) -> Interface:
        if pattern == "":
            return self.default()
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise _Miss(f"could not compile the IP address regex '{pattern}': {exc}") from None
        for link in self.links:
            if not self.ipv4:  # an IPv6-only network: its addresses are IPv6 ones
                for ip6 in usable_addresses6(link.addrs6):
                    if rx.search(str(ip6)):
                        return self._best(link, None, ip6)
                continue
            if self.ipv6:  # dual stack: an address of each family must match
                hit4 = _first_match(rx, usable_addresses(link.addrs))
                hit6 = _first_match(rx, usable_addresses6(link.addrs6))
                if hit4 is not None and hit6 is not None:
                    return self._best(link, hit4, hit6)
                continue
            hit = _first_match(rx, usable_addresses(link.addrs))
            if hit is not None:
                return self._best(link, hit)
        for link in self.links:
            if rx.search(link.name):
                return self._best(link)
        available = ", ".join(
            f"{link.name}:[{' '.join(map(str, self._listed(link)))}]" for link in self.links
        )
        raise _Miss(
            f"could not match pattern {pattern} to any of the available network "
            f"interfaces ({available})"
        )

    def _listed(self, link: _Link) -> list[IPv4Address] | list[IPv6Address]:
        """The addresses flanneld names in its no-match error (IPv6 ones in IPv6-only)."""
        return usable_addresses(link.addrs) if self.ipv4 else usable_addresses6(link.addrs6)

    def can_reach(self, target: str) -> Interface:
        """The interface of the kernel's route to `target` (IPv4 or IPv6), as flanneld's
        GetInterfaceBySpecificIPRouting. The IPv4 address is the route's source when the
        target is IPv4 (else the interface's best IPv4 address); the IPv6 address is always
        the interface's best one, as flanneld leaves IfaceV6Addr to GetInterfaceIP6Addrs."""
        try:
            ip = ipaddress.ip_address(target)
        except ValueError:
            raise _Miss(f"couldn't lookup route to {target!r}: not an IP address") from None
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            routes = self.ipr.route("get", dst=str(ip), family=family)
        except NetlinkError as exc:
            reason = exc.args[1] if len(exc.args) > 1 else exc
            raise _Miss(f"couldn't lookup route to {ip}: {reason}") from None
        for r in routes:
            oif = r.get_attr("RTA_OIF")
            if not oif:
                raise _Miss(f"couldn't lookup route to {ip}: no output interface")
            src = r.get_attr("RTA_PREFSRC") if ip.version == 4 else None
            return self._best(self._link(oif), IPv4Address(src) if src else None)
        raise _Miss("no interface with given IP found")

    def default(self) -> Interface:
        if not self.ipv4:
            return self._best(self._link(self._default_oif(socket.AF_INET6)))
        found = self._best(self._link(self._default_oif(socket.AF_INET)))
        if self.ipv6:  # flanneld's dual stack: both default routes on one interface
            oif6 = self._default_oif(socket.AF_INET6)
            if oif6 != found.index:
                raise _Miss(
                    f"v6 default route interface {self._link(oif6).name} must be the same "
                    f"with v4 default route interface {found.name}"
                )
        return found

    def _default_oif(self, family: int) -> int:
        v6 = " v6" if family == socket.AF_INET6 else ""
        for r in self.ipr.get_routes(family=family, table=MAIN_TABLE):
            if r["dst_len"] != 0:
                continue
            oif = r.get_attr("RTA_OIF")
            if not oif:
                raise _Miss(
                    f"failed to get default{v6} interface: found default{v6} route but could "
                    "not determine interface"
                )
            return int(oif)
        raise _Miss(f"failed to get default{v6} interface: unable to find default{v6} route")


def choose(
    ifaces: list[str],
    regexes: list[str],
    can_reach: str = "",
    public_ip: IPv4Address | None = None,
    *,
    ipv4: bool = True,
    ipv6: bool = False,
    public_ipv6: IPv6Address | None = None,
) -> Interface:
    """The interface and address(es) flanneld would use; InterfaceError (one line) if none.
    `ipv4`/`ipv6` are the network's EnableIPv4/EnableIPv6 (flanneld's IP stack)."""
    try:
        with IPRoute() as ipr:
            host = _Host(ipr)
            host.ipv4, host.ipv6, host.public_ipv6 = ipv4, ipv6, public_ipv6
            if not ifaces and not regexes and not can_reach:
                try:
                    if public_ip is not None:
                        return host.by_ip(str(public_ip), public_ip)
                    if public_ipv6 is not None and ipv6:  # flanneld looks up -public-ipv6 then
                        return host.by_ip6(str(public_ipv6), public_ipv6)
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

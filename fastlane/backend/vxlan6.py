"""The IPv6 half of the `vxlan` backend: flanneld's `flannel-v6.<VNI>` device and its peers.

As flanneld v0.28 (pkg/backend/vxlan: vxlan.go createVXLANDevice, device.go,
vxlan_network.go handleSubnetEvents) when the network has EnableIPv6:

- Device `flannel-v6.<VNI>`: same VNI, port, learning and GBP as `flannel.<VNI>`, local =
  the node's PublicIPv6, dev = the interface, its own random MAC (published as the VtepMAC
  of BackendV6Data), accept_ra 0. flanneld asks for MTU (Backend.MTU or the interface MTU)
  - 50, and the kernel caps a VXLAN device over IPv6 at the underlay MTU - 70 (40-byte
  IPv6 header); the device gets min(Backend.MTU - 50, interface MTU - 70), which is what
  the kernel leaves flanneld's device with. FLANNEL_MTU stays flanneld's (MTU - 50).
- Address: the lease's IPv6 subnet address as a /128 (flanneld's EnsureV6AddressOnLink:
  every other non-link-local IPv6 address on the device is removed), then up.
- Each peer lease with an IPv6 subnet, a PublicIPv6 and BackendV6Data: a permanent
  neighbour `<peer IPv6 subnet address> -> VtepMAC`, an FDB entry `VtepMAC -> PublicIPv6`
  (self, permanent), then `<peer IPv6 subnet> via <its address> dev flannel-v6.<VNI>
  onlink`. With DirectRouting, a peer whose PublicIPv6 is on-link gets `<peer IPv6 subnet>
  via <PublicIPv6>` instead.

Reuse, re-creation, repair and the stale-entry sweep follow the IPv4 device's rules
(fastlane/backend/vxlan.py): only what fastlane or flanneld writes is ever removed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute

from fastlane.backend.base import BackendError
from fastlane.backend.kernel import (
    MAIN_TABLE,
    NUD_PERMANENT,
    RTPROT_BOOT,
    KernelError,
    direct_route,
    netlink_call,
    overlay_routes6,
    owned_routes6,
    vtep_fdb,
    vtep_neigh,
    vtep_route,
)
from fastlane.lease import Lease

if TYPE_CHECKING:
    from fastlane.backend.vxlan import VxlanBackend

log = logging.getLogger("fastlane.backend.vxlan")

IPv6Network = ipaddress.IPv6Network
IPv6Address = ipaddress.IPv6Address

#: outer IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet (14): the kernel's VXLAN6_HEADROOM
ENCAP_OVERHEAD6 = 70
IFA_F_PERMANENT = 0x80


@dataclass(frozen=True)
class Peer6:
    """What we installed for one remote IPv6 subnet."""

    mac: str
    public_ip: IPv6Address
    direct: bool


class V6Vtep:
    """flannel-v6.<VNI>, driven by the VxlanBackend that owns it (all calls on its worker)."""

    def __init__(self, backend: VxlanBackend) -> None:
        self.b = backend
        self.ctx = backend.ctx
        self.ifname = f"flannel-v6.{backend.vni}"
        if len(self.ifname) > 15:
            raise BackendError(
                f"Backend.VNI {backend.vni} is too large for IPv6: device name {self.ifname} "
                "exceeds 15 characters"
            )
        if self.ctx.public_ipv6 is None:
            raise BackendError("vxlan backend: EnableIPv6 is set but this node has no IPv6 address")
        self.local: IPv6Address = self.ctx.public_ipv6
        self.index = 0
        self.mac = ""
        self._peers: dict[IPv6Network, Peer6] = {}

    @property
    def mtu(self) -> int:
        return min(self.b.base_mtu - 50, self.ctx.iface.mtu - ENCAP_OVERHEAD6)

    @property
    def peers(self) -> dict[IPv6Network, Peer6]:
        return self._peers

    # ---- the device -------------------------------------------------------------------

    def _incompatible(self, link) -> str | None:
        """flanneld's vxlanLinksIncompat for the IPv6 device (wanted value first)."""
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "vxlan":
            return f"link type: vxlan vs {kind or 'device'}"
        d = info.get_attr("IFLA_INFO_DATA")
        vni = d.get_attr("IFLA_VXLAN_ID")
        if vni != self.b.vni:
            return f"vni: {self.b.vni} vs {vni}"
        dev = d.get_attr("IFLA_VXLAN_LINK") or 0
        if dev and dev != self.ctx.iface.index:
            return f"vtep (external) interface: {self.ctx.iface.index} vs {dev}"
        local = d.get_attr("IFLA_VXLAN_LOCAL6") or d.get_attr("IFLA_VXLAN_LOCAL")
        if local and local not in ("::", "0.0.0.0"):
            if ":" not in local or IPv6Address(local) != self.local:
                return f"vtep (external) IP: {self.local} vs {local}"
        if d.get_attr("IFLA_VXLAN_L2MISS"):
            return "l2miss: false vs true"
        port = d.get_attr("IFLA_VXLAN_PORT") or 0
        if port and self.b.port_option and port != self.b.port_option:
            return f"port: {self.b.port_option} vs {port}"
        gbp = bool(d.get_attr("IFLA_VXLAN_GBP"))
        if gbp != self.b.gbp:
            return f"gbp: {str(self.b.gbp).lower()} vs {str(gbp).lower()}"
        return None

    def _adopt(self, ipr: IPRoute, link, mac: str) -> None:
        self.index = link["index"]
        self.mac = mac
        d = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        if link.get_attr("IFLA_ADDRESS") != mac:
            netlink_call(
                f"cannot set the MAC of {self.ifname}",
                lambda: ipr.link("set", index=self.index, address=mac),
            )
        if link.get_attr("IFLA_MTU") != self.mtu:
            log.info("%s: mtu %s -> %d", self.ifname, link.get_attr("IFLA_MTU"), self.mtu)
            netlink_call(
                f"cannot set the MTU of {self.ifname}",
                lambda: ipr.link("set", index=self.index, mtu=self.mtu),
            )
        learning = bool(d.get_attr("IFLA_VXLAN_LEARNING"))
        if learning != self.b.learning:
            try:
                netlink_call(
                    f"cannot set learning on {self.ifname}",
                    lambda: ipr.link(
                        "set",
                        index=self.index,
                        kind="vxlan",
                        vxlan_learning=1 if self.b.learning else 0,
                    ),
                )
            except KernelError as exc:
                log.warning("%s; keeping the device with learning %s", exc, learning)
        kept = []
        port = d.get_attr("IFLA_VXLAN_PORT") or 0
        if port and port != self.b.port:
            kept.append(f"dstport {port} (Backend.Port not set)")
        if not (d.get_attr("IFLA_VXLAN_LOCAL6") or d.get_attr("IFLA_VXLAN_LOCAL")):
            kept.append("no local address")
        if not d.get_attr("IFLA_VXLAN_LINK"):
            kept.append("no underlay dev")
        if kept:
            log.warning("reusing %s as flanneld would, with %s", self.ifname, ", ".join(kept))
        log.info("reusing %s (ifindex %d, VtepMAC %s)", self.ifname, self.index, mac)

    def ensure_device(self, ipr: IPRoute) -> None:
        """Create flannel-v6.<VNI>, or reuse/re-create an existing one keeping its MAC."""
        links = ipr.get_links(ifname=self.ifname) if ipr.link_lookup(ifname=self.ifname) else []
        mac = self.mac or None
        if links:
            link = links[0]
            mac = mac or link.get_attr("IFLA_ADDRESS")
            why = self._incompatible(link)
            if why is None:
                self._adopt(ipr, link, mac)
                return
            log.warning(
                "%s already exists with incompatible configuration: %s; recreating device",
                self.ifname,
                why,
            )
            netlink_call(
                f"failed to delete interface {self.ifname}",
                lambda: ipr.link("del", index=link["index"]),
                missing_ok=True,
            )
        spec: dict[str, Any] = dict(
            ifname=self.ifname,
            kind="vxlan",
            vxlan_id=self.b.vni,
            vxlan_link=self.ctx.iface.index,
            vxlan_local6=str(self.local),
            vxlan_learning=1 if self.b.learning else 0,
            mtu=self.mtu,
        )
        if self.b.port_option:
            spec["vxlan_port"] = self.b.port_option
        if self.b.gbp:
            spec["vxlan_gbp"] = True
        if mac:
            spec["address"] = mac
        netlink_call(
            f"failed to create vxlan interface {self.ifname}", lambda: ipr.link("add", **spec)
        )
        link = ipr.get_links(ifname=self.ifname)[0]
        self.index = link["index"]
        self.mac = link.get_attr("IFLA_ADDRESS")
        log.info(
            "created %s: vni %d, local %s dev %s, port %d, mtu %d, VtepMAC %s",
            self.ifname,
            self.b.vni,
            self.local,
            self.ctx.iface.name,
            self.b.port,
            self.mtu,
            self.mac,
        )
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.ifname}/accept_ra", "w") as f:
                f.write("0")
        except OSError:
            pass

    def configure(self, ipr: IPRoute, lease: Lease) -> None:
        """The lease's IPv6 subnet address as a /128 (other non-link-local IPv6 addresses
        go, as flanneld's EnsureV6AddressOnLink), and up."""
        sub = lease.ipv6_subnet
        if sub is None:
            raise KernelError(
                f"failed to configure interface {self.ifname}: IPv6 is enabled but the lease "
                "has no IPv6"
            )
        own = str(sub.network_address)
        for a in ipr.get_addr(family=socket.AF_INET6, index=self.index):
            addr, plen = a.get_attr("IFA_ADDRESS"), a["prefixlen"]
            if addr is None or IPv6Address(addr).is_link_local or (addr, plen) == (own, 128):
                continue
            netlink_call(
                f"failed to remove v6 IP address {addr}/{plen} from {self.ifname}",
                lambda: ipr.addr(
                    "del", index=self.index, address=addr, prefixlen=plen, family=socket.AF_INET6
                ),
                missing_ok=True,
            )
        netlink_call(
            f"failed to ensure v6 address of interface {self.ifname}",
            lambda: ipr.addr(
                "replace", index=self.index, address=own, prefixlen=128, family=socket.AF_INET6
            ),
        )
        netlink_call(
            f"failed to set v6 interface {self.ifname} to UP state",
            lambda: ipr.link("set", index=self.index, state="up"),
        )

    def setup(self, ipr: IPRoute, lease: Lease) -> None:
        if not ipr.link_lookup(ifname=self.ifname):
            self.ensure_device(ipr)
        self.configure(ipr, lease)
        log.info("vxlan backend: %s mtu %d, VtepMAC %s", self.ifname, self.mtu, self.mac)

    # ---- peers ------------------------------------------------------------------------

    def _vxlan_route(self, subnet: IPv6Network) -> dict[str, Any]:
        return vtep_route(self.index, subnet)

    def _direct_route(self, subnet: IPv6Network, gw: IPv6Address) -> dict[str, Any]:
        return direct_route(subnet, gw)

    def _neigh(self, ipr: IPRoute, op: str, subnet: IPv6Network, mac: str) -> None:
        vtep_neigh(ipr, op, self.index, subnet, mac)

    def _fdb(self, ipr: IPRoute, op: str, mac: str, ip: IPv6Address) -> None:
        vtep_fdb(ipr, op, self.index, mac, ip)

    def program(self, ipr: IPRoute, lease: Lease) -> None:
        from fastlane.backend.vxlan import vtep_mac

        sub, ip = lease.ipv6_subnet, lease.attrs.public_ipv6
        if sub is None:
            return
        if not self.b._accepts6(lease) or ip is None:
            if sub in self._peers:
                self.unprogram(ipr, lease)
            return
        mac = vtep_mac(lease.attrs.backend_v6_data)
        if mac is None:
            log.error(
                "error decoding v6 subnet lease JSON for %s: no valid VtepMAC in BackendV6Data %r",
                sub,
                lease.attrs.backend_v6_data,
            )
            if sub in self._peers:
                self.unprogram(ipr, lease)
            return
        want = Peer6(mac, ip, self.b.direct_routing and self.b._on_link(ipr, ip))
        old = self._peers.get(sub)
        if old is not None and old != want and not old.direct:
            if want.direct or (old.mac, old.public_ip) != (want.mac, want.public_ip):
                self._fdb(ipr, "del", old.mac, old.public_ip)
            if want.direct:
                self._neigh(ipr, "del", sub, old.mac)
        if want.direct:
            netlink_call(
                f"Error adding v6 route to {sub} via {ip}",
                lambda: ipr.route("replace", **self._direct_route(sub, ip)),
            )
            log.info("adding v6 direct route to v6 subnet: %s PublicIPv6: %s", sub, ip)
        else:
            self._neigh(ipr, "replace", sub, mac)
            try:
                self._fdb(ipr, "replace", mac, ip)
            except KernelError:
                self._neigh(ipr, "del", sub, mac)
                self._peers.pop(sub, None)
                raise
            try:
                netlink_call(
                    f"failed to add v6 vxlanRoute ({sub} -> {sub.network_address})",
                    lambda: ipr.route("replace", **self._vxlan_route(sub)),
                )
            except KernelError:
                self._neigh(ipr, "del", sub, mac)
                self._fdb(ipr, "del", mac, ip)
                self._peers.pop(sub, None)
                raise
            log.info("adding v6 subnet: %s PublicIPv6: %s VtepMAC: %s", sub, ip, mac)
        if old is not None and old.direct and not want.direct:
            netlink_call(
                f"failed to delete v6 route {sub}",
                lambda: ipr.route("del", **self._direct_route(sub, old.public_ip)),
                missing_ok=True,
            )
        self._peers[sub] = want

    def unprogram(self, ipr: IPRoute, lease: Lease) -> None:
        from fastlane.backend.vxlan import vtep_mac

        sub = lease.ipv6_subnet
        if sub is None:
            return
        peer = self._peers.pop(sub, None)
        if peer is None:
            if lease.attrs.backend_type != self.b.lease_type or lease.attrs.public_ipv6 is None:
                return
            mac = vtep_mac(lease.attrs.backend_v6_data)
            if mac is None:
                return
            peer = Peer6(mac, lease.attrs.public_ipv6, False)
        errors = []
        route = self._direct_route(sub, peer.public_ip) if peer.direct else self._vxlan_route(sub)
        steps = [
            lambda: netlink_call(
                f"failed to delete v6 vxlanRoute {sub}",
                lambda: ipr.route("del", **route),
                missing_ok=True,
            )
        ]
        if not peer.direct:
            steps = [
                lambda: self._neigh(ipr, "del", sub, peer.mac),
                lambda: self._fdb(ipr, "del", peer.mac, peer.public_ip),
            ] + steps
        for step in steps:
            try:
                step()
            except KernelError as exc:
                errors.append(str(exc))
        log.info("removing v6subnet: %s PublicIPv6: %s VtepMAC: %s", sub, peer.public_ip, peer.mac)
        if errors:
            raise KernelError("; ".join(errors))

    # ---- keeping the kernel state -----------------------------------------------------

    def _device_ok(self, ipr: IPRoute) -> bool:
        links = ipr.get_links(ifname=self.ifname) if ipr.link_lookup(ifname=self.ifname) else []
        if not links:
            return False
        link = links[0]
        if link["index"] != self.index or self._incompatible(link) is not None:
            return False
        if link.get_attr("IFLA_ADDRESS") != self.mac:
            log.warning("%s: MAC changed; setting VtepMAC %s back", self.ifname, self.mac)
            self.b._counts["repairs"] += 1
            netlink_call(
                f"cannot set the MAC of {self.ifname}",
                lambda: ipr.link("set", index=self.index, address=self.mac),
            )
        return True

    def reconcile(self, ipr: IPRoute, lease: Lease, leases: list[Lease]) -> None:
        counts = self.b._counts
        if not self._device_ok(ipr):
            log.warning(
                "%s is missing or was changed; re-creating it (VtepMAC %s)", self.ifname, self.mac
            )
            counts["repairs"] += 1
            self.ensure_device(ipr)
            self.configure(ipr, lease)
            self._peers.clear()
            for held in leases:
                try:
                    self.program(ipr, held)
                except KernelError as exc:
                    counts["netlink_errors"] += 1
                    log.error("%s", exc)
            return
        assert lease.ipv6_subnet is not None
        own = (str(lease.ipv6_subnet.network_address), 128)
        up = ipr.get_links(self.index)[0]
        addrs = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(family=socket.AF_INET6, index=self.index)
        }
        if own not in addrs or not up["flags"] & 1:
            log.warning("%s lost its address or is down; fixing", self.ifname)
            counts["repairs"] += 1
            self.configure(ipr, lease)
        neigh = {
            n.get_attr("NDA_DST")
            for n in ipr.get_neighbours(ifindex=self.index, family=socket.AF_INET6)
            if n["state"] & NUD_PERMANENT
        }
        fdb = {
            (f.get_attr("NDA_LLADDR"), f.get_attr("NDA_DST"))
            for f in ipr.fdb("dump", ifindex=self.index)
        }
        routes = {
            r.get_attr("RTA_DST")
            for r in ipr.get_routes(family=socket.AF_INET6, oif=self.index, table=MAIN_TABLE)
        }
        direct = (
            overlay_routes6(ipr, self.ctx.iface.index, self.ctx.config)
            if self.b.direct_routing
            else {}
        )
        by_subnet = {held.ipv6_subnet: held for held in leases if held.ipv6_subnet is not None}
        for sub, peer in list(self._peers.items()):
            dst = str(sub.network_address)
            if peer.direct:
                if direct.get(sub) == peer.public_ip:
                    continue
            elif dst in neigh and (peer.mac, str(peer.public_ip)) in fdb and dst in routes:
                continue
            missing = by_subnet.get(sub)
            if missing is None:
                continue
            log.warning("entries for %s went missing; re-adding them", sub)
            counts["repairs"] += 1
            self._peers.pop(sub, None)
            self.program(ipr, missing)

    def _vtep_neighbour(self, dst: str | None) -> bool:
        """A neighbour flanneld writes: the first address of an IPv6SubnetLen subnet of
        IPv6Network."""
        network, plen = self.ctx.config.ipv6_network, self.ctx.config.ipv6_subnet_len
        if dst is None or network is None:
            return False
        try:
            addr = IPv6Address(dst)
        except ValueError:
            return False
        return addr in network and IPv6Network((addr, plen), strict=False).network_address == addr

    def sweep(self, ipr: IPRoute, lease: Lease | None, leases: list[Lease]) -> None:
        """Remove what vanished IPv6 leases left behind, as the IPv4 sweep does."""
        cfg, counts = self.ctx.config, self.b._counts
        encap = {s: p for s, p in self._peers.items() if not p.direct}
        want_dst = {str(s.network_address) for s in encap}
        want_fdb = {(p.mac, str(p.public_ip)) for p in encap.values()}
        own = lease.ipv6_subnet if lease else None
        for net, gw in owned_routes6(ipr, self.index, cfg).items():
            dst = str(net.network_address)
            if gw != net.network_address or dst in want_dst or net == own:
                continue
            counts["swept"] += 1
            log.info("removing stale route %s via %s on %s", net, gw, self.ifname)
            netlink_call(
                f"cannot delete stale route {net}",
                lambda: ipr.route("del", **self._vxlan_route(net)),
                missing_ok=True,
            )
        if self.b.direct_routing:
            for net, gw in owned_routes6(ipr, self.ctx.iface.index, cfg).items():
                peer = self._peers.get(net)
                if (peer is not None and peer.direct) or net == own:
                    continue
                counts["swept"] += 1
                log.info("removing stale route %s via %s on %s", net, gw, self.ctx.iface.name)
                netlink_call(
                    f"cannot delete stale route {net}",
                    lambda: ipr.route(
                        "del",
                        family=socket.AF_INET6,
                        dst=str(net.network_address),
                        dst_len=net.prefixlen,
                        gateway=str(gw),
                        oif=self.ctx.iface.index,
                        table=MAIN_TABLE,
                        proto=RTPROT_BOOT,
                    ),
                    missing_ok=True,
                )
        vteps = {p.mac for p in encap.values()}
        for n in ipr.get_neighbours(ifindex=self.index, family=socket.AF_INET6):
            dst = n.get_attr("NDA_DST")
            if not n["state"] & NUD_PERMANENT or not self._vtep_neighbour(dst):
                continue
            if n.get_attr("NDA_LLADDR"):
                vteps.add(n.get_attr("NDA_LLADDR"))
            if dst in want_dst:
                continue
            counts["swept"] += 1
            log.info("removing stale neighbour %s on %s", dst, self.ifname)
            netlink_call(
                f"cannot delete stale neighbour {dst}",
                lambda: ipr.neigh("del", family=socket.AF_INET6, dst=dst, ifindex=self.index),
                missing_ok=True,
            )
        peer_ips = {
            str(held.attrs.public_ipv6)
            for held in leases
            if held.attrs.backend_type == self.b.lease_type and held.attrs.public_ipv6 is not None
        }
        for f in ipr.fdb("dump", ifindex=self.index):
            mac, dst = f.get_attr("NDA_LLADDR"), f.get_attr("NDA_DST")
            if f["ifindex"] != self.index or dst is None or mac is None or (mac, dst) in want_fdb:
                continue
            if not f["state"] & NUD_PERMANENT or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
                continue
            if mac not in vteps and dst not in peer_ips:
                continue
            counts["swept"] += 1
            log.info("removing stale fdb entry %s -> %s on %s", mac, dst, self.ifname)
            netlink_call(
                f"cannot delete stale fdb entry {mac}",
                lambda: ipr.fdb("del", ifindex=self.index, lladdr=mac, dst=dst),
                missing_ok=True,
            )

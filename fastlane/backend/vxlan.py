"""`vxlan`: the kernel's VXLAN device, programmed per peer exactly as flanneld does.

Device `flannel.<VNI>`: local = the interface address, dev = the interface, learning
off, MTU = (Backend.MTU or the interface MTU) - 50, the lease's network address as a
/32, up. For each peer lease of type vxlan, in this order (so the kernel never ARPs for
the gateway): a permanent neighbour `<peer>.0 -> VtepMAC`, an FDB entry `VtepMAC ->
PublicIP` (self, permanent), then `ip route replace <peer subnet> via <peer>.0 dev
flannel.<VNI> onlink`. With DirectRouting, a peer on the same L2 segment gets a plain
route via its PublicIP instead.

The VtepMAC is the device's MAC. An existing device is reused when its settings fit,
and otherwise re-created with the same MAC (flanneld picks a new random one there):
peers keep valid neighbour/FDB entries for us across restarts and repairs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from fastlane.backend.base import BackendError, bool_option, int_option
from fastlane.backend.kernel import (
    MAIN_TABLE, RTPROT_BOOT, KernelBackend, KernelError, netlink_call, overlay_routes,
)
from fastlane.lease import Lease

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

DEFAULT_VNI = 1
#: The kernel's default VXLAN port (Linux predates IANA's 4789); Backend.Port 0 means it.
KERNEL_DEFAULT_PORT = 8472
#: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
ENCAP_OVERHEAD = 50

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-])(?:[0-9a-f]{2}\1){4}[0-9a-f]{2}$")
_MAC_DOTTED = re.compile(r"^[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}$")


def parse_mac(text: Any) -> str | None:
    """A 6-byte MAC in the forms Go's net.ParseMAC accepts, as aa:bb:cc:dd:ee:ff."""
    if not isinstance(text, str):
        return None
    t = text.strip().lower()
    if _MAC_RE.match(t):
        return t.replace("-", ":")
    if _MAC_DOTTED.match(t):
        h = t.replace(".", "")
        return ":".join(h[i:i + 2] for i in range(0, 12, 2))
    return None


def vtep_mac(backend_data: Any) -> str | None:
    """VtepMAC from a lease's BackendData (keys case-insensitive, as Go decodes them)."""
    if not isinstance(backend_data, dict):
        return None
    for key, value in backend_data.items():
        if key.lower() == "vtepmac":
            return parse_mac(value)
    return None


@dataclass(frozen=True)
class Peer:
    """What we installed for one remote subnet."""
    mac: str
    public_ip: IPv4Address
    direct: bool


class VxlanBackend(KernelBackend):
    lease_type = "vxlan"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.vni = int_option(cfg, "VNI", DEFAULT_VNI, 0, (1 << 24) - 1)
        self.port = int_option(cfg, "Port", 0, 0, 65535) or KERNEL_DEFAULT_PORT
        self.base_mtu = int_option(cfg, "MTU", ctx.iface.mtu, 68 + ENCAP_OVERHEAD, 65535)
        self.gbp = bool_option(cfg, "GBP")
        self.learning = bool_option(cfg, "Learning")
        self.direct_routing = bool_option(cfg, "DirectRouting")
        self.ifname = f"flannel.{self.vni}"
        if len(self.ifname) > 15:
            raise BackendError(f"Backend.VNI {self.vni} is too large: device name {self.ifname} exceeds 15 characters")
        self.index = 0
        self.mac = ""
        self._peers: dict[IPv4Network, Peer] = {}

    @property
    def mtu(self) -> int:
        return self.base_mtu - ENCAP_OVERHEAD

    # ---- the device -------------------------------------------------------------------

    def _incompatible(self, link) -> str | None:
        """Why an existing device cannot be reused (flanneld's vxlanLinksIncompat, plus learning)."""
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "vxlan":
            return f"link type: {kind} vs vxlan"
        d = info.get_attr("IFLA_INFO_DATA")
        vni = d.get_attr("IFLA_VXLAN_ID")
        if vni != self.vni:
            return f"vni: {vni} vs {self.vni}"
        dev = d.get_attr("IFLA_VXLAN_LINK") or 0
        if dev and dev != self.ctx.iface.index:
            return f"vtep (external) interface: {dev} vs {self.ctx.iface.index}"
        local = d.get_attr("IFLA_VXLAN_LOCAL")
        if local and IPv4Address(local) != self.ctx.iface.address:
            return f"vtep (external) IP: {local} vs {self.ctx.iface.address}"
        group = d.get_attr("IFLA_VXLAN_GROUP")
        if group and group != "0.0.0.0":
            return f"group address: {group} vs none"
        if d.get_attr("IFLA_VXLAN_L2MISS"):
            return "l2miss: true vs false"
        port = d.get_attr("IFLA_VXLAN_PORT") or 0
        if port and port != self.port:
            return f"port: {port} vs {self.port}"
        gbp = bool(d.get_attr("IFLA_VXLAN_GBP"))
        if gbp != self.gbp:
            return f"gbp: {gbp} vs {self.gbp}"
        learning = bool(d.get_attr("IFLA_VXLAN_LEARNING"))
        if learning != self.learning:
            return f"learning: {learning} vs {self.learning}"
        return None

    def _ensure_device(self, ipr: IPRoute) -> None:
        """Create flannel.<VNI>, or reuse/re-create an existing one keeping its MAC."""
        links = ipr.get_links(ifname=self.ifname) if ipr.link_lookup(ifname=self.ifname) else []
        mac = self.mac or None
        if links:
            link = links[0]
            mac = mac or link.get_attr("IFLA_ADDRESS")
            why = self._incompatible(link)
            if why is None:
                self.index = link["index"]
                self.mac = mac
                if link.get_attr("IFLA_ADDRESS") != mac:
                    netlink_call(f"cannot set the MAC of {self.ifname}",
                                 lambda: ipr.link("set", index=self.index, address=mac))
                if link.get_attr("IFLA_MTU") != self.mtu:
                    netlink_call(f"cannot set the MTU of {self.ifname}",
                                 lambda: ipr.link("set", index=self.index, mtu=self.mtu))
                log.info("reusing %s (VtepMAC %s)", self.ifname, mac)
                return
            log.warning("%s already exists with incompatible configuration: %s; recreating device",
                        self.ifname, why)
            netlink_call(f"failed to delete interface {self.ifname}",
                         lambda: ipr.link("del", index=link["index"]), missing_ok=True)
        spec: dict[str, Any] = dict(
            ifname=self.ifname, kind="vxlan", vxlan_id=self.vni, vxlan_link=self.ctx.iface.index,
            vxlan_local=str(self.ctx.iface.address), vxlan_port=self.port,
            vxlan_learning=1 if self.learning else 0, mtu=self.mtu,
        )
        if self.gbp:
            spec["vxlan_gbp"] = True
        if mac:
            spec["address"] = mac
        netlink_call(f"failed to create vxlan interface {self.ifname}", lambda: ipr.link("add", **spec))
        link = ipr.get_links(ifname=self.ifname)[0]
        self.index = link["index"]
        self.mac = link.get_attr("IFLA_ADDRESS")
        log.info("created %s: vni %d, local %s dev %s, port %d, mtu %d, VtepMAC %s",
                 self.ifname, self.vni, self.ctx.iface.address, self.ctx.iface.name, self.port,
                 self.mtu, self.mac)
        try:  # as flanneld: no IPv6 autoconfiguration on the overlay device
            with open(f"/proc/sys/net/ipv6/conf/{self.ifname}/accept_ra", "w") as f:
                f.write("0")
        except OSError:
            pass

    def _configure(self, ipr: IPRoute, lease: Lease) -> None:
        """Exactly one IPv4 address, the lease's .0 as a /32 (no broadcast routes), and up."""
        own = str(lease.subnet.network_address)
        for a in ipr.get_addr(family=socket.AF_INET, index=self.index):
            addr, plen = a.get_attr("IFA_ADDRESS"), a["prefixlen"]
            if (addr, plen) != (own, 32):
                netlink_call(f"cannot remove {addr}/{plen} from {self.ifname}",
                             lambda: ipr.addr("del", index=self.index, address=addr, prefixlen=plen),
                             missing_ok=True)
        netlink_call(f"failed to ensure address of interface {self.ifname}",
                     lambda: ipr.addr("replace", index=self.index, address=own, prefixlen=32))
        netlink_call(f"failed to set interface {self.ifname} to UP state",
                     lambda: ipr.link("set", index=self.index, state="up"))

    async def prepare(self) -> dict[str, Any]:
        def job() -> None:
            with IPRoute() as ipr:
                self._ensure_device(ipr)

        try:
            await asyncio.to_thread(job)
        except KernelError as exc:
            raise BackendError(str(exc)) from None
        # flanneld's lease struct holds VNI as uint16: write what it would write.
        return {"VNI": self.vni & 0xFFFF, "VtepMAC": self.mac}

    def _setup(self, ipr: IPRoute, lease: Lease) -> None:
        if not ipr.link_lookup(ifname=self.ifname):
            self._ensure_device(ipr)  # deleted between prepare and start
        self._configure(ipr, lease)
        log.info("vxlan backend: %s mtu %d, VtepMAC %s, port %d%s", self.ifname, self.mtu, self.mac,
                 self.port, ", direct routing" if self.direct_routing else "")

    # ---- peers ------------------------------------------------------------------------

    def _vxlan_route(self, subnet: IPv4Network) -> dict[str, Any]:
        return dict(dst=str(subnet.network_address), dst_len=subnet.prefixlen,
                    gateway=str(subnet.network_address), oif=self.index, flags=RTNH_F_ONLINK,
                    table=MAIN_TABLE, proto=RTPROT_BOOT)

    def _direct_route(self, subnet: IPv4Network, gw: IPv4Address) -> dict[str, Any]:
        return dict(dst=str(subnet.network_address), dst_len=subnet.prefixlen, gateway=str(gw),
                    table=MAIN_TABLE, proto=RTPROT_BOOT)

    def _on_link(self, ipr: IPRoute, ip: IPv4Address) -> bool:
        """flanneld's ip.DirectRouting: the kernel reaches ip without a gateway."""
        try:
            routes = ipr.route("get", dst=str(ip))
        except Exception:
            return False
        return bool(routes) and routes[0].get_attr("RTA_GATEWAY") is None

    def _neigh(self, ipr: IPRoute, op: str, subnet: IPv4Network, mac: str) -> None:
        dst = str(subnet.network_address)
        if op == "replace":
            netlink_call(f"AddARP failed for {dst} -> {mac}",
                         lambda: ipr.neigh("replace", dst=dst, lladdr=mac, ifindex=self.index,
                                           state=NUD_PERMANENT))
        else:
            netlink_call(f"DelARP failed for {dst}",
                         lambda: ipr.neigh("del", dst=dst, ifindex=self.index), missing_ok=True)

    def _fdb(self, ipr: IPRoute, op: str, mac: str, ip: IPv4Address) -> None:
        if op == "replace":
            netlink_call(f"AddFDB failed for {mac} -> {ip}",
                         lambda: ipr.fdb("replace", ifindex=self.index, lladdr=mac, dst=str(ip),
                                         state=NUD_PERMANENT, flags=NTF_SELF))
        else:
            netlink_call(f"DelFDB failed for {mac} -> {ip}",
                         lambda: ipr.fdb("del", ifindex=self.index, lladdr=mac, dst=str(ip)),
                         missing_ok=True)

    def _program(self, ipr: IPRoute, lease: Lease) -> None:
        subnet, ip = lease.subnet, lease.attrs.public_ip
        if not self._accepts(lease):
            if subnet in self._peers:  # it switched backend type: drop what we installed
                self._unprogram(ipr, lease)
            return
        mac = vtep_mac(lease.attrs.backend_data)
        if mac is None:
            log.error("error decoding subnet lease JSON for %s: no valid VtepMAC in BackendData %r",
                      subnet, lease.attrs.backend_data)
            if subnet in self._peers:
                self._unprogram(ipr, lease)
            return
        want = Peer(mac, ip, self.direct_routing and self._on_link(ipr, ip))
        old = self._peers.get(subnet)
        if old is not None and old != want and not old.direct:
            # Replace-operations overwrite the route and the neighbour; a stale FDB
            # entry (old MAC) or a neighbour no longer wanted must go explicitly.
            if want.direct or (old.mac, old.public_ip) != (want.mac, want.public_ip):
                self._fdb(ipr, "del", old.mac, old.public_ip)
            if want.direct:
                self._neigh(ipr, "del", subnet, old.mac)
        if want.direct:
            netlink_call(f"Error adding route to {subnet} via {ip}",
                         lambda: ipr.route("replace", **self._direct_route(subnet, ip)))
            log.info("adding direct route to subnet: %s PublicIP: %s", subnet, ip)
        else:
            self._neigh(ipr, "replace", subnet, mac)
            try:
                self._fdb(ipr, "replace", mac, ip)
            except KernelError:
                self._neigh(ipr, "del", subnet, mac)
                self._peers.pop(subnet, None)
                raise
            try:
                netlink_call(f"failed to add vxlanRoute ({subnet} -> {subnet.network_address})",
                             lambda: ipr.route("replace", **self._vxlan_route(subnet)))
            except KernelError:
                self._neigh(ipr, "del", subnet, mac)
                self._fdb(ipr, "del", mac, ip)
                self._peers.pop(subnet, None)
                raise
            log.info("adding subnet: %s PublicIP: %s VtepMAC: %s", subnet, ip, mac)
        self._peers[subnet] = want
        self._counts["peers"] = len(self._peers)

    def _unprogram(self, ipr: IPRoute, lease: Lease) -> None:
        subnet = lease.subnet
        peer = self._peers.pop(subnet, None)
        self._counts["peers"] = len(self._peers)
        if peer is None:
            if lease.attrs.backend_type != self.lease_type:
                return
            mac = vtep_mac(lease.attrs.backend_data)
            if mac is None:
                return
            peer = Peer(mac, lease.attrs.public_ip, False)
        # Try to remove every entry; one failing does not stop the others.
        errors = []
        steps = [lambda: netlink_call(
            f"failed to delete route {subnet}",
            lambda: ipr.route("del", **(self._direct_route(subnet, peer.public_ip) if peer.direct
                                        else self._vxlan_route(subnet))),
            missing_ok=True)]
        if not peer.direct:
            steps = [lambda: self._neigh(ipr, "del", subnet, peer.mac),
                     lambda: self._fdb(ipr, "del", peer.mac, peer.public_ip)] + steps
        for step in steps:
            try:
                step()
            except KernelError as exc:
                errors.append(str(exc))
        log.info("removing subnet: %s PublicIP: %s VtepMAC: %s", subnet, peer.public_ip, peer.mac)
        if errors:
            raise KernelError("; ".join(errors))

    # ---- keeping the kernel state -----------------------------------------------------

    def _device_ok(self, ipr: IPRoute) -> bool:
        links = ipr.get_links(ifname=self.ifname) if ipr.link_lookup(ifname=self.ifname) else []
        if not links:
            return False
        link = links[0]
        return (link["index"] == self.index and self._incompatible(link) is None
                and link.get_attr("IFLA_ADDRESS") == self.mac)

    def _reconcile(self, ipr: IPRoute, leases: list[Lease]) -> None:
        if self.lease is None:
            return
        if not self._device_ok(ipr):
            # flanneld re-creates a deleted device too; everything on it went with it.
            log.warning("%s is missing or was changed; re-creating it (VtepMAC %s)", self.ifname, self.mac)
            self._counts["repairs"] += 1
            self._ensure_device(ipr)
            self._configure(ipr, self.lease)
            self._peers.clear()
            for lease in leases:
                try:
                    self._program(ipr, lease)
                except KernelError as exc:
                    self._counts["netlink_errors"] += 1
                    log.error("%s", exc)
            return
        up = ipr.get_links(self.index)[0]
        own = (str(self.lease.subnet.network_address), 32)
        addrs = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                 for a in ipr.get_addr(family=socket.AF_INET, index=self.index)}
        if own not in addrs or not up["flags"] & 1:  # IFF_UP
            log.warning("%s lost its address or is down; fixing", self.ifname)
            self._counts["repairs"] += 1
            self._configure(ipr, self.lease)
        # Entries someone deleted by hand: re-program those peers.
        neigh = {n.get_attr("NDA_DST") for n in ipr.get_neighbours(ifindex=self.index, family=socket.AF_INET)
                 if n["state"] & NUD_PERMANENT}
        fdb = {(f.get_attr("NDA_LLADDR"), f.get_attr("NDA_DST")) for f in ipr.fdb("dump", ifindex=self.index)}
        routes = {r.get_attr("RTA_DST") for r in
                  ipr.get_routes(family=socket.AF_INET, oif=self.index, table=MAIN_TABLE)}
        direct = overlay_routes(ipr, self.ctx.iface.index, self.ctx.config) if self.direct_routing else {}
        by_subnet = {l.subnet: l for l in leases}
        for subnet, peer in list(self._peers.items()):
            dst = str(subnet.network_address)
            if peer.direct:
                if direct.get(subnet) == peer.public_ip:
                    continue
            elif dst in neigh and (peer.mac, str(peer.public_ip)) in fdb and dst in routes:
                continue
            lease = by_subnet.get(subnet)
            if lease is None:
                continue
            log.warning("entries for %s went missing; re-adding them", subnet)
            self._counts["repairs"] += 1
            self._peers.pop(subnet, None)
            self._program(ipr, lease)

    def _sweep(self, ipr: IPRoute, leases: list[Lease]) -> None:
        """Remove neighbour/FDB/route entries on our device that no current lease explains."""
        want_dst = {str(s.network_address) for s, p in self._peers.items() if not p.direct}
        want_fdb = {(p.mac, str(p.public_ip)) for p in self._peers.values() if not p.direct}
        own = str(self.lease.subnet.network_address) if self.lease else None
        for r in ipr.get_routes(family=socket.AF_INET, oif=self.index, table=MAIN_TABLE):
            dst, gw = r.get_attr("RTA_DST"), r.get_attr("RTA_GATEWAY")
            if dst is None or gw is None or dst in want_dst or dst == own:
                continue
            self._counts["swept"] += 1
            log.info("removing stale route %s/%d via %s on %s", dst, r["dst_len"], gw, self.ifname)
            netlink_call(f"cannot delete stale route {dst}/{r['dst_len']}",
                         lambda: ipr.route("del", dst=dst, dst_len=r["dst_len"], gateway=gw,
                                           oif=self.index, table=MAIN_TABLE), missing_ok=True)
        # Direct routes (DirectRouting, or left by a host-gw run) for subnets nobody holds.
        for net, gw in overlay_routes(ipr, self.ctx.iface.index, self.ctx.config).items():
            peer = self._peers.get(net)
            if (peer is not None and peer.direct) or str(net.network_address) == own:
                continue
            self._counts["swept"] += 1
            log.info("removing stale route %s via %s on %s", net, gw, self.ctx.iface.name)
            netlink_call(f"cannot delete stale route {net}",
                         lambda: ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen,
                                           gateway=str(gw), oif=self.ctx.iface.index, table=MAIN_TABLE),
                         missing_ok=True)
        for n in ipr.get_neighbours(ifindex=self.index, family=socket.AF_INET):
            dst = n.get_attr("NDA_DST")
            if not n["state"] & NUD_PERMANENT or dst in want_dst:
                continue
            self._counts["swept"] += 1
            log.info("removing stale neighbour %s on %s", dst, self.ifname)
            netlink_call(f"cannot delete stale neighbour {dst}",
                         lambda: ipr.neigh("del", dst=dst, ifindex=self.index), missing_ok=True)
        for f in ipr.fdb("dump", ifindex=self.index):
            mac, dst = f.get_attr("NDA_LLADDR"), f.get_attr("NDA_DST")
            if f["ifindex"] != self.index or dst is None or (mac, dst) in want_fdb:
                continue
            self._counts["swept"] += 1
            log.info("removing stale fdb entry %s -> %s on %s", mac, dst, self.ifname)
            netlink_call(f"cannot delete stale fdb entry {mac}",
                         lambda: ipr.fdb("del", ifindex=self.index, lladdr=mac, dst=dst), missing_ok=True)

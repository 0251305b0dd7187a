"""`vxlan`: the kernel's VXLAN device, programmed per peer exactly as flanneld does.

Device `flannel.<VNI>`: local = the public IP (flanneld v0.28: `-public-ip`, else the
interface address), dev = the interface, learning off, MTU = (Backend.MTU or the
interface MTU) - 50, the lease's network address as a /32, up. For each peer lease of
type vxlan, in this order (so the kernel never ARPs for the gateway): a permanent
neighbour `<peer>.0 -> VtepMAC`, an FDB entry `VtepMAC -> PublicIP` (self, permanent),
then `ip route replace <peer subnet> via <peer>.0 dev flannel.<VNI> onlink`. With
DirectRouting, a peer on the same L2 segment gets a plain route via its PublicIP instead.

An existing device is reused unless flanneld (device.go, vxlanLinksIncompat) would
re-create it: another link type, VNI, underlay device, local address, L2miss, GBP, or
a Port set in the config that differs. Everything else is tolerated and the device
keeps its ifindex: a different MTU or learning flag is corrected in place (flanneld
leaves them), a different dstport with Backend.Port unset, a remote/group or a missing
local/dev are kept as they are, with a warning. The VtepMAC is the device's MAC; a
re-created device keeps it (flanneld picks a new random one there), so peers keep valid
neighbour/FDB entries for us across restarts and repairs.

With EnableIPv6 the IPv6 device `flannel-v6.<VNI>` and its peers are kept alongside
(fastlane/backend/vxlan6.py); an IPv6-only network (EnableIPv4 false) has no
`flannel.<VNI>` at all and publishes only BackendV6Data, as flanneld.
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
    MAIN_TABLE,
    NUD_PERMANENT,
    RTPROT_BOOT,
    KernelBackend,
    KernelError,
    direct_route,
    netlink_call,
    overlay_routes,
    owned_routes,
    vtep_fdb,
    vtep_neigh,
    vtep_route,
)
from fastlane.backend.vxlan6 import V6Vtep
from fastlane.lease import Lease

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

DEFAULT_VNI = 1
#: The kernel's default VXLAN port (Linux predates IANA's 4789); Backend.Port 0 means it.
KERNEL_DEFAULT_PORT = 8472
#: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
ENCAP_OVERHEAD = 50


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
        return ":".join(h[i : i + 2] for i in range(0, 12, 2))
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
        #: Backend.Port as configured; 0 = the kernel's default, and any dstport is accepted
        #: on an existing device (flanneld compares ports only when both are set).
        self.port_option = int_option(cfg, "Port", 0, 0, 65535)
        self.port = self.port_option or KERNEL_DEFAULT_PORT
        self.base_mtu = int_option(cfg, "MTU", ctx.iface.mtu, 68 + ENCAP_OVERHEAD, 65535)
        self.gbp = bool_option(cfg, "GBP")
        self.learning = bool_option(cfg, "Learning")
        self.direct_routing = bool_option(cfg, "DirectRouting")
        self.ifname = f"flannel.{self.vni}"
        if len(self.ifname) > 15:
            raise BackendError(
                f"Backend.VNI {self.vni} is too large: device name {self.ifname} exceeds 15 characters"
            )
        self.index = 0
        self.mac = ""
        self._peers: dict[IPv4Network, Peer] = {}
        self.v4 = cfg.enable_ipv4
        self.v6: V6Vtep | None = V6Vtep(self) if cfg.enable_ipv6 else None

    @property
    def mtu(self) -> int:
        return self.base_mtu - ENCAP_OVERHEAD

    # ---- the device -------------------------------------------------------------------

    @property
    def local(self) -> IPv4Address:
        """The device's local address: flanneld v0.28 uses ExtAddr (the public IP)."""
        return self.ctx.public_ip

    def _incompatible(self, link) -> str | None:
        """Why flanneld would delete and re-create this device (its vxlanLinksIncompat,
        with its message: wanted value first, then the existing device's).

        Attributes are compared only where flanneld compares them: the underlay device,
        the local address and the port only when both sides have one; no group is ever
        wanted, so an existing group/remote never counts; learning, MTU, TTL, ageing,
        L3miss and the rest are not compared at all.
        """
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "vxlan":
            return f"link type: vxlan vs {kind or 'device'}"
        d = info.get_attr("IFLA_INFO_DATA")
        vni = d.get_attr("IFLA_VXLAN_ID")
        if vni != self.vni:
            return f"vni: {self.vni} vs {vni}"
        dev = d.get_attr("IFLA_VXLAN_LINK") or 0
        if dev and dev != self.ctx.iface.index:
            return f"vtep (external) interface: {self.ctx.iface.index} vs {dev}"
        local = d.get_attr("IFLA_VXLAN_LOCAL")
        if local and IPv4Address(local) != self.local:
            return f"vtep (external) IP: {self.local} vs {local}"
        if d.get_attr("IFLA_VXLAN_L2MISS"):
            return "l2miss: false vs true"
        port = d.get_attr("IFLA_VXLAN_PORT") or 0
        if port and self.port_option and port != self.port_option:
            return f"port: {self.port_option} vs {port}"
        gbp = bool(d.get_attr("IFLA_VXLAN_GBP"))
        if gbp != self.gbp:
            return f"gbp: {str(self.gbp).lower()} vs {str(gbp).lower()}"
        return None

    def _adopt(self, ipr: IPRoute, link, mac: str) -> None:
        """Keep a compatible existing device (same ifindex). MAC, MTU and learning are set
        in place; the other tolerated differences are only named in a warning."""
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
        if learning != self.learning:
            try:
                netlink_call(
                    f"cannot set learning on {self.ifname}",
                    lambda: ipr.link(
                        "set",
                        index=self.index,
                        kind="vxlan",
                        vxlan_learning=1 if self.learning else 0,
                    ),
                )
                log.info("%s: learning %s -> %s", self.ifname, learning, self.learning)
            except KernelError as exc:  # an old kernel without changelink: keep the device
                log.warning("%s; keeping the device with learning %s", exc, learning)
        kept = []
        port = d.get_attr("IFLA_VXLAN_PORT") or 0
        if port and port != self.port:
            kept.append(f"dstport {port} (Backend.Port not set)")
        group = d.get_attr("IFLA_VXLAN_GROUP")
        if group and group != "0.0.0.0":
            kept.append(f"remote/group {group}")
        if not d.get_attr("IFLA_VXLAN_LOCAL"):
            kept.append("no local address")
        if not d.get_attr("IFLA_VXLAN_LINK"):
            kept.append("no underlay dev")
        if kept:
            log.warning("reusing %s as flanneld would, with %s", self.ifname, ", ".join(kept))
        log.info("reusing %s (ifindex %d, VtepMAC %s)", self.ifname, self.index, mac)

    def _ensure_device(self, ipr: IPRoute) -> None:
        """Create flannel.<VNI>, or reuse/re-create an existing one keeping its MAC."""
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
            vxlan_id=self.vni,
            vxlan_link=self.ctx.iface.index,
            vxlan_local=str(self.local),
            vxlan_learning=1 if self.learning else 0,
            mtu=self.mtu,
        )
        if self.port_option:  # as flanneld: no port attribute means the kernel's 8472
            spec["vxlan_port"] = self.port_option
        if self.gbp:
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
            self.vni,
            self.local,
            self.ctx.iface.name,
            self.port,
            self.mtu,
            self.mac,
        )
        try:  # as flanneld: no IPv6 autoconfiguration on the overlay device
            with open(f"/proc/sys/net/ipv6/conf/{self.ifname}/accept_ra", "w") as f:
                f.write("0")
        except OSError:
            pass

    def _configure(self, ipr: IPRoute, lease: Lease) -> None:
        """The lease's .0 as a /32 (no broadcast routes), and up. Like flanneld's
        EnsureV4AddressOnLink, other addresses are removed only if they lie in the Network."""
        own = str(lease.subnet4.network_address)
        network = self.ctx.config.network
        for a in ipr.get_addr(family=socket.AF_INET, index=self.index):
            addr, plen = a.get_attr("IFA_ADDRESS"), a["prefixlen"]
            if (addr, plen) != (own, 32) and network is not None and IPv4Address(addr) in network:
                netlink_call(
                    f"cannot remove {addr}/{plen} from {self.ifname}",
                    lambda: ipr.addr("del", index=self.index, address=addr, prefixlen=plen),
                    missing_ok=True,
                )
        netlink_call(
            f"failed to ensure address of interface {self.ifname}",
            lambda: ipr.addr("replace", index=self.index, address=own, prefixlen=32),
        )
        netlink_call(
            f"failed to set interface {self.ifname} to UP state",
            lambda: ipr.link("set", index=self.index, state="up"),
        )

    async def prepare(self) -> dict[str, Any] | None:
        def job() -> None:
            with IPRoute() as ipr:
                if self.v4:
                    self._ensure_device(ipr)
                if self.v6 is not None:
                    self.v6.ensure_device(ipr)

        try:
            await asyncio.to_thread(job)
        except KernelError as exc:
            raise BackendError(str(exc)) from None
        # flanneld v0.24+ (vxlanLeaseAttrs.VNI is a uint32): the whole VNI, then the MAC.
        # An IPv6-only node publishes BackendV6Data only.
        return {"VNI": self.vni, "VtepMAC": self.mac} if self.v4 else None

    def v6_data(self) -> dict[str, Any] | None:
        if self.v6 is None:
            return None
        return {"VNI": self.vni, "VtepMAC": self.v6.mac}

    def _setup(self, ipr: IPRoute, lease: Lease) -> None:
        if self.v6 is not None:
            self.v6.setup(ipr, lease)
        if not self.v4:
            return
        if not ipr.link_lookup(ifname=self.ifname):
            self._ensure_device(ipr)  # deleted between prepare and start
        self._configure(ipr, lease)
        log.info(
            "vxlan backend: %s mtu %d, VtepMAC %s, port %d%s",
            self.ifname,
            self.mtu,
            self.mac,
            self.port,
            ", direct routing" if self.direct_routing else "",
        )

    # ---- peers ------------------------------------------------------------------------

    def _vxlan_route(self, subnet: IPv4Network) -> dict[str, Any]:
        return vtep_route(self.index, subnet)

    def _direct_route(self, subnet: IPv4Network, gw: IPv4Address) -> dict[str, Any]:
        return direct_route(subnet, gw)

    def _on_link(self, ipr: IPRoute, ip: IPv4Address | ipaddress.IPv6Address) -> bool:
        """flanneld's ip.DirectRouting: the kernel reaches ip without a gateway."""
        try:
            routes = ipr.route("get", dst=str(ip))
        except Exception:
            return False
        return bool(routes) and routes[0].get_attr("RTA_GATEWAY") is None

    def _neigh(self, ipr: IPRoute, op: str, subnet: IPv4Network, mac: str) -> None:
        vtep_neigh(ipr, op, self.index, subnet, mac)

    def _fdb(self, ipr: IPRoute, op: str, mac: str, ip: IPv4Address) -> None:
        vtep_fdb(ipr, op, self.index, mac, ip)

    def _program(self, ipr: IPRoute, lease: Lease) -> None:
        if self.v6 is not None and lease.ipv6_subnet is not None:
            self.v6.program(ipr, lease)
        if self.v4 and lease.subnet is not None:
            self._program4(ipr, lease)

    def _unprogram(self, ipr: IPRoute, lease: Lease) -> None:
        errors = []
        if self.v6 is not None and lease.ipv6_subnet is not None:
            try:
                self.v6.unprogram(ipr, lease)
            except KernelError as exc:
                errors.append(str(exc))
        if self.v4 and lease.subnet is not None:
            try:
                self._unprogram4(ipr, lease)
            except KernelError as exc:
                errors.append(str(exc))
        if errors:
            raise KernelError("; ".join(errors))

    def _reconcile(self, ipr: IPRoute, leases: list[Lease]) -> None:
        if self.lease is None:
            return
        if self.v4:
            self._reconcile4(ipr, leases)
        if self.v6 is not None:
            self.v6.reconcile(ipr, self.lease, leases)

    def _sweep(self, ipr: IPRoute, leases: list[Lease]) -> None:
        if self.v4:
            self._sweep4(ipr, leases)
        if self.v6 is not None:
            self.v6.sweep(ipr, self.lease, leases)

    def counters(self) -> dict[str, int]:
        self._counts["peers"] = len(self._peers) + (len(self.v6.peers) if self.v6 else 0)
        return dict(self._counts)

    def _program4(self, ipr: IPRoute, lease: Lease) -> None:
        subnet, ip = lease.subnet4, lease.attrs.public_ip
        if not self._accepts(lease):
            if subnet in self._peers:  # it switched backend type: drop what we installed
                self._unprogram4(ipr, lease)
            return
        mac = vtep_mac(lease.attrs.backend_data)
        if mac is None:
            log.error(
                "error decoding subnet lease JSON for %s: no valid VtepMAC in BackendData %r",
                subnet,
                lease.attrs.backend_data,
            )
            if subnet in self._peers:
                self._unprogram4(ipr, lease)
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
            netlink_call(
                f"Error adding route to {subnet} via {ip}",
                lambda: ipr.route("replace", **self._direct_route(subnet, ip)),
            )
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
                netlink_call(
                    f"failed to add vxlanRoute ({subnet} -> {subnet.network_address})",
                    lambda: ipr.route("replace", **self._vxlan_route(subnet)),
                )
            except KernelError:
                self._neigh(ipr, "del", subnet, mac)
                self._fdb(ipr, "del", mac, ip)
                self._peers.pop(subnet, None)
                raise
            log.info("adding subnet: %s PublicIP: %s VtepMAC: %s", subnet, ip, mac)
        self._peers[subnet] = want
        self._counts["peers"] = len(self._peers)

    def _unprogram4(self, ipr: IPRoute, lease: Lease) -> None:
        subnet = lease.subnet4
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
        steps = [
            lambda: netlink_call(
                f"failed to delete route {subnet}",
                lambda: ipr.route(
                    "del",
                    **(
                        self._direct_route(subnet, peer.public_ip)
                        if peer.direct
                        else self._vxlan_route(subnet)
                    ),
                ),
                missing_ok=True,
            )
        ]
        if not peer.direct:
            steps = [
                lambda: self._neigh(ipr, "del", subnet, peer.mac),
                lambda: self._fdb(ipr, "del", peer.mac, peer.public_ip),
            ] + steps
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
        """Our device is still there and still one flanneld would keep; a MAC someone
        changed is set back in place (peers know us by it)."""
        links = ipr.get_links(ifname=self.ifname) if ipr.link_lookup(ifname=self.ifname) else []
        if not links:
            return False
        link = links[0]
        if link["index"] != self.index or self._incompatible(link) is not None:
            return False
        if link.get_attr("IFLA_ADDRESS") != self.mac:
            log.warning(
                "%s: MAC changed to %s; setting VtepMAC %s back",
                self.ifname,
                link.get_attr("IFLA_ADDRESS"),
                self.mac,
            )
            self._counts["repairs"] += 1
            netlink_call(
                f"cannot set the MAC of {self.ifname}",
                lambda: ipr.link("set", index=self.index, address=self.mac),
            )
        return True

    def _reconcile4(self, ipr: IPRoute, leases: list[Lease]) -> None:
        if self.lease is None:
            return
        if not self._device_ok(ipr):
            # flanneld re-creates a deleted device too; everything on it went with it.
            log.warning(
                "%s is missing or was changed; re-creating it (VtepMAC %s)", self.ifname, self.mac
            )
            self._counts["repairs"] += 1
            self._ensure_device(ipr)
            self._configure(ipr, self.lease)
            self._peers.clear()
            for lease in leases:
                if lease.subnet is None:
                    continue
                try:
                    self._program4(ipr, lease)
                except KernelError as exc:
                    self._counts["netlink_errors"] += 1
                    log.error("%s", exc)
            return
        up = ipr.get_links(self.index)[0]
        own = (str(self.lease.subnet4.network_address), 32)
        addrs = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(family=socket.AF_INET, index=self.index)
        }
        if own not in addrs or not up["flags"] & 1:  # IFF_UP
            log.warning("%s lost its address or is down; fixing", self.ifname)
            self._counts["repairs"] += 1
            self._configure(ipr, self.lease)
        # Entries someone deleted by hand: re-program those peers.
        neigh = {
            n.get_attr("NDA_DST")
            for n in ipr.get_neighbours(ifindex=self.index, family=socket.AF_INET)
            if n["state"] & NUD_PERMANENT
        }
        fdb = {
            (f.get_attr("NDA_LLADDR"), f.get_attr("NDA_DST"))
            for f in ipr.fdb("dump", ifindex=self.index)
        }
        routes = {
            r.get_attr("RTA_DST")
            for r in ipr.get_routes(family=socket.AF_INET, oif=self.index, table=MAIN_TABLE)
        }
        direct = (
            overlay_routes(ipr, self.ctx.iface.index, self.ctx.config)
            if self.direct_routing
            else {}
        )
        by_subnet = {held.subnet: held for held in leases}
        for subnet, peer in list(self._peers.items()):
            dst = str(subnet.network_address)
            if peer.direct:
                if direct.get(subnet) == peer.public_ip:
                    continue
            elif dst in neigh and (peer.mac, str(peer.public_ip)) in fdb and dst in routes:
                continue
            missing = by_subnet.get(subnet)
            if missing is None:
                continue
            log.warning("entries for %s went missing; re-adding them", subnet)
            self._counts["repairs"] += 1
            self._peers.pop(subnet, None)
            self._program4(ipr, missing)

    def _vtep_neighbour(self, dst: str | None) -> bool:
        """A neighbour address flanneld writes: the network address of a subnet of the Network."""
        network, plen = self.ctx.config.network, self.ctx.config.subnet_len
        if dst is None or network is None:
            return False
        try:
            addr = IPv4Address(dst)
        except ValueError:
            return False
        return addr in network and IPv4Network((addr, plen), strict=False).network_address == addr

    def _sweep4(self, ipr: IPRoute, leases: list[Lease]) -> None:
        """Remove what a vanished lease left on our device, and nothing an operator added:
        vxlan-shaped routes (`<subnet> via <subnet>.0`, owned_routes) and permanent
        neighbours for subnets of the Network, and FDB entries pointing at those VTEPs
        (their MAC) or at a vxlan peer's PublicIP. Routes outside the Network, other
        shapes, the all-zeros/multicast FDB entries and anything on other devices stay.
        Direct routes on the interface are swept only with DirectRouting on."""
        cfg = self.ctx.config
        encap = {s: p for s, p in self._peers.items() if not p.direct}
        want_dst = {str(s.network_address) for s in encap}
        want_fdb = {(p.mac, str(p.public_ip)) for p in encap.values()}
        own = self.lease.subnet if self.lease else None
        for net, gw in owned_routes(ipr, self.index, cfg).items():
            dst = str(net.network_address)
            if gw != net.network_address or dst in want_dst or net == own:
                continue
            self._counts["swept"] += 1
            log.info("removing stale route %s via %s on %s", net, gw, self.ifname)
            netlink_call(
                f"cannot delete stale route {net}",
                lambda: ipr.route(
                    "del",
                    dst=dst,
                    dst_len=net.prefixlen,
                    gateway=str(gw),
                    oif=self.index,
                    table=MAIN_TABLE,
                    proto=RTPROT_BOOT,
                ),
                missing_ok=True,
            )
        if self.direct_routing:
            for net, gw in owned_routes(ipr, self.ctx.iface.index, cfg).items():
                peer = self._peers.get(net)
                if (peer is not None and peer.direct) or net == own:
                    continue
                self._counts["swept"] += 1
                log.info("removing stale route %s via %s on %s", net, gw, self.ctx.iface.name)
                netlink_call(
                    f"cannot delete stale route {net}",
                    lambda: ipr.route(
                        "del",
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
        for n in ipr.get_neighbours(ifindex=self.index, family=socket.AF_INET):
            dst = n.get_attr("NDA_DST")
            if not n["state"] & NUD_PERMANENT or not self._vtep_neighbour(dst):
                continue
            if n.get_attr("NDA_LLADDR"):
                vteps.add(n.get_attr("NDA_LLADDR"))
            if dst in want_dst:
                continue
            self._counts["swept"] += 1
            log.info("removing stale neighbour %s on %s", dst, self.ifname)
            netlink_call(
                f"cannot delete stale neighbour {dst}",
                lambda: ipr.neigh("del", dst=dst, ifindex=self.index),
                missing_ok=True,
            )
        peer_ips = {
            str(held.attrs.public_ip)
            for held in leases
            if held.attrs.backend_type == self.lease_type
        }
        for f in ipr.fdb("dump", ifindex=self.index):
            mac, dst = f.get_attr("NDA_LLADDR"), f.get_attr("NDA_DST")
            if f["ifindex"] != self.index or dst is None or mac is None or (mac, dst) in want_fdb:
                continue
            if not f["state"] & NUD_PERMANENT or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
                continue
            if mac not in vteps and dst not in peer_ips:
                continue
            self._counts["swept"] += 1
            log.info("removing stale fdb entry %s -> %s on %s", mac, dst, self.ifname)
            netlink_call(
                f"cannot delete stale fdb entry {mac}",
                lambda: ipr.fdb("del", ifindex=self.index, lladdr=mac, dst=dst),
                missing_ok=True,
            )

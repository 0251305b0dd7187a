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

With EnableIPv6 the IPv6 device `flannel-v6.<VNI>` and its peers are kept alongside, as
flanneld v0.28 (pkg/backend/vxlan: vxlan.go createVXLANDevice, device.go,
vxlan_network.go handleSubnetEvents) does:

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

Both devices are one `Vtep` each, driven by the same code: what differs between the
families (address types, device name, MTU rule, lease fields, netlink family, the words
of flanneld's messages) is data, in `IPV4` and `IPV6`. Reuse, re-creation, repair and the
stale-entry sweep follow the same rules for both: only what fastlane or flanneld writes
is ever removed. An IPv6-only network (EnableIPv4 false) has no `flannel.<VNI>` at all and
publishes only BackendV6Data, as flanneld.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable
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
    overlay_routes6,
    owned_routes,
    owned_routes6,
    vtep_fdb,
    vtep_neigh,
    vtep_route,
)
from fastlane.lease import Lease

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address
IPv6Network = ipaddress.IPv6Network
IPv6Address = ipaddress.IPv6Address
IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

DEFAULT_VNI = 1
#: The kernel's default VXLAN port (Linux predates IANA's 4789); Backend.Port 0 means it.
KERNEL_DEFAULT_PORT = 8472
#: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
ENCAP_OVERHEAD = 50
#: outer IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet (14): the kernel's VXLAN6_HEADROOM
ENCAP_OVERHEAD6 = 70


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
    public_ip: IPAddress
    direct: bool


@dataclass(frozen=True)
class Family:
    """What differs between flannel.<VNI> and flannel-v6.<VNI>. Messages are %-templates
    over named fields, worded as each family's code (flanneld's, where it has one) words them."""

    sock: int
    #: extra keyword for requests that pyroute2 would otherwise send as IPv4
    kw: dict[str, Any]
    address: Callable[[str], IPAddress]
    network: Callable[..., IPNetwork]
    host_len: int
    #: device name for a VNI, and the error when it exceeds IFNAMSIZ
    ifname: str
    too_long: str
    #: ctx attribute holding the local address; the error if it is unset (None: not checked)
    ctx_local: str
    no_local: str | None
    #: the kernel's headroom for this family when it lowers the MTU below flanneld's
    headroom: int | None
    #: link attributes of the local address (first set wins), and local values meaning "none"
    local_attrs: tuple[str, ...]
    unspecified: tuple[str, ...]
    local_key: str
    #: the group attribute whose presence is named when reusing a device (None: not looked at)
    group_attr: str | None
    #: Network and SubnetLen in the config
    cfg_network: str
    cfg_subnet_len: str
    subnet: Callable[[Lease], Any]
    public_ip: Callable[[Lease], Any]
    backend_data: Callable[[Lease], Any]
    accepts: Callable[[KernelBackend, Lease], bool]
    #: another address on the device that configure removes
    stray: Callable[[Any, Any], bool]
    overlay_routes: Callable[[IPRoute, int, Any], dict[Any, Any]]
    owned_routes: Callable[[IPRoute, int, Any], dict[Any, Any]]
    #: the stale vxlan route is deleted with the onlink flag it was added with
    sweep_onlink: bool
    # messages
    no_subnet: str
    addr_del_err: str
    addr_err: str
    up_err: str
    learning_set: str | None
    mac_changed: str
    bad_data: str
    direct_err: str
    direct_added: str
    route_err: str
    added: str
    #: a direct route left when a peer stops being direct is deleted (None: replaced only)
    undirect_err: str | None
    route_del_err: str
    removed: str


IPV4 = Family(
    sock=socket.AF_INET,
    kw={},
    address=IPv4Address,
    network=IPv4Network,
    host_len=32,
    ifname="flannel.{vni}",
    too_long="Backend.VNI {vni} is too large: device name {ifname} exceeds 15 characters",
    ctx_local="public_ip",
    no_local=None,
    headroom=None,
    local_attrs=("IFLA_VXLAN_LOCAL",),
    unspecified=(),
    local_key="vxlan_local",
    group_attr="IFLA_VXLAN_GROUP",
    cfg_network="network",
    cfg_subnet_len="subnet_len",
    subnet=lambda lease: lease.subnet,
    public_ip=lambda lease: lease.attrs.public_ip,
    backend_data=lambda lease: lease.attrs.backend_data,
    accepts=lambda b, lease: b._accepts(lease),
    # Like flanneld's EnsureV4AddressOnLink: other addresses go only if they lie in the Network.
    stray=lambda addr, cfg: cfg.network is not None and IPv4Address(addr) in cfg.network,
    overlay_routes=overlay_routes,
    owned_routes=owned_routes,
    sweep_onlink=False,
    no_subnet="failed to configure interface %(ifname)s: the lease has no IPv4 subnet",
    addr_del_err="cannot remove %(addr)s/%(plen)s from %(ifname)s",
    addr_err="failed to ensure address of interface %(ifname)s",
    up_err="failed to set interface %(ifname)s to UP state",
    learning_set="%(ifname)s: learning %(old)s -> %(new)s",
    mac_changed="%(ifname)s: MAC changed to %(now)s; setting VtepMAC %(mac)s back",
    bad_data="error decoding subnet lease JSON for %(sub)s: no valid VtepMAC in BackendData %(data)r",
    direct_err="Error adding route to %(sub)s via %(ip)s",
    direct_added="adding direct route to subnet: %(sub)s PublicIP: %(ip)s",
    route_err="failed to add vxlanRoute (%(sub)s -> %(gw)s)",
    added="adding subnet: %(sub)s PublicIP: %(ip)s VtepMAC: %(mac)s",
    undirect_err=None,
    route_del_err="failed to delete route %(sub)s",
    removed="removing subnet: %(sub)s PublicIP: %(ip)s VtepMAC: %(mac)s",
)

IPV6 = Family(
    sock=socket.AF_INET6,
    kw={"family": socket.AF_INET6},
    address=IPv6Address,
    network=IPv6Network,
    host_len=128,
    ifname="flannel-v6.{vni}",
    too_long="Backend.VNI {vni} is too large for IPv6: device name {ifname} exceeds 15 characters",
    ctx_local="public_ipv6",
    no_local="vxlan backend: EnableIPv6 is set but this node has no IPv6 address",
    headroom=ENCAP_OVERHEAD6,
    local_attrs=("IFLA_VXLAN_LOCAL6", "IFLA_VXLAN_LOCAL"),
    unspecified=("::", "0.0.0.0"),
    local_key="vxlan_local6",
    group_attr=None,
    cfg_network="ipv6_network",
    cfg_subnet_len="ipv6_subnet_len",
    subnet=lambda lease: lease.ipv6_subnet,
    public_ip=lambda lease: lease.attrs.public_ipv6,
    backend_data=lambda lease: lease.attrs.backend_v6_data,
    accepts=lambda b, lease: b._accepts6(lease),
    # flanneld's EnsureV6AddressOnLink: every other non-link-local IPv6 address goes.
    stray=lambda addr, cfg: addr is not None and not IPv6Address(addr).is_link_local,
    overlay_routes=overlay_routes6,
    owned_routes=owned_routes6,
    sweep_onlink=True,
    no_subnet=(
        "failed to configure interface %(ifname)s: IPv6 is enabled but the lease has no IPv6"
    ),
    addr_del_err="failed to remove v6 IP address %(addr)s/%(plen)s from %(ifname)s",
    addr_err="failed to ensure v6 address of interface %(ifname)s",
    up_err="failed to set v6 interface %(ifname)s to UP state",
    learning_set=None,
    mac_changed="%(ifname)s: MAC changed; setting VtepMAC %(mac)s back",
    bad_data=(
        "error decoding v6 subnet lease JSON for %(sub)s: no valid VtepMAC in BackendV6Data "
        "%(data)r"
    ),
    direct_err="Error adding v6 route to %(sub)s via %(ip)s",
    direct_added="adding v6 direct route to v6 subnet: %(sub)s PublicIPv6: %(ip)s",
    route_err="failed to add v6 vxlanRoute (%(sub)s -> %(gw)s)",
    added="adding v6 subnet: %(sub)s PublicIPv6: %(ip)s VtepMAC: %(mac)s",
    undirect_err="failed to delete v6 route %(sub)s",
    route_del_err="failed to delete v6 vxlanRoute %(sub)s",
    removed="removing v6subnet: %(sub)s PublicIPv6: %(ip)s VtepMAC: %(mac)s",
)


class Vtep:
    """One VXLAN device (flannel.<VNI> or flannel-v6.<VNI>) and the peers programmed on it,
    driven by the VxlanBackend that owns it (all calls on its worker)."""

    def __init__(self, backend: VxlanBackend, fam: Family) -> None:
        self.b = backend
        self.fam = fam
        self.ctx = backend.ctx
        self.ifname = fam.ifname.format(vni=backend.vni)
        if len(self.ifname) > 15:
            raise BackendError(fam.too_long.format(vni=backend.vni, ifname=self.ifname))
        if fam.no_local is not None and self.local is None:
            raise BackendError(fam.no_local)
        self.index = 0
        self.mac = ""
        self._peers: dict[Any, Peer] = {}

    @property
    def local(self) -> Any:
        """The device's local address: flanneld v0.28 uses ExtAddr (the public IP)."""
        return getattr(self.ctx, self.fam.ctx_local)

    @property
    def mtu(self) -> int:
        mtu = self.b.base_mtu - ENCAP_OVERHEAD
        if self.fam.headroom is not None:
            mtu = min(mtu, self.ctx.iface.mtu - self.fam.headroom)
        return mtu

    @property
    def peers(self) -> dict[Any, Peer]:
        return self._peers

    # ---- the device -------------------------------------------------------------------

    def _local_attr(self, d) -> Any:
        for name in self.fam.local_attrs:
            value = d.get_attr(name)
            if value:
                return value
        return None

    def _incompatible(self, link) -> str | None:
        """Why flanneld would delete and re-create this device (its vxlanLinksIncompat,
        with its message: wanted value first, then the existing device's).

        Attributes are compared only where flanneld compares them: the underlay device,
        the local address and the port only when both sides have one; no group is ever
        wanted, so an existing group/remote never counts; learning, MTU, TTL, ageing,
        L3miss and the rest are not compared at all.
        """
        b = self.b
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "vxlan":
            return f"link type: vxlan vs {kind or 'device'}"
        d = info.get_attr("IFLA_INFO_DATA")
        vni = d.get_attr("IFLA_VXLAN_ID")
        if vni != b.vni:
            return f"vni: {b.vni} vs {vni}"
        dev = d.get_attr("IFLA_VXLAN_LINK") or 0
        if dev and dev != self.ctx.iface.index:
            return f"vtep (external) interface: {self.ctx.iface.index} vs {dev}"
        local = self._local_attr(d)
        if local and local not in self.fam.unspecified:
            try:
                other = self.fam.address(local) != self.local
            except ValueError:  # an IPv4 local on the IPv6 device
                other = True
            if other:
                return f"vtep (external) IP: {self.local} vs {local}"
        if d.get_attr("IFLA_VXLAN_L2MISS"):
            return "l2miss: false vs true"
        port = d.get_attr("IFLA_VXLAN_PORT") or 0
        if port and b.port_option and port != b.port_option:
            return f"port: {b.port_option} vs {port}"
        gbp = bool(d.get_attr("IFLA_VXLAN_GBP"))
        if gbp != b.gbp:
            return f"gbp: {str(b.gbp).lower()} vs {str(gbp).lower()}"
        return None

    def _adopt(self, ipr: IPRoute, link, mac: str) -> None:
        """Keep a compatible existing device (same ifindex). MAC, MTU and learning are set
        in place; the other tolerated differences are only named in a warning."""
        b = self.b
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
        if learning != b.learning:
            try:
                netlink_call(
                    f"cannot set learning on {self.ifname}",
                    lambda: ipr.link(
                        "set",
                        index=self.index,
                        kind="vxlan",
                        vxlan_learning=1 if b.learning else 0,
                    ),
                )
                if self.fam.learning_set is not None:
                    log.info(
                        self.fam.learning_set,
                        {"ifname": self.ifname, "old": learning, "new": b.learning},
                    )
            except KernelError as exc:  # an old kernel without changelink: keep the device
                log.warning("%s; keeping the device with learning %s", exc, learning)
        kept = []
        port = d.get_attr("IFLA_VXLAN_PORT") or 0
        if port and port != b.port:
            kept.append(f"dstport {port} (Backend.Port not set)")
        group = d.get_attr(self.fam.group_attr) if self.fam.group_attr else None
        if group and group != "0.0.0.0":
            kept.append(f"remote/group {group}")
        if not self._local_attr(d):
            kept.append("no local address")
        if not d.get_attr("IFLA_VXLAN_LINK"):
            kept.append("no underlay dev")
        if kept:
            log.warning("reusing %s as flanneld would, with %s", self.ifname, ", ".join(kept))
        log.info("reusing %s (ifindex %d, VtepMAC %s)", self.ifname, self.index, mac)

    def ensure_device(self, ipr: IPRoute) -> None:
        """Create the device, or reuse/re-create an existing one keeping its MAC."""
        b = self.b
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
        spec: dict[str, Any] = {
            "ifname": self.ifname,
            "kind": "vxlan",
            "vxlan_id": b.vni,
            "vxlan_link": self.ctx.iface.index,
            self.fam.local_key: str(self.local),
            "vxlan_learning": 1 if b.learning else 0,
            "mtu": self.mtu,
        }
        if b.port_option:  # as flanneld: no port attribute means the kernel's 8472
            spec["vxlan_port"] = b.port_option
        if b.gbp:
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
            b.vni,
            self.local,
            self.ctx.iface.name,
            b.port,
            self.mtu,
            self.mac,
        )
        try:  # as flanneld: no IPv6 autoconfiguration on the overlay device
            with open(f"/proc/sys/net/ipv6/conf/{self.ifname}/accept_ra", "w") as f:
                f.write("0")
        except OSError:
            pass

    def configure(self, ipr: IPRoute, lease: Lease) -> None:
        """The lease's subnet address as a host route (/32, /128: no broadcast routes), and
        up. Other addresses go as flanneld's EnsureV4AddressOnLink/EnsureV6AddressOnLink
        remove them (`Family.stray`)."""
        fam, ifname = self.fam, self.ifname
        sub = fam.subnet(lease)
        if sub is None:
            raise KernelError(fam.no_subnet % {"ifname": ifname})
        own = str(sub.network_address)
        for a in ipr.get_addr(family=fam.sock, index=self.index):
            addr, plen = a.get_attr("IFA_ADDRESS"), a["prefixlen"]
            if (addr, plen) == (own, fam.host_len) or not fam.stray(addr, self.ctx.config):
                continue
            netlink_call(
                fam.addr_del_err % {"addr": addr, "plen": plen, "ifname": ifname},
                lambda: ipr.addr("del", index=self.index, address=addr, prefixlen=plen, **fam.kw),
                missing_ok=True,
            )
        netlink_call(
            fam.addr_err % {"ifname": ifname},
            lambda: ipr.addr(
                "replace", index=self.index, address=own, prefixlen=fam.host_len, **fam.kw
            ),
        )
        netlink_call(
            fam.up_err % {"ifname": ifname},
            lambda: ipr.link("set", index=self.index, state="up"),
        )

    def setup(self, ipr: IPRoute, lease: Lease) -> None:
        if not ipr.link_lookup(ifname=self.ifname):
            self.ensure_device(ipr)  # deleted between prepare and start
        self.configure(ipr, lease)

    # ---- peers ------------------------------------------------------------------------

    def _vxlan_route(self, subnet: IPNetwork) -> dict[str, Any]:
        return vtep_route(self.index, subnet)

    def _neigh(self, ipr: IPRoute, op: str, subnet: IPNetwork, mac: str) -> None:
        vtep_neigh(ipr, op, self.index, subnet, mac)

    def _fdb(self, ipr: IPRoute, op: str, mac: str, ip: IPAddress) -> None:
        vtep_fdb(ipr, op, self.index, mac, ip)

    def program(self, ipr: IPRoute, lease: Lease) -> None:
        fam, b = self.fam, self.b
        sub, ip = fam.subnet(lease), fam.public_ip(lease)
        if sub is None:
            return
        if not fam.accepts(b, lease) or ip is None:
            if sub in self._peers:  # it switched backend type: drop what we installed
                self.unprogram(ipr, lease)
            return
        mac = vtep_mac(fam.backend_data(lease))
        if mac is None:
            log.error(fam.bad_data, {"sub": sub, "data": fam.backend_data(lease)})
            if sub in self._peers:
                self.unprogram(ipr, lease)
            return
        want = Peer(mac, ip, b.direct_routing and b._on_link(ipr, ip))
        old = self._peers.get(sub)
        if old is not None and old != want and not old.direct:
            # Replace-operations overwrite the route and the neighbour; a stale FDB
            # entry (old MAC) or a neighbour no longer wanted must go explicitly.
            if want.direct or (old.mac, old.public_ip) != (want.mac, want.public_ip):
                self._fdb(ipr, "del", old.mac, old.public_ip)
            if want.direct:
                self._neigh(ipr, "del", sub, old.mac)
        words = {"sub": sub, "ip": ip, "mac": mac, "gw": sub.network_address}
        if want.direct:
            netlink_call(
                fam.direct_err % words,
                lambda: ipr.route("replace", **direct_route(sub, ip)),
            )
            log.info(fam.direct_added, words)
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
                    fam.route_err % words,
                    lambda: ipr.route("replace", **self._vxlan_route(sub)),
                )
            except KernelError:
                self._neigh(ipr, "del", sub, mac)
                self._fdb(ipr, "del", mac, ip)
                self._peers.pop(sub, None)
                raise
            log.info(fam.added, words)
        if fam.undirect_err is not None and old is not None and old.direct and not want.direct:
            netlink_call(
                fam.undirect_err % words,
                lambda: ipr.route("del", **direct_route(sub, old.public_ip)),
                missing_ok=True,
            )
        self._peers[sub] = want

    def unprogram(self, ipr: IPRoute, lease: Lease) -> None:
        fam = self.fam
        sub = fam.subnet(lease)
        if sub is None:
            return
        peer = self._peers.pop(sub, None)
        if peer is None:
            ip = fam.public_ip(lease)
            if lease.attrs.backend_type != self.b.lease_type or ip is None:
                return
            mac = vtep_mac(fam.backend_data(lease))
            if mac is None:
                return
            peer = Peer(mac, ip, False)
        # Try to remove every entry; one failing does not stop the others.
        errors = []
        route = direct_route(sub, peer.public_ip) if peer.direct else self._vxlan_route(sub)
        steps = [
            lambda: netlink_call(
                fam.route_del_err % {"sub": sub},
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
        log.info(fam.removed, {"sub": sub, "ip": peer.public_ip, "mac": peer.mac})
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
                self.fam.mac_changed,
                {"ifname": self.ifname, "now": link.get_attr("IFLA_ADDRESS"), "mac": self.mac},
            )
            self.b._counts["repairs"] += 1
            netlink_call(
                f"cannot set the MAC of {self.ifname}",
                lambda: ipr.link("set", index=self.index, address=self.mac),
            )
        return True

    def reconcile(self, ipr: IPRoute, lease: Lease, leases: list[Lease]) -> None:
        fam, counts = self.fam, self.b._counts
        if not self._device_ok(ipr):
            # flanneld re-creates a deleted device too; everything on it went with it.
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
        up = ipr.get_links(self.index)[0]
        own = (str(fam.subnet(lease).network_address), fam.host_len)
        addrs = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(family=fam.sock, index=self.index)
        }
        if own not in addrs or not up["flags"] & 1:  # IFF_UP
            log.warning("%s lost its address or is down; fixing", self.ifname)
            counts["repairs"] += 1
            self.configure(ipr, lease)
        # Entries someone deleted by hand: re-program those peers.
        neigh = {
            n.get_attr("NDA_DST")
            for n in ipr.get_neighbours(ifindex=self.index, family=fam.sock)
            if n["state"] & NUD_PERMANENT
        }
        fdb = {
            (f.get_attr("NDA_LLADDR"), f.get_attr("NDA_DST"))
            for f in ipr.fdb("dump", ifindex=self.index)
        }
        routes = {
            r.get_attr("RTA_DST")
            for r in ipr.get_routes(family=fam.sock, oif=self.index, table=MAIN_TABLE)
        }
        direct = (
            fam.overlay_routes(ipr, self.ctx.iface.index, self.ctx.config)
            if self.b.direct_routing
            else {}
        )
        by_subnet = {fam.subnet(held): held for held in leases if fam.subnet(held) is not None}
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
        """A neighbour address flanneld writes: the network address of a subnet of the
        Network (IPv6: the first address of an IPv6SubnetLen subnet of IPv6Network)."""
        cfg = self.ctx.config
        network = getattr(cfg, self.fam.cfg_network)
        plen = getattr(cfg, self.fam.cfg_subnet_len)
        if dst is None or network is None:
            return False
        try:
            addr = self.fam.address(dst)
        except ValueError:
            return False
        return (
            addr in network and self.fam.network((addr, plen), strict=False).network_address == addr
        )

    def sweep(self, ipr: IPRoute, lease: Lease | None, leases: list[Lease]) -> None:
        """Remove what a vanished lease left on our device, and nothing an operator added:
        vxlan-shaped routes (`<subnet> via <subnet>.0`, owned_routes) and permanent
        neighbours for subnets of the Network, and FDB entries pointing at those VTEPs
        (their MAC) or at a vxlan peer's PublicIP. Routes outside the Network, other
        shapes, the all-zeros/multicast FDB entries and anything on other devices stay.
        Direct routes on the interface are swept only with DirectRouting on."""
        fam, cfg, counts = self.fam, self.ctx.config, self.b._counts
        encap = {s: p for s, p in self._peers.items() if not p.direct}
        want_dst = {str(s.network_address) for s in encap}
        want_fdb = {(p.mac, str(p.public_ip)) for p in encap.values()}
        own = fam.subnet(lease) if lease else None
        for net, gw in fam.owned_routes(ipr, self.index, cfg).items():
            dst = str(net.network_address)
            if gw != net.network_address or dst in want_dst or net == own:
                continue
            counts["swept"] += 1
            log.info("removing stale route %s via %s on %s", net, gw, self.ifname)
            route = self._vxlan_route(net)
            if not fam.sweep_onlink:
                del route["flags"]
            netlink_call(
                f"cannot delete stale route {net}",
                lambda: ipr.route("del", **route),
                missing_ok=True,
            )
        if self.b.direct_routing:
            for net, gw in fam.owned_routes(ipr, self.ctx.iface.index, cfg).items():
                peer = self._peers.get(net)
                if (peer is not None and peer.direct) or net == own:
                    continue
                counts["swept"] += 1
                log.info("removing stale route %s via %s on %s", net, gw, self.ctx.iface.name)
                netlink_call(
                    f"cannot delete stale route {net}",
                    lambda: ipr.route(
                        "del",
                        **fam.kw,
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
        for n in ipr.get_neighbours(ifindex=self.index, family=fam.sock):
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
                lambda: ipr.neigh("del", **fam.kw, dst=dst, ifindex=self.index),
                missing_ok=True,
            )
        peer_ips = {
            str(fam.public_ip(held))
            for held in leases
            if held.attrs.backend_type == self.b.lease_type and fam.public_ip(held) is not None
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
        v4 = Vtep(self, IPV4)  # its name is checked even on an IPv6-only network
        self.ifname = v4.ifname
        self.v4: Vtep | None = v4 if cfg.enable_ipv4 else None
        self.v6: Vtep | None = Vtep(self, IPV6) if cfg.enable_ipv6 else None

    @property
    def mtu(self) -> int:
        """FLANNEL_MTU: flanneld's (Backend.MTU or the interface MTU) - 50, either family."""
        return self.base_mtu - ENCAP_OVERHEAD

    def _vteps(self) -> list[Vtep]:
        """The enabled devices, IPv6 first: a lease's IPv6 half is programmed (and
        unprogrammed) before its IPv4 half; the device-wide work goes IPv4 first."""
        return [v for v in (self.v6, self.v4) if v is not None]

    async def prepare(self) -> dict[str, Any] | None:
        def job() -> None:
            with IPRoute() as ipr:
                for vtep in reversed(self._vteps()):
                    vtep.ensure_device(ipr)

        try:
            await asyncio.to_thread(job)
        except KernelError as exc:
            raise BackendError(str(exc)) from None
        # flanneld v0.24+ (vxlanLeaseAttrs.VNI is a uint32): the whole VNI, then the MAC.
        # An IPv6-only node publishes BackendV6Data only.
        return {"VNI": self.vni, "VtepMAC": self.v4.mac} if self.v4 is not None else None

    def v6_data(self) -> dict[str, Any] | None:
        if self.v6 is None:
            return None
        return {"VNI": self.vni, "VtepMAC": self.v6.mac}

    def _setup(self, ipr: IPRoute, lease: Lease) -> None:
        if self.v6 is not None:
            self.v6.setup(ipr, lease)
            log.info(
                "vxlan backend: %s mtu %d, VtepMAC %s", self.v6.ifname, self.v6.mtu, self.v6.mac
            )
        if self.v4 is not None:
            self.v4.setup(ipr, lease)
            log.info(
                "vxlan backend: %s mtu %d, VtepMAC %s, port %d%s",
                self.v4.ifname,
                self.v4.mtu,
                self.v4.mac,
                self.port,
                ", direct routing" if self.direct_routing else "",
            )

    def _on_link(self, ipr: IPRoute, ip: IPAddress) -> bool:
        """flanneld's ip.DirectRouting: the kernel reaches ip without a gateway."""
        try:
            routes = ipr.route("get", dst=str(ip))
        except Exception:
            return False
        return bool(routes) and routes[0].get_attr("RTA_GATEWAY") is None

    def _program(self, ipr: IPRoute, lease: Lease) -> None:
        for vtep in self._vteps():
            vtep.program(ipr, lease)

    def _unprogram(self, ipr: IPRoute, lease: Lease) -> None:
        errors = []
        for vtep in self._vteps():
            try:
                vtep.unprogram(ipr, lease)
            except KernelError as exc:
                errors.append(str(exc))
        if errors:
            raise KernelError("; ".join(errors))

    def _reconcile(self, ipr: IPRoute, leases: list[Lease]) -> None:
        if self.lease is None:
            return
        for vtep in reversed(self._vteps()):
            vtep.reconcile(ipr, self.lease, leases)

    def _sweep(self, ipr: IPRoute, leases: list[Lease]) -> None:
        for vtep in reversed(self._vteps()):
            vtep.sweep(ipr, self.lease, leases)

    def counters(self) -> dict[str, int]:
        self._counts["peers"] = sum(len(vtep.peers) for vtep in self._vteps())
        return dict(self._counts)

"""IPv6 forwarding (issue 9): vxlan and host-gw over a dual-stack underlay, IPv6-only networks,
ip6tables/nftables rules and the IPv6 blackhole route, against flanneld v0.28's kernel state.

Real daemons in host namespaces, a real etcd, real packets: `ping`/`ping -6` between
containers at the overlay MTU with DF set, a TCP transfer over IPv6 checked with sha256 at
both ends, hosts joining and leaving, a restart. Kernel state is read back with iproute2.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from fastlane.iface import IFA_F_PERMANENT, IFA_F_TENTATIVE, _Addr6, usable_addresses6
from tests.daemon_helpers import Node, add_container, leases, overlay, transfer, wait_until

PREFIX = "/coreos.com/network"
UNDERLAY6 = "fd00:100::/64"
VXLAN = (
    '{"Network":"10.8.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:8::/56",'
    '"Backend":{"Type":"vxlan"}}'
)
HOSTGW = (
    '{"Network":"10.9.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:9::/56",'
    '"Backend":{"Type":"host-gw"}}'
)
ONLY6 = (
    '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:a::/56",'
    '"EnableNFTables":true,"Backend":{"Type":"vxlan"}}'
)

DR6 = (
    '{"Network":"10.11.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:b::/56",'
    '"EnableNFTables":true,"Backend":{"Type":"vxlan","DirectRouting":true}}'
)
HOSTGW_ONLY6 = (
    '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:c::/56",'
    '"Backend":{"Type":"host-gw"}}'
)


def _fixture(config, name, tmp_path_factory, hosts=3, **kw):
    yield from overlay(
        config, name, tmp_path_factory.mktemp(name), hosts=hosts, underlay6=UNDERLAY6, **kw
    )


@pytest.fixture(scope="module")
def vx(net_capable, tmp_path_factory):
    yield from _fixture(VXLAN, "v6vxlan", tmp_path_factory, extra=("-ip-masq",))


@pytest.fixture(scope="module")
def hgw(net_capable, tmp_path_factory):
    yield from _fixture(HOSTGW, "v6hostgw", tmp_path_factory)


@pytest.fixture(scope="module")
def only6(net_capable, tmp_path_factory):
    if shutil.which("nft") is None:
        pytest.skip("needs the nft tool (apt-get install -y nftables)")
    yield from _fixture(
        ONLY6, "v6only", tmp_path_factory, extra=("-ip-masq", "-ip-blackhole-route")
    )


@pytest.fixture(scope="module")
def dr6(net_capable, tmp_path_factory):
    """Dual stack, vxlan with DirectRouting (the hosts share one L2), nftables rules."""
    if shutil.which("nft") is None:
        pytest.skip("needs the nft tool (apt-get install -y nftables)")
    yield from _fixture(DR6, "v6dr", tmp_path_factory, hosts=2, extra=("-ip-masq",))


@pytest.fixture(scope="module")
def hgw6(net_capable, tmp_path_factory):
    """An IPv6-only host-gw network with iptables (ip6tables) rules resynced every second."""
    yield from _fixture(
        HOSTGW_ONLY6,
        "v6hgwonly",
        tmp_path_factory,
        hosts=2,
        extra=("-ip-masq", "-iptables-resync=1"),
    )


# ---- helpers ---------------------------------------------------------------------------


def _env(node: Node) -> dict[str, str]:
    return node.wait_subnet_file()


def _sub6(node: Node) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Interface(_env(node)["FLANNEL_IPV6_SUBNET"]).network


def _lease(etcd, node: Node) -> dict:
    s6 = _sub6(node)
    for key, value in leases(etcd, PREFIX).items():
        if key.endswith(f"&{s6.network_address}-{s6.prefixlen}"):
            return json.loads(value)
    raise AssertionError(f"no lease for {s6}")


def _mac(topo, netns: str, dev: str) -> str:
    m = re.search(r"link/ether ([0-9a-f:]{17})", topo.ip(netns, "-o", "link", "show", dev))
    assert m is not None
    return m.group(1)


def _ping(topo, netns, dest, size: int, count: int = 2) -> bool:
    res = topo.run(
        netns,
        "ping",
        "-n",
        "-q",
        "-M",
        "do",
        "-c",
        str(count),
        "-W",
        "2",
        "-s",
        str(size),
        str(dest),
        check=False,
        timeout=30,
    )
    return res.returncode == 0


def _v6_state(topo, netns, sub6, mac, ip6) -> tuple[bool, bool, bool]:
    dst = sub6.network_address
    neigh = topo.ip(netns, "-6", "neigh", "show", "dev", "flannel-v6.1")
    fdb = topo.run(netns, "bridge", "fdb", "show", "dev", "flannel-v6.1").stdout
    routes = topo.ip(netns, "-6", "route", "show")
    return (
        f"{dst} lladdr {mac} PERMANENT" in neigh,
        f"{mac} dst {ip6} self permanent" in fdb,
        f"{sub6} via {dst} dev flannel-v6.1" in routes and "onlink" in routes,
    )


# ---- interface address choice (no daemon) ----------------------------------------------


def test_ipv6_address_preference_like_flanneld():
    A = ipaddress.IPv6Address
    addrs = [
        _Addr6(A("fe80::1"), IFA_F_PERMANENT),
        _Addr6(A("fd00::9"), 0),  # dynamic (SLAAC/DHCPv6)
        _Addr6(A("fd00::7"), IFA_F_PERMANENT | IFA_F_TENTATIVE),  # DAD not done
        _Addr6(A("fd00::5"), 0x20),  # deprecated
        _Addr6(A("fd00::3"), IFA_F_PERMANENT),
        _Addr6(A("::1"), IFA_F_PERMANENT),
    ]
    assert usable_addresses6(addrs) == [A("fd00::3"), A("fd00::9"), A("fe80::1")]


def test_choose_picks_interface_ipv6_address_and_public_ipv6_overrides(topology):
    topo = topology(hosts=1, underlay6=UNDERLAY6)
    ns = topo.hosts[0].netns
    topo.ip(ns, "addr", "add", "fd00:200::5/64", "dev", "eth0", "nodad", "preferred_lft", "0")
    code = (
        "import ipaddress, sys; from fastlane.iface import choose; "
        "p = sys.argv[1] and ipaddress.IPv6Address(sys.argv[1]) or None; "
        "i = choose(['eth0'], [], ipv6=True, public_ipv6=p); print(i.address, i.address6)"
    )
    out = topo.run(ns, sys.executable, "-c", code, "").stdout.split()
    assert out == ["192.168.100.1", "fd00:100::1"]
    # IPv6-only: -iface given as the IPv6 address; no IPv4 address is needed.
    code6 = (
        "from fastlane.iface import choose; "
        "i = choose(['fd00:100::1'], [], ipv4=False, ipv6=True); print(i.name, i.address6)"
    )
    assert topo.run(ns, sys.executable, "-c", code6).stdout.split() == ["eth0", "fd00:100::1"]
    # No IPv6 address on the interface: flanneld's error, unless -public-ipv6 is given.
    topo.ip(ns, "-6", "addr", "flush", "dev", "eth0", "scope", "global")
    res = topo.run(ns, sys.executable, "-c", code, "", check=False)
    assert "failed to find IPv6 address for interface eth0" in res.stderr
    out = topo.run(ns, sys.executable, "-c", code, "fd00:300::1").stdout.split()
    assert out[0] == "192.168.100.1"


# ---- vxlan, dual stack -------------------------------------------------------------------


def test_vxlan_v6_device_lease_and_entries_like_flanneld(vx):
    topo, etcd, nodes = vx
    a, b = nodes[0], nodes[1]
    value = _lease(etcd, a)
    h0 = topo.hosts[0]
    # No -public-ipv6: the interface's IPv6 address, as flanneld's ExtV6Addr.
    assert value["PublicIPv6"] == str(h0.ip6) and value["PublicIP"] == str(h0.ip)
    assert value["BackendV6Data"] == {"VNI": 1, "VtepMAC": _mac(topo, h0.netns, "flannel-v6.1")}
    assert value["BackendData"]["VtepMAC"] == _mac(topo, h0.netns, "flannel.1")
    dev = topo.ip(h0.netns, "-d", "link", "show", "flannel-v6.1")
    assert f"vxlan id 1 local {h0.ip6} dev eth0" in dev
    assert "dstport 8472" in dev and "nolearning" in dev and "mtu 1430" in dev
    assert "mtu 1450" in topo.ip(h0.netns, "link", "show", "flannel.1")
    assert _env(a)["FLANNEL_MTU"] == "1450"  # flanneld's nw.MTU(): Backend.MTU - 50
    addrs = topo.ip(h0.netns, "-6", "addr", "show", "dev", "flannel-v6.1", "scope", "global")
    assert f"inet6 {_sub6(a).network_address}/128" in addrs
    sb = _sub6(b)
    mac_b = _mac(topo, topo.hosts[1].netns, "flannel-v6.1")
    assert wait_until(lambda: all(_v6_state(topo, h0.netns, sb, mac_b, topo.hosts[1].ip6)), 10), (
        topo.ip(h0.netns, "-6", "route")
    )


def test_vxlan_ping_both_families_at_overlay_mtu_and_tcp_over_ipv6(vx):
    topo, _etcd, _nodes = vx
    c0, c1 = topo.hosts[0], topo.hosts[1]
    assert c0.container and c1.container and c0.container6 and c1.container6
    assert topo.wait_ping(c0.container.netns, str(c1.container.ip), 15)
    assert _ping(topo, c0.container.netns, c1.container.ip, 1450 - 28)  # IPv4 unchanged
    assert topo.wait_ping(c0.container6.netns, str(c1.container6.ip), 15)
    assert _ping(topo, c0.container6.netns, c1.container6.ip, 1430 - 48)
    assert _ping(topo, c1.container6.netns, c0.container6.ip, 1430 - 48)
    sent, got = transfer(
        topo,
        c0.container6.netns,
        c1.container6.netns,
        c1.container6.ip,
        4_000_000,
        port=5601,
        timeout=90,
    )
    assert sent == got and int(sent[0]) == 4_000_000


def test_vxlan_ip6tables_rules_like_flanneld(vx):
    topo, etcd, nodes = vx
    ns = topo.hosts[0].netns
    net6, sub6 = "fd00:8::/56", str(_sub6(nodes[0]))
    assert wait_until(
        lambda: "FLANNEL-POSTRTG" in topo.run(ns, "ip6tables", "-t", "nat", "-S").stdout, 10
    )
    masq = topo.run(ns, "ip6tables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
    assert f"-A FLANNEL-POSTRTG -s {sub6} -d {net6} " in masq
    assert f"-A FLANNEL-POSTRTG -s {net6} ! -d ff00::/8 " in masq and "MASQUERADE" in masq
    fwd = topo.run(ns, "ip6tables", "-t", "filter", "-S", "FLANNEL-FWD").stdout
    assert f"-A FLANNEL-FWD -s {net6} " in fwd and f"-A FLANNEL-FWD -d {net6} " in fwd
    assert (
        "-j FLANNEL-POSTRTG" in topo.run(ns, "ip6tables", "-t", "nat", "-S", "POSTROUTING").stdout
    )
    # IPv4 unchanged.
    assert "-A FLANNEL-POSTRTG" in topo.run(ns, "iptables", "-t", "nat", "-S").stdout


def test_vxlan_host_joins_and_leaves(vx, tmp_path):
    topo, etcd, nodes = vx
    h0, h2, n2 = topo.hosts[0], topo.hosts[2], nodes[2]
    n2.start()
    add_container(topo, 2, n2.wait_subnet_file(), n2.subnet_file)
    assert h0.container6 and h2.container6
    assert topo.wait_ping(h0.container6.netns, str(h2.container6.ip), 15)
    assert _ping(topo, h2.container6.netns, h0.container6.ip, 1430 - 48)
    s2, mac2 = _sub6(n2), _mac(topo, h2.netns, "flannel-v6.1")
    n2.stop()
    for key in leases(etcd, PREFIX):  # the node leaves: its lease goes
        if key.endswith(f"&{s2.network_address}-{s2.prefixlen}"):
            etcd.etcdctl("del", key)
    assert wait_until(
        lambda: _v6_state(topo, h0.netns, s2, mac2, h2.ip6) == (False, False, False), 10
    ), topo.ip(h0.netns, "-6", "route")
    topo.remove_container(2)


def test_vxlan_restart_keeps_both_subnets_and_traffic(vx):
    topo, etcd, nodes = vx
    a = nodes[0]
    before = _env(a)
    mac6 = _mac(topo, topo.hosts[0].netns, "flannel-v6.1")
    a.stop()
    a.subnet_file.unlink()
    a.start()
    after = _env(a)
    assert (after["FLANNEL_SUBNET"], after["FLANNEL_IPV6_SUBNET"]) == (
        before["FLANNEL_SUBNET"],
        before["FLANNEL_IPV6_SUBNET"],
    )
    assert _mac(topo, topo.hosts[0].netns, "flannel-v6.1") == mac6
    c0, c1 = topo.hosts[0], topo.hosts[1]
    assert c0.container6 and c1.container6 and c0.container and c1.container
    assert _ping(topo, c1.container6.netns, c0.container6.ip, 1430 - 48)
    assert _ping(topo, c1.container.netns, c0.container.ip, 1450 - 28)


def test_vxlan_v6_stale_entries_swept_on_restart_operator_entries_kept(vx):
    topo, _etcd, nodes = vx
    ns = topo.hosts[0].netns
    dev = "flannel-v6.1"
    stale_mac, op_mac = "0a:11:22:33:44:55", "0a:66:77:88:99:aa"
    topo.ip(
        ns,
        "-6",
        "neigh",
        "add",
        "fd00:8:0:ee::",
        "lladdr",
        stale_mac,
        "dev",
        dev,
        "nud",
        "permanent",
    )
    topo.run(
        ns,
        "bridge",
        "fdb",
        "add",
        stale_mac,
        "dev",
        dev,
        "dst",
        "fd00:100::99",
        "self",
        "permanent",
    )
    topo.ip(
        ns, "-6", "route", "add", "fd00:8:0:ee::/64", "via", "fd00:8:0:ee::", "dev", dev, "onlink"
    )
    # an operator's: another proto, and an FDB entry for a host that is no vxlan peer
    topo.ip(
        ns,
        "-6",
        "route",
        "add",
        "fd00:8:0:ef::/64",
        "via",
        "fd00:8:0:ef::",
        "dev",
        dev,
        "onlink",
        "proto",
        "static",
    )
    topo.run(
        ns, "bridge", "fdb", "add", op_mac, "dev", dev, "dst", "fd00:100::98", "self", "permanent"
    )
    nodes[0].stop()
    nodes[0].start()
    nodes[0].wait_subnet_file()
    assert wait_until(lambda: "fd00:8:0:ee::/64" not in topo.ip(ns, "-6", "route"), 15), topo.ip(
        ns, "-6", "route"
    )
    assert "fd00:8:0:ee::" not in topo.ip(ns, "-6", "neigh", "show", "dev", dev)
    fdb = topo.run(ns, "bridge", "fdb", "show", "dev", dev).stdout
    assert stale_mac not in fdb and op_mac in fdb
    assert "fd00:8:0:ef::/64" in topo.ip(ns, "-6", "route")
    topo.ip(ns, "-6", "route", "del", "fd00:8:0:ef::/64")
    topo.run(ns, "bridge", "fdb", "del", op_mac, "dev", dev, "dst", "fd00:100::98", "self")
    c0, c1 = topo.hosts[0], topo.hosts[1]
    assert c0.container6 and c1.container6
    assert _ping(topo, c1.container6.netns, c0.container6.ip, 1430 - 48)


# ---- host-gw, dual stack -----------------------------------------------------------------


def test_hostgw_v6_routes_ping_and_tcp(hgw):
    topo, etcd, nodes = hgw
    h0, h1 = topo.hosts[0], topo.hosts[1]
    s1 = _sub6(nodes[1])
    assert _lease(etcd, nodes[1])["PublicIPv6"] == str(h1.ip6)
    assert wait_until(lambda: f"{s1} via {h1.ip6} dev eth0" in topo.ip(h0.netns, "-6", "route"), 10)
    assert _env(nodes[0])["FLANNEL_MTU"] == "1500"
    assert h0.container and h1.container and h0.container6 and h1.container6
    assert topo.wait_ping(h0.container.netns, str(h1.container.ip), 15)
    assert _ping(topo, h0.container.netns, h1.container.ip, 1500 - 28)
    assert topo.wait_ping(h0.container6.netns, str(h1.container6.ip), 15)
    assert _ping(topo, h1.container6.netns, h0.container6.ip, 1500 - 48)
    sent, got = transfer(
        topo,
        h1.container6.netns,
        h0.container6.netns,
        h0.container6.ip,
        4_000_000,
        port=5601,
        timeout=90,
    )
    assert sent == got


def test_hostgw_v6_stale_route_swept_and_missing_route_repaired(hgw):
    topo, etcd, nodes = hgw
    h0, h1 = topo.hosts[0], topo.hosts[1]
    s1 = _sub6(nodes[1])
    topo.ip(h0.netns, "-6", "route", "del", str(s1))
    assert wait_until(lambda: f"{s1} via {h1.ip6} dev eth0" in topo.ip(h0.netns, "-6", "route"), 15)
    # A leftover host-gw-shaped route nobody leases goes on restart; an operator's stays.
    topo.ip(h0.netns, "-6", "route", "add", "fd00:9:0:ee::/64", "via", str(h1.ip6), "dev", "eth0")
    topo.ip(
        h0.netns, "-6", "route", "add", "fd00:9:0:ef::/64", "via", str(h1.ip6), "proto", "static"
    )
    nodes[0].stop()
    nodes[0].start()
    nodes[0].wait_subnet_file()
    assert wait_until(lambda: "fd00:9:0:ee::/64" not in topo.ip(h0.netns, "-6", "route"), 15)
    assert "fd00:9:0:ef::/64" in topo.ip(h0.netns, "-6", "route")
    topo.ip(h0.netns, "-6", "route", "del", "fd00:9:0:ef::/64")


# ---- IPv6-only ---------------------------------------------------------------------------


def test_ipv6_only_vxlan_network(only6):
    topo, etcd, nodes = only6
    h0, h1 = topo.hosts[0], topo.hosts[1]
    env = _env(nodes[0])
    assert "FLANNEL_SUBNET" not in env and env["FLANNEL_MTU"] == "1450"  # as flanneld writes
    value = _lease(etcd, nodes[0])
    assert value["PublicIP"] == "0.0.0.0" and "BackendData" not in value
    assert value["BackendV6Data"]["VtepMAC"] == _mac(topo, h0.netns, "flannel-v6.1")
    assert "flannel.1" not in topo.ip(h0.netns, "-o", "link", "show")
    assert h0.container6 and h1.container6
    assert topo.wait_ping(h0.container6.netns, str(h1.container6.ip), 15)
    assert _ping(topo, h0.container6.netns, h1.container6.ip, 1430 - 48)
    sent, got = transfer(
        topo,
        h0.container6.netns,
        h1.container6.netns,
        h1.container6.ip,
        4_000_000,
        port=5601,
        timeout=90,
    )
    assert sent == got
    # nftables: the ip6 table holds flanneld's rules; the ip one has no chains.
    res = subprocess.run(
        ["ip", "netns", "exec", h0.netns, "nft", "list", "table", "ip6", "flannel-ipv6"],
        capture_output=True,
        text=True,
        check=True,
    )
    sub6 = str(_sub6(nodes[0]))
    assert f"ip6 saddr {sub6} ip6 daddr fd00:a::/56 return" in res.stdout
    assert "ip6 saddr fd00:a::/56 ip6 daddr != ff00::/8 masquerade" in res.stdout
    assert "ip6 saddr fd00:a::/56 accept" in res.stdout
    ip4 = topo.run(h0.netns, "nft", "list", "table", "ip", "flannel-ipv4").stdout
    assert "chain" not in ip4
    # -ip-blackhole-route: the IPv6 subnet gets one (flanneld's AddBlackholeV6Route); the
    # bridge's own prefix route (metric 256) still wins over it (metric 1024).
    assert wait_until(
        lambda: f"blackhole {sub6}" in topo.ip(h0.netns, "-6", "route", "show", "table", "main"),
        10,
    ), topo.ip(h0.netns, "-6", "route")


def test_ipv6_only_node_killed_keeps_forwarding(only6):
    """SIGKILL leaves the kernel state; peers keep talking while the daemon is away."""
    topo, _etcd, nodes = only6
    h0, h1 = topo.hosts[0], topo.hosts[1]
    nodes[1].stop(signal.SIGKILL)
    assert h0.container6 and h1.container6
    assert _ping(topo, h0.container6.netns, h1.container6.ip, 56)
    nodes[1].start()
    nodes[1].wait_subnet_file()


CHOOSE6 = """
import ipaddress, json, sys
from fastlane.iface import InterfaceError, choose
a = json.loads(sys.argv[1])
try:
    i = choose(a["iface"], a["regex"], a["reach"], ipv4=a["v4"], ipv6=a["v6"])
    print(i.name, i.address, i.address6)
except InterfaceError as e:
    print("ERR", e)
"""


def _choose6(topo, ns, regex=(), reach="", v4=True, v6=True) -> str:
    arg = json.dumps({"iface": [], "regex": list(regex), "reach": reach, "v4": v4, "v6": v6})
    res = topo.run(ns, sys.executable, "-c", CHOOSE6, arg, check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    return res.stdout.strip()


def test_iface_can_reach_ipv6_and_dual_stack_regex_like_flanneld(topology):
    """pkg/ipmatch.LookupExtIface: -iface-can-reach with an IPv6 target; in dual stack a
    regex matches an interface only through an IPv4 and an IPv6 address of it."""
    from tests.test_iface import ETH1_GW, _eth1_ip, add_second_underlay

    topo = topology(hosts=1, underlay6=UNDERLAY6)
    add_second_underlay(topo)
    h = topo.hosts[0]
    ns, e1 = h.netns, _eth1_ip(h)
    topo.ip(ns, "addr", "add", "fd00:31::2/64", "dev", "eth1", "nodad")
    topo.ip(ns, "-6", "route", "add", "default", "via", str(topo.switch_ip6), "dev", "eth0")
    eth0 = f"eth0 {h.ip} {h.ip6}"
    eth1 = f"eth1 {e1} fd00:31::2"
    # -iface-can-reach, IPv6 target: the route's interface, each family's address of it.
    assert _choose6(topo, ns, reach="fd00:31::fe") == eth1
    assert _choose6(topo, ns, reach="2001:db8::1") == eth0  # via the IPv6 default route
    assert _choose6(topo, ns, reach="fd00:31::fe", v4=False) == eth1
    assert _choose6(topo, ns, reach=str(ETH1_GW)) == eth1  # IPv4 target, dual stack
    assert _choose6(topo, ns, reach="fd00:31::fe", v6=False) == f"eth1 {e1} None"
    # dual stack: the regex must match an address of each family on one interface.
    assert _choose6(topo, ns, regex=[r"^172\.31\.|^fd00:31:"]) == eth1
    err = _choose6(topo, ns, regex=[r"^172\.31\."])  # no IPv6 address matches, no name
    assert err.startswith("ERR failed to find interface") and "could not match pattern" in err
    assert _choose6(topo, ns, regex=[r"^172\.31\."], v6=False) == f"eth1 {e1} None"
    assert _choose6(topo, ns, regex=[r"^fd00:31:"], v4=False) == eth1
    assert _choose6(topo, ns, regex=["^eth1$"]) == eth1  # by name: both best addresses
    # An interface without an IPv6 address is skipped in dual stack, even if its IPv4 matches.
    topo.ip(ns, "-6", "addr", "del", "fd00:31::2/64", "dev", "eth1")
    rx = rf"^({re.escape(str(e1))}|{re.escape(str(h.ip6))})$"  # eth1's IPv4, eth0's IPv6
    assert _choose6(topo, ns, regex=[rx], v6=False) == f"eth1 {e1} None"
    assert "could not match pattern" in _choose6(topo, ns, regex=[rx])
    both = rf"^({re.escape(str(e1))}|{re.escape(str(h.ip))}|{re.escape(str(h.ip6))})$"
    assert _choose6(topo, ns, regex=[both]) == eth0
    # Matched by name without any IPv6 address (link-local counts) in dual stack: an error.
    assert _choose6(topo, ns, regex=["^eth1$"]).startswith(f"eth1 {e1} fe80::")
    topo.ip(ns, "-6", "addr", "flush", "dev", "eth1")
    assert "failed to find IPv6 address for interface eth1" in _choose6(topo, ns, regex=["^eth1$"])
    assert "couldn't lookup route" in _choose6(topo, ns, reach="not-an-ip")


# ---- what was written but untested: DirectRouting, device re-creation, host-gw IPv6-only,
# nftables dual stack, ip6tables resync --------------------------------------------------


def test_vxlan_direct_routing_ipv6_peer_on_link(dr6):
    """DirectRouting: an on-link peer gets `<v6 subnet> via <PublicIPv6> dev eth0` (and its
    IPv4 subnet via its PublicIP), not the flannel-v6.1 route; traffic flows over it."""
    topo, _etcd, nodes = dr6
    h0, h1 = topo.hosts[0], topo.hosts[1]
    s1 = _sub6(nodes[1])
    s1v4 = ipaddress.IPv4Interface(_env(nodes[1])["FLANNEL_SUBNET"]).network
    assert wait_until(
        lambda: f"{s1} via {h1.ip6} dev eth0" in topo.ip(h0.netns, "-6", "route"), 10
    ), topo.ip(h0.netns, "-6", "route")
    assert f"{s1v4} via {h1.ip} dev eth0" in topo.ip(h0.netns, "route")
    assert str(s1) not in topo.ip(h0.netns, "-6", "route", "show", "dev", "flannel-v6.1")
    c0, c1 = h0.container6, h1.container6
    assert c0 and c1
    assert topo.wait_ping(c0.netns, str(c1.ip), 15)
    assert _ping(topo, c1.netns, c0.ip, 1450 - 48)  # FLANNEL_MTU: no encapsulation on this hop


def test_nftables_dual_stack_rules_in_both_tables(dr6):
    topo, _etcd, nodes = dr6
    ns = topo.hosts[0].netns
    sub4 = ipaddress.IPv4Interface(_env(nodes[0])["FLANNEL_SUBNET"]).network
    sub6 = _sub6(nodes[0])

    def table(family: str, name: str) -> str:
        return topo.run(ns, "nft", "list", "table", family, name, check=False).stdout

    assert wait_until(lambda: "masquerade" in table("ip6", "flannel-ipv6"), 10)
    assert wait_until(lambda: "masquerade" in table("ip", "flannel-ipv4"), 10)
    ip4, ip6 = table("ip", "flannel-ipv4"), table("ip6", "flannel-ipv6")
    assert f"ip saddr {sub4} ip daddr 10.11.0.0/16 return" in ip4
    assert "ip saddr 10.11.0.0/16 ip daddr != 224.0.0.0/4 masquerade" in ip4
    assert "ip saddr 10.11.0.0/16 accept" in ip4 and "ip daddr 10.11.0.0/16 accept" in ip4
    assert f"ip6 saddr {sub6} ip6 daddr fd00:b::/56 return" in ip6
    assert "ip6 saddr fd00:b::/56 ip6 daddr != ff00::/8 masquerade" in ip6
    assert "ip6 saddr fd00:b::/56 accept" in ip6 and "ip6 daddr fd00:b::/56 accept" in ip6
    assert "10.11." not in ip6 and "fd00:b:" not in ip4
    # nftables mode: no iptables chains for either family
    for tool in ("iptables", "ip6tables"):
        res = topo.run(ns, tool, "-t", "nat", "-S", check=False)
        assert "FLANNEL-POSTRTG" not in res.stdout


def test_vxlan_v6_device_deleted_while_running_comes_back(vx):
    topo, _etcd, nodes = vx
    h0, h1 = topo.hosts[0], topo.hosts[1]
    ns, dev = h0.netns, "flannel-v6.1"
    mac = _mac(topo, ns, dev)
    sb, mac_b = _sub6(nodes[1]), _mac(topo, h1.netns, dev)
    topo.ip(ns, "link", "del", dev)
    assert wait_until(lambda: f"{dev}:" in topo.ip(ns, "-o", "link", "show"), 15)
    assert wait_until(lambda: all(_v6_state(topo, ns, sb, mac_b, h1.ip6)), 15), topo.ip(
        ns, "-6", "route"
    )
    assert _mac(topo, ns, dev) == mac  # the published VtepMAC stays valid
    assert "vxlan id 1 " in topo.ip(ns, "-d", "link", "show", dev)
    assert h0.container6 and h1.container6
    assert topo.wait_ping(h1.container6.netns, str(h0.container6.ip), 15)
    assert _ping(topo, h1.container6.netns, h0.container6.ip, 1430 - 48)


@pytest.mark.parametrize("bad", [("id", "7"), ("id", "1", "gbp")], ids=["other-vni", "gbp"])
def test_vxlan_v6_incompatible_device_recreated_on_start(vx, bad):
    topo, _etcd, nodes = vx
    h0, h1 = topo.hosts[0], topo.hosts[1]
    ns, dev = h0.netns, "flannel-v6.1"
    nodes[0].stop()
    topo.ip(ns, "link", "del", dev)
    topo.ip(
        ns,
        *("link", "add", dev, "type", "vxlan", *bad),
        *("local", str(h0.ip6), "dev", "eth0", "dstport", "8472", "nolearning"),
    )
    nodes[0].subnet_file.unlink(missing_ok=True)  # so the wait below is for the new daemon
    nodes[0].start()
    nodes[0].wait_subnet_file()

    def link() -> str:
        return topo.run(ns, "ip", "-d", "link", "show", dev, check=False).stdout

    def addrs() -> str:
        return topo.run(
            ns, "ip", "-6", "addr", "show", "dev", dev, "scope", "global", check=False
        ).stdout

    def recreated() -> bool:
        # the device and its /128 both in place: the daemon may still be re-creating it
        d = link()
        return (
            "vxlan id 1 " in d
            and "gbp" not in d
            and "UP" in d
            and f"inet6 {_sub6(nodes[0]).network_address}/128" in addrs()
        )

    assert wait_until(recreated, 15), link() + addrs() + topo.log_tail(nodes[0].logname, 20)
    assert h0.container6 and h1.container6
    assert topo.wait_ping(h1.container6.netns, str(h0.container6.ip), 15)
    assert _ping(topo, h0.container6.netns, h1.container6.ip, 1430 - 48)


def test_hostgw_ipv6_only_network(hgw6):
    topo, etcd, nodes = hgw6
    h0, h1 = topo.hosts[0], topo.hosts[1]
    env = _env(nodes[0])
    assert "FLANNEL_SUBNET" not in env and env["FLANNEL_MTU"] == "1500"
    value = _lease(etcd, nodes[1])
    assert value["PublicIP"] == "0.0.0.0" and value["PublicIPv6"] == str(h1.ip6)
    s1 = _sub6(nodes[1])
    assert wait_until(lambda: f"{s1} via {h1.ip6} dev eth0" in topo.ip(h0.netns, "-6", "route"), 10)
    assert "10." not in topo.ip(h0.netns, "route", "show", "dev", "eth0").replace(
        "192.168.100", ""
    )  # no IPv4 overlay routes
    assert h0.container6 and h1.container6
    assert topo.wait_ping(h0.container6.netns, str(h1.container6.ip), 15)
    assert _ping(topo, h0.container6.netns, h1.container6.ip, 1500 - 48)
    assert _ping(topo, h1.container6.netns, h0.container6.ip, 1500 - 48)


def test_ip6tables_chains_deleted_are_resynced(hgw6):
    """-iptables-resync: flanneld's FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter) for the
    IPv6Network come back, with their jumps, after an operator deletes them."""
    topo, _etcd, _nodes = hgw6
    ns = topo.hosts[0].netns

    def rules(table: str) -> list[str]:
        out = topo.run(ns, "ip6tables", "-t", table, "-S", check=False).stdout
        return sorted(ln for ln in out.splitlines() if "FLANNEL-" in ln)

    assert wait_until(lambda: any("MASQUERADE" in ln for ln in rules("nat")), 10)
    assert wait_until(lambda: any("-A FLANNEL-FWD" in ln for ln in rules("filter")), 10)
    before = {t: rules(t) for t in ("nat", "filter")}
    assert any("fd00:c::/56" in ln for ln in before["nat"])
    for table, chain in (("nat", "FLANNEL-POSTRTG"), ("filter", "FLANNEL-FWD")):
        for ln in before[table]:
            if ln.startswith("-A ") and f"-j {chain}" in ln and not ln.startswith(f"-A {chain}"):
                topo.run(ns, "ip6tables", "-t", table, "-D", *shlex.split(ln)[1:])
        topo.run(ns, "ip6tables", "-t", table, "-F", chain)
        topo.run(ns, "ip6tables", "-t", table, "-X", chain)
    assert rules("nat") == [] and rules("filter") == []
    assert wait_until(lambda: {t: rules(t) for t in ("nat", "filter")} == before, 15), rules("nat")

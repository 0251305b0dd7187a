"""The kernel backends (vxlan, host-gw) end to end, against flanneld's exact kernel state.

Daemons run in host namespaces against a real etcd; the neighbour/FDB/route entries are
read back with iproute2 (an independent oracle), and traffic is real: ping both ways and
a TCP transfer checked with sha256. Fake peers are plain `etcdctl put`s of leases in
flannel's format, which is also how a flanneld node would appear.
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal

import pytest

from fastlane.backend.base import BackendContext, BackendError
from fastlane.config import parse_config
from fastlane.iface import Interface
from tests.daemon_helpers import Node, leases, overlay, transfer, unleased, wait_until

PREFIX = "/coreos.com/network"
VXLAN = '{"Network":"10.6.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}'
HOSTGW = '{"Network":"10.7.0.0/16","Backend":{"Type":"host-gw"}}'


def _overlay(config: str, name: str, tmp_path_factory):
    yield from overlay(config, name, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="module")
def vxlan(net_capable, tmp_path_factory):
    yield from _overlay(VXLAN, "vxlan", tmp_path_factory)


@pytest.fixture(scope="module")
def hostgw(net_capable, tmp_path_factory):
    yield from _overlay(HOSTGW, "hostgw", tmp_path_factory)


# ---- helpers ---------------------------------------------------------------------------


def _subnet(node: Node) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Interface(node.wait_subnet_file()["FLANNEL_SUBNET"]).network


def _lease_value(etcd, node: Node) -> str:
    s = _subnet(node)
    return leases(etcd, PREFIX)[f"{PREFIX}/subnets/{s.network_address}-{s.prefixlen}"]


def _mac(topo, netns: str, dev: str = "flannel.1") -> str:
    out = topo.ip(netns, "-o", "link", "show", dev)
    m = re.search(r"link/ether ([0-9a-f:]{17})", out)
    assert m is not None, out
    return m.group(1)


def _neigh(topo, netns):
    return topo.ip(netns, "neigh", "show", "dev", "flannel.1")


def _fdb(topo, netns):
    return topo.run(netns, "bridge", "fdb", "show", "dev", "flannel.1").stdout


def _routes(topo, netns):
    return topo.ip(netns, "route", "show")


def _vxlan_state(topo, netns, subnet, mac, ip) -> tuple[bool, bool, bool]:
    dst = subnet.network_address
    return (
        f"{dst} lladdr {mac} PERMANENT" in _neigh(topo, netns),
        f"{mac} dst {ip} self permanent" in _fdb(topo, netns),
        f"{subnet} via {dst} dev flannel.1 onlink" in _routes(topo, netns),
    )


def _put_lease(etcd, subnet: str, value: dict) -> str:
    key = f"{PREFIX}/subnets/{subnet.replace('/', '-')}"
    etcd.etcdctl("put", key, json.dumps(value, separators=(",", ":")))
    return key


def _ctx(config: str, public_ip: str = "192.168.100.1") -> BackendContext:
    iface = Interface("eth0", 2, ipaddress.IPv4Address("192.168.100.1"), 1500)
    return BackendContext(parse_config(config), iface, ipaddress.IPv4Address(public_ip))


# ---- options (no kernel needed) --------------------------------------------------------


@pytest.mark.parametrize(
    "backend,err",
    [
        ('{"Type":"vxlan","VNI":"1"}', "Backend.VNI must be an integer"),
        ('{"Type":"vxlan","VNI":16777216}', "Backend.VNI must be an integer"),
        ('{"Type":"vxlan","VNI":12345678}', "exceeds 15 characters"),
        ('{"Type":"vxlan","Port":70000}', "Backend.Port must be an integer"),
        ('{"Type":"vxlan","MTU":100}', "Backend.MTU must be an integer"),
        ('{"Type":"vxlan","DirectRouting":"yes"}', "Backend.DirectRouting must be true or false"),
        ('{"Type":"vxlan","gbp":1}', "Backend.GBP must be true or false"),
    ],
)
def test_vxlan_bad_options_are_one_line_errors(backend, err):
    from fastlane.backend.vxlan import VxlanBackend

    with pytest.raises(BackendError, match=re.escape(err)) as exc:
        VxlanBackend(_ctx(f'{{"Network":"10.6.0.0/16","Backend":{backend}}}'))
    assert "\n" not in str(exc.value)


def test_vxlan_options_like_flannel():
    from fastlane.backend.vxlan import VxlanBackend

    be = VxlanBackend(_ctx('{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan"}}'))
    assert (be.vni, be.port, be.mtu, be.ifname, be.learning, be.gbp) == (
        1,
        8472,
        1450,
        "flannel.1",
        False,
        False,
    )
    be = VxlanBackend(
        _ctx('{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan","vni":42,"port":4789,"mtu":9000}}')
    )
    assert (be.vni, be.port, be.mtu, be.ifname) == (42, 4789, 8950, "flannel.42")


def test_vtep_mac_parsing_accepts_go_forms():
    from fastlane.backend.vxlan import vtep_mac

    assert vtep_mac({"VtepMAC": "C6:D2:32:6F:8F:44"}) == "c6:d2:32:6f:8f:44"
    assert vtep_mac({"vtepmac": "c6-d2-32-6f-8f-44"}) == "c6:d2:32:6f:8f:44"
    assert vtep_mac({"VtepMAC": "c6d2.326f.8f44"}) == "c6:d2:32:6f:8f:44"
    assert vtep_mac({"VtepMAC": "c6:d2:32:6f:8f"}) is None
    assert vtep_mac({"VtepMAC": 5}) is None
    assert vtep_mac(None) is None


def test_hostgw_refuses_nat_public_ip_without_kernel():
    from fastlane.backend.hostgw import HostGwBackend

    with pytest.raises(BackendError, match="probably you're on a NAT"):
        HostGwBackend(_ctx(HOSTGW, public_ip="203.0.113.9"))


# ---- vxlan -----------------------------------------------------------------------------


def test_vxlan_lease_value_and_device_match_flanneld(vxlan):
    topo, etcd, nodes = vxlan
    for i, node in enumerate(nodes):
        h = topo.hosts[i]
        mac = _mac(topo, h.netns)
        assert _lease_value(etcd, node) == (
            f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}'
        )
        assert node.wait_subnet_file()["FLANNEL_MTU"] == "1450"
        link = topo.ip(h.netns, "-d", "link", "show", "flannel.1")
        assert "mtu 1450" in link and re.search(r"<[^>]*\bUP\b", link), link
        assert f"vxlan id 1 local {h.ip} dev eth0" in link
        assert "dstport 8472" in link and "nolearning" in link
        addrs = topo.ip(h.netns, "-o", "-4", "addr", "show", "dev", "flannel.1")
        assert addrs.count("inet ") == 1 and f"inet {_subnet(node).network_address}/32" in addrs


def test_vxlan_peer_entries_like_flanneld(vxlan):
    topo, etcd, nodes = vxlan
    for me, peer in ((0, 1), (1, 0)):
        subnet, mac = _subnet(nodes[peer]), _mac(topo, topo.hosts[peer].netns)
        assert wait_until(
            lambda: all(_vxlan_state(topo, topo.hosts[me].netns, subnet, mac, topo.hosts[peer].ip)),
            10,
        ), (
            _neigh(topo, topo.hosts[me].netns)
            + _fdb(topo, topo.hosts[me].netns)
            + _routes(topo, topo.hosts[me].netns)
        )


def test_vxlan_ping_both_ways_at_overlay_mtu(vxlan):
    topo, _, _ = vxlan
    a, b = topo.hosts[0].container, topo.hosts[1].container
    assert topo.wait_ping(a.netns, b.ip, 20), "no connectivity c0 -> c1"
    assert topo.ping(b.netns, a.ip, count=2)
    res = topo.run(
        a.netns, "ping", "-n", "-c", "2", "-M", "do", "-s", str(1450 - 28), str(b.ip), check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_vxlan_tcp_transfer_sha256_matches(vxlan):
    topo, _, _ = vxlan
    a, b = topo.hosts[0].container, topo.hosts[1].container
    sent, got = transfer(topo, a.netns, b.netns, b.ip, 20 * 1024 * 1024, port=5101, timeout=120)
    assert sent == got and sent[0] == str(20 * 1024 * 1024)
    sent, got = transfer(topo, b.netns, a.netns, a.ip, 4 * 1024 * 1024, port=5102, timeout=120)
    assert sent == got


def test_vxlan_fake_peer_added_changed_ignored_and_removed(vxlan):
    topo, etcd, nodes = vxlan
    ns = topo.hosts[0].netns
    subnet, other = map(ipaddress.IPv4Network, unleased(etcd, PREFIX, "10.6.0.0/16", 2))
    peer_ip = "192.168.100.200"
    key = _put_lease(
        etcd,
        str(subnet),
        {
            "PublicIP": peer_ip,
            "PublicIPv6": None,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:01"},
        },
    )
    # A peer of another backend type is ignored, as flanneld does.
    key2 = _put_lease(
        etcd,
        str(other),
        {"PublicIP": "192.168.100.201", "PublicIPv6": None, "BackendType": "host-gw"},
    )
    try:
        assert wait_until(
            lambda: all(_vxlan_state(topo, ns, subnet, "0a:00:00:00:00:01", peer_ip)), 10
        )
        assert str(other) not in _routes(topo, ns)
        assert "ignoring non-vxlan subnet" in nodes[0].log()
        # Its VtepMAC changes (the peer re-created its device): no stale FDB entry remains.
        _put_lease(
            etcd,
            str(subnet),
            {
                "PublicIP": peer_ip,
                "PublicIPv6": None,
                "BackendType": "vxlan",
                "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:02"},
            },
        )
        assert wait_until(
            lambda: all(_vxlan_state(topo, ns, subnet, "0a:00:00:00:00:02", peer_ip)), 10
        )
        assert "0a:00:00:00:00:01" not in _fdb(topo, ns)
        etcd.etcdctl("del", key)
        assert wait_until(
            lambda: not any(_vxlan_state(topo, ns, subnet, "0a:00:00:00:00:02", peer_ip)), 10
        )
        assert str(subnet.network_address) not in _neigh(topo, ns)
        assert "0a:00:00:00:00:02" not in _fdb(topo, ns)
        assert str(subnet) not in _routes(topo, ns)
    finally:
        etcd.etcdctl("del", key)
        etcd.etcdctl("del", key2)


def test_vxlan_burst_of_puts_and_deletes_ends_in_the_right_state(vxlan):
    """Updates are applied in order: a put followed at once by a delete leaves nothing."""
    topo, etcd, nodes = vxlan
    ns = topo.hosts[0].netns
    subnets = list(map(ipaddress.IPv4Network, unleased(etcd, PREFIX, "10.6.0.0/16", 40)))
    gone, kept = subnets[:20], subnets[20:]

    def value(i: int) -> dict:
        return {
            "PublicIP": f"192.168.100.{100 + i}",
            "PublicIPv6": None,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": f"0a:00:00:00:01:{i:02x}"},
        }

    keys = []
    try:
        for i, s in enumerate(subnets):
            keys.append(_put_lease(etcd, str(s), value(i)))
        for s in gone:
            etcd.etcdctl("del", f"{PREFIX}/subnets/{s.network_address}-24")

        def settled() -> bool:
            routes, fdb, neigh = _routes(topo, ns), _fdb(topo, ns), _neigh(topo, ns)
            return (
                all(f"{s} via" in routes for s in kept)
                and not any(f"{s} via" in routes for s in gone)
                and all(f"0a:00:00:00:01:{i:02x}" in fdb for i in range(20, 40))
                and not any(f"0a:00:00:00:01:{i:02x}" in fdb for i in range(20))
                and not any(f"{s.network_address} lladdr" in neigh for s in gone)
            )

        assert wait_until(settled, 15), _routes(topo, ns)
        assert nodes[0].proc.poll() is None
    finally:
        for k in keys:
            etcd.etcdctl("del", k)
    assert wait_until(lambda: not any(f"{s} via" in _routes(topo, ns) for s in subnets), 10)


def test_vxlan_device_deleted_is_recreated_with_same_mac(vxlan):
    topo, _, nodes = vxlan
    h = topo.hosts[0]
    mac = _mac(topo, h.netns)
    topo.ip(h.netns, "link", "del", "flannel.1")
    assert wait_until(lambda: "flannel.1" in topo.ip(h.netns, "-o", "link", "show"), 15), nodes[
        0
    ].log()[-2000:]
    assert _mac(topo, h.netns) == mac
    assert topo.wait_ping(h.container.netns, topo.hosts[1].container.ip, 15), nodes[0].log()[-2000:]


def test_vxlan_restart_keeps_vtep_mac_and_sweeps_stale_entries(vxlan):
    topo, etcd, nodes = vxlan
    h = topo.hosts[1]
    mac = _mac(topo, h.netns)
    before = _lease_value(etcd, nodes[1])
    nodes[1].stop(signal.SIGTERM)
    # flanneld leaves the device and the entries in place: traffic keeps flowing meanwhile.
    assert topo.ping(topo.hosts[0].container.netns, h.container.ip, count=2)
    # Entries for a subnet nobody holds (its lease vanished while we were down).
    topo.ip(
        h.netns,
        "neigh",
        "replace",
        "10.6.249.0",
        "lladdr",
        "0a:00:00:00:00:09",
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    )
    topo.run(
        h.netns,
        "bridge",
        "fdb",
        "replace",
        "0a:00:00:00:00:09",
        "dev",
        "flannel.1",
        "dst",
        "192.168.100.209",
        "self",
        "permanent",
    )
    topo.ip(
        h.netns,
        "route",
        "replace",
        "10.6.249.0/24",
        "via",
        "10.6.249.0",
        "dev",
        "flannel.1",
        "onlink",
    )
    # A host-gw-shaped route on eth0 is not vxlan's (no DirectRouting): it stays.
    topo.ip(h.netns, "route", "replace", "10.6.248.0/24", "via", "192.168.100.248", "dev", "eth0")
    try:
        nodes[1].subnet_file.unlink()
        nodes[1].start()
        nodes[1].wait_subnet_file()
        assert wait_until(lambda: "10.6.249.0" not in _routes(topo, h.netns), 15), nodes[1].log()[
            -2000:
        ]
        assert "10.6.248.0/24 via 192.168.100.248 dev eth0" in _routes(topo, h.netns)
        assert "0a:00:00:00:00:09" not in _fdb(topo, h.netns)
        assert "10.6.249.0" not in _neigh(topo, h.netns)
        assert _mac(topo, h.netns) == mac
        assert _lease_value(etcd, nodes[1]) == before
        assert topo.wait_ping(h.container.netns, topo.hosts[0].container.ip, 15)
    finally:
        topo.run(h.netns, "ip", "route", "del", "10.6.248.0/24", check=False)


def test_vxlan_incompatible_device_is_recreated_keeping_mac(vxlan):
    """GBP differs: flanneld's vxlanLinksIncompat says re-create (a dstport would not, see
    tests/test_kernel_state.py)."""
    topo, etcd, nodes = vxlan
    h, other = topo.hosts[1], topo.hosts[0]
    nodes[1].stop(signal.SIGKILL)
    topo.ip(h.netns, "link", "del", "flannel.1")
    topo.ip(
        h.netns,
        "link",
        "add",
        "flannel.1",
        "address",
        "02:aa:bb:cc:dd:ee",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        str(h.ip),
        "dev",
        "eth0",
        "dstport",
        "8472",
        "gbp",
    )
    nodes[1].subnet_file.unlink()
    nodes[1].start()
    nodes[1].wait_subnet_file()
    link = topo.ip(h.netns, "-d", "link", "show", "flannel.1")
    assert "dstport 8472" in link and "nolearning" in link and " gbp " not in link
    assert _mac(topo, h.netns) == "02:aa:bb:cc:dd:ee"
    assert json.loads(_lease_value(etcd, nodes[1]))["BackendData"]["VtepMAC"] == "02:aa:bb:cc:dd:ee"
    assert "incompatible configuration: gbp: false vs true" in nodes[1].log()
    # The other node follows the lease change; traffic flows both ways again.
    assert wait_until(lambda: "02:aa:bb:cc:dd:ee" in _fdb(topo, other.netns), 10)
    assert topo.wait_ping(other.container.netns, h.container.ip, 15)
    assert topo.ping(h.container.netns, other.container.ip, count=2)


def _restart_all(topo, etcd, nodes, config: str) -> None:
    etcd.etcdctl("put", f"{PREFIX}/config", config)
    for n in nodes:
        n.stop(signal.SIGTERM)
        n.subnet_file.unlink()
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_subnet_file()


def test_vxlan_options_vni_port_mtu_gbp(vxlan):
    topo, etcd, nodes = vxlan
    _restart_all(
        topo,
        etcd,
        nodes,
        '{"Network":"10.6.0.0/16","SubnetLen":24,"Backend":'
        '{"Type":"vxlan","VNI":7,"Port":4789,"MTU":1400,"GBP":true}}',
    )
    for i, n in enumerate(nodes):
        h = topo.hosts[i]
        assert n.wait_subnet_file()["FLANNEL_MTU"] == "1350"
        link = topo.ip(h.netns, "-d", "link", "show", "flannel.7")
        assert (
            "mtu 1350" in link
            and "vxlan id 7 " in link
            and "dstport 4789" in link
            and " gbp " in link
        )
        data = json.loads(_lease_value(etcd, n))["BackendData"]
        assert data == {"VNI": 7, "VtepMAC": _mac(topo, h.netns, "flannel.7")}
    a, b = topo.hosts[0].container, topo.hosts[1].container
    want = f"{_subnet(nodes[1])} via {_subnet(nodes[1]).network_address} dev flannel.7 onlink"
    assert wait_until(lambda: want in _routes(topo, topo.hosts[0].netns), 10), _routes(
        topo, topo.hosts[0].netns
    )
    assert topo.wait_ping(a.netns, b.ip, 15), nodes[0].log()[-2000:]
    res = topo.run(
        b.netns, "ping", "-n", "-c", "2", "-M", "do", "-s", str(1350 - 28), str(a.ip), check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_vxlan_direct_routing_on_same_l2(vxlan):
    topo, etcd, nodes = vxlan
    _restart_all(
        topo,
        etcd,
        nodes,
        '{"Network":"10.6.0.0/16","SubnetLen":24,"Backend":'
        '{"Type":"vxlan","VNI":7,"Port":4789,"MTU":1400,"GBP":true,"DirectRouting":true}}',
    )
    for me, peer in ((0, 1), (1, 0)):
        ns, subnet = topo.hosts[me].netns, _subnet(nodes[peer])
        want = f"{subnet} via {topo.hosts[peer].ip} dev eth0"
        assert wait_until(lambda: want in _routes(topo, ns), 10), _routes(topo, ns)
        # The encapsulated path's entries from the previous run are swept.
        assert wait_until(
            lambda: (
                str(subnet.network_address) not in topo.ip(ns, "neigh", "show", "dev", "flannel.7")
            ),
            5,
        )
        assert (
            str(topo.hosts[peer].ip)
            not in topo.run(ns, "bridge", "fdb", "show", "dev", "flannel.7").stdout
        )
    a, b = topo.hosts[0].container, topo.hosts[1].container
    assert topo.wait_ping(a.netns, b.ip, 15)
    assert topo.ping(b.netns, a.ip, count=2)
    # A direct route deleted by hand comes back on the next periodic check.
    ns, subnet = topo.hosts[0].netns, _subnet(nodes[1])
    topo.ip(ns, "route", "del", str(subnet))
    assert wait_until(lambda: f"{subnet} via {topo.hosts[1].ip} dev eth0" in _routes(topo, ns), 15)


# ---- host-gw ---------------------------------------------------------------------------


def test_hostgw_lease_value_mtu_and_routes_match_flanneld(hostgw):
    topo, etcd, nodes = hostgw
    for i, node in enumerate(nodes):
        h, peer = topo.hosts[i], topo.hosts[1 - i]
        assert (
            _lease_value(etcd, node)
            == f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
        )
        assert node.wait_subnet_file()["FLANNEL_MTU"] == "1500"
        want = f"{_subnet(nodes[1 - i])} via {peer.ip} dev eth0"
        assert wait_until(lambda: want in _routes(topo, h.netns), 10), _routes(topo, h.netns)


def test_hostgw_ping_and_tcp_transfer(hostgw):
    topo, _, _ = hostgw
    a, b = topo.hosts[0].container, topo.hosts[1].container
    assert topo.wait_ping(a.netns, b.ip, 20)
    assert topo.ping(b.netns, a.ip, count=2)
    res = topo.run(
        a.netns, "ping", "-n", "-c", "2", "-M", "do", "-s", str(1500 - 28), str(b.ip), check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    sent, got = transfer(topo, b.netns, a.netns, a.ip, 20 * 1024 * 1024, port=5201, timeout=120)
    assert sent == got and sent[0] == str(20 * 1024 * 1024)


def test_hostgw_fake_peer_added_ignored_removed_and_repaired(hostgw):
    topo, etcd, nodes = hostgw
    ns = topo.hosts[0].netns
    subnet, other = map(ipaddress.IPv4Network, unleased(etcd, PREFIX, "10.7.0.0/16", 2))
    key = _put_lease(
        etcd,
        str(subnet),
        {"PublicIP": "192.168.100.200", "PublicIPv6": None, "BackendType": "host-gw"},
    )
    key2 = _put_lease(
        etcd,
        str(other),
        {
            "PublicIP": "192.168.100.201",
            "PublicIPv6": None,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "0a:00:00:00:00:03"},
        },
    )
    want = f"{subnet} via 192.168.100.200 dev eth0"
    try:
        assert wait_until(lambda: want in _routes(topo, ns), 10)
        assert str(other) not in _routes(topo, ns)
        # Someone deletes our route: the periodic check puts it back (flanneld: routeCheck).
        topo.ip(ns, "route", "del", str(subnet))
        assert wait_until(lambda: want in _routes(topo, ns), 15), nodes[0].log()[-2000:]
        etcd.etcdctl("del", key)
        assert wait_until(lambda: str(subnet) not in _routes(topo, ns), 10)
        # A peer that is not on our L2 segment cannot be a gateway: one error line, no crash.
        _put_lease(
            etcd,
            str(subnet),
            {"PublicIP": "10.99.0.1", "PublicIPv6": None, "BackendType": "host-gw"},
        )
        assert wait_until(lambda: f"cannot add route {subnet} via 10.99.0.1" in nodes[0].log(), 10)
        assert nodes[0].proc.poll() is None and "Traceback" not in nodes[0].log()
    finally:
        etcd.etcdctl("del", key)
        etcd.etcdctl("del", key2)


def test_hostgw_refuses_public_ip_not_on_interface(hostgw, tmp_path):
    topo, etcd, _ = hostgw
    before = leases(etcd, PREFIX)
    node = Node(topo, topo.hosts[0], etcd, PREFIX, tmp_path, "-public-ip=192.168.100.77")
    node.start()
    try:
        assert node.wait_exit(20) == 1, node.log()
        log = node.log()
        assert "probably you're on a NAT" in log
        assert "Traceback" not in log
        assert leases(etcd, PREFIX) == before
    finally:
        node.stop(signal.SIGKILL)

"""Kernel state, conservatively: fastlane removes what it (or flanneld) wrote and nothing else.

Real daemons in namespaces against a real etcd. Operator entries are added with iproute2
while the daemon is stopped, then must survive a start and a restart; stale fastlane
entries (a peer's lease vanished meanwhile) must be gone. A pre-existing flannel.1 is
kept or re-created by flanneld's rule (pkg/backend/vxlan/device.go, vxlanLinksIncompat,
v0.28.9). Every test undoes what it added, pass or fail.
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal

import pytest

from tests.daemon_helpers import Node, leases, overlay, wait_until

PREFIX = "/coreos.com/network"
VXLAN = '{"Network":"10.8.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}'
HOSTGW = '{"Network":"10.9.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}'


@pytest.fixture(scope="module")
def vxlan(net_capable, tmp_path_factory):
    yield from overlay(VXLAN, "kstate-vxlan", tmp_path_factory.mktemp("kstate-vxlan"))


@pytest.fixture(scope="module")
def hostgw(net_capable, tmp_path_factory):
    yield from overlay(HOSTGW, "kstate-hostgw", tmp_path_factory.mktemp("kstate-hostgw"))


def _subnet(node: Node) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Interface(node.wait_subnet_file()["FLANNEL_SUBNET"]).network


def _lease_value(etcd, node: Node) -> str:
    s = _subnet(node)
    return leases(etcd, PREFIX)[f"{PREFIX}/subnets/{s.network_address}-{s.prefixlen}"]


def _ip(topo, ns, *args) -> str:
    return topo.ip(ns, *args)


def _fdb_append(topo, ns, mac: str, dst: str, dev: str = "flannel.1") -> None:
    """A permanent FDB entry as flanneld (or an operator) writes one."""
    topo.run(ns, "bridge", "fdb", "append", mac, "dev", dev, "dst", dst, "self", "permanent")


def _try(topo, ns, *cmd) -> None:
    topo.run(ns, *cmd, check=False)


def _routes(topo, ns, *extra) -> str:
    return topo.ip(ns, "route", "show", *extra)


def _neigh(topo, ns, dev="flannel.1") -> str:
    return topo.ip(ns, "neigh", "show", "dev", dev)


def _fdb(topo, ns, dev="flannel.1") -> str:
    return topo.run(ns, "bridge", "fdb", "show", "dev", dev).stdout


def _link(topo, ns, dev="flannel.1") -> str:
    return topo.ip(ns, "-d", "link", "show", dev)


def _ifindex(topo, ns, dev="flannel.1") -> int:
    return int(topo.ip(ns, "-o", "link", "show", dev).split(":", 1)[0])


def _mac(topo, ns, dev="flannel.1") -> str:
    m = re.search(r"link/ether ([0-9a-f:]{17})", topo.ip(ns, "-o", "link", "show", dev))
    assert m is not None
    return m.group(1)


def _restart(node: Node) -> None:
    node.stop(signal.SIGTERM)
    node.subnet_file.unlink(missing_ok=True)
    node.start()
    node.wait_subnet_file()


# ---- vxlan: what is ours and what is not ---------------------------------------------------


def test_vxlan_operator_entries_survive_start_and_restart_stale_ones_go(vxlan):
    topo, etcd, nodes = vxlan
    h, peer = topo.hosts[1], topo.hosts[0]
    ns, node = h.netns, nodes[1]
    peer_mac = _mac(topo, peer.netns)
    index = _ifindex(topo, ns)
    node.stop(signal.SIGTERM)
    # The operator's: outside the Network via flannel.1; inside it on flannel.1 but with
    # another proto / metric / table; inside it via another device (cni0, eth0); a neighbour
    # and an address outside the Network on flannel.1; the flood entry and a unicast FDB
    # entry for a MAC and address no flannel node uses.
    operator = [
        ("route", "add", "172.31.5.0/24", "via", "10.8.252.0", "dev", "flannel.1", "onlink"),
        (
            "route",
            "add",
            "10.8.253.0/24",
            "via",
            "10.8.253.0",
            "dev",
            "flannel.1",
            "onlink",
            "proto",
            "static",
        ),
        (
            "route",
            "add",
            "10.8.254.0/24",
            "via",
            "10.8.254.0",
            "dev",
            "flannel.1",
            "onlink",
            "metric",
            "10",
        ),
        (
            "route",
            "add",
            "10.8.249.0/24",
            "via",
            "10.8.249.0",
            "dev",
            "flannel.1",
            "onlink",
            "table",
            "100",
        ),
        ("route", "add", "10.8.250.0/24", "via", str(h.container.ip), "dev", "cni0"),
        ("route", "add", "10.8.251.0/24", "via", "192.168.100.251", "dev", "eth0"),
        (
            "route",
            "add",
            "10.8.247.7/32",
            "via",
            "192.168.100.247",
            "dev",
            "eth0",
            "proto",
            "static",
        ),
        (
            "neigh",
            "add",
            "172.31.5.1",
            "lladdr",
            "0a:00:00:00:0e:01",
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ),
        ("addr", "add", "172.31.9.1/32", "dev", "flannel.1"),
    ]
    fdb_operator = [
        ("00:00:00:00:00:00", "192.168.100.240"),
        ("0a:00:00:00:0e:02", "192.168.100.241"),
    ]
    # Stale fastlane/flanneld entries: a vanished peer's neighbour, FDB entry and route, the
    # live peer's VTEP at an address it no longer has, an address of the Network on flannel.1.
    stale = [
        (
            "neigh",
            "replace",
            "10.8.248.0",
            "lladdr",
            "0a:00:00:00:0f:01",
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ),
        ("route", "replace", "10.8.248.0/24", "via", "10.8.248.0", "dev", "flannel.1", "onlink"),
        ("addr", "add", "10.8.255.1/32", "dev", "flannel.1"),
    ]
    fdb_stale = [("0a:00:00:00:0f:01", "192.168.100.248"), (peer_mac, "192.168.100.246")]
    try:
        for cmd in operator:
            _ip(topo, ns, *cmd)
        for mac, dst in fdb_operator:
            _fdb_append(topo, ns, mac, dst)

        def operator_intact() -> list[str]:
            main, t100 = _routes(topo, ns), _routes(topo, ns, "table", "100")
            fdb, neigh = _fdb(topo, ns), _neigh(topo, ns)
            addrs = topo.ip(ns, "-o", "-4", "addr", "show", "dev", "flannel.1")
            missing = [
                want
                for want, where in (
                    ("172.31.5.0/24 via 10.8.252.0 dev flannel.1 onlink", main),
                    ("10.8.253.0/24 via 10.8.253.0 dev flannel.1 proto static onlink", main),
                    ("10.8.254.0/24 via 10.8.254.0 dev flannel.1 metric 10 onlink", main),
                    ("10.8.249.0/24 via 10.8.249.0 dev flannel.1 onlink", t100),
                    (f"10.8.250.0/24 via {h.container.ip} dev cni0", main),
                    ("10.8.251.0/24 via 192.168.100.251 dev eth0", main),
                    ("10.8.247.7 via 192.168.100.247 dev eth0 proto static", main),
                    ("172.31.5.1 lladdr 0a:00:00:00:0e:01 PERMANENT", neigh),
                    ("00:00:00:00:00:00 dst 192.168.100.240 self permanent", fdb),
                    ("0a:00:00:00:0e:02 dst 192.168.100.241 self permanent", fdb),
                    ("inet 172.31.9.1/32", addrs),
                )
                if want not in where
            ]
            return missing

        assert operator_intact() == []
        for _attempt in range(2):  # a start, then a restart
            for cmd in stale:
                _try(topo, ns, "ip", *cmd)
            for mac, dst in fdb_stale:
                _fdb_append(topo, ns, mac, dst)
            node.subnet_file.unlink(missing_ok=True)
            node.start()
            node.wait_subnet_file()
            assert wait_until(lambda: "10.8.248.0" not in _routes(topo, ns), 15), node.log()[-3000:]
            assert wait_until(lambda: "10.8.248.0" not in _neigh(topo, ns), 5)
            assert wait_until(
                lambda: (
                    "0a:00:00:00:0f:01" not in _fdb(topo, ns)
                    and "192.168.100.246" not in _fdb(topo, ns)
                ),
                5,
            ), _fdb(topo, ns)
            assert "10.8.255.1" not in topo.ip(ns, "-o", "-4", "addr", "show", "dev", "flannel.1")
            assert operator_intact() == [], node.log()[-3000:]
            assert _ifindex(topo, ns) == index  # the device was reused, never re-created
            assert topo.wait_ping(h.container.netns, peer.container.ip, 15), node.log()[-2000:]
            node.stop(signal.SIGTERM)
        node.start()
        node.wait_subnet_file()
    finally:
        for cmd in operator + stale:
            _try(topo, ns, "ip", cmd[0], "del", *cmd[2:])
        for mac, dst in fdb_operator + fdb_stale:
            _try(topo, ns, "bridge", "fdb", "del", mac, "dev", "flannel.1", "dst", dst, "self")
        if node.proc is None or node.proc.poll() is not None:
            node.start()
            node.wait_subnet_file()


# ---- vxlan: re-use of an existing device ---------------------------------------------------


def _replace_device(topo, node: Node, host, *spec: str) -> None:
    node.stop(signal.SIGTERM)
    topo.run(host.netns, "ip", "link", "del", "flannel.1", check=False)
    topo.ip(host.netns, "link", "add", "flannel.1", *spec)


def _fresh_device(topo, node: Node, host) -> None:
    """Back to a device fastlane creates itself."""
    node.stop(signal.SIGTERM)
    topo.run(host.netns, "ip", "link", "del", "flannel.1", check=False)
    node.subnet_file.unlink(missing_ok=True)
    node.start()
    node.wait_subnet_file()


# Differences flanneld's vxlanLinksIncompat does not look at (or only when both sides set it).
TOLERATED = {
    "learning-mtu-dstport": (
        [
            "mtu",
            "1400",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            "{ip}",
            "dev",
            "eth0",
            "dstport",
            "4789",
            "learning",
        ],
        ["dstport 4789", "nolearning", "mtu 1450"],
        "dstport 4789 (Backend.Port not set)",
    ),
    "remote-no-local-no-dev": (
        ["type", "vxlan", "id", "1", "remote", "192.168.100.239", "dstport", "8472", "nolearning"],
        ["remote 192.168.100.239", "dstport 8472"],
        "remote/group 192.168.100.239",
    ),
    "l3miss-ttl": (
        [
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            "{ip}",
            "dev",
            "eth0",
            "dstport",
            "8472",
            "l3miss",
            "ttl",
            "10",
        ],
        ["l3miss", "ttl 10"],
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(TOLERATED))
def test_vxlan_device_with_tolerated_difference_is_kept(vxlan, case):
    topo, etcd, nodes = vxlan
    h, node = topo.hosts[1], nodes[1]
    spec, want, warning = TOLERATED[case]
    mac = "02:aa:bb:cc:dd:01"
    try:
        _replace_device(topo, node, h, "address", mac, *[s.format(ip=h.ip) for s in spec])
        index = _ifindex(topo, h.netns)
        node.subnet_file.unlink(missing_ok=True)
        node.start()
        node.wait_subnet_file()
        link = _link(topo, h.netns)
        assert _ifindex(topo, h.netns) == index, node.log()[-2000:]
        assert "incompatible configuration" not in node.log()
        for w in want:
            assert w in link, link
        assert _mac(topo, h.netns) == mac
        assert json.loads(_lease_value(etcd, node))["BackendData"] == {"VNI": 1, "VtepMAC": mac}
        if warning:
            assert warning in node.log()
    finally:
        _fresh_device(topo, node, h)


# Differences that make flanneld delete and re-create the device.
INCOMPATIBLE = {
    "gbp": (
        ["type", "vxlan", "id", "1", "local", "{ip}", "dev", "eth0", "dstport", "8472", "gbp"],
        "gbp: false vs true",
    ),
    "l2miss": (
        ["type", "vxlan", "id", "1", "local", "{ip}", "dev", "eth0", "dstport", "8472", "l2miss"],
        "l2miss: false vs true",
    ),
    "vni": (
        ["type", "vxlan", "id", "2", "local", "{ip}", "dev", "eth0", "dstport", "8472"],
        "vni: 1 vs 2",
    ),
    "local": (
        ["type", "vxlan", "id", "1", "local", "192.168.100.99", "dev", "eth0", "dstport", "8472"],
        "vtep (external) IP: {ip} vs 192.168.100.99",
    ),
    "dev": (
        ["type", "vxlan", "id", "1", "local", "{ip}", "dev", "cni0", "dstport", "8472"],
        "vtep (external) interface:",
    ),
    "type": (["type", "veth", "peer", "name", "flk-peer"], "link type: vxlan vs veth"),
}


@pytest.mark.parametrize("case", sorted(INCOMPATIBLE))
def test_vxlan_device_with_intolerable_difference_is_recreated(vxlan, case):
    topo, etcd, nodes = vxlan
    h, other, node = topo.hosts[1], topo.hosts[0], nodes[1]
    spec, why = INCOMPATIBLE[case]
    try:
        _replace_device(topo, node, h, *[s.format(ip=h.ip) for s in spec])
        index = _ifindex(topo, h.netns)
        node.subnet_file.unlink(missing_ok=True)
        node.start()
        node.wait_subnet_file()
        assert f"incompatible configuration: {why.format(ip=h.ip)}" in node.log()
        link = _link(topo, h.netns)
        assert _ifindex(topo, h.netns) != index
        assert f"vxlan id 1 local {h.ip} dev eth0" in link and "dstport 8472" in link, link
        assert "nolearning" in link and " gbp " not in link and "l2miss" not in link
        mac = _mac(topo, h.netns)
        assert json.loads(_lease_value(etcd, node))["BackendData"] == {"VNI": 1, "VtepMAC": mac}
        assert wait_until(lambda: mac in _fdb(topo, other.netns), 10)
        assert topo.wait_ping(other.container.netns, h.container.ip, 15), node.log()[-2000:]
    finally:
        _fresh_device(topo, node, h)


def test_vxlan_device_changed_by_hand_while_running_is_fixed_in_place(vxlan):
    """A MAC someone changed is set back (peers know us by it); a learning flag someone
    changed is tolerated, as flanneld does; neither re-creates the device."""
    topo, etcd, nodes = vxlan
    h, other, node = topo.hosts[1], topo.hosts[0], nodes[1]
    mac, index = _mac(topo, h.netns), _ifindex(topo, h.netns)
    try:
        topo.ip(h.netns, "link", "set", "flannel.1", "type", "vxlan", "learning")
        topo.ip(h.netns, "link", "set", "flannel.1", "address", "02:00:00:00:00:77")
        assert wait_until(lambda: _mac(topo, h.netns) == mac, 15), node.log()[-2000:]
        assert _ifindex(topo, h.netns) == index and "MAC changed" in node.log()
        assert "nolearning" not in _link(topo, h.netns)  # iproute2 prints only "nolearning"
        assert topo.wait_ping(other.container.netns, h.container.ip, 15)
    finally:
        _try(topo, h.netns, "ip", "link", "set", "flannel.1", "type", "vxlan", "nolearning")


def test_vxlan_port_set_in_config_and_different_recreates(vxlan):
    """Backend.Port given: then (and only then) flanneld compares the port."""
    topo, etcd, nodes = vxlan
    h, node = topo.hosts[1], nodes[1]
    config = '{"Network":"10.8.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","Port":8472}}'
    try:
        etcd.etcdctl("put", f"{PREFIX}/config", config)
        _replace_device(
            topo,
            node,
            h,
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            str(h.ip),
            "dev",
            "eth0",
            "dstport",
            "4789",
        )
        index = _ifindex(topo, h.netns)
        node.subnet_file.unlink(missing_ok=True)
        node.start()
        node.wait_subnet_file()
        assert "incompatible configuration: port: 8472 vs 4789" in node.log()
        assert _ifindex(topo, h.netns) != index and "dstport 8472" in _link(topo, h.netns)
    finally:
        etcd.etcdctl("put", f"{PREFIX}/config", VXLAN)
        _fresh_device(topo, node, h)


def test_vxlan_local_is_the_public_ip(vxlan, tmp_path):
    """flanneld v0.28 sets the device's local address to ExtAddr: -public-ip when given."""
    topo, etcd, nodes = vxlan
    h, other, node = topo.hosts[1], topo.hosts[0], nodes[1]
    public = "192.168.100.61"
    alt = Node(topo, h, etcd, PREFIX, tmp_path, "-v=1", f"-public-ip={public}")
    _ip(topo, h.netns, "addr", "add", f"{public}/24", "dev", "eth0")
    try:
        node.stop(signal.SIGTERM)
        index = _ifindex(topo, h.netns)
        alt.start()
        alt.wait_subnet_file()
        # The old device's local was the interface address: flanneld re-creates it too.
        assert f"vtep (external) IP: {public} vs {h.ip}" in alt.log()
        assert _ifindex(topo, h.netns) != index
        assert f"vxlan id 1 local {public} dev eth0" in _link(topo, h.netns)
        value = json.loads(_lease_value(etcd, alt))
        assert value["PublicIP"] == public
        assert wait_until(lambda: f"dst {public} self permanent" in _fdb(topo, other.netns), 10)
    finally:
        alt.stop(signal.SIGTERM)
        _try(topo, h.netns, "ip", "addr", "del", f"{public}/24", "dev", "eth0")
        for k, v in leases(etcd, PREFIX).items():
            if json.loads(v)["PublicIP"] == public:
                etcd.etcdctl("del", k)
        # To the second daemon, this host's own lease was a peer's: its route replaced the
        # connected route of cni0 (flanneld's RouteReplace does the same). Put it back.
        own = h.container.env.subnet
        _try(
            topo,
            h.netns,
            "ip",
            "route",
            "replace",
            str(own.network),
            "dev",
            "cni0",
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            str(own.ip),
        )
        _fresh_device(topo, node, h)
        assert topo.wait_ping(other.container.netns, h.container.ip, 15)


def test_vxlan_lease_backend_data_is_flannels_uint32_vni(vxlan):
    """BackendData exactly as Go's json.Marshal of flanneld's vxlanLeaseAttrs{VNI uint32;
    VtepMAC}: no spaces, VNI a number (not truncated to 16 bits), the MAC lower-case."""
    topo, etcd, nodes = vxlan
    h, node = topo.hosts[1], nodes[1]
    for vni in (70000, 1):
        etcd.etcdctl(
            "put",
            f"{PREFIX}/config",
            f'{{"Network":"10.8.0.0/16","SubnetLen":24,"Backend":{{"Type":"vxlan","VNI":{vni}}}}}',
        )
        try:
            _restart(node)
            dev = f"flannel.{vni}"
            mac = _mac(topo, h.netns, dev)
            assert f"vxlan id {vni} " in _link(topo, h.netns, dev)
            assert _lease_value(etcd, node) == (
                f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"vxlan",'
                f'"BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}}}}'
            )
        finally:
            etcd.etcdctl("put", f"{PREFIX}/config", VXLAN)
            _try(topo, h.netns, "ip", "link", "del", "flannel.70000")


# ---- host-gw -------------------------------------------------------------------------------


def test_hostgw_operator_routes_survive_start_and_restart_stale_ones_go(hostgw):
    topo, etcd, nodes = hostgw
    h, peer = topo.hosts[1], topo.hosts[0]
    ns, node = h.netns, nodes[1]
    node.stop(signal.SIGTERM)
    operator = [
        ("10.9.250.0/24", "via", "192.168.100.250", "dev", "eth0", "proto", "static"),
        ("10.9.251.0/24", "via", "192.168.100.251", "dev", "eth0", "table", "100"),
        ("10.9.252.0/24", "via", "192.168.100.252", "dev", "eth0", "metric", "5"),
        ("10.9.253.0/25", "via", "192.168.100.253", "dev", "eth0"),
        ("10.9.249.0/24", "via", str(h.container.ip), "dev", "cni0"),
        ("172.31.6.0/24", "via", "192.168.100.254", "dev", "eth0"),
    ]
    stale = [("10.9.248.0/24", "via", "192.168.100.248", "dev", "eth0")]
    try:
        for r in operator:
            _ip(topo, ns, "route", "add", *r)

        def operator_intact() -> list[str]:
            main, t100 = _routes(topo, ns), _routes(topo, ns, "table", "100")
            return [
                want
                for want, where in (
                    ("10.9.250.0/24 via 192.168.100.250 dev eth0 proto static", main),
                    ("10.9.251.0/24 via 192.168.100.251 dev eth0", t100),
                    ("10.9.252.0/24 via 192.168.100.252 dev eth0 metric 5", main),
                    ("10.9.253.0/25 via 192.168.100.253 dev eth0", main),
                    (f"10.9.249.0/24 via {h.container.ip} dev cni0", main),
                    ("172.31.6.0/24 via 192.168.100.254 dev eth0", main),
                )
                if want not in where
            ]

        for _attempt in range(2):  # a start, then a restart
            for r in stale:
                _ip(topo, ns, "route", "replace", *r)
            node.subnet_file.unlink(missing_ok=True)
            node.start()
            node.wait_subnet_file()
            assert wait_until(lambda: "10.9.248.0" not in _routes(topo, ns), 15), node.log()[-3000:]
            want = f"{_subnet(nodes[0])} via {peer.ip} dev eth0"
            assert wait_until(lambda: want in _routes(topo, ns), 10)
            assert operator_intact() == [], node.log()[-3000:]
            assert topo.wait_ping(h.container.netns, peer.container.ip, 15)
            node.stop(signal.SIGTERM)
        node.start()
        node.wait_subnet_file()
    finally:
        for r in operator + stale:
            _try(topo, ns, "ip", "route", "del", *r)
        if node.proc is None or node.proc.poll() is not None:
            node.start()
            node.wait_subnet_file()

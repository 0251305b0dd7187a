"""Interface and address choice on hosts with several NICs, as flanneld v0.28 chooses.

Each host gets a second underlay (eth1, 172.31.0.0/24, MTU 1400, on its own bridge) while
the default route stays on eth0, the "wrong" interface for these tests. `choose` is run
inside a host namespace (it reads that namespace's links); daemons are real processes
against a real etcd, and traffic is real: containers ping each other and the eth1
packet counters show which underlay carried it.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import sys

import pytest

from fastlane.bench.lab.etcdserver import EtcdServer
from tests.daemon_helpers import Node, leases, wait_until

ETH1_NET = ipaddress.IPv4Network("172.31.0.0/24")
ETH1_GW = ETH1_NET.network_address + 254
ETH1_MTU = 1400


def _eth1_ip(host) -> ipaddress.IPv4Address:
    return ETH1_NET.network_address + host.index + 1


def add_second_underlay(topo) -> None:
    """br1 in the switch netns, and eth1 in every host on it (created inside our namespaces)."""
    sw = topo.switch_netns
    topo.ip(sw, "link", "add", "br1", "mtu", str(ETH1_MTU), "type", "bridge", "forward_delay", "0")
    topo.ip(sw, "addr", "add", f"{ETH1_GW}/24", "dev", "br1")
    topo.ip(sw, "link", "set", "br1", "up")
    for h in topo.hosts:
        topo.ip(
            sw,
            "link",
            "add",
            f"q{h.index}",
            "mtu",
            str(ETH1_MTU),
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "mtu",
            str(ETH1_MTU),
            "netns",
            h.netns,
        )
        topo.ip(sw, "link", "set", f"q{h.index}", "master", "br1", "up")
        topo.ip(h.netns, "addr", "add", f"{_eth1_ip(h)}/24", "dev", "eth1")
        topo.ip(h.netns, "link", "set", "eth1", "up")
        # The default route on eth0: what flanneld falls back to, and the wrong NIC here.
        topo.ip(h.netns, "route", "add", "default", "via", str(topo.switch_ip), "dev", "eth0")


CHOOSE = """
import ipaddress, json, sys
from fastlane.iface import InterfaceError, choose
a = json.loads(sys.argv[1])
try:
    i = choose(a["iface"], a["regex"], a.get("reach", ""),
               ipaddress.IPv4Address(a["public"]) if a.get("public") else None)
    print(i.name, i.address, i.mtu)
except InterfaceError as e:
    print("ERR", e)
"""


def _choose(topo, ns: str, iface=(), regex=(), reach: str = "", public: str = "") -> str:
    arg = json.dumps({"iface": list(iface), "regex": list(regex), "reach": reach, "public": public})
    res = topo.run(ns, sys.executable, "-c", CHOOSE, arg, check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    return res.stdout.strip()


@pytest.fixture
def multi(topology):
    """One host with eth0 (default route) and eth1."""
    topo = topology(hosts=1)
    add_second_underlay(topo)
    return topo


def test_each_rule_in_flanneld_order(multi):
    topo = multi
    h = topo.hosts[0]
    ns, eth0, eth1 = h.netns, f"eth0 {h.ip} 1500", f"eth1 {_eth1_ip(h)} {ETH1_MTU}"
    # No flag: the default-route interface.
    assert _choose(topo, ns) == eth0
    # -public-ip alone: the interface that owns it; none owns it: an error.
    assert _choose(topo, ns, public=str(_eth1_ip(h))) == eth1
    err = _choose(topo, ns, public="203.0.113.9")
    assert err.startswith("ERR failed to find any valid interface to use") and "203.0.113.9" in err
    # -iface by name or address, first match in order; -public-ip no longer picks then.
    assert _choose(topo, ns, iface=["nope0", "eth1"]) == eth1
    assert _choose(topo, ns, iface=[str(_eth1_ip(h))]) == eth1
    assert _choose(topo, ns, iface=["eth0"], public=str(_eth1_ip(h))) == eth0
    # -iface before -iface-regex before -iface-can-reach, whatever the order given.
    assert _choose(topo, ns, iface=["eth0"], regex=["^eth1$"], reach=str(ETH1_GW)) == eth0
    assert _choose(topo, ns, iface=["nope0"], regex=["^eth1$"], reach="192.168.100.254") == eth1
    # -iface-regex: a bad one is skipped; addresses are matched before names.
    assert _choose(topo, ns, regex=["(", r"^172\.31\."]) == eth1
    assert _choose(topo, ns, regex=[r"^192\.168\.100\.", "eth1"]) == eth0
    # -iface-can-reach: the route's interface and source address.
    assert _choose(topo, ns, iface=["nope0"], reach=str(ETH1_GW)) == eth1
    assert _choose(topo, ns, reach="8.8.8.8") == eth0  # via the default route
    # An empty -iface= means flanneld's lookup of "": the default-route interface.
    assert _choose(topo, ns, iface=["", "eth1"]) == eth0
    # Nothing matches: one line naming every spec tried.
    err = _choose(topo, ns, iface=["nope0"], regex=["^zz"], reach="not-an-ip")
    assert err.startswith("ERR failed to find interface to use that matches")
    assert (
        "-iface=nope0" in err and "-iface-regex=^zz" in err and "-iface-can-reach=not-an-ip" in err
    )
    # A default route without an interface (blackhole), then none at all.
    topo.ip(ns, "route", "replace", "blackhole", "default")
    assert "could not determine interface" in _choose(topo, ns)
    topo.ip(ns, "route", "del", "blackhole", "default")
    assert "unable to find default route" in _choose(topo, ns)


def test_every_address_is_a_candidate_with_flanneld_preference(multi):
    topo = multi
    ns = topo.hosts[0].netns
    topo.ip(ns, "link", "add", "dum0", "type", "bridge")  # no dummy module everywhere
    topo.ip(ns, "link", "set", "dum0", "up")
    # In kernel order: link-local, dynamic (DHCP-like lifetime), deprecated, permanent.
    topo.ip(ns, "addr", "add", "169.254.5.5/16", "dev", "dum0")
    topo.ip(
        ns, "addr", "add", "10.9.0.5/24", "dev", "dum0", "valid_lft", "300", "preferred_lft", "300"
    )
    topo.ip(ns, "addr", "add", "10.9.1.5/24", "dev", "dum0", "preferred_lft", "0")
    topo.ip(ns, "addr", "add", "10.9.2.5/24", "dev", "dum0")
    assert _choose(topo, ns, iface=["dum0"]) == "dum0 10.9.2.5 1500"  # global permanent first
    # -iface-regex matches any usable address, not only the first; never a deprecated one.
    assert _choose(topo, ns, regex=[r"^10\.9\.0\."]) == "dum0 10.9.0.5 1500"
    assert _choose(topo, ns, regex=[r"^10\.9\.1\."]).startswith("ERR")
    # -iface by address takes exactly that address, even a deprecated one (flanneld too).
    assert _choose(topo, ns, iface=["10.9.1.5"]) == "dum0 10.9.1.5 1500"
    topo.ip(ns, "addr", "del", "10.9.2.5/24", "dev", "dum0")
    assert _choose(topo, ns, iface=["dum0"]) == "dum0 10.9.0.5 1500"  # then dynamic global
    topo.ip(ns, "addr", "del", "10.9.0.5/24", "dev", "dum0")
    assert _choose(topo, ns, iface=["dum0"]) == "dum0 169.254.5.5 1500"  # then link-local
    topo.ip(ns, "addr", "del", "169.254.5.5/16", "dev", "dum0")
    err = _choose(topo, ns, iface=["dum0"])
    assert "failed to find IPv4 address for interface dum0" in err


# ---- daemons: the chosen interface is the one the backend uses ---------------------------


@pytest.fixture
def two_nics(topology, tmp_path):
    """Two hosts with eth0 (default route, etcd) and eth1; etcd on the switch; yields a
    factory for daemons *without* the -iface=eth0 the helpers add by default."""
    topo = topology(hosts=2)
    add_second_underlay(topo)
    etcd = EtcdServer(
        netns=topo.switch_netns, host=str(topo.switch_ip), name="fastlane-iface-tests"
    )
    made: list[Node] = []
    try:
        etcd.start()
        prefix = "/coreos.com/network"

        def make(i: int, *flags: str) -> Node:
            node = Node(topo, topo.hosts[i], etcd, prefix, tmp_path, "-v=1", *flags)
            base = node.args
            node.args = lambda: [a for a in base() if a != "-iface=eth0"]  # type: ignore[method-assign]
            made.append(node)
            return node.start()

        yield topo, etcd, prefix, make
    finally:
        for node in made:
            node.stop(signal.SIGKILL)
        etcd.cleanup()


def _eth1_packets(topo, host) -> int:
    out = topo.run(
        host.netns,
        "cat",
        "/sys/class/net/eth1/statistics/tx_packets",
        "/sys/class/net/eth1/statistics/rx_packets",
    ).stdout.split()
    return sum(int(x) for x in out)


def _ping_over_eth1(topo, nodes) -> None:
    """Containers behind both nodes ping each other; eth1 of host 0 carried the packets."""
    for i, n in enumerate(nodes):
        topo.add_container(i, n.subnet_file)
    c0, c1 = topo.hosts[0].container, topo.hosts[1].container
    before = _eth1_packets(topo, topo.hosts[0])
    assert topo.wait_ping(c0.netns, c1.ip, 20), "\n".join(n.log() for n in nodes)
    res = topo.run(
        c0.netns, "ping", "-n", "-q", "-c", "20", "-i", "0.05", "-W", "1", str(c1.ip), check=False
    )
    assert res.returncode == 0, res.stdout
    assert _eth1_packets(topo, topo.hosts[0]) - before >= 40  # 20 requests + 20 replies


def _public_ip(etcd, prefix, node) -> str:
    subnet = node.wait_subnet_file()["FLANNEL_SUBNET"]
    net = ipaddress.IPv4Interface(subnet).network
    key = f"{prefix}/subnets/{net.network_address}-{net.prefixlen}"
    return json.loads(leases(etcd, prefix)[key])["PublicIP"]


def test_udp_public_ip_picks_its_interface(two_nics):
    topo, etcd, prefix, make = two_nics
    etcd.etcdctl("put", f"{prefix}/config", '{"Network":"10.20.0.0/16","Backend":{"Type":"udp"}}')
    nodes = [make(i, f"-public-ip={_eth1_ip(h)}") for i, h in enumerate(topo.hosts)]
    for n in nodes:
        env = n.wait_subnet_file()
        assert env["FLANNEL_MTU"] == str(ETH1_MTU - 28)  # eth1's MTU, not eth0's
        assert _public_ip(etcd, prefix, n) == str(_eth1_ip(n.host))
        sockets = topo.run(n.host.netns, "ss", "-uln").stdout
        assert f"{_eth1_ip(n.host)}:8285" in sockets, sockets
    _ping_over_eth1(topo, nodes)
    assert "Traceback" not in "".join(n.log() for n in nodes)


def test_vxlan_iface_regex_and_can_reach(two_nics):
    topo, etcd, prefix, make = two_nics
    etcd.etcdctl("put", f"{prefix}/config", '{"Network":"10.21.0.0/16","Backend":{"Type":"vxlan"}}')
    nodes = [
        make(0, "-iface=nope0", r"-iface-regex=^172\.31\."),
        make(1, f"-iface-can-reach={ETH1_GW}"),
    ]
    for n in nodes:
        assert n.wait_subnet_file()["FLANNEL_MTU"] == str(ETH1_MTU - 50)
        assert _public_ip(etcd, prefix, n) == str(_eth1_ip(n.host))
        detail = topo.ip(n.host.netns, "-d", "link", "show", "flannel.1")
        assert f"local {_eth1_ip(n.host)} dev eth1" in detail, detail
    _ping_over_eth1(topo, nodes)


def test_hostgw_public_ip_routes_on_its_interface(two_nics):
    topo, etcd, prefix, make = two_nics
    etcd.etcdctl(
        "put", f"{prefix}/config", '{"Network":"10.22.0.0/16","Backend":{"Type":"host-gw"}}'
    )
    nodes = [make(i, f"-public-ip={_eth1_ip(h)}") for i, h in enumerate(topo.hosts)]
    subnets = [
        ipaddress.IPv4Interface(n.wait_subnet_file()["FLANNEL_SUBNET"]).network for n in nodes
    ]
    # Before: host-gw refused to start ("PublicIP differs from interface IP").
    route = f"{subnets[1]} via {_eth1_ip(topo.hosts[1])} dev eth1"
    assert wait_until(lambda: route in topo.ip(topo.hosts[0].netns, "route", "show"), 15), nodes[
        0
    ].log()
    _ping_over_eth1(topo, nodes)


def test_public_ip_nobody_has_is_one_line_exit_1(two_nics):
    topo, etcd, prefix, make = two_nics
    etcd.etcdctl("put", f"{prefix}/config", '{"Network":"10.23.0.0/16","Backend":{"Type":"alloc"}}')
    a = make(0, "-public-ip=203.0.113.7")
    assert a.wait_exit(20) == 1
    lines = [line for line in a.log().splitlines() if line.strip()]
    assert "failed to find any valid interface" in lines[-1] and "203.0.113.7" in lines[-1]
    assert "Traceback" not in a.log()


def test_blackhole_route_for_own_subnet(two_nics):
    topo, etcd, prefix, make = two_nics
    etcd.etcdctl("put", f"{prefix}/config", '{"Network":"10.24.0.0/16","Backend":{"Type":"alloc"}}')
    a = make(0, "-ip-blackhole-route", "-iptables-resync=1")
    subnet = ipaddress.IPv4Interface(a.wait_subnet_file()["FLANNEL_SUBNET"]).network
    ns = a.host.netns
    assert wait_until(
        lambda: f"blackhole {subnet}" in topo.ip(ns, "route", "show", "type", "blackhole"), 10
    ), a.log()
    # Someone deletes it: it is back within a resync period.
    topo.ip(ns, "route", "del", "blackhole", str(subnet))
    assert wait_until(
        lambda: f"blackhole {subnet}" in topo.ip(ns, "route", "show", "type", "blackhole"), 10
    ), a.log()
    # Without the flag, no blackhole route.
    b = make(1)
    b.wait_subnet_file()
    assert topo.ip(topo.hosts[1].netns, "route", "show", "type", "blackhole").strip() == ""

"""`EnableNFTables: true`: flanneld's nftables tables, real masquerading, resync, and the
switch between iptables and nftables, with real daemons in network namespaces.

The reference for the tables is flanneld v0.28's pkg/trafficmngr/nftables, transcribed
below as an nft script (REFERENCE) and loaded into a scratch namespace: the daemon's
table must list exactly like it (`nft -j`, handles aside).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastlane.bench.lab.topology import Topology
from tests.daemon_helpers import Node, topology_with_etcd, wait_until

NETWORK = "10.7.0.0/16"
NFT = '{"Network":"10.7.0.0/16","SubnetLen":24,"EnableNFTables":true,"Backend":{"Type":"alloc"}}'
IPT = '{"Network":"10.7.0.0/16","SubnetLen":24,"Backend":{"Type":"alloc"}}'

# flanneld's Init, SetupAndEnsureMasqRules and SetupAndEnsureForwardRules for IPv4, as the
# nft commands knftables sends (priorities written as numbers: srcnat 100, filter 0).
REFERENCE = """\
add table ip flannel-ipv4 {{ comment "rules for flannel-ipv4" ; }}
add table ip6 flannel-ipv6 {{ comment "rules for flannel-ipv6" ; }}
add chain ip flannel-ipv4 postrtg {{ type nat hook postrouting priority 100 ; comment "chain to manage traffic masquerading by flannel" ; }}
flush chain ip flannel-ipv4 postrtg
add rule ip flannel-ipv4 postrtg meta mark 0x4000 return
add rule ip flannel-ipv4 postrtg ip saddr {subnet} ip daddr {network} return
add rule ip flannel-ipv4 postrtg ip saddr {network} ip daddr {subnet} return
add rule ip flannel-ipv4 postrtg ip saddr != {subnet} ip daddr {network} return
add rule ip flannel-ipv4 postrtg ip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random
add rule ip flannel-ipv4 postrtg ip saddr != {network} ip daddr {network} masquerade fully-random
add chain ip flannel-ipv4 forward {{ type filter hook forward priority 0 ; comment "chain to accept flannel traffic" ; }}
flush chain ip flannel-ipv4 forward
add rule ip flannel-ipv4 forward ip saddr {network} accept
add rule ip flannel-ipv4 forward ip daddr {network} accept
"""

# Prints the address the first TCP connection comes from (the far end of the masquerade).
PEER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)
    print("listening", flush=True)
    c, addr = s.accept(); c.sendall(b"hi"); c.close()
    print("peer", addr[0], flush=True)
""")

CONNECT = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    print(c.recv(2).decode(), c.getsockname()[0])
""")


@pytest.fixture(scope="module")
def cluster(net_capable):
    """Two hosts and etcd; host 0 runs the daemon, host 1 stands for 'outside the overlay'."""
    if subprocess.run(["nft", "--version"], capture_output=True, check=False).returncode != 0:
        pytest.skip("needs the nft tool (apt-get install -y nftables)")
    yield from topology_with_etcd("fastlane-nft-tests")


@pytest.fixture
def node(cluster, prefix, tmp_path):
    """Factory for daemons on host 0. Afterwards: daemons stopped, container removed, and
    host 0's whole ruleset flushed (its own namespace), so every test starts clean."""
    topo, etcd = cluster
    made: list[Node] = []

    def make(config: str, *extra: str, env: dict[str, str] | None = None) -> Node:
        etcd.etcdctl("put", f"{prefix}/config", config)
        n = Node(topo, topo.hosts[0], etcd, prefix, tmp_path, "-iptables-resync=1", *extra, env=env)
        made.append(n)
        return n

    try:
        yield make
    finally:
        for n in made:
            n.stop(signal.SIGKILL)
        topo.remove_container(0)
        topo.run(topo.hosts[0].netns, "nft", "flush", "ruleset", check=False)


@pytest.fixture
def scratch_netns():
    """An empty namespace of our own for the reference tables; deleted afterwards."""
    name = f"fltest-nftref-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _nft(netns: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args],
        capture_output=True,
        text=True,
        input=input,
        check=False,
        timeout=30,
    )


def _table_json(netns: str, family: str, table: str) -> list[dict] | None:
    res = _nft(netns, "-j", "list", "table", family, table)
    if res.returncode != 0:
        return None
    out = []
    for item in json.loads(res.stdout)["nftables"]:
        if "metainfo" not in item:
            out.append(
                {k: {kk: vv for kk, vv in v.items() if kk != "handle"} for k, v in item.items()}
            )
    return out


def _subnet(node: Node) -> str:
    return node.wait_subnet_file()["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".0/24"


def _iptables_save(topo: Topology, netns: str) -> str:
    return topo.run(netns, "iptables-save").stdout


def test_tables_are_flanneld_s(node, cluster, scratch_netns):
    topo, _ = cluster
    n = node(NFT, "-ip-masq").start()
    subnet = _subnet(n)
    ns = topo.hosts[0].netns
    ref = REFERENCE.format(subnet=subnet, network=NETWORK)
    res = _nft(scratch_netns, "-f", "-", input=ref)
    assert res.returncode == 0, res.stderr
    assert wait_until(lambda: _table_json(ns, "ip", "flannel-ipv4") is not None, 10), n.log()
    assert _table_json(ns, "ip", "flannel-ipv4") == _table_json(scratch_netns, "ip", "flannel-ipv4")
    assert _table_json(ns, "ip6", "flannel-ipv6") == _table_json(
        scratch_netns, "ip6", "flannel-ipv6"
    )
    # nft 1.0's JSON leaves comments out; the text listing has them.
    text = _nft(ns, "list", "ruleset").stdout
    for comment in (
        "rules for flannel-ipv4",
        "rules for flannel-ipv6",
        "chain to manage traffic masquerading by flannel",
        "chain to accept flannel traffic",
    ):
        assert f'comment "{comment}"' in text
    assert "type nat hook postrouting priority srcnat" in text
    assert "type filter hook forward priority filter" in text
    # No iptables chains in nftables mode.
    assert "FLANNEL" not in _iptables_save(topo, ns)
    assert n.proc.poll() is None and "Traceback" not in n.log()


def test_without_ip_masq_only_forward_chain(node, cluster):
    topo, _ = cluster
    n = node(NFT).start()
    n.wait_subnet_file()
    ns = topo.hosts[0].netns
    assert wait_until(lambda: _table_json(ns, "ip", "flannel-ipv4") is not None, 10), n.log()
    chains = [i["chain"]["name"] for i in _table_json(ns, "ip", "flannel-ipv4") if "chain" in i]
    assert chains == ["forward"]


def test_container_traffic_to_the_outside_is_masqueraded(node, cluster):
    topo, _ = cluster
    n = node(NFT, "-ip-masq").start()
    n.wait_subnet_file()
    c = topo.add_container(0, n.subnet_file)
    outside = topo.hosts[1]
    server = topo.popen(
        outside.netns, sys.executable, "-c", PEER, str(outside.ip), "7001", name="nft-peer"
    )
    try:
        assert wait_until(lambda: "listening" in topo.log_tail("nft-peer"), 10)
        res = topo.run(c.netns, sys.executable, "-c", CONNECT, str(outside.ip), "7001", check=False)
        assert res.returncode == 0, res.stderr + n.log()
        assert res.stdout.split() == ["hi", str(c.ip)]  # the container sent from its own address
        assert wait_until(lambda: "peer" in topo.log_tail("nft-peer"), 10)
        # ... and the far end saw host 0's address: masqueraded by the postrtg chain.
        assert topo.log_tail("nft-peer").split()[-1] == str(topo.hosts[0].ip)
    finally:
        topo.stop(server)


def test_rules_restored_after_flush_and_delete(node, cluster):
    topo, _ = cluster
    n = node(NFT, "-ip-masq").start()
    n.wait_subnet_file()
    ns = topo.hosts[0].netns
    assert wait_until(lambda: _table_json(ns, "ip", "flannel-ipv4") is not None, 10), n.log()
    want = _table_json(ns, "ip", "flannel-ipv4")
    assert sum(1 for i in want if "rule" in i) == 8
    _nft(ns, "flush", "chain", "ip", "flannel-ipv4", "postrtg")
    assert _table_json(ns, "ip", "flannel-ipv4") != want
    assert wait_until(lambda: _table_json(ns, "ip", "flannel-ipv4") == want, 10), n.log()
    assert wait_until(lambda: "nftables rules were missing; re-installed" in n.log(), 5), n.log()
    _nft(ns, "flush", "ruleset")  # everything gone, both tables
    assert wait_until(
        lambda: (
            _table_json(ns, "ip", "flannel-ipv4") == want
            and _table_json(ns, "ip6", "flannel-ipv6") is not None
        ),
        10,
    ), n.log()
    assert n.proc.poll() is None


def test_switch_iptables_to_nftables_and_back(node, cluster):
    topo, _ = cluster
    ns = topo.hosts[0].netns
    a = node(IPT, "-ip-masq").start()
    a.wait_subnet_file()
    assert wait_until(lambda: "FLANNEL-POSTRTG" in _iptables_save(topo, ns), 10), a.log()
    saved = _iptables_save(topo, ns)
    assert "-j FLANNEL-POSTRTG" in saved and "-j FLANNEL-FWD" in saved
    assert a.stop() == 0
    # Restarted with EnableNFTables: the chains and the jumps to them are gone.
    b = node(NFT, "-ip-masq").start()
    b.wait_subnet_file()
    assert wait_until(lambda: _table_json(ns, "ip", "flannel-ipv4") is not None, 10), b.log()
    assert wait_until(lambda: "FLANNEL" not in _iptables_save(topo, ns), 10), _iptables_save(
        topo, ns
    )
    assert "removed iptables nat/FLANNEL-POSTRTG" in b.log()
    assert b.stop() == 0
    # And back: flannel's tables are deleted, the iptables chains return.
    c = node(IPT, "-ip-masq").start()
    c.wait_subnet_file()
    assert wait_until(lambda: "FLANNEL-POSTRTG" in _iptables_save(topo, ns), 10), c.log()
    assert wait_until(
        lambda: (
            _table_json(ns, "ip", "flannel-ipv4") is None
            and _table_json(ns, "ip6", "flannel-ipv6") is None
        ),
        10,
    ), c.log()


def test_nftables_only_host_with_ip_masq(node, cluster, tmp_path):
    """No iptables binaries at all: with EnableNFTables the daemon runs (it exited 1 before)."""
    topo, _ = cluster
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nft").symlink_to(Path("/usr/sbin/nft"))
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    assert not any(Path(d, "iptables").exists() for d in ("/usr/bin", "/bin")) or pytest.skip(
        "iptables is in /usr/bin or /bin: cannot hide it"
    )
    n = node(NFT, "-ip-masq", env=env).start()
    n.wait_subnet_file()
    ns = topo.hosts[0].netns
    assert wait_until(lambda: _table_json(ns, "ip", "flannel-ipv4") is not None, 10), n.log()
    wait_until(lambda: n.proc.poll() is not None, 2)
    assert n.proc.poll() is None, n.log()
    # The same host in iptables mode: -ip-masq cannot work there; the log says why in one line.
    assert n.stop() == 0
    m = node(IPT, "-ip-masq", env=env).start()
    assert wait_until(lambda: "iptables not found" in m.log(), 20), m.log()
    assert "Traceback" not in m.log()

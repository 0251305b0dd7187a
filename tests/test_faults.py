"""Faults under traffic: etcd members dying, etcd losing its data, daemons killed mid-transfer,
a node dying without giving back its lease, the underlay link flapping and changing MTU.

Real etcd (a three-member cluster for the leader tests), real daemons in network namespaces,
real packets (ping streams, TCP transfers checked with sha256). Durations and gaps are
printed as figures (run with -s to see them); nothing is asserted against a clock, only
against what must eventually happen.
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time

import pytest

from fastlane.bench.lab.etcdserver import EtcdCluster
from fastlane.bench.lab.topology import Topology
from tests.daemon_helpers import (
    PACED_SOURCE,
    SINK,
    Node,
    lease_ids,
    leases,
    nstat,
    ping_gaps,
    routes,
    start_ping,
    unleased,
    wait_until,
)
from tests.daemon_helpers import (
    overlay as daemon_overlay,
)


def figure(name: str, **values: object) -> None:
    """One line of figures per scenario, for the report (visible with -s)."""
    print(f"\nFIGURE {name}: " + " ".join(f"{k}={v}" for k, v in values.items()), flush=True)


# ---- etcd cluster: leader and follower loss, data loss, lease expiry (host-gw) --------------

HOSTGW = '{{"Network":"{net}","SubnetLen":24,"Backend":{{"Type":"host-gw"}}}}'


@pytest.fixture(scope="module")
def ha(net_capable):
    """Three hosts and a three-member etcd cluster in the switch netns."""
    topo = Topology(hosts=3, mtu=1500)
    cluster = None
    try:
        topo.setup()
        cluster = EtcdCluster(
            3, host=str(topo.switch_ip), netns=topo.switch_netns, name="fastlane-faults"
        )
        cluster.start()
        yield topo, cluster
    finally:
        if cluster is not None:
            cluster.cleanup()
        topo.teardown()


@pytest.fixture
def ha_nodes(ha, prefix, tmp_path):
    """Factory for daemons against the cluster under this test's prefix; stopped at the end,
    and every member of the cluster is running again for the next test."""
    topo, cluster = ha
    made: list[Node] = []

    def make(i: int, *extra: str) -> Node:
        node = Node(topo, topo.hosts[i], cluster, prefix, tmp_path, "-v=1", *extra)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop(signal.SIGKILL)
    for i, m in enumerate(cluster.members):
        if not m.running():
            cluster.start_member(i)


def _overlay_routes(topo, host, net_prefix: str) -> dict[str, str]:
    """subnet -> gateway of host-gw routes for the test's network in a host netns."""
    out = {}
    for line in routes(topo, host.netns).splitlines():
        parts = line.split()
        if parts and parts[0].startswith(net_prefix) and "via" in parts:
            out[parts[0]] = parts[parts.index("via") + 1]
    return out


JOINER = textwrap.dedent("""
    import asyncio, ipaddress, json, os, signal, sys, time
    from fastlane.etcd import EtcdError, Store, parse_endpoints
    from fastlane.lease import LeaseAttrs
    from fastlane.registry import LeaseConflict, Registry
    endpoints, prefix, n, kill_after, victim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

    async def main():
        store = await Store.connect(parse_endpoints(endpoints), timeout=5.0)
        reg = Registry(store, prefix, ttl=3600)
        config = await reg.get_config()
        t0 = time.monotonic(); state = {"done": 0, "killed": None}; out = []

        async def join(i):
            attrs = LeaseAttrs(public_ip=ipaddress.IPv4Address(f"192.168.100.{100 + i}"),
                               backend_type="host-gw")
            errors = conflicts = 0; start = time.monotonic(); last = ""
            while True:
                try:
                    lease = await reg.acquire(config, attrs, None)
                    break
                except EtcdError as exc:  # the daemon retries every second
                    errors += 1; last = str(exc)[:160]; await asyncio.sleep(1.0)
                except LeaseConflict as exc:  # the daemon would exit; systemd restarts it
                    conflicts += 1; last = str(exc)[:160]; await asyncio.sleep(0.1)
            now = time.monotonic()
            state["done"] += 1
            if state["done"] == kill_after and victim:
                os.kill(victim, signal.SIGKILL)
                state["killed"] = now - t0
            out.append({"i": i, "subnet": str(lease.subnet), "t": round(now - t0, 3),
                        "latency": round(now - start, 3), "errors": errors,
                        "conflicts": conflicts, "last": last})

        await asyncio.gather(*(join(i) for i in range(n)))
        print(json.dumps({"killed": state["killed"], "joins": out}))
        await store.close()

    asyncio.run(main())
""")


def test_leader_killed_during_50_joins_then_follower(ha, ha_nodes, prefix):
    topo, cluster = ha
    net = "10.7.0.0/16"
    cluster.etcdctl("put", f"{prefix}/config", HOSTGW.format(net=net))
    nodes = [ha_nodes(i, "-subnet-lease-ttl=8").start() for i in range(3)]
    subnets = [n.wait_subnet_file()["FLANNEL_SUBNET"][:-5] + ".0/24" for n in nodes]
    for i, node in enumerate(nodes):
        want = {s for j, s in enumerate(subnets) if j != i}
        assert wait_until(lambda: want <= set(_overlay_routes(topo, node.host, "10.7.")), 20), (
            node.log()
        )

    leader = cluster.leader()
    t_start = time.monotonic()
    res = topo.run(
        topo.switch_netns,
        sys.executable,
        "-c",
        JOINER,
        cluster.endpoints,
        prefix,
        "50",
        "10",
        str(cluster.pid(leader)),
        timeout=180,
    )
    out = json.loads(res.stdout)
    joins = out["joins"]
    assert out["killed"] is not None and not cluster.members[leader].running()
    assert len(joins) == 50 and len({j["subnet"] for j in joins}) == 50
    held = leases(cluster, prefix)
    assert len(held) == 53 and not set(subnets) & {j["subnet"] for j in joins}
    hit = [j["t"] for j in joins if j["errors"]]
    figure(
        "leader-kill-50-joins",
        total_s=round(time.monotonic() - t_start, 2),
        killed_at_s=round(out["killed"], 3),
        first_hit_join_done_after_kill_s=round(min(hit) - out["killed"], 3) if hit else "-",
        last_join_s=max(j["t"] for j in joins),
        max_join_latency_s=max(j["latency"] for j in joins),
        joins_with_etcd_errors=sum(1 for j in joins if j["errors"]),
        contention_conflicts=sum(j["conflicts"] for j in joins),
        sample_error=next((j["last"] for j in joins if j["errors"]), "-"),
    )

    # Every daemon sees all 50 joins (watch resumed on another member) ...
    t_kill = time.monotonic()
    for node in nodes:
        want = {j["subnet"] for j in joins}
        assert wait_until(lambda: want <= set(_overlay_routes(topo, node.host, "10.7.")), 30), (
            node.log()[-3000:]
        )
    all_seen = time.monotonic() - t_kill
    # ... and renews its lease (TTL 8 s: every ~4 s) through the surviving members.
    keys = {n: f"{prefix}/subnets/{s[:-3]}-24" for n, s in zip(nodes, subnets, strict=False)}
    ids = lease_ids(cluster, prefix)
    for node in nodes:
        assert wait_until(
            lambda: lease_ids(cluster, prefix).get(keys[node]) not in (None, ids[keys[node]]), 20
        ), node.log()[-3000:]
    figure(
        "leader-kill-resume",
        all_nodes_have_50_routes_after_s=round(all_seen, 2),
        watch_relists_per_node=[
            n.log().count("re-listing") + n.log().count("lease watch:") for n in nodes
        ],
    )

    # The old leader comes back (as a follower); then a follower dies (two of three left).
    cluster.start_member(leader)
    follower = next(
        i for i, m in enumerate(cluster.members) if m.running() and i != cluster.leader()
    )
    cluster.kill(follower)
    (new,) = unleased(cluster, prefix, "10.7.0.0/16")
    t0 = time.monotonic()
    cluster.etcdctl(
        "put",
        f"{prefix}/subnets/{new.replace('/', '-')}",
        '{"PublicIP":"192.168.100.250","PublicIPv6":null,"BackendType":"host-gw"}',
    )
    for node in nodes:
        assert wait_until(lambda: new in _overlay_routes(topo, node.host, "10.7."), 30), node.log()[
            -3000:
        ]
    seen = time.monotonic() - t0
    ids = lease_ids(cluster, prefix)
    for node in nodes:
        assert wait_until(
            lambda: lease_ids(cluster, prefix).get(keys[node]) not in (None, ids[keys[node]]), 20
        ), node.log()[-3000:]
    renewed = time.monotonic() - t0
    figure(
        "follower-kill", new_lease_on_all_nodes_s=round(seen, 2), all_renewed_s=round(renewed, 2)
    )
    for node in nodes:
        assert node.proc.poll() is None
        assert "Traceback" not in node.log()
        assert leases(cluster, prefix)[keys[node]]  # still held


def test_killed_node_lease_expires_and_routes_go(ha, ha_nodes, prefix):
    """kill -9 without giving the lease back: once it expires, every other node drops the route."""
    topo, cluster = ha
    cluster.etcdctl("put", f"{prefix}/config", HOSTGW.format(net="10.8.0.0/16"))
    nodes = [ha_nodes(i, "-subnet-lease-ttl=6").start() for i in range(3)]
    subnets = [n.wait_subnet_file()["FLANNEL_SUBNET"][:-5] + ".0/24" for n in nodes]
    victim = subnets[2]
    for node in nodes[:2]:
        assert wait_until(lambda: victim in _overlay_routes(topo, node.host, "10.8."), 20), (
            node.log()
        )
    t0 = time.monotonic()
    nodes[2].stop(signal.SIGKILL)
    key = f"{prefix}/subnets/{victim[:-3]}-24"
    assert wait_until(lambda: key not in leases(cluster, prefix), 20)
    expired = time.monotonic() - t0
    for node in nodes[:2]:
        assert wait_until(lambda: victim not in _overlay_routes(topo, node.host, "10.8."), 10), (
            node.log()[-2000:]
        )
        assert f"subnet removed: {victim}" in node.log()
    gone = time.monotonic() - t0
    figure(
        "lease-expiry-host-gw",
        ttl_s=6,
        lease_gone_after_kill_s=round(expired, 2),
        routes_gone_on_both_after_kill_s=round(gone, 2),
    )
    # The survivors still route to each other.
    assert subnets[1] in _overlay_routes(topo, nodes[0].host, "10.8.")


def test_etcd_data_lost_subnets_kept(ha, ha_nodes, prefix):
    """A new, empty cluster at the same endpoints: running daemons take their subnets again;
    a daemon started afterwards takes its subnet from the subnet file (FLANNEL_SUBNET)."""
    topo, cluster = ha
    config = HOSTGW.format(net="10.9.0.0/16")
    cluster.etcdctl("put", f"{prefix}/config", config)
    a, b = ha_nodes(0, "-subnet-lease-ttl=30").start(), ha_nodes(1, "-subnet-lease-ttl=30").start()
    sa = a.wait_subnet_file()["FLANNEL_SUBNET"][:-5] + ".0/24"
    sb = b.wait_subnet_file()["FLANNEL_SUBNET"][:-5] + ".0/24"
    key_a, key_b = (f"{prefix}/subnets/{s[:-3]}-24" for s in (sa, sb))
    assert wait_until(lambda: sb in _overlay_routes(topo, a.host, "10.9."), 20)

    t0 = time.monotonic()
    cluster.wipe()
    wiped = time.monotonic() - t0
    cluster.etcdctl("put", f"{prefix}/config", config)
    assert wait_until(lambda: {key_a, key_b} <= set(leases(cluster, prefix)), 30), a.log()[-3000:]
    back = time.monotonic() - t0
    for node, key in ((a, key_a), (b, key_b)):
        assert json.loads(leases(cluster, prefix)[key])["PublicIP"] == str(node.host.ip)
        assert node.proc.poll() is None and "Traceback" not in node.log()
    # the keys are back; each node's watcher re-lists and re-installs the other's route
    assert wait_until(
        lambda: (
            sb in _overlay_routes(topo, a.host, "10.9.")
            and sa in _overlay_routes(topo, b.host, "10.9.")
        ),
        20,
    )
    figure(
        "etcd-data-lost-running",
        wipe_and_restart_s=round(wiped, 2),
        both_leases_back_after_s=round(back, 2),
    )

    # Lost again while a is down: a restarted a reads FLANNEL_SUBNET from its subnet file.
    a.stop(signal.SIGTERM)
    cluster.wipe()
    cluster.etcdctl("put", f"{prefix}/config", config)
    a.start()
    assert a.wait_subnet_file()["FLANNEL_SUBNET"][:-5] + ".0/24" == sa
    assert wait_until(lambda: "from the previous subnet file" in a.log(), 10), a.log()
    assert wait_until(lambda: key_a in leases(cluster, prefix), 10)
    assert wait_until(lambda: key_b in leases(cluster, prefix), 30), b.log()[-3000:]
    assert wait_until(lambda: sb in _overlay_routes(topo, a.host, "10.9."), 20), a.log()[-2000:]


def test_underlay_flap_host_gw_routes_come_back(ha, ha_nodes, prefix):
    """Taking eth0 down flushes the kernel's routes via it; the daemon logs it and puts its
    peers' routes back once the link is up (host-gw's periodic check, as flanneld)."""
    topo, cluster = ha
    cluster.etcdctl("put", f"{prefix}/config", HOSTGW.format(net="10.10.0.0/16"))
    a, b = ha_nodes(0).start(), ha_nodes(1).start()
    sb = b.wait_subnet_file()["FLANNEL_SUBNET"][:-5] + ".0/24"
    a.wait_subnet_file()
    h = a.host
    assert wait_until(lambda: sb in _overlay_routes(topo, h, "10.10."), 20), a.log()
    topo.ip(h.netns, "link", "set", h.ifname, "down")
    assert wait_until(lambda: "eth0 is down" in a.log(), 10), a.log()[-1500:]
    assert sb not in _overlay_routes(topo, h, "10.10.")  # the kernel flushed it
    t0 = time.monotonic()
    topo.ip(h.netns, "link", "set", h.ifname, "up")
    assert wait_until(lambda: sb in _overlay_routes(topo, h, "10.10."), 20), a.log()[-1500:]
    figure("link-flap-host-gw", route_back_after_link_up_s=round(time.monotonic() - t0, 2))
    assert "eth0 is up again" in a.log() and a.proc.poll() is None


# ---- the udp backend under traffic ------------------------------------------------------------

UDP = '{"Network":"10.6.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}'


@pytest.fixture(scope="module")
def udp(net_capable, tmp_path_factory):
    """Three hosts on one etcd; udp daemons with containers on hosts 0 and 1."""
    yield from daemon_overlay(UDP, "faults", tmp_path_factory.mktemp("faults"), hosts=3, started=2)


def _paced_transfer(topo, src, dst, size, rate, port):
    sink = topo.popen(
        dst.netns, sys.executable, "-c", SINK, str(dst.ip), str(port), name=f"sink{port}"
    )
    assert wait_until(lambda: "listening" in topo.log_tail(f"sink{port}"), 10)
    source = topo.popen(
        src.netns,
        sys.executable,
        "-c",
        PACED_SOURCE,
        str(dst.ip),
        str(port),
        str(size),
        str(rate),
        name=f"source{port}",
    )
    return sink, source


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_daemon_restart_mid_transfer(udp, sig):
    topo, etcd, nodes = udp
    c0, c1 = topo.hosts[0].container, topo.hosts[1].container
    assert topo.wait_ping(c0.netns, c1.ip, 20)
    subnet = nodes[1].wait_subnet_file()["FLANNEL_SUBNET"]
    key = f"/coreos.com/network/subnets/{subnet[:-5]}.0-24"
    value = leases(etcd, "/coreos.com/network")[key]
    retrans0 = nstat(topo, c0.netns, "TcpRetransSegs").get("TcpRetransSegs", 0)
    port = 5100 + int(sig)
    size, rate = 48 * 1024 * 1024, 8 * 1024 * 1024
    pname = f"ping-restart-{int(sig)}"
    ping = start_ping(topo, c0.netns, c1.ip, pname, seconds=25)
    sink, source = _paced_transfer(topo, c0, c1, size, rate, port)
    try:
        time.sleep(2.0)
        assert source.poll() is None, "transfer ended before the fault"
        t0 = time.monotonic()
        nodes[1].stop(sig)  # SIGTERM: clean stop; SIGKILL: crash
        nodes[1].start()  # what systemd's Restart= does
        assert wait_until(lambda: "running;" in nodes[1].log(), 20), nodes[1].log()
        restarted = time.monotonic() - t0
        assert f"lease acquired: {subnet[:-5]}.0/24" in nodes[1].log()
        assert nodes[1].wait_subnet_file()["FLANNEL_SUBNET"] == subnet
        assert source.wait(120) == 0, topo.log_tail(f"source{port}")
        assert wait_until(lambda: len(topo.log_tail(f"sink{port}").split()) >= 3, 30)
        sent = topo.log_tail(f"source{port}").split()
        got = topo.log_tail(f"sink{port}").split()[-2:]
        assert sent[:2] == got and got[0] == str(size)
    finally:
        topo.stop(source)
        topo.stop(sink)
        topo.stop(ping)
    gaps = ping_gaps(topo.log_path(pname).read_text())
    retrans = nstat(topo, c0.netns, "TcpRetransSegs").get("TcpRetransSegs", 0) - retrans0
    # The subnet never changed: same key, same value in etcd.
    assert leases(etcd, "/coreos.com/network")[key] == value
    figure(
        f"restart-mid-transfer-{signal.Signals(sig).name}",
        stop_to_running_again_s=round(restarted, 2),
        forwarding_gap_s=gaps["gap_s"],
        pings_lost=gaps["lost"],
        pings_sent=gaps["max_seq"],
        transfer_s=sent[2],
        tcp_retransmits=retrans,
    )
    assert "Traceback" not in nodes[1].log()


def test_killed_node_lease_expires_engine_unreachable(udp):
    topo, etcd, nodes = udp
    n2 = nodes[2]
    n2.extra.append("-subnet-lease-ttl=6")
    n2.start()
    subnet = n2.wait_subnet_file()["FLANNEL_SUBNET"][:-5] + ".0/24"
    c2 = topo.add_container(2, n2.subnet_file)
    try:
        c0 = topo.hosts[0].container
        assert topo.wait_ping(c0.netns, c2.ip, 20), nodes[0].log()[-2000:]
        t0 = time.monotonic()
        n2.stop(signal.SIGKILL)  # its lease stays in etcd until the TTL runs out
        res = topo.run(c0.netns, "ping", "-n", "-c", "1", "-W", "1", str(c2.ip), check=False)
        assert "Unreachable" not in res.stdout  # still routed (to a dead host) before expiry
        for node in nodes[:2]:
            assert wait_until(lambda: f"route {subnet} removed" in node.log(), 20), node.log()[
                -2000:
            ]
        gone = time.monotonic() - t0
        res = topo.run(c0.netns, "ping", "-n", "-c", "1", "-W", "2", str(c2.ip), check=False)
        assert res.returncode != 0 and "Unreachable" in res.stdout, res.stdout
        figure(
            "lease-expiry-udp", ttl_s=6, engine_route_removed_on_both_after_kill_s=round(gone, 2)
        )
    finally:
        topo.remove_container(2)
        n2.extra.remove("-subnet-lease-ttl=6")


def test_underlay_link_down_up_and_mtu_change(udp):
    topo, etcd, nodes = udp
    h1 = topo.hosts[1]
    c0, c1 = topo.hosts[0].container, h1.container
    assert topo.wait_ping(c0.netns, c1.ip, 20)
    ping = start_ping(topo, c0.netns, c1.ip, "ping-link", seconds=30)
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        topo.ip(h1.netns, "link", "set", h1.ifname, "down")
        assert wait_until(lambda: "eth0 is down" in nodes[1].log(), 10), nodes[1].log()[-1500:]
        noticed = time.monotonic() - t0
        topo.ip(h1.netns, "link", "set", h1.ifname, "up")
        assert wait_until(lambda: "eth0 is up again" in nodes[1].log(), 10), nodes[1].log()[-1500:]
        time.sleep(1.0)
    finally:
        topo.stop(ping)
    gaps = ping_gaps(topo.log_path("ping-link").read_text())
    assert topo.wait_ping(c0.netns, c1.ip, 20)
    assert topo.ping(c1.netns, c0.ip, count=2)
    assert nodes[1].proc.poll() is None
    figure(
        "link-down-up",
        down_logged_after_s=round(noticed, 2),
        forwarding_gap_s=gaps["gap_s"],
        pings_lost=gaps["lost"],
        pings_sent=gaps["max_seq"],
    )

    # MTU up: flanneld keeps FLANNEL_MTU and the device MTU until it restarts; so do we, and say so.
    try:
        topo.set_underlay_mtu(9000)
        for node in nodes[:2]:
            assert wait_until(
                lambda: "MTU changed from 1500 to 9000; FLANNEL_MTU stays 1472" in node.log(), 10
            ), node.log()[-1500:]
            assert node.wait_subnet_file()["FLANNEL_MTU"] == "1472"
        assert "mtu 1472" in topo.run(h1.netns, "ip", "-o", "link", "show", "flannel0").stdout
        big = topo.run(
            c0.netns,
            "ping",
            "-n",
            "-c",
            "2",
            "-M",
            "do",
            "-s",
            str(1472 - 28),
            str(c1.ip),
            check=False,
        )
        assert big.returncode == 0, big.stdout
        nodes[1].stop()
        nodes[1].start()
        assert wait_until(lambda: "running;" in nodes[1].log(), 20), nodes[1].log()
        assert nodes[1].wait_subnet_file()["FLANNEL_MTU"] == "8972"
        assert "mtu 8972" in topo.run(h1.netns, "ip", "-o", "link", "show", "flannel0").stdout
        assert topo.wait_ping(c0.netns, c1.ip, 20)

        # MTU down below what the running daemons were started with: say so; big packets with
        # DF now die on the underlay (as with flanneld) until the daemons restart.
        topo.set_underlay_mtu(1400)
        assert wait_until(lambda: "MTU changed from 9000 to 1400" in nodes[0].log(), 10), nodes[
            0
        ].log()[-1500:]
        big = topo.run(
            c0.netns,
            "ping",
            "-n",
            "-c",
            "2",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            str(1472 - 28),
            str(c1.ip),
            check=False,
        )
        small = topo.run(
            c0.netns, "ping", "-n", "-c", "2", "-W", "1", "-s", "1000", str(c1.ip), check=False
        )
        figure(
            "mtu-lowered-1400-without-restart",
            big_df_ping_ok=big.returncode == 0,
            small_ping_ok=small.returncode == 0,
            engine_counters=[held for held in nodes[0].log().splitlines() if "counters:" in held][
                -1:
            ],
        )
        assert small.returncode == 0
    finally:
        topo.set_underlay_mtu(1500)
        for node in nodes[:2]:
            node.stop()
            node.start()
        for node in nodes[:2]:
            assert wait_until(lambda: "running;" in node.log(), 20), node.log()
            assert node.wait_subnet_file()["FLANNEL_MTU"] == "1472"
    assert topo.wait_ping(c0.netns, c1.ip, 20)


# ---- the pure parts -------------------------------------------------------------------------


def test_link_change_lines():
    import ipaddress

    from fastlane.iface import Interface
    from fastlane.linkwatch import LinkState, describe

    eth = Interface("eth0", 2, ipaddress.IPv4Address("192.168.100.1"), 1500)
    up, down = LinkState(True, True, 1500), LinkState(True, False, 1500)
    assert describe(eth, up, up, 1472) == []
    assert describe(eth, up, down, 1472) == [
        "underlay interface eth0 is down; traffic to peers stops until it is up"
    ]
    assert describe(eth, down, up, 1472) == ["underlay interface eth0 is up again"]
    assert describe(eth, up, LinkState(True, True, 9000), 1472) == [
        "underlay interface eth0 MTU changed from 1500 to 9000; FLANNEL_MTU stays 1472 until fastlane restarts (as flanneld)"
    ]
    assert describe(eth, up, LinkState(False), 1472)[0].startswith(
        "underlay interface eth0 is gone"
    )
    assert describe(eth, LinkState(False, False, 1500), up, 1472) == [
        "underlay interface eth0 is back",
        "underlay interface eth0 is up again",
    ]


def test_leases_the_backends_refuse_to_route():
    import ipaddress

    from fastlane.backend.base import outside_network
    from fastlane.config import parse_config
    from fastlane.lease import Lease, LeaseAttrs

    cfg = parse_config(b'{"Network":"10.11.0.0/16","SubnetLen":24}')
    ip = LeaseAttrs(public_ip=ipaddress.IPv4Address("192.168.100.9"))

    def why(net: str) -> str | None:
        return outside_network(cfg, Lease(ipaddress.IPv4Network(net), ip))

    assert why("10.11.5.0/24") is None and why("10.11.5.128/25") is None
    assert why("10.11.0.0/16") == "larger than a /24 (SubnetLen)"
    assert why("10.11.4.0/23") == "larger than a /24 (SubnetLen)"
    assert why("172.16.5.0/24") == "not inside the Network 10.11.0.0/16"

"""The udp backend end to end: daemons in host namespaces, containers behind them.

Traffic is real (ping, TCP with a sha256 over the payload) and only flows between the
namespaces these tests create.
"""

from __future__ import annotations

import signal

import pytest

from tests.daemon_helpers import overlay as daemon_overlay
from tests.daemon_helpers import transfer, wait_until

UDP = '{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}'


@pytest.fixture(scope="module")
def overlay(net_capable, tmp_path_factory):
    """Three hosts; daemons on hosts 0 and 1 with containers; host 2 joins in a test."""
    yield from daemon_overlay(UDP, "udp", tmp_path_factory.mktemp("udp"), hosts=3, started=2)


def _c(topo, i):
    return topo.hosts[i].container


def test_subnet_file_and_device_match_flanneld(overlay):
    topo, etcd, nodes = overlay
    env = nodes[0].wait_subnet_file()
    assert env["FLANNEL_MTU"] == "1472"
    link = topo.run(topo.hosts[0].netns, "ip", "-o", "link", "show", "flannel0").stdout
    assert "mtu 1472" in link
    addr = topo.run(topo.hosts[0].netns, "ip", "-o", "-4", "addr", "show", "flannel0").stdout
    assert f"{env['FLANNEL_SUBNET'][:-5]}.0/32" in addr
    routes = topo.run(topo.hosts[0].netns, "ip", "route", "show", "10.5.0.0/16").stdout
    assert "dev flannel0" in routes
    sock = topo.run(topo.hosts[0].netns, "ss", "-uln").stdout
    assert f"{topo.hosts[0].ip}:8285" in sock


def test_ping_both_ways_at_overlay_mtu(overlay):
    topo, _, _ = overlay
    a, b = _c(topo, 0), _c(topo, 1)
    assert topo.wait_ping(a.netns, b.ip, 20), "no connectivity c0 -> c1"
    assert topo.ping(b.netns, a.ip, count=3)
    # The largest packet that fits the overlay MTU, with DF: must pass unfragmented.
    res = topo.run(
        a.netns, "ping", "-n", "-c", "3", "-M", "do", "-s", str(1472 - 28), str(b.ip), check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_tcp_50mib_sha256_matches(overlay):
    topo, _, nodes = overlay
    sent, got = transfer(
        topo, _c(topo, 0).netns, _c(topo, 1).netns, _c(topo, 1).ip, 50 * 1024 * 1024, port=5001
    )
    assert sent == got and sent[0] == str(50 * 1024 * 1024)


def test_tcp_small_segments_sha256_matches(overlay):
    topo, _, _ = overlay
    sent, got = transfer(
        topo,
        _c(topo, 1).netns,
        _c(topo, 0).netns,
        _c(topo, 0).ip,
        4 * 1024 * 1024,
        mss=536,
        port=5002,
    )
    assert sent == got


def test_third_host_joins_and_leaves(overlay):
    topo, etcd, nodes = overlay
    n2 = nodes[2].start()
    n2.wait_subnet_file()
    c2 = topo.add_container(2, n2.subnet_file)
    try:
        assert topo.wait_ping(_c(topo, 0).netns, c2.ip, 20), nodes[0].log()[-2000:]
        assert topo.ping(c2.netns, _c(topo, 1).ip, count=2)
        # It leaves: daemon stopped and its lease deleted. Its route goes, and the others
        # answer ICMP net-unreachable instead of black-holing.
        n2.stop()
        key = f"/coreos.com/network/subnets/{n2.wait_subnet_file()['FLANNEL_SUBNET'][:-5]}.0-24"
        etcd.etcdctl("del", key)
        assert wait_until(lambda: "removed" in nodes[0].log(), 5)
        res = topo.run(
            _c(topo, 0).netns, "ping", "-n", "-c", "1", "-W", "2", str(c2.ip), check=False
        )
        assert res.returncode != 0
        assert "Unreachable" in res.stdout, res.stdout
    finally:
        topo.remove_container(2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_keeps_subnet_and_traffic_resumes(overlay, sig):
    topo, etcd, nodes = overlay
    before = nodes[1].wait_subnet_file()["FLANNEL_SUBNET"]
    nodes[1].stop(sig)
    nodes[1].subnet_file.unlink()
    nodes[1].start()
    assert nodes[1].wait_subnet_file()["FLANNEL_SUBNET"] == before
    assert topo.wait_ping(_c(topo, 0).netns, _c(topo, 1).ip, 20), nodes[1].log()[-2000:]
    assert topo.ping(_c(topo, 1).netns, _c(topo, 0).ip, count=2)


def test_etcd_outage_does_not_stop_traffic(overlay):
    topo, etcd, nodes = overlay
    a, b = _c(topo, 0), _c(topo, 1)
    assert topo.wait_ping(a.netns, b.ip, 20)
    etcd.kill()
    try:
        assert topo.ping(a.netns, b.ip, count=3)
        assert all(n.proc.poll() is None for n in nodes[:2])
    finally:
        etcd.start()
    assert topo.ping(b.netns, a.ip, count=2)

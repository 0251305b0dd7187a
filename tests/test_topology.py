"""The namespace topology: real namespaces, veths and pings; nothing left behind."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import textwrap
import time

import pytest

from fastlane import subnetfile
from fastlane.bench.lab.topology import (
    MANIFEST_DIR,
    SubnetEnv,
    Topology,
    TopologyError,
    cleanup_stale,
)
from fastlane.config import parse_config


def netns_names() -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], check=False, capture_output=True, text=True
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], check=False, capture_output=True, text=True).stdout


def assert_gone(topo: Topology) -> None:
    left = {n for n in netns_names() if n.startswith(topo.prefix)}
    assert not left, f"namespaces left behind: {left}"
    assert topo.prefix not in root_links()
    assert not (MANIFEST_DIR / f"{topo.prefix.rstrip('-')}.json").exists()
    assert not topo.workdir.exists()


def test_hosts_reach_each_other_over_the_underlay(topology) -> None:
    topo = topology(hosts=3, mtu=9000)
    h0, h1, h2 = topo.hosts
    assert topo.ping(h0.netns, h1.ip) and topo.ping(h2.netns, h0.ip)
    # the configured MTU carries a full-size packet with DF set
    res = topo.run(
        h1.netns,
        "ping",
        "-n",
        "-q",
        "-c",
        "1",
        "-M",
        "do",
        "-s",
        str(9000 - 28),
        str(h2.ip),
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # ... and one byte more does not
    res = topo.run(
        h1.netns,
        "ping",
        "-n",
        "-q",
        "-c",
        "1",
        "-W",
        "1",
        "-M",
        "do",
        "-s",
        str(9000 - 27),
        str(h2.ip),
        check=False,
    )
    assert res.returncode != 0
    assert topo.run(h0.netns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert "mtu 9000" in topo.ip(h0.netns, "link", "show", "eth0")
    # the switch address (where the bench puts etcd) is reachable from every host
    assert topo.switch_ip is not None and topo.ping(h2.netns, topo.switch_ip)


def test_container_is_wired_like_docker_from_the_subnet_file(topology, tmp_path) -> None:
    topo = topology(hosts=2, mtu=1500)
    env_file = tmp_path / "subnet.env"
    env_file.write_text(
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.7.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
    )
    c = topo.add_container(0, env_file)
    assert str(c.ip) == "10.5.7.2" and str(c.gateway) == "10.5.7.1" and c.mtu == 1472
    assert "10.5.7.1/24" in topo.ip(topo.hosts[0].netns, "addr", "show", "cni0")
    assert "mtu 1472" in topo.ip(c.netns, "link", "show", "eth0")
    assert "default via 10.5.7.1" in topo.ip(c.netns, "route")
    assert topo.ping(c.netns, c.gateway)
    assert topo.ping(topo.hosts[0].netns, c.ip)
    # the container leaves through its host: it reaches the host's underlay address
    assert topo.ping(c.netns, topo.hosts[0].ip)
    topo.remove_container(0)
    assert c.netns not in netns_names()
    assert "cni0" not in topo.ip(topo.hosts[0].netns, "link")


def test_teardown_leaves_nothing_and_kills_only_its_processes() -> None:
    outsider = subprocess.Popen(["sleep", "60"])
    try:
        with Topology(hosts=2) as topo:
            proc = topo.popen(topo.hosts[1].netns, "sleep", "60", name="sleeper")
            # a grandchild that the topology did not start itself but that lives in its netns
            out = topo.run(topo.hosts[0].netns, "sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!")
            grandchild = int(out.stdout)
            assert {ns for ns in netns_names() if ns.startswith(topo.prefix)} == {
                topo.switch_netns,
                topo.hosts[0].netns,
                topo.hosts[1].netns,
            }
        assert proc.poll() is not None
        assert (
            subprocess.run(
                ["kill", "-0", str(grandchild)], check=False, capture_output=True
            ).returncode
            != 0
        )
        assert_gone(topo)
        assert outsider.poll() is None  # not ours: untouched
    finally:
        outsider.kill()
        outsider.wait()


def test_context_manager_cleans_up_on_error_and_keyboard_interrupt() -> None:
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), Topology(hosts=2) as topo:
            topo.popen(topo.hosts[0].netns, "sleep", "60")
            raise exc
        assert_gone(topo)


def test_failed_setup_is_undone() -> None:
    topo = Topology(hosts=2, mtu=1500)
    topo.hosts[1].ifname = "x" * 20  # too long for the kernel: setup fails on host 1
    with pytest.raises(TopologyError, match="failed"), topo:
        pass
    assert_gone(topo)


def test_bad_arguments_are_one_line_errors() -> None:
    for kwargs in ({"hosts": 0}, {"mtu": 20}, {"underlay": "nonsense"}, {"prefix": "eth"}):
        with pytest.raises(TopologyError) as err:
            Topology(**kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(TopologyError, match="FLANNEL_SUBNET"):
        SubnetEnv.parse("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n")


def test_subnet_env_round_trip() -> None:
    env = SubnetEnv.for_lease("10.5.0.0/16", "10.5.72.0/24", 1450)
    assert env.render() == (
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    )
    assert SubnetEnv.parse(env.render()) == env


def test_subnet_env_reads_what_the_daemon_writes() -> None:
    config = parse_config('{"Network":"10.5.0.0/16"}')
    text = subnetfile.render(config, ipaddress.IPv4Network("10.5.72.0/24"), 1450, True)
    assert SubnetEnv.parse(text) == SubnetEnv.for_lease("10.5.0.0/16", "10.5.72.0/24", 1450, True)
    assert SubnetEnv.parse(text).render() == text


def test_cleanup_stale_removes_a_killed_run_and_spares_live_ones(net_capable) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from fastlane.bench.lab.topology import Topology
        t = Topology(hosts=2)
        t.setup()
        t.popen(t.hosts[0].netns, "sleep", "120")
        print(t.prefix, flush=True)
        time.sleep(120)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    live = Topology(hosts=1)
    try:
        live.setup()
        assert child.stdout is not None
        prefix = child.stdout.readline().strip()
        assert prefix.startswith("fl")
        manifest = json.loads((MANIFEST_DIR / f"{prefix.rstrip('-')}.json").read_text())
        sleeper = manifest["pids"][0]
        # owner alive: nothing is touched
        assert not [ns for ns in cleanup_stale() if ns.startswith(prefix)]
        assert any(ns.startswith(prefix) for ns in netns_names())
        child.kill()  # SIGKILL: no chance to clean up
        child.wait()
        removed = cleanup_stale()
        assert {f"{prefix}sw", f"{prefix}h0", f"{prefix}h1"} <= set(removed)
        assert not any(ns.startswith(prefix) for ns in netns_names())
        time.sleep(0.1)
        assert (
            subprocess.run(
                ["kill", "-0", str(sleeper)], check=False, capture_output=True
            ).returncode
            != 0
        )
        # the live topology of this process was spared
        assert live.switch_ip is not None and live.ping(live.hosts[0].netns, live.switch_ip)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        live.teardown()
        cleanup_stale()

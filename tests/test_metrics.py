"""`/metrics` on the health port, scraped over HTTP from real udp daemons after real traffic.

Oracles: the engine's own counters as the daemon logs them at exit ("udp engine counters
at exit: ..."), the offloads it logs at start, the subnet file, etcdctl, and the traffic
the test itself sent (pings, a TCP transfer, pings to an unleased subnet).
"""

from __future__ import annotations

import re
import signal
import sys
import textwrap
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastlane.bench.lab.etcdserver import EtcdServer
from fastlane.bench.lab.topology import Topology
from tests.daemon_helpers import Node, transfer, unleased, wait_until

UDP = '{"Network":"10.9.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}'
PREFIX = "/coreos.com/network"
PORT = 9102

SCRAPE = textwrap.dedent("""
    import sys, urllib.request as u
    r = u.urlopen(sys.argv[1], timeout=10)
    sys.stdout.write(r.headers.get("Content-Type", "") + "\\n" + r.read().decode())
""")


@pytest.fixture(scope="module")
def overlay(net_capable, tmp_path_factory):
    """Three hosts, etcd; udp daemons with /metrics on hosts 0 and 1, containers behind them.
    Host 2 is for a daemon a test starts itself. Everything is torn down, pass or fail."""
    workdir = tmp_path_factory.mktemp("metrics")
    topo = Topology(hosts=3, mtu=1500)
    etcd = None
    nodes: list[Node] = []
    try:
        topo.setup()
        etcd = EtcdServer(
            netns=topo.switch_netns, host=str(topo.switch_ip), name="fastlane-metrics-tests"
        )
        etcd.start()
        etcd.etcdctl("put", f"{PREFIX}/config", UDP)
        nodes = [
            Node(topo, h, etcd, PREFIX, workdir, "-v=1", f"-healthz-port={PORT}")
            for h in topo.hosts
        ]
        for n in nodes[:2]:
            n.start()
        for i, n in enumerate(nodes[:2]):
            n.wait_subnet_file()
            topo.add_container(i, n.subnet_file)
        yield topo, etcd, nodes
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)
        if etcd is not None:
            etcd.cleanup()
        topo.teardown()


def scrape(topo: Topology, node: Node, path: str = "/metrics") -> tuple[str, dict[str, dict]]:
    """GET /metrics inside the node's netns; (content type, {sample name: {labels: value}})."""
    res = topo.run(node.host.netns, sys.executable, "-c", SCRAPE, f"http://127.0.0.1:{PORT}{path}")
    ctype, _, text = res.stdout.partition("\n")
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return ctype, samples


def one(samples: dict[str, dict], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def exit_counters(log: str) -> dict[str, int]:
    line = [line for line in log.splitlines() if "udp engine counters at exit:" in line][-1]
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split("at exit:")[1].split())}


def test_metrics_format_and_build_info(overlay):
    topo, _, nodes = overlay
    ctype, m = scrape(topo, nodes[0])
    assert ctype.startswith("text/plain")
    assert (
        len(m["fastlane_build_info"]) == 1
        and one(m, "fastlane_build_info", **dict(next(iter(m["fastlane_build_info"])))) == 1
    )
    labels = dict(next(iter(m["fastlane_build_info"])))
    assert labels["backend"] == "udp" and labels["version"] and labels["python"]
    assert one(m, "fastlane_ready") == 1
    assert "process_resident_memory_bytes" in m  # the process collector, on our registry
    # Prometheus conventions: every fastlane counter ends in _total, every sample has the prefix.
    assert all(name.startswith(("fastlane_", "process_")) for name in m)
    for name in (
        "fastlane_udp_tx_packets_total",
        "fastlane_udp_rx_bytes_total",
        "fastlane_udp_dropped_packets_total",
        "fastlane_lease_renewals_total",
        "fastlane_etcd_watch_events_total",
        "fastlane_backend_sync_errors_total",
    ):
        assert name in m, name
    # The health endpoints are unchanged.
    assert (
        "flanneld is running"
        in topo.run(
            nodes[0].host.netns, sys.executable, "-c", SCRAPE, f"http://127.0.0.1:{PORT}/healthz"
        ).stdout
    )


def test_lease_peers_and_etcd_metrics(overlay):
    topo, etcd, nodes = overlay
    env = nodes[0].wait_subnet_file()
    subnet = env["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".0/24"
    _, m = scrape(topo, nodes[0])
    info = dict(next(iter(m["fastlane_lease_info"])))
    assert info == {"subnet": subnet, "public_ip": str(nodes[0].host.ip)}
    assert 86400 - 120 < one(m, "fastlane_lease_expiry_seconds") <= 86400
    assert one(m, "fastlane_peers") == 1
    assert one(m, "fastlane_etcd_connected") == 1
    assert one(m, "fastlane_etcd_resyncs_total") >= 1
    before = one(m, "fastlane_etcd_watch_events_total")
    # A peer comes and goes: two watch events, the peer count follows.
    key = f"{PREFIX}/subnets/" + unleased(etcd, PREFIX, "10.9.0.0/16")[0].replace("/", "-")
    etcd.etcdctl("put", key, '{"PublicIP":"192.168.100.77","PublicIPv6":null}')
    assert wait_until(lambda: one(scrape(topo, nodes[0])[1], "fastlane_peers") == 2, 10)
    etcd.etcdctl("del", key)
    assert wait_until(lambda: one(scrape(topo, nodes[0])[1], "fastlane_peers") == 1, 10)
    _, m = scrape(topo, nodes[0])
    assert one(m, "fastlane_etcd_watch_events_total") == before + 2
    assert one(m, "fastlane_backend_sync_errors_total") == 0


def test_engine_counters_after_traffic_match_the_engine(overlay):
    """Pings, a TCP transfer and pings to an unleased subnet; then /metrics against the
    engine's counters as the daemon logs them when it stops (nothing moves in between)."""
    topo, _, nodes = overlay
    a, b = topo.hosts[0].container, topo.hosts[1].container
    assert topo.wait_ping(a.netns, b.ip, 20)
    _, m0 = scrape(topo, nodes[0])
    res = topo.run(a.netns, "ping", "-n", "-q", "-c", "20", "-i", "0.02", str(b.ip), check=False)
    assert " 0% packet loss" in res.stdout, res.stdout
    size = 4 * 1024 * 1024
    sent, got = transfer(topo, a.netns, b.netns, b.ip, size, port=5301, timeout=60)
    assert sent == got and got[0] == str(size)
    # 10.9.250.1 is in the Network but nobody leases it: dropped (no route), ICMP sent back.
    topo.run(
        a.netns, "ping", "-n", "-q", "-c", "5", "-i", "0.05", "-W", "1", "10.9.250.1", check=False
    )
    time.sleep(1.0)
    _, m = scrape(topo, nodes[0])

    def grew(name: str, **labels: str) -> float:
        return one(m, name, **labels) - one(m0, name, **labels)

    assert (
        grew("fastlane_udp_tx_packets_total") >= 20 and grew("fastlane_udp_rx_packets_total") >= 20
    )
    assert grew("fastlane_udp_tx_bytes_total") >= size  # inner packets carry the payload
    assert grew("fastlane_udp_dropped_packets_total", reason="tx_no_route") == 5
    assert grew("fastlane_udp_icmp_sent_total") == 5
    # Offloads: one gauge per feature; those at 1 are the ones the daemon logged at start.
    feats = {dict(k)["feature"]: v for k, v in m["fastlane_udp_feature_enabled"].items()}
    assert set(feats) >= {"vnet_hdr", "tso", "gso", "gro", "coalesce", "multiqueue"}
    assert set(feats.values()) <= {0.0, 1.0}
    logged = re.search(r"engine features (\S+)", nodes[0].log()).group(1)
    assert {f for f, v in feats.items() if v} == (
        set() if logged == "none" else set(logged.split(","))
    )
    # Quiet now: a second scrape is identical (the counters only move with traffic) ...
    _, again = scrape(topo, nodes[0])
    udp = [n for n in m if n.startswith("fastlane_udp_") and n.endswith("_total")]
    assert {n: m[n] for n in udp} == {n: again[n] for n in udp}
    # ... and equal to what the engine reports when the daemon stops.
    assert nodes[0].stop() == 0
    engine = exit_counters(nodes[0].log())
    assert engine["tx_packets"] > 0
    exported = {}
    for name in udp:
        for labels, value in m[name].items():
            base = name[len("fastlane_udp_") : -len("_total")]
            key = f"drop_{dict(labels)['reason']}" if base == "dropped_packets" else base
            exported[key] = int(value)
    assert {k: v for k, v in exported.items() if v} == engine
    nodes[0].start()  # for any later test
    nodes[0].wait_subnet_file()


def test_renewals_retakes_and_reconnects(overlay):
    topo, etcd, nodes = overlay
    n = nodes[2]
    n.extra.append("-subnet-lease-ttl=6")  # renewed about every 3 s
    n.start()
    try:
        env = n.wait_subnet_file()
        key = f"{PREFIX}/subnets/" + env["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".0-24"
        assert wait_until(
            lambda: one(scrape(topo, n)[1], "fastlane_lease_renewals_total") >= 2, 20
        ), n.log()
        _, m = scrape(topo, n)
        assert 0 < one(m, "fastlane_lease_expiry_seconds") <= 6
        assert one(m, "fastlane_lease_retakes_total") == 0
        # Someone deletes our key: the daemon takes the subnet again and counts it.
        etcd.etcdctl("del", key)
        assert wait_until(
            lambda: one(scrape(topo, n)[1], "fastlane_lease_retakes_total") == 1, 15
        ), n.log()
        # etcd goes away and comes back: not connected meanwhile, one reconnect after.
        assert one(scrape(topo, n)[1], "fastlane_etcd_reconnects_total") == 0
        etcd.stop()
        try:
            assert wait_until(
                lambda: one(scrape(topo, n)[1], "fastlane_etcd_connected") == 0, 30
            ), n.log()
            assert wait_until(
                lambda: one(scrape(topo, n)[1], "fastlane_lease_renewal_failures_total") >= 1, 20
            ), n.log()
        finally:
            etcd.start()
        assert wait_until(lambda: one(scrape(topo, n)[1], "fastlane_etcd_connected") == 1, 30), (
            n.log()
        )
        _, m = scrape(topo, n)
        assert one(m, "fastlane_etcd_reconnects_total") == 1
        assert one(m, "fastlane_etcd_resyncs_total") >= 2
    finally:
        n.stop(signal.SIGKILL)


class _FakeEngine:
    features = {"gso": True, "tso": False}


class _FakeBackend:
    engine = _FakeEngine()

    def counters(self):
        return {
            "tx_packets": 7,
            "tx_bytes": 700,
            "drop_tx_no_route": 3,
            "drop_rx_malformed": 0,
            "some_future_counter": 2,
        }


class _FakeDaemon:
    backend = None
    lease = None
    store = None
    watcher = None
    table = None
    ready = False


def _render(daemon) -> dict[str, dict]:
    from fastlane.metrics import Metrics

    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(Metrics(daemon).render().decode()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_collector_before_start_up_and_with_an_engine():
    """No daemon process: what a scrape shows before start-up completes, and how engine
    counters map to metric names (a counter the engine adds later keeps its own name)."""
    m = _render(_FakeDaemon())
    assert one(m, "fastlane_ready") == 0 and one(m, "fastlane_etcd_connected") == 0
    assert one(m, "fastlane_peers") == 0 and "fastlane_lease_info" not in m
    assert not any(n.startswith("fastlane_udp_") for n in m)
    d = _FakeDaemon()
    d.backend = _FakeBackend()
    m = _render(d)
    assert (
        one(m, "fastlane_udp_tx_packets_total") == 7
        and one(m, "fastlane_udp_tx_bytes_total") == 700
    )
    assert one(m, "fastlane_udp_dropped_packets_total", reason="tx_no_route") == 3
    assert one(m, "fastlane_udp_dropped_packets_total", reason="rx_malformed") == 0
    assert one(m, "fastlane_udp_some_future_counter_total") == 2
    assert one(m, "fastlane_udp_feature_enabled", feature="gso") == 1
    assert one(m, "fastlane_udp_feature_enabled", feature="tso") == 0
    # fastlane registers nothing on prometheus_client's global registry.
    from prometheus_client import REGISTRY

    assert not any(n.startswith("fastlane_") for f in REGISTRY.collect() for n in [f.name])

"""`/metrics` on the health port: Prometheus text format, read at scrape time.

flanneld has no metrics endpoint; this one is fastlane's own. Everything is collected when
Prometheus scrapes, by one custom collector on a registry of its own (never
prometheus_client's global one), so nothing runs per packet or per event on fastlane's
side beyond the plain integer increments the daemon and watcher already make:

- udp engine: `Engine.counters()` (one C call) and `Engine.features`. Every engine counter
  becomes `fastlane_udp_<name>_total`, except the `drop_*` ones, which form one family
  `fastlane_udp_dropped_packets_total{reason="<name without drop_>"}`; features are
  `fastlane_udp_feature_enabled{feature=...}` (1/0). A counter the engine adds later shows up
  under its own name without a change here.
- lease: `fastlane_lease_info{subnet,public_ip}`, seconds to expiry (+Inf for a reservation),
  renewals, failed renewals, re-takes.
- peers in the lease table; etcd: connected, reconnects, watch events, re-lists (resyncs);
  backend sync errors (a lease table subscriber that raised), rules re-installs and errors;
  build info. Process metrics (CPU, memory, fds) come from prometheus_client's own collector.

Names follow Prometheus conventions: `fastlane_` prefix, `_total` on counters, the unit in
the name (`_bytes`, `_seconds`).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import prometheus_client.exposition
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "DaemonStats", "Metrics", "engine_metric_name"]

# The classic text format (0.0.4), which every Prometheus version scrapes; all our names are
# plain ASCII, so the text is the same as 1.0.0's. (prometheus_client < 0.22: LATEST is 0.0.4.)
CONTENT_TYPE = getattr(
    prometheus_client.exposition,
    "CONTENT_TYPE_PLAIN_0_0_4",
    prometheus_client.exposition.CONTENT_TYPE_LATEST,
)

# Help text for the engine's counters (csrc/README.md, "Counters"); tx = TUN -> UDP, rx = UDP -> TUN.
_ENGINE_HELP = {
    "tx_packets": "Datagrams sent to peers (accepted by the kernel).",
    "tx_bytes": "Bytes of the packets sent to peers.",
    "rx_packets": "Datagrams received from peers that passed the checks.",
    "rx_bytes": "Bytes of the packets received from peers that passed the checks.",
    "tx_batches": "Batches read from the TUN (mean batch size: tx_batch_reads / tx_batches).",
    "tx_batch_reads": "TUN reads made in batches.",
    "tx_sendmmsg_calls": "sendmmsg calls.",
    "tx_msgs": "Messages handed to sendmmsg.",
    "tx_gso_msgs": "Messages sent with UDP GSO (of tx_msgs).",
    "tx_tso_frames": "TSO frames read from the TUN.",
    "tx_tso_segments": "Packets the TSO frames were split into.",
    "rx_batches": "Batches received from the socket (mean batch size: rx_batch_msgs / rx_batches).",
    "rx_batch_msgs": "Messages received in batches.",
    "rx_gro_msgs": "Messages received as UDP GRO aggregates.",
    "rx_tun_writes": "Writes to the TUN.",
    "rx_coalesced_frames": "Frames coalesced before the TUN write.",
    "rx_coalesced_segments": "Segments the coalesced frames were made of.",
    "icmp_sent": "ICMP errors sent back into the TUN.",
    "icmp_suppressed": "ICMP errors not sent (rate limit or not allowed).",
    "route_updates": "Route table swaps.",
    "tx_eagain_waits": "Waits for the socket to become writable.",
    "tx_gso_fallbacks": "GSO sends retried without GSO.",
    "tx_wait_rx_rounds": "Receive rounds served while the send side waited.",
    "io_errors": "I/O errors on the TUN or the socket.",
}


def engine_metric_name(counter: str) -> tuple[str, dict[str, str]]:
    """The metric (without `_total`) and labels an engine counter is exported as."""
    if counter.startswith("drop_"):
        return "fastlane_udp_dropped_packets", {"reason": counter[len("drop_") :]}
    return f"fastlane_udp_{counter}", {}


@dataclass
class DaemonStats:
    """What the daemon counts for /metrics (plain increments where each thing happens)."""

    lease_renewals: int = 0
    lease_renewal_failures: int = 0
    lease_retakes: int = 0
    rules_reinstalls: int = 0
    rules_sync_errors: int = 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fastlane")
    except Exception:  # noqa: BLE001 - not installed (a source tree): still serve metrics
        return "unknown"


class _DaemonCollector(Collector):
    def __init__(self, daemon: Any) -> None:
        self.d = daemon
        self.version = _version()

    def collect(self) -> Iterator[Any]:
        d = self.d
        yield from self._build()
        yield from self._engine(getattr(d, "backend", None))
        yield from self._lease(d)
        yield from self._etcd(d)
        stats: DaemonStats = getattr(d, "stats", None) or DaemonStats()
        table = getattr(d, "table", None)
        g = GaugeMetricFamily(
            "fastlane_peers", "Peer leases in the lease table (routes the backend keeps)."
        )
        g.add_metric([], len(table) if table is not None else 0)
        yield g
        c = CounterMetricFamily(
            "fastlane_backend_sync_errors", "Lease table changes the backend failed to apply."
        )
        c.add_metric([], getattr(table, "subscriber_errors", 0))
        yield c
        c = CounterMetricFamily(
            "fastlane_rules_reinstalls",
            "Times the iptables/nftables rules were found missing and re-installed.",
        )
        c.add_metric([], stats.rules_reinstalls)
        yield c
        c = CounterMetricFamily("fastlane_rules_sync_errors", "Failed iptables/nftables resyncs.")
        c.add_metric([], stats.rules_sync_errors)
        yield c
        g = GaugeMetricFamily("fastlane_ready", "1 once the daemon is ready (as /readyz), else 0.")
        g.add_metric([], 1 if getattr(d, "ready", False) else 0)
        yield g

    def _build(self) -> Iterator[Any]:
        i = InfoMetricFamily("fastlane_build", "fastlane build information.")
        backend = getattr(self.d, "backend", None)
        cfg = getattr(getattr(backend, "ctx", None), "config", None)
        i.add_metric(
            [],
            {
                "version": self.version,
                "python": platform.python_version(),
                "backend": getattr(cfg, "backend_type", "") or "",
            },
        )
        yield i

    def _engine(self, backend: Any) -> Iterator[Any]:
        if backend is None:
            return
        counters = backend.counters()
        drops = CounterMetricFamily(
            "fastlane_udp_dropped_packets",
            "Packets and datagrams the udp engine dropped, by reason.",
            labels=["reason"],
        )
        for name, value in sorted(counters.items()):
            metric, labels = engine_metric_name(name)
            if labels:
                drops.add_metric([labels["reason"]], value)
                continue
            c = CounterMetricFamily(metric, _ENGINE_HELP.get(name, f"udp engine counter {name}."))
            c.add_metric([], value)
            yield c
        if counters:
            yield drops
        engine = getattr(backend, "engine", None)
        if engine is not None:
            g = GaugeMetricFamily(
                "fastlane_udp_feature_enabled",
                "udp engine features in use (offloads, queues), 1 or 0.",
                labels=["feature"],
            )
            for name, on in sorted(engine.features.items()):
                g.add_metric([name], 1 if on else 0)
            yield g

    def _lease(self, d: Any) -> Iterator[Any]:
        stats: DaemonStats = getattr(d, "stats", None) or DaemonStats()
        lease = getattr(d, "lease", None)
        if lease is not None:
            i = InfoMetricFamily("fastlane_lease", "This node's lease.")
            i.add_metric([], {"subnet": str(lease.subnet), "public_ip": str(lease.attrs.public_ip)})
            yield i
            g = GaugeMetricFamily(
                "fastlane_lease_expiry_seconds",
                "Seconds until this node's lease expires (+Inf: a reservation).",
            )
            g.add_metric([], math.inf if lease.expiration is None else lease.remaining())
            yield g
        for name, value, text in (
            ("fastlane_lease_renewals", stats.lease_renewals, "Successful lease renewals."),
            (
                "fastlane_lease_renewal_failures",
                stats.lease_renewal_failures,
                "Failed lease renewals.",
            ),
            (
                "fastlane_lease_retakes",
                stats.lease_retakes,
                "Times the lease was taken again after someone deleted it.",
            ),
        ):
            c = CounterMetricFamily(name, text)
            c.add_metric([], value)
            yield c

    def _etcd(self, d: Any) -> Iterator[Any]:
        w = getattr(d, "watcher", None)
        store = getattr(d, "store", None)
        connected = (
            store is not None
            and store.endpoint is not None
            and (w is None or getattr(w, "connected", True))
        )
        g = GaugeMetricFamily(
            "fastlane_etcd_connected",
            "1 while etcd answers (connection up and the lease watch running).",
        )
        g.add_metric([], 1 if connected else 0)
        yield g
        for name, attr, text in (
            (
                "fastlane_etcd_reconnects",
                "reconnects",
                "Times the lease watch came back after etcd failed.",
            ),
            ("fastlane_etcd_watch_events", "events", "Lease events received from the etcd watch."),
            (
                "fastlane_etcd_resyncs",
                "resyncs",
                "Full re-lists of the lease prefix (1 at start, 1 more after each watch interruption).",
            ),
        ):
            c = CounterMetricFamily(name, text)
            c.add_metric([], getattr(w, attr, 0) if w is not None else 0)
            yield c


class Metrics:
    """A registry of fastlane's own, with the daemon collector and the process collector."""

    def __init__(self, daemon: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_DaemonCollector(daemon))
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

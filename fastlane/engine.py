"""Python face of the C data-plane engine (csrc/, built by build.py into fastlane._engine).

The engine owns the packets: its pthreads move them between the TUN queues and the UDP socket
and never call back into Python. This wrapper owns only the objects' lifetime and converts the
route table, so the asyncio side can hand it a whole new table on every etcd change (the C side
swaps it in atomically; workers never wait for it).

Counter names: "tx" is TUN -> UDP (encapsulation), "rx" is UDP -> TUN. rx_packets/rx_bytes
count datagram payloads that passed the checks (a later TUN write error is counted as
drop_rx_tun_write_error); tx_packets/tx_bytes count datagrams the kernel accepted.
Mean batch sizes: tx_batch_reads / tx_batches, rx_batch_msgs / rx_batches.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastlane._engine import ffi, lib

_ERRLEN = 256


class EngineError(Exception):
    """The engine could not be created or started (one-line message)."""


def _check(rc: int, what: str, ffi_: Any = ffi) -> int:
    """The one way engine calls are checked: a negative result raises EngineError naming the
    call and the errno the C side left, so the cause (ENOMEM, EAGAIN from pthread_create...)
    reaches the operator's log instead of a bare "failed"."""
    if rc < 0:
        err = ffi_.errno
        raise EngineError(f"{what}: {os.strerror(err)}" if err else what)
    return rc


@dataclass(frozen=True)
class Route:
    """One lease: packets for `network` go to next_hop:port."""

    network: ipaddress.IPv4Network
    next_hop: ipaddress.IPv4Address
    port: int


#: TUN queues (one worker thread each) an engine can drive: the C side's FL_MAX_QUEUES.
MAX_QUEUES: int = lib.FL_MAX_QUEUES

COUNTER_NAMES: tuple[str, ...] = tuple(
    ffi.string(lib.fl_counter_name(i)).decode() for i in range(lib.fl_counter_count())
)
#: counter index -> name (a drop reason is a counter index)
REASONS: dict[int, str] = dict(enumerate(COUNTER_NAMES))


def _route_tuple(r: Route) -> tuple[int, int, int, int]:
    """(net, len, next_hop, port) for the C array. Typed values are used as they are: a table of
    thousands of routes is converted on every swap, and re-parsing each address from text
    would cost more than the C side's whole build and swap."""
    net = (
        r.network
        if isinstance(r.network, ipaddress.IPv4Network)
        else ipaddress.IPv4Network(r.network)
    )
    hop = (
        r.next_hop
        if isinstance(r.next_hop, ipaddress.IPv4Address)
        else ipaddress.IPv4Address(r.next_hop)
    )
    if not 0 < r.port < 65536:
        raise ValueError(f"route {net}: port {r.port} out of range")
    return int(net.network_address), net.prefixlen, int(hop), r.port


def _routes_array(routes: Iterable[Route], ffi_: Any = ffi) -> tuple[Any, int]:
    rows = [_route_tuple(r) for r in routes]
    return ffi_.new("struct fl_route[]", rows or 1), len(rows)


class Engine:
    """One data plane: TUN queue fds + one UDP socket fd (both owned by the caller).

    The fds must stay open until stop(). Whether the TUN carries virtio_net_hdr is read from
    the fd itself (open it with `open_tun(..., vnet_hdr=True)` to get the TSO path); with
    offload=False the engine uses neither TSO nor UDP GSO/GRO.

    check_source turns on the receive source checks: a datagram must come from a next hop of
    the route table, from that peer's port, and when `network` (the flannel Network) is given,
    an inner source inside it must lie in a subnet routed to that same peer.
    """

    #: the cffi module behind this class; the tests' subclass uses a build with test entry points
    _ffi: Any = ffi
    _lib: Any = lib

    def __init__(
        self,
        tun_fds: list[int],
        udp_fd: int,
        mtu: int,
        tun_addr: ipaddress.IPv4Address,
        *,
        check_source: bool = True,
        offload: bool = True,
        icmp_rate: int = 100,
        icmp_burst: int = 0,
        rx_thread: bool = False,
        network: ipaddress.IPv4Network | None = None,
    ) -> None:
        if len(tun_fds) > MAX_QUEUES:
            raise EngineError(f"at most {MAX_QUEUES} TUN queues, not {len(tun_fds)}")
        cfg = self._ffi.new("struct fl_config *")
        for i, fd in enumerate(tun_fds):
            cfg.tun_fds[i] = fd
        cfg.n_tun = len(tun_fds)
        cfg.udp_fd = udp_fd
        cfg.mtu = mtu
        cfg.tun_addr = int(ipaddress.IPv4Address(tun_addr))
        cfg.check_source = int(check_source)
        if network is not None:
            net = ipaddress.IPv4Network(network)
            cfg.network = int(net.network_address)
            cfg.network_len = net.prefixlen
        cfg.offload = int(offload)
        cfg.icmp_rate = icmp_rate
        cfg.icmp_burst = icmp_burst
        cfg.rx_thread = int(rx_thread)
        err = self._ffi.new("char[]", _ERRLEN)
        e = self._lib.fl_engine_new(cfg, err, _ERRLEN)
        if e == self._ffi.NULL:
            raise EngineError(self._ffi.string(err).decode() or "cannot create engine")
        self._e = self._ffi.gc(e, self._lib.fl_engine_free)
        self._lock = threading.Lock()  # start/stop only; routes and counters need none
        self._started = False
        f = self._ffi.new("struct fl_features *")
        self._lib.fl_engine_features(self._e, f)
        self._features_c = f

    @property
    def features(self) -> dict[str, bool]:
        """What the start-up probes enabled (gso can turn off later if the egress refuses it)."""
        f = self._features_c
        self._lib.fl_engine_features(self._e, f)
        return {
            "vnet_hdr": bool(f.vnet_hdr),
            "tso": bool(f.tso),
            "gso": bool(f.gso),
            "gro": bool(f.gro),
            "coalesce": bool(f.coalesce),
            "multiqueue": bool(f.multiqueue),
            "steer": bool(f.steer),
        }

    def set_routes(self, routes: Iterable[Route]) -> None:
        """Replace the whole table; returns once no worker can still see the old one."""
        arr, n = _routes_array(routes, self._ffi)
        _check(
            self._lib.fl_engine_set_routes(self._e, arr, n),
            "cannot build the route table",
            self._ffi,
        )

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            _check(self._lib.fl_engine_start(self._e), "cannot start the engine threads", self._ffi)
            self._started = True

    def stop(self) -> None:
        """Wake and join the workers; safe to call twice."""
        with self._lock:
            if self._started:
                self._lib.fl_engine_stop(self._e)
                self._started = False

    def counters(self) -> dict[str, int]:
        out = self._ffi.new("uint64_t[]", len(COUNTER_NAMES))
        self._lib.fl_engine_counters(self._e, out, len(COUNTER_NAMES))
        return {name: out[i] for i, name in enumerate(COUNTER_NAMES) if i}


def describe_changes(
    before: dict[str, int],
    after: dict[str, int],
    features_before: dict[str, bool],
    features_after: dict[str, bool],
) -> list[str]:
    """Log lines for what changed in the engine between two looks: offloads that turned off or
    on (UDP GSO pauses after a failed send), and drops by reason. The engine never writes to
    stderr; the daemon looks periodically and logs these lines, so every drop reaches the log
    as a count and a name."""
    lines = []
    for name in sorted(features_after):
        was, now = features_before.get(name), features_after[name]
        if was is not None and was != now:
            lines.append(f"udp engine: {name} {'on again' if now else 'off'}")
    drops = {
        k: after[k] - before.get(k, 0)
        for k in sorted(after)
        if (k.startswith("drop_") or k in ("io_errors", "tx_gso_fallbacks"))
        and after[k] > before.get(k, 0)
    }
    if drops:
        lines.append("udp engine: " + " ".join(f"{k}=+{v}" for k, v in drops.items()))
    return lines

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

from fastlane._engine import ffi, lib

_ERRLEN = 256


class EngineError(Exception):
    """The engine could not be created or started (one-line message)."""


def _check(rc: int, what: str) -> int:
    """The one way engine calls are checked: a negative result raises EngineError naming the
    call and the errno the C side left, so the cause (ENOMEM, EAGAIN from pthread_create...)
    reaches the operator's log instead of a bare "failed"."""
    if rc < 0:
        err = ffi.errno
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
#: counter index -> name, for the verdicts of the pure test functions
REASONS: dict[int, str] = dict(enumerate(COUNTER_NAMES))


def _routes_array(routes: Iterable[Route]):
    rs = list(routes)
    arr = ffi.new("struct fl_route[]", max(len(rs), 1))
    for i, r in enumerate(rs):
        net = ipaddress.IPv4Network(r.network)
        if not 0 < r.port < 65536:
            raise ValueError(f"route {net}: port {r.port} out of range")
        arr[i].net = int(net.network_address)
        arr[i].len = net.prefixlen
        arr[i].next_hop = int(ipaddress.IPv4Address(r.next_hop))
        arr[i].port = r.port
    return arr, len(rs)


class Engine:
    """One data plane: TUN queue fds + one UDP socket fd (both owned by the caller).

    The fds must stay open until stop(). Whether the TUN carries virtio_net_hdr is read from
    the fd itself (open it with `open_tun(..., vnet_hdr=True)` to get the TSO path); with
    offload=False the engine uses neither TSO nor UDP GSO/GRO.

    check_source turns on the receive source checks: a datagram must come from a next hop of
    the route table, from that peer's port, and when `network` (the flannel Network) is given,
    an inner source inside it must lie in a subnet routed to that same peer.
    """

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
        cfg = ffi.new("struct fl_config *")
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
        err = ffi.new("char[]", _ERRLEN)
        e = lib.fl_engine_new(cfg, err, _ERRLEN)
        if e == ffi.NULL:
            raise EngineError(ffi.string(err).decode() or "cannot create engine")
        self._e = ffi.gc(e, lib.fl_engine_free)
        self._lock = threading.Lock()  # start/stop only; routes and counters need none
        self._started = False
        f = ffi.new("struct fl_features *")
        lib.fl_engine_features(self._e, f)
        self._features_c = f

    @property
    def features(self) -> dict[str, bool]:
        """What the start-up probes enabled (gso can turn off later if the egress refuses it)."""
        f = self._features_c
        lib.fl_engine_features(self._e, f)
        return {
            "vnet_hdr": bool(f.vnet_hdr),
            "tso": bool(f.tso),
            "gso": bool(f.gso),
            "gro": bool(f.gro),
            "coalesce": bool(f.coalesce),
            "multiqueue": bool(f.multiqueue),
        }

    def set_routes(self, routes: Iterable[Route]) -> None:
        """Replace the whole table; returns once no worker can still see the old one."""
        arr, n = _routes_array(routes)
        _check(lib.fl_engine_set_routes(self._e, arr, n), "cannot build the route table")

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            _check(lib.fl_engine_start(self._e), "cannot start the engine threads")
            self._started = True

    def stop(self) -> None:
        """Wake and join the workers; safe to call twice."""
        with self._lock:
            if self._started:
                lib.fl_engine_stop(self._e)
                self._started = False

    def counters(self) -> dict[str, int]:
        out = ffi.new("uint64_t[]", len(COUNTER_NAMES))
        lib.fl_engine_counters(self._e, out, len(COUNTER_NAMES))
        return {name: out[i] for i, name in enumerate(COUNTER_NAMES) if i}

    # ---- pure per-packet entry points (no I/O), used by the tests ----

    def lookup(self, dst: ipaddress.IPv4Address) -> tuple[ipaddress.IPv4Address, int] | None:
        hop = ffi.new("uint32_t *")
        port = ffi.new("uint16_t *")
        if not lib.fl_lookup(self._e, int(dst), hop, port):
            return None
        return ipaddress.IPv4Address(hop[0]), port[0]

    def encap_verdict(self, packet: bytes) -> tuple[str, bytes, tuple[ipaddress.IPv4Address, int] | None, bytes]:
        """(verdict, packet after TTL change, destination, ICMP error or b"")."""
        buf = ffi.new("uint8_t[]", max(len(packet), 1))
        ffi.memmove(buf, packet, len(packet))
        hop = ffi.new("uint32_t *")
        port = ffi.new("uint16_t *")
        icmp = ffi.new("uint8_t[]", 128)
        icmp_len = ffi.new("int *")
        v = lib.fl_tx_packet(self._e, buf, len(packet), hop, port, icmp, icmp_len)
        out = bytes(ffi.buffer(buf, len(packet)))
        reply = bytes(ffi.buffer(icmp, icmp_len[0]))
        if v == 0:
            return "forward", out, (ipaddress.IPv4Address(hop[0]), port[0]), reply
        return REASONS[v], out, None, reply

    def decap_verdict(self, packet: bytes, src: ipaddress.IPv4Address, src_port: int = 8285) -> str:
        """What the RX worker would do with this datagram payload from src:src_port."""
        v = lib.fl_rx_packet(self._e, packet, len(packet), int(src), src_port)
        return "deliver" if v == 0 else REASONS[v]

    def split(self, frame: bytes) -> list[bytes] | str:
        """TSO-split a vnet_hdr frame as the TX worker would; a drop reason on refusal."""
        cap = 2 * len(frame) + 65536
        out = ffi.new("uint8_t[]", cap)
        lens = ffi.new("int[]", 4096)
        n = lib.fl_test_split(self._e, frame, len(frame), out, cap, lens, 4096)
        if n < 0:
            return REASONS.get(-n, "error")
        pkts, off = [], 0
        for i in range(n):
            pkts.append(bytes(ffi.buffer(out + off, lens[i])))
            off += lens[i]
        return pkts


def describe_changes(before: dict[str, int], after: dict[str, int],
                     features_before: dict[str, bool], features_after: dict[str, bool]) -> list[str]:
    """Log lines for what changed in the engine between two looks: offloads that turned off or
    on (UDP GSO pauses after a failed send), and drops by reason. The engine never writes to
    stderr; the daemon looks periodically and logs these lines, so every drop reaches the log
    as a count and a name."""
    lines = []
    for name in sorted(features_after):
        was, now = features_before.get(name), features_after[name]
        if was is not None and was != now:
            lines.append(f"udp engine: {name} {'on again' if now else 'off'}")
    drops = {k: after[k] - before.get(k, 0) for k in sorted(after)
             if (k.startswith("drop_") or k in ("io_errors", "tx_gso_fallbacks"))
             and after[k] > before.get(k, 0)}
    if drops:
        lines.append("udp engine: " + " ".join(f"{k}=+{v}" for k, v in drops.items()))
    return lines


def coalesce(packets: list[bytes]) -> list[bytes]:
    """The frames (vnet header + packet) the RX worker would write to a vnet_hdr TUN."""
    data = b"".join(packets)
    lens = ffi.new("int[]", [len(p) for p in packets] or [0])
    cap = len(data) + 64 * (len(packets) + 1)
    out = ffi.new("uint8_t[]", cap)
    out_lens = ffi.new("int[]", max(len(packets), 1))
    n = lib.fl_test_coalesce(data, lens, len(packets), out, cap, out_lens, max(len(packets), 1))
    frames, off = [], 0
    for i in range(n):
        frames.append(bytes(ffi.buffer(out + off, out_lens[i])))
        off += out_lens[i]
    return frames

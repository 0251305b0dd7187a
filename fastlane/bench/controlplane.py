"""`fastlane bench --control-plane`: the control plane against thousands of leases.

Why it exists: a large cluster means thousands of leases in etcd, and every one of them is a route
in every daemon. Before running fastlane on such a cluster an operator needs to know how long a
daemon takes to learn them all, what they cost in memory, what one route swap costs, how soon a
new peer is routable, and whether a steady stream of lease changes is absorbed or piles up.

What it builds: one topology (fastlane/bench/lab/topology.py) with three hosts and etcd on the
switch; the network config is `{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"udp"}}`
and N leases are written in flannel's format (key `.../subnets/10.A.B.0-24`, value
`{"PublicIP":"198.18.x.y","PublicIPv6":null}`), all attached to one 24 h etcd lease.

- h0 runs a real `fastlane` daemon (udp backend, TUN): the daemon under test.
- h1 is the peer: a UDP socket on its address, port 8285, sees every datagram the daemon
  forwards to it. The last of the N leases, every probe lease and every trial lease point at
  h1. The same process owns a socket in h0 that sends probes into the daemon's TUN, and it is
  the load generator (the puts).
- h2 runs the in-process stack: Registry + Watcher + LeaseTable with the udp backend's own
  subscriber on a TUN-less engine, and a running engine on a TUN of its own.

Each part is this module run as `python -m fastlane.bench.controlplane ROLE` inside a namespace,
writing its figures to a JSON file. Every timestamp is CLOCK_MONOTONIC (time.monotonic), which
all processes on the machine share, so a put in one process and its effect in another can be
subtracted. docs/bench.md ("Control-plane scale") describes the metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import ipaddress
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the stack loads the engine only when asked
    from fastlane.leasetable import LeaseTable

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

PREFIX = "/coreos.com/network"
NETWORK = "10.0.0.0/8"
SUBNET_LEN = 24
CONFIG = json.dumps({"Network": NETWORK, "SubnetLen": SUBNET_LEN, "Backend": {"Type": "udp"}})
UDP_PORT = 8285
MTU = 1500 - 28

# Subnet indices (10.0.0.0 + index * 256) of each kind of lease, so that no two kinds overlap and
# the daemon's own lease (picked among the first free subnets above the initial ones) never
# collides with one the bench writes.
MAX_LEASES = 19_000  # initial leases: 1..N
CHURN_ADD_BASE = 20_000  # churn adds of round r: + r * ROUND_SPAN + k
PROBE_BASE = 40_000  # churn probes of round r: + r * ROUND_SPAN + k
TRIAL_BASE = 60_000  # idle first-packet trials: + j
ROUND_SPAN = 10_000
MAX_CHANGES = ROUND_SPAN - 1
FAKE_PEERS = int(IPv4Address("198.18.0.0"))  # RFC 2544 benchmark range: never a real host
CHURN_PEERS = int(IPv4Address("198.19.0.0"))

RATE = 100.0  # lease changes per second
PROBE_EVERY = 10  # every 10th change is a probe (an add pointing at the peer)
TRIALS = 10  # idle first-packet trials
SWAP_REPEAT = 20  # route swaps timed per engine

GOALS = (  # (path, metric, goal, unit, text)
    ("stack", "sync_s", 2.0, "s", "sync < 2 s"),
    ("engine", "swap_ms", 10.0, "ms", "swap < 10 ms"),
    ("daemon", "first_packet_ms", 100.0, "ms", "new peer routable < 100 ms"),
)

METRICS: dict[str, tuple[str, str]] = {
    # metric: (unit, description)
    "populate_s": ("s", "writing the N leases into etcd (bench's own bulk puts)"),
    "sync_s": ("s", "connect + list + decode until the lease table holds all N"),
    "sync_engine_s": ("s", "as sync_s, until the udp backend's engine holds all N routes"),
    "sync_connect_ms": ("ms", "sync: connecting to etcd"),
    "sync_list_ms": ("ms", "sync: the range request for the subnets prefix"),
    "sync_decode_ms": ("ms", "sync: decoding the N keys/values into leases"),
    "sync_table_ms": ("ms", "sync: filling the lease table"),
    "sync_backend_ms": ("ms", "sync: the udp backend's subscriber (routes + engine swap)"),
    "table_bytes": ("bytes", "Python memory the synced table retains (tracemalloc)"),
    "rss_delta_bytes": ("bytes", "RSS growth of the stack process over one sync"),
    "swap_ms": ("ms", "Engine.set_routes with N routes"),
    "swap_c_ms": ("ms", "the C call alone (build + swap + grace period), array prebuilt"),
    "backend_swap_ms": ("ms", "udp backend: a table change -> N routes in the engine (idle)"),
    "route_table_bytes": ("bytes", "C route table for N routes, measured (glibc mallinfo2)"),
    "route_table_bytes_est": ("bytes", "C route table for N routes, computed from route.c"),
    "lag_ms": (
        "ms",
        (
            "put -> change in the engine (stack: swap returned; daemon: probes' "
            "first packet on the wire)"
        ),
    ),
    "lag_p99_ms": ("ms", "99th percentile of lag_ms"),
    "drain_ms": ("ms", "lag_ms of the last change of the churn"),
    "churn_rate": ("changes/s", "lease changes/s the generator achieved"),
    "swaps_per_s": ("swaps/s", "engine route swaps per second of churn (changes coalesce)"),
    "cpu_per_s": (
        "CPU s/s",
        ("CPU seconds per second of churn of the stack/daemon process (all its threads)"),
    ),
    "ready_s": ("s", "daemon start -> subnet file written"),
    "first_packet_ms": ("ms", "put of a new lease -> first datagram to its PublicIP"),
}

# ---------------------------------------------------------------------------------------------
# the leases the bench writes


def subnet_at(index: int) -> IPv4Network:
    return IPv4Network((int(IPv4Address("10.0.0.0")) + index * 256, SUBNET_LEN))


def key_of(subnet: IPv4Network) -> str:
    from fastlane.lease import subnet_key

    return f"{PREFIX}/subnets/{subnet_key(subnet)}"


def value_of(public_ip: IPv4Address) -> bytes:
    from fastlane.lease import LeaseAttrs

    return LeaseAttrs(public_ip=public_ip).encode()  # udp: no BackendType, like flanneld's


def initial_peer(index: int, n: int, peer: IPv4Address) -> IPv4Address:
    """Lease `index` of the initial N: the last one is the real peer (h1), the rest fake."""
    return peer if index == n else IPv4Address(FAKE_PEERS + index)


@dataclass(frozen=True)
class Change:
    k: int
    op: str  # "add", "probe" (an add pointing at the peer), "update", "delete"
    subnet: IPv4Network
    public_ip: IPv4Address | None  # None for a delete


def plan(n: int, total: int, rnd: int, peer: IPv4Address) -> list[Change]:
    """The churn of round `rnd` (0: the stack's, 1: the daemon's): `total` changes.

    Every 10th change (and the last) is a probe: a new lease pointing at the peer, so the daemon's
    lag can be seen on the wire. The others cycle add / delete / update, the deletes and updates
    over initial leases of the round's own half (round 1 never touches what round 0 changed, nor
    the last lease). No subnet is touched twice, so every change can be told apart.
    """
    half = (n - 1) // 2
    out: list[Change] = []
    touched = 0
    for k in range(total):
        if k % PROBE_EVERY == 0 or k == total - 1:
            out.append(Change(k, "probe", subnet_at(PROBE_BASE + rnd * ROUND_SPAN + k), peer))
            continue
        fake = IPv4Address(CHURN_PEERS + rnd * 32768 + k)
        if k % 3 == 0:
            out.append(Change(k, "add", subnet_at(CHURN_ADD_BASE + rnd * ROUND_SPAN + k), fake))
            continue
        index = 1 + rnd * half + touched
        touched += 1
        if k % 3 == 1:
            out.append(Change(k, "delete", subnet_at(index), None))
        else:
            out.append(Change(k, "update", subnet_at(index), fake))
    return out


def originals_needed(total: int) -> int:
    """How many initial leases one round of `total` changes deletes or updates (at most)."""
    return sum(
        1 for k in range(total) if not (k % PROBE_EVERY == 0 or k == total - 1) and k % 3 != 0
    )


def check_sizes(n: int, duration: float) -> str | None:
    """Why --leases/--duration cannot be run, or None."""
    if not 10 <= n <= MAX_LEASES:
        return f"--leases: {n} is outside 10..{MAX_LEASES}"
    total = int(RATE * duration)
    if not 10 <= total <= MAX_CHANGES:
        return (
            f"--duration: {duration:g} s at {RATE:g} changes/s is outside 10..{MAX_CHANGES} changes"
        )
    if originals_needed(total) > (n - 1) // 2 - 1:
        return (
            f"--duration {duration:g} changes more leases than --leases {n} has to spare "
            f"(each round deletes or updates {originals_needed(total)}, at most "
            f"{(n - 1) // 2 - 1}): give more leases or a shorter duration"
        )
    return None


# ---------------------------------------------------------------------------------------------
# small helpers


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_of(pid: int) -> float:
    """utime + stime of a process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out (main arena + mmapped chunks), or None."""
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    mi = fn()
    return int(mi.uordblks + mi.hblkhd)


def route_table_estimate(n: int) -> int:
    """Bytes of route.c's table for n routes of one prefix length, from its structures' sizes
    (csrc/engine.h, mirrored here with ctypes; nothing is asked of the C side).

    fl_rt_build allocates one fl_rtable, one slot array per prefix length of the next power of
    two >= 2 x routes of that length (at least 4), and three next-hop arrays (uint32, uint16,
    uint8) of the next power of two >= 2 x routes. malloc's own overhead is not counted.
    """

    class Entry(ctypes.Structure):
        _fields_ = [
            ("net", ctypes.c_uint32),
            ("next_hop", ctypes.c_uint32),
            ("port", ctypes.c_uint16),
            ("used", ctypes.c_uint8),
        ]

    class Level(ctypes.Structure):
        _fields_ = [
            ("len", ctypes.c_uint8),
            ("mask", ctypes.c_uint32),
            ("cap", ctypes.c_uint32),
            ("slots", ctypes.c_void_p),
        ]

    class Table(ctypes.Structure):
        _fields_ = [
            ("n_levels", ctypes.c_int),
            ("levels", Level * 33),
            ("hop_cap", ctypes.c_uint32),
            ("hops", ctypes.c_void_p),
            ("hop_port", ctypes.c_void_p),
            ("hop_used", ctypes.c_void_p),
            ("n_routes", ctypes.c_int),
        ]

    def pow2(x: int) -> int:
        c = 4
        while c < x:
            c <<= 1
        return c

    slots = pow2(2 * n) * ctypes.sizeof(Entry)
    hops = pow2(2 * n) * (4 + 2 + 1)
    return ctypes.sizeof(Table) + slots + hops


def _socket_in_netns(netns: str) -> socket.socket:
    """A UDP socket living in another network namespace (only this thread switches, briefly)."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(there, clone_newnet) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns}: {os.strerror(err)}")
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        finally:
            if libc.setns(here, clone_newnet) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(here)
        os.close(there)


async def _connect(endpoint: str):
    from fastlane.etcd import Store, parse_endpoints

    return await Store.connect(parse_endpoints(endpoint), timeout=10.0)


def _write(path: str, doc: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# worker: populate


async def populate(endpoint: str, n: int, peer: IPv4Address) -> dict[str, Any]:
    store = await _connect(endpoint)
    try:
        t0 = time.monotonic()
        lease = await store.grant(24 * 3600)
        sem = asyncio.Semaphore(64)

        async def put(i: int) -> None:
            async with sem:
                await store.put(
                    key_of(subnet_at(i)), value_of(initial_peer(i, n, peer)), lease=lease
                )

        await asyncio.gather(*(put(i) for i in range(1, n + 1)))
        return {"populate_s": time.monotonic() - t0}
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------
# the in-process stack: Registry + Watcher + LeaseTable + the udp backend's subscriber


class Stack:
    """One start of the stack against the populated etcd, with timestamps of each step.

    Route swaps are seen where they happen, in the engine's set_routes (wrapped on this one
    instance), so the figures hold whether the backend swaps inside its table subscriber or
    later, coalescing changes.
    """

    def __init__(self, n: int, engine: bool) -> None:
        self.n, self.with_engine = n, engine
        self.marks: dict[str, float] = {}
        self.full = asyncio.Event()
        self.store = None
        self.task: asyncio.Task[None] | None = None
        self.backend: Any = None  # the udp backend, when the stack carries an engine
        self.table: LeaseTable | None = None
        self.swap_times: list[float] = []
        # observers: on_publish(table, change) before the backend hears of a change,
        # on_swapped(monotonic time) after each swap
        self.on_publish: Callable[[Any, Any], None] | None = None
        self.on_swapped: Callable[[float], None] | None = None

    def _backend(self):
        """The udp backend itself, on an engine without TUN or socket: its table subscriber is
        exactly what the daemon runs on every lease table change."""
        from fastlane.backend.base import BackendContext
        from fastlane.backend.udp import UdpBackend
        from fastlane.config import parse_config
        from fastlane.engine import Engine, Route
        from fastlane.iface import Interface

        addr = IPv4Address("192.0.2.1")
        ctx = BackendContext(parse_config(CONFIG), Interface("bench0", 1, addr, 1500), addr)
        b = UdpBackend(ctx)
        b.engine = Engine([], -1, b.mtu, subnet_at(0).network_address)
        b._Route = Route
        return b

    def _watch_swaps(self, engine) -> None:
        set_routes = engine.set_routes

        def timed(routes) -> None:
            t0 = time.perf_counter()
            set_routes(routes)
            self.swap_times.append(time.perf_counter() - t0)
            now = time.monotonic()
            if self.table is not None and len(self.table) >= self.n and "engine" not in self.marks:
                self.marks["engine"] = now
                self.full.set()
            if self.on_swapped is not None:
                self.on_swapped(now)

        engine.set_routes = timed

    async def start(self, endpoint: str) -> None:
        from fastlane.leasetable import LeaseTable
        from fastlane.registry import Registry
        from fastlane.watcher import Watcher

        m = self.marks
        m["start"] = time.monotonic()
        self.store = store = await _connect(endpoint)
        m["connected"] = time.monotonic()
        registry = Registry(store, PREFIX)
        list_prefix = store.list_prefix

        async def timed_list(prefix: str):
            m["list_start"] = time.monotonic()
            out = await list_prefix(prefix)
            m["listed"] = time.monotonic()
            return out

        store.list_prefix = timed_list
        snapshot = registry.snapshot

        async def timed_snapshot():
            out = await snapshot()
            m["decoded"] = time.monotonic()
            return out

        registry.snapshot = timed_snapshot  # type: ignore[method-assign]
        self.table = table = LeaseTable()

        def table_full(t, change) -> None:
            if len(t) >= self.n and "table" not in m:
                m["table"] = time.monotonic()
                if not self.with_engine:
                    self.full.set()
            if self.on_publish is not None:
                self.on_publish(t, change)

        table.subscribe(table_full)
        if self.with_engine:
            self.backend = self._backend()
            self._watch_swaps(self.backend.engine)
            table.subscribe(self.backend._on_change)

        async def on_own(what: str, lease) -> None:
            return None

        watcher = Watcher(registry, table, lambda: None, on_own)
        self.task = asyncio.create_task(watcher.run())
        await asyncio.wait_for(self.full.wait(), 120)

    def figures(self) -> dict[str, float]:
        m = self.marks
        out = {
            "sync_s": m["table"] - m["start"],
            "sync_connect_ms": (m["connected"] - m["start"]) * 1e3,
            "sync_list_ms": (m["listed"] - m["list_start"]) * 1e3,
            "sync_decode_ms": (m["decoded"] - m["listed"]) * 1e3,
            "sync_table_ms": (m["table"] - m["decoded"]) * 1e3,
        }
        if self.with_engine:
            out["sync_engine_s"] = m["engine"] - m["start"]
            out["sync_backend_ms"] = (m["engine"] - m["table"]) * 1e3
        return out

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        if self.backend is not None:
            await self.backend.stop()  # cancels a swap it may still have pending


async def stack_worker(endpoint: str, n: int, repeat: int, tun_addr: IPv4Address) -> dict:
    """Sync (timed, repeated), memory, and route swaps on a TUN-less and a running engine."""
    out: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        out.setdefault(name, []).append(value)

    for rep in range(repeat):
        gc.collect()
        rss0 = _rss()
        stack = Stack(n, engine=True)
        try:
            await stack.start(endpoint)
            for name, value in stack.figures().items():
                add(name, value)
            if rep == 0:
                add("rss_delta_bytes", _rss() - rss0)
        finally:
            await stack.stop()
        del stack

    # memory the table retains: tracemalloc from after the connection until synced, watcher
    # stopped, garbage collected (tracemalloc slows Python down: this run is not timed)
    stack = Stack(n, engine=False)

    table_holder: list[LeaseTable] = []
    try:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        await stack.start(endpoint)
        assert stack.table is not None
        table_holder.append(stack.table)
        await stack.stop()
        stack.store = None
        stack.task = None
        gc.collect()
        add("table_bytes", tracemalloc.get_traced_memory()[0] - base)
        leases = stack.table.leases()
    finally:
        tracemalloc.stop()
        await stack.stop()

    # route swaps on an engine without TUN: Engine.set_routes, the C call alone, the backend's
    # subscriber; the C table's bytes measured with mallinfo2 and computed from its structures
    from fastlane._engine import lib
    from fastlane.engine import Engine, Route, _routes_array
    from fastlane.leasetable import TableChange

    routes = [Route(lease.subnet4, lease.attrs.public_ip, UDP_PORT) for lease in leases]
    engine = Engine([], -1, MTU, subnet_at(0).network_address)
    for _ in range(SWAP_REPEAT):
        t0 = time.perf_counter()
        engine.set_routes(routes)
        add("swap_ms", (time.perf_counter() - t0) * 1e3)
    arr, count = _routes_array(routes)
    for _ in range(SWAP_REPEAT):
        engine.set_routes([])
        before = _malloc_in_use()
        t0 = time.perf_counter()
        lib.fl_engine_set_routes(engine._e, arr, count)
        add("swap_c_ms", (time.perf_counter() - t0) * 1e3)
        after = _malloc_in_use()
        if before is not None and after is not None:
            add("route_table_bytes", after - before)
    add("route_table_bytes_est", route_table_estimate(len(routes)))
    # the backend's subscriber, from the call until the engine holds the routes (a backend that
    # defers and coalesces swaps is timed to the end of its swap; idle in between, so that a
    # rate limit on swaps never adds a wait)
    helper = Stack(n, engine=True)
    backend = helper._backend()
    helper._watch_swaps(backend.engine)
    loop = asyncio.get_running_loop()
    table = table_holder[0]
    for _ in range(SWAP_REPEAT):
        await asyncio.sleep(0.3)
        done: asyncio.Future[float] = loop.create_future()
        helper.on_swapped = lambda now, f=done: f.done() or f.set_result(time.perf_counter())
        t0 = time.perf_counter()
        backend._on_change(table, TableChange())
        add("backend_swap_ms", (await asyncio.wait_for(done, 30) - t0) * 1e3)
    await backend.stop()

    # the same swap on a running engine: its own TUN and socket in this namespace, workers up
    from fastlane.tun import open_tun, open_udp_socket

    _, fds = open_tun("flbench%d", queues=1, vnet_hdr=True)
    sock = open_udp_socket(str(tun_addr), UDP_PORT)
    running = Engine(
        fds, sock.fileno(), MTU, subnet_at(0).network_address, network=IPv4Network(NETWORK)
    )
    running.start()
    try:
        for _ in range(SWAP_REPEAT):
            t0 = time.perf_counter()
            running.set_routes(routes)
            add("running_swap_ms", (time.perf_counter() - t0) * 1e3)
    finally:
        running.stop()
        for fd in fds:
            os.close(fd)
        sock.close()
    return out


# ---------------------------------------------------------------------------------------------
# worker: observe the churn through the stack


async def observe_worker(
    endpoint: str, n: int, total: int, rnd: int, peer: IPv4Address, ready: str, timeout: float
) -> dict:
    """Sync the stack, then note when each change of the churn is in the engine: changes the
    table publishes wait in `pending` until the next route swap returns."""
    changes = plan(n, total, rnd, peer)
    expected: dict[IPv4Network, Change] = {c.subnet: c for c in changes}
    seen: dict[int, float] = {}
    pending: list[int] = []
    batches: list[int] = []
    done = asyncio.Event()

    def publish(table, change) -> None:
        batches.append(len(change.added) + len(change.removed))
        for lease in change.added:
            c = expected.get(lease.subnet)
            if c is not None and c.op != "delete" and lease.attrs.public_ip == c.public_ip:
                pending.append(c.k)
        for lease in change.removed:
            c = expected.get(lease.subnet)
            if c is not None and c.op == "delete":
                pending.append(c.k)

    def swapped(now: float) -> None:
        for k in pending:
            seen.setdefault(k, now)
        pending.clear()
        if len(seen) == len(changes):
            done.set()

    stack = Stack(n, engine=True)
    try:
        await stack.start(endpoint)
        stack.on_publish, stack.on_swapped = publish, swapped
        swaps_before = len(stack.swap_times)
        cpu0 = time.process_time()
        Path(ready).write_text(str(time.monotonic()))
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            pass
        cpu1 = time.process_time()
        swap_times = stack.swap_times[swaps_before:]
    finally:
        await stack.stop()
    return {
        "seen": {str(k): t for k, t in seen.items()},
        "batches": batches,
        "swap_s": swap_times,
        "cpu_s": cpu1 - cpu0,
    }


# ---------------------------------------------------------------------------------------------
# worker: the peer and load generator (first packets, daemon sync, churn)


class Probe:
    """Sends small datagrams into the daemon's TUN (from a socket in the daemon's namespace) to
    every watched subnet, and notes when the first one comes out on the underlay at the peer."""

    def __init__(self, daemon_netns: str, peer: IPv4Address, interval: float = 0.0005) -> None:
        self.tx = _socket_in_netns(daemon_netns)
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.bind((str(peer), UDP_PORT))
        self.rx.settimeout(0.2)
        self.interval = interval
        self.lock = threading.Lock()
        self.pending: dict[int, str] = {}  # subnet (int) -> address probed
        self.first: dict[int, float] = {}
        self.futures: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[float]]] = {}
        self.sent = 0
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._recv, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def watch(self, subnet: IPv4Network) -> None:
        loop = asyncio.get_running_loop()
        net = int(subnet.network_address)
        with self.lock:
            self.futures[net] = (loop, loop.create_future())
            self.pending[net] = str(subnet.network_address + 1)

    async def wait(self, subnet: IPv4Network, timeout: float) -> float | None:
        net = int(subnet.network_address)
        _, fut = self.futures[net]
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            with self.lock:
                self.pending.pop(net, None)
            return None

    def _send(self) -> None:
        payload = b"fastlane-bench-probe"
        while not self.stopping.is_set():
            with self.lock:  # the oldest few: a later lease cannot be routed before them
                targets = list(self.pending.values())[:16]
            for addr in targets:
                try:
                    self.tx.sendto(payload, (addr, 9))
                    self.sent += 1
                except OSError:
                    pass  # no route yet (no daemon, no TUN): keep trying
            time.sleep(self.interval)

    def _recv(self) -> None:
        while not self.stopping.is_set():
            try:
                data = self.rx.recv(65536)
            except (TimeoutError, OSError):
                continue
            now = time.monotonic()
            if len(data) < 20:
                continue
            net = int.from_bytes(data[16:20], "big") & 0xFFFFFF00
            with self.lock:
                if net in self.pending and net not in self.first:
                    self.first[net] = now
                    del self.pending[net]
                    loop, fut = self.futures[net]
                    loop.call_soon_threadsafe(_resolve, fut, now)

    def close(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(2)
        self.tx.close()
        self.rx.close()


async def churn(store, changes: list[Change], probe: Probe | None) -> dict[str, Any]:
    """Issue the changes at RATE per second on a fixed schedule (a slow put does not delay the
    next one); returns when etcd acknowledged them all."""
    issued: list[float] = [math.nan] * len(changes)
    acked: list[float] = [math.nan] * len(changes)

    async def one(c: Change) -> None:
        if c.op == "probe" and probe is not None:
            probe.watch(c.subnet)
        issued[c.k] = time.monotonic()
        if c.op == "delete":
            await store.delete(key_of(c.subnet))
        else:
            assert c.public_ip is not None
            await store.put(key_of(c.subnet), value_of(c.public_ip))
        acked[c.k] = time.monotonic()

    start = time.monotonic() + 0.1
    tasks = []
    for c in changes:
        delay = start + c.k / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(c)))
    await asyncio.gather(*tasks)
    return {"issued": issued, "acked": acked}


async def peer_worker(args: argparse.Namespace) -> dict[str, Any]:
    peer = IPv4Address(args.peer)
    out: dict[str, Any] = {}
    probe = Probe(args.daemon_netns, peer) if args.daemon_netns else None
    changes = plan(args.leases, args.changes, args.round, peer)
    try:
        if probe is not None:
            # the daemon's sync: from its start until the last initial lease (the peer) is routed
            probe.watch(subnet_at(args.leases))
        Path(args.ready).write_text(str(time.monotonic()))
        store = await _connect(args.endpoint)
        try:
            if probe is not None:
                deadline = time.monotonic() + 60
                while not os.path.exists(args.pidfile) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                pid, t0 = Path(args.pidfile).read_text().split()
                t = await probe.wait(subnet_at(args.leases), 120)
                if t is None:
                    raise RuntimeError("the daemon never forwarded to the peer's lease")
                out["sync_s"] = t - float(t0)
                out["pid"] = int(pid)
                await asyncio.sleep(0.5)
                lat = []
                for j in range(args.trials):
                    s = subnet_at(TRIAL_BASE + j)
                    probe.watch(s)
                    await asyncio.sleep(0.05)
                    t_put = time.monotonic()
                    await store.put(key_of(s), value_of(peer))
                    t = await probe.wait(s, 10)
                    if t is not None:
                        lat.append((t - t_put) * 1e3)
                    await asyncio.sleep(0.2)
                out["first_packet_ms"] = lat
                out["trials"] = args.trials
            cpu0 = _cpu_of(int(out["pid"])) if probe is not None else None
            t_start = time.monotonic()
            res = await churn(store, changes, probe)
            out.update(res)
            if probe is not None:
                # one deadline for all probes: a daemon far behind must not cost a timeout each
                probes = [c for c in changes if c.op == "probe"]
                left = args.drain_timeout - (time.monotonic() - t_start)
                got = await asyncio.gather(*(probe.wait(c.subnet, max(1.0, left)) for c in probes))
                firsts: dict[str, float] = {
                    str(c.k): t for c, t in zip(probes, got, strict=True) if t is not None
                }
                out["seen"] = firsts
                t_end = max([t_start, *firsts.values()])
                assert cpu0 is not None  # measured whenever there is a probe
                out["cpu_s"] = _cpu_of(int(out["pid"])) - cpu0
                out["cpu_window_s"] = t_end - t_start
                out["probes_sent"] = probe.sent
        finally:
            await store.close()
    finally:
        if probe is not None:
            probe.close()
    return out


# ---------------------------------------------------------------------------------------------
# worker entry point: python -m fastlane.bench.controlplane ROLE ...


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlane.bench.controlplane")
    p.add_argument("role", choices=("populate", "stack", "observe", "peer"))
    p.add_argument("--endpoint", required=True)
    p.add_argument("--leases", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--peer", default="192.168.100.2")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tun-addr", default="192.168.100.3")
    p.add_argument("--changes", type=int, default=0)
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--ready", default="")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--daemon-netns", default="")
    p.add_argument("--pidfile", default="")
    p.add_argument("--trials", type=int, default=TRIALS)
    p.add_argument("--drain-timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    import uvloop

    if a.role == "populate":
        coro = populate(a.endpoint, a.leases, IPv4Address(a.peer))
    elif a.role == "stack":
        coro = stack_worker(a.endpoint, a.leases, a.repeat, IPv4Address(a.tun_addr))
    elif a.role == "observe":
        coro = observe_worker(
            a.endpoint, a.leases, a.changes, a.round, IPv4Address(a.peer), a.ready, a.timeout
        )
    else:
        coro = peer_worker(a)
    result = uvloop.run(coro)
    _write(a.out, result)
    return 0


# ---------------------------------------------------------------------------------------------
# the driver (root namespace): topology, etcd, workers, daemon, rows, table, JSON


class ControlPlaneError(RuntimeError):
    """The run cannot continue; one line, maybe followed by a log tail."""


def _row(path: str, metric: str, values: list[float], keep_samples: bool = True) -> dict:
    vals = [float(v) for v in values if not math.isnan(v)]
    unit = METRICS[metric.replace("running_", "")][0]
    row: dict[str, Any] = {
        "path": path,
        "underlay_mtu": None,
        "metric": metric,
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "unit": unit,
        "n": len(vals),
    }
    if keep_samples:
        row["samples"] = vals
    return row


def _resolve(fut: asyncio.Future[float], when: float) -> None:
    """Settle a probe's future from the capture thread's callback (once)."""
    if not fut.done():
        fut.set_result(when)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100.0 * len(ordered))) - 1]


def _lag_rows(path: str, lags: list[float], total: int) -> tuple[list[dict], dict[str, Any]]:
    rows = [_row(path, "lag_ms", lags, keep_samples=False)]
    p99 = percentile(lags, 99)
    rows.append(
        {
            "path": path,
            "underlay_mtu": None,
            "metric": "lag_p99_ms",
            "median": p99,
            "min": p99,
            "max": p99,
            "unit": "ms",
            "n": len(lags),
        }
    )
    tenth = max(1, len(lags) // 10)
    first, last = statistics.median(lags[:tenth]), statistics.median(lags[-tenth:])
    summary = {
        "changes": total,
        "reflected": len(lags),
        "lag_first_tenth_ms": first,
        "lag_last_tenth_ms": last,
        "keeps_up": len(lags) == total and last <= first + 100.0,
    }
    return rows, summary


def _run_worker(topo, netns: str, role: str, out: Path, *args: str, timeout: float) -> dict:
    from fastlane.bench.lab.topology import TopologyError

    cmd = [sys.executable, "-m", "fastlane.bench.controlplane", role, "--out", str(out), *args]
    try:
        res = topo.run(netns, *cmd, check=False, timeout=timeout)
    except TopologyError as exc:
        raise ControlPlaneError(f"{role}: {exc}") from None
    if res.returncode != 0 or not out.exists():
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-8:])
        raise ControlPlaneError(f"{role} worker failed (exit {res.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _wait_file(path: Path, proc, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise ControlPlaneError(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"{what} not ready after {timeout:g} s")
        time.sleep(0.01)


def _popen_result(topo, proc, out: Path, name: str, timeout: float) -> dict:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        topo.stop(proc)
        raise ControlPlaneError(
            f"{name} did not finish within {timeout:g} s\n" + topo.log_tail(name, 8)
        ) from None
    if proc.returncode != 0 or not out.exists():
        raise ControlPlaneError(
            f"{name} failed (exit {proc.returncode}):\n" + topo.log_tail(name, 8)
        )
    return json.loads(out.read_text())


def measure(leases: int, duration: float, repeat: int, progress: Callable[[str], None]) -> dict:
    """The whole run; returns {"rows": [...], "churn": {...}, "errors": [...]}. Needs root.

    A phase that fails (stack, stack churn, daemon) is recorded in "errors" and the next one
    still runs: one broken part does not throw away the figures of the others.
    """
    from fastlane.bench.lab.etcdserver import EtcdServer
    from fastlane.bench.lab.topology import Topology, TopologyError

    total = int(RATE * duration)
    got: dict[str, Any] = {"rows": [], "churn": {}, "errors": []}
    with Topology(hosts=3, mtu=1500) as topo:
        etcd = EtcdServer(
            data_dir=str(topo.workdir / "etcd"),
            host=str(topo.switch_ip),
            netns=topo.switch_netns,
            name="fastlane-bench-cp",
        )
        try:
            try:
                etcd.start()
                etcd.etcdctl("put", f"{PREFIX}/config", CONFIG)
            except RuntimeError as exc:
                raise ControlPlaneError(f"etcd: {exc}") from None
            run = _Run(topo, etcd.endpoint, leases, total, duration, repeat, got)
            progress(f"writing {leases} leases into etcd")
            run.populate()
            for path, what, phase in (
                ("stack", f"{repeat} syncs, memory, {SWAP_REPEAT} swaps per engine", run.stack),
                ("stack", f"{total} lease changes at {RATE:g}/s", run.stack_churn),
                (
                    "daemon",
                    (
                        f"start with {leases} leases, {TRIALS} new peers, {total} "
                        f"changes at {RATE:g}/s"
                    ),
                    run.daemon,
                ),
            ):
                progress(f"{path}: {what}")
                try:
                    phase()
                except (ControlPlaneError, TopologyError) as exc:
                    first = str(exc).splitlines()[0]
                    progress(f"{path}: FAILED: {first}")
                    got["errors"].append({"path": path, "underlay_mtu": None, "error": str(exc)})
        finally:
            etcd.stop()
    return got


class _Run:
    """The phases of one run on one topology: h0 daemon, h1 peer and generator, h2 stack."""

    def __init__(
        self,
        topo,
        endpoint: str,
        leases: int,
        total: int,
        duration: float,
        repeat: int,
        got: dict[str, Any],
    ) -> None:
        self.topo, self.endpoint, self.leases, self.total = topo, endpoint, leases, total
        self.duration, self.repeat = duration, repeat
        self.rows: list[dict] = got["rows"]
        self.churn_summary: dict[str, Any] = got["churn"]
        self.h0, self.h1, self.h2 = topo.hosts
        self.wd: Path = topo.workdir
        self.common = ["--endpoint", endpoint, "--leases", str(leases), "--peer", str(self.h1.ip)]

    def _worker(self, netns: str, role: str, name: str, *args: str):
        out = self.wd / f"{name}.json"
        proc = self.topo.popen(
            netns,
            sys.executable,
            "-m",
            "fastlane.bench.controlplane",
            role,
            "--out",
            str(out),
            *self.common,
            *args,
            name=name,
        )
        return proc, out

    def populate(self) -> None:
        r = _run_worker(
            self.topo,
            self.topo.switch_netns,
            "populate",
            self.wd / "populate.json",
            *self.common,
            timeout=600,
        )
        self.rows.append(_row("etcd", "populate_s", [r["populate_s"]]))

    def stack(self) -> None:
        r = _run_worker(
            self.topo,
            self.h2.netns,
            "stack",
            self.wd / "stack.json",
            *self.common,
            "--repeat",
            str(self.repeat),
            "--tun-addr",
            str(self.h2.ip),
            timeout=900,
        )
        for metric in (
            "sync_s",
            "sync_engine_s",
            "sync_connect_ms",
            "sync_list_ms",
            "sync_decode_ms",
            "sync_table_ms",
            "sync_backend_ms",
            "table_bytes",
            "rss_delta_bytes",
        ):
            self.rows.append(_row("stack", metric, r[metric]))
        for metric in (
            "swap_ms",
            "swap_c_ms",
            "backend_swap_ms",
            "route_table_bytes",
            "route_table_bytes_est",
        ):
            if r.get(metric):
                self.rows.append(_row("engine", metric, r[metric]))
        self.rows.append(_row("engine-running", "swap_ms", r["running_swap_ms"]))

    def stack_churn(self) -> None:
        total, duration = self.total, self.duration
        ready = self.wd / "observe.ready"
        obs, obs_out = self._worker(
            self.h2.netns,
            "observe",
            "observe",
            "--changes",
            str(total),
            "--round",
            "0",
            "--ready",
            str(ready),
            "--timeout",
            str(duration + 120),
        )
        _wait_file(ready, obs, "the stack observer", 300)
        gen = _run_worker(
            self.topo,
            self.h1.netns,
            "peer",
            self.wd / "gen0.json",
            *self.common,
            "--changes",
            str(total),
            "--round",
            "0",
            "--ready",
            str(self.wd / "gen0.ready"),
            timeout=duration + 120,
        )
        seen = _popen_result(self.topo, obs, obs_out, "observe", duration + 180)
        lags = [
            (seen["seen"][str(k)] - gen["issued"][k]) * 1e3
            for k in range(total)
            if str(k) in seen["seen"]
        ]
        if not lags:
            raise ControlPlaneError("the stack reflected none of the lease changes")
        lr, summary = _lag_rows("stack", lags, total)
        self.rows.extend(lr)
        k_last = total - 1
        if str(k_last) in seen["seen"]:
            self.rows.append(
                _row(
                    "stack", "drain_ms", [(seen["seen"][str(k_last)] - gen["issued"][k_last]) * 1e3]
                )
            )
        span = gen["issued"][-1] - gen["issued"][0]
        self.rows.append(_row("stack", "churn_rate", [(total - 1) / span]))
        window = max(seen["seen"].values()) - gen["issued"][0]
        self.rows.append(_row("stack", "swaps_per_s", [len(seen["swap_s"]) / window]))
        self.rows.append(_row("stack", "cpu_per_s", [seen["cpu_s"] / window]))
        summary.update(
            {
                "swaps": len(seen["swap_s"]),
                "changes_per_swap": len(lags) / max(1, len(seen["swap_s"])),
                "changes_per_publish": (sum(seen["batches"]) / max(1, len(seen["batches"]))),
                "swap_busy_s": sum(seen["swap_s"]),
            }
        )
        self.churn_summary["stack"] = summary

    def daemon(self) -> None:
        from fastlane.bench.datapaths import fastlane_command

        topo, total, duration = self.topo, self.total, self.duration
        gen_ready, pidfile = self.wd / "gen1.ready", self.wd / "daemon.pid"
        peer, gen_out = self._worker(
            self.h1.netns,
            "peer",
            "peer",
            "--changes",
            str(total),
            "--round",
            "1",
            "--ready",
            str(gen_ready),
            "--daemon-netns",
            self.h0.netns,
            "--pidfile",
            str(pidfile),
            "--trials",
            str(TRIALS),
            "--drain-timeout",
            str(duration + 60),
        )
        _wait_file(gen_ready, peer, "the peer", 60)
        subnet_file = self.wd / "h0" / "subnet.env"
        subnet_file.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        daemon = topo.popen(
            self.h0.netns,
            *fastlane_command(),
            "-etcd-endpoints",
            self.endpoint,
            "-iface",
            self.h0.ifname,
            "-subnet-file",
            str(subnet_file),
            name="daemon",
        )
        pidfile.write_text(f"{daemon.pid} {t0}")
        deadline = t0 + 120
        while not subnet_file.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                topo.stop(peer)
                raise ControlPlaneError(
                    "the daemon never became ready; last log lines:\n" + topo.log_tail("daemon", 10)
                )
            time.sleep(0.005)
        ready_s = time.monotonic() - t0
        try:
            res = _popen_result(topo, peer, gen_out, "peer", duration + 400)
        except ControlPlaneError as exc:
            raise ControlPlaneError(
                f"{exc}\ndaemon's last log lines:\n" + topo.log_tail("daemon", 10)
            ) from None
        finally:
            topo.stop(daemon)
        self.rows.append(_row("daemon", "sync_s", [res["sync_s"]]))
        self.rows.append(_row("daemon", "ready_s", [ready_s]))
        if res["first_packet_ms"]:
            self.rows.append(_row("daemon", "first_packet_ms", res["first_packet_ms"]))
        changes = plan(self.leases, total, 1, self.h1.ip)
        probes = [c.k for c in changes if c.op == "probe"]
        lags = [
            (res["seen"][str(k)] - res["issued"][k]) * 1e3 for k in probes if str(k) in res["seen"]
        ]
        if not lags:
            raise ControlPlaneError("the daemon forwarded to none of the churn's probes")
        lr, summary = _lag_rows("daemon", lags, len(probes))
        self.rows.extend(lr)
        k_last = total - 1
        if str(k_last) in res["seen"]:
            self.rows.append(
                _row(
                    "daemon", "drain_ms", [(res["seen"][str(k_last)] - res["issued"][k_last]) * 1e3]
                )
            )
        span = res["issued"][-1] - res["issued"][0]
        self.rows.append(_row("daemon", "churn_rate", [(total - 1) / span]))
        self.rows.append(_row("daemon", "cpu_per_s", [res["cpu_s"] / res["cpu_window_s"]]))
        summary["trials_reflected"] = len(res["first_packet_ms"])
        summary["trials"] = res["trials"]
        self.churn_summary["daemon"] = summary


def goals(rows: list[dict]) -> list[dict]:
    out = []
    by = {(r["path"], r["metric"]): r for r in rows}
    for path, metric, goal, unit, text in GOALS:
        r = by.get((path, metric))
        out.append(
            {
                "path": path,
                "metric": metric,
                "goal": goal,
                "unit": unit,
                "text": text,
                "median": r["median"] if r else None,
                "met": (r["median"] < goal) if r else None,
            }
        )
    return out


def _fmt(v: float, unit: str) -> str:
    if unit == "bytes":
        return f"{v / 1024:.0f} KiB"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if abs(v) >= 0.01 else f"{v:.2g}"


def table(doc: dict) -> str:
    cfg = doc["config"]
    head = ["path", "metric", "median", "min", "max", "unit", "n"]
    lines_ = [head]
    for r in doc["results"]:
        unit = r["unit"]
        shown = "KiB" if unit == "bytes" else unit
        lines_.append(
            [r["path"], r["metric"]]
            + [_fmt(r[k], unit).removesuffix(" KiB") for k in ("median", "min", "max")]
            + [shown, str(r.get("n", ""))]
        )
    widths = [max(len(x[i]) for x in lines_) for i in range(len(head))]
    out = [
        (
            f"fastlane bench --control-plane: {cfg['leases']} leases, {cfg['rate']:g} "
            f"changes/s for {cfg['duration_s']:g} s, {cfg['repeat']} syncs"
        ),
        "",
    ]
    for n, x in enumerate(lines_):
        out.append(
            "  ".join(
                c.ljust(w) if i < 2 or i == 5 else c.rjust(w)
                for i, (c, w) in enumerate(zip(x, widths, strict=False))
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    for g in doc["goals"]:
        got = "-" if g["median"] is None else f"{_fmt(g['median'], g['unit'])} {g['unit']}"
        verdict = "no figure" if g["met"] is None else ("met" if g["met"] else "NOT met")
        out.append(f"goal {g['text']} ({g['path']} {g['metric']}): {got}: {verdict}")
    for path, s in doc["churn"].items():
        out.append(
            f"churn, {path}: {s['reflected']}/{s['changes']} "
            f"{'changes' if path == 'stack' else 'probes'} reflected, lag median "
            f"{_fmt(s['lag_first_tenth_ms'], 'ms')} ms in the first tenth, "
            f"{_fmt(s['lag_last_tenth_ms'], 'ms')} ms in the last: "
            f"{'keeps up' if s['keeps_up'] else 'does NOT keep up'}"
        )
    for e in doc.get("errors", []):
        out.append(f"FAILED, {e['path']}: {str(e['error']).splitlines()[0]}")
    return "\n".join(out)


def markdown(doc: dict[str, Any], json_name: str) -> str:
    """The results document of a control-plane run, from its JSON alone."""
    env = doc.get("environment", {})
    out = [
        f"# fastlane bench control-plane results: {Path(json_name).stem}",
        "",
        (
            f"Generated from [{json_name}]({json_name}) by `fastlane bench --report "
            f"{json_name} > {Path(json_name).stem}.md` (run in this directory). Do not edit by "
            "hand: every figure below comes from that JSON."
        ),
        "",
        "```",
        table(doc),
        "```",
        "",
    ]
    present = list(dict.fromkeys(r["metric"] for r in doc.get("results", [])))
    if present:
        out += [
            (
                "Metrics (paths: `stack` is Registry + Watcher + LeaseTable with the udp "
                "backend's subscriber on a TUN-less engine, `engine` a TUN-less engine, "
                "`engine-running` one with a TUN and its threads, `daemon` a real udp daemon "
                "measured on the wire):"
            ),
            "",
        ]
        for m in present:
            meta = (doc.get("metrics") or {}).get(m) or {}
            out.append(f"- `{m}` ({meta.get('unit', '')}): {meta.get('description', '')}")
        out.append("")
    out += ["## Run", "", "| field | value |", "|---|---|"]
    rows = [
        ("date", env.get("date")),
        ("kernel", env.get("kernel")),
        ("CPU", env.get("cpu_model")),
        ("CPUs", env.get("nproc")),
        ("load average at start (1, 5, 15 min)", env.get("loadavg_start")),
        ("load average at end", env.get("loadavg_end")),
        ("uncommitted files at run time", ", ".join(env.get("dirty_files") or []) or "-"),
    ]
    rows += list((env.get("versions") or {}).items())
    out += [f"| {k} | {v if v is not None else '-'} |" for k, v in rows]
    return "\n".join(out) + "\n"


def run(leases: int, duration: float, repeat: int, json_path: Path | None) -> int:
    """`fastlane bench --control-plane`: measure, print the table, write the JSON (+ .md)."""
    from fastlane.bench import report
    from fastlane.bench.lab.topology import cleanup_stale

    stale = cleanup_stale()
    if stale:
        print(f"removed {len(stale)} namespaces left by an earlier, killed run", file=sys.stderr)
    env = report.environment()

    def progress(text: str) -> None:
        print(f"control plane: {text}", file=sys.stderr, flush=True)

    # a shared machine's load colours every figure here: say how busy it was, and which
    # uncommitted files (anyone's) the figures ran with when fastlane_git says -dirty
    env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    env["dirty_files"] = report.dirty_files()
    got = measure(leases, duration, repeat, progress)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = {
        "schema": report.SCHEMA,
        "environment": env,
        "config": {
            "control_plane": True,
            "leases": leases,
            "duration_s": duration,
            "repeat": repeat,
            "rate": RATE,
            "network": NETWORK,
            "subnet_len": SUBNET_LEN,
            "hosts": 3,
            "mtus": [],
        },
        "metrics": {k: {"unit": u, "description": d} for k, (u, d) in METRICS.items()},
        "results": got["rows"],
        "goals": goals(got["rows"]),
        "churn": got["churn"],
        "ratios": [],
        "errors": got["errors"],
        "complete": not got["errors"],
    }
    print(table(doc))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, json_path)
        print(f"\nJSON: {json_path}")
        try:
            print(f"results document: {report.write_markdown(json_path)}")
        except report.ReportError as exc:
            print(f"results document not written: {exc}", file=sys.stderr)
    if got["errors"]:
        print(
            f"\n{len(got['errors'])} error(s); see above"
            + (f" and 'errors' in {json_path}" if json_path else "")
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

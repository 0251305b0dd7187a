"""The data paths the bench compares, each set up on a fresh topology.

Why a fresh topology per (MTU, path): nothing one path leaves behind (routes, devices, leases,
socket buffers filled by a flood) can colour the next path's numbers, and teardown is just
"delete the namespaces".

Every path returns the Endpoints iperf3 and ping use: host 0 (or its container) is the client,
host 1 (or its container) the server. Overlay subnets of the hand-configured paths are
10.5.<i+1>.0/24 inside Network 10.5.0.0/16, the shape flannel's leases have.

The IPv6 paths (names ending in 6, not in the default set) run on a dual-stack underlay
(UNDERLAY6) and carry an IPv6-only overlay, IPv6Network fd00:5::/56 with subnets
fd00:5:0:<i+1>::/64: the containers talk IPv6 and the encapsulation (or the host-gw next hop)
is the peer's underlay IPv6 address, as flanneld's IPv6 side programs it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from fastlane import subnetfile
from fastlane.bench.lab.topology import Host, SubnetEnv, Topology, TopologyError
from fastlane.bench.measure import Endpoints

NETWORK = "10.5.0.0/16"
CONFIG_KEY = "/coreos.com/network/config"
VXLAN_OVERHEAD = 50
UDP_OVERHEAD = 28
UDP_PORT = 8285
NETWORK6 = "fd00:5::/56"
UNDERLAY6 = "fd00:100::/64"
VXLAN6_OVERHEAD = 70  # flanneld's flannel-v6.<VNI>: 40-byte IPv6 outer header

ALL_PATHS = (
    "underlay",
    "udp",
    "vxlan",
    "host-gw",
    "baseline",
    "flanneld",
    "fastlane-vxlan",
    "fastlane-host-gw",
    "underlay6",
    "vxlan6",
    "host-gw6",
    "fastlane-vxlan6",
    "fastlane-host-gw6",
)
#: the IPv6 paths: over the IPv6 underlay, with an IPv6 overlay (rows carry "family": 6)
IPV6_PATHS = frozenset(p for p in ALL_PATHS if p.endswith("6"))
DEFAULT_PATHS = (
    "underlay",
    "udp",
    "vxlan",
    "fastlane-vxlan",
    "host-gw",
    "fastlane-host-gw",
    "baseline",
)
# path -> Backend.Type written to etcd for the paths that run daemons
BACKEND_OF = {
    "udp": "udp",
    "flanneld": "udp",
    "fastlane-vxlan": "vxlan",
    "fastlane-host-gw": "host-gw",
    "fastlane-vxlan6": "vxlan",
    "fastlane-host-gw6": "host-gw",
}
ETCD_PATHS = frozenset(BACKEND_OF)
USERSPACE_PATHS = frozenset({"udp", "baseline", "flanneld"})


class PathError(RuntimeError):
    """A path could not be brought up; one line, possibly followed by a daemon's log tail."""


@dataclass
class Context:
    """What a path set-up needs besides the topology."""

    baseline_bin: Path | None = None
    flanneld_bin: Path | None = None
    fastlane_cmd: list[str] = field(default_factory=list)
    etcd_endpoint: str | None = None
    ready_timeout: float = 30.0
    # PIDs of the forwarder of each host, for per-process CPU accounting
    forwarder_pids: list[int] = field(default_factory=list)
    # Backend.Queues of the udp path's network config (--udp-queues); no other path has it
    udp_queues: int = 1


def host_subnet(i: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.5.{i + 1}.0/24")


def host_subnet6(i: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(f"fd00:5:0:{i + 1:x}::/64")


def family(path: str) -> int:
    """The IP family of a path's overlay and underlay: 6 for the IPv6 paths, else 4."""
    return 6 if path in IPV6_PATHS else 4


def _containers6(topo: Topology, mtu: int) -> Endpoints:
    """IPv6-only containers (cni0 holds the subnet's first address, as flanneld's CNI does)."""
    for h in topo.hosts:
        topo.add_container6(h, f"{host_subnet6(h.index).network_address + 1}/64", mtu)
    return _container6_endpoints(topo)


def _container6_endpoints(topo: Topology) -> Endpoints:
    c0, c1 = topo.hosts[0].container6, topo.hosts[1].container6
    assert c0 is not None and c1 is not None
    return Endpoints(client_ns=c0.netns, server_ns=c1.netns, server_ip=str(c1.ip))


def _ip6(h: Host) -> str:
    if h.ip6 is None:
        raise PathError(f"h{h.index} has no IPv6 underlay address (needs Topology(underlay6=))")
    return str(h.ip6)


def _containers(topo: Topology, mtu: int) -> Endpoints:
    for h in topo.hosts:
        topo.add_container(h, SubnetEnv.for_lease(NETWORK, str(host_subnet(h.index)), mtu))
    return _container_endpoints(topo)


def _container_endpoints(topo: Topology) -> Endpoints:
    c0, c1 = topo.hosts[0].container, topo.hosts[1].container
    assert c0 is not None and c1 is not None
    return Endpoints(client_ns=c0.netns, server_ns=c1.netns, server_ip=str(c1.ip))


def _wait_traffic(topo: Topology, ep: Endpoints, what: str, timeout: float = 15.0) -> None:
    if not topo.wait_ping(ep.client_ns, ep.server_ip, timeout):
        raise PathError(
            f"{what}: {ep.server_ip} not reachable from {ep.client_ns} after {timeout:g}s"
        )


# ---------------------------------------------------------------------------------------------


def setup_underlay(topo: Topology, ctx: Context) -> Endpoints:
    """Host to host over veth + bridge: the ceiling every overlay is compared with."""
    ep = Endpoints(topo.hosts[0].netns, topo.hosts[1].netns, str(topo.hosts[1].ip))
    _wait_traffic(topo, ep, "underlay")
    return ep


def setup_host_gw(topo: Topology, ctx: Context) -> Endpoints:
    """flannel's host-gw: a plain route per peer subnet via the peer's underlay address."""
    ep = _containers(topo, topo.mtu)
    for h in topo.hosts:
        for peer in topo.hosts:
            if peer is not h:
                topo.ip(
                    h.netns,
                    "route",
                    "replace",
                    str(host_subnet(peer.index)),
                    "via",
                    str(peer.ip),
                    "dev",
                    h.ifname,
                )
    _wait_traffic(topo, ep, "host-gw")
    return ep


def _vxlan_by_hand(
    topo: Topology,
    dev: str,
    mtu: int,
    subnet_of: Callable[[int], ipaddress.IPv4Network | ipaddress.IPv6Network],
    local_of: Callable[[Host], str],
    six: bool,
) -> None:
    """Kernel VXLAN configured by hand exactly as flannel's vxlan backend programs it, for
    either family: the device on each host (its subnet's first address as a host address on
    it), then per peer, in flannel's order, 1. neighbour: peer .0 -> peer VTEP MAC; 2. FDB:
    MAC -> peer underlay address; 3. route: peer subnet via peer .0 onlink."""
    v6 = ("-6",) if six else ()
    macs: dict[int, str] = {}
    for h in topo.hosts:
        topo.ip(
            h.netns,
            *("link", "add", dev, "mtu", str(mtu), "type", "vxlan", "id", "1"),
            *("local", local_of(h), "dev", h.ifname, "dstport", "8472", "nolearning"),
        )
        sub = subnet_of(h.index)
        host_addr = f"{sub.network_address}/{sub.max_prefixlen}"
        topo.ip(h.netns, "addr", "add", host_addr, "dev", dev, *(("nodad",) if six else ()))
        topo.ip(h.netns, "link", "set", dev, "up")
        macs[h.index] = json.loads(topo.ip(h.netns, "-j", "link", "show", dev))[0]["address"]
    for h in topo.hosts:
        for peer in topo.hosts:
            if peer is h:
                continue
            sub = subnet_of(peer.index)
            vtep, mac = str(sub.network_address), macs[peer.index]
            topo.ip(
                h.netns,
                *(*v6, "neigh", "replace", vtep, "lladdr", mac, "dev", dev, "nud", "permanent"),
            )
            topo.run(
                h.netns,
                *("bridge", "fdb", "replace", mac, "dev", dev),
                *("dst", local_of(peer), "self", "permanent"),
            )
            topo.ip(h.netns, *v6, "route", "replace", str(sub), "via", vtep, "dev", dev, "onlink")


def setup_vxlan(topo: Topology, ctx: Context) -> Endpoints:
    """Kernel VXLAN configured by hand exactly as flannel's vxlan backend programs it."""
    mtu = topo.mtu - VXLAN_OVERHEAD
    _vxlan_by_hand(topo, "flannel.1", mtu, host_subnet, lambda h: str(h.ip), six=False)
    ep = _containers(topo, mtu)
    _wait_traffic(topo, ep, "vxlan")
    return ep


def setup_underlay6(topo: Topology, ctx: Context) -> Endpoints:
    """Host to host over the same veth + bridge in IPv6: the ceiling of the IPv6 paths."""
    ep = Endpoints(topo.hosts[0].netns, topo.hosts[1].netns, _ip6(topo.hosts[1]))
    _wait_traffic(topo, ep, "underlay6")
    return ep


def setup_host_gw6(topo: Topology, ctx: Context) -> Endpoints:
    """flannel's host-gw for an IPv6 network: <peer v6 subnet> via <peer PublicIPv6>."""
    ep = _containers6(topo, topo.mtu)
    for h in topo.hosts:
        for peer in topo.hosts:
            if peer is not h:
                sub = str(host_subnet6(peer.index))
                topo.ip(h.netns, "-6", "route", "replace", sub, "via", _ip6(peer), "dev", h.ifname)
    _wait_traffic(topo, ep, "host-gw6")
    return ep


def setup_vxlan6(topo: Topology, ctx: Context) -> Endpoints:
    """Kernel VXLAN over IPv6 by hand, as flanneld's vxlan backend programs flannel-v6.1:
    device MTU = underlay - 70, the subnet's ::/128 on it, neighbour + FDB + onlink route per
    peer; the containers get FLANNEL_MTU (underlay - 50), as flanneld writes it."""
    mtu = topo.mtu - VXLAN6_OVERHEAD
    _vxlan_by_hand(topo, "flannel-v6.1", mtu, host_subnet6, _ip6, six=True)
    ep = _containers6(topo, topo.mtu - VXLAN_OVERHEAD)
    _wait_traffic(topo, ep, "vxlan6")
    return ep


def _configure_tun(topo: Topology, netns: str, dev: str, address: str, mtu: int) -> None:
    """What flanneld's Go side does around its proxy: /32 address, MTU, whole-Network route."""
    topo.ip(netns, "addr", "add", f"{address}/32", "dev", dev)
    topo.ip(netns, "link", "set", dev, "mtu", str(mtu), "up")
    topo.ip(netns, "route", "replace", NETWORK, "dev", dev)


def _wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _said_ready_or_died(topo: Topology, log: str, proc: subprocess.Popen[bytes]) -> bool:
    return "ready" in topo.log_tail(log, 5) or proc.poll() is not None


def _file_or_died(path: Path, proc: subprocess.Popen[bytes]) -> bool:
    return path.exists() or proc.poll() is not None


def setup_baseline(topo: Topology, ctx: Context) -> Endpoints:
    """The flanneld-style one-packet-per-syscall forwarder (fastlane/bench/baseline_fwd.c)."""
    if ctx.baseline_bin is None:
        raise PathError("baseline forwarder was not built")
    mtu = topo.mtu - UDP_OVERHEAD
    for h in topo.hosts:
        routes = [f"{host_subnet(p.index)}={p.ip}" for p in topo.hosts if p is not h]
        name = f"h{h.index}-baseline"
        proc = topo.popen(
            h.netns, str(ctx.baseline_bin), "flannel0", str(h.ip), str(UDP_PORT), *routes, name=name
        )
        ctx.forwarder_pids.append(proc.pid)
        if not _wait_for(partial(_said_ready_or_died, topo, name, proc), 10):
            raise PathError(
                f"baseline forwarder on h{h.index} never became ready\n" + topo.log_tail(name, 10)
            )
        if proc.poll() is not None:
            raise PathError(
                f"baseline forwarder on h{h.index} exited with {proc.returncode}\n"
                + topo.log_tail(name, 10)
            )
        _configure_tun(topo, h.netns, "flannel0", str(host_subnet(h.index).network_address), mtu)
    ep = _containers(topo, mtu)
    _wait_traffic(topo, ep, "baseline")
    return ep


def _start_daemons(
    topo: Topology,
    ctx: Context,
    label: str,
    argv0: list[str],
    forwards: bool = True,
    v6: bool = False,
) -> Endpoints:
    """Run one overlay daemon per host with flanneld's flags; ready = subnet file + traffic."""
    if ctx.etcd_endpoint is None:
        raise PathError(f"{label} needs etcd")
    files: list[Path] = []
    procs = []
    for h in topo.hosts:
        subnet_file = topo.workdir / f"h{h.index}" / "subnet.env"
        subnet_file.parent.mkdir(parents=True, exist_ok=True)
        name = f"h{h.index}-{label}"
        proc = topo.popen(
            h.netns,
            *argv0,
            "-etcd-endpoints",
            ctx.etcd_endpoint,
            "-iface",
            h.ifname,
            "-subnet-file",
            str(subnet_file),
            name=name,
        )
        if forwards:  # a kernel backend's daemon moves no packets: not a forwarder
            ctx.forwarder_pids.append(proc.pid)
        files.append(subnet_file)
        procs.append((h, name, proc))
    for (h, name, proc), subnet_file in zip(procs, files, strict=False):
        ok = _wait_for(partial(_file_or_died, subnet_file, proc), ctx.ready_timeout)
        if proc.poll() is not None:
            raise PathError(
                f"{label} on h{h.index} exited with status {proc.returncode} "
                f"before it was ready; last log lines:\n{topo.log_tail(name, 12)}"
            )
        if not ok:
            raise PathError(
                f"{label} on h{h.index} never became ready (no {subnet_file} after "
                f"{ctx.ready_timeout:g}s); last log lines:\n{topo.log_tail(name, 12)}"
            )
        if v6:
            values = subnetfile.parse_vars(subnet_file.read_text())
            topo.add_container6(h, values["FLANNEL_IPV6_SUBNET"], int(values["FLANNEL_MTU"]))
        else:
            topo.add_container(h, subnet_file)
    ep = _container6_endpoints(topo) if v6 else _container_endpoints(topo)
    try:
        _wait_traffic(topo, ep, label, timeout=ctx.ready_timeout)
    except PathError as exc:
        tails = "\n".join(f"--- {n}\n{topo.log_tail(n, 8)}" for _, n, _ in procs)
        raise PathError(f"{exc}; daemons' last log lines:\n{tails}") from None
    return ep


def setup_udp(topo: Topology, ctx: Context) -> Endpoints:
    """Real fastlane daemons, Backend udp."""
    return _start_daemons(topo, ctx, "fastlane", ctx.fastlane_cmd)


def setup_fastlane_kernel(topo: Topology, ctx: Context) -> Endpoints:
    """fastlane daemons with a kernel backend (vxlan or host-gw): checks that fastlane programs
    the kernel as well as the hand-made configuration above does."""
    return _start_daemons(topo, ctx, "fastlane", ctx.fastlane_cmd, forwards=False)


def setup_fastlane_kernel6(topo: Topology, ctx: Context) -> Endpoints:
    """fastlane daemons with a kernel backend in an IPv6-only network (EnableIPv4 false)."""
    return _start_daemons(topo, ctx, "fastlane", ctx.fastlane_cmd, forwards=False, v6=True)


def setup_flanneld(topo: Topology, ctx: Context) -> Endpoints:
    """A flanneld binary supplied by the user, on the same topology and etcd config."""
    if ctx.flanneld_bin is None:
        raise PathError("flanneld path needs --flanneld PATH")
    return _start_daemons(topo, ctx, "flanneld", [str(ctx.flanneld_bin)])


SETUPS: dict[str, Callable[[Topology, Context], Endpoints]] = {
    "underlay": setup_underlay,
    "udp": setup_udp,
    "vxlan": setup_vxlan,
    "host-gw": setup_host_gw,
    "baseline": setup_baseline,
    "flanneld": setup_flanneld,
    "fastlane-vxlan": setup_fastlane_kernel,
    "fastlane-host-gw": setup_fastlane_kernel,
    "underlay6": setup_underlay6,
    "vxlan6": setup_vxlan6,
    "host-gw6": setup_host_gw6,
    "fastlane-vxlan6": setup_fastlane_kernel6,
    "fastlane-host-gw6": setup_fastlane_kernel6,
}


@contextmanager
def up(topo: Topology, path: str, ctx: Context) -> Iterator[Endpoints]:
    """Bring `path` up on `topo` (with a throwaway etcd in the switch netns for the paths that
    run daemons) and yield its Endpoints; the etcd is stopped on the way out."""
    etcd = None
    try:
        if path in ETCD_PATHS:
            from fastlane.bench.lab.etcdserver import EtcdServer

            etcd = EtcdServer(
                data_dir=str(topo.workdir / "etcd"),
                host=str(topo.switch_ip),
                netns=topo.switch_netns,
                name="fastlane-bench",
            )
            try:
                etcd.start()
            except RuntimeError as exc:
                raise PathError(f"etcd: {exc}") from None
            queues = ctx.udp_queues if path == "udp" else 1  # flanneld has no Queues
            write_config(etcd.etcdctl, BACKEND_OF[path], family(path), queues)
            ctx.etcd_endpoint = etcd.endpoint
        yield SETUPS[path](topo, ctx)
    finally:
        if etcd is not None:
            etcd.stop()


def fastlane_command() -> list[str]:
    """The installed `fastlane` next to this interpreter (the venv's), else `python -m`."""
    exe = Path(sys.executable).parent / "fastlane"
    if exe.exists() and os.access(exe, os.X_OK):
        return [str(exe)]
    found = shutil.which("fastlane")
    return [found] if found else [sys.executable, "-m", "fastlane"]


def baseline_source() -> Traversable:
    """fastlane/bench/baseline_fwd.c, shipped as package data so an installed fastlane finds it."""
    return resources.files("fastlane.bench") / "baseline_fwd.c"


def build_baseline(outdir: Path) -> Path:
    """Compile the baseline forwarder's C source with gcc into `outdir` (a temp dir of this run)."""
    src = baseline_source()
    if not src.is_file():
        raise PathError(f"baseline source missing: {src}")
    if shutil.which("gcc") is None:
        raise PathError("gcc not found (needed for the baseline path): apt-get install -y gcc")
    out = outdir / "baseline_fwd"
    with resources.as_file(src) as path:  # a real file even if the package is zipped
        res = subprocess.run(
            ["gcc", "-O2", "-Wall", "-o", str(out), str(path)],
            check=False,
            capture_output=True,
            text=True,
        )
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        raise PathError(f"compiling {src.name} failed: {lines[-1] if lines else res.returncode}")
    return out


def write_config(
    etcdctl: Callable[..., str], backend: str = "udp", fam: int = 4, queues: int = 1
) -> None:
    """The network config: IPv4 Network, or (fam 6) an IPv6-only network on NETWORK6.

    `queues` other than 1 becomes Backend.Queues (fastlane udp's TUN queues, one worker
    each); at 1 the key is left out, so a default run writes the config flanneld reads."""
    backend_cfg: dict[str, object] = {"Type": backend}
    if queues != 1:
        backend_cfg["Queues"] = queues
    if fam == 6:
        cfg = json.dumps(
            {
                "EnableIPv4": False,
                "EnableIPv6": True,
                "IPv6Network": NETWORK6,
                "Backend": backend_cfg,
            }
        )
    else:
        cfg = json.dumps({"Network": NETWORK, "Backend": backend_cfg})
    try:
        etcdctl("put", CONFIG_KEY, cfg)
    except RuntimeError as exc:
        raise PathError(f"writing the network config failed: {exc}") from None


__all__ = [
    "ALL_PATHS",
    "BACKEND_OF",
    "DEFAULT_PATHS",
    "ETCD_PATHS",
    "IPV6_PATHS",
    "NETWORK6",
    "UNDERLAY6",
    "SETUPS",
    "Context",
    "PathError",
    "TopologyError",
    "baseline_source",
    "build_baseline",
    "fastlane_command",
    "family",
    "host_subnet",
    "host_subnet6",
    "up",
    "write_config",
]

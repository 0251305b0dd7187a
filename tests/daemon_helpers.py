"""Running real fastlane daemons inside test hosts (network namespaces) against a real etcd."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastlane.bench.lab.etcdserver import EtcdServer
from fastlane.bench.lab.topology import Host, Topology
from tests.waiting import wait_until

_runs = itertools.count()


class Node:
    """One fastlane daemon in one host netns; its subnet file lives in the test's tmp dir."""

    def __init__(
        self,
        topo: Topology,
        host: Host,
        etcd: EtcdServer,
        prefix: str,
        workdir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.topo, self.host, self.etcd, self.prefix = topo, host, etcd, prefix
        self.dir = workdir / host.netns
        self.dir.mkdir(parents=True, exist_ok=True)
        self.subnet_file = self.dir / "subnet.env"
        self.extra = list(extra)
        self.env = env
        self.proc: Any = None  # the daemon process, once start() ran
        self.logname = ""

    def args(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fastlane",
            f"-etcd-endpoints={self.etcd.endpoint}",
            f"-etcd-prefix={self.prefix}",
            "-iface=eth0",
            f"-subnet-file={self.subnet_file}",
            *self.extra,
        ]

    def start(self) -> Node:
        self.logname = f"{self.host.netns.removeprefix(self.topo.prefix)}-fastlane-{next(_runs)}"
        env = dict(os.environ, **(self.env or {}))
        self.proc = self.topo.popen(self.host.netns, *self.args(), name=self.logname, env=env)
        return self

    def wait_subnet_file(self, timeout: float = 20.0) -> dict[str, str]:
        ok = wait_until(lambda: self.subnet_file.exists() or self.proc.poll() is not None, timeout)
        assert ok and self.subnet_file.exists(), f"daemon not ready; log:\n{self.log()}"
        return dict(line.split("=", 1) for line in self.subnet_file.read_text().splitlines())

    def log(self) -> str:
        return self.topo.log_path(self.logname).read_text(errors="replace") if self.logname else ""

    def kill(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except Exception:
            pass
        return self.topo.stop(self.proc)

    def wait_exit(self, timeout: float = 20.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except Exception:
            return None


def overlay(
    config: str,
    name: str,
    workdir: Path,
    hosts: int = 2,
    started: int = 2,
    prefix: str = "/coreos.com/network",
    underlay6: str | None = None,
    extra: tuple[str, ...] = (),
):
    """Generator for module fixtures: a topology, etcd on its switch, `config` in etcd, and a
    daemon (with a container behind it) on each of the first `started` hosts. Yields
    (topo, etcd, nodes); everything is torn down afterwards, pass or fail. `underlay6`
    makes the underlay dual-stack (containers get IPv6 from FLANNEL_IPV6_SUBNET)."""
    topo = Topology(hosts=hosts, mtu=1500, underlay6=underlay6)
    etcd = None
    nodes: list[Node] = []
    try:
        topo.setup()
        etcd = EtcdServer(
            netns=topo.switch_netns, host=str(topo.switch_ip), name=f"fastlane-{name}-tests"
        )
        etcd.start()
        etcd.etcdctl("put", f"{prefix}/config", config)
        nodes = [Node(topo, h, etcd, prefix, workdir, "-v=1", *extra) for h in topo.hosts]
        for n in nodes[:started]:
            n.start()
        for i, n in enumerate(nodes[:started]):
            add_container(topo, i, n.wait_subnet_file(), n.subnet_file)
        yield topo, etcd, nodes
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)
        if etcd is not None:
            etcd.cleanup()
        topo.teardown()


def add_container(topo: Topology, i: int, env: dict[str, str], path: Path) -> None:
    """A container behind host i from its subnet file: IPv4 (and IPv6 when the file has
    FLANNEL_IPV6_SUBNET), or IPv6 only when the file has no FLANNEL_SUBNET."""
    if "FLANNEL_SUBNET" in env:
        topo.add_container(i, path)
    else:
        topo.add_container6(i, env["FLANNEL_IPV6_SUBNET"], int(env["FLANNEL_MTU"]))


def leases(etcd: EtcdServer, prefix: str) -> dict[str, str]:
    """key -> value under <prefix>/subnets/, read with etcdctl (an independent oracle)."""
    out = etcd.etcdctl("get", "--prefix", f"{prefix}/subnets/", "-w", "json")
    kvs = json.loads(out).get("kvs", [])
    import base64

    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode() for kv in kvs
    }


def unleased(etcd: EtcdServer, prefix: str, network: str, count: int = 1) -> list[str]:
    """`count` /24 subnets of `network` that no key under the prefix holds, highest first.

    Daemons pick their subnet at random, so a test that writes a lease by hand at a fixed
    subnet would now and then overwrite a running node's own lease (and test something else).
    """
    held = {key.rsplit("/", 1)[1].split("&")[0] for key in leases(etcd, prefix)}
    free = [
        str(sub)
        for sub in reversed(list(ipaddress.IPv4Network(network).subnets(new_prefix=24)))
        if f"{sub.network_address}-24" not in held
    ]
    return free[:count]


def lease_ids(etcd: EtcdServer, prefix: str) -> dict[str, int]:
    out = etcd.etcdctl("get", "--prefix", f"{prefix}/subnets/", "-w", "json")
    import base64

    return {
        base64.b64decode(kv["key"]).decode(): int(kv.get("lease", 0))
        for kv in json.loads(out).get("kvs", [])
    }


class NotifySocket:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)

    def messages(self, timeout: float = 10.0) -> list[str]:
        out, end = [], time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                out.append(self.sock.recv(4096).decode())
                break
            except TimeoutError:
                continue
        return out

    def close(self) -> None:
        self.sock.close()


def topology_with_etcd(name: str, hosts: int = 2) -> Iterator[tuple[Topology, EtcdServer]]:
    """For module fixtures: `hosts` hosts on an underlay and a throwaway etcd listening on the
    underlay bridge (the switch netns); both torn down however the tests end."""
    topo = Topology(hosts=hosts, mtu=1500)
    etcd = None
    try:
        topo.setup()
        etcd = EtcdServer(netns=topo.switch_netns, host=str(topo.switch_ip), name=name)
        etcd.start()
        yield topo, etcd
    finally:
        if etcd is not None:
            etcd.cleanup()
        topo.teardown()


# ---- traffic scripts run inside namespaces: a TCP sink and source with a sha256 each ---------

SINK = textwrap.dedent("""
    import hashlib, socket, sys
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.create_server((sys.argv[1], int(sys.argv[2])), family=fam); s.settimeout(120)
    print("listening", flush=True)
    c, _ = s.accept(); c.settimeout(120); h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(1 << 16)
        if not b: break
        h.update(b); n += len(b)
    print(n, h.hexdigest(), flush=True)
""")

SOURCE = textwrap.dedent("""
    import hashlib, socket, sys, time
    dest, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mss = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    fam = socket.AF_INET6 if ":" in dest else socket.AF_INET
    def new():
        s = socket.socket(fam)
        if mss: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        return s
    s = new()
    for _ in range(100):
        try: s.connect((dest, port)); break
        except OSError: time.sleep(0.1); s.close(); s = new()
    h = hashlib.sha256(); block = hashlib.sha256(b"fastlane").digest() * 2048; seed = 0; sent = 0
    while sent < size:
        chunk = hashlib.sha256(seed.to_bytes(8, "big")).digest() + block[: min(len(block), size - sent - 32)]
        chunk = chunk[: size - sent]; seed += 1
        s.sendall(chunk); h.update(chunk); sent += len(chunk)
    s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
    print(sent, h.hexdigest(), flush=True)
""")


def transfer(
    topo: Topology,
    src_ns: str,
    dst_ns: str,
    dst_ip: object,
    size: int,
    *,
    port: int,
    mss: int = 0,
    timeout: float = 180,
) -> tuple[list[str], list[str]]:
    """TCP from src_ns to dst_ip:port (IPv4 or IPv6) with SOURCE and SINK: the sender's and the
    receiver's [byte count, sha256], for the caller to compare."""
    name = f"sink{port}"
    sink = topo.popen(dst_ns, sys.executable, "-c", SINK, str(dst_ip), str(port), name=name)
    try:
        assert wait_until(lambda: "listening" in topo.log_tail(name), 10), topo.log_tail(name)
        res = topo.run(
            src_ns,
            sys.executable,
            "-c",
            SOURCE,
            str(dst_ip),
            str(port),
            str(size),
            str(mss),
            timeout=timeout,
        )
        assert wait_until(lambda: len(topo.log_tail(name).split()) >= 3, 30)
        return res.stdout.split(), topo.log_tail(name).split()[-2:]
    finally:
        topo.stop(sink)


# ---- faults under traffic (tests/test_faults.py, tests/test_hostile_etcd.py) ------------------

PACED_SOURCE = """
import hashlib, socket, sys, time
dest, port, size, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket()
for _ in range(100):
    try: s.connect((dest, port)); break
    except OSError: time.sleep(0.1); s.close(); s = socket.socket()
h = hashlib.sha256(); sent = 0; seed = 0; t0 = time.monotonic()
while sent < size:
    chunk = b"".join(hashlib.sha256((seed * 64 + i).to_bytes(8, "big")).digest() for i in range(64))
    chunk = (chunk * 32)[: min(65536, size - sent)]; seed += 1
    s.sendall(chunk); h.update(chunk); sent += len(chunk)
    ahead = sent / rate - (time.monotonic() - t0)
    if ahead > 0: time.sleep(ahead)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(sent, h.hexdigest(), round(time.monotonic() - t0, 3), flush=True)
"""


def start_ping(
    topo: Topology, netns: str, dest, name: str, interval: float = 0.01, seconds: float = 30.0
):
    """A timestamped ping stream (`ping -D -i`) in the background; read it with ping_gaps."""
    return topo.popen(
        netns,
        "ping",
        "-n",
        "-D",
        "-i",
        str(interval),
        "-W",
        "1",
        "-w",
        str(int(seconds)),
        str(dest),
        name=name,
    )


def ping_gaps(text: str, interval: float = 0.01) -> dict[str, float]:
    """From `ping -D` output: replies received, the highest sequence sent, and the longest
    time between two consecutive replies (the forwarding gap), in seconds."""
    got: list[tuple[float, int]] = []
    for line in text.splitlines():
        if "bytes from" in line and "icmp_seq=" in line and line.startswith("["):
            ts = float(line[1 : line.index("]")])
            seq = int(line.split("icmp_seq=")[1].split()[0])
            got.append((ts, seq))
    if len(got) < 2:
        return {
            "replies": len(got),
            "max_seq": got[-1][1] if got else 0,
            "gap_s": float("nan"),
            "lost": float("nan"),
        }
    gap = max(b[0] - a[0] for a, b in zip(got, got[1:], strict=False))
    max_seq = max(s for _, s in got)
    return {
        "replies": len(got),
        "max_seq": max_seq,
        "gap_s": round(gap, 3),
        "lost": max_seq - len({s for _, s in got}),
    }


def nstat(topo: Topology, netns: str, *counters: str) -> dict[str, int]:
    """Absolute kernel SNMP counters of a namespace (e.g. TcpRetransSegs)."""
    out = topo.run(netns, "nstat", "-az", *counters, check=False).stdout
    vals = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in counters:
            vals[parts[0]] = int(parts[1])
    return vals


def routes(topo: Topology, netns: str, *args: str) -> str:
    return topo.run(netns, "ip", "-4", "route", "show", *args).stdout

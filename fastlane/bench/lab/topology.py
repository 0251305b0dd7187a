"""Multi-host topologies built from network namespaces, for tests and `fastlane bench`.

Why namespaces: they give every "host" its own interfaces, routes and sockets on one machine,
so real daemons, real TUN devices and real packets can be exercised without touching the
machine's own network. Everything a topology makes lives *inside* namespaces it created
(links are created directly in their target namespace, never in the root namespace), so
deleting those namespaces after killing the processes we started removes every trace.

Layout (N hosts)::

    netns <prefix>sw : bridge br0 (optionally an address, e.g. for etcd), ports p0..pN-1
    netns <prefix>h<i>: eth0 = 192.168.100.<i+1>/24 (underlay), ip_forward=1
    netns <prefix>c<i>: optional "container" behind host i, wired as Docker/CNI would
                        from flanneld's subnet file: bridge cni0 in the host holding
                        FLANNEL_SUBNET, veth into the container, default route via .1.

Dual-stack underlay (``underlay6="fd00:100::/64"``, off by default): eth0 also gets
fd00:100::<i+1>/64 and br0 the last address, without DAD (usable at once), and IPv6
forwarding is on in the hosts. A subnet file with FLANNEL_IPV6_SUBNET gives the container
IPv6 too (``add_container``; an IPv6-only file: ``add_container6``).

Ownership: each live topology writes a manifest to ``MANIFEST_DIR`` naming its owner PID,
namespaces, started PIDs and scratch directories. ``cleanup_stale`` removes only what such
a manifest lists and only when its owner process is gone — so a test run by someone else
that happens to use similar names is never touched.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

from fastlane import subnetfile

__all__ = [
    "MANIFEST_DIR",
    "NIC_HOST_FEATURES",
    "NIC_SWITCH_PORT_FEATURES",
    "UNDERLAY_KINDS",
    "Container",
    "Container6",
    "Host",
    "SubnetEnv",
    "Topology",
    "TopologyError",
    "cleanup_stale",
    "underlay_description",
    "underlay_features",
]

MANIFEST_DIR = Path(os.environ.get("FASTLANE_TOPOLOGY_DIR", "/run/fastlane/topologies"))
# fl + 6 hex + "-": the only shape of prefix this module creates or ever deletes.
PREFIX_RE = re.compile(r"^fl[0-9a-f]{6}-$")
IFNAMSIZ = 15

# What the underlay link between a host and the switch behaves like.
#   veth: a plain veth pair. It hands 64 KiB GSO frames across whole, so kernel paths never
#         segment on the "wire"; no real NIC does that.
#   nic:  like a host with a NIC: every frame on the wire is one packet of at most the MTU
#         (no TSO/GSO/UDP segmentation offloads, tunnel ones included, and no checksum
#         offload), and the receiving side aggregates with GRO, as a NIC driver's NAPI does.
UNDERLAY_KINDS = ("veth", "nic")
# `ethtool -K <host underlay device> ...` on every host for the nic kind
NIC_HOST_FEATURES = (
    "tx",
    "off",
    "tso",
    "off",
    "gso",
    "off",
    "tx-udp-segmentation",
    "off",
    "tx-udp_tnl-segmentation",
    "off",
    "tx-udp_tnl-csum-segmentation",
    "off",
    "gro",
    "on",
)
# `ethtool -K <switch side of the host's veth> ...`: a veth only runs GRO (NAPI) for frames
# its peer sends when that peer has no TSO, so without this the hosts' "gro on" does nothing.
NIC_SWITCH_PORT_FEATURES = ("tso", "off", "gso", "off")
# ethtool -K names -> the names `ethtool -k` prints, to check each setting took effect
_ETHTOOL_K_NAMES = {
    "tx": "tx-checksumming",
    "tso": "tcp-segmentation-offload",
    "gso": "generic-segmentation-offload",
    "gro": "generic-receive-offload",
}


class TopologyError(RuntimeError):
    """A topology step failed; the message is one line fit for an operator."""


# ---------------------------------------------------------------------------------------------
# subnet.env, the contract between the overlay daemon and the container runtime


@dataclasses.dataclass(frozen=True)
class SubnetEnv:
    """flanneld's /run/flannel/subnet.env: what Docker/CNI reads to wire containers."""

    network: ipaddress.IPv4Network
    subnet: ipaddress.IPv4Interface  # first host address / length, e.g. 10.5.72.1/24
    mtu: int
    ipmasq: bool = False

    @classmethod
    def parse(cls, text: str) -> SubnetEnv:
        values = subnetfile.parse_vars(text)
        try:
            return cls(
                network=ipaddress.IPv4Network(values["FLANNEL_NETWORK"]),
                subnet=ipaddress.IPv4Interface(values["FLANNEL_SUBNET"]),
                mtu=int(values["FLANNEL_MTU"]),
                ipmasq=values.get("FLANNEL_IPMASQ", "false").lower() == "true",
            )
        except KeyError as exc:
            raise TopologyError(f"subnet file lacks {exc.args[0]}") from None
        except ValueError as exc:
            raise TopologyError(f"subnet file has a bad value: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SubnetEnv:
        try:
            return cls.parse(Path(path).read_text())
        except OSError as exc:
            raise TopologyError(f"cannot read subnet file {path}: {exc.strerror}") from None

    @classmethod
    def for_lease(cls, network: str, subnet: str, mtu: int, ipmasq: bool = False) -> SubnetEnv:
        """Build the file flanneld would write for a lease (subnet given as 10.5.3.0/24)."""
        net = ipaddress.IPv4Network(subnet)
        first = ipaddress.IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}")
        return cls(ipaddress.IPv4Network(network), first, mtu, ipmasq)

    def render(self) -> str:
        """flanneld's line order (FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ)."""
        return subnetfile.render_values(self.network, self.subnet, self.mtu, self.ipmasq)


@dataclasses.dataclass
class Container:
    """A container netns wired behind a host from a subnet file."""

    netns: str
    ip: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    mtu: int
    env: SubnetEnv


@dataclasses.dataclass
class Container6:
    """The IPv6 side of a container (dual-stack: the same netns as its Container)."""

    netns: str
    ip: ipaddress.IPv6Address
    gateway: ipaddress.IPv6Address
    mtu: int


@dataclasses.dataclass
class Host:
    netns: str
    index: int
    ip: ipaddress.IPv4Address
    ifname: str = "eth0"
    container: Container | None = None
    ip6: ipaddress.IPv6Address | None = None  # with a dual-stack underlay
    container6: Container6 | None = None


# ---------------------------------------------------------------------------------------------
# the topology


class Topology:
    """N hosts on one bridged underlay, each optionally with a container behind it.

    Use as a context manager: teardown runs on success, on error and on KeyboardInterrupt.
    """

    def __init__(
        self,
        hosts: int = 2,
        mtu: int = 1500,
        underlay: str = "192.168.100.0/24",
        switch_ip: bool = True,
        prefix: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        underlay_kind: str = "veth",
        underlay6: str | None = None,
    ) -> None:
        if underlay_kind not in UNDERLAY_KINDS:
            raise TopologyError(
                f"underlay kind must be one of {', '.join(UNDERLAY_KINDS)}, got {underlay_kind!r}"
            )
        if not 1 <= hosts <= 200:
            raise TopologyError(f"hosts must be between 1 and 200, got {hosts}")
        if not 68 <= mtu <= 65535:
            raise TopologyError(f"underlay MTU must be between 68 and 65535, got {mtu}")
        try:
            self.underlay = ipaddress.IPv4Network(underlay)
        except ValueError as exc:
            raise TopologyError(f"bad underlay network {underlay!r}: {exc}") from None
        if self.underlay.num_addresses < hosts + 3:
            raise TopologyError(f"underlay {underlay} too small for {hosts} hosts")
        try:
            self.underlay6 = ipaddress.IPv6Network(underlay6) if underlay6 else None
        except ValueError as exc:
            raise TopologyError(f"bad IPv6 underlay network {underlay6!r}: {exc}") from None
        self.prefix = prefix or f"fl{secrets.token_hex(3)}-"
        if not PREFIX_RE.match(self.prefix):
            raise TopologyError(f"topology prefix must look like fl1a2b3c-, got {self.prefix!r}")
        self.n_hosts = hosts
        self.mtu = mtu
        self.underlay_kind = underlay_kind
        self.switch_netns = f"{self.prefix}sw"
        # The bridge's own address (last usable) lets a service in the switch netns (etcd)
        # be reached by every host over the underlay, with no route added anywhere.
        self.switch_ip: ipaddress.IPv4Address | None = (
            self.underlay.network_address + self.underlay.num_addresses - 2 if switch_ip else None
        )
        self.hosts: list[Host] = [
            Host(netns=f"{self.prefix}h{i}", index=i, ip=self.underlay.network_address + i + 1)
            for i in range(hosts)
        ]
        self.switch_ip6: ipaddress.IPv6Address | None = None
        if self.underlay6 is not None:
            for h in self.hosts:
                h.ip6 = self.underlay6.network_address + h.index + 1
            if switch_ip:
                self.switch_ip6 = self.underlay6.network_address + self.underlay6.num_addresses - 2
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=self.prefix))
        self.logdir = self.workdir / "logs"
        self._namespaces: list[str] = []
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Path] = {}
        self._manifest = MANIFEST_DIR / f"{self.prefix.rstrip('-')}.json"
        self._up = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        """Create the switch and hosts. Any failure leaves state for teardown() to remove."""
        _require_root_tools()
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._write_manifest()
        self._add_netns(self.switch_netns)
        sw = self.switch_netns
        self.ip(sw, "link", "set", "lo", "up")
        self.ip(
            sw, "link", "add", "br0", "mtu", str(self.mtu), "type", "bridge", "forward_delay", "0"
        )
        if self.switch_ip is not None:
            self.ip(sw, "addr", "add", f"{self.switch_ip}/{self.underlay.prefixlen}", "dev", "br0")
        if self.switch_ip6 is not None and self.underlay6 is not None:
            self.ip(
                sw,
                "addr",
                "add",
                f"{self.switch_ip6}/{self.underlay6.prefixlen}",
                "dev",
                "br0",
                "nodad",
            )
        self.ip(sw, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_host(host)
        self._up = True

    def _add_host(self, host: Host) -> None:
        ns, sw, port = host.netns, self.switch_netns, f"p{host.index}"
        self._add_netns(ns)
        # Created in the switch netns with its peer placed straight into the host netns:
        # nothing ever appears in the root netns, even for a moment.
        self.ip(
            sw,
            "link",
            "add",
            port,
            "mtu",
            str(self.mtu),
            "type",
            "veth",
            "peer",
            "name",
            host.ifname,
            "mtu",
            str(self.mtu),
            "netns",
            ns,
        )
        self.ip(sw, "link", "set", port, "master", "br0", "up")
        self.ip(ns, "link", "set", "lo", "up")
        self.ip(ns, "addr", "add", f"{host.ip}/{self.underlay.prefixlen}", "dev", host.ifname)
        self.ip(ns, "link", "set", host.ifname, "up")
        self.sysctl(ns, "net.ipv4.ip_forward", "1")
        if host.ip6 is not None and self.underlay6 is not None:
            self.sysctl(ns, f"net.ipv6.conf.{host.ifname}.accept_dad", "0")
            self.ip(
                ns,
                "addr",
                "add",
                f"{host.ip6}/{self.underlay6.prefixlen}",
                "dev",
                host.ifname,
                "nodad",
            )
            self.sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
        if self.underlay_kind == "nic":
            self._ethtool(ns, host.ifname, NIC_HOST_FEATURES)
            self._ethtool(sw, port, NIC_SWITCH_PORT_FEATURES)

    def _ethtool(self, netns: str, dev: str, features: Sequence[str]) -> None:
        """`ethtool -K dev features...`, then read back that every one took effect."""
        if shutil.which("ethtool") is None:
            raise TopologyError(
                "ethtool not found (needed for the nic underlay): apt-get install -y ethtool"
            )
        res = self.run(netns, "ethtool", "-K", dev, *features, check=False)
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip().splitlines()
            raise TopologyError(
                f"ethtool -K {dev} {' '.join(features)} failed: "
                f"{detail[-1] if detail else res.returncode}"
            )
        now = underlay_features(self.run(netns, "ethtool", "-k", dev).stdout)
        wrong = [
            f"{name} is {now.get(_ETHTOOL_K_NAMES.get(name, name), 'missing')}"
            for name, want in zip(features[::2], features[1::2], strict=False)
            if now.get(_ETHTOOL_K_NAMES.get(name, name)) != want
        ]
        if wrong:
            raise TopologyError(f"ethtool -K {dev} did not take: {', '.join(wrong)}")

    def teardown(self) -> None:
        """Kill what we started (by PID), delete what we created. Never raises; idempotent.

        SIGINT/SIGTERM are ignored meanwhile (when called from the main thread) so that a
        second Ctrl-C cannot leave half a topology behind.
        """
        restore = _ignore_sigint()
        try:
            for proc in list(self._procs.values()):
                self._kill(proc)
            self._procs.clear()
            for ns in reversed(self._namespaces):
                # Processes our children forked inside our namespaces (e.g. etcd started by
                # a helper) would keep the namespace and its links alive after `netns del`.
                for pid in _netns_pids(ns):
                    _kill_pid(pid)
                _run(["ip", "netns", "del", ns], check=False)
            existing = set(_list_netns())
            self._namespaces = [ns for ns in self._namespaces if ns in existing]
            self._up = False
            if self._own_workdir and not os.environ.get("FASTLANE_KEEP_LOGS"):
                shutil.rmtree(self.workdir, ignore_errors=True)
            if self._namespaces:
                # Could not delete everything: keep the manifest so that cleanup_stale()
                # of a later run (once we are gone) finds and retries what is left.
                self._write_manifest()
            else:
                try:
                    self._manifest.unlink()
                except FileNotFoundError:
                    pass
        finally:
            restore()

    # -- running things ----------------------------------------------------------------------

    def ip(self, netns: str, *args: str) -> str:
        """`ip -n NETNS ...`; raises TopologyError with ip's own message on failure."""
        return _run(["ip", "-n", netns, *args]).stdout

    def sysctl(self, netns: str, key: str, value: str) -> None:
        self.run(netns, "sysctl", "-qw", f"{key}={value}")

    def run(
        self,
        netns: str,
        *cmd: str,
        check: bool = True,
        timeout: float | None = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside a namespace, output captured as text."""
        return _run(["ip", "netns", "exec", netns, *cmd], check=check, timeout=timeout, input=input)

    def popen(
        self,
        netns: str,
        *cmd: str,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a background process in a namespace; stdout+stderr go to logs/<name>.log.

        `ip netns exec` execs the command, so the Popen PID is the command's own PID. It
        gets its own session so a terminal's Ctrl-C reaches the bench first, which then
        stops things in order, and so teardown can signal its whole process group.
        """
        if netns not in self._namespaces:
            raise TopologyError(f"{netns} is not a namespace of this topology")
        name = name or f"{netns.removeprefix(self.prefix)}-{os.path.basename(cmd[0])}"
        log = self.logdir / f"{name}.log"
        self.logdir.mkdir(parents=True, exist_ok=True)
        fh: IO[bytes] = open(log, "ab")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        except OSError as exc:
            raise TopologyError(f"cannot start {cmd[0]}: {exc.strerror}") from None
        finally:
            fh.close()
        self._procs[proc.pid] = proc
        self._logs[name] = log
        self._write_manifest()
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
        """SIGTERM (then SIGKILL) one process we started; returns its exit code."""
        self._kill(proc, timeout)
        self._procs.pop(proc.pid, None)
        self._write_manifest()
        return proc.returncode

    def log_path(self, name: str) -> Path:
        return self._logs.get(name, self.logdir / f"{name}.log")

    def log_tail(self, name: str, lines: int = 10) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def ping(
        self, netns: str, dest: str | ipaddress.IPv4Address, count: int = 1, timeout: float = 2.0
    ) -> bool:
        """True if `dest` answers from inside `netns` (used as a readiness probe)."""
        res = self.run(
            netns,
            "ping",
            "-n",
            "-q",
            "-c",
            str(count),
            "-W",
            str(timeout),
            str(dest),
            check=False,
            timeout=timeout * count + 5,
        )
        return res.returncode == 0

    def wait_ping(
        self, netns: str, dest: str | ipaddress.IPv4Address, timeout: float = 15.0
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping(netns, dest, timeout=1):
                return True
            time.sleep(0.1)
        return False

    # -- changing the topology ----------------------------------------------------------------

    def set_underlay_mtu(self, mtu: int) -> None:
        """Change the MTU of every underlay link (bridge, ports, host eth0)."""
        sw = self.switch_netns
        for host in self.hosts:
            self.ip(sw, "link", "set", f"p{host.index}", "mtu", str(mtu))
            self.ip(host.netns, "link", "set", host.ifname, "mtu", str(mtu))
        self.ip(sw, "link", "set", "br0", "mtu", str(mtu))
        self.mtu = mtu

    def add_container(self, host: int | Host, env: SubnetEnv | str | os.PathLike[str]) -> Container:
        """Put a container behind a host as Docker (--bip/--mtu from subnet.env) or CNI would.

        `env` is a SubnetEnv or the path of a subnet file written by the daemon.
        """
        h = host if isinstance(host, Host) else self.hosts[host]
        if h.container is not None:
            raise TopologyError(f"host {h.index} already has a container")
        senv = env if isinstance(env, SubnetEnv) else SubnetEnv.from_file(env)
        gw = senv.subnet.ip
        net = senv.subnet.network
        ip = next(a for a in net.hosts() if a != gw)  # .2: the runtime's first free address
        cns = f"{self.prefix}c{h.index}"
        self._plug_container(h, cns, senv.mtu)
        self.ip(h.netns, "addr", "replace", str(senv.subnet), "dev", "cni0")
        self.ip(cns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0")
        self.ip(cns, "route", "add", "default", "via", str(gw), "dev", "eth0")
        h.container = Container(netns=cns, ip=ip, gateway=gw, mtu=senv.mtu, env=senv)
        if not isinstance(env, SubnetEnv):
            values = subnetfile.parse_vars(Path(env).read_text())
            if values.get("FLANNEL_IPV6_SUBNET"):
                self.add_container6(h, values["FLANNEL_IPV6_SUBNET"], senv.mtu)
        return h.container

    def add_container6(self, host: int | Host, subnet6: str, mtu: int) -> Container6:
        """IPv6 for a host's container, from FLANNEL_IPV6_SUBNET (first address/len, on
        cni0): the container gets the next address and a default route via cni0's. Without
        an IPv4 container yet (an IPv6-only network) the container netns is made here."""
        h = host if isinstance(host, Host) else self.hosts[host]
        if h.container6 is not None:
            raise TopologyError(f"host {h.index} already has an IPv6 container")
        iface = ipaddress.IPv6Interface(subnet6)
        gw, plen = iface.ip, iface.network.prefixlen
        ip = gw + 1
        cns = f"{self.prefix}c{h.index}"
        if h.container is None:
            self._plug_container(h, cns, mtu)
        self.sysctl(cns, "net.ipv6.conf.eth0.accept_dad", "0")
        self.ip(h.netns, "addr", "replace", f"{gw}/{plen}", "dev", "cni0", "nodad")
        self.ip(cns, "addr", "add", f"{ip}/{plen}", "dev", "eth0", "nodad")
        self.ip(cns, "-6", "route", "add", "default", "via", str(gw), "dev", "eth0")
        h.container6 = Container6(netns=cns, ip=ip, gateway=gw, mtu=mtu)
        return h.container6

    def _plug_container(self, h: Host, cns: str, mtu: int) -> None:
        """A container's netns, made here, joined to the host's cni0 bridge (made if missing,
        at the container's MTU) by a veth pair: eth0 inside, veth0 on the bridge; all up."""
        self._add_netns(cns)
        m = str(mtu)
        if "cni0" not in self.ip(h.netns, "-o", "link", "show"):
            self.ip(
                h.netns, "link", "add", "cni0", "mtu", m, "type", "bridge", "forward_delay", "0"
            )
        else:
            self.ip(h.netns, "link", "set", "cni0", "mtu", m)
        self.ip(h.netns, "link", "set", "cni0", "up")
        veth = ["veth0", "mtu", m, "type", "veth", "peer", "name", "eth0", "mtu", m, "netns", cns]
        self.ip(h.netns, "link", "add", *veth)
        self.ip(h.netns, "link", "set", "veth0", "master", "cni0", "up")
        self.ip(cns, "link", "set", "lo", "up")
        self.ip(cns, "link", "set", "eth0", "up")

    def remove_container(self, host: int | Host) -> None:
        """Delete a host's container netns and its cni0 bridge (the veth dies with the netns)."""
        h = host if isinstance(host, Host) else self.hosts[host]
        if h.container is None and h.container6 is None:
            return
        ns = h.container.netns if h.container is not None else f"{self.prefix}c{h.index}"
        for pid in _netns_pids(ns):
            _kill_pid(pid)
        _run(["ip", "netns", "del", ns], check=False)
        if ns in self._namespaces:
            self._namespaces.remove(ns)
        _run(["ip", "-n", h.netns, "link", "del", "cni0"], check=False)
        h.container = None
        h.container6 = None
        self._write_manifest()

    # -- internals -----------------------------------------------------------------------------

    def _add_netns(self, name: str) -> None:
        if len(name) > 64:
            raise TopologyError(f"namespace name too long: {name}")
        # Record before creating: an interrupt between the two must still lead to deletion.
        self._namespaces.append(name)
        self._write_manifest()
        _run(["ip", "netns", "add", name])

    def _kill(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # its own session: pgid == pid
            except ProcessLookupError:
                pass
            except PermissionError:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _write_manifest(self) -> None:
        data = {
            "owner_pid": os.getpid(),
            "owner_start": _proc_start_time(os.getpid()),
            "prefix": self.prefix,
            "namespaces": list(self._namespaces),
            "pids": sorted(self._procs),
            "dirs": [str(self.workdir)] if self._own_workdir else [],
        }
        try:
            MANIFEST_DIR.mkdir(parents=True, exist_ok=True)
            tmp = self._manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self._manifest)
        except OSError:
            pass  # the manifest only helps clean up after a kill; never fail a run for it


def underlay_features(ethtool_k: str) -> dict[str, str]:
    """`ethtool -k` output -> {feature: "on"|"off"} ("[fixed]" and "[requested ...]" dropped)."""
    out = {}
    for line in ethtool_k.splitlines():
        name, sep, rest = line.partition(":")
        if sep and line[:1] not in (" ", "\t") and rest.split():
            out[name.strip()] = rest.split()[0]
    return out


def underlay_description(kind: str) -> dict[str, str]:
    """What an underlay kind is, for the bench's JSON environment: the exact settings."""
    if kind == "veth":
        return {
            "link": "veth pair host <-> switch bridge port, offloads as the kernel sets "
            "them (TSO/GSO on: GSO frames up to 64 KiB cross whole)"
        }
    return {
        "link": "veth pair host <-> switch bridge port, set up like a NIC: frames on "
        "the wire are single packets of at most the MTU, GRO on receive",
        "host_device": "ethtool -K <dev> " + " ".join(NIC_HOST_FEATURES),
        "switch_port": "ethtool -K <port> " + " ".join(NIC_SWITCH_PORT_FEATURES),
    }


# ---------------------------------------------------------------------------------------------
# leftovers of killed runs


def cleanup_stale(prefix: str = "fl") -> list[str]:
    """Remove what earlier, killed topologies left behind; returns the namespaces removed.

    Only manifests whose owner process is gone are acted on, only namespaces they list and
    that match fastlane's naming pattern (and start with `prefix`) are deleted, and only
    processes living inside those namespaces are killed.
    """
    removed: list[str] = []
    try:
        manifests = sorted(MANIFEST_DIR.glob("fl*.json"))
    except OSError:
        return removed
    existing = set(_list_netns())
    for path in manifests:
        try:
            data = json.loads(path.read_text())
            owner, start = int(data["owner_pid"]), data.get("owner_start")
            tprefix = str(data["prefix"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not PREFIX_RE.match(tprefix) or not tprefix.startswith(prefix):
            continue
        if _alive(owner, start):
            continue
        for pid in data.get("pids", []):
            if isinstance(pid, int) and _pid_in_namespaces(pid, data.get("namespaces", [])):
                _kill_pid(pid)
        for ns in reversed(data.get("namespaces", [])):
            if not isinstance(ns, str) or not ns.startswith(tprefix) or ns not in existing:
                continue
            for pid in _netns_pids(ns):
                _kill_pid(pid)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
        for d in data.get("dirs", []):
            if isinstance(d, str) and Path(d).name.startswith(tprefix):
                shutil.rmtree(d, ignore_errors=True)
        try:
            path.unlink()
        except OSError:
            pass
    return removed


def _alive(pid: int, start: object) -> bool:
    """Is the manifest's owner still running (same PID *and* same start time)?"""
    now = _proc_start_time(pid)
    if now is None:
        return False
    return start is None or now == start


def _proc_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime); the command name in (...) may contain spaces
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_in_namespaces(pid: int, namespaces: Iterable[str]) -> bool:
    """Guard against PID reuse: only kill a recorded PID if it still runs in one of our netns."""
    return any(pid in _netns_pids(ns) for ns in namespaces if isinstance(ns, str))


def _list_netns() -> list[str]:
    res = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    res = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def _kill_pid(pid: int, timeout: float = 3.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # reap it if it happens to be our child
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    except ProcessLookupError:
        pass


def _ignore_sigint() -> Callable[[], None]:
    """Ignore SIGINT and SIGTERM until the returned function is called.

    Teardown must not be cut short by a second Ctrl-C (or by a SIGTERM that a caller such as
    the bench turns into KeyboardInterrupt); a signal arriving meanwhile is simply dropped.
    """
    saved = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            saved.append((sig, signal.signal(sig, signal.SIG_IGN)))
        except ValueError:  # not the main thread: nothing to protect against
            return lambda: None

    def restore() -> None:
        for sig, handler in saved:
            signal.signal(sig, handler)

    return restore


def _require_root_tools() -> None:
    if os.geteuid() != 0:
        raise TopologyError("network namespaces need root: run as root (e.g. with sudo)")
    if shutil.which("ip") is None:
        raise TopologyError("`ip` not found: apt-get install -y iproute2")


def _run(
    cmd: Sequence[str],
    check: bool = True,
    timeout: float | None = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(
            list(cmd), check=False, capture_output=True, text=True, timeout=timeout, input=input
        )
    except FileNotFoundError:
        raise TopologyError(f"{cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise TopologyError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
    if check and res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        detail = msg[-1] if msg else f"exit code {res.returncode}"
        raise TopologyError(f"`{' '.join(cmd)}` failed: {detail}")
    return res

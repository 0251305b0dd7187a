"""One measurement each: iperf3 TCP/UDP, ping RTT, machine CPU from /proc/stat (the perf
profile of --profile is in profile.py).

Why iperf3 -J and ping output instead of our own load generator: operators know and trust
both tools, and their numbers can be reproduced by hand in the same namespaces.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fastlane.bench.lab.topology import Topology, TopologyError

IPERF_PORT = 5201
UDP_PAYLOAD = 64  # bytes of UDP payload: "small packets" for the pps figure


class MeasureError(RuntimeError):
    """A measurement produced no usable number; the message is one line."""


@dataclass
class Endpoints:
    """Where traffic flows for one path: client netns -> server address inside server netns."""

    client_ns: str
    server_ns: str
    server_ip: str


@dataclass
class TcpResult:
    gbit_s: float
    bytes: int
    cpu_s: float  # whole-machine busy CPU seconds during the run
    fwd_cpu_s: float | None = None  # CPU seconds of the forwarding processes (userspace paths)

    @property
    def cpu_s_per_gbit(self) -> float:
        gbit = self.bytes * 8 / 1e9
        return self.cpu_s / gbit if gbit > 0 else math.nan

    @property
    def fwd_cpu_s_per_gbit(self) -> float | None:
        gbit = self.bytes * 8 / 1e9
        if self.fwd_cpu_s is None:
            return None
        return self.fwd_cpu_s / gbit if gbit > 0 else math.nan


class IperfServer:
    """An iperf3 server bound (-B) to the target address: unbound UDP tests hang in 3.12."""

    def __init__(self, topo: Topology, ep: Endpoints) -> None:
        self.topo, self.ep = topo, ep
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = self.topo.popen(
            self.ep.server_ns,
            "iperf3",
            "-s",
            "-B",
            self.ep.server_ip,
            "-p",
            str(IPERF_PORT),
            name="iperf3-server",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.topo.log_tail("iperf3-server", 3).replace("\n", " | ")
                raise MeasureError(f"iperf3 server exited: {tail}")
            out = self.topo.run(
                self.ep.server_ns, "ss", "-Hltn", f"sport = :{IPERF_PORT}", check=False
            ).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise MeasureError("iperf3 server did not start listening within 10 s")

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.topo.stop(self.proc)
            self.proc = None


def iperf_run(
    topo: Topology, ep: Endpoints, args: list[str], duration: float, wrap: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the iperf3 client (under `wrap`, e.g. perf record, when given) in the client netns."""
    cmd = [
        *wrap,
        "iperf3",
        "-c",
        ep.server_ip,
        "-p",
        str(IPERF_PORT),
        "-t",
        f"{duration:g}",
        "-J",
        "--connect-timeout",
        "5000",
        *args,
    ]
    try:
        # a wrapper gets longer: perf record writes its data after iperf3 exits
        return topo.run(ep.client_ns, *cmd, check=False, timeout=duration + (60 if wrap else 20))
    except TopologyError as exc:
        raise MeasureError(f"iperf3 {' '.join(args) or 'tcp'}: {exc}") from None


def iperf_json(res: subprocess.CompletedProcess[str]) -> dict:
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise MeasureError(
            f"iperf3 gave no JSON: {detail[-1] if detail else res.returncode}"
        ) from None
    if "error" in data:
        raise MeasureError(f"iperf3: {data['error']}")
    return data


def _iperf_client(topo: Topology, ep: Endpoints, args: list[str], duration: float) -> dict:
    return iperf_json(iperf_run(topo, ep, args, duration))


def received(data: dict) -> tuple[float, int]:
    """(bits/s, bytes) the iperf3 receiver counted."""
    recv = data.get("end", {}).get("sum_received", {})
    bps, nbytes = recv.get("bits_per_second"), recv.get("bytes")
    if bps is None or nbytes is None:
        raise MeasureError("iperf3 JSON lacks end.sum_received")
    return float(bps), int(nbytes)


def read_cpu_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs): everything but idle+iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def read_process_cpu(pids: list[int]) -> float:
    """utime+stime (all threads) of the given processes, in seconds; gone ones count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / os.sysconf("SC_CLK_TCK")


def tcp(
    topo: Topology,
    ep: Endpoints,
    duration: float,
    streams: int = 1,
    forwarders: list[int] | None = None,
) -> TcpResult:
    args = ["-P", str(streams)] if streams > 1 else []
    cpu0 = read_cpu_busy()
    fwd0 = read_process_cpu(forwarders) if forwarders else 0.0
    data = _iperf_client(topo, ep, args, duration)
    cpu1 = read_cpu_busy()
    fwd1 = read_process_cpu(forwarders) if forwarders else 0.0
    bps, nbytes = received(data)
    return TcpResult(
        gbit_s=bps / 1e9,
        bytes=nbytes,
        cpu_s=cpu1 - cpu0,
        fwd_cpu_s=(fwd1 - fwd0) if forwarders else None,
    )


def udp_pps(topo: Topology, ep: Endpoints, duration: float) -> float:
    """Small-packet UDP sent as fast as the client can; returns packets/s that *arrived*."""
    data = _iperf_client(topo, ep, ["-u", "-l", str(UDP_PAYLOAD), "-b", "0"], duration)
    s = data.get("end", {}).get("sum_received") or data.get("end", {}).get("sum", {})
    try:
        received = int(s["packets"]) - int(s["lost_packets"])
        seconds = float(s["seconds"])
    except (KeyError, TypeError, ValueError):
        raise MeasureError("iperf3 UDP JSON lacks packets/lost_packets/seconds") from None
    return max(received, 0) / seconds if seconds > 0 else 0.0


_TIME_RE = re.compile(r"time=([0-9.]+) ms")


def parse_ping(output: str) -> list[float]:
    """Per-packet RTTs in microseconds from ping's per-reply lines."""
    return [float(m.group(1)) * 1000.0 for m in _TIME_RE.finditer(output)]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the p99 of 1000 samples is an actual sample, not a blend."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def rtt(topo: Topology, ep: Endpoints, count: int) -> tuple[float, float]:
    """(median, p99) round-trip time in µs over `count` pings 2 ms apart."""
    res = topo.run(
        ep.client_ns,
        "ping",
        "-n",
        "-i",
        "0.002",
        "-W",
        "1",
        "-c",
        str(count),
        ep.server_ip,
        check=False,
        timeout=count * 0.01 + 30,
    )
    samples = parse_ping(res.stdout)
    if len(samples) < max(1, count // 2):
        raise MeasureError(f"ping: only {len(samples)} of {count} replies")
    return percentile(samples, 50), percentile(samples, 99)

"""Experiment: how much of the udp path's round-trip time is thread wake-ups across CPUs.

Why: the udp path's median RTT is several times kernel vxlan's, and the suspected cause is
that every packet wakes a sleeping engine thread, which on an idle virtual CPU costs an
inter-processor interrupt and the halted vCPU's exit. Pinning tells the parts apart: with the
ping and both hosts' engines on one CPU, every wake-up is a plain context switch on a CPU that
is already running; with the engines on CPUs apart, every hop crosses CPUs.

Runs the bench's `udp` path (real daemons, real etcd) on a two-host `nic` topology, then ping
container to container (`ping -i 0.002`, 1000 packets) under each placement, and kernel vxlan
on its own topology for reference. Writes JSON. Run as root from the repository:

    .venv/bin/python bench/rtt_wakeups.py --json bench/results/experiments/rtt-wakeups.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

from fastlane.bench.datapaths import Context, fastlane_command, up
from fastlane.bench.lab.topology import Topology

COUNT = 1000


def threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def pin(pids: list[int], cpus: str) -> None:
    for pid in pids:
        for tid in threads(pid):
            subprocess.run(["taskset", "-p", "-c", cpus, str(tid)], check=True, capture_output=True)


def ping(netns: str, dest: str, cpus: str | None) -> dict[str, float]:
    """Median, 90th percentile and minimum of per-packet RTTs (the mean hides in outliers)."""
    cmd = ["ip", "netns", "exec", netns]
    if cpus is not None:
        cmd += ["taskset", "-c", cpus]
    cmd += ["ping", "-n", "-i", "0.002", "-c", str(COUNT), dest]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rtts = sorted(float(x) * 1000 for x in re.findall(r"time=([\d.]+) ms", out))
    if len(rtts) < COUNT // 2:
        raise RuntimeError(f"only {len(rtts)} replies of {COUNT}")
    return {
        "median_us": statistics.median(rtts),
        "p90_us": rtts[int(len(rtts) * 0.9)],
        "min_us": rtts[0],
        "replies": len(rtts),
    }


def run_path(path: str) -> dict[str, dict[str, float]]:
    ctx = Context(
        baseline_bin=None, flanneld_bin=None, fastlane_cmd=fastlane_command(), ready_timeout=30
    )
    out: dict[str, dict[str, float]] = {}
    with Topology(hosts=2, mtu=1500, underlay_kind="nic") as topo, up(topo, path, ctx) as ep:
        time.sleep(1)
        ping(ep.client_ns, ep.server_ip, None)  # warm up neighbours and routes
        engines = list(ctx.forwarder_pids)
        out["free"] = ping(ep.client_ns, ep.server_ip, None)
        if path == "udp":
            sender, receiver = engines
            pin(engines, "0")
            out["all_on_cpu0"] = ping(ep.client_ns, ep.server_ip, "0")
            pin([sender], "1")
            out["engines_apart_ping_cpu0"] = ping(ep.client_ns, ep.server_ip, "0")
            pin(engines, "0,1")
            out["free_again"] = ping(ep.client_ns, ep.server_ip, None)
        else:
            out["all_on_cpu0"] = ping(ep.client_ns, ep.server_ip, "0")
    return out


def _read(path: str) -> str | None:
    """A sysfs value, or None where this machine has no such file."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    doc = {
        "experiment": "rtt_wakeups",
        "command": "python bench/rtt_wakeups.py --json " + str(a.json),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpuidle_driver": _read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "guest_halt_poll_ns": _read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
        "ping": f"ping -n -i 0.002 -c {COUNT}, container to container, underlay nic MTU 1500",
        "paths": {path: run_path(path) for path in ("udp", "vxlan")},
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["paths"], indent=2))


if __name__ == "__main__":
    main()

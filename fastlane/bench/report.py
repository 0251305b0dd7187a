"""Turning samples into the bench's outputs: result rows, the table, the JSON file, the plot.

The JSON schema (docs/bench.md) is a contract for people who script around the bench, so rows
are flat and self-describing: one row per (path, underlay_mtu, metric).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fastlane

SCHEMA = "fastlane-bench/1"

METRICS: dict[str, tuple[str, str]] = {
    # metric: (unit, description)
    "tcp_1": ("Gbit/s", "TCP throughput, 1 stream (iperf3)"),
    "tcp_4": ("Gbit/s", "TCP throughput, 4 streams (iperf3 -P 4)"),
    "udp_pps": ("packets/s", "UDP packets/s delivered, 64-byte payload, unlimited rate"),
    "rtt_us": ("us", "round-trip time, median of ping -i 0.002"),
    "rtt_p99_us": ("us", "round-trip time, 99th percentile"),
    "cpu_s_per_gbit": ("s/Gbit", "whole-machine busy CPU seconds per Gbit moved (tcp_1 run)"),
    "fwd_cpu_s_per_gbit": ("s/Gbit", "CPU seconds of the userspace forwarders (daemons of all "
                                     "hosts) per Gbit moved (tcp_1 run); userspace paths only"),
}


class Results:
    """Samples keyed by (path, mtu, metric), in the order they were taken."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, int, str], list[float]] = {}
        self.errors: list[dict[str, Any]] = []

    def add(self, path: str, mtu: int, metric: str, value: float) -> None:
        self.samples.setdefault((path, mtu, metric), []).append(value)

    def error(self, path: str, mtu: int, message: str) -> None:
        self.errors.append({"path": path, "underlay_mtu": mtu, "error": message})

    def median(self, path: str, mtu: int, metric: str) -> float | None:
        vals = [v for v in self.samples.get((path, mtu, metric), []) if not math.isnan(v)]
        return statistics.median(vals) if vals else None

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (path, mtu, metric), vals in self.samples.items():
            good = [v for v in vals if not math.isnan(v)]
            if not good:
                continue
            out.append({
                "path": path,
                "underlay_mtu": mtu,
                "metric": metric,
                "median": statistics.median(good),
                "min": min(good),
                "max": max(good),
                "unit": METRICS[metric][0],
                "samples": good,
            })
        return out

    def ratios(self, mtus: Iterable[int]) -> list[dict[str, Any]]:
        """fastlane udp single stream against the other paths (issue 3's targets)."""
        out = []
        for mtu in mtus:
            udp = self.median("udp", mtu, "tcp_1")
            if udp is None:
                continue
            for other, target in (("vxlan", 0.6), ("underlay", None), ("baseline", 5.0),
                                  ("flanneld", None)):
                ref = self.median(other, mtu, "tcp_1")
                if ref:
                    out.append({"underlay_mtu": mtu, "metric": "tcp_1", "numerator": "udp",
                                "denominator": other, "ratio": udp / ref, "target": target})
        return out


def _first_line(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def environment(flanneld: Path | None = None) -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = None
    repo = Path(fastlane.__file__).resolve().parents[1]
    if (repo / ".git").exists():
        git = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
        # Figures from uncommitted code must say so: they belong to no commit.
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                 "fastlane", "csrc", "bench", "build.py"],
                                check=False, capture_output=True, text=True)
        if git and status.stdout.strip():
            git += "-dirty"
    versions = {
        "fastlane": fastlane.__version__,
        "fastlane_git": git,
        "python": platform.python_version(),
        "iperf3": _first_line(["iperf3", "--version"]),
        "etcd": _first_line(["etcd", "--version"]),
        "iproute2": _first_line(["ip", "-V"]),
        "gcc": _first_line(["gcc", "--version"]),
    }
    if flanneld is not None:
        versions["flanneld"] = _first_line([str(flanneld), "-version"])
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "hostname": platform.node(),
        "versions": versions,
    }


def write_json(path: Path, results: Results, env: dict[str, Any], config: dict[str, Any],
               interrupted: bool = False) -> None:
    doc = {
        "schema": SCHEMA,
        "environment": env,
        "config": config,
        "metrics": {k: {"unit": u, "description": d} for k, (u, d) in METRICS.items()},
        "results": results.rows(),
        "ratios": results.ratios(config.get("mtus", [])),
        "errors": results.errors,
        "complete": not interrupted and not results.errors,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# terminal table


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    if metric in ("tcp_1", "tcp_4"):
        return f"{v:.2f}"
    if metric == "udp_pps":
        return f"{v / 1000:.0f}k"
    if metric.startswith("rtt"):
        return f"{v:.0f}"
    return f"{v:.2f}"


def _cell(results: Results, path: str, mtu: int, metric: str) -> str:
    vals = [v for v in results.samples.get((path, mtu, metric), []) if not math.isnan(v)]
    if not vals:
        return "-"
    med = _fmt(statistics.median(vals), metric)
    if len(vals) == 1:
        return med
    return f"{med} ({_fmt(min(vals), metric)}-{_fmt(max(vals), metric)})"


def table(results: Results, mtus: list[int], paths: list[str]) -> str:
    head = ["MTU", "path", "tcp_1 Gbit/s", "tcp_4 Gbit/s", "udp pps", "rtt us", "p99 us",
            "CPU s/Gbit", "fwd CPU s/Gbit"]
    metrics = ["tcp_1", "tcp_4", "udp_pps", "rtt_us", "rtt_p99_us", "cpu_s_per_gbit",
               "fwd_cpu_s_per_gbit"]
    rows = [head]
    for mtu in mtus:
        for path in paths:
            if not any((path, mtu, m) in results.samples for m in metrics):
                failed = [e for e in results.errors if e["path"] == path and e["underlay_mtu"] == mtu]
                if failed:
                    rows.append([str(mtu), path, "failed"] + [""] * (len(head) - 3))
                continue
            rows.append([str(mtu), path] + [_cell(results, path, mtu, m) for m in metrics])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    ratios = results.ratios(mtus)
    if ratios:
        lines.append("")
        for ratio in ratios:
            tgt = ""
            if ratio["target"] is not None:
                ok = ratio["ratio"] >= ratio["target"]
                tgt = f"   (target >= {ratio['target']:g}x: {'met' if ok else 'NOT met'})"
            lines.append(f"MTU {ratio['underlay_mtu']}: udp tcp_1 = {ratio['ratio']:.3g}x "
                         f"{ratio['denominator']}{tgt}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the plot


def plot(path: Path, results: Results, mtus: list[int], paths: list[str], title: str) -> None:
    """Grouped bars per path (one colour per MTU), min-max as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("matplotlib missing: pip install matplotlib "
                           "(or install fastlane with its [bench] extra)") from None

    panels = [("tcp_1", "TCP, 1 stream (Gbit/s)", 1.0), ("tcp_4", "TCP, 4 streams (Gbit/s)", 1.0),
              ("udp_pps", "UDP 64 B delivered (kpps)", 1e-3),
              ("rtt_us", "RTT median, p99 marked (µs)", 1.0)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    width = 0.8 / max(1, len(mtus))
    xs = range(len(paths))
    for ax, (metric, label, scale) in zip(axes.flat, panels):
        for k, mtu in enumerate(mtus):
            meds, lo, hi, p99 = [], [], [], []
            for p in paths:
                vals = [v * scale for v in results.samples.get((p, mtu, metric), [])
                        if not math.isnan(v)]
                m = statistics.median(vals) if vals else 0.0
                meds.append(m)
                lo.append(m - min(vals) if vals else 0.0)
                hi.append(max(vals) - m if vals else 0.0)
                p99.append(results.median(p, mtu, "rtt_p99_us") or math.nan)
            pos = [x + (k - (len(mtus) - 1) / 2) * width for x in xs]
            bars = ax.bar(pos, meds, width, yerr=[lo, hi], capsize=3, label=f"MTU {mtu}")
            if metric == "rtt_us":
                ax.plot(pos, p99, "v", color=bars.patches[0].get_facecolor() if bars.patches
                        else None, markeredgecolor="black", label=f"p99, MTU {mtu}")
            for x, m in zip(pos, meds):
                if m:
                    ax.annotate(f"{m:.3g}", (x, m), ha="center", va="bottom", fontsize=7)
        if metric == "rtt_us":
            ax.set_yscale("log")  # p99 of a userspace path is 10-100x the kernel's median
        ax.set_title(label)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(paths)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


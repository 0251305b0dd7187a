"""Turning samples into the bench's outputs: result rows, the table, the JSON, the plot, and the
results document (Markdown rendered from the JSON alone).

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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import fastlane
from fastlane.bench.datapaths import IPV6_PATHS, family
from fastlane.bench.lab.topology import underlay_description
from fastlane.bench.profile import KINDS, WHO

SCHEMA = "fastlane-bench/1"

METRICS: dict[str, tuple[str, str]] = {
    # metric: (unit, description)
    "tcp_1": ("Gbit/s", "TCP throughput, 1 stream (iperf3)"),
    "tcp_4": ("Gbit/s", "TCP throughput, 4 streams (iperf3 -P 4)"),
    "udp_pps": ("packets/s", "UDP packets/s delivered, 64-byte payload, unlimited rate"),
    "rtt_us": ("us", "round-trip time, median of ping -i 0.002"),
    "rtt_p99_us": ("us", "round-trip time, 99th percentile"),
    "cpu_s_per_gbit": ("s/Gbit", "whole-machine busy CPU seconds per Gbit moved (tcp_1 run)"),
    "fwd_cpu_s_per_gbit": (
        "s/Gbit",
        "CPU seconds of the userspace forwarders (daemons of all "
        "hosts) per Gbit moved (tcp_1 run); userspace paths only",
    ),
}


#: what a row without "underlay" (a JSON written before the nic underlay existed) was run on
DEFAULT_UNDERLAY = "veth"


#: udp's single-stream targets against other paths, per underlay: where the project aims to be,
#: printed beside each ratio and recorded in the JSON with it
TCP1_TARGETS: dict[tuple[str, str], float] = {
    ("veth", "vxlan"): 0.8,
    ("nic", "vxlan"): 1.1,
    ("veth", "baseline"): 5.0,
}


class Results:
    """Samples keyed by (path, mtu, metric, underlay), in the order they were taken."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, int, str, str], list[float]] = {}
        self.errors: list[dict[str, Any]] = []
        self.profiles: list[dict[str, Any]] = []  # --profile: one entry per profiled path

    def add(
        self, path: str, mtu: int, metric: str, value: float, underlay: str = DEFAULT_UNDERLAY
    ) -> None:
        self.samples.setdefault((path, mtu, metric, underlay), []).append(value)

    def at(self, path: str, mtu: int, underlay: str) -> Callable[[str, float], None]:
        """add() with path, MTU and underlay fixed: add(metric, value)."""
        return lambda metric, value: self.add(path, mtu, metric, value, underlay)

    def error(self, path: str, mtu: int, message: str, underlay: str = DEFAULT_UNDERLAY) -> None:
        self.errors.append(
            {"path": path, "underlay": underlay, "underlay_mtu": mtu, "error": message}
        )

    def profile(
        self, path: str, mtu: int, summary: dict[str, Any], underlay: str = DEFAULT_UNDERLAY
    ) -> None:
        """The perf summary of one path's extra tcp_1 run (profile.summarise_profile)."""
        self.profiles.append(
            {"path": path, "family": family(path), "underlay": underlay, "underlay_mtu": mtu}
            | summary
        )

    def values(
        self, path: str, mtu: int, metric: str, underlay: str = DEFAULT_UNDERLAY
    ) -> list[float]:
        return [v for v in self.samples.get((path, mtu, metric, underlay), []) if not math.isnan(v)]

    def median(
        self, path: str, mtu: int, metric: str, underlay: str = DEFAULT_UNDERLAY
    ) -> float | None:
        vals = self.values(path, mtu, metric, underlay)
        return statistics.median(vals) if vals else None

    def underlays(self) -> list[str]:
        return list(
            dict.fromkeys([k[3] for k in self.samples] + [e["underlay"] for e in self.errors])
        )

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (path, mtu, metric, underlay), vals in self.samples.items():
            good = [v for v in vals if not math.isnan(v)]
            if not good:
                continue
            out.append(
                {
                    "path": path,
                    "family": family(path),
                    "underlay": underlay,
                    "underlay_mtu": mtu,
                    "metric": metric,
                    "median": statistics.median(good),
                    "min": min(good),
                    "max": max(good),
                    "unit": METRICS[metric][0],
                    "samples": good,
                }
            )
        return out

    def ratios(
        self, mtus: Iterable[int], underlays: Iterable[str] | None = None
    ) -> list[dict[str, Any]]:
        """fastlane udp single stream against the other paths; targets where udp has one."""
        out = []
        for underlay in self.underlays() if underlays is None else underlays:
            for mtu in mtus:
                udp = self.median("udp", mtu, "tcp_1", underlay)
                if udp is None:
                    continue
                for other in ("vxlan", "underlay", "baseline", "flanneld"):
                    target = TCP1_TARGETS.get((underlay, other))
                    ref = self.median(other, mtu, "tcp_1", underlay)
                    if ref:
                        out.append(
                            {
                                "underlay": underlay,
                                "underlay_mtu": mtu,
                                "metric": "tcp_1",
                                "numerator": "udp",
                                "denominator": other,
                                "ratio": udp / ref,
                                "target": target,
                            }
                        )
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


def _ratio_cell(num: dict[str, Any] | None, den: dict[str, Any] | None) -> str:
    """A table cell: num's median over den's as "1.23x", or "-" when either is missing or den
    is zero."""
    if num is None or den is None or not den["median"]:
        return "-"
    return f"{num['median'] / den['median']:.3g}x"


def dirty_files() -> list[str]:
    """The measured code's files that differ from the commit (empty outside a checkout)."""
    repo = Path(fastlane.__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return []
    res = subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "status",
            "--porcelain",
            "--",
            "fastlane",
            "csrc",
            "bench",
            "build.py",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    return [line[3:] for line in res.stdout.splitlines() if line[3:]]


def environment(flanneld: Path | None = None, underlays: Iterable[str] = ()) -> dict[str, Any]:
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
        if git and dirty_files():
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
        # the exact link settings of each underlay the run measured on
        "underlays": {kind: underlay_description(kind) for kind in underlays},
    }


def write_json(
    path: Path,
    results: Results,
    env: dict[str, Any],
    config: dict[str, Any],
    interrupted: bool = False,
) -> None:
    doc = {
        "schema": SCHEMA,
        "environment": env,
        "config": config,
        "metrics": {k: {"unit": u, "description": d} for k, (u, d) in METRICS.items()},
        "results": results.rows(),
        "ratios": results.ratios(config.get("mtus", []), config.get("underlays")),
        "errors": results.errors,
        "complete": not interrupted and not results.errors,
    }
    if config.get("profile"):
        doc["profile"] = results.profiles
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


def _cell(results: Results, path: str, mtu: int, metric: str, underlay: str) -> str:
    vals = results.values(path, mtu, metric, underlay)
    if not vals:
        return "-"
    med = _fmt(statistics.median(vals), metric)
    if len(vals) == 1:
        return med
    return f"{med} ({_fmt(min(vals), metric)}-{_fmt(max(vals), metric)})"


def table(
    results: Results, mtus: list[int], paths: list[str], underlays: list[str] | None = None
) -> str:
    underlays = results.underlays() if underlays is None else underlays
    head = [
        "underlay",
        "MTU",
        "path",
        "tcp_1 Gbit/s",
        "tcp_4 Gbit/s",
        "udp pps",
        "rtt us",
        "p99 us",
        "CPU s/Gbit",
        "fwd CPU s/Gbit",
    ]
    metrics = [
        "tcp_1",
        "tcp_4",
        "udp_pps",
        "rtt_us",
        "rtt_p99_us",
        "cpu_s_per_gbit",
        "fwd_cpu_s_per_gbit",
    ]
    names = 3  # left-aligned columns
    rows = [head]
    for underlay in underlays:
        for mtu in mtus:
            for path in paths:
                key = [underlay, str(mtu), path]
                if not any((path, mtu, m, underlay) in results.samples for m in metrics):
                    failed = [
                        e
                        for e in results.errors
                        if e["path"] == path
                        and e["underlay_mtu"] == mtu
                        and e["underlay"] == underlay
                    ]
                    if failed:
                        rows.append(key + ["failed"] + [""] * (len(head) - names - 1))
                    continue
                rows.append(key + [_cell(results, path, mtu, m, underlay) for m in metrics])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i < names else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=False))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    ratios = results.ratios(mtus, underlays)
    if ratios:
        lines.append("")
        for ratio in ratios:
            tgt = ""
            if ratio["target"] is not None:
                ok = ratio["ratio"] >= ratio["target"]
                tgt = f"   (target >= {ratio['target']:g}x: {'met' if ok else 'NOT met'})"
            lines.append(
                f"{ratio['underlay']}, MTU {ratio['underlay_mtu']}: udp tcp_1 = "
                f"{ratio['ratio']:.3g}x {ratio['denominator']}{tgt}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the plot


def plot(
    path: Path,
    results: Results,
    mtus: list[int],
    paths: list[str],
    title: str,
    underlays: list[str] | None = None,
) -> None:
    """Horizontal grouped bars: one group per path (its name on the y axis, where long names
    never overlap), one bar per (underlay, MTU), min-max as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "matplotlib missing: pip install matplotlib "
            "(or install fastlane with its [bench] extra)"
        ) from None

    underlays = results.underlays() if underlays is None else underlays
    series = [(u, m) for u in underlays for m in mtus]
    panels = [
        ("tcp_1", "TCP, 1 stream (Gbit/s)", 1.0),
        ("tcp_4", "TCP, 4 streams (Gbit/s)", 1.0),
        ("udp_pps", "UDP 64 B delivered (kpps)", 1e-3),
        ("rtt_us", "RTT median, p99 marked (µs)", 1.0),
    ]
    height = max(7.0, 2 * (1.0 + 0.13 * len(paths) * max(1, len(series))))
    fig, axes = plt.subplots(2, 2, figsize=(14, height))
    bar = 0.8 / max(1, len(series))
    ys = range(len(paths))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, label, scale) in zip(axes.flat, panels, strict=False):
        for k, (underlay, mtu) in enumerate(series):
            meds, lo, hi, p99 = [], [], [], []
            for p in paths:
                vals = [v * scale for v in results.values(p, mtu, metric, underlay)]
                m = statistics.median(vals) if vals else 0.0
                meds.append(m)
                lo.append(m - min(vals) if vals else 0.0)
                hi.append(max(vals) - m if vals else 0.0)
                p99.append(results.median(p, mtu, "rtt_p99_us", underlay) or math.nan)
            pos = [y + (k - (len(series) - 1) / 2) * bar for y in ys]
            colour = colours[k % len(colours)]
            ax.barh(
                pos,
                meds,
                bar,
                xerr=[lo, hi],
                capsize=2,
                color=colour,
                label=f"{underlay}, MTU {mtu}",
            )
            if metric == "rtt_us":
                ax.plot(
                    p99,
                    pos,
                    "v",
                    color=colour,
                    markeredgecolor="black",
                    markersize=4,
                    label=f"p99, {underlay}, MTU {mtu}",
                )
            for y, m, h in zip(pos, meds, hi, strict=False):
                if m:  # past the error bar, so the figure stays legible
                    ax.annotate(f" {m:.3g}", (m + h, y), ha="left", va="center", fontsize=6)
        if metric == "rtt_us":
            ax.set_xscale("log")  # p99 of a userspace path is 10-100x the kernel's median
        ax.set_title(label)
        ax.set_yticks(list(ys))
        ax.set_yticklabels(paths)
        ax.invert_yaxis()  # first path on top, as in the table
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.12)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the results document: Markdown rendered from a run's JSON and nothing else
#
# Why: figures copied into prose by hand drift from the run they came from. Every figure in the
# document comes from the JSON, and a test re-renders the committed document to keep it so.

#: udp's median is divided by the median of each of these paths (when the run has it)
RATIO_BASES = ("vxlan", "underlay", "baseline", "flanneld")


class ReportError(Exception):
    """The JSON cannot be read or is not a fastlane bench result (one-line message)."""


def document_name(json_name: str) -> str:
    """`full-run.json` -> `full-run.md`; never the JSON's own name."""
    p = Path(json_name)
    md = p.with_suffix(".md").name if p.suffix != ".md" else p.name + ".md"
    return md


def load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ReportError(f"{path} is not a fastlane bench result (schema {SCHEMA!r} expected)")
    return doc


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_cell(row: dict[str, Any], metric: str, repeat: int | None) -> str:
    med = _fmt(row["median"], metric)
    n = len(row.get("samples") or [])
    if n == 1 or (n == 0 and row["min"] == row["max"]):
        text = med
    else:
        text = f"{med} ({_fmt(row['min'], metric)}-{_fmt(row['max'], metric)})"
    if repeat is not None and n and n != repeat:
        text += f" [n={n}]"
    return text


def _command(config: dict[str, Any]) -> str:
    parts = ["fastlane bench"]
    if config.get("quick"):
        parts.append("--quick")
    if "hosts" in config:
        parts.append(f"--hosts {config['hosts']}")
    if config.get("underlays"):
        parts.append("--underlay " + ",".join(config["underlays"]))
    if config.get("mtus"):
        parts.append("--mtu " + ",".join(str(m) for m in config["mtus"]))
    if config.get("paths"):
        parts.append("--paths " + ",".join(config["paths"]))
    if "duration_s" in config:
        parts.append(f"--duration {config['duration_s']:g}")
    if "repeat" in config:
        parts.append(f"--repeat {config['repeat']}")
    if config.get("udp_queues", 1) != 1:
        parts.append(f"--udp-queues {config['udp_queues']}")
    if config.get("profile"):
        parts.append("--profile")
    if config.get("flanneld"):
        parts.append(f"--flanneld {config['flanneld']}")
    return " ".join(parts)


def _ordered(first: Iterable[Any], seen: Iterable[Any]) -> list[Any]:
    out = list(dict.fromkeys(first))
    out += [x for x in dict.fromkeys(seen) if x not in out]
    return out


def markdown(doc: dict[str, Any], json_name: str, plot_name: str | None = None) -> str:
    """The results document of one run: command, environment, table, ratios, errors.

    Only `doc` (the run's JSON) supplies figures; `json_name` and `plot_name` are file names
    for the links, relative to the document.
    """
    if (doc.get("config") or {}).get("control_plane"):
        from fastlane.bench import controlplane  # `fastlane bench --control-plane` results

        return controlplane.markdown(doc, json_name)
    env = doc.get("environment", {})
    config = doc.get("config", {})
    units = {
        m: (doc.get("metrics", {}).get(m) or {}).get("unit", METRICS.get(m, ("",))[0])
        for m in METRICS
    }
    rows = {
        (r["path"], r["underlay_mtu"], r["metric"], r.get("underlay", DEFAULT_UNDERLAY)): r
        for r in doc.get("results", [])
    }
    mtus = _ordered(config.get("mtus", []), (k[1] for k in rows))
    paths = _ordered(config.get("paths", []), (k[0] for k in rows))
    underlays = _ordered(config.get("underlays", []), (k[3] for k in rows))
    metrics = [m for m in METRICS if any(k[2] == m for k in rows)]
    repeat = config.get("repeat")
    errors = doc.get("errors", [])
    md_name = document_name(json_name)

    out = [f"# fastlane bench results: {Path(json_name).stem}", ""]
    out.append(
        f"Generated from [{json_name}]({json_name}) by "
        f"`fastlane bench --report {json_name} > {md_name}` (run in this directory). "
        "Do not edit by hand: every figure below comes from that JSON, and the test "
        "suite checks that this file is what the JSON renders to."
    )
    out.append("")
    if plot_name:
        out += [f"Plot: [{plot_name}]({plot_name}).", ""]

    out += [
        "## Run",
        "",
        "Equivalent command line (output options omitted):",
        "",
        f"    {_command(config)}",
        "",
    ]
    out += ["| field | value |", "|---|---|"]
    env_rows = [
        ("date", env.get("date")),
        ("kernel", env.get("kernel")),
        ("CPU", env.get("cpu_model")),
        ("CPUs", env.get("nproc")),
        ("hostname", env.get("hostname")),
    ]
    env_rows += [(name, v) for name, v in (env.get("versions") or {}).items()]
    out += [f"| {_md(k)} | {_md(v if v is not None else '-')} |" for k, v in env_rows]
    complete = doc.get("complete")
    out += [
        "",
        "Complete: "
        + (
            "yes, no errors."
            if complete and not errors
            else f"no, {len(errors)} error(s) (listed at the end)."
        ),
        "",
    ]

    out += ["## Underlays", ""]
    described = env.get("underlays") or {}
    for u in underlays:
        d = described.get(u)
        if d:
            out.append(
                f"- `{u}`: {_md(d.get('link', ''))}"
                + "".join(f"; {_md(k)}: `{_md(v)}`" for k, v in d.items() if k != "link")
            )
        else:
            out.append(
                f"- `{u}`: a plain veth pair between each host and the switch bridge "
                "(this JSON records no underlay, so it predates the choice: veth)"
            )
    out.append("")

    out += ["## Results", ""]
    what = "Median (min-max)"
    if repeat:
        what += f" of {repeat} repetition{'s' if repeat != 1 else ''}"
    out += [
        what + "; `[n=k]` marks a cell with fewer samples. udp_pps in thousands (k). The metrics:",
        "",
    ]
    for m in metrics:
        desc = (doc.get("metrics", {}).get(m) or {}).get("description") or METRICS[m][1]
        out.append(f"- `{m}` ({units[m]}): {_md(desc)}")
    out.append("")
    v6 = [p for p in paths if p in IPV6_PATHS]
    if v6:
        out += [
            "Paths ending in 6 ("
            + ", ".join(f"`{p}`" for p in v6)
            + ') carry IPv6 over the IPv6 underlay ("family": 6 in the JSON): an IPv6-only '
            "overlay, each encapsulated or routed to the peer's underlay IPv6 address.",
            "",
        ]
    sections = [(u, mtu) for u in underlays for mtu in mtus]
    for u, mtu in sections:
        out += [f"### Underlay {u}, MTU {mtu}", ""]
        out.append("| path | " + " | ".join(f"{m} ({units[m]})" for m in metrics) + " |")
        out.append("|---|" + "---:|" * len(metrics))
        for path in paths:
            if not any((path, mtu, m, u) in rows for m in metrics):
                failed = [
                    e
                    for e in errors
                    if e.get("path") == path
                    and e.get("underlay_mtu") == mtu
                    and e.get("underlay", DEFAULT_UNDERLAY) == u
                ]
                if failed:
                    head = str(failed[0].get("error", "")).splitlines()[0:1] or [""]
                    out.append(f"| {path} | failed: {_md(head[0])} |" + " |" * (len(metrics) - 1))
                continue
            cells = [
                _md_cell(rows[(path, mtu, m, u)], m, repeat) if (path, mtu, m, u) in rows else "-"
                for m in metrics
            ]
            out.append(f"| {path} | " + " | ".join(cells) + " |")
        out.append("")

    ratio_lines: list[str] = []
    for u, mtu in sections:
        bases = [
            b
            for b in RATIO_BASES
            if b != "udp"
            and any((b, mtu, m, u) in rows and ("udp", mtu, m, u) in rows for m in metrics)
        ]
        if not bases:
            continue
        ratio_lines += [f"### Ratios, underlay {u}, MTU {mtu}", ""]
        ratio_lines.append("| metric | " + " | ".join(f"udp / {b}" for b in bases) + " |")
        ratio_lines.append("|---|" + "---:|" * len(bases))
        for m in metrics:
            udp = rows.get(("udp", mtu, m, u))
            cells = []
            for b in bases:
                cells.append(_ratio_cell(udp, rows.get((b, mtu, m, u))))
            if any(c != "-" for c in cells):
                ratio_lines.append(f"| {m} | " + " | ".join(cells) + " |")
        ratio_lines.append("")
    if ratio_lines:
        out += [
            "## Ratios",
            "",
            "fastlane udp's median divided by the other path's median, same MTU and metric. "
            "Above 1 means udp's figure is the larger: better for throughput and packet "
            "rate, worse for RTT and CPU per Gbit.",
            "",
        ]
        out += ratio_lines
    if "veth" in underlays and "nic" in underlays:
        out += [
            "## nic against veth",
            "",
            (
                "Each path's median on the nic underlay divided by its median on veth, same "
                "MTU and metric: what the path loses (below 1 for throughput) or pays (above 1 "
                "for RTT and CPU) once frames on the wire are single packets of at most the "
                "MTU."
            ),
            "",
        ]
        for mtu in mtus:
            have = [
                m
                for m in metrics
                if any((p, mtu, m, "nic") in rows and (p, mtu, m, "veth") in rows for p in paths)
            ]
            if not have:
                continue
            out += [f"### nic / veth, MTU {mtu}", ""]
            out.append("| path | " + " | ".join(have) + " |")
            out.append("|---|" + "---:|" * len(have))
            for path in paths:
                cells = []
                for m in have:
                    cells.append(
                        _ratio_cell(
                            rows.get((path, mtu, m, "nic")), rows.get((path, mtu, m, "veth"))
                        )
                    )
                if any(c != "-" for c in cells):
                    out.append(f"| {path} | " + " | ".join(cells) + " |")
            out.append("")
    pairs = [(p, p[:-1]) for p in v6 if p[:-1] in paths]
    six_lines: list[str] = []
    for u, mtu in sections:
        have = [
            m
            for m in metrics
            if any((p6, mtu, m, u) in rows and (p4, mtu, m, u) in rows for p6, p4 in pairs)
        ]
        if not have:
            continue
        six_lines += [f"### IPv6 / IPv4, underlay {u}, MTU {mtu}", ""]
        six_lines.append("| paths | " + " | ".join(have) + " |")
        six_lines.append("|---|" + "---:|" * len(have))
        for p6, p4 in pairs:
            cells = []
            for m in have:
                cells.append(_ratio_cell(rows.get((p6, mtu, m, u)), rows.get((p4, mtu, m, u))))
            if any(c != "-" for c in cells):
                six_lines.append(f"| {p6} / {p4} | " + " | ".join(cells) + " |")
        six_lines.append("")
    if six_lines:
        out += [
            "## IPv6 against IPv4",
            "",
            "Each IPv6 path's median divided by its IPv4 counterpart's, same underlay, MTU "
            "and metric: the cost of the 20 extra header bytes and of the IPv6 stack.",
            "",
        ]
        out += six_lines
    targets = [r for r in doc.get("ratios", []) if r.get("target") is not None]
    if targets:
        out += ["Targets recorded in the JSON:", ""]
        for r in targets:
            ok = r["ratio"] >= r["target"]
            out.append(
                f"- {r.get('underlay', DEFAULT_UNDERLAY)}, MTU {r['underlay_mtu']}, "
                f"{r['metric']}: {r['numerator']} / "
                f"{r['denominator']} = {r['ratio']:.3g}x, target >= {r['target']:g}x: "
                f"{'met' if ok else 'NOT met'}"
            )
        out.append("")

    out += _profile_section(doc.get("profile") or [], errors, sections, paths)

    if errors:
        out += ["## Errors", ""]
        for e in errors:
            first = (str(e.get("error", "")).splitlines() or [""])[0]
            out.append(
                f"- {e.get('underlay', DEFAULT_UNDERLAY)}, MTU {e.get('underlay_mtu')}, "
                f"{e.get('path')}: {_md(first)}"
            )
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


PROFILE_HEADING = "## Where the CPU goes (perf, one extra tcp_1 run per path)"
#: the hottest symbols listed per path under each profile table (the JSON keeps more)
PROFILE_TOP = 5


def _profile_section(
    profiles: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    sections: list[tuple[str, int]],
    paths: list[str],
) -> list[str]:
    """--profile: per underlay and MTU, each path's samples by thread group and by kind of
    work, and its hottest symbols. Nothing for a run without profiles or profile errors."""
    at = {
        (p.get("underlay", DEFAULT_UNDERLAY), p.get("underlay_mtu"), p.get("path")): p
        for p in profiles
    }
    paths = _ordered(paths, (p.get("path") for p in profiles))
    tables: list[str] = []
    head = ["tcp_1 under perf (Gbit/s)", "samples"]
    head += [f"who: {w}" for w in WHO] + [f"kind: {k}" for k in KINDS]
    for u, mtu in sections:
        have = [p for p in paths if (u, mtu, p) in at or _profile_failure(errors, u, mtu, p)]
        if have:
            tables += _profile_table(u, mtu, have, at, errors, head)
    if not tables:
        return []
    return [
        PROFILE_HEADING,
        "",
        "After each path's repetitions, one more single-stream TCP run of the same duration ran "
        "under `perf record -a -g` (every CPU; it is not one of the tcp_1 samples). Each figure "
        "is a percentage of all samples of that run, idle CPUs included. `who` is the thread a "
        "sample ran in: the userspace forwarders (fastlane's daemon and engine threads `fl-*`, "
        "flanneld, the baseline forwarder), the applications (iperf3), the idle task (with the "
        "softirq work it ran) and everything else. `kind` is the code: data copies, checksums, "
        "the forwarders' own userspace code, the idle loop, the rest of the kernel and the rest "
        "of userspace. docs/bench.md lists what each group holds.",
        "",
        *_profile_events(profiles),
        *tables,
    ]


def _profile_events(profiles: list[dict[str, Any]]) -> list[str]:
    """Which event perf sampled: with the software clock of a VM (cpu-clock), work done with
    interrupts off shows up where they are turned back on."""
    events = list(dict.fromkeys(str(p["event"]) for p in profiles if p.get("event")))
    if not events:
        return []
    line = "Sampled event: " + ", ".join(f"`{_md(e)}`" for e in events) + "."
    if any(e.startswith("cpu-clock") for e in events):
        line += (
            " A software clock (no hardware counters, as in most VMs): work done with "
            "interrupts disabled is counted where they are enabled again "
            "(`_raw_spin_unlock_irqrestore`, `handle_softirqs`, ...)."
        )
    return [line, ""]


def _profile_table(
    underlay: str,
    mtu: int,
    paths: list[str],
    at: dict[tuple[Any, Any, Any], dict[str, Any]],
    errors: list[dict[str, Any]],
    head: list[str],
) -> list[str]:
    """One underlay and MTU: a row per path (or its profile's error), then its hottest
    symbols."""
    out = [f"### Profile, underlay {underlay}, MTU {mtu}", ""]
    out.append("| path | " + " | ".join(head) + " |")
    out.append("|---|" + "---:|" * len(head))
    hottest: list[str] = []
    threads: list[str] = []
    for path in paths:
        prof = at.get((underlay, mtu, path))
        if prof is None:
            why = _profile_failure(errors, underlay, mtu, path)
            out.append(f"| {path} | failed: {_md(why)} |" + " |" * (len(head) - 1))
            continue
        cells = [_fmt_opt(prof.get("tcp_1_gbit_s"), "{:.2f}"), str(prof.get("samples", "-"))]
        cells += [_fmt_opt((prof.get("by_who") or {}).get(w), "{:.1f}") for w in WHO]
        cells += [_fmt_opt((prof.get("by_kind") or {}).get(k), "{:.1f}") for k in KINDS]
        out.append(f"| {path} | " + " | ".join(cells) + " |")
        top = [
            f"`{_md(sym)}` ({_md(group)}) {pct:.1f}%"
            for group, sym, pct in (prof.get("top") or [])[:PROFILE_TOP]
        ]
        if top:
            hottest.append(f"- {path}: " + ", ".join(top))
        busy = [
            f"{_md(label)} {pct:.1f}%"
            for label, pct in prof.get("forwarder_threads") or []
            if round(pct, 1) > 0  # the daemons' idle helper threads say nothing
        ]
        if busy:
            cpus = prof.get("cpus")
            one = f" ({100 / cpus:.0f}% = one of {cpus} CPUs busy all the run)" if cpus else ""
            threads.append(f"- {path}{one}: " + ", ".join(busy))
    out.append("")
    if hottest:
        out += ["Hottest symbols (percent of all samples, thread group in parentheses):", ""]
        out += hottest + [""]
    if threads:
        out += [
            "Forwarder threads (percent of all samples; host0 sends the TCP data, host1 "
            "receives it):",
            "",
        ]
        out += threads + [""]
    return out


def _fmt_opt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _profile_failure(errors: list[dict[str, Any]], underlay: str, mtu: int, path: str) -> str:
    """The first line of this path's profile error ("" when its profile did not fail)."""
    for e in errors:
        text = str(e.get("error", ""))
        if (
            e.get("path") == path
            and e.get("underlay_mtu") == mtu
            and e.get("underlay", DEFAULT_UNDERLAY) == underlay
            and text.startswith("profile: ")
        ):
            return text.removeprefix("profile: ").splitlines()[0]
    return ""


def markdown_for(json_path: Path) -> str:
    """The document for a JSON file; links the PNG of the same name when it is next to it."""
    json_path = Path(json_path)
    doc = load(json_path)
    png = json_path.with_suffix(".png")
    return markdown(doc, json_path.name, png.name if png.exists() else None)


def write_markdown(json_path: Path) -> Path:
    """Write `<json stem>.md` next to the JSON; returns its path."""
    json_path = Path(json_path)
    out = json_path.with_name(document_name(json_path.name))
    text = markdown_for(json_path)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, out)
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out

"""`fastlane bench`: throughput and latency of overlay data paths on a namespace topology.

Why it exists: an operator deciding whether fastlane belongs on throughput-sensitive nodes needs
fastlane udp next to the alternatives (bare underlay, kernel VXLAN, host-gw, a flanneld-style
forwarder, optionally their own flanneld) measured in one run on the same machine, with the
spread visible and the CPU cost next to the speed. docs/bench.md describes paths and JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fastlane.bench import measure, profile, report
from fastlane.bench.datapaths import (
    ALL_PATHS,
    DEFAULT_PATHS,
    ETCD_PATHS,
    IPV6_PATHS,
    UNDERLAY6,
    Context,
    PathError,
    build_baseline,
    fastlane_command,
    up,
)
from fastlane.bench.lab.topology import (
    UNDERLAY_KINDS,
    Topology,
    TopologyError,
    cleanup_stale,
)
from fastlane.bench.progress import Progress

__all__ = ["main"]

MEASUREMENTS = ("rtt_us", "tcp_1", "tcp_4", "udp_pps")


class BenchError(RuntimeError):
    """Stops the whole bench; printed as one line (plus a log tail when there is one)."""


@dataclass
class Options:
    hosts: int
    mtus: list[int]
    paths: list[str]
    duration: float
    repeat: int
    json: Path | None
    plot: Path | None
    flanneld: Path | None
    quick: bool
    ready_timeout: float
    report: Path | None = None
    control_plane: bool = False
    leases: int = 10_000
    underlays: list[str] = dataclasses.field(default_factory=lambda: list(UNDERLAY_KINDS))
    udp_queues: int = 1
    profile: bool = False


# ---------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastlane bench",
        description="Measure TCP/UDP throughput, latency and CPU cost of overlay data paths "
        "between network-namespace hosts (needs root).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short run: 2 s per measurement, 1 repetition (unless given)",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        default="bench-results/fastlane-bench.json",
        help="write every sample and the environment here (default: %(default)s; '' for none)",
    )
    p.add_argument(
        "--plot",
        metavar="PATH",
        default="bench-results/fastlane-bench.png",
        help="write a PNG plot here (default: %(default)s; '' for none)",
    )
    p.add_argument("--hosts", type=int, default=2, metavar="N", help="hosts (default: 2)")
    p.add_argument(
        "--mtu",
        default="1500,9000",
        metavar="LIST",
        help="underlay MTUs, comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--underlay",
        metavar="LIST",
        default=",".join(UNDERLAY_KINDS),
        help="underlay links, comma-separated: veth (a plain veth pair: 64 KiB GSO "
        "frames cross whole) and/or nic (offloads off on the wire, GRO on "
        "receive, like a host's NIC) (default: %(default)s)",
    )
    p.add_argument(
        "--paths",
        metavar="LIST",
        default=None,
        help=f"data paths, comma-separated, from {','.join(ALL_PATHS)} "
        f"(default: {','.join(DEFAULT_PATHS)}, plus flanneld with --flanneld; the IPv6 "
        "paths, ending in 6, run over an IPv6 underlay)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="seconds per measurement (default: 5, --quick: 2)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help="repetitions per measurement (default: 3, --quick: 1)",
    )
    p.add_argument(
        "--flanneld",
        metavar="PATH",
        default=None,
        help="also measure this flanneld binary (udp backend) on the same topology",
    )
    p.add_argument(
        "--udp-queues",
        type=int,
        default=None,
        metavar="N",
        help="Backend.Queues of the udp path's daemons: TUN queues, one engine worker "
        "each, up to the engine's limit (default: 1)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after each path's repetitions, one extra tcp_1 run under perf record -a -g "
        "(not counted in tcp_1): where the CPU goes, by thread and by kind of work, in the "
        "JSON's profile and the results document (needs perf: apt-get install -y linux-perf)",
    )
    p.add_argument(
        "--report",
        metavar="JSON",
        default=None,
        help="print the Markdown results document of an earlier run's JSON and "
        "exit (measures nothing, needs no root); every run also writes it "
        "next to its --json as <name>.md",
    )
    p.add_argument(
        "--control-plane",
        action="store_true",
        help="measure the control plane instead: N leases in etcd, table sync, "
        "memory, route swaps, new-peer latency and 100 lease changes/s for "
        "--duration seconds (default 30); writes --json (default "
        "bench-results/control-plane.json)",
    )
    p.add_argument(
        "--leases",
        type=int,
        default=10_000,
        metavar="N",
        help="--control-plane: leases written into etcd (default: %(default)s)",
    )
    p.add_argument("--ready-timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    return p


def _usage_error(parser: argparse.ArgumentParser, msg: str) -> None:
    parser.error(msg)  # one line + usage, exit 2


def _control_plane_options(parser: argparse.ArgumentParser, a: argparse.Namespace) -> Options:
    from fastlane.bench import controlplane

    duration = a.duration if a.duration is not None else 30.0
    if math.isnan(duration):
        _usage_error(parser, "--duration: not a number")
    why = controlplane.check_sizes(a.leases, duration)
    if why:
        _usage_error(parser, why)
    repeat = a.repeat if a.repeat is not None else 3
    if not 1 <= repeat <= 100:
        _usage_error(parser, f"--repeat: {repeat} is outside 1..100")
    json_path = a.json
    if json_path == parser.get_default("json"):
        json_path = "bench-results/control-plane.json"
    return Options(
        hosts=3,
        mtus=[],
        paths=[],
        duration=duration,
        repeat=repeat,
        json=Path(json_path) if json_path else None,
        plot=None,
        flanneld=None,
        quick=False,
        ready_timeout=a.ready_timeout,
        control_plane=True,
        leases=a.leases,
    )


def parse_args(argv: list[str]) -> Options:
    parser = _parser()
    a = parser.parse_args(argv)
    mtus: list[int] = []
    for part in a.mtu.split(","):
        try:
            m = int(part)
        except ValueError:
            _usage_error(parser, f"--mtu: {part!r} is not a number")
        if not 576 <= m <= 65535:
            _usage_error(parser, f"--mtu: {m} is outside 576..65535")
        if m not in mtus:
            mtus.append(m)
    underlays: list[str] = []
    for part in (x.strip() for x in a.underlay.split(",")):
        if part not in UNDERLAY_KINDS:
            _usage_error(
                parser,
                f"--underlay: unknown underlay {part!r} (known: {', '.join(UNDERLAY_KINDS)})",
            )
        if part not in underlays:
            underlays.append(part)
    if a.paths is None:
        paths = list(DEFAULT_PATHS) + (["flanneld"] if a.flanneld else [])
    else:
        paths = []
        for name in (x.strip() for x in a.paths.split(",")):
            if name not in ALL_PATHS:
                _usage_error(
                    parser, f"--paths: unknown path {name!r} (known: {', '.join(ALL_PATHS)})"
                )
            if name not in paths:
                paths.append(name)
    if "flanneld" in paths and not a.flanneld:
        _usage_error(parser, "--paths flanneld needs --flanneld PATH")
    flanneld = None
    if a.flanneld:
        flanneld = Path(a.flanneld).resolve()
        if not (flanneld.is_file() and os.access(flanneld, os.X_OK)):
            _usage_error(parser, f"--flanneld: {a.flanneld} is not an executable file")
    if not 2 <= a.hosts <= 50:
        _usage_error(parser, f"--hosts: {a.hosts} is outside 2..50")
    if a.control_plane:
        for flag, given in (("--udp-queues", a.udp_queues is not None), ("--profile", a.profile)):
            if given:
                _usage_error(parser, f"{flag} measures the data plane: not with --control-plane")
        return _control_plane_options(parser, a)
    udp_queues = 1
    if a.udp_queues is not None:
        from fastlane.engine import MAX_QUEUES  # the C extension: only when the option is given

        udp_queues = a.udp_queues
        if not 1 <= udp_queues <= MAX_QUEUES:
            _usage_error(parser, f"--udp-queues: {udp_queues} is outside 1..{MAX_QUEUES}")
    duration = a.duration if a.duration is not None else (2.0 if a.quick else 5.0)
    if not (1 <= duration <= 3600) or math.isnan(duration):
        _usage_error(parser, f"--duration: {duration:g} is outside 1..3600 seconds")
    if duration != int(duration):  # iperf3 3.12 reads -t as an integer: 0.5 would run forever
        _usage_error(parser, f"--duration: {duration:g} is not a whole number of seconds")
    repeat = a.repeat if a.repeat is not None else (1 if a.quick else 3)
    if not 1 <= repeat <= 100:
        _usage_error(parser, f"--repeat: {repeat} is outside 1..100")
    return Options(
        hosts=a.hosts,
        mtus=mtus,
        paths=paths,
        duration=duration,
        repeat=repeat,
        json=Path(a.json) if a.json else None,
        plot=Path(a.plot) if a.plot else None,
        flanneld=flanneld,
        quick=a.quick,
        ready_timeout=a.ready_timeout,
        report=Path(a.report) if a.report else None,
        underlays=underlays,
        udp_queues=udp_queues,
        profile=a.profile,
    )


# ---------------------------------------------------------------------------------------------
# checks before anything is created


def preflight(opts: Options) -> None:
    if os.geteuid() != 0:
        raise BenchError("must run as root (it builds network namespaces): sudo fastlane bench")
    need_tun = any(p in opts.paths for p in ("udp", "baseline", "flanneld"))
    if need_tun and not os.path.exists("/dev/net/tun"):
        raise BenchError(
            "/dev/net/tun is missing: load the tun module (modprobe tun) "
            "or give the container --device /dev/net/tun"
        )
    tools = [("ip", "iproute2"), ("ss", "iproute2"), ("iperf3", "iperf3"), ("ping", "iputils-ping")]
    if {"vxlan", "vxlan6"} & set(opts.paths):
        tools.append(("bridge", "iproute2"))
    if ETCD_PATHS & set(opts.paths):
        tools += [("etcd", "etcd-server"), ("etcdctl", "etcd-client")]
    if "baseline" in opts.paths:
        tools.append(("gcc", "gcc"))
    if "nic" in opts.underlays:
        tools.append(("ethtool", "ethtool"))
    if opts.profile:
        tools.append(("perf", profile.PERF_PACKAGE))
    missing = sorted({pkg for tool, pkg in tools if shutil.which(tool) is None})
    if missing:
        names = [t for t, p in tools if p in missing and shutil.which(t) is None]
        raise BenchError(f"{', '.join(names)} not found: apt-get install -y {' '.join(missing)}")
    if opts.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError(
                "matplotlib is missing (needed for --plot): "
                "pip install 'fastlane[bench]' or pass --plot ''"
            ) from None


def preflight_control_plane() -> None:
    if os.geteuid() != 0:
        raise BenchError(
            "must run as root (it builds network namespaces): sudo fastlane bench --control-plane"
        )
    if not os.path.exists("/dev/net/tun"):
        raise BenchError(
            "/dev/net/tun is missing: load the tun module (modprobe tun) "
            "or give the container --device /dev/net/tun"
        )
    tools = [("ip", "iproute2"), ("etcd", "etcd-server"), ("etcdctl", "etcd-client")]
    missing = [(t, p) for t, p in tools if shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"{', '.join(t for t, _ in missing)} not found: apt-get install -y "
            f"{' '.join(sorted({p for _, p in missing}))}"
        )


# ---------------------------------------------------------------------------------------------
# running


def _label(underlay: str, mtu: int, path: str, what: str, rep: int, repeat: int, width: int) -> str:
    r = f" rep {rep + 1}/{repeat}" if repeat > 1 else ""
    return f"{underlay:<4} MTU {mtu:<5} {path:<{width}} {what:<7}{r}"


def _measure_path(
    opts: Options,
    underlay: str,
    mtu: int,
    path: str,
    ctx: Context,
    results: report.Results,
    progress: Progress,
    tmp: Path,
) -> None:
    underlay6 = UNDERLAY6 if path in IPV6_PATHS else None
    with Topology(hosts=opts.hosts, mtu=mtu, underlay_kind=underlay, underlay6=underlay6) as topo:
        width = max(9, *(len(p) for p in opts.paths))
        progress.start(_label(underlay, mtu, path, "setting up", 0, 1, width))
        with up(topo, path, ctx) as ep:
            server = measure.IperfServer(topo, ep)
            server.start()
            progress.finish("ready", count=False)
            count = max(50, min(5000, int(opts.duration * 250)))
            for rep in range(opts.repeat):
                for what in MEASUREMENTS:
                    progress.start(_label(underlay, mtu, path, what, rep, opts.repeat, width))
                    try:
                        text = _one(
                            topo,
                            ep,
                            what,
                            opts.duration,
                            count,
                            results.at(path, mtu, underlay),
                            ctx.forwarder_pids,
                        )
                    except measure.MeasureError as exc:
                        results.error(path, mtu, f"{what}: {exc}", underlay)
                        progress.finish(f"failed: {exc}")
                        server.restart()  # a timed-out client can leave the server stuck
                        continue
                    progress.finish(text)
                    if what == "udp_pps":
                        time.sleep(0.5)  # let the flood's queues drain before the next RTT
            if opts.profile:  # after the repetitions, so it never disturbs them
                progress.start(_label(underlay, mtu, path, "profile", 0, 1, width))
                data = tmp / f"perf-{underlay}-{mtu}-{path}.data"
                try:
                    summary = _profile(topo, ep, ctx.forwarder_pids, opts.duration, data)
                except measure.MeasureError as exc:  # e.g. perf not allowed to record
                    results.error(path, mtu, f"profile: {exc}", underlay)
                    progress.finish(f"failed: {exc}")
                    server.restart()
                    return
                results.profile(path, mtu, summary, underlay)
                progress.finish(_profile_text(summary))


def _profile(
    topo: Topology, ep: measure.Endpoints, forwarders: list[int], duration: float, data: Path
) -> dict[str, Any]:
    """--profile: one extra tcp_1 run under perf, kept out of the tcp_1 samples because perf
    slows every CPU down; summarised with the forwarders' threads told apart from any other
    process of the same name."""
    prof = profile.profile_tcp(topo, ep, duration, data)
    labels = profile.thread_labels(forwarders)
    summary = profile.summarise_profile(prof.rows, set(labels))
    threads = profile.forwarder_threads(prof.rows, labels)
    return {
        "tcp_1_gbit_s": prof.gbit_s,
        "event": prof.event,
        "cpus": os.cpu_count(),
        **summary,
        "forwarder_threads": threads,
    }


def _profile_text(summary: dict[str, Any]) -> str:
    who, kinds = summary["by_who"], summary["by_kind"]
    return (
        f"{summary['tcp_1_gbit_s']:.2f} Gbit/s under perf; "
        + ", ".join(f"{k} {who[k]:.0f}%" for k in profile.WHO)
        + "; "
        + ", ".join(f"{k} {kinds[k]:.0f}%" for k in profile.KINDS)
    )


def _one(
    topo: Topology,
    ep: measure.Endpoints,
    what: str,
    duration: float,
    count: int,
    add: Callable[[str, float], None],
    forwarders: list[int],
) -> str:
    if what == "rtt_us":
        med, p99 = measure.rtt(topo, ep, count)
        add("rtt_us", med)
        add("rtt_p99_us", p99)
        return f"{med:.0f} us median, {p99:.0f} us p99"
    if what in ("tcp_1", "tcp_4"):
        r = measure.tcp(topo, ep, duration, 1 if what == "tcp_1" else 4, forwarders)
        add(what, r.gbit_s)
        if what == "tcp_1":
            add("cpu_s_per_gbit", r.cpu_s_per_gbit)
            fwd = r.fwd_cpu_s_per_gbit
            if fwd is not None:
                add("fwd_cpu_s_per_gbit", fwd)
                return (
                    f"{r.gbit_s:.2f} Gbit/s, {r.cpu_s_per_gbit:.2f} CPU s/Gbit "
                    f"({fwd:.2f} in forwarders)"
                )
            return f"{r.gbit_s:.2f} Gbit/s, {r.cpu_s_per_gbit:.2f} CPU s/Gbit"
        return f"{r.gbit_s:.2f} Gbit/s"
    pps = measure.udp_pps(topo, ep, duration)
    add("udp_pps", pps)
    return f"{pps / 1000:.0f} kpps delivered"


def run(opts: Options) -> int:
    preflight(opts)
    stale = cleanup_stale()
    out = sys.stderr
    if stale:
        print(f"removed {len(stale)} namespaces left by an earlier, killed run", file=out)
    per_path = opts.repeat * len(MEASUREMENTS) + int(opts.profile)
    total = len(opts.underlays) * len(opts.mtus) * len(opts.paths) * per_path
    print(
        f"fastlane bench: {opts.hosts} hosts, underlay {','.join(opts.underlays)}, "
        f"MTU {','.join(map(str, opts.mtus))}, paths "
        f"{','.join(opts.paths)}, {opts.duration:g} s x {opts.repeat} per measurement"
        + (f", udp queues {opts.udp_queues}" if opts.udp_queues != 1 else "")
        + (", profiled with perf" if opts.profile else ""),
        file=out,
    )
    env = report.environment(opts.flanneld, opts.underlays)
    results = report.Results()
    progress = Progress(total, out)
    tmp = Path(tempfile.mkdtemp(prefix="fastlane-bench-"))
    try:
        baseline_bin = None
        if "baseline" in opts.paths:
            try:
                baseline_bin = build_baseline(tmp)
            except PathError as exc:
                raise BenchError(str(exc)) from None
        for underlay, mtu, path in itertools.product(opts.underlays, opts.mtus, opts.paths):
            ctx = Context(
                baseline_bin=baseline_bin,
                flanneld_bin=opts.flanneld,
                fastlane_cmd=fastlane_command(),
                ready_timeout=opts.ready_timeout,
                udp_queues=opts.udp_queues,
            )
            before = progress.done
            try:
                _measure_path(opts, underlay, mtu, path, ctx, results, progress, tmp)
            except (PathError, TopologyError, measure.MeasureError) as exc:
                first, _, rest = str(exc).partition("\n")
                results.error(path, mtu, str(exc), underlay)
                progress.finish(f"FAILED: {first}", count=False)
                if rest:
                    progress.note("\n".join("    " + ln for ln in rest.splitlines()))
                progress.skip(per_path - (progress.done - before))
    finally:
        progress.close()
        shutil.rmtree(tmp, ignore_errors=True)

    config = {
        "hosts": opts.hosts,
        "underlays": opts.underlays,
        "mtus": opts.mtus,
        "paths": opts.paths,
        "duration_s": opts.duration,
        "repeat": opts.repeat,
        "quick": opts.quick,
        "flanneld": str(opts.flanneld) if opts.flanneld else None,
        "udp_queues": opts.udp_queues,
        "profile": opts.profile,
    }
    print(file=sys.stdout)
    print(report.table(results, opts.mtus, opts.paths, opts.underlays), file=sys.stdout)
    if opts.json is not None:
        report.write_json(opts.json, results, env, config)
        print(f"\nJSON: {opts.json}", file=sys.stdout)
    if opts.plot is not None:
        title = (
            f"fastlane bench — {env.get('cpu_model') or 'unknown CPU'}, {env['nproc']} CPUs, "
            f"kernel {env['kernel']}, {env['date'][:10]}"
        )
        try:
            report.plot(opts.plot, results, opts.mtus, opts.paths, title, opts.underlays)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        print(f"plot: {opts.plot}", file=sys.stdout)
    if opts.json is not None:
        # after the plot, so the document links it when it sits next to the JSON
        try:
            print(f"results document: {report.write_markdown(opts.json)}", file=sys.stdout)
        except report.ReportError as exc:
            raise BenchError(str(exc)) from None
    if results.errors:
        print(
            f"\n{len(results.errors)} error(s); see above"
            + (f" and 'errors' in {opts.json}" if opts.json else ""),
            file=sys.stdout,
        )
        return 1
    return 0


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastlane bench` (routed here by fastlane.cli)."""
    opts = parse_args(list(sys.argv[1:] if argv is None else argv))
    if opts.report is not None:
        try:
            sys.stdout.write(report.markdown_for(opts.report))
        except report.ReportError as exc:
            print(f"fastlane bench: {exc}", file=sys.stderr)
            return 1
        return 0
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _sigterm)  # SIGTERM cleans up like Ctrl-C
    except ValueError:
        pass  # not the main thread
    try:
        if opts.control_plane:
            from fastlane.bench import controlplane

            preflight_control_plane()
            try:
                return controlplane.run(opts.leases, opts.duration, opts.repeat, opts.json)
            except controlplane.ControlPlaneError as exc:
                raise BenchError(str(exc)) from None
        return run(opts)
    except KeyboardInterrupt:
        print(
            "\nfastlane bench: interrupted; namespaces, daemons and etcd were removed",
            file=sys.stderr,
        )
        return 130
    except (BenchError, TopologyError) as exc:
        print(f"fastlane bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)

"""Where the CPU goes: one single-stream TCP run under `perf record -a -g` (--profile),
summarised by whose thread ran and by what kind of work it was.

Why system-wide: a userspace forwarder's cost is spread over its own threads, the kernel work
its syscalls do (TUN and socket copies), and softirq work that lands on whatever CPU receives
the packet. Only a profile of every CPU shows all of it next to the kernel paths' own work.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fastlane.bench.lab.topology import Topology
from fastlane.bench.measure import Endpoints, MeasureError, iperf_json, iperf_run, received

PERF_PACKAGE = "linux-perf"  # Debian's package of /usr/bin/perf
#: `perf report` columns: tab-separated, one line per (thread, DSO, symbol); "pid" is the
#: thread's id and name ("1234:fl-txrx0"), which tells the bench's forwarders from any other
#: process of the same name on the machine
PERF_FIELDS = "overhead,sample,pid,comm,dso,sym"
#: header names of those columns (perf report's "#" line) -> PerfRow fields
_PERF_HEADER = {
    "Overhead": "overhead",
    "Samples": "samples",
    "Pid:Command": "tid",
    "Command": "comm",
    "Shared Object": "dso",
    "Symbol": "sym",
}
TOP_SYMBOLS = 15

#: by_who groups, in the order the JSON and the document list them
WHO = ("forwarders", "applications", "idle", "other")
#: by_kind groups, likewise
KINDS = ("copy", "checksum", "forwarder_user", "idle", "kernel_other", "user_other")

#: thread names of the userspace forwarders: the fastlane daemon (its engine threads are fl-*),
#: flanneld, and the baseline forwarder (the binary build_baseline() writes)
FORWARDER_COMMS = frozenset({"fastlane", "flanneld", "baseline_fwd"})
FORWARDER_THREAD_PREFIX = "fl-"  # fl-txrx0, fl-tx<N>, fl-rx (csrc/engine.c)
APPLICATION_COMMS = frozenset({"iperf3"})
IDLE_COMM = "swapper"  # the idle task, pid 0 on every CPU

# the halt/idle loop's own functions (not helpers such as idle_cpu() that busy code calls)
_IDLE_SYM = re.compile(
    r"safe_halt|^(default|arch_cpu|cpu|intel|acpi|poll|mwait|amd_e400|do)_idle|^cpuidle_"
    r"|^tick_nohz_idle_|^cpu_startup_entry$"
)
# data copies, kernel (iov_iter, user copies, page copies) and user (libc memcpy/memmove)
_COPY_SYM = re.compile(
    r"copy_(to|from)_iter|copy_page|copy_user|copyout|copyin|copy_mc_|rep_movs|memcpy|memmove"
    r"|csum_partial_copy|csum_and_copy_"
)
# checksums that do not copy: csum_partial, do_csum, skb_checksum, the engine's fl_csum_* ...
_CHECKSUM_SYM = re.compile(r"csum|checksum|sum64")


class PerfRow(NamedTuple):
    """One line of `perf report`: the samples of one symbol in one DSO under one thread name."""

    comm: str
    dso: str
    sym: str
    percent: float  # of all samples of the recording
    kernel: bool = False  # perf's [k]: kernel code (the kernel image or a module)
    samples: int = 0
    tid: int | None = None  # the thread, when perf reported it


def is_forwarder(row: PerfRow, ours: Collection[int] | None = None) -> bool:
    """A forwarder's thread, by name; with `ours` (the thread ids of the forwarders the bench
    started), only those: a daemon of the same name elsewhere on the machine is "other"."""
    named = row.comm in FORWARDER_COMMS or row.comm.startswith(FORWARDER_THREAD_PREFIX)
    return named and (ours is None or row.tid is None or row.tid in ours)


def who(row: PerfRow, ours: Collection[int] | None = None) -> str:
    """Whose thread a sample ran in: one of WHO."""
    if is_forwarder(row, ours):
        return "forwarders"
    if row.comm in APPLICATION_COMMS:
        return "applications"
    if row.comm == IDLE_COMM or is_idle(row):
        return "idle"
    return "other"


def is_idle(row: PerfRow) -> bool:
    return row.kernel and _IDLE_SYM.search(row.sym) is not None


def kind(row: PerfRow, ours: Collection[int] | None = None) -> str:
    """What kind of work a sample was: one of KINDS. Copies and checksums first, wherever
    they run (a forwarder's memcpy is a copy), then a forwarder's own userspace code."""
    if is_idle(row):
        return "idle"
    if _COPY_SYM.search(row.sym):
        return "copy"
    if _CHECKSUM_SYM.search(row.sym):
        return "checksum"
    if row.kernel:
        return "kernel_other"
    if is_forwarder(row, ours):
        return "forwarder_user"
    return "user_other"


def symbol_name(row: PerfRow) -> str:
    """The symbol, or `? (dso)` for an address perf could not resolve (all of a DSO's
    unresolved addresses then add up to one entry of the top list)."""
    if not row.sym or row.sym.startswith("0x"):
        return f"? ({row.dso})"
    return row.sym


def summarise_profile(
    rows: Sequence[PerfRow], ours: Collection[int] | None = None, top: int = TOP_SYMBOLS
) -> dict[str, Any]:
    """The JSON's profile figures: percent of all samples by thread group and by kind of work,
    the hottest symbols per thread group, and the sample count. Every row lands in exactly one
    bucket of each grouping, so each grouping adds up to the rows' total. `ours`: see
    is_forwarder()."""
    by_who = dict.fromkeys(WHO, 0.0)
    by_kind = dict.fromkeys(KINDS, 0.0)
    hot: dict[tuple[str, str], float] = {}
    for row in rows:
        group = who(row, ours)
        by_who[group] += row.percent
        by_kind[kind(row, ours)] += row.percent
        key = (group, symbol_name(row))
        hot[key] = hot.get(key, 0.0) + row.percent
    hottest = sorted(hot.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {
        "samples": sum(r.samples for r in rows),
        "by_who": by_who,
        "by_kind": by_kind,
        "top": [[group, sym, pct] for (group, sym), pct in hottest],
    }


def parse_perf_report(text: str) -> list[PerfRow]:
    """Rows of `perf report -F ... -t '\\t'`, columns found by the header line (PERF_FIELDS'
    order without one). Percentages are recomputed from the sample counts (perf prints two
    decimals); lines that are not rows (comments, blank, anything malformed) are skipped."""
    columns = list(_PERF_HEADER.values())  # PERF_FIELDS' order
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            names = [c.strip() for c in line.lstrip("#").split("\t")]
            if "Overhead" in names and all(n in _PERF_HEADER for n in names):
                columns = [_PERF_HEADER[n] for n in names]
            continue
        row = _perf_row(line, columns)
        if row is not None:
            rows.append(row)
    total = sum(r.samples for r in rows)
    if total:
        rows = [r._replace(percent=100.0 * r.samples / total) for r in rows]
    return rows


def _perf_row(line: str, columns: list[str]) -> PerfRow | None:
    parts = line.split("\t")
    if len(parts) < len(columns) or not line.strip():
        return None
    last = len(columns) - 1  # the last column keeps any tab of its own
    values = [p.strip() for p in parts[:last]] + ["\t".join(parts[last:]).strip()]
    f = dict(zip(columns, values, strict=True))
    try:
        percent = float(f.get("overhead", "0%").rstrip("%"))
        samples = int(f.get("samples", "0"))
        tid = int(f["tid"].split(":", 1)[0]) if "tid" in f else None
    except ValueError:
        return None
    comm, dso, sym = f.get("comm", ""), f.get("dso", ""), f.get("sym", "")
    if not comm and "tid" in f:  # no Command column: the name after "tid:"
        comm = f["tid"].partition(":")[2]
    marker, _, name = sym.partition(" ")
    if len(marker) == 3 and marker[0] == "[" and marker[2] == "]":  # [k] kernel, [.] user
        kernel, sym = marker[1] in "kg", name.strip()
    else:
        kernel = dso.startswith("[kernel")
    return PerfRow(comm, dso, sym, percent, kernel, samples, tid)


_EVENT_RE = re.compile(r"^# Samples: .* of event '([^']+)'", re.MULTILINE)


def perf_event(text: str) -> str | None:
    """The sampled event perf report names in its header ("cpu-clock:pppH" in a VM without
    hardware counters, "cycles:P" with them): it decides how samples are attributed."""
    m = _EVENT_RE.search(text)
    return m.group(1) if m else None


def perf_failure(stderr: str, returncode: int) -> str:
    """One line for a perf that did not record: its first message, plus the
    perf_event_paranoid setting when perf names it (the usual cause)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("[ perf record")]
    head = next((ln for ln in lines if ln.rstrip(":").lower() != "error"), None)
    msg = head.rstrip(".") if head else f"exit status {returncode}"
    paranoid = next((ln for ln in lines if ln.startswith("perf_event_paranoid setting is")), None)
    if paranoid and paranoid not in msg:
        msg += f" ({paranoid.rstrip(':')})"
    return f"perf record failed: {msg}"


def perf_report(data: Path) -> tuple[list[PerfRow], str | None]:
    """Self time of every (thread, DSO, symbol) in a recording, call graphs folded, and the
    sampled event."""
    cmd = [
        *("perf", "report", "-i", str(data), "--no-children", "--sort", "pid,comm,dso,sym"),
        *("-F", PERF_FIELDS, "-g", "none", "--percent-limit", "0", "--stdio", "-t", "\t"),
    ]
    try:
        res = subprocess.run(
            cmd, check=False, capture_output=True, text=True, errors="replace", timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MeasureError(f"perf report: {exc}") from None
    rows = parse_perf_report(res.stdout)
    if res.returncode != 0 or not rows:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise MeasureError(
            f"perf report gave no samples: {detail[-1] if detail else res.returncode}"
        )
    return rows, perf_event(res.stdout)


def thread_labels(pids: Sequence[int]) -> dict[int, str]:
    """Thread id -> "host<i> <thread name>" for the forwarder of each host (pids in host order,
    host 0 the sending side of the bench's TCP runs): both hosts' engine threads have the same
    names, and which one is busy is the point."""
    labels: dict[int, str] = {}
    for i, pid in enumerate(pids):
        for tid in threads_of([pid]):
            try:
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            labels[tid] = f"host{i} {name}"
    return labels


def forwarder_threads(rows: Sequence[PerfRow], labels: dict[int, str]) -> list[list[Any]]:
    """[label, percent of all samples] per forwarder thread, busiest first: with N CPUs, 100/N
    percent is one CPU kept busy for the whole run, which is where one thread's work stops
    scaling."""
    per: dict[str, float] = {}
    for row in rows:
        if row.tid is not None and row.tid in labels:
            per[labels[row.tid]] = per.get(labels[row.tid], 0.0) + row.percent
    return [[label, pct] for label, pct in sorted(per.items(), key=lambda kv: (-kv[1], kv[0]))]


def threads_of(pids: Collection[int]) -> set[int]:
    """Thread ids of the given processes now (a process that is gone has none)."""
    tids = set()
    for pid in pids:
        try:
            tids |= {int(t) for t in os.listdir(f"/proc/{pid}/task")}
        except (OSError, ValueError):
            continue
    return tids


@dataclass
class Profile:
    gbit_s: float  # the profiled run's own throughput (perf's overhead included)
    rows: list[PerfRow]
    event: str | None = None  # the sampled event, from perf report's header


def profile_tcp(topo: Topology, ep: Endpoints, duration: float, data: Path) -> Profile:
    """One single-stream TCP run under `perf record -a -g` (every CPU, call graphs), the
    recording written to `data` and removed once read."""
    data.unlink(missing_ok=True)
    # -B: no build-id collection at exit (the report runs here and now, on these binaries)
    wrap = ["perf", "record", "-a", "-g", "-q", "-B", "-o", str(data), "--"]
    try:
        res = iperf_run(topo, ep, [], duration, wrap)
        if not data.is_file() or data.stat().st_size == 0:  # perf stopped before iperf3 ran
            raise MeasureError(perf_failure(res.stderr, res.returncode))
        bps, _ = received(iperf_json(res))
        rows, event = perf_report(data)
        return Profile(gbit_s=bps / 1e9, rows=rows, event=event)
    finally:
        data.unlink(missing_ok=True)

"""`fastlane bench`: a short real run, its outputs, its errors, and cleanup after interrupts.

Speeds are never asserted (shared CI machines vary); only that traffic flowed and that the
outputs have the documented shape.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastlane.bench import measure, report
from fastlane.bench.datapaths import Context, fastlane_command, up
from fastlane.bench.lab.topology import MANIFEST_DIR, Topology, cleanup_stale
from fastlane.bench.lab.wire import WireStats

pytestmark = pytest.mark.usefixtures("net_capable")

METRICS = {"tcp_1", "tcp_4", "udp_pps", "rtt_us", "rtt_p99_us", "cpu_s_per_gbit"}


# fastlane's own udp/vxlan/host-gw paths join the run as soon as their code exists; until then
# a daemon with that backend cannot carry traffic at all.
def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


WORKING_PATHS = (
    ["underlay", "host-gw", "vxlan", "baseline"]
    + (["udp"] if _have("fastlane.engine") else [])
    + (["fastlane-vxlan"] if _have("fastlane.backend.vxlan") else [])
    + (["fastlane-host-gw"] if _have("fastlane.backend.hostgw") else [])
)


class BenchRun:
    """`python -m fastlane.bench` as a subprocess, watched from outside.

    A thread polls the topology manifests the bench writes, so the test knows every namespace
    prefix, process and scratch directory the run had, and can check each one is gone.
    """

    def __init__(self, args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.stderr_lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastlane.bench", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        self.manifests: dict[str, dict] = {}
        self._done = threading.Event()
        self._watch = threading.Thread(target=self._poll, daemon=True)
        self._watch.start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stdout = ""

    def _poll(self) -> None:
        while not self._done.is_set():
            for path in MANIFEST_DIR.glob("fl*.json"):
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if data.get("owner_pid") == self.proc.pid:
                    old = self.manifests.get(data["prefix"], {"pids": []})
                    data["pids"] = sorted(set(old["pids"]) | set(data["pids"]))
                    self.manifests[data["prefix"]] = data
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def wait_for_line(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in self.stderr_lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"bench never printed {needle!r}:\n{''.join(self.stderr_lines)}")

    def wait(self, timeout: float) -> int:
        try:
            assert self.proc.stdout is not None
            self.stdout = self.proc.stdout.read()
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._done.set()
            self._watch.join(2)
            self._reader.join(2)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def assert_nothing_left(self) -> None:
        assert self.manifests, "the bench never wrote a topology manifest"
        netns = subprocess.run(
            ["ip", "netns", "list"], check=False, capture_output=True, text=True
        ).stdout
        links = subprocess.run(
            ["ip", "-o", "link"], check=False, capture_output=True, text=True
        ).stdout
        for prefix, data in self.manifests.items():
            assert prefix not in netns, f"namespaces of {prefix} left behind:\n{netns}"
            assert prefix not in links
            assert not (MANIFEST_DIR / f"{prefix.rstrip('-')}.json").exists()
            for pid in data["pids"]:
                assert not _alive(pid), f"process {pid} left behind"
            for d in data["dirs"]:
                assert not Path(d).exists(), f"{d} left behind"
                # etcd (started by its own helper, not listed by pid) ran with its data there
                assert not _processes_mentioning(d), f"processes using {d} left behind"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# ---------------------------------------------------------------------------------------------


def test_short_run_produces_table_json_and_plot(tmp_path: Path) -> None:
    run = BenchRun(
        [
            "--mtu",
            "1500",
            "--paths",
            ",".join(WORKING_PATHS),
            "--duration",
            "1",
            "--repeat",
            "1",
            "--json",
            "out.json",
            "--plot",
            "out.png",
        ],
        tmp_path,
    )
    rc = run.wait(timeout=480)
    assert rc == 0, run.stderr + run.stdout
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["schema"] == "fastlane-bench/1" and doc["complete"] is True and doc["errors"] == []
    env = doc["environment"]
    assert env["kernel"] and env["nproc"] >= 1 and env["date"][:2] == "20"
    assert set(env["versions"]) >= {"fastlane", "python", "iperf3", "etcd"}
    # the exact settings of each underlay (both by default)
    assert list(env["underlays"]) == ["veth", "nic"]
    assert env["underlays"]["nic"]["host_device"] == (
        "ethtool -K <dev> tx off tso off gso off tx-udp-segmentation off "
        "tx-udp_tnl-segmentation off tx-udp_tnl-csum-segmentation off gro on"
    )
    assert env["underlays"]["nic"]["switch_port"] == "ethtool -K <port> tso off gso off"
    assert doc["config"]["mtus"] == [1500] and doc["config"]["paths"] == WORKING_PATHS
    assert doc["config"]["underlays"] == ["veth", "nic"]
    rows = doc["results"]
    seen = {(r["underlay"], r["path"], r["metric"]) for r in rows}
    userspace = {"baseline", "udp"}
    assert seen == {(u, p, m) for u in ("veth", "nic") for p in WORKING_PATHS for m in METRICS} | {
        (u, p, "fwd_cpu_s_per_gbit")
        for u in ("veth", "nic")
        for p in WORKING_PATHS
        if p in userspace
    }
    for r in rows:
        assert set(r) >= {
            "path",
            "underlay",
            "underlay_mtu",
            "metric",
            "median",
            "min",
            "max",
            "unit",
            "samples",
        }
        assert r["underlay_mtu"] == 1500 and len(r["samples"]) == 1
        assert r["min"] <= r["median"] <= r["max"]
        assert r["unit"] == report.METRICS[r["metric"]][0]
        assert math.isfinite(r["median"]) and r["median"] > 0, r  # every path carried traffic
    if "udp" in WORKING_PATHS:
        assert {(x["underlay"], x["denominator"]) for x in doc["ratios"]} >= {
            ("veth", "vxlan"),
            ("nic", "vxlan"),
        }
    # the terminal table lists every path on each underlay
    for u in ("veth", "nic"):
        for p in WORKING_PATHS:
            assert f"{u:<8}  1500  {p} " in run.stdout, run.stdout
    png = (tmp_path / "out.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (tmp_path / "out.md").read_text()
    assert "### Underlay veth, MTU 1500" in md and "### Underlay nic, MTU 1500" in md
    run.assert_nothing_left()


def _wire_during_tcp(topo: Topology, ep: measure.Endpoints, seconds: float) -> WireStats:
    """Capture every frame on the switch's ports while one TCP stream runs for `seconds`."""
    ports = [f"p{h.index}" for h in topo.hosts]
    cap = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            topo.switch_netns,
            sys.executable,
            "-m",
            "fastlane.bench.lab.wire",
            "--seconds",
            f"{seconds + 1:g}",
            "--mtu",
            str(topo.mtu),
            *ports,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cap.stderr is not None
        assert cap.stderr.readline().strip() == "capturing"
        result = measure.tcp(topo, ep, seconds)
        out, err = cap.communicate(timeout=seconds + 30)
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
    assert cap.returncode == 0, err
    assert result.gbit_s > 0
    return WireStats(**json.loads(out))


WIRE_PATHS = ["underlay", "vxlan"] + (["udp"] if "udp" in WORKING_PATHS else [])


@pytest.mark.parametrize("path", WIRE_PATHS)
def test_nic_underlay_wire_carries_single_packets_of_at_most_the_mtu(path: str) -> None:
    """On `nic`, every datagram on the underlay is at most the MTU and one IPv4 packet; on
    `veth` the same traffic crosses as GSO super-frames (which shows the capture sees them)."""
    seen = {}
    for kind in ("veth", "nic"):
        ctx = Context(fastlane_cmd=fastlane_command())
        with Topology(hosts=2, mtu=1500, underlay_kind=kind) as topo, up(topo, path, ctx) as ep:
            server = measure.IperfServer(topo, ep)
            server.start()
            seen[kind] = _wire_during_tcp(topo, ep, 1.0)
            server.stop()
    nic, veth = seen["nic"], seen["veth"]
    assert nic.ipv4 > 1000, nic  # traffic crossed the captured ports
    assert nic.max_l3 <= 1500 and nic.over_mtu == 0, nic
    assert nic.gso == 0 and nic.not_one_ipv4 == 0, nic
    assert nic.nic_like()
    if path != "udp":  # kernel TCP through a plain veth: GSO frames cross whole
        assert veth.gso > 0 and veth.max_l3 > 1500, veth


def test_sigint_halfway_cleans_up_everything(tmp_path: Path) -> None:
    run = BenchRun(
        [
            "--mtu",
            "1500",
            "--paths",
            "baseline,vxlan",
            "--duration",
            "3",
            "--repeat",
            "2",
            "--json",
            "out.json",
            "--plot",
            "",
        ],
        tmp_path,
    )
    # rtt is first: once it is printed, iperf3 and the forwarders are running
    run.wait_for_line("baseline  rtt_us", timeout=60)
    time.sleep(1.0)
    assert run.manifests and any(d["pids"] for d in run.manifests.values())
    run.proc.send_signal(signal.SIGINT)
    rc = run.wait(timeout=60)
    assert rc == 130, run.stderr
    assert "interrupted" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out.json").exists()
    run.assert_nothing_left()


def test_killed_run_is_cleaned_up_by_the_next_one(tmp_path: Path) -> None:
    run = BenchRun(
        ["--mtu", "1500", "--paths", "baseline", "--duration", "5", "--json", "", "--plot", ""],
        tmp_path,
    )
    run.wait_for_line("baseline  rtt_us", timeout=60)
    time.sleep(0.5)
    run.proc.kill()  # SIGKILL: the run gets no chance to clean up
    run.wait(timeout=30)
    prefixes = set(run.manifests)
    assert prefixes
    netns = subprocess.run(
        ["ip", "netns", "list"], check=False, capture_output=True, text=True
    ).stdout
    assert any(p in netns for p in prefixes)  # the leftovers exist ...
    cleanup_stale()  # ... and what the next `fastlane bench` does first removes them
    run.assert_nothing_left()


def test_daemon_that_never_becomes_ready_shows_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "flanneld"
    fake.write_text(
        "#!/bin/sh\necho 'I1125 fake flanneld starting'\n"
        "echo 'E1125 failed to pick interface: none'\nexit 3\n"
    )
    fake.chmod(0o755)
    run = BenchRun(
        [
            "--mtu",
            "1500",
            "--underlay",
            "veth",
            "--paths",
            "flanneld",
            "--flanneld",
            str(fake),
            "--duration",
            "1",
            "--json",
            "",
            "--plot",
            "",
        ],
        tmp_path,
    )
    assert run.wait(timeout=60) == 1
    assert "flanneld on h0 exited with status 3 before it was ready" in run.stderr
    assert "failed to pick interface: none" in run.stderr
    assert "Traceback" not in run.stderr
    run.assert_nothing_left()

    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\necho 'waiting for network config'\nexec sleep 60\n")
    hang.chmod(0o755)
    run = BenchRun(
        [
            "--mtu",
            "1500",
            "--underlay",
            "nic",
            "--paths",
            "flanneld",
            "--flanneld",
            str(hang),
            "--duration",
            "1",
            "--json",
            "",
            "--plot",
            "",
            "--ready-timeout",
            "2",
        ],
        tmp_path,
    )
    assert run.wait(timeout=60) == 1
    assert "never became ready" in run.stderr and "waiting for network config" in run.stderr
    run.assert_nothing_left()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mtu", "15x0"], "--mtu: '15x0' is not a number"),
        (["--mtu", "100"], "--mtu: 100 is outside 576..65535"),
        (["--paths", "underlay,wireguard"], "--paths: unknown path 'wireguard'"),
        (["--underlay", "veth,wire"], "--underlay: unknown underlay 'wire' (known: veth, nic)"),
        (["--paths", "flanneld"], "--paths flanneld needs --flanneld PATH"),
        (["--flanneld", "/nonexistent/flanneld"], "is not an executable file"),
        (["--hosts", "1"], "--hosts: 1 is outside 2..50"),
        (["--duration", "0"], "--duration: 0 is outside"),
        (["--duration", "1.5"], "--duration: 1.5 is not a whole number of seconds"),
        (["--repeat", "0"], "--repeat: 0 is outside 1..100"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(args: list[str], message: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "fastlane.bench", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_missing_tools_and_not_root_are_one_line_errors(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("ip", "ss", "ping", "bridge", "ethtool"):
        (bindir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    env = dict(os.environ, PATH=str(bindir))
    res = subprocess.run(
        [sys.executable, "-m", "fastlane.bench", "--paths", "underlay,vxlan"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert res.returncode == 1
    assert res.stderr.strip() == "fastlane bench: iperf3 not found: apt-get install -y iperf3"

    res = subprocess.run(
        [sys.executable, "-m", "fastlane.bench", "--paths", "udp"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert "apt-get install -y etcd-client etcd-server iperf3" in res.stderr

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) missing")
    res = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "fastlane.bench",
            "--quick",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().startswith("fastlane bench: must run as root"), res.stderr


# ---------------------------------------------------------------------------------------------
# the pure parts


def test_ping_parsing_and_percentiles() -> None:
    out = (
        "PING 10.5.2.2 (10.5.2.2) 56(84) bytes of data.\n"
        "64 bytes from 10.5.2.2: icmp_seq=1 ttl=62 time=0.045 ms\n"
        "64 bytes from 10.5.2.2: icmp_seq=2 ttl=62 time=1.20 ms\n"
        "64 bytes from 10.5.2.2: icmp_seq=3 ttl=62 time=0.050 ms\n"
    )
    assert measure.parse_ping(out) == pytest.approx([45.0, 1200.0, 50.0])
    vals = list(range(1, 101))
    assert measure.percentile(vals, 99) == 99 and measure.percentile(vals, 50) == 50
    assert measure.percentile([7.0], 99) == 7.0 and math.isnan(measure.percentile([], 50))


def test_results_rows_ratios_and_table() -> None:
    r = report.Results()
    for v in (1.0, 3.0, 2.0):
        r.add("udp", 1500, "tcp_1", v)
    r.add("vxlan", 1500, "tcp_1", 10.0)
    r.add("baseline", 1500, "tcp_1", 0.5)
    r.add("baseline", 1500, "cpu_s_per_gbit", math.nan)  # no traffic: no row
    r.error("host-gw", 1500, "setup failed")
    rows = {(x["path"], x["metric"]): x for x in r.rows()}
    assert rows[("udp", "tcp_1")]["median"] == 2.0 and rows[("udp", "tcp_1")]["min"] == 1.0
    assert rows[("udp", "tcp_1")]["samples"] == [1.0, 3.0, 2.0]
    assert ("baseline", "cpu_s_per_gbit") not in rows
    ratios = {x["denominator"]: x for x in r.ratios([1500])}
    assert ratios["vxlan"]["ratio"] == pytest.approx(0.2) and ratios["vxlan"]["target"] == 0.6
    assert ratios["baseline"]["ratio"] == pytest.approx(4.0)
    r.add("udp", 9000, "tcp_1", 5.98)
    r.add("vxlan", 9000, "tcp_1", 10.0)
    # just under the target must not print as if it were on it
    assert "0.598x vxlan   (target >= 0.6x: NOT met)" in report.table(r, [9000], ["udp"])
    text = report.table(r, [1500], ["udp", "vxlan", "host-gw", "baseline"])
    assert "2.00 (1.00-3.00)" in text and "failed" in text
    assert "veth, MTU 1500: udp tcp_1 = 0.2x vxlan   (target >= 0.6x: NOT met)" in text
    # a second underlay: its own rows, ratios and table lines
    r.add("udp", 1500, "tcp_1", 1.0, "nic")
    r.add("vxlan", 1500, "tcp_1", 4.0, "nic")
    assert {(x["underlay"], x["denominator"]): x["ratio"] for x in r.ratios([1500])}[
        ("nic", "vxlan")
    ] == pytest.approx(0.25)
    assert {(x["underlay"], x["path"]) for x in r.rows() if x["metric"] == "tcp_1"} >= {
        ("veth", "udp"),
        ("nic", "udp"),
        ("nic", "vxlan"),
    }
    text = report.table(r, [1500], ["udp", "vxlan"], ["veth", "nic"])
    assert ["nic", "1500", "vxlan", "4.00"] in [ln.split()[:4] for ln in text.splitlines()]
    assert "nic, MTU 1500: udp tcp_1 = 0.25x vxlan" in text


def test_ipv6_paths_short_run_rows_and_report(tmp_path: Path) -> None:
    """The IPv6 paths (not in the default set): the bare IPv6 underlay and fastlane's vxlan over
    it carry traffic; their rows say "family": 6 and --report renders them."""
    run = BenchRun(
        [
            *("--mtu", "1500", "--underlay", "veth", "--paths", "underlay6,fastlane-vxlan6"),
            *("--duration", "1", "--repeat", "1", "--json", "out.json", "--plot", ""),
        ],
        tmp_path,
    )
    rc = run.wait(timeout=120)
    assert rc == 0, run.stderr + run.stdout
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["complete"] is True and doc["errors"] == []
    assert doc["config"]["paths"] == ["underlay6", "fastlane-vxlan6"]
    rows = doc["results"]
    assert {(r["path"], r["metric"]) for r in rows} == {
        (p, m) for p in ("underlay6", "fastlane-vxlan6") for m in METRICS
    }
    for r in rows:
        assert r["family"] == 6 and r["underlay"] == "veth"
        assert math.isfinite(r["median"]) and r["median"] > 0, r
    md = subprocess.run(
        [sys.executable, "-m", "fastlane.bench", "--report", str(tmp_path / "out.json")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert md == (tmp_path / "out.md").read_text()
    assert "| underlay6 | " in md and "| fastlane-vxlan6 | " in md
    assert '"family": 6' in md
    run.assert_nothing_left()


def test_ipv6_rows_family_and_ipv6_against_ipv4_section() -> None:
    r = report.Results()
    r.add("vxlan", 1500, "tcp_1", 10.0)
    r.add("vxlan6", 1500, "tcp_1", 8.0)
    r.add("host-gw6", 1500, "tcp_1", 9.0)
    assert {x["path"]: x["family"] for x in r.rows()} == {"vxlan": 4, "vxlan6": 6, "host-gw6": 6}
    doc = {
        "config": {"paths": ["vxlan", "vxlan6", "host-gw6"], "mtus": [1500], "repeat": 1},
        "results": r.rows(),
    }
    md = report.markdown(doc, "x.json")
    assert "## IPv6 against IPv4" in md and "| vxlan6 / vxlan | 0.8x |" in md
    assert "host-gw6 / host-gw" not in md  # no IPv4 counterpart measured
    # a run without IPv6 paths renders as before
    assert "IPv6" not in report.markdown(
        {"config": {"paths": ["vxlan"], "mtus": [1500]}, "results": r.rows()[:1]}, "x.json"
    )

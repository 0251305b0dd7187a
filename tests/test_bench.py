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
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlane.bench import measure, profile, report
from fastlane.bench.datapaths import CONFIG_KEY, Context, fastlane_command, up, write_config
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
        (["--udp-queues", "0"], "--udp-queues: 0 is outside 1..16"),
        (["--udp-queues", "17"], "--udp-queues: 17 is outside 1..16"),
        (["--udp-queues", "two"], "--udp-queues: invalid int value: 'two'"),
        (["--control-plane", "--profile"], "--profile measures the data plane"),
        (["--control-plane", "--udp-queues", "2"], "--udp-queues measures the data plane"),
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

    def bench(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fastlane.bench", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )

    res = bench("--paths", "underlay,vxlan")
    assert res.returncode == 1
    assert res.stderr.strip() == "fastlane bench: iperf3 not found: apt-get install -y iperf3"

    res = bench("--paths", "udp")
    assert "apt-get install -y etcd-client etcd-server iperf3" in res.stderr

    (bindir / "iperf3").symlink_to(shutil.which("iperf3") or "/usr/bin/iperf3")
    res = bench("--paths", "underlay", "--profile")
    assert res.returncode == 1
    assert res.stderr.strip() == "fastlane bench: perf not found: apt-get install -y linux-perf"

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
    assert ratios["vxlan"]["ratio"] == pytest.approx(0.2) and ratios["vxlan"]["target"] == 0.8
    assert ratios["baseline"]["ratio"] == pytest.approx(4.0)
    r.add("udp", 9000, "tcp_1", 7.98)
    r.add("vxlan", 9000, "tcp_1", 10.0)
    # just under the target must not print as if it were on it
    assert "0.798x vxlan   (target >= 0.8x: NOT met)" in report.table(r, [9000], ["udp"])
    text = report.table(r, [1500], ["udp", "vxlan", "host-gw", "baseline"])
    assert "2.00 (1.00-3.00)" in text and "failed" in text
    assert "veth, MTU 1500: udp tcp_1 = 0.2x vxlan   (target >= 0.8x: NOT met)" in text
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


# ---------------------------------------------------------------------------------------------
# --udp-queues and --profile


def test_udp_queues_go_into_the_udp_paths_network_config() -> None:
    puts: list[tuple[str, ...]] = []

    def etcdctl(*args: str) -> str:
        puts.append(args)
        return ""

    write_config(etcdctl, "udp", 4, queues=4)
    write_config(etcdctl, "udp")
    write_config(etcdctl, "vxlan", 6)
    configs = [json.loads(args[2]) for args in puts]
    assert all(args[:2] == ("put", CONFIG_KEY) for args in puts)
    assert configs[0] == {"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Queues": 4}}
    # one queue is the default: the config stays the one flanneld reads
    assert configs[1] == {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
    assert configs[2]["Backend"] == {"Type": "vxlan"}


@pytest.mark.skipif("udp" not in WORKING_PATHS, reason="fastlane's udp engine is not built")
def test_udp_queues_start_one_engine_worker_per_queue() -> None:
    """--udp-queues 3: each udp daemon runs fl-txrx0 plus fl-tx1 and fl-tx2."""
    ctx = Context(fastlane_cmd=fastlane_command(), udp_queues=3)
    with Topology(hosts=2, mtu=1500, underlay_kind="nic") as topo, up(topo, "udp", ctx):
        assert len(ctx.forwarder_pids) == 2
        for pid in ctx.forwarder_pids:
            names = {
                (task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()
            }
            assert {"fl-txrx0", "fl-tx1", "fl-tx2"} <= names, names
            assert "fl-tx3" not in names


# `perf report -i F --no-children --sort pid,comm,dso,sym -F overhead,sample,pid,comm,dso,sym
# -g none --percent-limit 0 --stdio -t '\t'` as perf 6.1 prints it (rows shortened)
PERF_OUTPUT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 1K of event 'cpu-clock:pppH'
#
# Overhead\t     Samples\t    Pid:Command        \tCommand        \tShared Object      \tSymbol
 40.00% \t 400        \t      0:swapper        \tswapper        \t[kernel.kallsyms]  \t[k] pv_native_safe_halt
 2.00%  \t 20         \t      0:swapper        \tswapper        \t[kernel.kallsyms]  \t[k] handle_softirqs
 15.00% \t 150        \t    812:fl-txrx0       \tfl-txrx0       \t[kernel.kallsyms]  \t[k] _copy_to_iter
 5.00%  \t 50         \t    812:fl-txrx0       \tfl-txrx0       \t_engine.cpython-311-x86_64-linux-gnu.so\t[.] fl_csum_partial
 8.00%  \t 80         \t    812:fl-txrx0       \tfl-txrx0       \t_engine.cpython-311-x86_64-linux-gnu.so\t[.] fl_tx_frame
 3.00%  \t 30         \t    812:fl-txrx0       \tfl-txrx0       \tlibc.so.6          \t[.] __memmove_avx_unaligned_erms
 10.00% \t 100        \t    901:iperf3         \tiperf3         \t[kernel.kallsyms]  \t[k] csum_partial_copy_generic
 6.00%  \t 60         \t    901:iperf3         \tiperf3         \t[kernel.kallsyms]  \t[k] tcp_sendmsg_locked
 4.00%  \t 40         \t    902:iperf3         \tiperf3         \t[kernel.kallsyms]  \t[k] csum_partial
 2.00%  \t 20         \t    777:fastlane       \tfastlane       \tlibpython3.11.so.1.0\t[.] _PyEval_EvalFrameDefault
 1.00%  \t 10         \t    300:etcd           \tetcd           \tetcd               \t[.] 0x000000000000e6cf
 1.00%  \t 10         \t    300:etcd           \tetcd           \tetcd               \t[.] 0x0000000000049f39
 3.00%  \t 30         \t     19:ksoftirqd/1    \tksoftirqd/1    \t[kernel.kallsyms]  \t[k] net_rx_action
 this line is not a row
"""


def test_perf_report_rows_are_parsed_by_their_header() -> None:
    rows = profile.parse_perf_report(PERF_OUTPUT)
    assert len(rows) == 13 and sum(r.samples for r in rows) == 1000
    assert rows[0] == profile.PerfRow(
        "swapper", "[kernel.kallsyms]", "pv_native_safe_halt", 40.0, True, 400, 0
    )
    copy = rows[2]
    assert (copy.comm, copy.tid, copy.sym, copy.kernel) == ("fl-txrx0", 812, "_copy_to_iter", True)
    assert rows[3].dso == "_engine.cpython-311-x86_64-linux-gnu.so" and not rows[3].kernel
    assert sum(r.percent for r in rows) == pytest.approx(100.0)
    # percentages come from the sample counts, not perf's two decimals
    odd = "\n".join(
        " 33.33%\t1\t1:a\ta\tx\t[.] f" if i < 3 else "" for i in range(4)
    )  # three rows of one sample each
    assert [r.percent for r in profile.parse_perf_report(odd)] == pytest.approx([100 / 3] * 3)
    # without a header line the columns are PERF_FIELDS' order
    bare = [ln for ln in PERF_OUTPUT.splitlines() if not ln.startswith("#")]
    assert profile.parse_perf_report("\n".join(bare)) == rows
    assert profile.parse_perf_report("") == []
    assert profile.perf_event(PERF_OUTPUT) == "cpu-clock:pppH"
    assert profile.perf_event("\n".join(bare)) is None


def test_forwarder_threads_are_told_apart_by_host() -> None:
    """Both hosts' engine threads are called fl-txrx0: the labels (thread id -> host) keep them
    apart, busiest first; threads not labelled (someone else's daemon) are left out."""
    rows = profile.parse_perf_report(PERF_OUTPUT)
    extra = profile.PerfRow("fl-txrx0", "[kernel.kallsyms]", "tun_do_read", 9.0, True, 90, 813)
    labels = {812: "host0 fl-txrx0", 813: "host1 fl-txrx0"}
    assert profile.forwarder_threads([*rows, extra], labels) == [
        ["host0 fl-txrx0", pytest.approx(31.0)],
        ["host1 fl-txrx0", pytest.approx(9.0)],
    ]
    assert profile.forwarder_threads(rows, {}) == []


def test_profile_buckets_of_a_udp_run() -> None:
    rows = profile.parse_perf_report(PERF_OUTPUT)
    ours = {812}  # the daemon the bench started; fastlane 777 is someone else's
    s = profile.summarise_profile(rows, ours)
    assert s["samples"] == 1000
    assert s["by_who"] == pytest.approx(
        {"forwarders": 31.0, "applications": 20.0, "idle": 42.0, "other": 7.0}
    )
    assert s["by_kind"] == pytest.approx(
        {
            "copy": 28.0,  # _copy_to_iter, libc memmove, csum_partial_copy_generic
            "checksum": 9.0,  # fl_csum_partial, csum_partial
            "forwarder_user": 8.0,  # fl_tx_frame
            "idle": 40.0,  # the halt, not the softirq work the idle task ran
            "kernel_other": 11.0,
            "user_other": 4.0,  # the foreign fastlane and etcd
        }
    )
    assert s["top"][:3] == [
        ["idle", "pv_native_safe_halt", pytest.approx(40.0)],
        ["forwarders", "_copy_to_iter", pytest.approx(15.0)],
        ["applications", "csum_partial_copy_generic", pytest.approx(10.0)],
    ]
    # an unresolved DSO's addresses add up to one entry
    assert ["other", "? (etcd)", pytest.approx(2.0)] in s["top"]
    assert len(s["top"]) == 12
    # without thread ids every thread of a forwarder's name counts
    assert profile.summarise_profile(rows)["by_who"]["forwarders"] == pytest.approx(33.0)
    # a kernel path's run: no forwarder of the bench's own
    assert profile.summarise_profile(rows, set())["by_who"]["forwarders"] == pytest.approx(0.0)
    assert [profile.who(profile.PerfRow(c, "x", "f", 1.0)) for c in ("fl-tx3", "fl-rx")] == [
        "forwarders",
        "forwarders",
    ]
    assert profile.who(profile.PerfRow("baseline_fwd", "baseline_fwd", "main", 1.0)) == (
        "forwarders"
    )
    assert profile.who(profile.PerfRow("flanneld", "flanneld", "runtime.futex", 1.0)) == (
        "forwarders"
    )
    # idle_cpu() is a scheduler helper busy code calls, not the idle loop
    assert profile.kind(profile.PerfRow("iperf3", "[k]", "idle_cpu", 1.0, True)) == "kernel_other"


_COMMS = ["fl-txrx0", "fl-tx1", "fl-rx", "fastlane", "flanneld", "baseline_fwd", "iperf3"]
_COMMS += ["swapper", "ksoftirqd/0", "etcd", "perf", "kworker/0:1"]
_SYMS = ["_copy_to_iter", "copy_user_generic_string", "rep_movs_alternative", "csum_partial"]
_SYMS += ["do_csum", "fl_csum_fold", "sum64_avx2", "pv_native_safe_halt", "intel_idle"]
_SYMS += ["__memmove_avx_unaligned_erms", "tcp_sendmsg", "fl_tx_frame", "0x00000000004f2a"]
perf_rows = st.builds(
    profile.PerfRow,
    comm=st.one_of(st.sampled_from(_COMMS), st.text(max_size=15)),
    dso=st.sampled_from(["[kernel.kallsyms]", "libc.so.6", "[vxlan]", "[unknown]", "etcd"]),
    sym=st.one_of(st.sampled_from(_SYMS), st.text(max_size=30)),
    percent=st.floats(0, 100, allow_nan=False),
    kernel=st.booleans(),
    samples=st.integers(0, 10_000),
    tid=st.one_of(st.none(), st.integers(0, 20)),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(perf_rows, max_size=40),
    st.one_of(st.none(), st.sets(st.integers(0, 20))),
)
def test_every_sample_lands_in_exactly_one_bucket_of_each_grouping(
    rows: list[profile.PerfRow], ours: set[int] | None
) -> None:
    s = profile.summarise_profile(rows, ours)
    total = sum(r.percent for r in rows)
    assert list(s["by_who"]) == list(profile.WHO) and list(s["by_kind"]) == list(profile.KINDS)
    assert sum(s["by_who"].values()) == pytest.approx(total)
    assert sum(s["by_kind"].values()) == pytest.approx(total)
    assert s["samples"] == sum(r.samples for r in rows)
    for row in rows:
        one = profile.summarise_profile([row], ours)
        for grouping in ("by_who", "by_kind"):
            hit = [k for k, v in one[grouping].items() if v == row.percent]
            assert len(hit) >= 1 and sum(one[grouping].values()) == row.percent
        assert profile.who(row, ours) in profile.WHO and profile.kind(row, ours) in profile.KINDS
        assert one["by_who"][profile.who(row, ours)] == row.percent
        assert one["by_kind"][profile.kind(row, ours)] == row.percent
        # userspace code of a forwarder is forwarder_user, copy or checksum, never user_other
        if profile.who(row, ours) == "forwarders" and not row.kernel:
            assert profile.kind(row, ours) in ("copy", "checksum", "forwarder_user")
    top = s["top"]
    assert len(top) <= profile.TOP_SYMBOLS
    assert [p for _, _, p in top] == sorted((p for _, _, p in top), reverse=True)
    for group, _, pct in top:
        assert pct <= s["by_who"][group] + 1e-9


def test_perf_failure_is_one_line() -> None:
    paranoid = (
        "Error:\n"
        "Access to performance monitoring and observability operations is limited.\n"
        "Consider adjusting /proc/sys/kernel/perf_event_paranoid setting to open\n"
        "access to performance monitoring and observability operations for processes\n"
        "perf_event_paranoid setting is 2:\n"
        "  -1: Allow use of (almost) all events by all users\n"
    )
    assert profile.perf_failure(paranoid, 255) == (
        "perf record failed: Access to performance monitoring and observability operations "
        "is limited (perf_event_paranoid setting is 2)"
    )
    assert profile.perf_failure("", 139) == "perf record failed: exit status 139"


def _fake_perf(bindir: Path) -> dict[str, str]:
    """A `perf` that refuses to record as perf does under perf_event_paranoid, first in PATH."""
    bindir.mkdir()
    fake = bindir / "perf"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'Error:' >&2\n"
        "echo 'Access to performance monitoring and observability operations is limited.' >&2\n"
        "echo 'perf_event_paranoid setting is 4:' >&2\n"
        "exit 255\n"
    )
    fake.chmod(0o755)
    return dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}")


@pytest.mark.skipif(shutil.which("perf") is None, reason="perf missing (linux-perf)")
@pytest.mark.skipif("udp" not in WORKING_PATHS, reason="fastlane's udp engine is not built")
def test_profile_run_writes_where_the_cpu_goes(tmp_path: Path) -> None:
    """--profile --udp-queues 2: one extra tcp_1 run per path under perf, summarised into the
    JSON's "profile" and the results document; the tcp_1 samples stay one per repetition."""
    run = BenchRun(
        [
            *("--mtu", "1500", "--underlay", "nic", "--paths", "underlay,udp"),
            *("--duration", "1", "--repeat", "1", "--json", "out.json", "--plot", ""),
            *("--profile", "--udp-queues", "2"),
        ],
        tmp_path,
    )
    rc = run.wait(timeout=180)
    assert rc == 0, run.stderr + run.stdout
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["config"]["udp_queues"] == 2 and doc["config"]["profile"] is True
    assert all(len(r["samples"]) == 1 for r in doc["results"])
    profiles = {p["path"]: p for p in doc["profile"]}
    assert list(profiles) == ["underlay", "udp"]
    for p in profiles.values():
        assert (p["underlay"], p["underlay_mtu"]) == ("nic", 1500)
        assert p["samples"] > 100 and p["tcp_1_gbit_s"] > 0 and p["event"]
        assert sum(p["by_who"].values()) == pytest.approx(100.0)
        assert sum(p["by_kind"].values()) == pytest.approx(100.0)
        assert p["by_who"]["applications"] > 0 and 0 < len(p["top"]) <= 15
    # the underlay has no forwarder of its own; udp's engine threads moved every packet
    assert profiles["underlay"]["by_who"]["forwarders"] == 0
    assert profiles["udp"]["by_who"]["forwarders"] > 0
    assert profiles["udp"]["by_kind"]["forwarder_user"] > 0
    assert "profile" in run.stderr and "Gbit/s under perf" in run.stderr
    md = (tmp_path / "out.md").read_text()
    assert "--udp-queues 2 --profile" in md
    assert "## Where the CPU goes (perf, one extra tcp_1 run per path)" in md
    assert "### Profile, underlay nic, MTU 1500" in md
    run.assert_nothing_left()


def test_profile_that_perf_refuses_is_a_one_line_path_error(tmp_path: Path) -> None:
    run = BenchRun(
        [
            *("--mtu", "1500", "--underlay", "nic", "--paths", "underlay"),
            *("--duration", "1", "--repeat", "1", "--json", "out.json", "--plot", ""),
            "--profile",
        ],
        tmp_path,
        env=_fake_perf(tmp_path / "bin"),
    )
    assert run.wait(timeout=120) == 1
    assert "Traceback" not in run.stderr
    message = (
        "profile: perf record failed: Access to performance monitoring and observability "
        "operations is limited (perf_event_paranoid setting is 4)"
    )
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["errors"] == [
        {"path": "underlay", "underlay": "nic", "underlay_mtu": 1500, "error": message}
    ]
    assert doc["profile"] == [] and doc["complete"] is False
    assert {r["metric"] for r in doc["results"]} == METRICS  # the measurements still count
    shown = [ln for ln in run.stderr.splitlines() if "perf record failed" in ln]
    assert len(shown) == 1 and "(perf_event_paranoid setting is 4)" in shown[0], run.stderr
    md = (tmp_path / "out.md").read_text()
    assert "| underlay | failed: perf record failed: Access to performance" in md
    run.assert_nothing_left()

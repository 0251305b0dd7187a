"""`fastlane bench --control-plane`, scaled down: 500 leases, 3 s of lease changes.

Timings are never asserted (shared machines vary): only that the run succeeds, that the JSON has
the bench's row schema, that every metric is there with a positive figure, and that the run's
namespaces are gone afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastlane.bench import controlplane
from fastlane.bench.lab.topology import MANIFEST_DIR

EXPECTED = {
    "etcd": {"populate_s"},
    "stack": {
        "sync_s",
        "sync_engine_s",
        "sync_connect_ms",
        "sync_list_ms",
        "sync_decode_ms",
        "sync_table_ms",
        "sync_backend_ms",
        "table_bytes",
        "rss_delta_bytes",
        "lag_ms",
        "lag_p99_ms",
        "drain_ms",
        "churn_rate",
        "swaps_per_s",
        "cpu_per_s",
    },
    "engine": {
        "swap_ms",
        "swap_c_ms",
        "backend_swap_ms",
        "route_table_bytes",
        "route_table_bytes_est",
    },
    "engine-running": {"swap_ms"},
    "daemon": {
        "sync_s",
        "ready_s",
        "first_packet_ms",
        "lag_ms",
        "lag_p99_ms",
        "drain_ms",
        "churn_rate",
        "cpu_per_s",
    },
}


@pytest.fixture(scope="module")
def run(net_capable, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    out = tmp / "cp.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastlane.bench",
            "--control-plane",
            "--leases",
            "500",
            "--duration",
            "3",
            "--repeat",
            "2",
            "--json",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
    )
    try:
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the bench tears its topology down
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=60)
    return proc, out


def test_run_succeeds_and_prints_the_table(run) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    assert "fastlane bench --control-plane: 500 leases" in proc.stdout_text
    for path, metrics in EXPECTED.items():
        for metric in metrics:
            assert any(
                line.split()[:2] == [path, metric] for line in proc.stdout_text.splitlines()
            ), (path, metric)
    assert "goal sync < 2 s" in proc.stdout_text and "churn, daemon:" in proc.stdout_text
    assert f"JSON: {out}" in proc.stdout_text


def test_json_has_the_bench_schema_and_every_metric_positive(run) -> None:
    proc, out = run
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "fastlane-bench/1"
    assert doc["complete"] is True and doc["errors"] == []
    env = doc["environment"]
    for key in ("date", "kernel", "cpu_model", "nproc", "hostname", "versions"):
        assert key in env
    assert env["versions"]["fastlane"] and env["versions"]["python"]
    cfg = doc["config"]
    assert cfg["control_plane"] is True and cfg["leases"] == 500 and cfg["duration_s"] == 3
    assert cfg["repeat"] == 2
    got: dict[str, set[str]] = {}
    for row in doc["results"]:
        assert set(row) >= {"path", "underlay_mtu", "metric", "median", "min", "max", "unit"}
        assert row["underlay_mtu"] is None
        assert row["unit"] == doc["metrics"][row["metric"]]["unit"]
        for k in ("median", "min", "max"):
            assert isinstance(row[k], float) and row[k] > 0, row
        assert row["min"] <= row["median"] <= row["max"]
        if "samples" in row:
            assert len(row["samples"]) == row["n"]
        got.setdefault(row["path"], set()).add(row["metric"])
    assert got == EXPECTED
    by = {(r["path"], r["metric"]): r for r in doc["results"]}
    assert by[("stack", "sync_s")]["n"] == 2
    assert by[("stack", "lag_ms")]["n"] == 300  # every change was reflected
    assert by[("daemon", "first_packet_ms")]["n"] == controlplane.TRIALS
    assert [(g["path"], g["metric"]) for g in doc["goals"]] == [
        ("stack", "sync_s"),
        ("engine", "swap_ms"),
        ("daemon", "first_packet_ms"),
    ]
    for g in doc["goals"]:
        assert g["median"] > 0 and isinstance(g["met"], bool)
    for path in ("stack", "daemon"):
        s = doc["churn"][path]
        assert s["reflected"] == s["changes"] > 0 and isinstance(s["keeps_up"], bool)


def test_its_namespaces_are_gone(run) -> None:
    proc, _ = run
    for manifest in MANIFEST_DIR.glob("fl*.json"):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        assert data.get("owner_pid") != proc.pid, f"{manifest} left behind"


def test_results_document_renders_from_the_json(run) -> None:
    _, out = run
    doc = subprocess.run(
        [sys.executable, "-m", "fastlane.bench", "--report", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert doc.returncode == 0, doc.stderr
    assert "control-plane results" in doc.stdout and "sync_s" in doc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--leases", "500", "--duration", "10"], "changes more leases than --leases 500"),
        (["--leases", "5"], "--leases: 5 is outside"),
        (["--leases", "500", "--duration", "0.05"], "--duration"),
    ],
)
def test_sizes_it_cannot_run_are_usage_errors(args, message) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "fastlane.bench", "--control-plane", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and message in res.stderr


def test_the_churn_plan_touches_each_subnet_once() -> None:
    peer = controlplane.IPv4Address("192.168.100.2")
    for n, total in ((500, 300), (10_000, 3000)):
        both = controlplane.plan(n, total, 0, peer) + controlplane.plan(n, total, 1, peer)
        subnets = [c.subnet for c in both]
        assert len(subnets) == len(set(subnets))
        last = controlplane.subnet_at(n)
        assert last not in subnets  # the peer's initial lease (daemon sync) is never changed
        assert all(c.op == "probe" for c in both if c.k % controlplane.PROBE_EVERY == 0)

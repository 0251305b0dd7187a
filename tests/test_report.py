"""The results document (`fastlane bench --report`): rendered from a run's JSON alone.

No root and no network: these tests only read and render JSON.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from fastlane.bench import report
from fastlane.bench.lab.topology import underlay_description

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _row(path: str, mtu: int, metric: str, samples: list[float]) -> dict:
    s = sorted(samples)
    return {
        "path": path,
        "underlay_mtu": mtu,
        "metric": metric,
        "median": s[len(s) // 2],
        "min": s[0],
        "max": s[-1],
        "unit": report.METRICS[metric][0],
        "samples": samples,
    }


def _doc() -> dict:
    rows = [
        _row("udp", 1500, "tcp_1", [9.0, 10.0, 11.0]),
        _row("vxlan", 1500, "tcp_1", [20.0, 19.0, 21.0]),
        _row("underlay", 1500, "tcp_1", [40.0, 40.0, 40.0]),
        _row("baseline", 1500, "tcp_1", [2.0, 2.5]),  # one repetition lost
        _row("udp", 1500, "rtt_us", [60.0, 70.0, 80.0]),
        _row("vxlan", 1500, "rtt_us", [10.0, 10.0, 10.0]),
        _row("udp", 1500, "udp_pps", [150000.0, 145000.0, 160000.0]),
        _row("udp", 1500, "fwd_cpu_s_per_gbit", [0.1, 0.1, 0.1]),
        _row("baseline", 1500, "fwd_cpu_s_per_gbit", [0.8, 0.8]),
    ]
    return {
        "schema": report.SCHEMA,
        "environment": {
            "date": "2026-01-02T03:04:05+00:00",
            "kernel": "6.1.0-test",
            "cpu_model": "Test CPU",
            "nproc": 4,
            "hostname": "box",
            "versions": {"fastlane": "0.1.0", "fastlane_git": "abc1234", "iperf3": "iperf 3.12"},
        },
        "config": {
            "hosts": 3,
            "mtus": [1500],
            "paths": ["underlay", "udp", "vxlan", "host-gw", "baseline"],
            "duration_s": 2.5,
            "repeat": 3,
            "quick": False,
            "flanneld": None,
        },
        "metrics": {k: {"unit": u, "description": d} for k, (u, d) in report.METRICS.items()},
        "results": rows,
        "ratios": [
            {
                "underlay_mtu": 1500,
                "metric": "tcp_1",
                "numerator": "udp",
                "denominator": "vxlan",
                "ratio": 0.5,
                "target": 0.6,
            },
            {
                "underlay_mtu": 1500,
                "metric": "tcp_1",
                "numerator": "udp",
                "denominator": "baseline",
                "ratio": 5.0,
                "target": 5.0,
            },
        ],
        "errors": [
            {"path": "host-gw", "underlay_mtu": 1500, "error": "route add failed\n  log line"}
        ],
        "complete": False,
    }


def _section(text: str, heading: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(heading) + 1
    out = []
    for ln in lines[start:]:
        if ln.startswith("#"):
            break
        out.append(ln)
    return out


def test_synthetic_run_renders_command_environment_table_and_ratios() -> None:
    text = report.markdown(_doc(), "run.json", "run.png")
    assert text.startswith("# fastlane bench results: run\n")
    assert "`fastlane bench --report run.json > run.md`" in text
    assert "Plot: [run.png](run.png)." in text
    assert (
        "    fastlane bench --hosts 3 --mtu 1500 --paths underlay,udp,vxlan,host-gw,baseline "
        "--duration 2.5 --repeat 3"
    ) in text
    for line in (
        "| date | 2026-01-02T03:04:05+00:00 |",
        "| kernel | 6.1.0-test |",
        "| CPU | Test CPU |",
        "| CPUs | 4 |",
        "| fastlane_git | abc1234 |",
    ):
        assert line in text
    assert "Complete: no, 1 error(s)" in text

    # a JSON without "underlay" (written before the nic underlay existed) is a veth run
    assert "- `veth`: a plain veth pair" in "\n".join(_section(text, "## Underlays"))
    assert "## nic against veth" not in text
    table = [ln for ln in _section(text, "### Underlay veth, MTU 1500") if ln.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head == [
        "path",
        "tcp_1 (Gbit/s)",
        "udp_pps (packets/s)",
        "rtt_us (us)",
        "fwd_cpu_s_per_gbit (s/Gbit)",
    ]  # only metrics the run has
    body = {
        ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]]
        for ln in table[2:]
    }
    assert list(body) == ["underlay", "udp", "vxlan", "host-gw", "baseline"]  # config order
    assert body["udp"] == [
        "10.00 (9.00-11.00)",
        "150k (145k-160k)",
        "70 (60-80)",
        "0.10 (0.10-0.10)",
    ]
    assert body["underlay"][1:] == ["-", "-", "-"]
    assert body["baseline"][0] == "2.50 (2.00-2.50) [n=2]"
    assert body["host-gw"][0] == "failed: route add failed"

    ratios = [
        ln for ln in _section(text, "### Ratios, underlay veth, MTU 1500") if ln.startswith("|")
    ]
    assert ratios[0] == "| metric | udp / vxlan | udp / underlay | udp / baseline |"
    cells = {
        ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]]
        for ln in ratios[2:]
    }
    assert cells["tcp_1"] == ["0.5x", "0.25x", "4x"]
    assert cells["rtt_us"] == ["7x", "-", "-"]
    assert cells["fwd_cpu_s_per_gbit"] == ["-", "-", "0.125x"]
    assert "udp_pps" not in cells  # no other path has it
    assert "- veth, MTU 1500, tcp_1: udp / vxlan = 0.5x, target >= 0.6x: NOT met" in text
    assert "- veth, MTU 1500, tcp_1: udp / baseline = 5x, target >= 5x: met" in text
    assert "- veth, MTU 1500, host-gw: route add failed" in _section(text, "## Errors")


def test_two_underlays_render_side_by_side_with_their_settings() -> None:
    doc = _doc()
    veth = [dict(r, underlay="veth") for r in doc["results"]]
    nic = [
        dict(
            r,
            underlay="nic",
            median=r["median"] / 2,
            min=r["min"] / 2,
            max=r["max"] / 2,
            samples=[v / 2 for v in r["samples"]],
        )
        for r in doc["results"]
    ]
    doc["results"] = veth + nic
    doc["config"]["underlays"] = ["veth", "nic"]
    doc["environment"]["underlays"] = {k: underlay_description(k) for k in ("veth", "nic")}
    doc["ratios"] = [dict(r, underlay=u) for u in ("veth", "nic") for r in doc["ratios"]]
    doc["errors"][0]["underlay"] = "nic"
    text = report.markdown(doc, "run.json")
    assert "--underlay veth,nic --mtu 1500" in text
    settings = "\n".join(_section(text, "## Underlays"))
    assert (
        "host_device: `ethtool -K <dev> tx off tso off gso off tx-udp-segmentation off "
        "tx-udp_tnl-segmentation off tx-udp_tnl-csum-segmentation off gro on`"
    ) in settings
    assert "switch_port: `ethtool -K <port> tso off gso off`" in settings
    for u, udp in (("veth", "10.00 (9.00-11.00)"), ("nic", "5.00 (4.50-5.50)")):
        table = [ln for ln in _section(text, f"### Underlay {u}, MTU 1500") if ln.startswith("|")]
        assert [c.strip() for c in table[3].strip("|").split("|")][:2] == ["udp", udp]
        assert f"### Ratios, underlay {u}, MTU 1500" in text
        assert f"- {u}, MTU 1500, tcp_1: udp / vxlan = 0.5x, target >= 0.6x: NOT met" in text
    # host-gw failed on nic only
    assert "| host-gw | failed: route add failed |" in "\n".join(
        _section(text, "### Underlay nic, MTU 1500")
    )
    assert "| host-gw | failed" not in "\n".join(_section(text, "### Underlay veth, MTU 1500"))
    assert "- nic, MTU 1500, host-gw: route add failed" in _section(text, "## Errors")
    cross = [ln for ln in _section(text, "### nic / veth, MTU 1500") if ln.startswith("|")]
    assert cross[0] == "| path | tcp_1 | udp_pps | rtt_us | fwd_cpu_s_per_gbit |"
    assert "| udp | 0.5x | 0.5x | 0.5x | 0.5x |" in cross


def test_every_figure_in_the_document_comes_from_the_json() -> None:
    """Changing one sample changes the document; nothing is cached or hard-coded."""
    doc = _doc()
    before = report.markdown(doc, "run.json")
    doc["results"][0] = _row("udp", 1500, "tcp_1", [9.0, 12.0, 11.0])
    after = report.markdown(doc, "run.json")
    assert "11.00 (9.00-12.00)" in after and "0.55x" in after and before != after
    assert "Plot:" not in before


def test_report_flag_prints_the_document_and_needs_no_root(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps(_doc()))
    res = subprocess.run(
        [sys.executable, "-m", "fastlane.bench", "--report", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == report.markdown(_doc(), "x.json")
    assert report.write_markdown(tmp_path / "x.json") == tmp_path / "x.md"
    assert (tmp_path / "x.md").read_text() == res.stdout

    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    for arg, message in (
        (tmp_path / "missing.json", "cannot read"),
        (tmp_path / "bad.json", "is not a fastlane bench result"),
    ):
        res = subprocess.run(
            [sys.executable, "-m", "fastlane.bench", "--report", str(arg)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert res.returncode == 1
        assert res.stderr.startswith("fastlane bench: ") and message in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_committed_results_document_is_what_its_json_renders_to() -> None:
    """bench/results/*.md can never drift from the JSON they are generated from."""
    jsons = sorted(RESULTS.glob("*.json"))
    assert jsons, "no committed results"
    for path in jsons:
        md = path.with_name(report.document_name(path.name))
        assert md.exists(), f"{md.name} missing: fastlane bench --report {path.name} > {md.name}"
        assert md.read_text() == report.markdown_for(path), (
            f"{md.name} differs from what {path.name} renders to; regenerate it with "
            f"`fastlane bench --report {path.name} > {md.name}` in bench/results/"
        )


def _profile(path: str, forwarders: float, copy: float) -> dict:
    rest = 100.0 - forwarders - 20.0 - 30.0
    return {
        "path": path,
        "family": 4,
        "underlay": "nic",
        "underlay_mtu": 1500,
        "tcp_1_gbit_s": 5.5,
        "event": "cpu-clock:pppH",
        "samples": 8000,
        "by_who": {"forwarders": forwarders, "applications": 20.0, "idle": 30.0, "other": rest},
        "by_kind": {
            "copy": copy,
            "checksum": 5.0,
            "forwarder_user": forwarders / 2,
            "idle": 30.0,
            "kernel_other": 65.0 - copy - forwarders / 2,
            "user_other": 0.0,
        },
        "top": [
            ["idle", "pv_native_safe_halt", 30.0],
            ["forwarders", "_copy_to_iter", copy],
            ["applications", "tcp_sendmsg_locked", 4.25],
            ["other", "a|b", 1.0],
            ["other", "net_rx_action", 0.5],
            ["other", "sixth", 0.25],
        ],
    }


def test_profile_section_one_table_per_underlay_and_mtu() -> None:
    doc = _doc()
    doc["results"] = [dict(r, underlay="nic") for r in doc["results"]]
    doc["config"] |= {"underlays": ["nic"], "udp_queues": 4, "profile": True}
    doc["profile"] = [_profile("udp", 40.0, 25.0), _profile("vxlan", 0.0, 12.5)]
    doc["errors"] = [
        {
            "path": "baseline",
            "underlay": "nic",
            "underlay_mtu": 1500,
            "error": "profile: perf record failed: Access is limited\nmore",
        }
    ]
    text = report.markdown(doc, "run.json")
    assert "--duration 2.5 --repeat 3 --udp-queues 4 --profile" in text
    assert "## Where the CPU goes (perf, one extra tcp_1 run per path)" in text
    assert "Sampled event: `cpu-clock:pppH`. A software clock" in text
    table = [ln for ln in _section(text, "### Profile, underlay nic, MTU 1500") if ln]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head == [
        "path",
        "tcp_1 under perf (Gbit/s)",
        "samples",
        "who: forwarders",
        "who: applications",
        "who: idle",
        "who: other",
        "kind: copy",
        "kind: checksum",
        "kind: forwarder_user",
        "kind: idle",
        "kind: kernel_other",
        "kind: user_other",
    ]
    rows = {ln.split("|")[1].strip(): ln for ln in table[2:] if ln.startswith("|")}
    assert list(rows) == ["udp", "vxlan", "baseline"]  # config order, failures included
    assert rows["udp"] == (
        "| udp | 5.50 | 8000 | 40.0 | 20.0 | 30.0 | 10.0 | 25.0 | 5.0 | 20.0 | 30.0 | 20.0 | 0.0 |"
    )
    assert rows["baseline"].startswith(
        "| baseline | failed: perf record failed: Access is limited |"
    )
    hottest = [ln for ln in table if ln.startswith("- ")]
    assert hottest[0] == (
        "- udp: `pv_native_safe_halt` (idle) 30.0%, `_copy_to_iter` (forwarders) 25.0%, "
        "`tcp_sendmsg_locked` (applications) 4.2%, `a\\|b` (other) 1.0%, "
        "`net_rx_action` (other) 0.5%"
    )  # five of the JSON's list
    # the figures come from the JSON
    doc["profile"][0]["by_kind"]["copy"] = 26.0
    assert "| 26.0 |" in report.markdown(doc, "run.json")
    # forwarder threads, told apart by host; helper threads that did nothing are left out
    doc["profile"][0] |= {
        "cpus": 2,
        "forwarder_threads": [["host0 fl-txrx0", 30.0], ["host1 fl-txrx0", 9.5], ["host0 x", 0.01]],
    }
    assert (
        "- udp (50% = one of 2 CPUs busy all the run): host0 fl-txrx0 30.0%, host1 fl-txrx0 9.5%\n"
        in report.markdown(doc, "run.json")
    )


def test_runs_without_profile_render_as_before() -> None:
    """Old JSONs have neither "profile" nor "udp_queues"; one queue is not worth a flag."""
    doc = _doc()
    text = report.markdown(doc, "run.json")
    assert "Where the CPU goes" not in text and "--udp-queues" not in text
    doc["config"] |= {"udp_queues": 1, "profile": False}
    assert report.markdown(doc, "run.json") == text


def _markdown_section(path: Path, heading: str) -> str:
    """The text under the first heading that starts with `heading`, up to the next heading of
    the same or a higher level."""
    lines = path.read_text().splitlines()
    level = heading.split(" ", 1)[0]
    start = next(i for i, ln in enumerate(lines) if ln.startswith(heading))
    out = []
    for ln in lines[start + 1 :]:
        mark = ln.split(" ", 1)[0]
        if ln.startswith("#") and set(mark) == {"#"} and len(mark) <= len(level):
            break
        out.append(ln)
    return "\n".join(out)


# hand-written sections that quote measurements -> the committed run they quote
PROSE = [
    (REPO / "README.md", "## Measured", "full-run-nic"),
    (REPO / "bench" / "README.md", "### What limits each path", "full-run"),
    (REPO / "bench" / "README.md", "### What the nic underlay changes", "full-run-nic"),
    (REPO / "docs" / "bench.md", "### Figures of the latest run", "full-run-nic"),
]


def test_prose_quotes_only_figures_of_the_committed_run() -> None:
    """Hand-written sections that quote measurements name their run's JSON, and every number in
    them appears in the document generated from it (a crude check, but it catches a figure
    left over from an older run)."""
    number = r"(?<![\w.])\d+(?:\.\d+)?"
    for doc, heading, run in PROSE:
        generated = set(re.findall(number, (RESULTS / f"{run}.md").read_text()))
        text = _markdown_section(doc, heading)
        assert f"{run}.json" in text, f"{doc.name} '{heading}' does not name its run {run}.json"
        numbers = re.findall(number, re.sub(r"full-run[\w-]*", "", text))
        stray = [n for n in numbers if n not in generated]
        assert not stray, f"{doc.name} '{heading}' quotes figures not in {run}.md: {stray}"

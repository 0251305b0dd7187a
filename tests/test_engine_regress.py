"""The engine's worker code under scripted syscalls (csrc/tests/regress.c), built with ASan+UBSan.

Each scenario guards one review finding whose trigger is timing on real sockets: a worker
reading routes while marked offline, a stop that waits for a flood, an RX batch overflowing its
arrays, a miscounted TUN write error, UDP GSO lost for good, RX starved by a saturated egress,
a route writer reading a table another writer freed. Every scenario failed against the engine
before its fix; here it must pass, with no sanitizer report.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SCENARIOS = [
    "online_after_wait",
    "stop_under_flood",
    "rx_tiny_gro_segments",
    "tun_write_error_counts_one",
    "gso_fallback_and_reprobe",
    "saturated_egress",
    "route_writers_race",
]


@pytest.fixture(scope="module")
def regress(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("needs a C compiler")
    out = tmp_path_factory.mktemp("regress") / "regress"
    cmd = [
        cc,
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer",
        "-O1",
        "-g",
        "-pthread",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-unused-parameter",
        f"-I{CSRC}",
        str(CSRC / "tests" / "regress.c"),
        str(CSRC / "tests" / "regress_route.c"),
        str(CSRC / "packet.c"),
        "-o",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_every_scenario_is_listed(regress: Path) -> None:
    listed = subprocess.run([str(regress)], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(regress: Path, scenario: str) -> None:
    r = subprocess.run(
        [str(regress), scenario],
        capture_output=True,
        text=True,
        timeout=60,
        env={"ASAN_OPTIONS": "abort_on_error=0:exitcode=99"},
    )
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"PASS {scenario}" in r.stdout

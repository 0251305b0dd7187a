"""fastlane installed like real software: sdist and wheel, a fresh venv, the commands it ships.

The editable install the other tests use hides packaging mistakes (a package missing from
pyproject.toml, a C source left out of the sdist, package data found only through the source
tree). These tests build from a copy of the source tree, install the wheel into a new venv and
run each command from outside the tree. Dependencies come from pip's usual indexes and cache.
Deselect with `-m "not install"`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import fastlane

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "mk-docker-opts"
# Build products and caches of the working tree (shared with other people's in-place builds).
IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    "bench-results",
    "*.so",
    "*.o",
    "_engine.c",
    "dist-out",
)


def _run(
    argv: list[str], cwd: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    # cwd outside the source tree: `python -m build` next to build.py would import build.py.
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLANNELD_", "PYTHON", "VIRTUAL_ENV"))
    }
    return subprocess.run(
        argv,
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **env},
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """sdist and wheel in <tmp>/dist, built by `python -m build` from a copy of the source tree."""
    tmp = tmp_path_factory.mktemp("install")
    shutil.copytree(ROOT, tmp / "src", ignore=IGNORE)
    p = _run(
        [sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(tmp / "src")], cwd=tmp
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp


@pytest.fixture(scope="module")
def venv(built: Path) -> Path:
    """A new venv with the wheel (not editable) installed; returns its bin/ directory."""
    subprocess.run([sys.executable, "-m", "venv", str(built / "venv")], check=True, timeout=120)
    wheel = next((built / "dist").glob("*.whl"))
    p = _run([str(built / "venv" / "bin" / "pip"), "install", "-q", str(wheel)], cwd=built)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return built / "venv" / "bin"


@pytest.mark.install
def test_sdist_has_the_c_sources(built: Path):
    sdist = next((built / "dist").glob("fastlane-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {
        "build.py",
        "setup.py",
        "pyproject.toml",
        "fastlane/bench/baseline_fwd.c",
        "dist/mk-docker-opts.sh",
        "dist/fastlane.service",
        "dist/fastlane.env",
    }
    expected |= {f"csrc/{p.name}" for p in (ROOT / "csrc").glob("*.[ch]")}
    assert "csrc/engine_cdef.h" in expected and "csrc/engine.c" in expected
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.endswith((".so", ".o"))]


@pytest.mark.install
def test_wheel_has_the_engine_and_package_data(built: Path):
    wheel = next((built / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [n for n in names if n.startswith("fastlane/_engine") and n.endswith(".so")]
    assert "fastlane/bench/baseline_fwd.c" in names
    # every package in the tree made it (a package missing from pyproject.toml would not)
    for init in (ROOT / "fastlane").rglob("__init__.py"):
        assert str(init.relative_to(ROOT)) in names


@pytest.mark.install
def test_installed_daemon_version_and_help(venv: Path, tmp_path: Path):
    p = _run([str(venv / "fastlane"), "-version"], cwd=tmp_path)
    assert p.returncode == 0 and p.stderr.strip() == fastlane.__version__
    p = _run([str(venv / "fastlane"), "-help"], cwd=tmp_path)
    assert p.returncode == 0 and "-etcd-endpoints string" in p.stderr
    # the daemon's modules and the compiled engine import from site-packages, not this tree
    code = (
        "import fastlane, fastlane.daemon, fastlane._engine, fastlane.backend.udp; "
        "print(fastlane.__file__)"
    )
    p = _run([str(venv / "python"), "-c", code], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(str(venv.parent)) and str(ROOT) not in p.stdout


@pytest.mark.install
def test_installed_docker_opts_and_shim(venv: Path, tmp_path: Path):
    src, out = DATA / "inputs" / "sample.env", tmp_path / "docker_opts.env"
    want = (DATA / "expected" / "sample-none.env").read_text()
    p = _run([str(venv / "fastlane"), "docker-opts", "-f", str(src), "-d", str(out)], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert out.read_text() == want
    out.unlink()
    p = _run(
        ["sh", str(ROOT / "dist" / "mk-docker-opts.sh"), "-f", str(src), "-d", str(out)],
        cwd=tmp_path,
        FASTLANE=str(venv / "fastlane"),
    )
    assert p.returncode == 0, p.stderr
    assert out.read_text() == want


@pytest.mark.install
def test_installed_leases_json(venv: Path, tmp_path: Path, etcd_server, prefix):
    p = _run(
        [
            str(venv / "fastlane"),
            f"-etcd-endpoints={etcd_server.endpoint}",
            f"-etcd-prefix={prefix}",
            "leases",
            "--json",
        ],
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["leases"] == []


@pytest.mark.install
def test_installed_bench_help_and_baseline_source(venv: Path, tmp_path: Path):
    p = _run([str(venv / "fastlane"), "bench", "--help"], cwd=tmp_path)
    assert p.returncode == 0 and "--paths" in p.stdout
    code = "from fastlane.bench.datapaths import baseline_source as s; print(s()); assert s().is_file()"
    p = _run([str(venv / "python"), "-c", code], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(str(venv.parent))
    if shutil.which("gcc"):
        code = (
            "from pathlib import Path; from fastlane.bench.datapaths import build_baseline; "
            f"print(build_baseline(Path({str(tmp_path)!r})))"
        )
        p = _run([str(venv / "python"), "-c", code], cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert Path(p.stdout.strip()).is_file()


# ---- the systemd unit and its environment file (no install needed) ----


def _unit_with(exe: str) -> str:
    return (ROOT / "dist" / "fastlane.service").read_text().replace("/usr/local/bin/fastlane", exe)


def test_systemd_unit_verifies(tmp_path: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd; make apt installs it)")
    exe = shutil.which("fastlane") or str(Path(sys.executable).parent / "fastlane")
    if not os.access(exe, os.X_OK):
        pytest.skip("no fastlane executable to point ExecStart at")
    unit = tmp_path / "fastlane.service"
    unit.write_text(_unit_with(exe))  # verify checks that ExecStart's binary exists
    p = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on "ignoring" warnings (a misspelt key or value): any output is a failure
    assert p.returncode == 0 and p.stderr == "" and p.stdout == "", p.stderr


def test_systemd_unit_is_flanneld_shaped():
    text = (ROOT / "dist" / "fastlane.service").read_text()
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert "Type=notify" in lines and "Restart=on-failure" in lines
    assert "EnvironmentFile=-/run/flannel/options.env" in lines
    assert "ExecStart=/usr/local/bin/fastlane $FLANNEL_OPTIONS" in lines


def test_example_env_names_only_real_flags():
    from fastlane.cli import flagset

    flags = flagset().flags
    text = (ROOT / "dist" / "fastlane.env").read_text()
    names = set()
    for line in text.splitlines():
        body = line.lstrip("#").strip()
        if body.startswith("FLANNELD_") and "=" in body:
            names.add(body.split("=", 1)[0])
    assert {
        "FLANNELD_ETCD_ENDPOINTS",
        "FLANNELD_ETCD_PREFIX",
        "FLANNELD_IFACE",
        "FLANNELD_PUBLIC_IP",
        "FLANNELD_SUBNET_FILE",
        "FLANNELD_IP_MASQ",
        "FLANNELD_HEALTHZ_PORT",
    } <= names
    known = {f.env_key("FLANNELD_") for f in flags.values()}
    assert names <= known, sorted(names - known)
    # every default shown is the flag's real default
    for line in text.splitlines():
        body = line.lstrip("#").strip()
        if body.startswith("FLANNELD_") and "=" in body:
            key, value = body.split("=", 1)
            flag = next(f for f in flags.values() if f.env_key("FLANNELD_") == key)
            if value and flag.kind != "list":
                shown = {"true": True, "false": False}.get(value, value)
                default = flag.default if flag.kind != "int" else str(flag.default)
                assert shown == default or str(shown) == str(default), key

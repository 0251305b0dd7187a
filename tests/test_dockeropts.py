"""`fastlane docker-opts` and dist/mk-docker-opts.sh against flannel's own mk-docker-opts.sh.

The expected outputs in tests/data/mk-docker-opts/ were produced by running flannel's script
(v0.28.9) on the cases below; see that directory's README.md. Each case runs with a clean
environment (PATH plus the case's variables), because the script also reads DOCKER_OPT_* and
the combined key from the environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastlane.dockeropts import read_env_file, render

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "mk-docker-opts"
SENTINEL = "left over from before\n"
# Set up inside a private network namespace for the route-check cases: a route to the
# subnet's network "via" a gateway, which the script refuses to work around.
# (On lo: a container may lack the dummy module.)
NETNS_SETUP = (
    "ip link set lo up && ip addr add 192.168.77.1/24 dev lo "
    "&& ip route add 10.1.74.0/24 via 192.168.77.2"
)


@dataclass
class Case:
    id: str
    input: str | None  # file in inputs/, None: -f names a file that does not exist
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    netns_route: bool = False  # run in a netns whose table conflicts with the subnet
    compare_stderr: bool = False  # the script's own message, not the shell's or getopts'


def _flag_cases() -> list[Case]:
    cases = []
    for inp in (
        "sample",
        "vxlan-ipmasq",
        "dual-stack",
        "subnet-only",
        "empty",
        "quoted",
        "preset-opts",
    ):
        for flags in (
            [],
            ["-i"],
            ["-c"],
            ["-i", "-c"],
            ["-m"],
            ["-i", "-m"],
            ["-c", "-m"],
            ["-i", "-c", "-m"],
        ):
            for key in ([], ["-k", "DOCKER_NETWORK_OPTIONS"]):
                name = "".join(f.strip("-") for f in flags) or "none"
                cases.append(Case(f"{inp}-{name}{'-k' if key else ''}", f"{inp}.env", flags + key))
    return cases


CASES: list[Case] = _flag_cases() + [
    Case("missing-file", None),
    Case("missing-file-c", None, ["-c"]),
    Case("missing-file-i", None, ["-i"]),
    Case("combined-letters", "sample.env", ["-icm"]),
    Case("key-attached", "sample.env", ["-kDOCKER_NETWORK_OPTIONS", "-c"]),
    Case("stops-at-non-option", "sample.env", ["-c", "extra", "-i", "-m"]),
    Case("double-dash", "sample.env", ["-m", "--", "-i"]),
    Case("env-preset-key", "sample.env", [], {"DOCKER_OPTS": "--storage-driver=overlay2"}),
    Case(
        "env-preset-custom-key",
        "sample.env",
        ["-k", "DOCKER_NETWORK_OPTIONS", "-c"],
        {"DOCKER_NETWORK_OPTIONS": "--dns=10.0.0.10"},
    ),
    Case(
        "env-extra-docker-opt",
        "sample.env",
        [],
        {"DOCKER_OPT_ZZZ": "--live-restore", "DOCKER_OPT_AAA": "--debug"},
    ),
    Case("env-value-mentions-docker-opt", "sample.env", ["-i"], {"NOTE": "DOCKER_OPT_x"}),
    Case("env-subnet-overridden-by-file", "sample.env", ["-c"], {"FLANNEL_SUBNET": "10.99.0.1/24"}),
    Case(
        "env-subnet-without-file",
        None,
        [],
        {"FLANNEL_SUBNET": "10.99.0.1/24", "FLANNEL_MTU": "1400"},
    ),
    Case("bad-ipmasq", "bad-ipmasq.env", [], compare_stderr=True),
    Case("bad-ipmasq-m", "bad-ipmasq.env", ["-m"]),
    Case("help", "sample.env", ["-h"]),
    Case("question-mark", "sample.env", ["-?"]),
    Case("unknown-option", "sample.env", ["-x"]),
    Case("missing-argument", "sample.env", ["-k"]),
    Case("route-conflict", "sample.env", [], netns_route=True, compare_stderr=True),
    Case("route-other-subnet", "vxlan-ipmasq.env", ["-c"], netns_route=True, compare_stderr=True),
]


def run_case(command: list[str], case: Case, workdir: Path) -> dict:
    """Run one case with `command` (flannel's script or fastlane's) and report what it did."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "subnet.env"
    if case.input is not None:
        shutil.copyfile(DATA / "inputs" / case.input, src)
    out = workdir / "docker_opts.env"
    out.write_text(SENTINEL)
    argv = [*command, "-f", str(src), "-d", str(out), *case.flags]
    if case.netns_route:
        argv = ["unshare", "-n", "sh", "-c", NETNS_SETUP + ' && exec "$@"', "sh", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **case.env}
    proc = subprocess.run(
        argv, check=False, capture_output=True, text=True, env=env, timeout=60, cwd=workdir
    )
    return {"exit": proc.returncode, "output": out.read_text(), "stderr": proc.stderr}


def _expected() -> dict[str, dict]:
    return {c["id"]: c for c in json.loads((DATA / "cases.json").read_text())}


def _fastlane_command() -> list[str]:
    return [sys.executable, "-m", "fastlane", "docker-opts"]


def _wrapper_command(tmp: Path) -> list[str]:
    """dist/mk-docker-opts.sh, finding this checkout's fastlane through $FASTLANE."""
    shim = tmp / "fastlane"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fastlane "$@"\n')
    shim.chmod(0o755)
    return ["env", f"FASTLANE={shim}", "sh", str(ROOT / "dist" / "mk-docker-opts.sh")]


def _needs_netns(case: Case) -> None:
    if case.netns_route and (
        os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip")
    ):
        pytest.skip("route-check cases need root, unshare and ip (a private network namespace)")


def _check(got: dict, want: dict, case: Case) -> None:
    assert got["exit"] == want["exit"], got["stderr"]
    assert got["output"] == (DATA / "expected" / want["output"]).read_text()
    if case.compare_stderr:
        assert got["stderr"] == want["stderr"]


def test_every_case_has_a_fixture():
    assert sorted(c.id for c in CASES) == sorted(_expected())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fastlane_docker_opts_matches_flannel(case: Case, tmp_path: Path):
    _needs_netns(case)
    _check(run_case(_fastlane_command(), case, tmp_path), _expected()[case.id], case)


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c.id
        in (
            "sample-none",
            "sample-icm-k",
            "vxlan-ipmasq-c",
            "missing-file",
            "bad-ipmasq",
            "env-preset-key",
            "help",
            "route-conflict",
        )
    ],
    ids=lambda c: c.id,
)
def test_dist_wrapper_matches_flannel(case: Case, tmp_path: Path):
    _needs_netns(case)
    _check(run_case(_wrapper_command(tmp_path), case, tmp_path / "run"), _expected()[case.id], case)


def test_flannels_own_test_vectors():
    """dist/mk_docker_opts_test.go's expectations, independent of the generated fixtures."""
    env = read_env_file((DATA / "inputs" / "sample.env").read_text())
    both = render(env, False, False, True, "DOCKER_OPTS")
    assert both == (
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\nDOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    )
    assert (
        render(env, False, True, False, "CUSTOM_KEY")
        == 'CUSTOM_KEY=" --bip=10.1.74.1/24 --mtu=1472"\n'
    )


def test_unwritable_destination_is_an_error(tmp_path: Path):
    src = DATA / "inputs" / "sample.env"
    p = subprocess.run(
        [*_fastlane_command(), "-f", str(src), "-d", str(tmp_path / "no" / "such" / "dir")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and "cannot write" in p.stderr


def test_key_must_be_a_variable_name(tmp_path: Path):
    p = subprocess.run(
        [
            *_fastlane_command(),
            "-f",
            str(DATA / "inputs" / "sample.env"),
            "-d",
            str(tmp_path / "o"),
            "-k",
            "A;rm -rf /",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and "not a shell variable name" in p.stderr
    assert not (tmp_path / "o").exists()

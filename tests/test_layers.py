"""Layering: the data plane and the daemon import only what their layer allows.

Checked in a fresh interpreter each time, because this test process has long since
imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BACKEND_MODULES = [
    "fastlane.backend",
    "fastlane.backend.base",
    "fastlane.backend.alloc",
    "fastlane.backend.kernel",
    "fastlane.backend.hostgw",
    "fastlane.backend.vxlan",
    "fastlane.backend.udp",
    "fastlane.leasetable",
]
STORE_MODULES = ["fastlane.etcd", "etcd3aio", "grpc", "fastlane.registry", "fastlane.watcher"]
DAEMON_MODULES = [
    "fastlane.cli",
    "fastlane.daemon",
    "fastlane.leasescmd",
    "fastlane.registry",
    "fastlane.watcher",
    "fastlane.subnetfile",
    "fastlane.etcd",
]


def imported_after(module: str) -> set[str]:
    """The module names loaded by importing `module` in a fresh interpreter."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return set(json.loads(out))


def loaded(modules: set[str], roots: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


@pytest.mark.parametrize("module", BACKEND_MODULES)
def test_backends_depend_on_the_table_not_the_store(module: str) -> None:
    assert loaded(imported_after(module), STORE_MODULES) == []


@pytest.mark.parametrize("module", DAEMON_MODULES)
def test_the_daemon_does_not_import_the_bench_or_its_lab(module: str) -> None:
    assert loaded(imported_after(module), ["fastlane.bench"]) == []

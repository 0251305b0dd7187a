"""Network-namespace fixtures: build throwaway multi-host topologies that always clean up.

Loaded from tests/conftest.py (`pytest_plugins`). Tests that need namespaces skip cleanly on a
machine without root or /dev/net/tun rather than failing with an obscure `ip` error.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from fastlane.bench.lab.topology import Topology, cleanup_stale


def _net_capable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2"
    return None


@pytest.fixture(scope="session")
def net_capable() -> None:
    """Skip unless namespaces can be built; also clear leftovers of an earlier killed run."""
    reason = _net_capable()
    if reason:
        pytest.skip(reason)
    cleanup_stale()


@pytest.fixture
def topology(net_capable: None) -> Iterator[Callable[..., Topology]]:
    """Factory: `topo = topology(hosts=2, mtu=1500)` returns a set-up Topology.

    Every topology made through it is torn down at the end of the test, pass or fail.
    """
    made: list[Topology] = []

    def make(**kwargs: object) -> Topology:
        topo = Topology(**kwargs)  # type: ignore[arg-type]
        made.append(topo)
        topo.setup()
        return topo

    try:
        yield make
    finally:
        for topo in reversed(made):
            topo.teardown()

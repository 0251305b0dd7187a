"""Fixtures that start a real throwaway etcd, and the event-loop matrix for async tests.

Loaded by tests/conftest.py as a pytest plugin. Every async test in the suite runs once on the
stdlib asyncio loop and once on uvloop (the daemon's loop), because grpc.aio and pyroute2 behave
differently on the two. A test that only makes sense on one loop selects it with
``@pytest.mark.asyncio(loop_factories=["uvloop"])``. ``FASTLANE_TEST_LOOPS=uvloop`` (comma
separated) narrows the matrix for a quick local run.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import pytest
import uvloop

from fastlane.etcd import Store, parse_endpoints
from fastlane.etcdserver import EtcdServer

_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    wanted = [n.strip() for n in os.environ.get("FASTLANE_TEST_LOOPS", "").split(",") if n.strip()]
    if wanted:
        unknown = [n for n in wanted if n not in _LOOPS]
        if unknown:
            raise pytest.UsageError(f"FASTLANE_TEST_LOOPS: unknown loop(s) {unknown}; "
                                    f"known: {', '.join(_LOOPS)}")
        return {n: _LOOPS[n] for n in wanted}
    return dict(_LOOPS)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd for the whole session; tests isolate themselves by key prefix."""
    server = EtcdServer(name="fastlane-session")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A private etcd for tests that restart, kill or compact it."""
    server = EtcdServer(name="fastlane-private")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def prefix() -> str:
    """A flannel-style key prefix unique to this test, e.g. /fltest-1a2b3c4d/coreos.com/network."""
    return f"/fltest-{secrets.token_hex(4)}/coreos.com/network"


def _prefix_root(prefix: str) -> str:
    return "/" + prefix.strip("/").split("/")[0] + "/"


@pytest.fixture
async def store(etcd_server: EtcdServer, prefix: str) -> AsyncIterator[Store]:
    """A Store on the session etcd; everything under the test's prefix root is deleted after."""
    st = await Store.connect(parse_endpoints(etcd_server.endpoint), timeout=5.0)
    try:
        yield st
    finally:
        try:
            await st.delete_prefix(_prefix_root(prefix))
        finally:
            await st.close()

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
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import pytest
import uvloop

from fastlane.bench.lab.etcdserver import EtcdServer, ServerTLS
from fastlane.etcd import Store, TLSFiles, parse_endpoints

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
            raise pytest.UsageError(
                f"FASTLANE_TEST_LOOPS: unknown loop(s) {unknown}; known: {', '.join(_LOOPS)}"
            )
        return {n: _LOOPS[n] for n in wanted}
    return dict(_LOOPS)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd for the whole session; tests isolate themselves by key prefix."""
    with EtcdServer(name="fastlane-session") as server:
        yield server


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A private etcd for tests that restart, kill or compact it."""
    with EtcdServer(name="fastlane-private") as server:
        yield server


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


def make_test_pki(directory: str) -> dict[str, str]:
    """A throwaway CA plus a server cert (127.0.0.1, localhost) and a client cert, made with the
    openssl CLI; returns the paths by role. Takes well under a second."""

    def run(*args: str) -> None:
        res = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.decode()[-300:]}")

    p = {
        n: os.path.join(directory, n)
        for n in (
            "ca.pem",
            "ca-key.pem",
            "server.pem",
            "server-key.pem",
            "client.pem",
            "client-key.pem",
            "other-ca.pem",
            "other-ca-key.pem",
        )
    }
    for ca, key, cn in (
        ("ca.pem", "ca-key.pem", "fastlane test CA"),
        ("other-ca.pem", "other-ca-key.pem", "unrelated CA"),
    ):
        run(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            p[key],
            "-out",
            p[ca],
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
        )
    for name, ext in (
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        csr = os.path.join(directory, f"{name}.csr")
        extfile = os.path.join(directory, f"{name}.ext")
        with open(extfile, "w") as f:
            f.write(ext + "\n")
        run(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            p[f"{name}-key.pem"],
            "-out",
            csr,
            "-subj",
            f"/CN=fastlane-{name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            p["ca.pem"],
            "-CAkey",
            p["ca-key.pem"],
            "-CAcreateserial",
            "-out",
            p[f"{name}.pem"],
            "-days",
            "2",
            "-extfile",
            extfile,
        )
    return p


@pytest.fixture
def etcd_tls() -> Iterator[tuple[EtcdServer, TLSFiles, dict[str, str]]]:
    """A private etcd that serves https only and requires client certificates (like flannel's
    functional suite); yields the server, the client's TLSFiles and all the PKI paths."""
    pki_dir = tempfile.mkdtemp(prefix="fastlane-pki-")
    server: EtcdServer | None = None
    try:
        pki = make_test_pki(pki_dir)
        server = EtcdServer(
            name="fastlane-tls",
            tls=ServerTLS(
                cert_file=pki["server.pem"],
                key_file=pki["server-key.pem"],
                trusted_ca_file=pki["ca.pem"],
                client_cert_auth=True,
                client_cert_file=pki["client.pem"],
                client_key_file=pki["client-key.pem"],
            ),
        )
        server.start()
        yield server, TLSFiles(pki["ca.pem"], pki["client.pem"], pki["client-key.pem"]), pki
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(pki_dir, ignore_errors=True)

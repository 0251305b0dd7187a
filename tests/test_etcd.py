"""The etcd adapter against a real etcd (tests/fixtures_etcd.py), with etcdctl as the oracle."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlane.bench.lab.etcdserver import EtcdServer
from fastlane.etcd import (
    Endpoint,
    EtcdAuthError,
    EtcdError,
    EtcdUnavailable,
    Event,
    Store,
    TLSFiles,
    WatchInterrupted,
    parse_endpoints,
)
from tests.waiting import wait_until_async

# -------------------------------------------------------------------------------------------
# parse_endpoints


def _no_dns(host: str) -> str:
    table = {"etcd1.example": "10.0.0.1", "etcd-2.example": "10.0.0.2"}
    if host not in table:
        raise ValueError(f"cannot resolve host {host!r}")
    return table[host]


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            "http://127.0.0.1:4001,http://127.0.0.1:2379",
            [Endpoint("127.0.0.1", 4001, False), Endpoint("127.0.0.1", 2379, False)],
        ),
        ("https://10.1.2.3:2379", [Endpoint("10.1.2.3", 2379, True)]),
        ("HTTPS://10.1.2.3:2379/", [Endpoint("10.1.2.3", 2379, True)]),
        ("10.1.2.3:12379", [Endpoint("10.1.2.3", 12379, False)]),
        ("http://10.1.2.3", [Endpoint("10.1.2.3", 2379, False)]),
        ("localhost:2379", [Endpoint("localhost", 2379, False)]),
        (" http://127.0.0.1:2379 , http://127.0.0.1:2379,", [Endpoint("127.0.0.1", 2379, False)]),
        (
            "https://etcd1.example:2379,http://etcd-2.example:4001",
            [
                Endpoint("10.0.0.1", 2379, True, "etcd1.example"),
                Endpoint("10.0.0.2", 4001, False, "etcd-2.example"),
            ],
        ),
    ],
)
def test_parse_endpoints_examples(spec: str, expected: list[Endpoint]) -> None:
    assert parse_endpoints(spec, resolve=_no_dns) == expected


@pytest.mark.parametrize(
    "spec, bad_item, why",
    [
        ("", "", "no endpoint"),
        ("ftp://1.2.3.4:21", "ftp://1.2.3.4:21", "scheme"),
        ("http://127.0.0.1:2379,http://1.2.3.4:99999", "http://1.2.3.4:99999", "port"),
        ("http://1.2.3.4:0", "http://1.2.3.4:0", "port"),
        ("http://1.2.3.4:abc", "http://1.2.3.4:abc", "port"),
        ("http://[::1]:2379", "http://[::1]:2379", "IPv6"),
        ("http://1.2.3.4:2379/v2/keys", "http://1.2.3.4:2379/v2/keys", "path"),
        ("http://999.1.1.1:2379", "http://999.1.1.1:2379", "IPv4"),
        ("http://nosuch.example:2379", "http://nosuch.example:2379", "resolve"),
        ("http://bad_host!:2379", "http://bad_host!:2379", "host"),
        ("http://:2379", "http://:2379", "host"),
        ("http://user:pw@1.2.3.4:2379", "http://user:pw@1.2.3.4:2379", "credentials"),
    ],
)
def test_parse_endpoints_rejects(spec: str, bad_item: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_endpoints(spec, resolve=_no_dns)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("bad etcd endpoint")
    assert repr(bad_item) in msg or not bad_item
    assert why.lower() in msg.lower()


def test_parse_endpoints_resolves_hostnames_with_the_system_resolver() -> None:
    # "localhost." (with the root dot) is not special-cased, so it goes through getaddrinfo;
    # /etc/hosts answers it, no DNS traffic leaves the machine.
    [ep] = parse_endpoints("https://localhost.:2379")
    assert ep == Endpoint("127.0.0.1", 2379, True, "localhost")


_ipv4 = st.ip_addresses(v=4).map(str)
_port = st.integers(1, 65535)
_scheme = st.sampled_from(["http://", "https://", ""])


@given(st.lists(st.tuples(_scheme, _ipv4, _port), min_size=1, max_size=5))
def test_parse_endpoints_round_trips_formatted_lists(items: list[tuple[str, str, int]]) -> None:
    spec = ",".join(f"{scheme}{host}:{port}" for scheme, host, port in items)
    expected: list[Endpoint] = []
    for scheme, host, port in items:
        ep = Endpoint(host, port, scheme == "https://")
        if ep not in expected:
            expected.append(ep)
    assert parse_endpoints(spec, resolve=_no_dns) == expected


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_parse_endpoints_never_crashes(spec: str) -> None:
    try:
        eps = parse_endpoints(spec, resolve=_no_dns)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("bad etcd endpoint")
    else:
        assert eps
        for ep in eps:
            assert 1 <= ep.port <= 65535
            assert ep.host == "localhost" or all(p.isdigit() for p in ep.host.split("."))


# -------------------------------------------------------------------------------------------
# KV and transactions


async def test_crud_matches_etcdctl(store: Store, prefix: str, etcd_server: EtcdServer) -> None:
    key = f"{prefix}/config"
    assert await store.get(key) is None
    rev = await store.put(key, b'{"Network":"10.5.0.0/16"}')
    kv = await store.get(key)
    assert kv is not None and kv.value == b'{"Network":"10.5.0.0/16"}'
    assert kv.mod_revision == rev == kv.create_revision and kv.lease == 0
    # The oracle sees what we wrote, and we see what it writes.
    assert (
        etcd_server.etcdctl("get", "--print-value-only", key).strip() == '{"Network":"10.5.0.0/16"}'
    )
    etcd_server.etcdctl("put", f"{prefix}/subnets/10.5.1.0-24", '{"PublicIP":"1.2.3.4"}')
    kvs, list_rev = await store.list_prefix(f"{prefix}/subnets/")
    assert [k.key for k in kvs] == [f"{prefix}/subnets/10.5.1.0-24"]
    assert json.loads(kvs[0].value) == {"PublicIP": "1.2.3.4"}
    assert list_rev >= kvs[0].mod_revision > rev
    assert await store.delete(key) is True
    assert await store.delete(key) is False
    assert await store.get(key) is None
    assert etcd_server.etcdctl("get", key).strip() == ""


async def test_list_is_prefix_scoped(store: Store, prefix: str) -> None:
    await store.put(f"{prefix}/subnets/a", b"1")
    await store.put(f"{prefix}/subnets/b", b"2")
    await store.put(f"{prefix}/subnetsX", b"3")
    kvs, _ = await store.list_prefix(f"{prefix}/subnets/")
    assert [(k.key.rsplit("/", 1)[1], k.value) for k in kvs] == [("a", b"1"), ("b", b"2")]


async def test_create_is_atomic(store: Store, prefix: str) -> None:
    key = f"{prefix}/subnets/10.5.7.0-24"
    results = await asyncio.gather(*(store.create(key, f"{i}".encode()) for i in range(20)))
    assert results.count(True) == 1
    winner = results.index(True)
    kv = await store.get(key)
    assert kv is not None and kv.value == f"{winner}".encode()
    assert await store.create(key, b"late") is False


async def test_replace_is_compare_and_swap(store: Store, prefix: str) -> None:
    key = f"{prefix}/subnets/10.5.8.0-24"
    await store.put(key, b"v1")
    kv = await store.get(key)
    assert kv is not None
    assert await store.replace(key, b"v2", kv.mod_revision) is True
    assert await store.replace(key, b"v3", kv.mod_revision) is False  # stale revision
    now = await store.get(key)
    assert now is not None and now.value == b"v2" and now.mod_revision > kv.mod_revision
    # mod_revision 0 is etcd's "absent": replace then only succeeds if nobody created the key.
    assert await store.replace(f"{prefix}/absent", b"x", 0) is True
    assert await store.replace(f"{prefix}/absent", b"y", 0) is False


async def test_lease_expiry_removes_key(store: Store, prefix: str) -> None:
    lease = await store.grant(2)
    assert lease > 0
    assert 0 < await store.lease_ttl(lease) <= 2
    key = f"{prefix}/subnets/10.5.9.0-24"
    assert await store.create(key, b"x", lease=lease) is True
    kv = await store.get(key)
    assert kv is not None and kv.lease == lease

    async def gone() -> bool:
        return await store.get(key) is None

    assert await wait_until_async(gone, timeout=10, interval=0.25), "key outlived its 2 s lease"
    assert await store.lease_ttl(lease) == -1
    assert await store.lease_ttl(0x7FFF_FFFF_FFFF) == -1  # never existed


# -------------------------------------------------------------------------------------------
# Watch


async def _collect(store: Store, prefix: str, start: int, n: int, out: list[Event]) -> None:
    async for batch in store.watch(prefix, start):
        out.extend(batch)
        if len(out) >= n:
            return


async def test_watch_delivers_in_order_from_start_revision(store: Store, prefix: str) -> None:
    sub = f"{prefix}/subnets/"
    before = await store.put(f"{sub}a", b"old")  # before the start revision: not delivered
    first = await store.put(f"{sub}b", b"1")
    await store.put(f"{sub}c", b"2")
    await store.delete(f"{sub}b")
    await store.put(f"{prefix}/elsewhere", b"not under the watched prefix")
    events: list[Event] = []
    task = asyncio.create_task(_collect(store, sub, before + 1, 5, events))
    await asyncio.sleep(0.2)
    await store.put(f"{sub}a", b"new")
    await store.delete(f"{sub}c")
    await asyncio.wait_for(task, 5)
    assert [(e.type, e.key.rsplit("/", 1)[1], e.value) for e in events] == [
        ("put", "b", b"1"),
        ("put", "c", b"2"),
        ("delete", "b", b""),
        ("put", "a", b"new"),
        ("delete", "c", b""),
    ]
    assert [e.mod_revision for e in events] == sorted(e.mod_revision for e in events)
    assert events[0].mod_revision == first


async def test_watch_interrupted_by_restart_then_relist_sees_all(
    etcd: EtcdServer, prefix: str
) -> None:
    st = await Store.connect(parse_endpoints(etcd.endpoint), timeout=3.0)
    try:
        kvs, rev = await st.list_prefix(prefix)
        seen: list[Event] = []

        async def watch() -> None:
            async for batch in st.watch(prefix, rev + 1):
                seen.extend(batch)

        task = asyncio.create_task(watch())
        await st.put(f"{prefix}/subnets/a", b"1")
        await asyncio.sleep(0.3)
        await asyncio.to_thread(etcd.stop)
        # Written while our watch is down (by someone else, as far as we know).
        await asyncio.to_thread(etcd.start)
        etcd.etcdctl("put", f"{prefix}/subnets/b", "2")
        with pytest.raises(WatchInterrupted) as info:
            await asyncio.wait_for(task, 10)
        assert not info.value.compacted and "\n" not in str(info.value)
        assert [e.key for e in seen] == [f"{prefix}/subnets/a"]
        # The caller's recovery: re-list (retrying while the server comes back), re-watch.
        kvs, rev2 = await st.list_prefix(prefix)
        assert sorted(k.key.rsplit("/", 1)[1] for k in kvs) == ["a", "b"]
        events: list[Event] = []
        task = asyncio.create_task(_collect(st, prefix, rev2 + 1, 1, events))
        await asyncio.sleep(0.2)
        await st.delete(f"{prefix}/subnets/a")
        await asyncio.wait_for(task, 5)
        assert [(e.type, e.key) for e in events] == [("delete", f"{prefix}/subnets/a")]
    finally:
        await st.close()


async def test_watch_from_compacted_revision_is_interrupted(etcd: EtcdServer, prefix: str) -> None:
    st = await Store.connect(parse_endpoints(etcd.endpoint), timeout=3.0)
    try:
        first = await st.put(f"{prefix}/k", b"1")
        for i in range(3):
            await st.put(f"{prefix}/k", str(i).encode())
        _, rev = await st.list_prefix(prefix)
        await st.compact(rev)
        await st.compact(rev)  # compacting again to the same revision is harmless
        with pytest.raises(WatchInterrupted) as info:
            async for _ in st.watch(prefix, first):
                pass
        assert info.value.compacted and info.value.compact_revision == rev
        # Watching from after the compaction works.
        events: list[Event] = []
        task = asyncio.create_task(_collect(st, prefix, rev + 1, 1, events))
        await asyncio.sleep(0.2)
        await st.put(f"{prefix}/k", b"after")
        await asyncio.wait_for(task, 5)
        assert events[0].value == b"after"
    finally:
        await st.close()


# -------------------------------------------------------------------------------------------
# Failures


async def test_connect_to_dead_port_is_unavailable_quickly() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: nobody answers here
        t0 = time.monotonic()
        with pytest.raises(EtcdUnavailable) as info:
            await Store.connect(parse_endpoints(f"http://127.0.0.1:{port}"), timeout=2.0)
        assert time.monotonic() - t0 < 2.0 + 1.0
    msg = str(info.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg


async def test_errors_after_server_death_are_mapped(etcd: EtcdServer, prefix: str) -> None:
    st = await Store.connect(parse_endpoints(etcd.endpoint), timeout=2.0)
    try:
        await st.put(f"{prefix}/k", b"1")
        await asyncio.to_thread(etcd.kill)
        with pytest.raises(EtcdUnavailable) as info:
            await st.get(f"{prefix}/k")
        assert "\n" not in str(info.value) and str(etcd.client_port) in str(info.value)
        with pytest.raises(WatchInterrupted):
            async for _ in st.watch(prefix, 1):
                pass
        await asyncio.to_thread(etcd.start)
        kv = await st.get(f"{prefix}/k")
        assert kv is not None and kv.value == b"1"
    finally:
        await st.close()
    with pytest.raises(EtcdError):
        await st.get(f"{prefix}/k")


# -------------------------------------------------------------------------------------------
# TLS and auth


async def test_tls_with_client_certificates(etcd_tls, prefix: str) -> None:
    server, files, pki = etcd_tls
    eps = parse_endpoints(server.endpoint)
    assert eps[0].tls
    st = await Store.connect(eps, tls=files, timeout=3.0)
    try:
        await st.put(f"{prefix}/k", b"over tls")
        assert server.etcdctl("get", "--print-value-only", f"{prefix}/k").strip() == "over tls"
        kvs, rev = await st.list_prefix(prefix)
        assert len(kvs) == 1
    finally:
        await st.close()
    # "localhost" must verify against the DNS SAN, the IP against the IP SAN.
    st = await Store.connect(
        parse_endpoints(f"https://localhost:{server.client_port}"), tls=files, timeout=3.0
    )
    await st.close()


async def test_tls_failures_are_one_line_errors(etcd_tls) -> None:
    server, files, pki = etcd_tls
    eps = parse_endpoints(server.endpoint)
    # A CA that did not sign the server's certificate.
    wrong_ca = TLSFiles(pki["other-ca.pem"], files.certfile, files.keyfile)
    with pytest.raises(EtcdUnavailable) as info:
        await Store.connect(eps, tls=wrong_ca, timeout=2.0)
    assert "\n" not in str(info.value) and str(server.client_port) in str(info.value)
    # No client certificate: flanneld then does not use the CA either; the server refuses us.
    with pytest.raises(EtcdUnavailable):
        await Store.connect(eps, tls=TLSFiles(files.cafile, None, None), timeout=2.0)
    # Plain http against a TLS-only server.
    with pytest.raises(EtcdUnavailable):
        await Store.connect(
            parse_endpoints(f"http://127.0.0.1:{server.client_port}"), tls=files, timeout=2.0
        )
    with pytest.raises(EtcdError, match="cannot read etcd cafile"):
        await Store.connect(
            eps, tls=TLSFiles("/nonexistent/ca.pem", files.certfile, files.keyfile), timeout=2.0
        )


async def test_auth_and_token_refresh_after_restart(etcd: EtcdServer, prefix: str) -> None:
    etcd.etcdctl("user", "add", "root:rootpw")
    etcd.etcdctl("auth", "enable")
    eps = parse_endpoints(etcd.endpoint)
    with pytest.raises(EtcdAuthError) as info:
        await Store.connect(eps, username="root", password="wrong", timeout=3.0)
    assert "\n" not in str(info.value) and "root" in str(info.value)
    anonymous = await Store.connect(eps, timeout=3.0)
    try:
        with pytest.raises(EtcdAuthError):
            await anonymous.get(f"{prefix}/k")
    finally:
        await anonymous.close()

    st = await Store.connect(eps, username="root", password="rootpw", timeout=3.0)
    try:
        await st.put(f"{prefix}/k", b"1")
        # Simple tokens live in etcd's memory: after a restart ours is unknown. The store must
        # authenticate again by itself, for unary calls and for watches.
        await asyncio.to_thread(etcd.restart)
        kv = await st.get(f"{prefix}/k")
        assert kv is not None and kv.value == b"1"
        await asyncio.to_thread(etcd.restart)
        events: list[Event] = []
        try:
            await asyncio.wait_for(_collect(st, prefix, kv.mod_revision, 1, events), 5)
        except WatchInterrupted:
            # Allowed once (stale token); the next watch must work without other calls.
            await asyncio.wait_for(_collect(st, prefix, kv.mod_revision, 1, events), 5)
        assert events[0].value == b"1"
    finally:
        await st.close()


# -------------------------------------------------------------------------------------------
# Several endpoints, hung servers


async def test_failover_between_endpoints(etcd: EtcdServer, prefix: str) -> None:
    with EtcdServer(name="fastlane-second") as second:
        dead = _dead_port()
        # The dead endpoint comes first: connect must skip it.
        spec = f"http://127.0.0.1:{dead},{etcd.endpoint},{second.endpoint}"
        st = await Store.connect(parse_endpoints(spec), timeout=2.0)
        try:
            assert st.endpoint is not None and st.endpoint.port in (
                etcd.client_port,
                second.client_port,
            )
            first_port = st.endpoint.port
            other = second if first_port == etcd.client_port else etcd
            other.etcdctl("put", f"{prefix}/where", str(other.client_port))
            assert await st.get(f"{prefix}/where") is None  # talking to the first one
            # The one in use dies: the next call moves to the other without an error.
            await asyncio.to_thread((etcd if other is second else second).kill)
            kv = await st.get(f"{prefix}/where")
            assert kv is not None and kv.value == str(other.client_port).encode()
            assert st.endpoint is not None and st.endpoint.port == other.client_port
        finally:
            await st.close()


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_connect_to_a_silent_server_times_out() -> None:
    import socket

    # Accepts TCP (the kernel does, via the backlog) but never speaks HTTP/2.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(EtcdUnavailable) as info:
            await Store.connect(parse_endpoints(f"127.0.0.1:{port}"), timeout=1.0)
        assert 0.9 < time.monotonic() - t0 < 3.0
        assert str(port) in str(info.value) and "\n" not in str(info.value)


async def test_watch_notices_a_hung_server(etcd: EtcdServer, prefix: str) -> None:
    import os
    import signal

    st = await Store.connect(parse_endpoints(etcd.endpoint), timeout=1.0, progress_interval=0.5)
    stopped = False
    try:
        _, rev = await st.list_prefix(prefix)
        events: list[Event] = []
        task = asyncio.create_task(_collect(st, prefix, rev + 1, 99, events))
        await asyncio.sleep(2.0)  # idle longer than progress_interval + timeout: still alive
        assert not task.done()
        await st.put(f"{prefix}/k", b"1")
        await asyncio.sleep(0.3)
        assert [e.value for e in events] == [b"1"]
        assert etcd.pid is not None
        os.kill(etcd.pid, signal.SIGSTOP)  # our own etcd: alive for TCP, silent for gRPC
        stopped = True
        t0 = time.monotonic()
        with pytest.raises(WatchInterrupted, match="no answer"):
            await asyncio.wait_for(task, 10)
        assert time.monotonic() - t0 < 4.0
        # A new watch cannot be established either, and says so within the deadline.
        t0 = time.monotonic()
        with pytest.raises(WatchInterrupted):
            async for _ in st.watch(prefix, rev + 1):
                pass
        assert time.monotonic() - t0 < 3.0
        with pytest.raises(EtcdUnavailable):
            await st.get(f"{prefix}/k")
        os.kill(etcd.pid, signal.SIGCONT)
        stopped = False
        kv = await st.get(f"{prefix}/k")
        assert kv is not None and kv.value == b"1"
    finally:
        if stopped and etcd.pid is not None:
            os.kill(etcd.pid, signal.SIGCONT)
        await st.close()


# -------------------------------------------------------------------------------------------
# The throwaway server itself


def test_etcd_server_lifecycle(tmp_path) -> None:
    data = tmp_path / "etcd-data"
    server = EtcdServer(data_dir=str(data), name="fastlane-lifecycle")
    try:
        server.start()
        port, pid = server.client_port, server.pid
        assert port not in (2379, 2380) and server.peer_port not in (2379, 2380, port)
        assert server.endpoint == f"http://127.0.0.1:{port}"
        server.etcdctl("put", "/k", "kept")
        server.restart()
        assert server.client_port == port and server.pid != pid
        assert server.etcdctl("get", "--print-value-only", "/k").strip() == "kept"
        server.kill()
        assert not server.running()
        server.kill()
        server.stop()  # idempotent
        with pytest.raises(RuntimeError, match="etcdctl get /k failed"):
            server.etcdctl("get", "/k")
    finally:
        server.cleanup()
    assert (data / "member").is_dir()  # a data dir we were given is never removed
    assert "starting etcd" in (tmp_path / "etcd-data.etcd.log").read_text()


def test_etcd_server_temp_dir_is_removed() -> None:
    import os

    with EtcdServer() as server:
        data_dir = server.data_dir
        assert os.path.isdir(data_dir)
    assert not os.path.exists(data_dir)


def test_etcd_server_start_failures_are_one_line(tmp_path, monkeypatch) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("not an etcd data dir")
    with pytest.raises(RuntimeError) as info:
        EtcdServer(data_dir=str(not_a_dir)).start(timeout=10)
    assert "\n" not in str(info.value) and str(info.value).startswith("etcd ")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        RuntimeError,
        match=r"^etcd not found: apt-get install -y etcd-server "
        r"etcd-client$",
    ):
        EtcdServer().start()


async def test_credentials_for_a_server_without_auth_are_ignored(
    etcd_server: EtcdServer, prefix: str, caplog
) -> None:
    st = await Store.connect(
        parse_endpoints(etcd_server.endpoint), username="flannel", password="secret", timeout=3.0
    )
    try:
        await st.put(f"{prefix}/k", b"1")
        assert (await st.get(f"{prefix}/k")) is not None
        assert "authentication is not enabled" in caplog.text
        await st.delete(f"{prefix}/k")
    finally:
        await st.close()


async def test_closing_the_store_ends_its_watches(etcd_server: EtcdServer, prefix: str) -> None:
    st = await Store.connect(parse_endpoints(etcd_server.endpoint), timeout=3.0)
    _, rev = await st.list_prefix(prefix)
    events: list[Event] = []
    task = asyncio.create_task(_collect(st, prefix, rev + 1, 1, events))
    await asyncio.sleep(0.2)
    await st.close()
    with pytest.raises(WatchInterrupted):
        await asyncio.wait_for(task, 5)
    with pytest.raises(EtcdError, match="closed"):
        await st.put(f"{prefix}/k", b"1")

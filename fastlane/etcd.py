"""The one place where fastlane talks to etcd (v3 API, over etcd3aio and grpc.aio).

Why an adapter: etcd3aio is young and leaks its transport (protobuf messages, raw
``grpc.aio.AioRpcError``), its watch silently resumes after a reconnect (and can skip events
on the way), a compacted watch just hangs, and its token refresher never recovers from an
etcd restart. Everything above this module sees plain
dataclasses, a handful of exception classes with one-line messages, and a watch that either
delivers every event in order or raises :class:`WatchInterrupted` so the caller re-lists.

We use etcd3aio's per-service classes (KV, Lease, Auth, Maintenance) over a gRPC channel we
build ourselves: that gives us control over TLS (system roots, server-name override for
hostnames we resolved), keepalives (a dead server must be noticed under an idle watch) and
reconnect backoff (so a restarted etcd is usable again within a second or two).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ipaddress
import logging
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

# gRPC's C core logs handshake and connection failures straight to stderr; we report them
# as one-line errors instead. GRPC_VERBOSITY=DEBUG in the environment still turns them on.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
import grpc.aio  # noqa: E402

import etcd3aio  # noqa: E402
from etcd3aio._protobuf import Compare, WatchCreateRequest, WatchRequest, WatchStub, rpc_pb2
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService, prefix_range_end
from etcd3aio.lease import LeaseService
from etcd3aio.maintenance import MaintenanceService

__all__ = [
    "Endpoint",
    "EtcdAuthError",
    "EtcdError",
    "EtcdUnavailable",
    "Event",
    "KeyValue",
    "Store",
    "TLSFiles",
    "WatchInterrupted",
    "parse_endpoints",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORT = 2379

# -------------------------------------------------------------------------------------------
# Errors


class EtcdError(Exception):
    """Any failure talking to etcd; the message is one line and names the endpoint/key."""


class EtcdUnavailable(EtcdError):
    """No endpoint could be reached, or the call ran past its deadline: worth retrying later."""


class EtcdAuthError(EtcdError):
    """Bad credentials or missing permission: retrying will not help."""


class WatchInterrupted(EtcdError):
    """The watch can no longer guarantee that it delivered every event; re-list and re-watch.

    ``compacted`` is True when the requested history is gone (start revision older than the last
    compaction); ``compact_revision`` is then the oldest revision etcd still has.
    """

    def __init__(self, message: str, *, compacted: bool = False, compact_revision: int = 0):
        super().__init__(message)
        self.compacted = compacted
        self.compact_revision = compact_revision


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -------------------------------------------------------------------------------------------
# Endpoints and TLS files


@dataclass(frozen=True)
class Endpoint:
    """One etcd client address. ``host`` is an IPv4 literal or "localhost"; ``server_name`` keeps
    the hostname the user wrote (before we resolved it) for TLS certificate checks."""

    host: str
    port: int
    tls: bool = False
    server_name: str | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.server_name or self.host}:{self.port}"


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                          r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def _resolve_ipv4(host: str) -> str:
    """Resolve a hostname to its first IPv4 address (etcd3aio/gRPC here take IPv4 literals)."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.args[1] if isinstance(exc, socket.gaierror) and len(exc.args) > 1 else exc
        raise ValueError(f"cannot resolve host {host!r} to an IPv4 address ({reason})") from None
    if not infos:
        raise ValueError(f"host {host!r} has no IPv4 address")
    return str(infos[0][4][0])


def _parse_one(item: str, resolve: Callable[[str], str]) -> Endpoint:
    if any(c.isspace() for c in item):
        raise ValueError("contains whitespace")
    tls = False
    if "://" in item:
        scheme, _, _rest = item.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r} (use http or https)")
        tls = scheme == "https"
        url = item
    else:
        url = "http://" + item
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(_one_line(str(exc))) from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a path, query or fragment is not allowed")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported (use -etcd-username/-etcd-password)")
    host = parts.hostname
    if not host:
        raise ValueError("missing host")
    port_text = parts.netloc.rpartition("]")[2].rpartition(":")[2] if ":" in parts.netloc else ""
    if port is not None and not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise ValueError(f"invalid port {port_text!r}")
    if port is None:
        if parts.netloc.endswith(":"):
            raise ValueError("empty port")
        port = DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if "[" in parts.netloc or ":" in host:
        raise ValueError("IPv6 endpoints are not supported; use an IPv4 address or a hostname")
    server_name: str | None = None
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        if host.lower() == "localhost":
            host = "localhost"
        elif re.fullmatch(r"[0-9.]+", host):
            raise ValueError(f"invalid IPv4 address {host!r}") from None
        elif not _HOSTNAME_RE.match(host):
            raise ValueError(f"invalid host name {host!r}") from None
        else:
            server_name = host.rstrip(".")
            host = resolve(server_name)
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise ValueError(f"resolver returned {host!r}, not an IPv4 address") from None
    return Endpoint(host=host, port=port, tls=tls, server_name=server_name)


def parse_endpoints(spec: str, *, resolve: Callable[[str], str] | None = None) -> list[Endpoint]:
    """Turn flanneld's -etcd-endpoints value into endpoints, in order, without duplicates.

    Accepts ``http://h:p``, ``https://h:p`` and bare ``h:p`` (plain), comma separated; a missing
    port means 2379. Hostnames are resolved to IPv4 here (``resolve`` lets tests avoid DNS).
    Raises ValueError("bad etcd endpoint 'x': why") naming the offending item.
    """
    resolver = resolve or _resolve_ipv4
    items = [part.strip() for part in spec.split(",")]
    items = [part for part in items if part]
    if not items:
        raise ValueError(f"bad etcd endpoints {_one_line(spec, 80)!r}: no endpoint given")
    out: list[Endpoint] = []
    for item in items:
        try:
            ep = _parse_one(item, resolver)
        except ValueError as exc:
            raise ValueError(f"bad etcd endpoint {_one_line(item, 120)!r}: {_one_line(str(exc))}") from None
        if ep not in out:
            out.append(ep)
    return out


@dataclass(frozen=True)
class TLSFiles:
    """flanneld's -etcd-cafile/-etcd-certfile/-etcd-keyfile (paths, PEM)."""

    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise EtcdError(f"cannot read etcd {what} {path!r}: {exc.strerror or exc}") from None


def _credentials(tls: TLSFiles | None) -> Any:
    """Return the gRPC channel credentials used for https endpoints.

    Like flanneld: without both cert and key we do not present a client certificate and the CA
    file is ignored (with a warning). https endpoints then still speak TLS, verified against the
    system roots, which is what etcd's Go client does for an https URL without a TLS config.
    """
    if tls is None or not tls.certfile or not tls.keyfile:
        if tls is not None and (tls.certfile or tls.keyfile or tls.cafile):
            _log.warning("etcd: client certificate or key missing: not using TLS client "
                         "credentials (the CA file is ignored too), like flanneld")
        return grpc.ssl_channel_credentials()
    ca = _read_pem(tls.cafile, "cafile") if tls.cafile else None
    cert = _read_pem(tls.certfile, "certfile")
    key = _read_pem(tls.keyfile, "keyfile")
    # gRPC only says "Failed to create security handshaker" for a bad pair; check it here so
    # the operator learns which file is wrong.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise EtcdError(f"etcd certfile {tls.certfile!r} and keyfile {tls.keyfile!r} are not a "
                        f"valid certificate/key pair ({_one_line(str(exc), 120)})") from None
    if tls.cafile:
        try:
            ctx.load_verify_locations(cafile=tls.cafile)
        except (ssl.SSLError, OSError) as exc:
            raise EtcdError(f"etcd cafile {tls.cafile!r} holds no usable CA certificate "
                            f"({_one_line(str(exc), 120)})") from None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


# -------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class Event:
    type: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


def _key_bytes(key: str) -> bytes:
    # surrogateescape round-trips keys that are not valid UTF-8 (someone else's junk under our
    # prefix must not crash us, and we must be able to delete it again).
    return key.encode("utf-8", "surrogateescape")


def _key_str(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _kv(pb: Any) -> KeyValue:
    return KeyValue(key=_key_str(pb.key), value=bytes(pb.value),
                    create_revision=pb.create_revision, mod_revision=pb.mod_revision,
                    lease=pb.lease)


# -------------------------------------------------------------------------------------------
# Error mapping

_AUTH_DETAILS = ("authentication failed", "invalid auth token", "permission denied",
                 "user name", "auth: ", "revision of auth store is old", "invalid password")


def _rpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.aio.AioRpcError):
            return seen
        seen = seen.__cause__
    return None


def _map_error(exc: BaseException, what: str, where: str, timeout: float) -> EtcdError:
    """Translate anything etcd3aio/grpc raise into our classes, with a one-line message."""
    if isinstance(exc, EtcdError):
        return exc
    prefix = f"etcd {what} at {where}"
    if isinstance(exc, TimeoutError):
        return EtcdUnavailable(f"{prefix}: no answer within {timeout:g}s")
    rpc = _rpc_error(exc)
    if rpc is not None:
        code = rpc.code()
        detail = _one_line(rpc.details() or "")
        msg = f"{prefix}: {code.name}" + (f" ({detail})" if detail else "")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EtcdUnavailable(msg)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return EtcdAuthError(msg)
        if any(d in detail.lower() for d in _AUTH_DETAILS):
            return EtcdAuthError(msg)
        if code == grpc.StatusCode.CANCELLED and "channel closed" in detail.lower():
            return EtcdError(f"{prefix}: the store is closed")
        if code == grpc.StatusCode.CANCELLED or "too many requests" in detail.lower():
            return EtcdUnavailable(msg)  # server shutting down / overloaded: retry later
        return EtcdError(msg)
    if isinstance(exc, etcd3aio.EtcdConnectionError | etcd3aio.EtcdTransientError):
        return EtcdUnavailable(f"{prefix}: {_one_line(str(exc))}")
    if isinstance(exc, etcd3aio.EtcdUnauthenticatedError | etcd3aio.EtcdPermissionDeniedError):
        return EtcdAuthError(f"{prefix}: {_one_line(str(exc))}")
    if isinstance(exc, grpc.aio.UsageError):
        return EtcdError(f"{prefix}: the store is closed")
    return EtcdError(f"{prefix}: {type(exc).__name__}: {_one_line(str(exc))}")


def _token_expired(exc: BaseException) -> bool:
    """An auth token that etcd no longer knows (restart, TTL): re-authenticating fixes it."""
    rpc = _rpc_error(exc)
    if rpc is None:
        return False
    detail = (rpc.details() or "").lower()
    return "invalid auth token" in detail or "revision of auth store is old" in detail


# -------------------------------------------------------------------------------------------
# One connection (one endpoint, one channel)

# Keepalive pings only while a call (a watch) is open: etcd refuses pings on idle connections
# and pings more often than every 5 s. 10 s + 5 s means a silently dead server under an idle
# watch is noticed within ~15 s; a crashed or restarted one (RST) at once.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # Without this, gRPC's reconnect backoff grows to 2 minutes during an outage and calls keep
    # failing fast long after etcd is back.
    # (Not grpc.min_reconnect_backoff_ms: gRPC also uses it as the connect-attempt timeout.)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

# How often an idle watch asks etcd for a progress notification (a liveness probe).
_PROGRESS_INTERVAL = 5.0

_WATCH_METADATA = (("hasleader", "true"),)  # etcd cancels the watch if its member loses the leader


class _Conn:
    """A channel to one endpoint plus etcd3aio's services on it."""

    def __init__(self, endpoint: Endpoint, creds: Any) -> None:
        self.endpoint = endpoint
        host = "127.0.0.1" if endpoint.host == "localhost" else endpoint.host
        target = f"ipv4:{host}:{endpoint.port}"
        options = list(_CHANNEL_OPTIONS)
        if endpoint.tls:
            if endpoint.server_name:
                options.append(("grpc.ssl_target_name_override", endpoint.server_name))
            elif endpoint.host == "localhost":
                options.append(("grpc.ssl_target_name_override", "localhost"))
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        # Two attempts: etcd3aio retries UNAVAILABLE itself; more would only stretch outages.
        self.kv = KVService(self.channel, max_attempts=2)
        self.lease = LeaseService(self.channel, max_attempts=2)
        self.auth = AuthService(self.channel, max_attempts=1)
        self.maintenance = MaintenanceService(self.channel, max_attempts=1)
        self.watch_stub = WatchStub(self.channel)
        self.token: str | None = None
        self.token_generation = 0
        self.closed = False

    def set_token(self, token: str | None) -> None:
        self.token = token
        self.token_generation += 1
        for svc in (self.kv, self.lease, self.auth, self.maintenance):
            svc.set_token(token)

    def watch_metadata(self) -> tuple[tuple[str, str], ...]:
        return _WATCH_METADATA + ((("token", self.token),) if self.token else ())

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.channel.close()


# -------------------------------------------------------------------------------------------
# The store


class Store:
    """etcd as fastlane needs it: small KV, transactions, leases, and a gap-free watch.

    Several endpoints: the first that answers is used; when it fails, the next call probes all
    endpoints again and continues on whichever answers (the call that saw the failure is retried
    once if that moved us to another endpoint). Every call has a deadline of ``timeout``.
    """

    def __init__(self, endpoints: list[Endpoint], *, tls: TLSFiles | None, username: str | None,
                 password: str | None, timeout: float,
                 progress_interval: float = _PROGRESS_INTERVAL) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        self._endpoints = list(endpoints)
        self._creds = _credentials(tls)
        self._username = username or None
        self._password = password or ""
        self._timeout = float(timeout)
        self._progress_interval = float(progress_interval)
        self._conn: _Conn | None = None
        self._select_lock = asyncio.Lock()
        self._auth_lock = asyncio.Lock()
        self._closed = False
        self._auth_disabled_warned = False
        self._dropped: set[_Conn] = set()

    @property
    def endpoints_text(self) -> str:
        return ",".join(str(e) for e in self._endpoints)

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint currently in use (None before connect or after a failure)."""
        return self._conn.endpoint if self._conn else None

    @classmethod
    async def connect(cls, endpoints: list[Endpoint], *, tls: TLSFiles | None = None,
                      username: str | None = None, password: str | None = None,
                      timeout: float = 5.0,
                      progress_interval: float = _PROGRESS_INTERVAL) -> Store:
        """Connect to the first endpoint that answers within ``timeout`` (EtcdUnavailable if none,
        EtcdAuthError if the credentials are refused).

        ``progress_interval``: how often an idle watch asks etcd for a progress notification;
        a watch that hears nothing for that plus ``timeout`` raises WatchInterrupted.
        """
        store = cls(endpoints, tls=tls, username=username, password=password, timeout=timeout,
                    progress_interval=progress_interval)
        await store._current()
        return store

    # -- connection management ------------------------------------------------------------

    async def _authenticate(self, conn: _Conn) -> None:
        if self._username is None:
            return
        conn.set_token(None)  # a stale token on the Authenticate call itself makes it fail
        try:
            resp = await conn.auth.authenticate(self._username, self._password,
                                                timeout=self._timeout)
        except Exception as exc:  # noqa: BLE001 - mapped below
            rpc = _rpc_error(exc)
            if rpc is not None and "authentication is not enabled" in (rpc.details() or ""):
                if not self._auth_disabled_warned:
                    _log.warning("etcd at %s: authentication is not enabled; ignoring the "
                                 "username and password", conn.endpoint)
                    self._auth_disabled_warned = True
                return
            raise _map_error(exc, f"authenticate as {self._username!r}", str(conn.endpoint),
                             self._timeout) from None
        conn.set_token(resp.token)

    async def _probe(self, endpoint: Endpoint) -> _Conn:
        conn = _Conn(endpoint, self._creds)
        try:
            if self._username is not None:
                await self._authenticate(conn)
            if conn.token is None:
                # Status needs no key permission, so it works for any user.
                await conn.maintenance.status(timeout=self._timeout)
            return conn
        except BaseException:
            await conn.close()
            raise

    async def _select(self) -> _Conn:
        """Probe every endpoint at once and keep the first that answers (ties: list order)."""
        tasks = [asyncio.ensure_future(self._probe(ep)) for ep in self._endpoints]
        errors: dict[Endpoint, BaseException] = {}
        winner: _Conn | None = None
        try:
            async with asyncio.timeout(self._timeout):
                pending = set(tasks)
                while pending and winner is None:
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for ep, task in zip(self._endpoints, tasks, strict=True):
                        if not task.done() or ep in errors:
                            continue
                        exc = task.exception()
                        if exc is not None:
                            errors[ep] = exc
                        elif winner is None:
                            winner = task.result()
        except TimeoutError:
            pass
        finally:
            leftovers = [t for t in tasks if not t.done()]
            for task in leftovers:
                task.cancel()  # a cancelled probe closes its own channel
            if leftovers:
                await asyncio.gather(*leftovers, return_exceptions=True)
            for task in tasks:
                if (task.done() and not task.cancelled() and task.exception() is None
                        and task.result() is not winner):
                    await task.result().close()
        if winner is not None:
            if len(self._endpoints) > 1:
                _log.info("etcd: using endpoint %s", winner.endpoint)
            return winner
        auth = [e for e in errors.values() if isinstance(e, EtcdAuthError)]
        if auth:
            raise auth[0]
        reasons = []
        for ep in self._endpoints:
            err = errors.get(ep)
            if err is None:
                reasons.append(f"{ep} (no answer)")
            else:
                reasons.append(f"{ep} ({_short_reason(err)})")
        raise EtcdUnavailable(
            f"cannot reach any etcd endpoint (waited up to {self._timeout:g}s): "
            f"{'; '.join(reasons)}")

    async def _current(self) -> _Conn:
        if self._closed:
            raise EtcdError(f"etcd store for {self.endpoints_text} is closed")
        conn = self._conn
        if conn is not None:
            return conn
        async with self._select_lock:
            if self._conn is None:
                if self._closed:
                    raise EtcdError(f"etcd store for {self.endpoints_text} is closed")
                self._conn = await self._select()
            return self._conn

    async def _drop(self, conn: _Conn) -> None:
        """Forget a connection that failed, so the next call probes all endpoints again."""
        if self._conn is conn:
            self._conn = None
            # Close later: calls still running on it (a watch) end with an error of their own.
            self._dropped.add(conn)
            asyncio.get_running_loop().call_later(self._timeout, _close_soon, conn)

    async def _reauth(self, conn: _Conn, generation: int) -> None:
        async with self._auth_lock:
            if conn.token_generation != generation:
                return  # someone else refreshed it meanwhile
            _log.info("etcd at %s: auth token no longer valid, authenticating again",
                      conn.endpoint)
            await self._authenticate(conn)

    async def _call(self, what: str, fn: Callable[[_Conn], Awaitable[T]]) -> T:
        """Run one unary operation with deadline, error mapping, token refresh and failover."""
        conn = await self._current()
        for attempt in (1, 2):
            generation = conn.token_generation
            try:
                return await fn(conn)
            except asyncio.CancelledError:
                if _really_cancelled():
                    raise
                # grpc.aio raises CancelledError when the channel under the call is closed.
                if self._closed:
                    raise EtcdError(f"etcd {what} at {conn.endpoint}: the store is closed") \
                        from None
                raise EtcdUnavailable(f"etcd {what} at {conn.endpoint}: call cancelled "
                                      "(connection closed)") from None
            except Exception as exc:  # noqa: BLE001 - everything is mapped
                if attempt == 1 and self._username is not None and _token_expired(exc):
                    await self._reauth(conn, generation)
                    continue
                err = _map_error(exc, what, str(conn.endpoint), self._timeout)
                if isinstance(err, EtcdUnavailable) and attempt == 1:
                    await self._drop(conn)
                    if len(self._endpoints) > 1:
                        try:
                            new = await self._current()
                        except EtcdError:
                            raise err from None
                        if new.endpoint != conn.endpoint:
                            conn = new
                            continue
                raise err from None
        raise AssertionError("unreachable")

    # -- KV ---------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call(f"get {key}", lambda c: c.kv.get(_key_bytes(key),
                                                                 timeout=self._timeout))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        """Every key under ``prefix`` (sorted by key) and the revision they were read at."""
        raw = _key_bytes(prefix)
        resp = await self._call(f"list {prefix}", lambda c: c.kv.get(
            raw, range_end=prefix_range_end(raw), timeout=self._timeout))
        return [_kv(kv) for kv in resp.kvs], resp.header.revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = await self._call(f"put {key}", lambda c: c.kv.put(
            _key_bytes(key), bytes(value), lease=lease, timeout=self._timeout))
        return resp.header.revision

    async def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        """Put only if the key does not exist, in one transaction; False if it exists."""
        raw = _key_bytes(key)
        resp = await self._call(f"create {key}", lambda c: c.kv.txn(
            compare=[KVService.txn_compare_create_revision(raw, 0)],
            success=[KVService.txn_op_put(raw, bytes(value), lease=lease)],
            timeout=self._timeout))
        return bool(resp.succeeded)

    async def replace(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> bool:
        """Compare-and-swap: put only if the key still has ``mod_revision``.

        ``mod_revision=0`` is etcd's "the key does not exist", so it behaves like create().
        """
        raw = _key_bytes(key)
        compare = Compare(result=Compare.EQUAL, target=Compare.MOD, key=raw,
                          mod_revision=int(mod_revision))
        resp = await self._call(f"replace {key}", lambda c: c.kv.txn(
            compare=[compare],
            success=[KVService.txn_op_put(raw, bytes(value), lease=lease)],
            timeout=self._timeout))
        return bool(resp.succeeded)

    async def delete(self, key: str) -> bool:
        resp = await self._call(f"delete {key}", lambda c: c.kv.delete(
            _key_bytes(key), timeout=self._timeout))
        return resp.deleted > 0

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (test clean-up, `fastlane` maintenance)."""
        raw = _key_bytes(prefix)
        resp = await self._call(f"delete prefix {prefix}", lambda c: c.kv.delete(
            raw, range_end=prefix_range_end(raw), timeout=self._timeout))
        return int(resp.deleted)

    async def compact(self, revision: int) -> None:
        """Drop history up to ``revision``; already compacted that far is not an error."""
        try:
            await self._call(f"compact to revision {revision}", lambda c: c.kv.compact(
                revision, physical=True, timeout=self._timeout))
        except EtcdError as exc:
            if "required revision has been compacted" in str(exc):
                return
            raise

    # -- leases -------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        resp = await self._call(f"grant lease ttl={ttl}", lambda c: c.lease.grant(
            int(ttl), timeout=self._timeout))
        if resp.error:
            raise EtcdError(f"etcd grant lease ttl={ttl} at {self.endpoint}: "
                            f"{_one_line(resp.error)}")
        return int(resp.ID)

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining seconds of an etcd lease; -1 if it expired or never existed."""
        if lease_id == 0:
            return -1
        try:
            resp = await self._call(f"lease ttl {lease_id:x}", lambda c: c.lease.time_to_live(
                lease_id, timeout=self._timeout))
        except EtcdError as exc:
            if "lease not found" in str(exc):
                return -1
            raise
        return int(resp.TTL) if resp.TTL >= 0 else -1

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._call(f"revoke lease {lease_id:x}", lambda c: c.lease.revoke(
                lease_id, timeout=self._timeout))
        except EtcdError as exc:
            if "lease not found" not in str(exc):
                raise

    # -- watch --------------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[builtins.list[Event]]:
        """Yield batches of events under ``prefix`` in revision order from ``start_revision``.

        Raises WatchInterrupted whenever continuity is in doubt (stream error, etcd restart,
        compaction, cancellation, leader loss) and never resumes by itself: the caller re-lists
        and watches again from the listed revision + 1. It also raises, within ``timeout``, if
        the watch cannot be established at all.
        """
        where = self.endpoints_text
        try:
            conn = await self._current()
        except EtcdError as exc:
            raise WatchInterrupted(f"etcd watch {prefix} from revision {start_revision}: "
                                   f"cannot connect: {exc}") from None
        where = str(conn.endpoint)
        what = f"etcd watch {prefix} at {where} from revision {start_revision}"
        raw = _key_bytes(prefix)
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield WatchRequest(create_request=WatchCreateRequest(
                key=raw, range_end=prefix_range_end(raw), start_revision=start_revision))
            # Keep the request side open (closing it ends the watch) and ask for progress now
            # and then, so that a hung server is noticed (see the read timeout below).
            while not stop.is_set():
                try:
                    async with asyncio.timeout(self._progress_interval):
                        await stop.wait()
                except TimeoutError:
                    yield WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())

        call = conn.watch_stub.Watch(requests(), metadata=conn.watch_metadata())
        expected = start_revision
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    resp = await call.read()
            except TimeoutError:
                await self._drop(conn)
                raise WatchInterrupted(f"{what}: not established within {self._timeout:g}s") \
                    from None
            while True:
                if resp is grpc.aio.EOF:
                    raise WatchInterrupted(f"{what}: the server ended the stream")
                if resp.compact_revision > 0:
                    raise WatchInterrupted(
                        f"{what}: history compacted up to revision {resp.compact_revision}",
                        compacted=True, compact_revision=int(resp.compact_revision))
                if resp.canceled:
                    reason = _one_line(resp.cancel_reason) or "no reason given"
                    if self._username is not None and "invalid auth token" in reason:
                        # Refresh now so that the caller's next watch works straight away.
                        with contextlib.suppress(EtcdError):
                            await self._reauth(conn, conn.token_generation)
                    raise WatchInterrupted(f"{what}: cancelled by etcd ({reason})")
                if resp.events:
                    batch = []
                    for ev in resp.events:
                        rev = int(ev.kv.mod_revision)
                        if rev < expected:
                            raise WatchInterrupted(f"{what}: event at revision {rev} arrived "
                                                   f"after revision {expected}")
                        expected = rev
                        batch.append(Event(type="delete" if ev.type == 1 else "put",
                                           key=_key_str(ev.kv.key), value=bytes(ev.kv.value),
                                           mod_revision=rev))
                    yield batch
                # We ask for progress every progress_interval s; silence beyond that plus the
                # deadline means the server (or the path to it) is gone even if TCP is not.
                silence = self._progress_interval + self._timeout
                try:
                    async with asyncio.timeout(silence):
                        resp = await call.read()
                except TimeoutError:
                    await self._drop(conn)
                    raise WatchInterrupted(f"{what}: no answer from etcd for {silence:g}s") \
                        from None
        except WatchInterrupted:
            raise
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
            # grpc.aio raises CancelledError when the channel under the stream is closed.
            reason = "the store is closed" if self._closed else "connection closed"
            raise WatchInterrupted(f"{what}: {reason}") from None
        except Exception as exc:  # noqa: BLE001 - every stream failure means "re-list"
            err = _map_error(exc, f"watch {prefix} from revision {start_revision}", where,
                             self._timeout)
            if isinstance(err, EtcdUnavailable):
                await self._drop(conn)
            if self._username is not None and _token_expired(exc):
                try:
                    await self._reauth(conn, conn.token_generation)
                except EtcdError:
                    pass
            raise WatchInterrupted(str(err)) from None
        finally:
            stop.set()
            call.cancel()

    # -- lifecycle ------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        for old in list(self._dropped):
            await old.close()
        self._dropped.clear()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _short_reason(exc: BaseException) -> str:
    """The gist of why one endpoint failed, for the "no endpoint answered" message."""
    rpc = _rpc_error(exc)
    text = (rpc.details() or rpc.code().name) if rpc is not None else str(exc)
    # "failed to connect to all addresses; last error: UNKNOWN: ipv4:1.2.3.4:5: <the reason>"
    m = re.search(r"last error: \w+: (?:ipv4:)?[\w.\-]+:\d+: (.*)", text)
    if m:
        text = m.group(1)
    low = text.lower()
    if "connection refused" in low:
        return "connection refused"
    if "timeout" in low or "deadline" in low or "timed out" in low:
        return "timed out"
    if "no route to host" in low or "network is unreachable" in low:
        return "unreachable"
    if "certificate_verify_failed" in low:
        return "TLS: server certificate not trusted by the CA"
    if "handshake" in low or "ssl" in low or "certificate" in low:
        return "TLS handshake failed: " + _one_line(text, 120)
    if "socket closed" in low:
        return "connection closed by the server (TLS-only server, or not etcd?)"
    return _one_line(text, 160)


def _really_cancelled() -> bool:
    """True if our task was asked to stop, as opposed to grpc.aio raising CancelledError
    because the channel under a call was closed."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _close_soon(conn: _Conn) -> None:
    if not conn.closed:
        asyncio.ensure_future(conn.close())

"""The store: etcd as fastlane needs it, small KV, transactions, leases and the watch.

The only class the rest of fastlane talks to etcd through. It picks an endpoint, keeps one
connection, gives every call a deadline, refreshes an expired auth token, fails over to
another endpoint, and turns whatever goes wrong into the classes of fastlane.etcd.errors.
Results are plain dataclasses: nothing above this package sees a protobuf message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from etcd3aio._protobuf import Compare
from etcd3aio.kv import KVService, prefix_range_end

from fastlane.etcd.connection import (
    PROGRESS_INTERVAL,
    Conn,
    close_soon,
    credentials,
    key_bytes,
    key_str,
    really_cancelled,
)
from fastlane.etcd.endpoints import Endpoint, TLSFiles
from fastlane.etcd.errors import (
    EtcdAuthError,
    EtcdError,
    EtcdUnavailable,
    map_error,
    one_line,
    rpc_error,
    short_reason,
    token_expired,
)
from fastlane.etcd.watch import Event, watch_prefix

_log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        key=key_str(pb.key),
        value=bytes(pb.value),
        create_revision=pb.create_revision,
        mod_revision=pb.mod_revision,
        lease=pb.lease,
    )


class Store:
    """etcd as fastlane needs it: small KV, transactions, leases, and a gap-free watch.

    Several endpoints: the first that answers is used; when it fails, the next call probes all
    endpoints again and continues on whichever answers (the call that saw the failure is retried
    once if that moved us to another endpoint). Every call has a deadline of ``timeout``.
    """

    def __init__(
        self,
        endpoints: list[Endpoint],
        *,
        tls: TLSFiles | None,
        username: str | None,
        password: str | None,
        timeout: float,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        self._endpoints = list(endpoints)
        self._creds = credentials(tls)
        self._username = username or None
        self._password = password or ""
        self._timeout = float(timeout)
        self._progress_interval = float(progress_interval)
        self._conn: Conn | None = None
        self._select_lock = asyncio.Lock()
        self._auth_lock = asyncio.Lock()
        self._closed = False
        self._auth_disabled_warned = False
        self._dropped: set[Conn] = set()

    @property
    def endpoints_text(self) -> str:
        return ",".join(str(e) for e in self._endpoints)

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint currently in use (None before connect or after a failure)."""
        return self._conn.endpoint if self._conn else None

    @classmethod
    async def connect(
        cls,
        endpoints: list[Endpoint],
        *,
        tls: TLSFiles | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> Store:
        """Connect to the first endpoint that answers within ``timeout`` (EtcdUnavailable if none,
        EtcdAuthError if the credentials are refused).

        ``progress_interval``: how often an idle watch asks etcd for a progress notification;
        a watch that hears nothing for that plus ``timeout`` raises WatchInterrupted.
        """
        store = cls(
            endpoints,
            tls=tls,
            username=username,
            password=password,
            timeout=timeout,
            progress_interval=progress_interval,
        )
        await store._current()
        return store

    # -- connection management ------------------------------------------------------------

    async def _authenticate(self, conn: Conn) -> None:
        if self._username is None:
            return
        conn.set_token(None)  # a stale token on the Authenticate call itself makes it fail
        try:
            resp = await conn.auth.authenticate(
                self._username, self._password, timeout=self._timeout
            )
        except Exception as exc:  # noqa: BLE001 - mapped below
            rpc = rpc_error(exc)
            if rpc is not None and "authentication is not enabled" in (rpc.details() or ""):
                if not self._auth_disabled_warned:
                    _log.warning(
                        "etcd at %s: authentication is not enabled; ignoring the "
                        "username and password",
                        conn.endpoint,
                    )
                    self._auth_disabled_warned = True
                return
            raise map_error(
                exc, f"authenticate as {self._username!r}", str(conn.endpoint), self._timeout
            ) from None
        conn.set_token(resp.token)

    async def _probe(self, endpoint: Endpoint) -> Conn:
        conn = Conn(endpoint, self._creds)
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

    async def _select(self) -> Conn:
        """Probe every endpoint at once and keep the first that answers (ties: list order)."""
        tasks = [asyncio.ensure_future(self._probe(ep)) for ep in self._endpoints]
        errors: dict[Endpoint, BaseException] = {}
        winner: Conn | None = None
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
                if (
                    task.done()
                    and not task.cancelled()
                    and task.exception() is None
                    and task.result() is not winner
                ):
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
                reasons.append(f"{ep} ({short_reason(err)})")
        raise EtcdUnavailable(
            f"cannot reach any etcd endpoint (waited up to {self._timeout:g}s): "
            f"{'; '.join(reasons)}"
        )

    async def _current(self) -> Conn:
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

    async def _drop(self, conn: Conn) -> None:
        """Forget a connection that failed, so the next call probes all endpoints again."""
        if self._conn is conn:
            self._conn = None
            # Close later: calls still running on it (a watch) end with an error of their own.
            self._dropped.add(conn)
            asyncio.get_running_loop().call_later(self._timeout, close_soon, conn)

    async def _reauth(self, conn: Conn, generation: int) -> None:
        async with self._auth_lock:
            if conn.token_generation != generation:
                return  # someone else refreshed it meanwhile
            _log.info("etcd at %s: auth token no longer valid, authenticating again", conn.endpoint)
            await self._authenticate(conn)

    async def _call(self, what: str, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run one unary operation with deadline, error mapping, token refresh and failover."""
        conn = await self._current()
        for attempt in (1, 2):
            generation = conn.token_generation
            try:
                return await fn(conn)
            except asyncio.CancelledError:
                if really_cancelled():
                    raise
                # grpc.aio raises CancelledError when the channel under the call is closed.
                if self._closed:
                    raise EtcdError(
                        f"etcd {what} at {conn.endpoint}: the store is closed"
                    ) from None
                raise EtcdUnavailable(
                    f"etcd {what} at {conn.endpoint}: call cancelled (connection closed)"
                ) from None
            except Exception as exc:  # noqa: BLE001 - everything is mapped
                if attempt == 1 and self._username is not None and token_expired(exc):
                    await self._reauth(conn, generation)
                    continue
                err = map_error(exc, what, str(conn.endpoint), self._timeout)
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
        resp = await self._call(
            f"get {key}", lambda c: c.kv.get(key_bytes(key), timeout=self._timeout)
        )
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted by key) and the revision they were read at."""
        raw = key_bytes(prefix)
        resp = await self._call(
            f"list {prefix}",
            lambda c: c.kv.get(raw, range_end=prefix_range_end(raw), timeout=self._timeout),
        )
        return [_kv(kv) for kv in resp.kvs], resp.header.revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = await self._call(
            f"put {key}",
            lambda c: c.kv.put(key_bytes(key), bytes(value), lease=lease, timeout=self._timeout),
        )
        return resp.header.revision

    async def create(
        self,
        key: str,
        value: bytes,
        lease: int = 0,
        *,
        absent: tuple[str, ...] = (),
        absent_prefixes: tuple[str, ...] = (),
        none_created_after: tuple[str, int] | None = None,
    ) -> bool:
        """Put only if the key does not exist, in one transaction; False if it exists.

        The same transaction can also require that the keys in ``absent`` and every key under
        ``absent_prefixes`` do not exist, and that no key under ``none_created_after[0]`` was
        created after revision ``none_created_after[1]`` (a lease claim that depends on more
        than its own key: the two subnets of a dual-stack lease).
        """
        raw = key_bytes(key)
        compare = [KVService.txn_compare_create_revision(raw, 0)]
        compare += [KVService.txn_compare_create_revision(key_bytes(k), 0) for k in absent]
        for prefix in absent_prefixes:  # etcd compares every key of a range (none: a zero KV)
            p = key_bytes(prefix)
            compare.append(
                Compare(
                    result=Compare.EQUAL,
                    target=Compare.CREATE,
                    key=p,
                    create_revision=0,
                    range_end=prefix_range_end(p),
                )
            )
        if none_created_after is not None:
            p = key_bytes(none_created_after[0])
            compare.append(
                Compare(
                    result=Compare.LESS,
                    target=Compare.CREATE,
                    key=p,
                    create_revision=int(none_created_after[1]) + 1,
                    range_end=prefix_range_end(p),
                )
            )
        resp = await self._call(
            f"create {key}",
            lambda c: c.kv.txn(
                compare=compare,
                success=[KVService.txn_op_put(raw, bytes(value), lease=lease)],
                timeout=self._timeout,
            ),
        )
        return bool(resp.succeeded)

    async def replace(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> bool:
        """Compare-and-swap: put only if the key still has ``mod_revision``.

        ``mod_revision=0`` is etcd's "the key does not exist", so it behaves like create().
        """
        raw = key_bytes(key)
        compare = Compare(
            result=Compare.EQUAL, target=Compare.MOD, key=raw, mod_revision=int(mod_revision)
        )
        resp = await self._call(
            f"replace {key}",
            lambda c: c.kv.txn(
                compare=[compare],
                success=[KVService.txn_op_put(raw, bytes(value), lease=lease)],
                timeout=self._timeout,
            ),
        )
        return bool(resp.succeeded)

    async def delete(self, key: str) -> bool:
        resp = await self._call(
            f"delete {key}", lambda c: c.kv.delete(key_bytes(key), timeout=self._timeout)
        )
        return resp.deleted > 0

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (test clean-up, `fastlane` maintenance)."""
        raw = key_bytes(prefix)
        resp = await self._call(
            f"delete prefix {prefix}",
            lambda c: c.kv.delete(raw, range_end=prefix_range_end(raw), timeout=self._timeout),
        )
        return int(resp.deleted)

    async def compact(self, revision: int) -> None:
        """Drop history up to ``revision``; already compacted that far is not an error."""
        try:
            await self._call(
                f"compact to revision {revision}",
                lambda c: c.kv.compact(revision, physical=True, timeout=self._timeout),
            )
        except EtcdError as exc:
            if "required revision has been compacted" in str(exc):
                return
            raise

    # -- leases -------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        resp = await self._call(
            f"grant lease ttl={ttl}", lambda c: c.lease.grant(int(ttl), timeout=self._timeout)
        )
        if resp.error:
            raise EtcdError(
                f"etcd grant lease ttl={ttl} at {self.endpoint}: {one_line(resp.error)}"
            )
        return int(resp.ID)

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining seconds of an etcd lease; -1 if it expired or never existed."""
        if lease_id == 0:
            return -1
        try:
            resp = await self._call(
                f"lease ttl {lease_id:x}",
                lambda c: c.lease.time_to_live(lease_id, timeout=self._timeout),
            )
        except EtcdError as exc:
            if "lease not found" in str(exc):
                return -1
            raise
        return int(resp.TTL) if resp.TTL >= 0 else -1

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._call(
                f"revoke lease {lease_id:x}",
                lambda c: c.lease.revoke(lease_id, timeout=self._timeout),
            )
        except EtcdError as exc:
            if "lease not found" not in str(exc):
                raise

    # -- watch --------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Yield batches of events under ``prefix`` in revision order from ``start_revision``.

        Raises WatchInterrupted whenever continuity is in doubt (stream error, etcd restart,
        compaction, cancellation, leader loss) and never resumes by itself: the caller re-lists
        and watches again from the listed revision + 1. It also raises, within ``timeout``, if
        the watch cannot be established at all. Nothing happens until the first iteration.
        """
        return watch_prefix(self, prefix, start_revision)

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

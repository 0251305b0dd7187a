"""The watch: every event under a prefix, in order, or an exception that says "re-list".

etcd3aio's own watch silently resumes after a reconnect (and can skip events on the
way) and a compacted watch just hangs. This one drives the Watch stream itself, checks
that revisions never go backwards, asks for progress now and then so that a hung server
is noticed, and never resumes by itself: the caller re-lists and watches again from the
listed revision + 1, which is the only way to be sure nothing was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import grpc.aio
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, rpc_pb2
from etcd3aio.kv import prefix_range_end

from fastlane.etcd.connection import key_bytes, key_str, really_cancelled
from fastlane.etcd.errors import (
    EtcdError,
    EtcdUnavailable,
    WatchInterrupted,
    map_error,
    one_line,
    token_expired,
)

if TYPE_CHECKING:
    from fastlane.etcd.store import Store


@dataclass(frozen=True)
class Event:
    type: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


async def watch_prefix(
    store: Store, prefix: str, start_revision: int
) -> AsyncIterator[list[Event]]:
    """Store.watch: batches of events under ``prefix`` from ``start_revision``, or
    WatchInterrupted as soon as continuity is in doubt (see that method).

    It is the store's own method, kept in a module of its own for its length: it picks,
    drops and re-authenticates the store's connection exactly as the unary calls do.
    """
    where = store.endpoints_text
    try:
        conn = await store._current()
    except EtcdError as exc:
        raise WatchInterrupted(
            f"etcd watch {prefix} from revision {start_revision}: cannot connect: {exc}"
        ) from None
    where = str(conn.endpoint)
    what = f"etcd watch {prefix} at {where} from revision {start_revision}"
    raw = key_bytes(prefix)
    stop = asyncio.Event()

    async def requests() -> AsyncIterator[Any]:
        yield WatchRequest(
            create_request=WatchCreateRequest(
                key=raw, range_end=prefix_range_end(raw), start_revision=start_revision
            )
        )
        # Keep the request side open (closing it ends the watch) and ask for progress now
        # and then, so that a hung server is noticed (see the read timeout below).
        while not stop.is_set():
            try:
                async with asyncio.timeout(store._progress_interval):
                    await stop.wait()
            except TimeoutError:
                yield WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())

    call = conn.watch_stub.Watch(requests(), metadata=conn.watch_metadata())
    expected = start_revision
    try:
        try:
            async with asyncio.timeout(store._timeout):
                resp = await call.read()
        except TimeoutError:
            await store._drop(conn)
            raise WatchInterrupted(f"{what}: not established within {store._timeout:g}s") from None
        while True:
            if resp is grpc.aio.EOF:
                raise WatchInterrupted(f"{what}: the server ended the stream")
            if resp.compact_revision > 0:
                raise WatchInterrupted(
                    f"{what}: history compacted up to revision {resp.compact_revision}",
                    compacted=True,
                    compact_revision=int(resp.compact_revision),
                )
            if resp.canceled:
                reason = one_line(resp.cancel_reason) or "no reason given"
                if store._username is not None and "invalid auth token" in reason:
                    # Refresh now so that the caller's next watch works straight away.
                    with contextlib.suppress(EtcdError):
                        await store._reauth(conn, conn.token_generation)
                raise WatchInterrupted(f"{what}: cancelled by etcd ({reason})")
            if resp.events:
                batch = []
                for ev in resp.events:
                    rev = int(ev.kv.mod_revision)
                    if rev < expected:
                        raise WatchInterrupted(
                            f"{what}: event at revision {rev} arrived after revision {expected}"
                        )
                    expected = rev
                    batch.append(
                        Event(
                            type="delete" if ev.type == 1 else "put",
                            key=key_str(ev.kv.key),
                            value=bytes(ev.kv.value),
                            mod_revision=rev,
                        )
                    )
                yield batch
            # We ask for progress every progress_interval s; silence beyond that plus the
            # deadline means the server (or the path to it) is gone even if TCP is not.
            silence = store._progress_interval + store._timeout
            try:
                async with asyncio.timeout(silence):
                    resp = await call.read()
            except TimeoutError:
                await store._drop(conn)
                raise WatchInterrupted(f"{what}: no answer from etcd for {silence:g}s") from None
    except WatchInterrupted:
        raise
    except asyncio.CancelledError:
        if really_cancelled():
            raise
        # grpc.aio raises CancelledError when the channel under the stream is closed.
        reason = "the store is closed" if store._closed else "connection closed"
        raise WatchInterrupted(f"{what}: {reason}") from None
    except Exception as exc:  # noqa: BLE001 - every stream failure means "re-list"
        err = map_error(
            exc, f"watch {prefix} from revision {start_revision}", where, store._timeout
        )
        if isinstance(err, EtcdUnavailable):
            await store._drop(conn)
        if store._username is not None and token_expired(exc):
            try:
                await store._reauth(conn, conn.token_generation)
            except EtcdError:
                pass
        raise WatchInterrupted(str(err)) from None
    finally:
        stop.set()
        call.cancel()

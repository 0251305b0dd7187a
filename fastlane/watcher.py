"""The watcher that keeps the lease table (fastlane/leasetable.py) equal to etcd.

The watcher never trusts a watch stream to be gapless: after any interruption (etcd
restart, reconnect, compaction) it re-lists the prefix and diffs the snapshot against
the table, so an event missed while disconnected still ends up applied. Leases written
by others that cannot be read are skipped with a warning naming the key; they never
stop the daemon.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable

from fastlane.etcd import EtcdError, WatchInterrupted
from fastlane.lease import Lease
from fastlane.leasetable import LeaseTable
from fastlane.registry import LeaseEvent, LeaseWarning, Registry

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network

OwnCallback = Callable[[str, Lease | None], Awaitable[None]]


class Watcher:
    """Snapshot at revision R, watch from R+1; on any break, re-list and diff.

    `own` returns our current lease (excluded from the table). `on_own` is awaited with
    ("deleted", None) when our key disappears, or ("changed", lease) when someone else
    overwrote it, so the daemon can re-take or give up.
    """

    def __init__(
        self,
        registry: Registry,
        table: LeaseTable,
        own: Callable[[], Lease | None],
        on_own: OwnCallback,
    ) -> None:
        self.registry = registry
        self.table = table
        self.own = own
        self.on_own = on_own
        self.synced = asyncio.Event()
        self._warned: set[tuple[str, int]] = set()
        # for /metrics (fastlane/metrics.py)
        self.resyncs = 0
        self.events = 0
        self.reconnects = 0
        self.connected = False

    def _warn_once(self, warning: LeaseWarning) -> None:
        """Each bad write is reported once, not again on every re-list."""
        if (warning.key, warning.mod_revision) not in self._warned:
            self._warned.add((warning.key, warning.mod_revision))
            log.warning("%s", warning)

    async def _resync(self) -> int:
        snapshot, revision, warnings = await self.registry.snapshot()
        for warning in warnings:
            self._warn_once(warning)
        own = self.own()
        leases: list[Lease] = []
        own_seen: Lease | None = None
        for lease in snapshot:
            if own is not None and lease.subnet == own.subnet:
                own_seen = lease
                continue
            leases.append(lease)
        self.table.reset(leases)
        self.resyncs += 1
        self.synced.set()
        if own is not None:
            if own_seen is None:
                await self.on_own("deleted", None)
            elif own_seen.attrs.public_ip != own.attrs.public_ip:
                await self.on_own("changed", own_seen)
        return revision

    async def _apply(self, events: list[LeaseEvent]) -> None:
        own_lease = self.own()
        puts: dict[IPv4Network, Lease] = {}
        deletes: set[IPv4Network] = set()
        own_events: list[tuple[str, Lease | None]] = []
        self.events += len(events)
        for ev in events:
            if ev.warning is not None:
                self._warn_once(ev.warning)
            subnet = ev.subnet
            if subnet is None:
                continue
            # None: deleted, or unreadable so we no longer know where it lives; drop its route.
            lease = ev.lease
            if own_lease is not None and subnet == own_lease.subnet:
                if lease is None:
                    own_events.append(("deleted", None))
                elif lease.attrs.public_ip != own_lease.attrs.public_ip:
                    own_events.append(("changed", lease))
                continue
            if lease is None:
                puts.pop(subnet, None)
                deletes.add(subnet)
            else:
                deletes.discard(subnet)
                puts[subnet] = lease
        self.table.apply(puts.values(), deletes)
        for what, lease in own_events[-1:]:
            await self.on_own(what, lease)

    async def run(self) -> None:
        backoff = 0.1
        failing_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                revision = await self._resync()
                self.connected = True
                if failing_since is not None:
                    self.reconnects += 1
                    log.info("etcd reachable again; lease table re-synced (%d peers)", len(self.table))
                failing_since = None
                backoff = 0.1
                async for batch in self.registry.watch(revision + 1):
                    await self._apply(batch)
            except WatchInterrupted as exc:
                log.info("lease watch interrupted (%s); re-listing", exc)
            except EtcdError as exc:
                self.connected = False
                now = loop.time()
                if failing_since is None:
                    failing_since = now
                    log.warning("lease watch: %s; traffic keeps flowing, retrying", exc)
                backoff = min(backoff * 2, 5.0)
            await asyncio.sleep(backoff)

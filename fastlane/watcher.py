"""The watcher that keeps the lease table (fastlane/leasetable.py) equal to etcd.

The watcher never trusts a watch stream to be gapless: after any interruption (etcd
restart, reconnect, compaction) it re-lists the prefix and diffs the snapshot against
the table, so an event missed while disconnected still ends up applied. Leases written
by others that cannot be read are skipped with a warning naming the key; they never
stop the daemon.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from fastlane.etcd import EtcdError, WatchInterrupted
from fastlane.lease import Lease, LeaseId, holder
from fastlane.leasetable import LeaseTable
from fastlane.registry import LeaseEvent, LeaseWarning, Registry

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network


class OwnChange(enum.StrEnum):
    """What happened to our own lease in etcd (a str, so older callers comparing with
    "deleted"/"changed" keep working)."""

    DELETED = "deleted"  # the key is gone (or unreadable)
    CHANGED = "changed"  # someone else's PublicIP now holds our subnet


OwnCallback = Callable[[OwnChange, Lease | None], Awaitable[None]]


@dataclass
class BatchPlan:
    """What one watch batch does to the table, decided without touching it."""

    # keyed by Lease.ident: both subnets, so a dual-stack lease is one entry
    puts: dict[LeaseId, Lease] = field(default_factory=dict)
    deletes: set[LeaseId] = field(default_factory=set)
    own: tuple[OwnChange, Lease | None] | None = None  # the batch's last word on our lease


def own_change(own: Lease, seen: Lease | None) -> OwnChange | None:
    """How what etcd holds for our subnet (seen) differs from our lease, if it does."""
    if seen is None:
        return OwnChange.DELETED
    if holder(seen.attrs) != holder(own.attrs):
        return OwnChange.CHANGED
    return None


def plan_snapshot(
    snapshot: Iterable[Lease], own: Lease | None
) -> tuple[list[Lease], OwnChange | None, Lease | None]:
    """The peers' leases of a full listing (ours left out), and what happened to ours."""
    leases: list[Lease] = []
    own_seen: Lease | None = None
    for lease in snapshot:
        if own is not None and lease.ident == own.ident:
            own_seen = lease
            continue
        leases.append(lease)
    change = own_change(own, own_seen) if own is not None else None
    return leases, change, own_seen


def plan_batch(events: Iterable[LeaseEvent], own: Lease | None) -> BatchPlan:
    """Fold a watch batch into puts and deletes, in order: a later event for a subnet wins; an
    event that cannot be read drops that subnet's route (we no longer know where it lives);
    our own subnet never enters the table, its last change is reported instead."""
    plan = BatchPlan()
    for ev in events:
        ident = ev.ident
        if ident is None:
            continue
        lease = ev.lease
        if own is not None and ident == own.ident:
            change = own_change(own, lease)
            if change is not None:
                plan.own = (change, lease)
            continue
        if lease is None:
            plan.puts.pop(ident, None)
            plan.deletes.add(ident)
        else:
            plan.deletes.discard(ident)
            plan.puts[ident] = lease
    return plan


class Watcher:
    """Snapshot at revision R, watch from R+1; on any break, re-list and diff.

    `own` returns our current lease (excluded from the table). `on_own` is awaited with
    (OwnChange.DELETED, None) when our key disappears, or (OwnChange.CHANGED, lease) when
    someone else overwrote it, so the daemon can re-take or give up.
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

    #: unreadable keys named one by one per listing or batch; the rest are counted in one line,
    #: so a flood of junk keys under the prefix cannot flood the log
    WARN_EACH = 10

    def _warn(self, warnings: Iterable[LeaseWarning]) -> None:
        """Each bad write is reported once, not again on every re-list; past WARN_EACH new ones
        at a time, the rest become one summary line."""
        fresh = [w for w in warnings if (w.key, w.mod_revision) not in self._warned]
        for w in fresh:
            self._warned.add((w.key, w.mod_revision))
        for w in fresh[: self.WARN_EACH]:
            log.warning("%s", w)
        if len(fresh) > self.WARN_EACH:
            log.warning(
                "%d more unreadable keys under the subnets prefix (not routed), e.g. %s",
                len(fresh) - self.WARN_EACH,
                fresh[-1].key,
            )

    async def _resync(self) -> int:
        snapshot, revision, warnings = await self.registry.snapshot()
        self._warn(warnings)
        leases, change, own_seen = plan_snapshot(snapshot, self.own())
        self.table.reset(leases)
        self.resyncs += 1
        self.synced.set()
        if change is not None:
            await self.on_own(change, own_seen if change is OwnChange.CHANGED else None)
        return revision

    async def _apply(self, events: list[LeaseEvent]) -> None:
        self.events += len(events)
        self._warn(ev.warning for ev in events if ev.warning is not None)
        plan = plan_batch(events, self.own())
        self.table.apply(plan.puts.values(), plan.deletes)
        if plan.own is not None:
            await self.on_own(*plan.own)

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
                    log.info(
                        "etcd reachable again; lease table re-synced (%d peers)", len(self.table)
                    )
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

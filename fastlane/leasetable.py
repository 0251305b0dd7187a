"""The lease table (subnets -> peer): where the control plane meets the data plane.

Backends subscribe to the table and turn it into routes; the watcher keeps it equal to
etcd. It lives apart from the watcher so that a backend (and its tests) depends on the
table alone and never drags in the etcd client, grpc or the registry.

Entries are keyed as etcd keys them: by both subnets (Lease.ident), so a dual-stack lease
is one entry, as in flannel's LeaseWatcher (sameSubnet compares both families).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fastlane.lease import Lease, LeaseId

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network

#: A table key, or a bare subnet meaning the single-family lease of that subnet.
Ref = LeaseId | IPv4Network | IPv6Network


def _ident(ref: Ref) -> LeaseId:
    if isinstance(ref, IPv4Network):
        return (ref, None)
    if isinstance(ref, IPv6Network):
        return (None, ref)
    return ref


__all__ = ["LeaseTable", "Subscriber", "TableChange"]


@dataclass(frozen=True)
class TableChange:
    added: list[Lease] = field(default_factory=list)  # new or changed leases
    removed: list[Lease] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


Subscriber = Callable[["LeaseTable", TableChange], None]


class LeaseTable:
    """Peers' leases by Lease.ident. Subscribers hear about each batch of changes once."""

    def __init__(self) -> None:
        self._leases: dict[LeaseId, Lease] = {}
        self._subscribers: list[Subscriber] = []
        self.subscriber_errors = 0  # backend sync errors, for /metrics

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, ref: Ref) -> bool:
        return _ident(ref) in self._leases

    def get(self, ref: Ref) -> Lease | None:
        return self._leases.get(_ident(ref))

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def subscribe(self, fn: Subscriber) -> None:
        """Call fn now with the whole table as 'added', then on every change."""
        self._subscribers.append(fn)
        if self._leases:
            fn(self, TableChange(added=self.leases()))

    def _publish(self, change: TableChange) -> TableChange:
        if change:
            for fn in list(self._subscribers):
                try:
                    fn(self, change)
                except Exception:  # a broken subscriber must not stop the watcher
                    self.subscriber_errors += 1
                    log.exception("lease table subscriber failed")
        return change

    def _same(self, a: Lease, b: Lease) -> bool:
        return a.attrs == b.attrs

    def reset(self, leases: Iterable[Lease]) -> TableChange:
        fresh = {lease.ident: lease for lease in leases}
        added = [
            lease
            for s, lease in fresh.items()
            if s not in self._leases or not self._same(self._leases[s], lease)
        ]
        removed = [lease for s, lease in self._leases.items() if s not in fresh]
        self._leases = fresh
        return self._publish(TableChange(added, removed))

    def apply(self, puts: Iterable[Lease], deletes: Iterable[Ref]) -> TableChange:
        added: list[Lease] = []
        removed: list[Lease] = []
        for ref in deletes:
            old = self._leases.pop(_ident(ref), None)
            if old is not None:
                removed.append(old)
        for lease in puts:
            old = self._leases.get(lease.ident)
            self._leases[lease.ident] = lease
            if old is None or not self._same(old, lease):
                added.append(lease)
        return self._publish(TableChange(added, removed))

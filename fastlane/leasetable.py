"""The lease table (subnet -> peer): where the control plane meets the data plane.

Backends subscribe to the table and turn it into routes; the watcher keeps it equal to
etcd. It lives apart from the watcher so that a backend (and its tests) depends on the
table alone and never drags in the etcd client, grpc or the registry.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fastlane.lease import Lease

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network

__all__ = ["LeaseTable", "Subscriber", "TableChange"]


@dataclass(frozen=True)
class TableChange:
    added: list[Lease] = field(default_factory=list)  # new or changed leases
    removed: list[Lease] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


Subscriber = Callable[["LeaseTable", TableChange], None]


class LeaseTable:
    """Peers' leases by subnet. Subscribers hear about each batch of changes once."""

    def __init__(self) -> None:
        self._leases: dict[IPv4Network, Lease] = {}
        self._subscribers: list[Subscriber] = []
        self.subscriber_errors = 0  # backend sync errors, for /metrics

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, subnet: IPv4Network) -> bool:
        return subnet in self._leases

    def get(self, subnet: IPv4Network) -> Lease | None:
        return self._leases.get(subnet)

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
        fresh = {l.subnet: l for l in leases}
        added = [l for s, l in fresh.items() if s not in self._leases or not self._same(self._leases[s], l)]
        removed = [l for s, l in self._leases.items() if s not in fresh]
        self._leases = fresh
        return self._publish(TableChange(added, removed))

    def apply(self, puts: Iterable[Lease], deletes: Iterable[IPv4Network]) -> TableChange:
        added: list[Lease] = []
        removed: list[Lease] = []
        for subnet in deletes:
            old = self._leases.pop(subnet, None)
            if old is not None:
                removed.append(old)
        for lease in puts:
            old = self._leases.get(lease.subnet)
            self._leases[lease.subnet] = lease
            if old is None or not self._same(old, lease):
                added.append(lease)
        return self._publish(TableChange(added, removed))

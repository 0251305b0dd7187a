"""`alloc`: lease a subnet and forward nothing (flannel's alloc backend).

Useful when something else (a router, a cloud route table) carries the traffic and
only the address management of flannel is wanted.
"""

from __future__ import annotations

from fastlane.backend.base import Backend
from fastlane.lease import Lease
from fastlane.leasetable import LeaseTable


class AllocBackend(Backend):
    @property
    def mtu(self) -> int:
        return self.ctx.iface.mtu

    async def start(self, lease: Lease, table: LeaseTable) -> None:
        return None

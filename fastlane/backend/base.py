"""What every backend provides to the daemon, mirroring flannel's backend contract.

The daemon calls `prepare` before acquiring the lease (a backend may need to publish
data in the lease value, e.g. a VTEP MAC), then `start` with the lease and the shared
lease table, which the backend subscribes to. `stop` must leave the lease alone: a
restart reuses it.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from fastlane.config import NetworkConfig
from fastlane.iface import Interface
from fastlane.lease import Lease
from fastlane.leasetable import LeaseTable


class BackendError(Exception):
    """The backend cannot run with this config or on this host (one-line message)."""


@dataclass(frozen=True)
class BackendContext:
    config: NetworkConfig
    iface: Interface
    public_ip: ipaddress.IPv4Address
    verbose: int = 0


def int_option(config: NetworkConfig, name: str, default: int, lo: int, hi: int) -> int:
    """A Backend integer option, checked, with a one-line error naming it."""
    value = config.backend_option(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BackendError(f"Backend.{name} must be an integer from {lo} to {hi}, not {value!r}")
    return value


def bool_option(config: NetworkConfig, name: str, default: bool = False) -> bool:
    value = config.backend_option(name, default)
    if not isinstance(value, bool):
        raise BackendError(f"Backend.{name} must be true or false, not {value!r}")
    return value


class Backend(ABC):
    #: written as BackendType in the lease value ("" = omitted, as flannel's udp does)
    lease_type: str = ""

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    @property
    @abstractmethod
    def mtu(self) -> int:
        """FLANNEL_MTU: the MTU containers must use on this overlay."""

    async def prepare(self) -> Any:
        """Set up what must exist before the lease; return BackendData (None = omitted)."""
        return None

    @abstractmethod
    async def start(self, lease: Lease, table: LeaseTable) -> None:
        """Configure the host for `lease` and begin forwarding for the peers in `table`."""

    async def stop(self) -> None:
        """Stop forwarding; keep the lease."""

    def counters(self) -> dict[str, int]:
        return {}

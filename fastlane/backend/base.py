"""What every backend provides to the daemon, mirroring flannel's backend contract.

The daemon calls `prepare` before acquiring the lease (a backend may need to publish
data in the lease value, e.g. a VTEP MAC), then `start` with the lease and the shared
lease table, which the backend subscribes to. `stop` must leave the lease alone: a
restart reuses it.
"""

from __future__ import annotations

import ipaddress
import logging
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
    #: the lease's PublicIPv6 (-public-ipv6, else the interface's IPv6 address); IPv6 only
    public_ipv6: ipaddress.IPv6Address | None = None


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


def outside_network(config: NetworkConfig, lease: Lease) -> str | None:
    """Why a peer's lease must not be routed, or None if it may be.

    A lease is someone else's write to etcd. One for the whole Network, or for any block
    bigger than SubnetLen, would send traffic for subnets nobody holds (or that other nodes
    hold) to that one host; one outside the Network is for addresses the overlay does not
    carry. flanneld routes whatever it reads; fastlane skips these with a warning.
    """
    net = config.network
    if net is None:
        return None
    if lease.subnet is None:  # an IPv6-only lease (key 0.0.0.0-0&...): no IPv4 route to it
        return "an IPv6-only lease (no IPv4 subnet)"
    if not lease.subnet.subnet_of(net):
        return f"not inside the Network {net}"
    if lease.subnet.prefixlen < config.subnet_len:
        return f"larger than a /{config.subnet_len} (SubnetLen)"
    return None


def outside_network6(config: NetworkConfig, lease: Lease) -> str | None:
    """outside_network for the IPv6 half of a lease: inside IPv6Network, no bigger than an
    IPv6SubnetLen block, and with a PublicIPv6 to send it to."""
    net, sub = config.ipv6_network, lease.ipv6_subnet
    if sub is None:
        return "no IPv6 subnet"
    if lease.attrs.public_ipv6 is None:
        return "no PublicIPv6"
    if net is None:
        return None
    if not sub.subnet_of(net):
        return f"not inside the IPv6Network {net}"
    if sub.prefixlen < config.ipv6_subnet_len:
        return f"larger than a /{config.ipv6_subnet_len} (IPv6SubnetLen)"
    return None


class Backend(ABC):
    #: written as BackendType in the lease value ("" = omitted, as flannel's udp does)
    lease_type: str = ""

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self._misfits: set[tuple[object, object]] = set()

    def routable(self, lease: Lease) -> bool:
        """False (and one warning per subnet and host) for a lease outside_network refuses."""
        why = outside_network(self.ctx.config, lease)
        if why is None:
            return True
        if (lease.subnet, lease.attrs.public_ip) not in self._misfits:
            self._misfits.add((lease.subnet, lease.attrs.public_ip))
            logging.getLogger(type(self).__module__).warning(
                "ignoring lease %s -> %s: %s", lease.subnet, lease.attrs.public_ip, why
            )
        return False

    def routable6(self, lease: Lease) -> bool:
        """routable for the IPv6 half of a lease (one warning per subnet and host)."""
        why = outside_network6(self.ctx.config, lease)
        if why is None:
            return True
        if lease.ipv6_subnet is not None and (
            (lease.ipv6_subnet, lease.attrs.public_ipv6) not in self._misfits
        ):
            self._misfits.add((lease.ipv6_subnet, lease.attrs.public_ipv6))
            logging.getLogger(type(self).__module__).warning(
                "ignoring IPv6 lease %s -> %s: %s",
                lease.ipv6_subnet,
                lease.attrs.public_ipv6,
                why,
            )
        return False

    def v6_data(self) -> Any:
        """BackendV6Data for the lease value (None = omitted); valid after prepare()."""
        return None

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
        """Stop forwarding; keep the lease. A backend with nothing to stop keeps this no-op."""
        return None

    def counters(self) -> dict[str, int]:
        return {}

"""Leases as flanneld stores them in etcd, and the choice of the lease or subnet to acquire.

The key (`<prefix>/subnets/10.1.18.0-24`) and the value (Go's `json.Marshal` of
`LeaseAttrs`) must be byte-compatible with flanneld's, because flanneld nodes and
fastlane nodes share one etcd during a migration and read each other's leases.
Everything here is pure so it can be property-tested without etcd.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastlane.config import NetworkConfig

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

#: flanneld's subnet TTL (pkg/subnet/etcd/registry.go).
SUBNET_TTL = 24 * 3600
#: flanneld collects at most this many free candidates before picking one at random.
MAX_CANDIDATES = 100

# flannel's regex, anchored and with the dots escaped: "10.5.52.0-24" or with "&<ip6>-<len>".
_KEY_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-fA-F\d:]+)-(\d+))?")


class LeaseValueError(ValueError):
    """A lease key or value in etcd that fastlane cannot read (written by someone else)."""


def subnet_key(subnet: IPv4Network) -> str:
    """The last path element of a lease key, e.g. 10.1.18.0-24."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(name: str) -> IPv4Network:
    """Inverse of subnet_key; also accepts flannel's dual-stack form (IPv6 part ignored)."""
    m = _KEY_RE.fullmatch(name)
    if not m:
        raise LeaseValueError(f"lease key {name!r} is not of the form A.B.C.D-LEN")
    try:
        return IPv4Network((m.group(1), int(m.group(2))))
    except ValueError as exc:
        raise LeaseValueError(f"lease key {name!r}: {exc}") from None


@dataclass(frozen=True)
class LeaseAttrs:
    """The lease value. Field order and null/omitempty rules follow flannel's Go struct."""

    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Any = None
    public_ipv6: str | None = None
    backend_v6_data: Any = None

    def encode(self) -> bytes:
        value: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": self.public_ipv6}
        if self.backend_type:
            value["BackendType"] = self.backend_type
        if self.backend_data is not None:
            value["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            value["BackendV6Data"] = self.backend_v6_data
        return json.dumps(value, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> LeaseAttrs:
        """Read a value written by flanneld or fastlane; keys are case-insensitive as in Go."""
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LeaseValueError(f"lease value is not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise LeaseValueError("lease value is not a JSON object")
        fields = {k.lower(): v for k, v in obj.items()}
        ip = fields.get("publicip")
        try:
            public_ip = IPv4Address(ip) if isinstance(ip, str) else None
        except ValueError:
            public_ip = None
        if public_ip is None:
            raise LeaseValueError(f"lease value has no valid PublicIP ({json.dumps(ip)})")
        btype = fields.get("backendtype") or ""
        if not isinstance(btype, str):
            raise LeaseValueError("lease value has a non-string BackendType")
        ip6 = fields.get("publicipv6")
        return cls(
            public_ip=public_ip,
            backend_type=btype,
            backend_data=fields.get("backenddata"),
            public_ipv6=ip6 if isinstance(ip6, str) else None,
            backend_v6_data=fields.get("backendv6data"),
        )


@dataclass(frozen=True)
class Lease:
    """A subnet held in etcd. `expiration` is None for a reservation (a key with no etcd lease)."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    expiration: float | None = None
    etcd_lease: int = 0
    mod_revision: int = 0
    key: str = field(default="", compare=False)

    @property
    def is_reservation(self) -> bool:
        return self.etcd_lease == 0

    def remaining(self, now: float | None = None) -> float:
        if self.expiration is None:
            return float("inf")
        return self.expiration - (time.time() if now is None else now)


class _Taken:
    """Existing leases as sorted address intervals, for O(log n) overlap checks."""

    def __init__(self, taken: Iterable[IPv4Network]):
        spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in taken)
        self.starts = [s for s, _ in spans]
        self.max_end: list[int] = []
        best = -1
        for _, end in spans:
            best = max(best, end)
            self.max_end.append(best)

    def overlaps(self, net: IPv4Network) -> bool:
        # Among intervals starting at or before our end, the one reaching furthest decides.
        i = bisect.bisect_right(self.starts, int(net.broadcast_address))
        return i > 0 and self.max_end[i - 1] >= int(net.network_address)


def free_candidates(
    config: NetworkConfig, taken: Iterable[IPv4Network], limit: int = MAX_CANDIDATES
) -> list[IPv4Network]:
    """Walk up from SubnetMin like flanneld, collecting up to `limit` subnets no lease overlaps."""
    assert config.subnet_min is not None and config.subnet_max is not None
    index = _Taken(taken)
    size = 1 << (32 - config.subnet_len)
    out: list[IPv4Network] = []
    addr, last = int(config.subnet_min), int(config.subnet_max)
    while addr <= last and len(out) < limit:
        net = IPv4Network((addr, config.subnet_len))
        if not index.overlaps(net):
            out.append(net)
        addr += size
    return out


def choose_subnet(
    config: NetworkConfig, taken: Iterable[IPv4Network], rng: random.Random | None = None
) -> IPv4Network | None:
    """A random free subnet among the first candidates, or None when the range is full.

    Random rather than lowest-first so that nodes starting together rarely race for the
    same key (the loser of a race retries anyway, the create is a transaction).
    """
    candidates = free_candidates(config, taken)
    if not candidates:
        return None
    return (rng or random).choice(candidates)


def subnet_in_use(subnet: IPv4Network, taken: Iterable[IPv4Network]) -> bool:
    return _Taken(taken).overlaps(subnet)


# ---------------------------------------------------------------------------------------------
# What to do to acquire a lease, decided from one listing of the leases (no etcd here)


@dataclass(frozen=True)
class Reuse:
    """Re-write our own lease: same subnet, new etcd lease; a reservation stays one."""

    lease: Lease


@dataclass(frozen=True)
class Claim:
    """Create the key of a subnet nobody holds; `from_previous` if the old subnet file named it."""

    subnet: IPv4Network
    from_previous: bool = False


@dataclass(frozen=True)
class Exhausted:
    """Every subnet in [SubnetMin, SubnetMax] overlaps someone else's lease."""


@dataclass(frozen=True)
class AcquirePlan:
    """Delete `drop` (our leases the config no longer allows, in listing order), then `action`."""

    drop: tuple[Lease, ...]
    action: Reuse | Claim | Exhausted


def plan_acquisition(
    leases: Iterable[Lease],
    config: NetworkConfig,
    attrs: LeaseAttrs,
    previous: IPv4Network | None = None,
    rng: random.Random | None = None,
) -> AcquirePlan:
    """flanneld's tryAcquireLease as a decision, so it can be tested without etcd.

    In listing order, our leases (same PublicIP) that no longer fit the config are dropped
    until one that fits is found: that one is reused, whatever its kind. With none left,
    the subnet of the previous subnet file is claimed if it fits and nobody else's lease
    overlaps it, else a random free one. `rng` is consulted only for that last pick.
    """
    listed = list(leases)
    drop: list[Lease] = []
    for lease in listed:
        if lease.attrs.public_ip != attrs.public_ip:
            continue
        if config.fits(lease.subnet):
            return AcquirePlan(tuple(drop), Reuse(lease))
        drop.append(lease)
    taken = [l.subnet for l in listed if l.attrs.public_ip != attrs.public_ip]
    if previous is not None and config.fits(previous) and not subnet_in_use(previous, taken):
        return AcquirePlan(tuple(drop), Claim(previous, from_previous=True))
    subnet = choose_subnet(config, taken, rng)
    if subnet is None:
        return AcquirePlan(tuple(drop), Exhausted())
    return AcquirePlan(tuple(drop), Claim(subnet))

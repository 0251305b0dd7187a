"""Leases as flanneld stores them in etcd, and the choice of the lease or subnet to acquire.

The key (`<prefix>/subnets/10.1.18.0-24`, dual-stack `10.1.18.0-24&fd00:1:0:12::-64`,
IPv6-only `0.0.0.0-0&fd00:1:0:12::-64`) and the value (Go's `json.Marshal` of
`LeaseAttrs`) must be byte-compatible with flanneld's, because flanneld nodes and
fastlane nodes share one etcd during a migration and read each other's leases. Both
subnets of a dual-stack node live in one key, so they are claimed, renewed and deleted
together. Everything here is pure so it can be property-tested without etcd.
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
from typing import Any, TypeVar

from fastlane.config import NetworkConfig

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address
IPv6Network = ipaddress.IPv6Network
IPv6Address = ipaddress.IPv6Address

#: flanneld's subnet TTL (pkg/subnet/etcd/registry.go).
SUBNET_TTL = 24 * 3600
#: flanneld collects at most this many free candidates before picking one at random.
MAX_CANDIDATES = 100
#: The IPv4 part of an IPv6-only key: flannel's empty IP4Net (MakeSubnetKey(IP4Net{}, sn6)).
NO_IPV4 = "0.0.0.0-0"
#: PublicIP of an IPv6-only node: flannel leaves the IP4 at zero ("0.0.0.0").
UNSPECIFIED_V4 = IPv4Address(0)

# flannel's regex (pkg/subnet/subnet.go), anchored, ASCII digits, dots escaped:
# "10.5.52.0-24" or with "&<ip6>-<len>"; the IPv6 part is lower-case hex as in flannel's
# ([a-f\d:]+), so a key flanneld skips is skipped here too.
_KEY_RE = re.compile(r"([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)-([0-9]+)(?:&([a-f0-9:]+)-([0-9]+))?")

Subnet = TypeVar("Subnet", IPv4Network, IPv6Network)
#: What identifies a lease (its etcd key): (IPv4 subnet, IPv6 subnet), either may be None.
LeaseId = tuple[IPv4Network | None, IPv6Network | None]


class LeaseValueError(ValueError):
    """A lease key or value in etcd that fastlane cannot read (written by someone else)."""


def go_ip6(addr: IPv6Address) -> str:
    """An IPv6 address as flannel's ip.IP6.String() prints it (keys, JSON, subnet.env).

    flannel keeps IPv6 addresses as big integers and prints them through Go's net.IP:
    RFC 5952 text (what Python's `compressed` gives), except that a value whose minimal
    big-endian form is 4 bytes, or an IPv4-mapped address, prints as dotted IPv4.
    """
    n = int(addr)
    if 1 << 24 <= n < 1 << 32 or n >> 32 == 0xFFFF:
        return str(IPv4Address(n & 0xFFFFFFFF))
    return addr.compressed


def go_ip6_net(net: IPv6Network, offset: int = 0) -> str:
    """flannel's IP6Net.String(): address (+offset, e.g. 1 for the first host) / length."""
    return f"{go_ip6(IPv6Address(int(net.network_address) + offset))}/{net.prefixlen}"


def subnet_key(subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None = None) -> str:
    """The last path element of a lease key, as flannel's MakeSubnetKey.

    10.1.18.0-24; dual-stack 10.1.18.0-24&fd00:1:0:12::-64; IPv6-only (no IPv4 subnet)
    0.0.0.0-0&fd00:1:0:12::-64, flannel's empty IP4Net in front.
    """
    v4 = NO_IPV4 if subnet is None else f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is None:
        return v4
    return f"{v4}&{go_ip6(ipv6_subnet.network_address)}-{ipv6_subnet.prefixlen}"


def parse_key(name: str) -> LeaseId:
    """Inverse of subnet_key: (IPv4 subnet or None for IPv6-only, IPv6 subnet or None).

    As flannel's ParseSubnetKey, the IPv6 prefix length must fit 7 bits (0-127); unlike
    it, host bits are refused (a key flanneld itself could never have written).
    """
    m = _KEY_RE.fullmatch(name)
    if not m:
        raise LeaseValueError(f"lease key {name!r} is not of the form A.B.C.D-LEN[&IPV6-LEN]")
    try:
        v4 = IPv4Network((m.group(1), int(m.group(2))))
        v6 = None
        if m.group(3) is not None:
            plen6 = int(m.group(4))
            if plen6 > 127:
                raise ValueError(f"IPv6 prefix length {plen6} is not below 128")
            v6 = IPv6Network((IPv6Address(m.group(3)), plen6))
    except ValueError as exc:
        raise LeaseValueError(f"lease key {name!r}: {exc}") from None
    if v6 is not None and int(v4.network_address) == 0 and v4.prefixlen == 0:
        return None, v6  # IPv6-only: flannel's empty IP4Net
    return v4, v6


def parse_subnet_key(name: str) -> IPv4Network | None:
    """The IPv4 subnet of a lease key (None for an IPv6-only key); see parse_key."""
    return parse_key(name)[0]


def lease_name(subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None = None) -> str:
    """How logs and messages name a lease: "10.1.18.0/24", "10.1.18.0/24 + fd00::/64"."""
    parts = [str(s) for s in (subnet, ipv6_subnet) if s is not None]
    return " + ".join(parts) or "(no subnet)"


def _parse_go_ip(value: str) -> IPv6Address | None:
    """Go's net.ParseIP as flannel's IP6 JSON decoding uses it: IPv6, or IPv4 (mapped)."""
    if "%" in value:  # Go's ParseIP has no zones; Python's IPv6Address accepts them
        return None
    try:
        return IPv6Address(value)
    except ValueError:
        pass
    try:
        return IPv6Address(0xFFFF00000000 | int(IPv4Address(value)))
    except ValueError:
        return None


@dataclass(frozen=True)
class LeaseAttrs:
    """The lease value. Field order and null/omitempty rules follow flannel's Go struct:
    PublicIP (always), PublicIPv6 (always, null when unset), then BackendType,
    BackendData and BackendV6Data, each left out when empty."""

    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Any = None
    public_ipv6: IPv6Address | None = None
    backend_v6_data: Any = None

    def encode(self) -> bytes:
        ip6 = None if self.public_ipv6 is None else go_ip6(self.public_ipv6)
        value: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": ip6}
        if self.backend_type:
            value["BackendType"] = self.backend_type
        if self.backend_data is not None:
            value["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            value["BackendV6Data"] = self.backend_v6_data
        return json.dumps(value, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> LeaseAttrs:
        """Read a value written by flanneld or fastlane; keys are case-insensitive as in Go.

        What makes flannel's json.Unmarshal fail makes this fail too (the lease is then
        skipped with a warning): a PublicIP that is not IPv4, a PublicIPv6 that is neither
        null nor an address Go's ParseIP reads (it reads IPv4 too, as IPv4-mapped).
        """
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
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
        public_ipv6 = None
        if ip6 is not None:
            public_ipv6 = _parse_go_ip(ip6) if isinstance(ip6, str) else None
            if public_ipv6 is None:
                raise LeaseValueError(f"lease value has an invalid PublicIPv6 ({json.dumps(ip6)})")
        return cls(
            public_ip=public_ip,
            backend_type=btype,
            backend_data=fields.get("backenddata"),
            public_ipv6=public_ipv6,
            backend_v6_data=fields.get("backendv6data"),
        )


def holder(attrs: LeaseAttrs) -> IPv4Address | IPv6Address | None:
    """The node a lease value names: its PublicIP, or PublicIPv6 when PublicIP is 0.0.0.0.

    flanneld matches "our lease" by PublicIP alone; an IPv6-only node has none (flannel
    writes 0.0.0.0), so there the IPv6 address is what tells nodes apart. None: nobody.
    """
    if attrs.public_ip != UNSPECIFIED_V4:
        return attrs.public_ip
    return attrs.public_ipv6


@dataclass(frozen=True)
class Lease:
    """A subnet (or a pair, dual-stack) held in etcd under one key.

    `subnet` is None for an IPv6-only lease, `ipv6_subnet` None for an IPv4-only one.
    `expiration` is None for a reservation (a key with no etcd lease).
    """

    subnet: IPv4Network | None
    attrs: LeaseAttrs
    expiration: float | None = None
    etcd_lease: int = 0
    mod_revision: int = 0
    key: str = field(default="", compare=False)
    ipv6_subnet: IPv6Network | None = None

    @property
    def subnet4(self) -> IPv4Network:
        """The IPv4 subnet, for the IPv4 data paths: they are only ever given leases that have
        one (Backend.routable skips IPv6-only leases), so its absence is a bug, not input."""
        if self.subnet is None:
            raise ValueError(f"lease {self.name} has no IPv4 subnet")
        return self.subnet

    @property
    def ident(self) -> LeaseId:
        """What identifies the lease (its key): both subnets, as flannel's sameSubnet."""
        return (self.subnet, self.ipv6_subnet)

    @property
    def name(self) -> str:
        return lease_name(self.subnet, self.ipv6_subnet)

    @property
    def is_reservation(self) -> bool:
        return self.etcd_lease == 0

    def remaining(self, now: float | None = None) -> float:
        if self.expiration is None:
            return float("inf")
        return self.expiration - (time.time() if now is None else now)


class _Taken:
    """Existing leases as sorted address intervals, for O(log n) overlap checks (either
    family: only integer addresses are compared)."""

    def __init__(self, taken: Iterable[IPv4Network | IPv6Network]):
        spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in taken)
        self.starts = [s for s, _ in spans]
        self.max_end: list[int] = []
        best = -1
        for _, end in spans:
            best = max(best, end)
            self.max_end.append(best)

    def blocking_end(self, start: int, end: int) -> int | None:
        """The furthest end among leases overlapping [start, end], or None if none does."""
        # Among intervals starting at or before our end, the one reaching furthest decides.
        i = bisect.bisect_right(self.starts, end)
        if i > 0 and self.max_end[i - 1] >= start:
            return self.max_end[i - 1]
        return None

    def overlaps(self, net: IPv4Network | IPv6Network) -> bool:
        return self.blocking_end(int(net.network_address), int(net.broadcast_address)) is not None


def _range(config: NetworkConfig, family: int) -> tuple[int, int, int, type]:
    """(first, last, prefix length, network type) of the subnets a lease may take."""
    if family == 6:
        assert config.ipv6_subnet_min is not None and config.ipv6_subnet_max is not None
        return (
            int(config.ipv6_subnet_min),
            int(config.ipv6_subnet_max),
            config.ipv6_subnet_len,
            IPv6Network,
        )
    assert config.subnet_min is not None and config.subnet_max is not None
    return int(config.subnet_min), int(config.subnet_max), config.subnet_len, IPv4Network


def free_candidates(
    config: NetworkConfig,
    taken: Iterable[IPv4Network | IPv6Network],
    limit: int = MAX_CANDIDATES,
    family: int = 4,
) -> list:
    """Walk up from SubnetMin (IPv6SubnetMin for family 6) like flanneld, collecting up to
    `limit` subnets no lease overlaps.

    The same list as flanneld's one-step walk, but a run of subnets covered by one lease is
    jumped over in one step: an IPv6 range holds up to 2**62 subnets, and one large foreign
    lease must not make the walk take forever.
    """
    first, last, plen, net_type = _range(config, family)
    index = _Taken(taken)
    size = 1 << ((128 if family == 6 else 32) - plen)
    out: list = []
    addr = first
    while addr <= last and len(out) < limit:
        blocked = index.blocking_end(addr, addr + size - 1)
        if blocked is None:
            out.append(net_type((addr, plen)))
            addr += size
        else:  # every subnet up to that lease's end overlaps it: resume after it, aligned
            addr = max(addr + size, (blocked // size + 1) * size)
    return out


def choose_subnet(
    config: NetworkConfig,
    taken: Iterable[IPv4Network | IPv6Network],
    rng: random.Random | None = None,
    family: int = 4,
):
    """A random free subnet among the first candidates, or None when the range is full.

    Random rather than lowest-first so that nodes starting together rarely race for the
    same key (the loser of a race retries anyway, the create is a transaction).
    """
    candidates = free_candidates(config, taken, family=family)
    if not candidates:
        return None
    return (rng or random).choice(candidates)


def subnet_in_use(subnet: Subnet, taken: Iterable[Subnet]) -> bool:
    return _Taken(taken).overlaps(subnet)


# ---------------------------------------------------------------------------------------------
# What to do to acquire a lease, decided from one listing of the leases (no etcd here)


@dataclass(frozen=True)
class Reuse:
    """Re-write our own lease: same subnets, new etcd lease; a reservation stays one."""

    lease: Lease


@dataclass(frozen=True)
class Claim:
    """Create the key of subnets nobody holds (one key for both families, one transaction).

    `from_previous` if the old subnet file named one of them (FLANNEL_SUBNET or
    FLANNEL_IPV6_SUBNET). `subnet` is None in an IPv6-only network, `ipv6_subnet` None
    unless IPv6 is enabled.
    """

    subnet: IPv4Network | None
    from_previous: bool = False
    ipv6_subnet: IPv6Network | None = None

    @property
    def name(self) -> str:
        return lease_name(self.subnet, self.ipv6_subnet)


@dataclass(frozen=True)
class Exhausted:
    """Every subnet of an enabled family's [SubnetMin, SubnetMax] overlaps someone else's
    lease. `family` says which ran out (4 or 6)."""

    family: int = 4


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
    previous6: IPv6Network | None = None,
) -> AcquirePlan:
    """flanneld's tryAcquireLease as a decision, for both address families, so it can be
    tested without etcd.

    In listing order, our leases (same holder: PublicIP, or PublicIPv6 for an IPv6-only
    node) that no longer fit the config (either family) are dropped until one that fits
    is found: that one is reused, whatever its kind. With none left, each enabled family
    takes the subnet of the previous subnet file (`previous` = FLANNEL_SUBNET, `previous6`
    = FLANNEL_IPV6_SUBNET) if it fits and nobody else's lease overlaps it, else a random
    free one of that family; both go into one Claim (one key). `rng` is consulted only for
    random picks, IPv4 first, as flanneld's allocateSubnet does.

    Unlike flanneld, which reuses the previous file only when both of its subnets still
    fit, each family is judged alone: a node that had IPv4 only keeps its IPv4 subnet when
    IPv6 is switched on.
    """
    listed = list(leases)
    me = holder(attrs)
    drop: list[Lease] = []
    for lease in listed:
        if me is None or holder(lease.attrs) != me:
            continue
        if config.fits_lease(lease.subnet, lease.ipv6_subnet):
            return AcquirePlan(tuple(drop), Reuse(lease))
        drop.append(lease)
    others = [lease for lease in listed if me is None or holder(lease.attrs) != me]
    subnet: IPv4Network | None = None
    subnet6: IPv6Network | None = None
    if config.enable_ipv4:
        taken = [lease.subnet for lease in others if lease.subnet is not None]
        if previous is not None and config.fits(previous) and not subnet_in_use(previous, taken):
            subnet = previous
    if config.enable_ipv6:
        taken6 = [lease.ipv6_subnet for lease in others if lease.ipv6_subnet is not None]
        if (
            previous6 is not None
            and config.fits6(previous6)
            and not subnet_in_use(previous6, taken6)
        ):
            subnet6 = previous6
    from_previous = subnet is not None or subnet6 is not None
    if config.enable_ipv4 and subnet is None:
        subnet = choose_subnet(config, taken, rng)
        if subnet is None:
            return AcquirePlan(tuple(drop), Exhausted(4))
    if config.enable_ipv6 and subnet6 is None:
        subnet6 = choose_subnet(config, taken6, rng, family=6)
        if subnet6 is None:
            return AcquirePlan(tuple(drop), Exhausted(6))
    return AcquirePlan(tuple(drop), Claim(subnet, from_previous, subnet6))

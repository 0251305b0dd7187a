"""The network config stored at `<prefix>/config`, parsed and validated as flanneld does.

flanneld decodes the JSON with Go's encoding/json, which matches keys case-insensitively
(the last duplicate wins) and leaves a field untouched when its value is null; then
`CheckNetworkConfig` fills in defaults and rejects incoherent values. Operators rely on
configs that flanneld accepts being accepted here too, and on the same defaults (the
first subnet is skipped, the last one is usable, a missing Backend means udp), so this
module reproduces those rules exactly. Error messages are one line and name the field.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network


class ConfigError(ValueError):
    """The config is not valid JSON or not a coherent flannel network config."""


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network | None
    subnet_len: int
    subnet_min: ipaddress.IPv4Address | None
    subnet_max: ipaddress.IPv4Address | None
    backend_type: str
    backend: dict[str, Any] = field(default_factory=dict)
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: ipaddress.IPv6Address | None = None
    ipv6_subnet_max: ipaddress.IPv6Address | None = None
    enable_nftables: bool = False

    def subnet_bounds(self) -> tuple[IPv4Network, IPv4Network]:
        """The first and last subnet a lease may take, as networks."""
        assert self.network is not None and self.subnet_min and self.subnet_max
        return (
            IPv4Network((self.subnet_min, self.subnet_len)),
            IPv4Network((self.subnet_max, self.subnet_len)),
        )

    def fits(self, subnet: IPv4Network | None) -> bool:
        """Whether an existing lease is still valid under this config (reuse rule)."""
        if (
            not self.enable_ipv4
            or self.network is None
            or subnet is None
            or subnet.prefixlen != self.subnet_len
        ):
            return False
        lo, hi = self.subnet_bounds()
        return lo.network_address <= subnet.network_address <= hi.network_address

    def subnet_bounds6(self) -> tuple[IPv6Network, IPv6Network]:
        """The first and last IPv6 subnet a lease may take (EnableIPv6 only)."""
        assert self.ipv6_network is not None and self.ipv6_subnet_min and self.ipv6_subnet_max
        return (
            IPv6Network((self.ipv6_subnet_min, self.ipv6_subnet_len)),
            IPv6Network((self.ipv6_subnet_max, self.ipv6_subnet_len)),
        )

    def fits6(self, subnet: IPv6Network | None) -> bool:
        """flannel's isIPv6SubnetConfigCompat for an enabled IPv6: length and range."""
        if (
            not self.enable_ipv6
            or self.ipv6_network is None
            or subnet is None
            or subnet.prefixlen != self.ipv6_subnet_len
        ):
            return False
        lo, hi = self.subnet_bounds6()
        return lo.network_address <= subnet.network_address <= hi.network_address

    def fits_lease(self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None) -> bool:
        """Whether a lease (both families) is still valid under this config.

        As flannel's isSubnetConfigCompat + isIPv6SubnetConfigCompat: each enabled family
        must fit, and a disabled family must be absent (a dual-stack lease is dropped when
        IPv6 is switched off; a v4 part of a v6-only lease is the empty 0.0.0.0/0).
        """
        ok4 = self.fits(subnet) if self.enable_ipv4 else subnet is None
        ok6 = self.fits6(ipv6_subnet) if self.enable_ipv6 else ipv6_subnet is None
        return ok4 and ok6

    def backend_option(self, name: str, default: Any = None) -> Any:
        """A Backend key, matched case-insensitively like Go's json decoding."""
        for key, value in self.backend.items():
            if key.lower() == name.lower():
                return value
        return default


# Field name (lower-cased) -> attribute, for the case-insensitive decode.
_FIELDS = {
    "enableipv4": "EnableIPv4",
    "enableipv6": "EnableIPv6",
    "enablenftables": "EnableNFTables",
    "network": "Network",
    "ipv6network": "IPv6Network",
    "subnetlen": "SubnetLen",
    "ipv6subnetlen": "IPv6SubnetLen",
    "subnetmin": "SubnetMin",
    "subnetmax": "SubnetMax",
    "ipv6subnetmin": "IPv6SubnetMin",
    "ipv6subnetmax": "IPv6SubnetMax",
    "backend": "Backend",
}


class _Object(dict):
    """A JSON object that also remembers its key/value pairs in order (duplicates too)."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.pairs = pairs


def _decode(text: str | bytes) -> dict[str, Any]:
    try:
        raw = json.loads(text, object_pairs_hook=_Object)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"config is not valid JSON: {exc}") from None
    if not isinstance(raw, _Object):
        raise ConfigError("config must be a JSON object")
    fields: dict[str, Any] = {}
    for key, value in raw.pairs:
        name = _FIELDS.get(key.lower())
        if name is not None and value is not None:  # Go leaves a field alone on null
            fields[name] = value
    return fields


def _as_bool(fields: dict[str, Any], name: str, default: bool) -> bool:
    value = fields.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {json.dumps(value)}")
    return value


def _as_uint(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, not {json.dumps(value)}")
    return value


def _as_net(fields: dict[str, Any], name: str, version: int):
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a CIDR string, not {json.dumps(value)}")
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{name} is not a valid CIDR: {value!r}") from None
    if "/" not in value or net.version != version:
        raise ConfigError(f"{name} is not a valid IPv{version} CIDR: {value!r}")
    return net


def _as_addr(fields: dict[str, Any], name: str, version: int):
    value = fields.get(name)
    if value is None:
        return None
    try:
        addr = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if addr is None or addr.version != version:
        raise ConfigError(f"{name} is not a valid IPv{version} address: {json.dumps(value)}")
    return addr


def _check_family(net, subnet_len: int, smin, smax, *, v6: bool):
    """flannel's CheckNetworkConfig for one address family; returns (len, min, max)."""
    bits = 128 if v6 else 32
    label = "IPv6Network" if v6 else "Network"
    lenname = "IPv6SubnetLen" if v6 else "SubnetLen"
    minname, maxname = ("IPv6SubnetMin", "IPv6SubnetMax") if v6 else ("SubnetMin", "SubnetMax")
    if net is None or (int(net.network_address) == 0 and net.prefixlen == 0):
        # flannel's IP4Net/IP6Net.Empty(): 0.0.0.0/0 and ::/0 count as "not defined"
        raise ConfigError(f"please define a correct {label} parameter in the flannel config")
    if subnet_len > 0:
        if subnet_len > bits - 2:
            raise ConfigError(f"{lenname} must be less than /{bits - 1}")
        if subnet_len < net.prefixlen + 2:
            raise ConfigError(
                f"{lenname} /{subnet_len}: {label} {net} must be able to accommodate "
                "at least four subnets"
            )
    else:
        if net.prefixlen > bits - 4:
            raise ConfigError(
                f"{label} {net} is too small. Minimum useful network prefix is /{bits - 4}"
            )
        default = 64 if v6 else 24
        subnet_len = default if net.prefixlen <= default - 2 else net.prefixlen + 2
    size = 1 << (bits - subnet_len)
    base = int(net.network_address)
    addr_type = type(net.network_address)
    if smin is None or int(smin) == 0:
        smin = addr_type(base + size)  # the first subnet is skipped
    elif smin not in net:
        raise ConfigError(f"{minname} {smin} is not in the range of the {label} {net}")
    if smax is None or int(smax) == 0:
        smax = addr_type(base + net.num_addresses - size)  # the last subnet is usable
    elif smax not in net:
        raise ConfigError(f"{maxname} {smax} is not in the range of the {label} {net}")
    for name, value in ((minname, smin), (maxname, smax)):
        if int(value) % size:
            raise ConfigError(f"{name} is not on a {lenname} boundary: {value}")
    return subnet_len, smin, smax


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate a flannel network config; raise ConfigError (one line) if bad."""
    fields = _decode(text)
    enable_ipv4 = _as_bool(fields, "EnableIPv4", True)
    enable_ipv6 = _as_bool(fields, "EnableIPv6", False)
    enable_nftables = _as_bool(fields, "EnableNFTables", False)

    backend = fields.get("Backend")
    if backend is None:
        backend_type, backend = "udp", {}
    elif not isinstance(backend, dict):
        raise ConfigError("error decoding Backend property of config: must be a JSON object")
    else:
        btype = next((v for k, v in backend.items() if k.lower() == "type"), "")
        if not isinstance(btype, str):
            raise ConfigError(f"Backend.Type must be a string, not {json.dumps(btype)}")
        backend_type = btype.lower()

    network = _as_net(fields, "Network", 4)
    subnet_len = _as_uint(fields, "SubnetLen")
    smin = _as_addr(fields, "SubnetMin", 4)
    smax = _as_addr(fields, "SubnetMax", 4)
    net6 = _as_net(fields, "IPv6Network", 6)
    subnet_len6 = _as_uint(fields, "IPv6SubnetLen")
    smin6 = _as_addr(fields, "IPv6SubnetMin", 6)
    smax6 = _as_addr(fields, "IPv6SubnetMax", 6)

    if enable_ipv4:
        subnet_len, smin, smax = _check_family(network, subnet_len, smin, smax, v6=False)
    if enable_ipv6:
        subnet_len6, smin6, smax6 = _check_family(net6, subnet_len6, smin6, smax6, v6=True)

    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=smin,
        subnet_max=smax,
        backend_type=backend_type,
        backend=backend,
        enable_ipv4=enable_ipv4,
        enable_ipv6=enable_ipv6,
        ipv6_network=net6,
        ipv6_subnet_len=subnet_len6,
        ipv6_subnet_min=smin6,
        ipv6_subnet_max=smax6,
        enable_nftables=enable_nftables,
    )

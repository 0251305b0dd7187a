"""/run/flannel/subnet.env: what Docker/CNI read, and what a restart reads back.

flanneld writes the first usable address of the lease (network + 1) with the prefix
length, in a fixed line order, atomically (temp file + rename) so a reader never sees a
half-written file. The file is also the memory of a node: on restart the previous
FLANNEL_SUBNET (and FLANNEL_IPV6_SUBNET) is tried first when no lease matches our
PublicIP any more.

The lines and their order are flannel's WriteSubnetFile (pkg/subnet/subnet.go):
FLANNEL_NETWORK, FLANNEL_SUBNET (if EnableIPv4), FLANNEL_IPV6_NETWORK,
FLANNEL_IPV6_SUBNET (if EnableIPv6), FLANNEL_MTU, FLANNEL_IPMASQ; IPv6 addresses are
printed as flannel's IP6 String() prints them (lease.go_ip6).
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path

from fastlane.config import NetworkConfig
from fastlane.lease import go_ip6_net

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network


def render(
    config: NetworkConfig,
    subnet: IPv4Network | None,
    mtu: int,
    ip_masq: bool,
    ipv6_subnet: IPv6Network | None = None,
) -> str:
    """The file for a lease: FLANNEL_SUBNET / FLANNEL_IPV6_SUBNET are the lease's first
    address (network + 1) with its length; each family only if the config enables it."""
    network = config.network if config.enable_ipv4 else None
    first = None
    if network is not None and subnet is not None:
        first = ipaddress.IPv4Interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")
    network6 = config.ipv6_network if config.enable_ipv6 else None
    return render_values(
        network, first, mtu, ip_masq, network6, ipv6_subnet if network6 is not None else None
    )


def render_values(
    network: IPv4Network | None,
    subnet: ipaddress.IPv4Interface | None,
    mtu: int,
    ip_masq: bool,
    ipv6_network: IPv6Network | None = None,
    ipv6_subnet: IPv6Network | None = None,
) -> str:
    """The file's text from its values, in flanneld's line order (no network: no subnet
    line). `ipv6_subnet` is the lease's subnet; its first address is what is written."""
    lines: list[str] = []
    if network is not None:
        lines.append(f"FLANNEL_NETWORK={network}")
        lines.append(f"FLANNEL_SUBNET={subnet}")
    if ipv6_network is not None and ipv6_subnet is not None:
        lines.append(f"FLANNEL_IPV6_NETWORK={go_ip6_net(ipv6_network)}")
        lines.append(f"FLANNEL_IPV6_SUBNET={go_ip6_net(ipv6_subnet, 1)}")
    lines.append(f"FLANNEL_MTU={mtu}")
    lines.append(f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}")
    return "\n".join(lines) + "\n"


def write(path: str | Path, text: str) -> None:
    """Write atomically: a temp file in the same directory, fsync, rename over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def parse_vars(text: str) -> dict[str, str]:
    """KEY=VALUE lines of an env file's text; comments and other lines are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        key = key.strip()
        if sep and key and not key.startswith("#"):
            out[key] = value.strip().strip('"')
    return out


def read_vars(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file; missing file -> {} (a first start)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):  # missing, a directory, unreadable, not a directory
        return {}
    return parse_vars(text)


def _previous(path: str | Path, name: str, version: int):
    """As flanneld's Read(IP6)CIDRFromSubnetFile: the value is split on commas, parts that
    are not a CIDR of this family are skipped, and exactly one must remain."""
    found = []
    for part in read_vars(path).get(name, "").split(","):
        if "/" not in part or "%" in part:
            continue
        try:
            net = ipaddress.ip_interface(part).network
        except ValueError:
            continue
        if net.version == version:
            found.append(net)
    return found[0] if len(found) == 1 else None


def previous_subnet(path: str | Path) -> IPv4Network | None:
    """FLANNEL_SUBNET of an earlier run as a network (10.5.72.1/24 -> 10.5.72.0/24)."""
    return _previous(path, "FLANNEL_SUBNET", 4)


def previous_ipv6_subnet(path: str | Path) -> IPv6Network | None:
    """FLANNEL_IPV6_SUBNET of an earlier run (fd00:1:0:5::1/64 -> fd00:1:0:5::/64), as
    flanneld's ReadIP6CIDRFromSubnetFile; None if missing or not one IPv6 CIDR."""
    return _previous(path, "FLANNEL_IPV6_SUBNET", 6)

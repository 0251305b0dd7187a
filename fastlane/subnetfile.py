"""/run/flannel/subnet.env: what Docker/CNI read, and what a restart reads back.

flanneld writes the first usable address of the lease (network + 1) with the prefix
length, in a fixed line order, atomically (temp file + rename) so a reader never sees a
half-written file. The file is also the memory of a node: on restart the previous
FLANNEL_SUBNET is tried first when no lease matches our PublicIP any more.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path

from fastlane.config import NetworkConfig

IPv4Network = ipaddress.IPv4Network


def render(config: NetworkConfig, subnet: IPv4Network, mtu: int, ip_masq: bool) -> str:
    """The file for a lease: FLANNEL_SUBNET is the lease's first address (network + 1)."""
    network = config.network if config.enable_ipv4 else None
    first = ipaddress.IPv4Interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")
    return render_values(network, first, mtu, ip_masq)


def render_values(
    network: IPv4Network | None, subnet: ipaddress.IPv4Interface, mtu: int, ip_masq: bool
) -> str:
    """The file's text from its values, in flanneld's line order (no network: no subnet line)."""
    lines: list[str] = []
    if network is not None:
        lines.append(f"FLANNEL_NETWORK={network}")
        lines.append(f"FLANNEL_SUBNET={subnet}")
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


def previous_subnet(path: str | Path) -> IPv4Network | None:
    """FLANNEL_SUBNET of an earlier run as a network (10.5.72.1/24 -> 10.5.72.0/24)."""
    value = read_vars(path).get("FLANNEL_SUBNET")
    if not value:
        return None
    try:
        net = ipaddress.ip_interface(value).network
    except ValueError:
        return None
    return net if "/" in value and net.version == 4 else None

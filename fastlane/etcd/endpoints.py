"""flanneld's -etcd-endpoints and -etcd-*file flags, read into plain values.

Pure parsing (plus a DNS lookup that tests replace), so that a typo is reported with the
offending item before any connection is attempted.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastlane.etcd.errors import one_line

DEFAULT_PORT = 2379


@dataclass(frozen=True)
class Endpoint:
    """One etcd client address. ``host`` is an IPv4 literal or "localhost"; ``server_name`` keeps
    the hostname the user wrote (before we resolved it) for TLS certificate checks."""

    host: str
    port: int
    tls: bool = False
    server_name: str | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.server_name or self.host}:{self.port}"


_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


def _resolve_ipv4(host: str) -> str:
    """Resolve a hostname to its first IPv4 address (etcd3aio/gRPC here take IPv4 literals)."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.args[1] if isinstance(exc, socket.gaierror) and len(exc.args) > 1 else exc
        raise ValueError(f"cannot resolve host {host!r} to an IPv4 address ({reason})") from None
    if not infos:
        raise ValueError(f"host {host!r} has no IPv4 address")
    return str(infos[0][4][0])


def _parse_one(item: str, resolve: Callable[[str], str]) -> Endpoint:
    if any(c.isspace() for c in item):
        raise ValueError("contains whitespace")
    tls = False
    if "://" in item:
        scheme, _, _rest = item.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r} (use http or https)")
        tls = scheme == "https"
        url = item
    else:
        url = "http://" + item
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(one_line(str(exc))) from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a path, query or fragment is not allowed")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "credentials in the URL are not supported (use -etcd-username/-etcd-password)"
        )
    host = parts.hostname
    if not host:
        raise ValueError("missing host")
    port_text = parts.netloc.rpartition("]")[2].rpartition(":")[2] if ":" in parts.netloc else ""
    if port is not None and not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise ValueError(f"invalid port {port_text!r}")
    if port is None:
        if parts.netloc.endswith(":"):
            raise ValueError("empty port")
        port = DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if "[" in parts.netloc or ":" in host:
        raise ValueError("IPv6 endpoints are not supported; use an IPv4 address or a hostname")
    server_name: str | None = None
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        if host.lower() == "localhost":
            host = "localhost"
        elif re.fullmatch(r"[0-9.]+", host):
            raise ValueError(f"invalid IPv4 address {host!r}") from None
        elif not _HOSTNAME_RE.match(host):
            raise ValueError(f"invalid host name {host!r}") from None
        else:
            server_name = host.rstrip(".")
            host = resolve(server_name)
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise ValueError(f"resolver returned {host!r}, not an IPv4 address") from None
    return Endpoint(host=host, port=port, tls=tls, server_name=server_name)


def parse_endpoints(spec: str, *, resolve: Callable[[str], str] | None = None) -> list[Endpoint]:
    """Turn flanneld's -etcd-endpoints value into endpoints, in order, without duplicates.

    Accepts ``http://h:p``, ``https://h:p`` and bare ``h:p`` (plain), comma separated; a missing
    port means 2379. Hostnames are resolved to IPv4 here (``resolve`` lets tests avoid DNS).
    Raises ValueError("bad etcd endpoint 'x': why") naming the offending item.
    """
    resolver = resolve or _resolve_ipv4
    items = [part.strip() for part in spec.split(",")]
    items = [part for part in items if part]
    if not items:
        raise ValueError(f"bad etcd endpoints {one_line(spec, 80)!r}: no endpoint given")
    out: list[Endpoint] = []
    for item in items:
        try:
            ep = _parse_one(item, resolver)
        except ValueError as exc:
            raise ValueError(
                f"bad etcd endpoint {one_line(item, 120)!r}: {one_line(str(exc))}"
            ) from None
        if ep not in out:
            out.append(ep)
    return out


@dataclass(frozen=True)
class TLSFiles:
    """flanneld's -etcd-cafile/-etcd-certfile/-etcd-keyfile (paths, PEM)."""

    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

"""One connection to one etcd endpoint: the gRPC channel and etcd3aio's services on it.

We build the channel ourselves rather than let etcd3aio do it: that gives us control over
TLS (system roots, server-name override for hostnames we resolved), keepalives (a dead
server must be noticed under an idle watch) and reconnect backoff (so a restarted etcd is
usable again within a second or two).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import grpc
import grpc.aio
from etcd3aio._protobuf import WatchStub
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.maintenance import MaintenanceService

from fastlane.etcd.endpoints import Endpoint, TLSFiles
from fastlane.etcd.errors import EtcdError, one_line

_log = logging.getLogger(__name__)


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise EtcdError(f"cannot read etcd {what} {path!r}: {exc.strerror or exc}") from None


def credentials(tls: TLSFiles | None) -> Any:
    """Return the gRPC channel credentials used for https endpoints.

    Like flanneld: without both cert and key we do not present a client certificate and the CA
    file is ignored (with a warning). https endpoints then still speak TLS, verified against the
    system roots, which is what etcd's Go client does for an https URL without a TLS config.
    """
    if tls is None or not tls.certfile or not tls.keyfile:
        if tls is not None and (tls.certfile or tls.keyfile or tls.cafile):
            _log.warning(
                "etcd: client certificate or key missing: not using TLS client "
                "credentials (the CA file is ignored too), like flanneld"
            )
        return grpc.ssl_channel_credentials()
    ca = _read_pem(tls.cafile, "cafile") if tls.cafile else None
    cert = _read_pem(tls.certfile, "certfile")
    key = _read_pem(tls.keyfile, "keyfile")
    # gRPC only says "Failed to create security handshaker" for a bad pair; check it here so
    # the operator learns which file is wrong.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise EtcdError(
            f"etcd certfile {tls.certfile!r} and keyfile {tls.keyfile!r} are not a "
            f"valid certificate/key pair ({one_line(str(exc), 120)})"
        ) from None
    if tls.cafile:
        try:
            ctx.load_verify_locations(cafile=tls.cafile)
        except (ssl.SSLError, OSError) as exc:
            raise EtcdError(
                f"etcd cafile {tls.cafile!r} holds no usable CA certificate "
                f"({one_line(str(exc), 120)})"
            ) from None
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def key_bytes(key: str) -> bytes:
    # surrogateescape round-trips keys that are not valid UTF-8 (someone else's junk under our
    # prefix must not crash us, and we must be able to delete it again).
    return key.encode("utf-8", "surrogateescape")


def key_str(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# Keepalive pings only while a call (a watch) is open: etcd refuses pings on idle connections
# and pings more often than every 5 s. 10 s + 5 s means a silently dead server under an idle
# watch is noticed within ~15 s; a crashed or restarted one (RST) at once.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # Without this, gRPC's reconnect backoff grows to 2 minutes during an outage and calls keep
    # failing fast long after etcd is back.
    # (Not grpc.min_reconnect_backoff_ms: gRPC also uses it as the connect-attempt timeout.)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

# How often an idle watch asks etcd for a progress notification (a liveness probe).
PROGRESS_INTERVAL = 5.0

_WATCH_METADATA = (("hasleader", "true"),)  # etcd cancels the watch if its member loses the leader


class Conn:
    """A channel to one endpoint plus etcd3aio's services on it."""

    def __init__(self, endpoint: Endpoint, creds: Any) -> None:
        self.endpoint = endpoint
        host = "127.0.0.1" if endpoint.host == "localhost" else endpoint.host
        target = f"ipv4:{host}:{endpoint.port}"
        options = list(_CHANNEL_OPTIONS)
        if endpoint.tls:
            if endpoint.server_name:
                options.append(("grpc.ssl_target_name_override", endpoint.server_name))
            elif endpoint.host == "localhost":
                options.append(("grpc.ssl_target_name_override", "localhost"))
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        # Two attempts: etcd3aio retries UNAVAILABLE itself; more would only stretch outages.
        self.kv = KVService(self.channel, max_attempts=2)
        self.lease = LeaseService(self.channel, max_attempts=2)
        self.auth = AuthService(self.channel, max_attempts=1)
        self.maintenance = MaintenanceService(self.channel, max_attempts=1)
        self.watch_stub = WatchStub(self.channel)
        self.token: str | None = None
        self.token_generation = 0
        self.closed = False

    def set_token(self, token: str | None) -> None:
        self.token = token
        self.token_generation += 1
        for svc in (self.kv, self.lease, self.auth, self.maintenance):
            svc.set_token(token)

    def watch_metadata(self) -> tuple[tuple[str, str], ...]:
        return _WATCH_METADATA + ((("token", self.token),) if self.token else ())

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.channel.close()


def really_cancelled() -> bool:
    """True if our task was asked to stop, as opposed to grpc.aio raising CancelledError
    because the channel under a call was closed."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def close_soon(conn: Conn) -> None:
    if not conn.closed:
        asyncio.ensure_future(conn.close())

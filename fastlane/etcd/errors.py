"""Errors the etcd package raises, and the mapping from what etcd3aio and grpc raise.

Everything above fastlane.etcd sees these few classes with one-line messages naming the
endpoint and key, never a protobuf status or a raw ``grpc.aio.AioRpcError``: operators
read these messages in the daemon's log, and callers decide "retry" or "give up" on the
class alone.
"""

from __future__ import annotations

import re

import etcd3aio
import grpc
import grpc.aio


class EtcdError(Exception):
    """Any failure talking to etcd; the message is one line and names the endpoint/key."""


class EtcdUnavailable(EtcdError):
    """No endpoint could be reached, or the call ran past its deadline: worth retrying later."""


class EtcdAuthError(EtcdError):
    """Bad credentials or missing permission: retrying will not help."""


class WatchInterrupted(EtcdError):
    """The watch can no longer guarantee that it delivered every event; re-list and re-watch.

    ``compacted`` is True when the requested history is gone (start revision older than the last
    compaction); ``compact_revision`` is then the oldest revision etcd still has.
    """

    def __init__(self, message: str, *, compacted: bool = False, compact_revision: int = 0):
        super().__init__(message)
        self.compacted = compacted
        self.compact_revision = compact_revision


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_AUTH_DETAILS = (
    "authentication failed",
    "invalid auth token",
    "permission denied",
    "user name",
    "auth: ",
    "revision of auth store is old",
    "invalid password",
)


def rpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, grpc.aio.AioRpcError):
            return seen
        seen = seen.__cause__
    return None


def map_error(exc: BaseException, what: str, where: str, timeout: float) -> EtcdError:
    """Translate anything etcd3aio/grpc raise into our classes, with a one-line message."""
    if isinstance(exc, EtcdError):
        return exc
    prefix = f"etcd {what} at {where}"
    if isinstance(exc, TimeoutError):
        return EtcdUnavailable(f"{prefix}: no answer within {timeout:g}s")
    rpc = rpc_error(exc)
    if rpc is not None:
        code = rpc.code()
        detail = one_line(rpc.details() or "")
        msg = f"{prefix}: {code.name}" + (f" ({detail})" if detail else "")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EtcdUnavailable(msg)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return EtcdAuthError(msg)
        if any(d in detail.lower() for d in _AUTH_DETAILS):
            return EtcdAuthError(msg)
        if code == grpc.StatusCode.CANCELLED and "channel closed" in detail.lower():
            return EtcdError(f"{prefix}: the store is closed")
        if code == grpc.StatusCode.CANCELLED or "too many requests" in detail.lower():
            return EtcdUnavailable(msg)  # server shutting down / overloaded: retry later
        return EtcdError(msg)
    if isinstance(exc, etcd3aio.EtcdConnectionError | etcd3aio.EtcdTransientError):
        return EtcdUnavailable(f"{prefix}: {one_line(str(exc))}")
    if isinstance(exc, etcd3aio.EtcdUnauthenticatedError | etcd3aio.EtcdPermissionDeniedError):
        return EtcdAuthError(f"{prefix}: {one_line(str(exc))}")
    if isinstance(exc, grpc.aio.UsageError):
        return EtcdError(f"{prefix}: the store is closed")
    return EtcdError(f"{prefix}: {type(exc).__name__}: {one_line(str(exc))}")


def token_expired(exc: BaseException) -> bool:
    """An auth token that etcd no longer knows (restart, TTL): re-authenticating fixes it."""
    rpc = rpc_error(exc)
    if rpc is None:
        return False
    detail = (rpc.details() or "").lower()
    return "invalid auth token" in detail or "revision of auth store is old" in detail


def short_reason(exc: BaseException) -> str:
    """The gist of why one endpoint failed, for the "no endpoint answered" message."""
    rpc = rpc_error(exc)
    text = (rpc.details() or rpc.code().name) if rpc is not None else str(exc)
    # "failed to connect to all addresses; last error: UNKNOWN: ipv4:1.2.3.4:5: <the reason>"
    m = re.search(r"last error: \w+: (?:ipv4:)?[\w.\-]+:\d+: (.*)", text)
    if m:
        text = m.group(1)
    low = text.lower()
    if "connection refused" in low:
        return "connection refused"
    if "timeout" in low or "deadline" in low or "timed out" in low:
        return "timed out"
    if "no route to host" in low or "network is unreachable" in low:
        return "unreachable"
    if "certificate_verify_failed" in low:
        return "TLS: server certificate not trusted by the CA"
    if "handshake" in low or "ssl" in low or "certificate" in low:
        return "TLS handshake failed: " + one_line(text, 120)
    if "socket closed" in low:
        return "connection closed by the server (TLS-only server, or not etcd?)"
    return one_line(text, 160)

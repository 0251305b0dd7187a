"""The one place where fastlane talks to etcd (v3 API, over etcd3aio and grpc.aio).

Why an adapter: etcd3aio is young and leaks its transport (protobuf messages, raw
``grpc.aio.AioRpcError``), its watch silently resumes after a reconnect (and can skip events
on the way), a compacted watch just hangs, and its token refresher never recovers from an
etcd restart. Everything above this package sees plain dataclasses, a handful of exception
classes with one-line messages, and a watch that either delivers every event in order or
raises :class:`WatchInterrupted` so the caller re-lists.

The parts, each in its own module:

- ``endpoints``: the -etcd-endpoints and TLS file flags, parsed;
- ``errors``: our exception classes and the mapping from etcd3aio's and grpc's;
- ``connection``: one gRPC channel to one endpoint, with our TLS, keepalive and backoff;
- ``store``: :class:`Store`, the KV, transaction and lease calls, failover and re-auth;
- ``watch``: the gap-free watch behind :meth:`Store.watch`.

Import the public names from here: ``from fastlane.etcd import Store, EtcdError``.
"""

from __future__ import annotations

import os

# gRPC's C core logs handshake and connection failures straight to stderr; we report them
# as one-line errors instead. GRPC_VERBOSITY=DEBUG in the environment still turns them on.
# Set before any module of this package imports grpc (the package runs first).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from fastlane.etcd.endpoints import DEFAULT_PORT, Endpoint, TLSFiles, parse_endpoints
from fastlane.etcd.errors import (
    EtcdAuthError,
    EtcdError,
    EtcdUnavailable,
    WatchInterrupted,
)
from fastlane.etcd.store import KeyValue, Store
from fastlane.etcd.watch import Event

__all__ = [
    "DEFAULT_PORT",
    "Endpoint",
    "EtcdAuthError",
    "EtcdError",
    "EtcdUnavailable",
    "Event",
    "KeyValue",
    "Store",
    "TLSFiles",
    "WatchInterrupted",
    "parse_endpoints",
]

"""Backends: how a node forwards traffic to the subnets in the lease table.

Each backend module defines one `Backend` subclass; `create` finds it by the config's
Backend.Type, importing it only when chosen (the udp backend loads the C engine).
"""

from __future__ import annotations

import importlib

from fastlane.backend.base import Backend, BackendContext, BackendError

# Backend.Type -> module:class. Types flanneld has and fastlane does not are refused
# with a clear error rather than silently falling back.
_KNOWN = {
    "alloc": "fastlane.backend.alloc:AllocBackend",
    "udp": "fastlane.backend.udp:UdpBackend",
    "vxlan": "fastlane.backend.vxlan:VxlanBackend",
    "host-gw": "fastlane.backend.hostgw:HostGwBackend",
}


def create(ctx: BackendContext) -> Backend:
    spec = _KNOWN.get(ctx.config.backend_type)
    if spec is None:
        raise BackendError(
            f"unsupported backend type {ctx.config.backend_type!r} "
            f"(fastlane supports: {', '.join(sorted(_KNOWN))})"
        )
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)(ctx)


__all__ = ["Backend", "BackendContext", "BackendError", "create"]

"""`fastlane leases`: the lease table as etcd holds it, for operators.

Prints one line per lease (subnet, public IP, backend, expiry or "reservation") and a
warning line for each key that cannot be read, using the daemon's own flags to find
etcd, so it sees exactly what the daemons see.
"""

from __future__ import annotations

import asyncio
import sys

from fastlane.etcd import EtcdError, Store
from fastlane.registry import Registry


async def _show(opts) -> int:
    try:
        store = await Store.connect(opts.endpoints, tls=opts.tls, username=opts.username,
                                    password=opts.password, timeout=5.0)
    except EtcdError as exc:
        print(f"fastlane leases: {exc}", file=sys.stderr)
        return 1
    try:
        registry = Registry(store, opts.prefix)
        leases, revision, warnings = await registry.snapshot()
        print(f"{'SUBNET':<20} {'PUBLIC IP':<16} {'BACKEND':<8} EXPIRES")
        for lease in sorted(leases, key=lambda l: l.subnet):
            if lease.is_reservation:
                expires = "reservation"
            else:
                ttl = await store.lease_ttl(lease.etcd_lease)
                expires = f"in {ttl}s" if ttl >= 0 else "expired"
            print(f"{str(lease.subnet):<20} {str(lease.attrs.public_ip):<16} "
                  f"{lease.attrs.backend_type or 'udp':<8} {expires}")
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        return 0
    except EtcdError as exc:
        print(f"fastlane leases: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def main(argv: list[str], opts) -> int:
    if argv:
        print(f"fastlane leases: unexpected arguments {' '.join(argv)}", file=sys.stderr)
        return 2
    return asyncio.run(_show(opts))

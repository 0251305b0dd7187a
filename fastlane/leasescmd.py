"""`fastlane leases`: the lease table as etcd holds it, for operators.

Prints one line per lease (subnet, public IP, backend, expiry or "reservation") and a
warning line for each key that cannot be read, using the daemon's own flags to find
etcd, so it sees exactly what the daemons see. `--json` prints the same as one JSON
document on stdout (warnings included, so a script reads one stream), for scripts and
monitoring that would otherwise have to parse the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from fastlane.etcd import EtcdError, Store
from fastlane.registry import Registry


async def _show(opts, as_json: bool = False) -> int:
    try:
        store = await Store.connect(opts.endpoints, tls=opts.tls, username=opts.username,
                                    password=opts.password, timeout=5.0)
    except EtcdError as exc:
        print(f"fastlane leases: {exc}", file=sys.stderr)
        return 1
    try:
        registry = Registry(store, opts.prefix)
        leases, revision, warnings = await registry.snapshot()
        rows: list[dict[str, Any]] = []
        for lease in sorted(leases, key=lambda l: l.subnet):
            expires_in = None if lease.is_reservation else max(await store.lease_ttl(lease.etcd_lease), 0)
            rows.append({
                "subnet": str(lease.subnet),
                "key": lease.key,
                "public_ip": str(lease.attrs.public_ip),
                # flannel's udp backend writes no BackendType: the table calls it udp too
                "backend_type": lease.attrs.backend_type or "udp",
                "backend_data": lease.attrs.backend_data,
                "public_ipv6": lease.attrs.public_ipv6,
                "reservation": lease.is_reservation,
                "expires_in": expires_in,  # seconds; null for a reservation, 0 once expired
            })
        if as_json:
            doc = {"prefix": opts.prefix, "revision": revision, "leases": rows,
                   "warnings": [{"key": w.key, "message": w.message} for w in warnings]}
            print(json.dumps(doc, indent=2))
            return 0
        print(f"{'SUBNET':<20} {'PUBLIC IP':<16} {'BACKEND':<8} EXPIRES")
        for row in rows:
            if row["reservation"]:
                expires = "reservation"
            else:
                expires = f"in {row['expires_in']}s" if row["expires_in"] > 0 else "expired"
            print(f"{row['subnet']:<20} {row['public_ip']:<16} {row['backend_type']:<8} {expires}")
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        return 0
    except EtcdError as exc:
        print(f"fastlane leases: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def main(argv: list[str], opts) -> int:
    parser = argparse.ArgumentParser(
        prog="fastlane leases",
        description="Show the subnet leases in etcd (found with the daemon's -etcd-* flags).")
    parser.add_argument("--json", action="store_true",
                        help="one JSON document: leases (expires_in seconds, null for a reservation) and warnings")
    args = parser.parse_args(argv)
    return asyncio.run(_show(opts, as_json=args.json))

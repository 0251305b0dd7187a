"""`fastlane leases`: the lease table as etcd holds it, for operators.

Prints one line per lease (subnet, IPv6 subnet of a dual-stack or IPv6-only lease, public
IP, public IPv6, backend, expiry or "reservation") and a warning line for each key that cannot be read, using the daemon's own flags to find
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
from fastlane.lease import go_ip6
from fastlane.registry import Registry


async def _show(opts, as_json: bool = False) -> int:
    try:
        store = await Store.connect(
            opts.endpoints,
            tls=opts.tls,
            username=opts.username,
            password=opts.password,
            timeout=5.0,
        )
    except EtcdError as exc:
        print(f"fastlane leases: {exc}", file=sys.stderr)
        return 1
    try:
        registry = Registry(store, opts.prefix)
        leases, revision, warnings = await registry.snapshot()
        rows: list[dict[str, Any]] = []

        def order(lease):  # IPv4 subnets first, in address order, then IPv6-only leases
            v4, v6 = lease.ident
            return (
                v4 is None,
                int(v4.network_address) if v4 else 0,
                v4.prefixlen if v4 else 0,
                int(v6.network_address) if v6 else 0,
                v6.prefixlen if v6 else 0,
            )

        for lease in sorted(leases, key=order):
            expires_in = (
                None if lease.is_reservation else max(await store.lease_ttl(lease.etcd_lease), 0)
            )
            ip6 = lease.attrs.public_ipv6
            rows.append(
                {
                    # null for an IPv6-only lease (key 0.0.0.0-0&...)
                    "subnet": None if lease.subnet is None else str(lease.subnet),
                    "ipv6_subnet": None if lease.ipv6_subnet is None else str(lease.ipv6_subnet),
                    "key": lease.key,
                    "public_ip": str(lease.attrs.public_ip),
                    # flannel's udp backend writes no BackendType: the table calls it udp too
                    "backend_type": lease.attrs.backend_type or "udp",
                    "backend_data": lease.attrs.backend_data,
                    "public_ipv6": None if ip6 is None else go_ip6(ip6),
                    "reservation": lease.is_reservation,
                    "expires_in": expires_in,  # seconds; null for a reservation, 0 once expired
                }
            )
        if as_json:
            doc = {
                "prefix": opts.prefix,
                "revision": revision,
                "leases": rows,
                "warnings": [{"key": w.key, "message": w.message} for w in warnings],
            }
            print(json.dumps(doc, indent=2))
            return 0
        # IPv6 columns only when some lease has IPv6, so IPv4 clusters see the same table
        v6 = any(r["ipv6_subnet"] or r["public_ipv6"] for r in rows)
        head = f"{'SUBNET':<20} "
        if v6:
            head += f"{'IPV6 SUBNET':<26} "
        print(
            f"{head}{'PUBLIC IP':<16} "
            + (f"{'PUBLIC IPV6':<26} " if v6 else "")
            + f"{'BACKEND':<8} EXPIRES"
        )
        for row in rows:
            if row["reservation"]:
                expires = "reservation"
            else:
                expires = f"in {row['expires_in']}s" if row["expires_in"] > 0 else "expired"
            line = f"{row['subnet'] or '-':<20} "
            if v6:
                line += f"{row['ipv6_subnet'] or '-':<26} "
            line += f"{row['public_ip']:<16} "
            if v6:
                line += f"{row['public_ipv6'] or '-':<26} "
            print(f"{line}{row['backend_type']:<8} {expires}")
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
        description="Show the subnet leases in etcd (found with the daemon's -etcd-* flags).",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON document: leases (expires_in seconds, null for a reservation) and warnings",
    )
    args = parser.parse_args(argv)
    return asyncio.run(_show(opts, as_json=args.json))

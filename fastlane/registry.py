"""Subnet leases in etcd: read the config, acquire, renew and re-take a node's lease.

Acquisition follows flanneld's order (reuse the lease holding our PublicIP, else the
subnet of the previous subnet file, else a random free one) because operators count on
a node keeping its subnet across restarts. Where flanneld is racy or lossy fastlane is
stricter: every write that claims a subnet is a transaction (create-if-absent, or
compare-and-swap on the revision we read), and a reservation (a key with no etcd lease)
is never turned back into an expiring lease (flanneld does; see docs/drop-in.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastlane.config import ConfigError, NetworkConfig, parse_config
from fastlane.etcd import Event, KeyValue, Store
from fastlane.lease import (
    SUBNET_TTL,
    Claim,
    Exhausted,
    Lease,
    LeaseAttrs,
    LeaseId,
    LeaseValueError,
    Reuse,
    holder,
    parse_key,
    plan_acquisition,
    subnet_key,
)

log = logging.getLogger(__name__)

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network

#: flanneld retries a lost creation race this many times (raceRetries).
RACE_RETRIES = 10
#: A dual-stack claim also fails when any lease was created since the listing (see _claim),
#: so concurrent dual-stack starts take turns: they get this many more attempts.
DUAL_STACK_RETRIES = 200


class ConfigMissing(Exception):
    """The network config key does not exist (yet)."""


class OutOfSubnets(Exception):
    """Every subnet in [SubnetMin, SubnetMax] is leased."""


class LeaseConflict(Exception):
    """Our subnet was deleted and someone else holds it now."""


@dataclass(frozen=True)
class LeaseWarning:
    """A key under the subnets prefix that cannot be read (written by someone else).

    It carries the key and revision so a reader can warn once per bad write rather than
    on every re-list; str() is the operator's one-line message.
    """

    key: str
    mod_revision: int
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class LeaseEvent:
    """One change under the subnets prefix, decoded.

    `subnet`/`ipv6_subnet` are the key's (`subnet` is None for an IPv6-only key); both
    are None when the key itself is unreadable (nothing to apply). `lease` is None when
    the key was deleted, or when its new value is unreadable (then `warning` says so):
    either way nobody can be routed to those subnets any more.
    """

    key: str
    mod_revision: int
    subnet: IPv4Network | None
    lease: Lease | None
    warning: LeaseWarning | None = None
    ipv6_subnet: IPv6Network | None = None

    @property
    def ident(self) -> LeaseId | None:
        """The lease the event is about (Lease.ident), None for an unreadable key."""
        if self.subnet is None and self.ipv6_subnet is None:
            return None
        return (self.subnet, self.ipv6_subnet)


class Registry:
    def __init__(self, store: Store, prefix: str = "/coreos.com/network", ttl: int = SUBNET_TTL):
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.ttl = ttl

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config"

    @property
    def subnets_prefix(self) -> str:
        return f"{self.prefix}/subnets/"

    def key_of(self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None = None) -> str:
        return self.subnets_prefix + subnet_key(subnet, ipv6_subnet)

    def _key(self, lease: Lease) -> str:
        """The key a lease was read from (kept as written, e.g. a hand-made reservation)."""
        return lease.key or self.key_of(lease.subnet, lease.ipv6_subnet)

    async def get_config(self) -> NetworkConfig:
        kv = await self.store.get(self.config_key)
        if kv is None:
            raise ConfigMissing(
                f"flannel config not found in etcd at {self.config_key} "
                "(write it with the etcd v3 API: ETCDCTL_API=3 etcdctl put ...)"
            )
        try:
            return parse_config(kv.value)
        except ConfigError as exc:
            raise ConfigError(f"{self.config_key}: {exc}") from None

    def decode(self, kv: KeyValue) -> Lease:
        """A lease from its etcd key/value; LeaseValueError names the key when malformed."""
        return self._decode(kv.key, kv.value, kv.mod_revision, kv.lease)

    def _decode(self, key: str, value: bytes, mod_revision: int, etcd_lease: int) -> Lease:
        name = key[len(self.subnets_prefix) :]
        try:
            subnet, subnet6 = parse_key(name)
            attrs = LeaseAttrs.decode(value)
        except LeaseValueError as exc:
            raise LeaseValueError(f"skipping malformed lease {key}: {exc}") from None
        return Lease(
            subnet=subnet,
            attrs=attrs,
            etcd_lease=etcd_lease,
            mod_revision=mod_revision,
            key=key,
            ipv6_subnet=subnet6,
        )

    async def snapshot(self) -> tuple[list[Lease], int, list[LeaseWarning]]:
        """All readable leases, the revision they were read at, and one warning per bad key."""
        kvs, revision = await self.store.list_prefix(self.subnets_prefix)
        out: list[Lease] = []
        warnings: list[LeaseWarning] = []
        for kv in kvs:
            try:
                out.append(self.decode(kv))
            except LeaseValueError as exc:
                warnings.append(LeaseWarning(kv.key, kv.mod_revision, str(exc)))
        return out, revision, warnings

    def _event(self, ev: Event) -> LeaseEvent:
        try:
            subnet, subnet6 = parse_key(ev.key[len(self.subnets_prefix) :])
        except LeaseValueError as exc:
            message = f"skipping malformed lease {ev.key}: {exc}"
            return LeaseEvent(
                ev.key, ev.mod_revision, None, None, LeaseWarning(ev.key, ev.mod_revision, message)
            )
        if ev.type == "delete":
            return LeaseEvent(ev.key, ev.mod_revision, subnet, None, ipv6_subnet=subnet6)
        try:
            # A watch event does not say which etcd lease the key is attached to; peers'
            # leases are only routed to, never renewed, so 0 is all the table needs.
            lease = self._decode(ev.key, ev.value, ev.mod_revision, 0)
        except LeaseValueError as exc:
            return LeaseEvent(
                ev.key,
                ev.mod_revision,
                subnet,
                None,
                LeaseWarning(ev.key, ev.mod_revision, str(exc)),
                subnet6,
            )
        return LeaseEvent(ev.key, ev.mod_revision, subnet, lease, ipv6_subnet=subnet6)

    async def watch(self, start_revision: int) -> AsyncIterator[list[LeaseEvent]]:
        """Decoded batches of changes to the leases, in order, from `start_revision`.

        Like the store's watch it never resumes by itself: WatchInterrupted means "take a
        new snapshot and watch again from its revision + 1".
        """
        async for batch in self.store.watch(self.subnets_prefix, start_revision):
            yield [self._event(ev) for ev in batch]

    async def _claim(
        self,
        subnet: IPv4Network | None,
        attrs: LeaseAttrs,
        ipv6_subnet: IPv6Network | None = None,
        key: str = "",
        revision: int | None = None,
    ) -> Lease | None:
        """Create the key only if absent, attached to a fresh etcd lease of `ttl` seconds.

        Both subnets of a dual-stack node are one key, so they are claimed together in
        this one transaction: there is never a half-acquired pair. The key alone does not
        keep two nodes off one subnet once keys hold pairs (10.1.2.0-24&A and 10.1.2.0-24&B
        are different keys), so the same transaction also requires that no other key holds
        this IPv4 subnet (the key `10.1.2.0-24` and every key under `10.1.2.0-24&`) and,
        for a pair, that no lease was created after `revision` (the listing the choice was
        made from): the IPv6 part is at the end of the key, where no range can find it.
        flanneld guards the key only.
        """
        key = key or self.key_of(subnet, ipv6_subnet)
        absent: tuple[str, ...] = ()
        prefixes: tuple[str, ...] = ()
        if subnet is not None:
            absent = (self.key_of(subnet),)
            prefixes = (self.key_of(subnet) + "&",)
        since = None
        if subnet is not None and ipv6_subnet is not None:
            if revision is None:
                _, revision = await self.store.list_prefix(self.subnets_prefix)
            since = (self.subnets_prefix, revision)
        etcd_lease = await self.store.grant(self.ttl)
        expiration = time.time() + self.ttl
        if not await self.store.create(
            key,
            attrs.encode(),
            lease=etcd_lease,
            absent=absent,
            absent_prefixes=prefixes,
            none_created_after=since,
        ):
            return None
        kv = await self.store.get(key)
        return Lease(
            subnet,
            attrs,
            expiration=expiration,
            etcd_lease=etcd_lease,
            mod_revision=kv.mod_revision if kv else 0,
            key=key,
            ipv6_subnet=ipv6_subnet,
        )

    async def _refresh(
        self, lease: Lease, attrs: LeaseAttrs, rewrite: bool = False
    ) -> Lease | None:
        """Re-write a lease we hold (CAS on the revision we saw); a reservation stays one.

        An unchanged reservation is left alone unless `rewrite` (its value was clobbered)."""
        key = self._key(lease)
        if lease.is_reservation:
            if lease.attrs == attrs and not rewrite:
                return lease
            ok = await self.store.replace(key, attrs.encode(), lease.mod_revision, lease=0)
            if not ok:
                return None
            kv = await self.store.get(key)
            return Lease(
                lease.subnet, attrs, None, 0, kv.mod_revision if kv else 0, key, lease.ipv6_subnet
            )
        etcd_lease = await self.store.grant(self.ttl)
        expiration = time.time() + self.ttl
        if not await self.store.replace(key, attrs.encode(), lease.mod_revision, lease=etcd_lease):
            return None
        kv = await self.store.get(key)
        return Lease(
            lease.subnet,
            attrs,
            expiration,
            etcd_lease,
            kv.mod_revision if kv else 0,
            key,
            lease.ipv6_subnet,
        )

    async def acquire(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        previous: IPv4Network | None = None,
        rng: random.Random | None = None,
        previous6: IPv6Network | None = None,
    ) -> Lease:
        """flanneld's tryAcquireLease, made race-free; raises OutOfSubnets when full.

        The choice is lease.plan_acquisition's (both families at once); this only carries
        it out, and lists and decides again when a transaction shows that someone changed
        the leases meanwhile.
        """
        attempts = RACE_RETRIES + (
            DUAL_STACK_RETRIES if config.enable_ipv4 and config.enable_ipv6 else 0
        )
        for _ in range(attempts):
            leases, revision, warnings = await self.snapshot()
            for warning in warnings:
                log.warning("%s", warning)
            plan = plan_acquisition(leases, config, attrs, previous, rng, previous6)
            for lease in plan.drop:
                log.warning("deleting lease %s: it no longer fits the network config", lease.name)
                await self.store.delete(self._key(lease))
            action = plan.action
            if isinstance(action, Reuse):
                got = await self._refresh(action.lease, attrs)
                if got is not None:
                    kind = "reservation" if got.is_reservation else "lease"
                    log.info("found %s %s for %s, reusing", kind, got.name, holder(attrs))
                    return got
                # it changed under us: list again
            elif isinstance(action, Claim):
                got = await self._claim(action.subnet, attrs, action.ipv6_subnet, revision=revision)
                if got is not None:
                    if action.from_previous:
                        log.info("reusing subnet %s from the previous subnet file", action.name)
                    else:
                        log.info("allocated lease %s", action.name)
                    return got
                if action.subnet is not None and action.ipv6_subnet is not None:
                    await asyncio.sleep(random.uniform(0, 0.05))  # concurrent starts take turns
                    continue
                if action.from_previous:
                    continue  # taken meanwhile: list again
            else:
                assert isinstance(action, Exhausted)
                if action.family == 6:
                    lo6, hi6 = config.subnet_bounds6()
                    raise OutOfSubnets(
                        f"out of subnets: all /{config.ipv6_subnet_len} IPv6 subnets from "
                        f"{lo6.network_address} to {hi6.network_address} are leased"
                    )
                lo, hi = config.subnet_bounds()
                raise OutOfSubnets(
                    f"out of subnets: all /{config.subnet_len} subnets from "
                    f"{lo.network_address} to {hi.network_address} are leased"
                )
            log.info("lost a race for a subnet, retrying")
        raise LeaseConflict(f"could not acquire a lease after {attempts} attempts (contention)")

    async def renew(self, lease: Lease) -> Lease:
        """Extend our lease (new etcd lease + CAS put), as flanneld does with Grant + Put."""
        kv = await self.store.get(self._key(lease))
        if kv is None:
            raise LeaseConflict(f"lease {lease.name} vanished before renewal")
        current = self.decode(kv)
        if holder(current.attrs) != holder(lease.attrs):
            raise LeaseConflict(f"lease {lease.name} now belongs to {holder(current.attrs)}")
        got = await self._refresh(current, lease.attrs)
        if got is None:
            raise LeaseConflict(f"lease {lease.name} changed during renewal")
        return got

    async def retake(self, lease: Lease) -> Lease:
        """After our key was deleted: take the same subnet again if nobody else has."""
        key = self._key(lease)
        got = await self._claim(lease.subnet, lease.attrs, lease.ipv6_subnet, key)
        if got is not None:
            return got
        kv = await self.store.get(key)
        if kv is not None:
            try:
                current = self.decode(kv)
            except LeaseValueError:
                # Overwritten with a value no node could have written: nobody holds the
                # subnet, and giving it up would cost this node its pods' addresses. Take it
                # back, only if the key still holds what we read.
                log.warning(
                    "lease %s was overwritten with an unreadable value; taking it back", lease.name
                )
                got = await self._refresh(
                    replace(lease, mod_revision=kv.mod_revision), lease.attrs, rewrite=True
                )
                if got is not None:
                    return got
                current = None
            if current is not None and holder(current.attrs) == holder(lease.attrs):
                return await self.renew(current)
        raise LeaseConflict(
            f"our lease {lease.name} was deleted and the subnet is now held by another node"
        )

"""The node daemon: flanneld's start-up order, lease upkeep and shutdown.

Start-up (as flanneld): connect to etcd, wait for the network config, pick the
interface, let the backend prepare, acquire the lease, start the backend, write the
subnet file, then tell systemd READY=1. After that three things run side by side: the
watcher (peers' leases -> table -> backend), the renewal of our own lease, and the
health endpoint. An etcd outage only pauses the first two; forwarding continues with
the table as it was. SIGTERM/SIGINT stop the backend but keep the lease, so a restart
gets the same subnet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass, field

from fastlane import backend as backends
from fastlane import linkwatch, metrics, rules, subnetfile
from fastlane.config import ConfigError, NetworkConfig
from fastlane.etcd import EtcdError, Endpoint, Store, TLSFiles
from fastlane.iface import Interface, InterfaceError, choose
from fastlane.lease import SUBNET_TTL, Lease, LeaseAttrs
from fastlane.notify import sd_notify
from fastlane.registry import ConfigMissing, LeaseConflict, OutOfSubnets, Registry
from fastlane.leasetable import LeaseTable
from fastlane.watcher import Watcher

log = logging.getLogger("fastlane")


@dataclass
class Options:
    endpoints: list[Endpoint]
    prefix: str = "/coreos.com/network"
    tls: TLSFiles | None = None
    username: str | None = None
    password: str | None = None
    ifaces: list[str] = field(default_factory=list)
    iface_regexes: list[str] = field(default_factory=list)
    public_ip: ipaddress.IPv4Address | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    renew_margin_s: int = 60 * 60
    ip_masq: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    verbose: int = 0
    lease_ttl: int = SUBNET_TTL
    forward_rules: bool = True
    iptables_resync: int = 5
    random_fully_disable: bool = False


class Fatal(Exception):
    """Stop the daemon with a one-line error and exit status 1."""


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.store: Store | None = None
        self.registry: Registry | None = None
        self.lease: Lease | None = None
        self.table = LeaseTable()
        self.watcher: Watcher | None = None
        self.stats = metrics.DaemonStats()  # counted where it happens, read by /metrics
        self.backend: backends.Backend | None = None
        self.iface: Interface | None = None
        self.config: NetworkConfig | None = None
        self.ready = False
        self._stop = asyncio.Event()
        self._fatal: str | None = None
        self._lease_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._chains: list = []  # rules.Chain, or one nftables.Tables
        self._own_lock = asyncio.Lock()

    # ---- start-up -------------------------------------------------------------------

    async def _retry(self, what: str, fn, *, interval: float = 1.0):
        """Call fn until it succeeds, logging an etcd failure once per distinct message."""
        last = None
        while not self._stop.is_set():
            try:
                return await fn()
            except EtcdError as exc:
                if str(exc) != last:
                    log.warning("%s: %s; retrying every %gs", what, exc, interval)
                    last = str(exc)
            except ConfigMissing as exc:
                if str(exc) != last:
                    log.warning("%s; waiting for it", exc)
                    last = str(exc)
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
            except asyncio.TimeoutError:
                pass
        raise asyncio.CancelledError

    async def _connect(self) -> None:
        o = self.opts

        async def connect():
            return await Store.connect(
                o.endpoints, tls=o.tls, username=o.username, password=o.password, timeout=5.0
            )

        self.store = await self._retry("cannot connect to etcd", connect)
        self.registry = Registry(self.store, o.prefix, ttl=o.lease_ttl)

    async def _startup(self) -> None:
        await self._connect()
        assert self.registry is not None
        try:
            config: NetworkConfig = await self._retry(
                "cannot read the network config", self.registry.get_config
            )
        except ConfigError as exc:
            raise Fatal(f"invalid network config: {exc}") from None
        self.config = config
        if config.enable_ipv6:
            raise Fatal("EnableIPv6 is not supported by fastlane (IPv4 only)")
        if not config.enable_ipv4:
            raise Fatal("EnableIPv4 is false: fastlane needs an IPv4 Network")
        log.info(
            "network %s, subnets /%d from %s to %s, backend %s",
            config.network, config.subnet_len, config.subnet_min, config.subnet_max,
            config.backend_type,
        )
        try:
            iface = await asyncio.to_thread(choose, self.opts.ifaces, self.opts.iface_regexes)
        except InterfaceError as exc:
            raise Fatal(str(exc)) from None
        self.iface = iface
        public_ip = self.opts.public_ip or iface.address
        log.info("using interface %s (%s), public ip %s", iface.name, iface.address, public_ip)
        ctx = backends.BackendContext(config, iface, public_ip, self.opts.verbose)
        try:
            self.backend = backends.create(ctx)
            data = await self.backend.prepare()
        except backends.BackendError as exc:
            raise Fatal(str(exc)) from None
        attrs = LeaseAttrs(public_ip=public_ip, backend_type=self.backend.lease_type, backend_data=data)
        previous = subnetfile.previous_subnet(self.opts.subnet_file)
        try:
            self.lease = await self._retry(
                "cannot acquire a lease",
                lambda: self.registry.acquire(config, attrs, previous),
            )
        except (OutOfSubnets, LeaseConflict) as exc:
            raise Fatal(str(exc)) from None
        log.info("lease acquired: %s", self.lease.subnet)
        try:
            await self.backend.start(self.lease, self.table)
        except backends.BackendError as exc:
            raise Fatal(str(exc)) from None
        await self._install_rules(config)
        text = subnetfile.render(config, self.lease.subnet, self.backend.mtu, self.opts.ip_masq)
        subnetfile.write(self.opts.subnet_file, text)
        log.info("wrote %s (FLANNEL_MTU=%d)", self.opts.subnet_file, self.backend.mtu)

    async def _watch_config(self, interval: float = 5.0) -> None:
        """The config is read once, as flanneld does; say so (once per change) when someone
        changes, breaks or deletes it while we run."""
        assert self.registry is not None
        key, last = self.registry.config_key, "same"
        while True:
            await asyncio.sleep(interval)
            try:
                now = "same" if await self.registry.get_config() == self.config else "changed"
            except ConfigMissing:
                now = "deleted"
            except ConfigError as exc:
                now = f"invalid ({exc})"
            except EtcdError:
                continue  # the watcher reports etcd outages
            if now != last:
                if now == "same":
                    log.info("network config at %s is the running one again", key)
                else:
                    log.warning("network config at %s is %s; this daemon keeps the config it "
                                "started with until it restarts (as flanneld)", key, now)
                last = now

    async def _install_rules(self, config: NetworkConfig) -> None:
        o = self.opts
        nft = config.enable_nftables
        # As flanneld: first remove what the other traffic manager may have left behind.
        for what in await asyncio.to_thread(rules.cleanup_other, nft):
            log.info("removed %s (%s mode)", what, "nftables" if nft else "iptables")
        try:
            self._chains = rules.rule_sets(config.network, self.lease.subnet, nftables=nft,
                                           ip_masq=o.ip_masq, forward=o.forward_rules,
                                           random_fully_disable=o.random_fully_disable)
            await asyncio.to_thread(rules.ensure, self._chains)
        except rules.RulesError as exc:
            if nft:  # flanneld exits when its nftables tables cannot be created
                raise Fatal(f"cannot install nftables rules: {exc}") from None
            if o.ip_masq:
                raise Fatal(f"cannot install masquerade rules: {exc}") from None
            log.warning("FORWARD rules not installed: %s", exc)
            self._chains = []

    async def _resync_rules(self) -> None:
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            try:
                if await asyncio.to_thread(rules.ensure, self._chains):
                    self.stats.rules_reinstalls += 1
                    log.info("%s rules were missing; re-installed", self._chains[0].kind)
            except rules.RulesError as exc:
                self.stats.rules_sync_errors += 1
                log.warning("%s resync: %s", self._chains[0].kind, exc)

    # ---- upkeep ---------------------------------------------------------------------

    async def _on_own(self, what: str, lease: Lease | None) -> None:
        """Our key was deleted or overwritten by someone else."""
        assert self.registry is not None and self.lease is not None
        async with self._own_lock:
            await self._handle_own(what, lease)

    async def _handle_own(self, what: str, lease: Lease | None) -> None:
        assert self.registry is not None and self.lease is not None
        if self._stop.is_set():
            return
        if what == "changed":
            self._die(f"our lease {self.lease.subnet} was overwritten by {lease.attrs.public_ip}")
            return
        log.warning("lease %s has been revoked; taking the same subnet again", self.lease.subnet)
        try:
            self.lease = await self.registry.retake(self.lease)
            self.stats.lease_retakes += 1
            self._lease_changed.set()
            log.info("lease %s re-acquired", self.lease.subnet)
        except LeaseConflict as exc:
            self._die(str(exc))
        except EtcdError as exc:
            log.warning("cannot re-take lease now (%s); the watcher will retry", exc)

    def _renew_delay(self, lease: Lease) -> float:
        remaining = lease.remaining()
        return max(remaining - self.opts.renew_margin_s, remaining / 2, 0.5)

    async def _renew_loop(self) -> None:
        assert self.registry is not None
        retry = min(60.0, self.opts.lease_ttl / 4)
        while True:
            lease = self.lease
            assert lease is not None
            self._lease_changed.clear()
            delay = None if lease.expiration is None else self._renew_delay(lease)
            try:
                await asyncio.wait_for(self._lease_changed.wait(), delay)
                continue  # re-taken or replaced: recompute from the new lease
            except asyncio.TimeoutError:
                pass
            try:
                self.lease = await self.registry.renew(lease)
                self.stats.lease_renewals += 1
                log.info("lease %s renewed, expires in %ds", lease.subnet, self.lease.remaining())
            except EtcdError as exc:
                self.stats.lease_renewal_failures += 1
                log.warning("failed to renew lease %s (%s); trying again in %gs", lease.subnet, exc, retry)
                await asyncio.sleep(retry)
            except LeaseConflict as exc:
                log.warning("%s", exc)
                await self._on_own("deleted", None)

    async def _healthz(self) -> asyncio.AbstractServer | None:
        if not self.opts.healthz_port:
            return None
        exporter = metrics.Metrics(self)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
                path = line.split()[1].decode() if len(line.split()) > 1 else "/"
                ctype = "text/plain"
                if path.startswith("/readyz"):
                    code, body = (200, b"ready") if self.ready else (503, b"not ready")
                elif path == "/metrics" or path.startswith("/metrics?"):
                    try:
                        code, body, ctype = 200, exporter.render(), metrics.CONTENT_TYPE
                    except Exception:  # noqa: BLE001 - a scrape must never stop the daemon
                        log.exception("/metrics")
                        code, body = 500, b"cannot collect metrics"
                else:
                    code, body = 200, b"flanneld is running"
                reason = {200: "OK", 500: "Internal Server Error", 503: "Service Unavailable"}[code]
                writer.write(
                    f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
                )
                await writer.drain()
            except (OSError, asyncio.TimeoutError, IndexError):
                pass
            finally:
                writer.close()

        try:
            return await asyncio.start_server(handle, self.opts.healthz_ip, self.opts.healthz_port)
        except OSError as exc:
            raise Fatal(f"cannot listen on {self.opts.healthz_ip}:{self.opts.healthz_port}: {exc.strerror}") from None

    async def _log_counters(self) -> None:
        while True:
            await asyncio.sleep(10)
            if self.backend is not None:
                c = self.backend.counters()
                if c:
                    log.info("counters: %s", " ".join(f"{k}={v}" for k, v in sorted(c.items()) if v))

    def _die(self, message: str) -> None:
        self._fatal = message
        self._stop.set()

    # ---- main -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        server = None
        try:
            server = await self._healthz()
            startup = asyncio.create_task(self._startup())
            stopper = asyncio.create_task(self._stop.wait())
            await asyncio.wait({startup, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():
                startup.cancel()
                stopper.cancel()
                log.info("stopped before start-up completed")
                return 0
            stopper.cancel()
            startup.result()
            self.watcher = watcher = Watcher(self.registry, self.table, lambda: self.lease, self._on_own)
            self._tasks = [
                asyncio.create_task(watcher.run(), name="watcher"),
                asyncio.create_task(self._renew_loop(), name="renew"),
            ]
            if self._chains:
                self._tasks.append(asyncio.create_task(self._resync_rules(), name="rules"))
            self._tasks.append(asyncio.create_task(
                linkwatch.watch_link(self.iface, self.backend.mtu), name="link"))
            self._tasks.append(asyncio.create_task(self._watch_config(), name="config"))
            if self.opts.verbose >= 1:
                self._tasks.append(asyncio.create_task(self._log_counters(), name="counters"))
            self.ready = True
            sd_notify("READY=1")
            log.info("running; %d peer lease(s) known", len(self.table))
            await self._stop.wait()
            if self._fatal:
                raise Fatal(self._fatal)
            log.info("shutting down; keeping lease %s", self.lease.subnet if self.lease else None)
            return 0
        except Fatal as exc:
            log.error("%s", exc)
            return 1
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.backend is not None:
                try:
                    await self.backend.stop()
                except Exception as exc:  # shutting down: report, do not mask the exit code
                    log.warning("backend stop: %s", exc)
            if server is not None:
                server.close()
            if self.store is not None:
                await self.store.close()

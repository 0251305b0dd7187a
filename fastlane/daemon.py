"""The node daemon: flanneld's start-up order, lease upkeep and shutdown.

Start-up (as flanneld): connect to etcd, wait for the network config, pick the
interface, let the backend prepare, acquire the lease, start the backend, write the
subnet file, then tell systemd READY=1. After that three things run side by side: the
watcher (peers' leases -> table -> backend), the renewal of our own lease, and the
health endpoint. An etcd outage only pauses the first two; forwarding continues with
the table as it was. SIGTERM/SIGINT stop the backend but keep the lease, so a restart
gets the same subnet.

Failure handling follows flanneld, which keeps a node forwarding wherever it can:

- retried, logged once per distinct cause: etcd unreachable, an etcd host name that does
  not resolve yet, a missing or invalid network config (every second until it is fixed);
- exit 1 with one line (systemd restarts us): TLS files that cannot be loaded, no
  interface matching the -iface* flags or owning -public-ip, a backend that cannot be set
  up (a netlink error is one line, never a traceback), a lease stolen by another node;
- kept running, retried: iptables rules (every -iptables-resync), the blackhole route, and
  the subnet file (the node stays not-ready, /readyz 503, until it is written);
- every background loop runs under fastlane.supervise: a failure is logged with its cause
  and the loop restarted with back-off, because each loop rebuilds its state on start and
  the data plane does not depend on it running at that instant.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

from fastlane import backend as backends
from fastlane import blackhole, linkwatch, metrics, rules, subnetfile
from fastlane.backend.kernel import KernelError
from fastlane.config import ConfigError, NetworkConfig
from fastlane.etcd import Endpoint, EtcdError, Store, TLSFiles, parse_endpoints
from fastlane.etcd.connection import credentials
from fastlane.iface import Interface, InterfaceError, choose
from fastlane.lease import SUBNET_TTL, UNSPECIFIED_V4, Lease, LeaseAttrs, holder
from fastlane.leasetable import LeaseTable
from fastlane.notify import sd_notify
from fastlane.registry import ConfigMissing, LeaseConflict, OutOfSubnets, Registry
from fastlane.supervise import describe, spawn
from fastlane.watcher import OwnChange, Watcher

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
    iface_can_reach: str = ""
    blackhole_route: bool = False
    #: -etcd-endpoints as given; resolved at connect time when `endpoints` is empty
    endpoints_spec: str = ""
    public_ip: ipaddress.IPv4Address | None = None
    #: -public-ipv6: the lease's PublicIPv6 when the config enables IPv6
    public_ipv6: ipaddress.IPv6Address | None = None
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
        self._rules_config: NetworkConfig | None = None
        self._subnet_text: str | None = None
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
            except ConfigError as exc:
                # flanneld's getConfig: log and re-read every second until someone fixes it.
                if str(exc) != last:
                    log.error("invalid network config: %s; re-reading it every %gs", exc, interval)
                    last = str(exc)
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
            except TimeoutError:
                pass
        raise asyncio.CancelledError

    async def _connect(self) -> None:
        o = self.opts
        if o.tls is not None and o.tls.certfile and o.tls.keyfile:
            # Files that cannot be loaded will not fix themselves: flanneld exits 1 here.
            try:
                credentials(o.tls)
            except EtcdError as exc:
                raise Fatal(str(exc)) from None

        async def connect():
            endpoints = o.endpoints
            if not endpoints:
                try:  # a host name that did not resolve at start (DNS not up yet)
                    endpoints = parse_endpoints(o.endpoints_spec)
                except ValueError as exc:
                    raise EtcdError(str(exc)) from None
            return await Store.connect(
                endpoints, tls=o.tls, username=o.username, password=o.password, timeout=5.0
            )

        self.store = await self._retry("cannot connect to etcd", connect)
        self.registry = Registry(self.store, o.prefix, ttl=o.lease_ttl)

    async def _startup(self) -> None:
        await self._connect()
        assert self.registry is not None
        config: NetworkConfig = await self._retry(
            "cannot read the network config", self.registry.get_config
        )
        self.config = config
        if not config.enable_ipv4 and not config.enable_ipv6:
            # flanneld: ipmatch.GetIPFamily "none defined stack", exit 1
            raise Fatal("EnableIPv4 and EnableIPv6 are both false: none defined stack")
        if config.enable_ipv4:
            log.info(
                "network %s, subnets /%d from %s to %s, backend %s",
                config.network,
                config.subnet_len,
                config.subnet_min,
                config.subnet_max,
                config.backend_type,
            )
        if config.enable_ipv6:
            log.info(
                "IPv6 network %s, subnets /%d from %s to %s, backend %s",
                config.ipv6_network,
                config.ipv6_subnet_len,
                config.ipv6_subnet_min,
                config.ipv6_subnet_max,
                config.backend_type,
            )
        try:
            iface = await asyncio.to_thread(
                choose,
                self.opts.ifaces,
                self.opts.iface_regexes,
                self.opts.iface_can_reach,
                self.opts.public_ip,
                ipv4=config.enable_ipv4,
                ipv6=config.enable_ipv6,
                public_ipv6=self.opts.public_ipv6,
            )
        except InterfaceError as exc:
            raise Fatal(str(exc)) from None
        self.iface = iface
        public_ip = self.opts.public_ip or iface.address
        log.info("using interface %s (%s), public ip %s", iface.name, iface.address, public_ip)
        # flanneld's ExtV6Addr: -public-ipv6, else the interface's IPv6 address.
        public_ipv6 = (self.opts.public_ipv6 or iface.address6) if config.enable_ipv6 else None
        if config.enable_ipv6:
            if public_ipv6 is None:
                raise Fatal(f"failed to find IPv6 address for interface {iface.name}")
            log.info(
                "using interface %s v6 address %s, public ipv6 %s",
                iface.name,
                iface.address6,
                public_ipv6,
            )
        ctx = backends.BackendContext(
            config, iface, public_ip, self.opts.verbose, public_ipv6=public_ipv6
        )
        try:
            self.backend = backends.create(ctx)
            data = await self.backend.prepare()
        except backends.BackendError as exc:
            raise Fatal(str(exc)) from None
        except (KernelError, NetlinkError, OSError) as exc:
            raise Fatal(f"{config.backend_type} backend set-up: {describe(exc)}") from None
        # An IPv6-only node has no PublicIP: flanneld leaves it 0.0.0.0 in the lease.
        attrs = LeaseAttrs(
            public_ip=public_ip if config.enable_ipv4 else UNSPECIFIED_V4,
            backend_type=self.backend.lease_type,
            backend_data=data,
            public_ipv6=public_ipv6,
            backend_v6_data=self.backend.v6_data() if config.enable_ipv6 else None,
        )
        previous = subnetfile.previous_subnet(self.opts.subnet_file)
        previous6 = subnetfile.previous_ipv6_subnet(self.opts.subnet_file)
        try:
            self.lease = await self._retry(
                "cannot acquire a lease",
                lambda: self.registry.acquire(config, attrs, previous, previous6=previous6),
            )
        except (OutOfSubnets, LeaseConflict) as exc:
            raise Fatal(str(exc)) from None
        log.info("lease acquired: %s", self.lease.name)
        try:
            await self.backend.start(self.lease, self.table)
        except backends.BackendError as exc:
            raise Fatal(str(exc)) from None
        except (KernelError, NetlinkError, OSError) as exc:
            raise Fatal(f"{config.backend_type} backend start: {describe(exc)}") from None
        await self._install_rules(config)
        self._subnet_text = subnetfile.render(
            config, self.lease.subnet, self.backend.mtu, self.opts.ip_masq, self.lease.ipv6_subnet
        )
        self._write_subnet_file(first=True)

    def _write_subnet_file(self, first: bool = False) -> bool:
        """Write subnet.env; a failure is a warning (flanneld: "Failed to write subnet file")
        and leaves the node not-ready. True once written."""
        assert self._subnet_text is not None
        try:
            subnetfile.write(self.opts.subnet_file, self._subnet_text)
        except OSError as exc:
            if first:
                log.warning(
                    "failed to write subnet file %s: %s; not ready, retrying",
                    self.opts.subnet_file,
                    exc.strerror or exc,
                )
            return False
        assert self.backend is not None  # the subnet file is written once the backend runs
        log.info("wrote %s (FLANNEL_MTU=%d)", self.opts.subnet_file, self.backend.mtu)
        self.ready = True
        return True

    async def _subnet_file_loop(self) -> None:
        """Retry the subnet file every second, then every 2, ... up to 30 s, until written
        (flanneld tries once; retrying lets the node become ready without a restart)."""
        delay = 1.0
        while not self._write_subnet_file():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _blackhole_loop(self) -> None:
        """-ip-blackhole-route: ensure the route(s) now, then every -iptables-resync seconds
        (the IPv4 subnet with EnableIPv4, the IPv6 subnet with EnableIPv6, as flanneld)."""
        last: dict[str, str | None] = {}
        while True:
            assert self.lease is not None and self.config is not None  # once the lease is held
            subnets: list[blackhole.Subnet] = []
            if self.config.enable_ipv4 and self.lease.subnet is not None:
                subnets.append(self.lease.subnet)
            if self.config.enable_ipv6 and self.lease.ipv6_subnet is not None:
                subnets.append(self.lease.ipv6_subnet)
            for subnet in subnets:
                try:
                    if await asyncio.to_thread(blackhole.ensure, subnet):
                        log.info("added blackhole route for %s", subnet)
                    last[str(subnet)] = None
                except blackhole.RouteError as exc:
                    if str(exc) != last.get(str(subnet)):
                        log.error(
                            "failed to set up blackhole route: %s; retrying every %ds",
                            exc,
                            self.opts.iptables_resync,
                        )
                        last[str(subnet)] = str(exc)
            await asyncio.sleep(self.opts.iptables_resync)

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
                    log.warning(
                        "network config at %s is %s; this daemon keeps the config it "
                        "started with until it restarts (as flanneld)",
                        key,
                        now,
                    )
                last = now

    async def _install_rules(self, config: NetworkConfig) -> None:
        o = self.opts
        nft = config.enable_nftables
        # As flanneld: first remove what the other traffic manager may have left behind.
        for what in await asyncio.to_thread(rules.cleanup_other, nft):
            log.info("removed %s (%s mode)", what, "nftables" if nft else "iptables")
        self._rules_config = config
        try:
            await self._ensure_rules()
        except rules.RulesError as exc:
            if nft:  # flanneld exits when its nftables tables cannot be created
                raise Fatal(f"cannot install nftables rules: {exc}") from None
            # flanneld (setupAndEnsureIP4Tables) logs and tries again every -iptables-resync.
            self.stats.rules_sync_errors += 1
            log.error(
                "failed to set up iptables rules: %s; retrying every %ds", exc, o.iptables_resync
            )

    def _rules_wanted(self) -> bool:
        c = self._rules_config
        return c is not None and (c.enable_nftables or self.opts.ip_masq or self.opts.forward_rules)

    async def _ensure_rules(self) -> int:
        """Build the rule sets if not built yet (iptables may appear later), then ensure them."""
        o, config = self.opts, self._rules_config
        assert config is not None and self.lease is not None
        if not self._chains:
            v4, v6 = config.enable_ipv4, config.enable_ipv6
            settings = rules.RuleSettings(
                config.network if v4 else None,
                self.lease.subnet if v4 else None,
                ip_masq=o.ip_masq,
                forward=o.forward_rules,
                random_fully_disable=o.random_fully_disable,
                network6=config.ipv6_network if v6 else None,
                subnet6=self.lease.ipv6_subnet if v6 else None,
            )
            self._chains = rules.rule_sets(settings, nftables=config.enable_nftables)
        return await asyncio.to_thread(rules.ensure, self._chains)

    async def _resync_rules(self) -> None:
        failing: str | None = None
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            assert self._rules_config is not None  # this loop runs only when rules are wanted
            kind = "nftables" if self._rules_config.enable_nftables else "iptables"
            try:
                fixed = await self._ensure_rules()
                if failing is not None:
                    log.info("%s rules installed", kind)
                elif fixed:
                    self.stats.rules_reinstalls += 1
                    log.info("%s rules were missing; re-installed", kind)
                failing = None
            except rules.RulesError as exc:
                self.stats.rules_sync_errors += 1
                if str(exc) != failing:
                    log.warning("%s resync: %s", kind, exc)
                    failing = str(exc)

    # ---- upkeep ---------------------------------------------------------------------

    async def _on_own(self, what: OwnChange, lease: Lease | None) -> None:
        """Our key was deleted or overwritten by someone else."""
        assert self.registry is not None and self.lease is not None
        async with self._own_lock:
            await self._handle_own(what, lease)

    async def _handle_own(self, what: OwnChange, lease: Lease | None) -> None:
        assert self.registry is not None and self.lease is not None
        if self._stop.is_set():
            return
        if what is OwnChange.CHANGED:
            assert lease is not None  # CHANGED always carries the lease now in etcd
            self._die(f"our lease {self.lease.name} was overwritten by {holder(lease.attrs)}")
            return
        log.warning("lease %s has been revoked; taking the same subnet again", self.lease.name)
        try:
            self.lease = await self.registry.retake(self.lease)
            self.stats.lease_retakes += 1
            self._lease_changed.set()
            log.info("lease %s re-acquired", self.lease.name)
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
            except TimeoutError:
                pass
            try:
                self.lease = await self.registry.renew(lease)
                self.stats.lease_renewals += 1
                log.info("lease %s renewed, expires in %ds", lease.name, self.lease.remaining())
            except EtcdError as exc:
                self.stats.lease_renewal_failures += 1
                log.warning(
                    "failed to renew lease %s (%s); trying again in %gs", lease.name, exc, retry
                )
                await asyncio.sleep(retry)
            except LeaseConflict as exc:
                log.warning("%s", exc)
                await self._on_own(OwnChange.DELETED, None)

    async def _healthz(self) -> asyncio.AbstractServer | None:
        if not self.opts.healthz_port:
            return None
        exporter = metrics.Metrics(self)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
                target = line.split()[1].decode() if len(line.split()) > 1 else "/"
                path = target.split("?", 1)[0]
                ctype = "text/plain; charset=utf-8"
                # flanneld's handlers, texts and codes (main.go's mustRunHealthz): exact paths,
                # anything else 404 as Go's mux answers it
                if path == "/healthz":
                    code, body = 200, b"flanneld is running"
                elif path == "/readyz":
                    code, body = (
                        (200, b"flanneld is ready")
                        if self.ready
                        else (503, b"flanneld is not ready yet")
                    )
                elif path == "/metrics":
                    try:
                        code, body, ctype = 200, exporter.render(), metrics.CONTENT_TYPE
                    except Exception:  # noqa: BLE001 - a scrape must never stop the daemon
                        log.exception("/metrics")
                        code, body = 500, b"cannot collect metrics"
                else:
                    code, body = 404, b"404 page not found\n"
                reason = {
                    200: "OK",
                    404: "Not Found",
                    500: "Internal Server Error",
                    503: "Service Unavailable",
                }[code]
                writer.write(
                    f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
            except (TimeoutError, OSError, IndexError):
                pass
            except Exception as exc:  # one bad request must not print a traceback
                log.warning("healthz: %s", describe(exc))
            finally:
                writer.close()

        try:
            return await asyncio.start_server(handle, self.opts.healthz_ip, self.opts.healthz_port)
        except OSError as exc:
            raise Fatal(
                f"cannot listen on {self.opts.healthz_ip}:{self.opts.healthz_port}: {exc.strerror}"
            ) from None

    async def _log_counters(self) -> None:
        while True:
            await asyncio.sleep(10)
            if self.backend is not None:
                c = self.backend.counters()
                if c:
                    log.info(
                        "counters: %s", " ".join(f"{k}={v}" for k, v in sorted(c.items()) if v)
                    )

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
            assert self.registry is not None and self.iface is not None
            assert self.backend is not None and self.lease is not None
            iface, mtu = self.iface, self.backend.mtu
            self.watcher = watcher = Watcher(
                self.registry, self.table, lambda: self.lease, self._on_own
            )
            # Every loop restarts after a failure (fastlane.supervise says why that is safe).
            self._tasks = [
                spawn("lease watcher", watcher.run),
                spawn("lease renewal", self._renew_loop),
                spawn("link watch", lambda: linkwatch.watch_link(iface, mtu)),
                spawn("config watch", self._watch_config),
            ]
            if self._rules_wanted():
                self._tasks.append(spawn("rules resync", self._resync_rules))
            if self.opts.blackhole_route:
                self._tasks.append(spawn("blackhole route", self._blackhole_loop))
            if not self.ready:
                self._tasks.append(spawn("subnet file", self._subnet_file_loop, forever=False))
            if self.opts.verbose >= 1:
                self._tasks.append(spawn("counters", self._log_counters))
            # flanneld notifies systemd even when the subnet file failed (it stays not-ready).
            sd_notify("READY=1")
            log.info("running; %d peer lease(s) known", len(self.table))
            await self._stop.wait()
            if self._fatal:
                raise Fatal(self._fatal)
            log.info("shutting down; keeping lease %s", self.lease.name if self.lease else None)
            return 0
        except Fatal as exc:
            log.error("%s", exc)
            return 1
        except Exception as exc:  # a bug: still one line (the traceback at -v=2), exit 1
            log.debug("unexpected error", exc_info=True)
            log.error("fastlane stopped: %s", describe(exc))
            return 1
        finally:
            for t in self._tasks:
                t.cancel()
            for t, res in zip(
                self._tasks,
                await asyncio.gather(*self._tasks, return_exceptions=True),
                strict=False,
            ):
                if isinstance(res, Exception):  # supervise() itself failed: say so, do not hide it
                    log.error("%s: %s", t.get_name(), describe(res))
            if self.backend is not None:
                try:
                    await self.backend.stop()
                except Exception as exc:  # shutting down: report, do not mask the exit code
                    log.warning("backend stop: %s", exc)
            if server is not None:
                server.close()
            if self.store is not None:
                await self.store.close()

"""`fastlane`: flanneld's command line, plus subcommands for the other jobs.

With no subcommand it is the daemon and takes flanneld's flags with flanneld's defaults
(see fastlane/flags.py for the Go flag syntax). Subcommands: `bench` (throughput on a
namespace topology) and `leases` (print the lease table from etcd).
"""

from __future__ import annotations

import ipaddress
import logging
import sys

from fastlane import __version__
from fastlane.flags import FlagError, FlagSet

DEFAULT_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"


def _margin(v: int) -> str | None:
    return None if 1 <= v <= 1439 else "must be between 1 and 1439 minutes"


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "not a port number"


def _ipv4(v: str) -> str | None:
    if not v:
        return None
    try:
        ipaddress.IPv4Address(v)
    except ValueError:
        return "not an IPv4 address"
    return None


def _ttl(v: int) -> str | None:
    return None if v >= 5 else "must be at least 5 seconds"


def flagset() -> FlagSet:
    fs = FlagSet("fastlane")
    fs.add("etcd-endpoints", DEFAULT_ENDPOINTS, "a comma-delimited list of etcd endpoints")
    fs.add("etcd-prefix", "/coreos.com/network", "etcd prefix")
    fs.add("etcd-keyfile", "", "SSL key file used to secure etcd communication")
    fs.add("etcd-certfile", "", "SSL certification file used to secure etcd communication")
    fs.add("etcd-cafile", "", "SSL Certificate Authority file used to secure etcd communication")
    fs.add("etcd-username", "", "username for BasicAuth to etcd")
    fs.add("etcd-password", "", "password for BasicAuth to etcd")
    fs.add("iface", [], "interface to use (IP or name) for inter-host communication; repeatable")
    fs.add("iface-regex", [], "regex of the interface (IP or name) to use; repeatable")
    fs.add("iface-can-reach", "", "not supported by fastlane (accepted for compatibility)")
    fs.add("public-ip", "", "IP accessible by other nodes for inter-host communication", check=_ipv4)
    fs.add("public-ipv6", "", "not supported by fastlane (IPv4 only)")
    fs.add("subnet-file", "/run/flannel/subnet.env", "filename where env variables (subnet, MTU, ...) will be written to")
    fs.add("subnet-lease-renew-margin", 60, "subnet lease renewal margin, in minutes, ranging from 1 to 1439", check=_margin)
    fs.add("subnet-lease-ttl", 24 * 3600, "fastlane extension: lease TTL in seconds (flanneld: fixed 24h)", check=_ttl)
    fs.add("ip-masq", False, "setup IP masquerade rule for traffic destined outside of overlay network")
    fs.add("ip-masq-fully-random-disable", False, "disable the --random-fully flag of the masquerade rules")
    fs.add("kube-subnet-mgr", False, "not supported by fastlane (etcd only)")
    fs.add("healthz-ip", "0.0.0.0", "the IP address for healthz server to listen")
    fs.add("healthz-port", 0, "the port for healthz server to listen(0 to disable)", check=_port)
    fs.add("iptables-resync", 5, "resync period for iptables rules, in seconds", check=lambda v: None if v >= 1 else "must be at least 1")
    fs.add("iptables-forward-rules", True, "add default accept rules to FORWARD chain in iptables")
    fs.add("ip-blackhole-route", False, "accepted for compatibility")
    fs.add("v", 0, "log level for V logs")
    fs.add("version", False, "print version and exit")
    return fs


def setup_logging(verbose: int) -> None:
    # klog-like single lines on stderr: "I1125 20:43:13.123 1234 daemon] message"
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.INFO,
        stream=sys.stderr,
        format="%(levelname).1s%(asctime)s %(process)d %(module)s] %(message)s",
        datefmt="%m%d %H:%M:%S",
    )


def _options(values: dict):
    from fastlane.daemon import Options
    from fastlane.etcd import TLSFiles, parse_endpoints

    endpoints = parse_endpoints(values["etcd-endpoints"])
    tls = None
    key, cert, ca = values["etcd-keyfile"], values["etcd-certfile"], values["etcd-cafile"]
    if key or cert or ca:
        tls = TLSFiles(cafile=ca or None, certfile=cert or None, keyfile=key or None)
    return Options(
        endpoints=endpoints,
        prefix=values["etcd-prefix"],
        tls=tls,
        username=values["etcd-username"] or None,
        password=values["etcd-password"] or None,
        ifaces=values["iface"],
        iface_regexes=values["iface-regex"],
        public_ip=ipaddress.IPv4Address(values["public-ip"]) if values["public-ip"] else None,
        subnet_file=values["subnet-file"],
        renew_margin_s=values["subnet-lease-renew-margin"] * 60,
        ip_masq=values["ip-masq"],
        healthz_ip=values["healthz-ip"],
        healthz_port=values["healthz-port"],
        verbose=values["v"],
        lease_ttl=values["subnet-lease-ttl"],
        forward_rules=values["iptables-forward-rules"],
        iptables_resync=values["iptables-resync"],
        random_fully_disable=values["ip-masq-fully-random-disable"],
    )


def _run_daemon(values: dict) -> int:
    try:
        opts = _options(values)
    except ValueError as exc:
        print(f"fastlane: {exc}", file=sys.stderr)
        return 2
    if values["kube-subnet-mgr"]:
        print("fastlane: -kube-subnet-mgr is not supported (fastlane uses etcd only)", file=sys.stderr)
        return 2
    setup_logging(values["v"])
    import uvloop

    from fastlane.daemon import Daemon

    async def main() -> int:
        return await Daemon(opts).run()

    try:
        return uvloop.run(main())
    except KeyboardInterrupt:
        return 0


def _leases(argv: list[str], values: dict) -> int:
    from fastlane.leasescmd import main as leases_main

    return leases_main(argv, _options(values))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fs = flagset()
    try:
        values, rest = fs.parse(argv)
    except FlagError as exc:
        print(f"fastlane: {exc}", file=sys.stderr)
        print(fs.usage(), file=sys.stderr)
        return 2
    if values["version"]:
        print(__version__)
        return 0
    if not rest:
        return _run_daemon(values)
    command, args = rest[0], rest[1:]
    if command == "bench":
        from fastlane.bench import main as bench_main

        return bench_main(args)
    if command == "leases":
        try:
            return _leases(args, values)
        except ValueError as exc:
            print(f"fastlane: {exc}", file=sys.stderr)
            return 2
    print(f"fastlane: unknown subcommand {command!r} (known: bench, leases)", file=sys.stderr)
    print(fs.usage(), file=sys.stderr)
    return 2

"""`fastlane`: flanneld's command line, plus subcommands for the other jobs.

With no subcommand it is the daemon and takes flanneld's flags with flanneld's defaults
(see fastlane/flags.py for the Go flag syntax and FLANNELD_* environment). Every flag
flanneld v0.28 defines is accepted, so a unit file or EnvironmentFile written for flanneld
works unchanged; the ones fastlane does nothing with are named in one log line at start-up
rather than dropped silently. Subcommands: `bench` (throughput on a namespace topology),
`leases` (the lease table from etcd, `--json` for scripts) and `docker-opts` (flannel's
mk-docker-opts.sh).
"""

from __future__ import annotations

import ipaddress
import logging
import sys

from fastlane import __version__
from fastlane.flags import (
    FlagError,
    FlagSet,
    HelpRequested,
    Parsed,
    parse_klog_backtrace_at,
    parse_klog_level,
    parse_klog_vmodule,
)

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


def _ipv6(v: str) -> str | None:
    if not v:
        return None
    try:
        ipaddress.IPv6Address(v)
    except ValueError:
        return "not an IPv6 address"
    return None if "%" not in v else "not an IPv6 address (no zone)"


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
    fs.add(
        "iface-can-reach",
        "",
        "detect interface to use (IP or name) for inter-host communication based on which will be used for provided IP. This is exactly the interface to use of command 'ip route get <ip-address>'",
    )
    fs.add(
        "public-ip", "", "IP accessible by other nodes for inter-host communication", check=_ipv4
    )
    fs.add(
        "public-ipv6",
        "",
        "IPv6 accessible by other nodes for inter-host communication",
        check=_ipv6,
    )
    fs.add(
        "subnet-file",
        "/run/flannel/subnet.env",
        "filename where env variables (subnet, MTU, ...) will be written to",
    )
    fs.add(
        "subnet-lease-renew-margin",
        60,
        "subnet lease renewal margin, in minutes, ranging from 1 to 1439",
        check=_margin,
    )
    fs.add(
        "subnet-lease-ttl",
        24 * 3600,
        "fastlane extension: lease TTL in seconds (flanneld: fixed 24h)",
        check=_ttl,
    )
    fs.add(
        "ip-masq", False, "setup IP masquerade rule for traffic destined outside of overlay network"
    )
    fs.add(
        "ip-masq-fully-random-disable",
        False,
        "disable the --random-fully flag of the masquerade rules",
    )
    fs.add("kube-subnet-mgr", False, "not supported by fastlane (etcd only)")
    fs.add("healthz-ip", "0.0.0.0", "the IP address for healthz server to listen")
    fs.add("healthz-port", 0, "the port for healthz server to listen(0 to disable)", check=_port)
    fs.add(
        "iptables-resync",
        5,
        "resync period for iptables rules, in seconds",
        check=lambda v: None if v >= 1 else "must be at least 1",
    )
    fs.add("iptables-forward-rules", True, "add default accept rules to FORWARD chain in iptables")
    fs.add(
        "ip-blackhole-route",
        False,
        "add blackhole route on the node for the local subnet (checked every -iptables-resync seconds)",
    )
    fs.add(
        "kube-api-url",
        "",
        "Kubernetes API server URL (only with -kube-subnet-mgr, which fastlane refuses)",
    )
    fs.add(
        "kubeconfig-file",
        "",
        "kubeconfig file location (only with -kube-subnet-mgr, which fastlane refuses)",
    )
    fs.add(
        "kube-annotation-prefix",
        "flannel.alpha.coreos.com",
        "Kubernetes annotation prefix (only with -kube-subnet-mgr, which fastlane refuses)",
    )
    fs.add(
        "net-config-path",
        "/etc/kube-flannel/net-conf.json",
        "path to the network configuration file (only with -kube-subnet-mgr, which fastlane refuses)",
    )
    fs.add(
        "set-node-network-unavailable",
        True,
        "set NodeNetworkUnavailable after ready (only with -kube-subnet-mgr, which fastlane refuses)",
    )
    # klog's flags that flanneld copies into its own FlagSet (main.go copyFlag); klog's
    # others (-logtostderr, -log_dir, ...) are not parsed by flanneld and are unknown here too.
    fs.add("v", 0, "number for the log level verbosity", kind="int", parser=parse_klog_level)
    fs.add(
        "vmodule",
        "",
        "comma-separated list of pattern=N settings for file-filtered logging "
        "(accepted; fastlane logs at one level)",
        parser=parse_klog_vmodule,
    )
    fs.add(
        "log_backtrace_at",
        "",
        "when logging hits line file:N, emit a stack trace (accepted; fastlane does not)",
        parser=parse_klog_backtrace_at,
    )
    # flanneld checks -version before reading FLANNELD_*, so FLANNELD_VERSION never applies.
    fs.add("version", False, "print version and exit", from_env=False)
    return fs


# Flags fastlane accepts so flanneld's command lines keep working, but does nothing with.
# Each one that is given gets one log line at start-up.
IGNORED_FLAGS: dict[str, str] = {
    "kube-api-url": "only used with -kube-subnet-mgr",
    "kubeconfig-file": "only used with -kube-subnet-mgr",
    "kube-annotation-prefix": "only used with -kube-subnet-mgr",
    "net-config-path": "only used with -kube-subnet-mgr; the network config comes from etcd",
    "set-node-network-unavailable": "only used with -kube-subnet-mgr",
    "vmodule": "fastlane logs at the single level -v sets",
    "log_backtrace_at": "fastlane does not print klog backtraces",
}


def ignored_flag_lines(parsed: Parsed) -> list[str]:
    """One line per given flag that fastlane accepts but does not act on."""
    return [
        f"-{name}={_show(parsed.values[name])} is ignored: {why}"
        for name, why in IGNORED_FLAGS.items()
        if name in parsed.explicit
    ]


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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

    spec = values["etcd-endpoints"]
    try:
        endpoints = parse_endpoints(spec)
    except ValueError:
        # Bad syntax is an error now; a host name that does not resolve *yet* (DNS or
        # /etc/hosts not ready at boot) is not: the daemon resolves it again until it does,
        # as flanneld's etcd client keeps trying.
        parse_endpoints(spec, resolve=lambda host: "192.0.2.1")
        endpoints = []
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
        iface_can_reach=values["iface-can-reach"],
        blackhole_route=values["ip-blackhole-route"],
        endpoints_spec=spec,
        public_ip=ipaddress.IPv4Address(values["public-ip"]) if values["public-ip"] else None,
        public_ipv6=ipaddress.IPv6Address(values["public-ipv6"]) if values["public-ipv6"] else None,
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


def _env_fatal(parsed: Parsed) -> int | None:
    """Exit status 2 after one line if a FLANNELD_* value parsed but failed a check."""
    for problem in parsed.env_problems:
        if problem.fatal:
            print(f"fastlane: {problem.message}", file=sys.stderr)
            return 2
    return None


def _run_daemon(parsed: Parsed) -> int:
    values = parsed.values
    status = _env_fatal(parsed)
    if status is not None:
        return status
    try:
        opts = _options(values)
    except ValueError as exc:
        print(f"fastlane: {exc}", file=sys.stderr)
        return 2
    if values["kube-subnet-mgr"]:
        print(
            "fastlane: -kube-subnet-mgr is not supported (fastlane uses etcd only)", file=sys.stderr
        )
        return 2
    setup_logging(values["v"])
    log = logging.getLogger("fastlane.cli")
    for problem in parsed.env_problems:  # only the non-fatal ones are left: flanneld's behaviour
        log.warning("Failed to set flag from env: %s", problem.message)
    for line in ignored_flag_lines(parsed):
        log.warning("%s", line)
    import uvloop

    from fastlane.daemon import Daemon

    async def main() -> int:
        return await Daemon(opts).run()

    try:
        return uvloop.run(main())
    except KeyboardInterrupt:
        return 0


def _leases(argv: list[str], parsed: Parsed) -> int:
    from fastlane.leasescmd import main as leases_main

    status = _env_fatal(parsed)
    if status is not None:
        return status
    for problem in parsed.env_problems:
        print(f"fastlane: warning: {problem.message}", file=sys.stderr)
    opts = _options(parsed.values)
    if not opts.endpoints:  # a one-shot command does not wait for DNS: report it now
        from fastlane.etcd import parse_endpoints

        opts.endpoints = parse_endpoints(opts.endpoints_spec)
    return leases_main(argv, opts)


SUBCOMMANDS = ("bench", "docker-opts", "leases")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fs = flagset()
    try:
        parsed = fs.parse_full(argv)
    except HelpRequested:
        # flanneld's usage() prints to stderr and exits 0 (main.go)
        print(fs.usage(), file=sys.stderr)
        print(f"Subcommands: {', '.join(SUBCOMMANDS)} (each takes -h)", file=sys.stderr)
        return 0
    except FlagError as exc:
        print(f"fastlane: {exc}", file=sys.stderr)
        print(fs.usage(), file=sys.stderr)
        return 2
    values, rest = parsed.values, parsed.rest
    if values["version"]:
        # flanneld prints its version to stderr (main.go), so scripts that work with it
        # (`flanneld -version 2>&1`) keep working.
        print(__version__, file=sys.stderr)
        return 0
    if not rest:
        return _run_daemon(parsed)
    command, args = rest[0], rest[1:]
    if command == "bench":
        from fastlane.bench import main as bench_main

        return bench_main(args)
    if command == "docker-opts":
        # FLANNELD_* do not concern it: it runs next to flanneld's unit with that environment.
        from fastlane.dockeropts import main as docker_opts_main

        return docker_opts_main(args)
    if command == "leases":
        try:
            return _leases(args, parsed)
        except ValueError as exc:
            print(f"fastlane: {exc}", file=sys.stderr)
            return 2
    print(
        f"fastlane: unknown subcommand {command!r} (known: {', '.join(SUBCOMMANDS)})",
        file=sys.stderr,
    )
    print(fs.usage(), file=sys.stderr)
    return 2

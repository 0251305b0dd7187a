"""flanneld's iptables rules: masquerade (-ip-masq) and FORWARD accept, kept in place.

Same chains, rules and comments as flanneld (FLANNEL-POSTRTG in nat, FLANNEL-FWD in
filter), so an operator's tooling and a later switch back to flanneld find what they
expect. Rules are written with iptables-restore --noflush (our chain is replaced
whole, in one transaction, nothing else is touched) and re-checked every
-iptables-resync seconds, because other agents (kube-proxy, docker, firewalld) rewrite
tables and flanneld re-installs what went missing.

With `EnableNFTables: true` the same two rule sets live in flanneld's nftables tables
instead (fastlane/nftables.py), and, as flanneld does at start, the other manager's
leftovers are removed first: flannel's nftables tables in iptables mode, the FLANNEL-*
chains (and the jumps to them) in nftables mode.

With EnableIPv6 the same chains exist in ip6tables for the IPv6Network and the node's IPv6
subnet (flanneld's masqIP6Rules: the multicast exception is ff00::/8), kept the same way;
an IPv6-only network has only those.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

KUBE_PROXY_MARK = "0x4000/0x4000"


class RulesError(Exception):
    """iptables is missing or refused our rules (one-line message)."""


MULTICAST4 = "224.0.0.0/4"
MULTICAST6 = "ff00::/8"


def _masq_rules(
    network: str, subnet: str, random_fully: bool, multicast: str = MULTICAST4
) -> list[list[str]]:
    c = ["-m", "comment", "--comment", "flanneld masq"]
    masq = ["-j", "MASQUERADE"] + (["--random-fully"] if random_fully else [])
    return [
        ["-m", "mark", "--mark", KUBE_PROXY_MARK, *c, "-j", "RETURN"],
        ["-s", subnet, "-d", network, *c, "-j", "RETURN"],
        ["-s", network, "-d", subnet, *c, "-j", "RETURN"],
        ["!", "-s", network, "-d", subnet, *c, "-j", "RETURN"],
        ["-s", network, "!", "-d", multicast, *c, *masq],
        ["!", "-s", network, "-d", network, *c, *masq],
    ]


def _forward_rules(network: str) -> list[list[str]]:
    c = ["-m", "comment", "--comment", "flanneld forward"]
    return [["-s", network, *c, "-j", "ACCEPT"], ["-d", network, *c, "-j", "ACCEPT"]]


class Chain:
    """One flannel chain: its rules and the jump to it from a built-in chain."""

    kind = "iptables"

    def __init__(
        self,
        table: str,
        name: str,
        parent: str,
        comment: str,
        rules: list[list[str]],
        binary: str = "iptables",
    ):
        self.table, self.name, self.parent = table, name, parent
        self.binary = binary  # iptables or ip6tables
        self.jump = ["-m", "comment", "--comment", comment, "-j", name]
        self.rules = rules

    def _ipt(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [self.binary, "-w", "5", "-t", self.table, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and res.returncode != 0:
            raise RulesError(
                f"{self.binary} -t {self.table} {' '.join(args)}: {res.stderr.strip()}"
            )
        return res

    def present(self) -> bool:
        if self._ipt("-C", self.parent, *self.jump, check=False).returncode != 0:
            return False
        return all(self._ipt("-C", self.name, *r, check=False).returncode == 0 for r in self.rules)

    def install(self) -> None:
        body = [f"*{self.table}", f":{self.name} - [0:0]"]  # declaring the chain flushes it
        body += ["-A " + self.name + " " + " ".join(_quote(a) for a in r) for r in self.rules]
        body.append("COMMIT")
        res = subprocess.run(
            [f"{self.binary}-restore", "-w", "5", "--noflush"],
            input="\n".join(body) + "\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode != 0:
            raise RulesError(
                f"{self.binary}-restore ({self.table}/{self.name}): {res.stderr.strip()}"
            )
        if self._ipt("-C", self.parent, *self.jump, check=False).returncode != 0:
            self._ipt("-A", self.parent, *self.jump)


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def _random_fully_supported(binary: str = "iptables") -> bool:
    res = subprocess.run([binary, "-j", "MASQUERADE", "--help"], capture_output=True, text=True)
    return "random-fully" in res.stdout


@dataclass(frozen=True)
class RuleSettings:
    """What the rules depend on, for iptables and nftables alike: each family's Network and
    our subnet in it (None for a family the network does not carry) and the flags."""

    network: ipaddress.IPv4Network | None
    subnet: ipaddress.IPv4Network | None
    ip_masq: bool
    forward: bool
    random_fully_disable: bool
    network6: ipaddress.IPv6Network | None = None
    subnet6: ipaddress.IPv6Network | None = None


def chains(settings: RuleSettings) -> list[Chain]:
    """The chains flanneld would install for these settings (none when both are off): the
    iptables ones for the IPv4 Network, the ip6tables ones for the IPv6Network."""
    ip_masq, forward = settings.ip_masq, settings.forward
    if not (ip_masq or forward):
        return []
    out = []
    for binary, net, sub, multicast in (
        ("iptables", settings.network, settings.subnet, MULTICAST4),
        ("ip6tables", settings.network6, settings.subnet6, MULTICAST6),
    ):
        if net is None or sub is None:
            continue
        if shutil.which(binary) is None or shutil.which(f"{binary}-restore") is None:
            raise RulesError(f"{binary} not found: apt-get install -y iptables")
        if ip_masq:
            rf = not settings.random_fully_disable and _random_fully_supported(binary)
            out.append(
                Chain(
                    "nat",
                    "FLANNEL-POSTRTG",
                    "POSTROUTING",
                    "flanneld masq",
                    _masq_rules(str(net), str(sub), rf, multicast),
                    binary,
                )
            )
        if forward:
            out.append(
                Chain(
                    "filter",
                    "FLANNEL-FWD",
                    "FORWARD",
                    "flanneld forward",
                    _forward_rules(str(net)),
                    binary,
                )
            )
    return out


def rule_sets(settings: RuleSettings, *, nftables: bool) -> list:
    """What the daemon keeps in place: iptables chains, or flanneld's nftables tables (always
    created in nftables mode, even with no rule asked for, as flanneld's Init does)."""
    if not nftables:
        return chains(settings)
    from fastlane import nftables as nft

    if not nft.available():
        raise RulesError("nft not found: apt-get install -y nftables")
    return [nft.Tables(settings)]


# The iptables chains flanneld may have written (any version, either family), and where the
# jump to each one lives. flanneld's own CleanUp looks for FLANNEL-FWD in nat, where it never
# is, and cannot delete FLANNEL-POSTRTG while POSTROUTING still jumps to it; here the jumps go
# first, then the chains, in one iptables-restore transaction per table.
_IPTABLES_CHAINS = {"nat": ("FLANNEL-POSTRTG", "POSTROUTING"), "filter": ("FLANNEL-FWD", "FORWARD")}


def remove_iptables_chains() -> list[str]:
    """flanneld's iptables chains and the jumps to them, removed (IPv4 and IPv6). A host
    without iptables has none: nothing to do, no error. Returns what was removed."""
    removed = []
    for save, restore, label in (
        ("iptables-save", "iptables-restore", "iptables"),
        ("ip6tables-save", "ip6tables-restore", "ip6tables"),
    ):
        if shutil.which(save) is None or shutil.which(restore) is None:
            continue
        for table, (chain, _parent) in _IPTABLES_CHAINS.items():
            res = subprocess.run(
                [save, "-t", table], capture_output=True, text=True, timeout=30, check=False
            )
            if res.returncode != 0 or f":{chain} " not in res.stdout:
                continue
            body = [f"*{table}"]
            body += [
                "-D" + line[2:]
                for line in res.stdout.splitlines()
                if line.startswith("-A ")
                and line.split()[1] != chain
                and line.rstrip().endswith(f"-j {chain}")
            ]
            body += [f"-F {chain}", f"-X {chain}", "COMMIT"]
            out = subprocess.run(
                [restore, "-w", "5", "--noflush"],
                input="\n".join(body) + "\n",
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if out.returncode != 0:
                log.warning(
                    "could not remove %s %s/%s: %s", label, table, chain, out.stderr.strip()
                )
            else:
                removed.append(f"{label} {table}/{chain}")
    return removed


def cleanup_other(nftables: bool) -> list[str]:
    """flanneld's start-up clean-up of the traffic manager not in use (so a switch between
    iptables and nftables leaves nothing of the old one). Never fails."""
    if nftables:
        return remove_iptables_chains()
    from fastlane import nftables as nft

    return nft.delete_tables()


def ensure(chain_list: list[Chain]) -> int:
    """Install whatever is missing; returns how many chains had to be (re)written."""
    fixed = 0
    for chain in chain_list:
        if not chain.present():
            chain.install()
            fixed += 1
    return fixed

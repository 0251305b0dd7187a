"""flanneld's nftables rules (`EnableNFTables: true`): masquerade and FORWARD accept.

The same objects flanneld's nftables traffic manager (pkg/trafficmngr/nftables, v0.28)
creates, so `nft list ruleset` reads the same before and after the swap:

- tables `ip flannel-ipv4` and `ip6 flannel-ipv6`, each commented "rules for <name>",
  both created at start even when no rule is asked for (flanneld's Init does that);
- `-ip-masq`: chain `postrtg` (nat, hook postrouting, priority srcnat), comment "chain to
  manage traffic masquerading by flannel", with flanneld's six rules in its order;
- `-iptables-forward-rules`: chain `forward` (filter, hook forward, priority filter),
  comment "chain to accept flannel traffic", accepting the Network as source or destination.
- with EnableIPv6, the same chains and rules in `ip6 flannel-ipv6` for the IPv6Network and
  the node's IPv6 subnet (`ip6 saddr`/`ip6 daddr`, multicast exception ff00::/8), as
  flanneld's addMasqRules/SetupAndEnsureForwardRules for the IPv6 family.

Each chain is written in one `nft -f` transaction (add table, add chain, flush chain, add
rules), so a half-written chain is never visible. flanneld writes them once; fastlane
also re-checks them every -iptables-resync seconds (as it does the iptables rules) and
rewrites a table whose listing no longer matches what it wrote. The rule text is
flanneld's, deliberately, including its two departures from its own iptables rules (the
kube-proxy mark is compared exactly, `meta mark 0x4000`; the fourth rule returns for any
source outside the node's subnet): see docs/drop-in.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

from fastlane.rules import RulesError, RuleSettings

log = logging.getLogger(__name__)

TABLE4 = "flannel-ipv4"
TABLE6 = "flannel-ipv6"
POSTRTG = "postrtg"
FORWARD = "forward"
KUBE_PROXY_MARK = "0x4000"
MULTICAST4 = "224.0.0.0/4"
MULTICAST6 = "ff00::/8"
#: numeric priorities, as knftables writes them for the ip family (srcnat = 100, filter = 0)
SRCNAT_PRIORITY = 100
FILTER_PRIORITY = 0


class NftError(RulesError):
    """nft is missing or refused our rules (one-line message)."""


def available() -> bool:
    return shutil.which("nft") is not None


def nft(script: str, *, check_only: bool = False) -> None:
    """Run an nft script as one transaction (`nft -f -`; `-c`: check it, change nothing)."""
    if not available():
        raise NftError("nft not found: apt-get install -y nftables")
    args = ["nft"] + (["-c"] if check_only else []) + ["-f", "-"]
    res = subprocess.run(
        args, input=script, capture_output=True, text=True, timeout=30, check=False
    )
    if res.returncode != 0:
        raise NftError(" ".join(res.stderr.split()) or f"nft exited {res.returncode}")


def _table(family: str, name: str) -> str:
    return f'add table {family} {name} {{ comment "rules for {name}" ; }}\n'


def _chain(
    name: str,
    kind: str,
    hook: str,
    priority: int,
    comment: str,
    keep: bool = True,
    family: str = "ip",
    table: str = TABLE4,
) -> str:
    """Create (or keep) the chain and empty it; keep=False removes it instead, whether or
    not it exists (nft 1.0.6 has no `destroy`, so: add, flush, delete)."""
    out = (
        f"add chain {family} {table} {name} {{ type {kind} hook {hook} priority {priority} ; "
        f'comment "{comment}" ; }}\n'
        f"flush chain {family} {table} {name}\n"
    )
    return out if keep else out + f"delete chain {family} {table} {name}\n"


def masq_rules(network: str, subnet: str, masquerade: str, family: str = "ip") -> list[str]:
    """flanneld's postrtg rules, in order (addMasqRules; family ip or ip6)."""
    mc = MULTICAST6 if family == "ip6" else MULTICAST4
    f = family
    return [
        f"meta mark {KUBE_PROXY_MARK} return",  # kube-proxy marked: not twice
        f"{f} saddr {subnet} {f} daddr {network} return",  # within the overlay
        f"{f} saddr {network} {f} daddr {subnet} return",
        f"{f} saddr != {subnet} {f} daddr {network} return",  # external to our pods
        f"{f} saddr {network} {f} daddr != {mc} {masquerade}",  # pods to the outside
        f"{f} saddr != {network} {f} daddr {network} {masquerade}",  # host to the overlay
    ]


def forward_rules(network: str, family: str = "ip") -> list[str]:
    return [f"{family} saddr {network} accept", f"{family} daddr {network} accept"]


def fully_random_supported() -> bool:
    """Whether the kernel takes `masquerade fully-random` (a checked, never applied, test chain,
    as flanneld's checkRandomfully)."""
    script = (
        _table("ip", TABLE4)
        + f"add chain ip {TABLE4} masqueradeTest {{ type nat hook postrouting priority "
        f'{SRCNAT_PRIORITY} ; comment "chain to test if masquerade random fully is supported" ; }}\n'
        + f"add rule ip {TABLE4} masqueradeTest ip saddr != 127.0.0.1 masquerade fully-random\n"
    )
    try:
        nft(script, check_only=True)
        return True
    except NftError:
        log.warning("nftables: random fully unsupported")
        return False


def _listing(family: str, table: str) -> list[dict] | None:
    """`nft -j list table`, without handles and metainfo (None: no such table)."""
    res = subprocess.run(
        ["nft", "-j", "list", "table", family, table],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if res.returncode != 0:
        return None
    try:
        items = json.loads(res.stdout).get("nftables", [])
    except ValueError:
        return None
    out = []
    for item in items:
        if "metainfo" in item:
            continue
        out.append(
            {kind: {k: v for k, v in body.items() if k != "handle"} for kind, body in item.items()}
        )
    return out


class Tables:
    """flanneld's two tables and whichever chains these settings ask for.

    `present()`/`install()` make it usable wherever the daemon keeps iptables chains
    (fastlane.rules.ensure): install writes everything in one transaction and remembers
    the listing it produced; present compares the current listing with it.
    """

    kind = "nftables"

    def __init__(self, settings: RuleSettings) -> None:
        #: (family, table, network, subnet) for each family the network has
        self.families = [
            (family, table, str(net), str(sub))
            for family, table, net, sub in (
                ("ip", TABLE4, settings.network, settings.subnet),
                ("ip6", TABLE6, settings.network6, settings.subnet6),
            )
            if net is not None and sub is not None
        ]
        self.ip_masq, self.forward = settings.ip_masq, settings.forward
        self.random_fully_disable = settings.random_fully_disable
        self._written: tuple[list[dict] | None, list[dict] | None] | None = None
        self._masquerade: str | None = None

    def script(self) -> str:
        if self._masquerade is None:
            fully = self.ip_masq and not self.random_fully_disable and fully_random_supported()
            self._masquerade = "masquerade fully-random" if fully else "masquerade"
        # A chain these settings do not ask for is removed (a restart without -ip-masq must
        # not keep masquerading); flanneld leaves it in place.
        out = _table("ip", TABLE4) + _table("ip6", TABLE6)
        for family, table, network, subnet in self.families:
            out += _chain(
                POSTRTG,
                "nat",
                "postrouting",
                SRCNAT_PRIORITY,
                "chain to manage traffic masquerading by flannel",
                keep=self.ip_masq,
                family=family,
                table=table,
            )
            if self.ip_masq:
                out += "".join(
                    f"add rule {family} {table} {POSTRTG} {r}\n"
                    for r in masq_rules(network, subnet, self._masquerade, family)
                )
            out += _chain(
                FORWARD,
                "filter",
                "forward",
                FILTER_PRIORITY,
                "chain to accept flannel traffic",
                keep=self.forward,
                family=family,
                table=table,
            )
            if self.forward:
                out += "".join(
                    f"add rule {family} {table} {FORWARD} {r}\n"
                    for r in forward_rules(network, family)
                )
        return out

    def _current(self) -> tuple[list[dict] | None, list[dict] | None]:
        return _listing("ip", TABLE4), _listing("ip6", TABLE6)

    def present(self) -> bool:
        if self._written is None:
            return False
        return self._current() == self._written

    def install(self) -> None:
        nft(self.script())
        self._written = self._current()


def delete_tables() -> list[str]:
    """Remove flanneld's nftables tables (what its CleanUp does when iptables is chosen).
    Returns the tables deleted; errors are logged, never raised, as flanneld does."""
    if not available():
        return []
    gone = []
    for family, table in (("ip", TABLE4), ("ip6", TABLE6)):
        if _listing(family, table) is None:
            continue
        try:
            nft(f"delete table {family} {table}\n")
            gone.append(f"{family} {table}")
        except NftError as exc:
            log.debug("nftables: couldn't delete table %s %s: %s", family, table, exc)
    return gone

"""`fastlane docker-opts`: flannel's dist/mk-docker-opts.sh, same flags, same output bytes.

Hosts that ran flannel's package often start Docker with options this script derived from
subnet.env (`--bip`, `--mtu`, `--ip-masq`), from a unit's ExecStartPre/ExecStartPost. When
the flannel package goes, so does the script; dist/mk-docker-opts.sh in this repository is a
shim with the same name that calls this, so those units keep working unchanged.

What the original does, and so what this does (flannel v0.28.9, dist/mk-docker-opts.sh):

* getopts "f:d:icmk:?h": -f subnet file (/run/flannel/subnet.env), -d output file
  (/run/docker_opts.env), -i individual DOCKER_OPT_* lines, -c the combined line, neither
  means both, -m no --ip-masq, -k the combined line's name (DOCKER_OPTS). Option parsing
  stops at the first non-option; -h, -? or a bad option print usage and exit 1.
* The subnet file is sourced only if it is a regular file; a missing one is not an error.
* DOCKER_OPT_BIP=--bip=$FLANNEL_SUBNET and DOCKER_OPT_MTU=--mtu=$FLANNEL_MTU when set;
  DOCKER_OPT_IPMASQ is the *inverse* of FLANNEL_IPMASQ (flannel masquerades, so Docker must
  not), and any other FLANNEL_IPMASQ value exits 1 before the output file is touched.
* The lines come from `set | grep DOCKER_OPT_`: every shell variable whose name or value
  contains DOCKER_OPT_, sorted by name, including ones inherited from the environment.
* The combined value starts with the key variable's existing value (from the environment or
  the subnet file) plus a space, then " VALUE" per option: hence the leading space.
* Afterwards, if `ip route show` has a line matching the subnet's network (grep, so "." is
  a wildcard) that also contains "via", it names it on stderr and exits 1 (the output file
  is already written).

Deliberate differences: an output file that cannot be written is an error (exit 1; the
script printed the shell's error and exited 0), and a -k that is not a shell variable name
is refused (the script would have evaluated it as shell code).
"""

from __future__ import annotations

import getopt
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping

USAGE = """{prog} [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
	-f	Path to flannel env file. Defaults to /run/flannel/subnet.env
	-d	Path to Docker env file to write to. Defaults to /run/docker_opts.env
	-i	Output each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
	-c	Output combined Docker options into DOCKER_OPTS var
	-k	Set the combined options key to this value (default DOCKER_OPTS=)
	-m	Do not output --ip-masq (useful for older Docker version)
"""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ASSIGN = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)\Z")


class DockerOptsError(Exception):
    """Stop with this message on stderr and exit status 1 (the script's `exit 1`)."""


def read_env_file(text: str) -> dict[str, str]:
    """The assignments of a subnet.env (which the script sources as shell).

    flanneld writes plain KEY=VALUE lines; shell quoting is undone so a hand-edited
    `FLANNEL_SUBNET="10.1.2.1/24"` reads as the shell would read it. Other shell (commands,
    expansions) is not run.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _ASSIGN.match(line)
        if not m:
            continue
        try:
            words = shlex.split(m.group(2), comments=True)
        except ValueError:
            words = [m.group(2)]
        out[m.group(1)] = words[0] if words else ""
    return out


def render(
    variables: Mapping[str, str], individual: bool, combined: bool, ipmasq: bool, key: str
) -> str:
    """The output file's bytes for these shell variables (environment + subnet file)."""
    shell = {k: v for k, v in variables.items() if _NAME.match(k)}
    subnet, mtu, masq = (
        shell.get("FLANNEL_SUBNET", ""),
        shell.get("FLANNEL_MTU", ""),
        shell.get("FLANNEL_IPMASQ", ""),
    )
    if subnet:
        shell["DOCKER_OPT_BIP"] = f"--bip={subnet}"
    if mtu:
        shell["DOCKER_OPT_MTU"] = f"--mtu={mtu}"
    if masq and ipmasq:
        if masq == "true":
            shell["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
        elif masq == "false":
            shell["DOCKER_OPT_IPMASQ"] = "--ip-masq=true"
        else:
            raise DockerOptsError(f"Invalid value of FLANNEL_IPMASQ: {masq}")
    if not individual and not combined:
        individual = combined = True

    docker_opts = shell.get(key, "")
    if docker_opts:
        docker_opts += " "
    lines: list[str] = []
    # `set` lists variables sorted by name (byte order in dash and bash alike).
    for name in sorted(shell):
        value = shell[name]
        if "DOCKER_OPT_" not in name and "DOCKER_OPT_" not in value:
            continue
        value = " ".join(value.split())  # `eval echo $NAME`: unquoted, so whitespace collapses
        if individual:
            lines.append(f'{name}="{value}"\n')
        docker_opts += f" {value}"
    if combined:
        lines.append(f'{key}="{docker_opts}"\n')
    return "".join(lines)


def _cut(text: str, delim: str, fields: list[int]) -> str:
    """cut -dX -fN: a line without the delimiter is printed whole."""
    if delim not in text:
        return text
    parts = text.split(delim)
    return delim.join(parts[i - 1] for i in fields if i - 1 < len(parts))


def conflicting_routes(subnet: str) -> str:
    """The `ip route show` lines that the script's route check complains about ("" if none)."""
    last = _cut(_cut(subnet, ".", [4]), "/", [1])
    try:
        network = f"{_cut(subnet, '.', [1, 2, 3])}.{int(last) - 1}/{_cut(subnet, '/', [2])}"
    except ValueError:
        return ""
    try:
        routes = subprocess.run(
            ["ip", "route", "show"], check=False, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    pattern = re.compile(
        ".".join(re.escape(p) for p in network.split("."))
    )  # grep: "." is any char
    hits = [line for line in routes.splitlines() if pattern.search(line) and "via" in line]
    return "\n".join(hits)


def main(
    argv: list[str], prog: str = "fastlane docker-opts", environ: Mapping[str, str] | None = None
) -> int:
    def usage() -> int:
        sys.stderr.write(USAGE.format(prog=prog))
        return 1

    flannel_env, docker_env, key = "/run/flannel/subnet.env", "/run/docker_opts.env", "DOCKER_OPTS"
    individual = combined = False
    ipmasq = True
    try:
        opts, _ignored = getopt.getopt(
            argv, "f:d:icmk:h"
        )  # stops at the first non-option, like getopts
    except getopt.GetoptError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return usage()
    for opt, arg in opts:
        if opt == "-f":
            flannel_env = arg
        elif opt == "-d":
            docker_env = arg
        elif opt == "-i":
            individual = True
        elif opt == "-c":
            combined = True
        elif opt == "-m":
            ipmasq = False
        elif opt == "-k":
            key = arg
        else:
            return usage()
    if not _NAME.match(key):
        print(f"{prog}: -k {key!r} is not a shell variable name", file=sys.stderr)
        return 1

    variables = dict(os.environ if environ is None else environ)
    if os.path.isfile(flannel_env):
        try:
            with open(flannel_env, encoding="utf-8", errors="surrogateescape") as f:
                variables.update(read_env_file(f.read()))
        except OSError as exc:
            print(f"{prog}: cannot read {flannel_env}: {exc.strerror}", file=sys.stderr)
            return 2  # what the shell's `.` does with an unreadable file
    try:
        text = render(variables, individual, combined, ipmasq, key)
    except DockerOptsError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        # Not atomic on purpose: like the script, it writes into whatever -d names
        # (a symlink, /dev/stdout).
        with open(docker_env, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
    except OSError as exc:
        print(f"{prog}: cannot write {docker_env}: {exc.strerror}", file=sys.stderr)
        return 1
    subnet = variables.get("FLANNEL_SUBNET", "")
    if subnet:
        routes = conflicting_routes(subnet)
        if routes:
            print(f"Your routing table already contains the subnet: {routes}", file=sys.stderr)
            return 1
    return 0

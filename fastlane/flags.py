"""Command-line flags parsed the way Go's `flag` package parses flanneld's.

Unit files and scripts written for flanneld pass `-flag=value`, `-flag value`,
`--flag=value` and bare booleans (`-ip-masq`, `-ip-masq=false`); values may also come
from `FLANNELD_<NAME>` environment variables (flannel's flagutil.SetFlagsFromEnv), and
the command line wins over the environment. argparse accepts a different language
(no single-dash long options, `-v 3` vs `-v=3` quirks), hence this small parser.

The environment follows coreos/pkg flagutil.SetFlagsFromEnv as flanneld calls it: an empty
variable is skipped (templated EnvironmentFiles leave `FLANNELD_IFACE=` behind), and a value
the flag cannot parse is reported and the default kept, because flanneld only logs that
error and carries on. Values that parse but fail a check (a port of 70000, a public IP that is
not one) are still refused: flanneld refuses those too, only later in its start-up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class FlagError(Exception):
    """A bad command line; the message is flanneld-like and one line."""


class HelpRequested(Exception):
    """-h, -help or --help (undefined as flags, as in Go): print usage and exit 0."""


def parse_go_bool(text: str) -> bool:
    """strconv.ParseBool: exactly the spellings Go accepts, so `-ip-masq=yes` fails as it does there."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError("parse error")


def parse_go_int(text: str) -> int:
    """strconv.ParseInt(s, 0, 64): decimal, 0x hex, 0o/0 octal, 0b binary, optional sign."""
    try:
        return int(text, 0)
    except ValueError:
        if text.lstrip("+-").startswith("0") and text.lstrip("+-").isdigit():
            return int(text, 8)  # Go reads a leading 0 as octal
        raise ValueError("parse error") from None


def parse_klog_level(text: str) -> int:
    """klog's Level.Set: strconv.ParseInt(value, 10, 32), so decimal only (unlike IntVar)."""
    if not text.lstrip("+-").isdigit() or not text.isascii():
        raise ValueError("parse error")
    value = int(text, 10)
    if not -(2**31) <= value < 2**31:
        raise ValueError("value out of range")
    return value


def parse_klog_vmodule(text: str) -> str:
    """klog's moduleSpec.Set: a comma-separated list of pattern=N (empty entries skipped)."""
    for part in text.split(","):
        if not part:
            continue
        pattern, eq, level = part.partition("=")
        if not eq or not pattern or "=" in level:
            raise ValueError("syntax error: expect comma-separated list of filename=N")
        try:
            parse_klog_level(level)
        except ValueError:
            raise ValueError("syntax error: expect comma-separated list of filename=N") from None
    return text


def parse_klog_backtrace_at(text: str) -> str:
    """klog's traceLocation.Set: "" unsets; otherwise file.go:LINE with LINE > 0."""
    if text == "":
        return text
    fields = text.split(":")
    if len(fields) != 2 or "." not in fields[0]:
        raise ValueError("syntax error: expect file.go:234")
    try:
        line = int(fields[1], 10)
    except ValueError:
        raise ValueError("syntax error: expect file.go:234") from None
    if line <= 0:
        raise ValueError("negative or zero value for level")
    return text


@dataclass
class Flag:
    name: str
    default: Any
    help: str
    kind: str = "string"  # string | bool | int | list
    check: Callable[[Any], str | None] | None = None  # returns an error message or None
    # Overrides the kind's conversion; raises ValueError(message) like a Go flag.Value's Set.
    parser: Callable[[str], Any] | None = None
    # False for -version: flanneld reads FLANNELD_* only after its -version check.
    from_env: bool = True

    def convert(self, text: str) -> Any:
        if self.parser is not None:
            return self.parser(text)
        if self.kind == "bool":
            return parse_go_bool(text)
        if self.kind == "int":
            return parse_go_int(text)
        return text

    def env_key(self, prefix: str) -> str:
        return prefix + self.name.upper().replace("-", "_").replace(".", "_")


@dataclass
class EnvProblem:
    """A FLANNELD_* value that was not used.

    `fatal` is False for a value the flag cannot parse (flanneld logs it and keeps the
    default) and True for one that parses but fails a check (refused, as on the command line).
    """

    key: str
    message: str
    fatal: bool


@dataclass
class Parsed:
    values: dict[str, Any]
    rest: list[str]
    explicit: set[str]  # flags set on the command line or by a non-empty, usable env variable
    env_problems: list[EnvProblem]


@dataclass
class FlagSet:
    program: str
    flags: dict[str, Flag] = field(default_factory=dict)

    def add(
        self,
        name: str,
        default: Any,
        help: str,
        kind: str | None = None,
        check=None,
        parser: Callable[[str], Any] | None = None,
        from_env: bool = True,
    ) -> None:
        if kind is None:
            kind = {bool: "bool", int: "int", list: "list"}.get(type(default), "string")
        self.flags[name] = Flag(name, default, help, kind, check, parser, from_env)

    def usage(self) -> str:
        """Go's FlagSet.PrintDefaults layout, so `-h` reads like flanneld's."""
        lines = [f"Usage: {self.program} [OPTION]... [SUBCOMMAND ...]"]
        for f in sorted(self.flags.values(), key=lambda f: f.name):
            if f.kind == "list" or f.parser is not None:
                arg = " value"  # Go names flag.Var flags' argument "value"
            else:
                arg = {"bool": "", "int": " int"}.get(f.kind, " string")
            lines.append(f"  -{f.name}{arg}")
            default = ""
            if f.kind == "bool" and f.default:
                default = " (default true)"
            elif f.kind == "int" and f.default:
                default = f" (default {f.default})"
            elif f.kind == "string" and f.default:
                default = f" (default {json.dumps(f.default)})"
            lines.append(f"    \t{f.help}{default}")
        return "\n".join(lines)

    def _set(self, values: dict[str, Any], flag: Flag, text: str, origin: str) -> None:
        try:
            value = flag.convert(text)
        except ValueError as exc:
            reason = str(exc) if flag.parser is not None else "parse error"
            raise FlagError(
                f"invalid value {text!r} for flag -{flag.name}{origin}: {reason}"
            ) from None
        self._store(values, flag, value, text, origin)

    def _store(
        self, values: dict[str, Any], flag: Flag, value: Any, text: str, origin: str
    ) -> None:
        if flag.check is not None:
            problem = flag.check(value)
            if problem:
                raise FlagError(f"invalid value {text!r} for flag -{flag.name}{origin}: {problem}")
        if flag.kind == "list":
            values[flag.name] = values.get(flag.name, []) + [value]
        else:
            values[flag.name] = value

    def parse_full(
        self,
        argv: list[str],
        environ: Mapping[str, str] | None = None,
        env_prefix: str = "FLANNELD_",
    ) -> Parsed:
        """Parse argv (stopping at the first non-flag) then the environment.

        Raises FlagError for a bad command line and HelpRequested for -h/-help/--help.
        Environment problems never raise: they are returned so the caller can decide
        (the daemon logs the unparsable ones and refuses the fatal ones; `docker-opts`
        does not use these flags at all and must not fail because of them).
        """
        cli: dict[str, Any] = {}
        args = list(argv)
        while args:
            arg = args[0]
            if len(arg) < 2 or arg[0] != "-":
                break
            if arg == "--":
                args.pop(0)
                break
            name = arg[2:] if arg.startswith("--") else arg[1:]
            if not name or name[0] in "-=":
                raise FlagError(f"bad flag syntax: {arg}")
            args.pop(0)
            name, has_value, text = name.partition("=")
            flag = self.flags.get(name)
            if flag is None:
                if name in ("h", "help"):  # Go's special case: ErrHelp, whatever the value
                    raise HelpRequested()
                raise FlagError(f"flag provided but not defined: -{name}")
            if flag.kind == "bool" and flag.parser is None:
                self._set(cli, flag, text if has_value else "true", "")
                continue
            if not has_value:
                if not args:
                    raise FlagError(f"flag needs an argument: -{name}")
                text = args.pop(0)
            self._set(cli, flag, text, "")

        values: dict[str, Any] = {}
        problems: list[EnvProblem] = []
        env = os.environ if environ is None else environ
        for flag in self.flags.values():
            key = flag.env_key(env_prefix)
            text = env.get(key, "")
            if flag.name in cli or not flag.from_env or text == "":
                continue
            try:
                value = flag.convert(text)
            except ValueError as exc:
                reason = str(exc) if flag.parser is not None else "parse error"
                problems.append(
                    EnvProblem(
                        key,
                        f"invalid value {text!r} for {key}: {reason}; "
                        f"using the default of -{flag.name}",
                        fatal=False,
                    )
                )
                continue
            try:
                self._store(values, flag, value, text, f" (from ${key})")
            except FlagError as exc:
                problems.append(EnvProblem(key, str(exc), fatal=True))
        explicit = set(cli) | set(values)
        values.update(cli)
        for flag in self.flags.values():
            values.setdefault(
                flag.name, list(flag.default) if flag.kind == "list" else flag.default
            )
        return Parsed(values, args, explicit, problems)

    def parse(
        self,
        argv: list[str],
        environ: Mapping[str, str] | None = None,
        env_prefix: str = "FLANNELD_",
    ) -> tuple[dict[str, Any], list[str]]:
        """Return (values, remaining args); a fatal environment problem raises FlagError.

        Unparsable environment values are dropped silently here; use parse_full to see them.
        """
        parsed = self.parse_full(argv, environ, env_prefix)
        for problem in parsed.env_problems:
            if problem.fatal:
                raise FlagError(problem.message)
        return parsed.values, parsed.rest

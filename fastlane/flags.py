"""Command-line flags parsed the way Go's `flag` package parses flanneld's.

Unit files and scripts written for flanneld pass `-flag=value`, `-flag value`,
`--flag=value` and bare booleans (`-ip-masq`, `-ip-masq=false`); values may also come
from `FLANNELD_<NAME>` environment variables (flannel's flagutil.SetFlagsFromEnv), and
the command line wins over the environment. argparse accepts a different language
(no single-dash long options, `-v 3` vs `-v=3` quirks), hence this small parser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


class FlagError(Exception):
    """A bad command line; the message is flanneld-like and one line."""


def parse_go_bool(text: str) -> bool:
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
        raise


@dataclass
class Flag:
    name: str
    default: Any
    help: str
    kind: str = "string"  # string | bool | int | list
    check: Callable[[Any], str | None] | None = None  # returns an error message or None

    def convert(self, text: str) -> Any:
        if self.kind == "bool":
            return parse_go_bool(text)
        if self.kind == "int":
            return parse_go_int(text)
        return text


@dataclass
class FlagSet:
    program: str
    flags: dict[str, Flag] = field(default_factory=dict)

    def add(self, name: str, default: Any, help: str, kind: str | None = None, check=None) -> None:
        if kind is None:
            kind = {bool: "bool", int: "int", list: "list"}.get(type(default), "string")
        self.flags[name] = Flag(name, default, help, kind, check)

    def usage(self) -> str:
        lines = [f"Usage: {self.program} [OPTIONS] [SUBCOMMAND ...]"]
        for f in sorted(self.flags.values(), key=lambda f: f.name):
            arg = "" if f.kind == "bool" else (" int" if f.kind == "int" else " string")
            lines.append(f"  -{f.name}{arg}")
            default = "" if f.default in ("", [], False, None) else f" (default {f.default!r})"
            lines.append(f"    \t{f.help}{default}")
        return "\n".join(lines)

    def _set(self, values: dict[str, Any], flag: Flag, text: str, origin: str) -> None:
        try:
            value = flag.convert(text)
        except ValueError:
            raise FlagError(f"invalid value {text!r} for flag -{flag.name}{origin}: parse error") from None
        if flag.check is not None:
            problem = flag.check(value)
            if problem:
                raise FlagError(f"invalid value {text!r} for flag -{flag.name}{origin}: {problem}")
        if flag.kind == "list":
            values.setdefault(flag.name, [])
            values[flag.name] = values[flag.name] + [value]
        else:
            values[flag.name] = value

    def parse(
        self, argv: list[str], environ: Mapping[str, str] | None = None, env_prefix: str = "FLANNELD_"
    ) -> tuple[dict[str, Any], list[str]]:
        """Return (values, remaining args). Raise FlagError on a bad flag or value."""
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
                raise FlagError(f"flag provided but not defined: -{name}")
            if flag.kind == "bool":
                self._set(cli, flag, text if has_value else "true", "")
                continue
            if not has_value:
                if not args:
                    raise FlagError(f"flag needs an argument: -{name}")
                text = args.pop(0)
            self._set(cli, flag, text, "")

        values: dict[str, Any] = {}
        env = os.environ if environ is None else environ
        for flag in self.flags.values():
            key = env_prefix + flag.name.upper().replace("-", "_")
            if flag.name not in cli and key in env:
                self._set(values, flag, env[key], f" (from ${key})")
        values.update(cli)
        for flag in self.flags.values():
            values.setdefault(flag.name, list(flag.default) if flag.kind == "list" else flag.default)
        return values, args

"""What the `kscan` command modules share: exit codes, `UsageError`, the types that
check option values, and `Parser`, the argparse parser every command is built with.

`Parser` prints a usage error as one line (exit 2) and remembers, in public fields, what
the configuration file (`commands.config`) and the -v/-q pass (`commands.parser`) need
to know of it: `options` (dest → the option's action and its `action=` kind) and
`commands` (name → the parser of each subcommand). Nothing reads argparse's private
fields. The value types raise `argparse.ArgumentTypeError` naming the option; a type
with a `kind` attribute (`int` or `float`) wants that TOML type in the configuration
file before its own range check.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

from kscan.errors import KscanError
from scanner.terminal import printable

__all__ = ["DEFAULT_URI", "EXIT_ERROR", "EXIT_OK", "EXIT_TAMPERED", "MAX_WORKERS",
           "STRICT_HELP", "TRUST_HELP", "Option", "Parser", "UsageError", "bound_seconds",
           "default_uri", "duration", "interval", "module_name", "non_negative", "percent",
           "stats_every", "workers"]

EXIT_OK, EXIT_TAMPERED, EXIT_ERROR = 0, 1, 2
#: Hashing threads `run` may be given (each slow path in flight holds ~19 MB).
MAX_WORKERS = 64
TRUST_HELP = ("a module whose run-time patches (ftrace hooks, kprobes) are the kernel's "
              "own patching although the kernel did not accept its signature; "
              "repeatable. Code no listed module holds is tampering all the same")
STRICT_HELP = ("treat the kernel's own verified run-time patching (ftrace, jump labels, "
               "static calls, kprobes) as tampering too: for hardened VMs where tracing "
               "itself is suspicious")
#: libvirt's system connection (scanner.qemu.libvirt_domain.DEFAULT_URI; not imported
#: here so that --help works without the optional binding).
DEFAULT_URI = "qemu:///system"


class UsageError(KscanError):
    """The command line names nothing to work on."""


def default_uri() -> str:
    """--connect's default: $LIBVIRT_DEFAULT_URI, as virsh has it, else DEFAULT_URI."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


class Option(NamedTuple):
    """An option added with `Parser.add_argument`: its action, and the `action=` it was
    added with ("store", "append", "store_true", "boolean", "version", ...)."""

    action: argparse.Action
    kind: str


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit 2): the option, what is
    wrong with it, and where the help is — not the whole usage block. Subcommands'
    parsers are of this class too (argparse makes them of the parent's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: dest → the option, for every option added with add_argument (not those of a
        #: mutually exclusive group: the configuration file sets none of those).
        self.options: dict[str, Option] = {}
        #: name → the parser of each subcommand (add_subparsers).
        self.commands: dict[str, Parser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        how = kwargs.get("action", "store")
        kind = "boolean" if how is argparse.BooleanOptionalAction else \
            how if isinstance(how, str) else getattr(how, "__name__", "custom")
        if action.option_strings:
            self.options[action.dest] = Option(action, kind)
        return action

    def add_subparsers(self, **kwargs: Any) -> Any:
        sub = super().add_subparsers(**kwargs)
        self.commands = sub.choices  # the same dict: filled as add_parser is called
        return sub

    def error(self, message: str) -> NoReturn:
        # "argument --workers: --workers 0: must be 1..64" says the option twice.
        m = re.fullmatch(r"argument (\S+?)(?:/\S+)?: ((--?\S+) .*)", message, re.S)
        if m is not None and m.group(1).split("/")[0] in {m.group(3)}:
            message = m.group(2)
        self.exit(EXIT_ERROR, f"{self.prog}: {printable(' '.join(message.split()))} "
                              f"(see {self.prog} --help)\n")


# --------------------------------------------------------------------------- value types


def interval(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--interval {text!r}: use auto or seconds") from None
    if not 0.05 <= v <= 86400:
        raise argparse.ArgumentTypeError(f"--interval {v:g}: must be 0.05..86400 seconds")
    return v


def percent(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
    if not 0 < v <= 100 * (os.cpu_count() or 1):
        raise argparse.ArgumentTypeError(f"{v:g}%: must be > 0 and at most "
                                         f"{100 * (os.cpu_count() or 1)} (percent of one "
                                         "core; this host has "
                                         f"{os.cpu_count() or 1})")
    return v


def non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number") from None
    if not 0 <= v < 1e9:
        raise argparse.ArgumentTypeError(f"{v:g}: must be 0 or more")
    return v


def bound_seconds(option: str) -> Callable[[str], float]:
    """A type for an interval bound: 0.05..86400 seconds, the option named in errors."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} {text!r}: seconds") from None
        if not 0.05 <= v <= 86400:
            raise argparse.ArgumentTypeError(f"{option} {v:g}: must be 0.05..86400 seconds")
        return v
    parse.kind = float  # type: ignore[attr-defined]  # TOML: a number (commands.config)
    return parse


def stats_every(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stats-every {text!r}: seconds") from None
    if not (v == 0 or 0 < v <= 86400):
        raise argparse.ArgumentTypeError(f"--stats-every {v:g}: must be 0 (no stats "
                                         "events) or up to 86400 seconds")
    return v


stats_every.kind = float  # type: ignore[attr-defined]  # TOML: see commands.config


def workers(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: a whole number") from None
    if not 1 <= v <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"--workers {v}: must be 1..{MAX_WORKERS}")
    return v


workers.kind = int  # type: ignore[attr-defined]  # TOML: see commands.config


def duration(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--duration {text!r}: seconds") from None
    if not 0 <= v < 1e9:
        raise argparse.ArgumentTypeError(f"--duration {v:g}: must be 0 (run until "
                                         "stopped) or more")
    return v


duration.kind = float  # type: ignore[attr-defined]  # TOML: see commands.config


def module_name(text: str) -> str:
    """A module name as the kernel keeps it (`-` becomes `_`)."""
    name = text.replace("-", "_")
    if not re.fullmatch(r"[A-Za-z0-9_]{1,55}", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a module name (letters, digits, "
                                         "_ and -, at most 55)")
    return name

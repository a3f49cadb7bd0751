"""`kscan run --config FILE`: every `run` option from a TOML file.

The keys are the long options of `kscan run` with `_` for `-` (`cpu_budget = 10`,
`on_tamper = "pause"`, `qmp = ["/run/*/kscan.sock"]`), `db` included; they are read
from `kscan run`'s own parser, so an option added to `run` is a key at once. Values are
checked with the option's own type (its range checks included); a key given on the
command line overrides the file (a repeatable option replaces the file's list; a switch
the file turns on, `strict = true`, the command line turns off: `--no-strict`). The
options are read from what `commands.options.Parser` records, not argparse's internals.

Without `--config`, `/etc/kscan/kscan.toml` is read if it exists. An unknown key, a
wrong type, a bad value or a file that is not TOML is one line naming the file and the
key (`ConfigError`: exit 2). SIGHUP reads the file again (`kscan.service`'s reload).
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kscan.errors import KscanError
from kscan.shipped import contrib_path
from scanner.commands.options import Option, Parser

__all__ = ["DEFAULT_CONFIG", "ConfigError", "config_keys", "load_config", "parse_with_config",
           "subparser"]

DEFAULT_CONFIG = Path("/etc/kscan/kscan.toml")
#: Options of `run` that are no keys of the file.
NOT_KEYS = frozenset({"help", "config", "check_config"})
MAX_SIZE = 1 << 20


class ConfigError(KscanError):
    """The configuration file cannot be used."""


def subparser(ap: Parser, name: str) -> Parser:
    """The parser of `ap`'s subcommand `name` (KeyError if none)."""
    return ap.commands[name]


def config_keys(parser: Parser) -> dict[str, Option]:
    """The keys of the file: the options of `parser` (`run`'s), by dest."""
    return {dest: o for dest, o in parser.options.items()
            if dest not in NOT_KEYS and dest != argparse.SUPPRESS}


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _convert(path: Path, key: str, option: Option, value: Any) -> Any:
    action = option.action

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {what}")

    def typed(text: str) -> Any:
        fn = action.type
        if fn is None or not callable(fn):
            return text
        try:
            return fn(text)
        except (argparse.ArgumentTypeError, ValueError, KscanError) as err:
            raise bad(str(err)) from None

    if option.kind in ("store_true", "boolean"):
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {_kind(value)}")
        return value
    if option.kind == "append":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise bad(f"expected a list of strings, got {_kind(value)}")
        return [typed(i) for i in items]
    # A checking type marked `kind = int` or `float` (--workers, --stats-every ...) wants
    # that TOML type too, then checks the value's range.
    kind = getattr(action.type, "kind", action.type)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"expected an integer, got {_kind(value)}")
        return value if action.type is int else typed(str(value))
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad(f"expected a number, got {_kind(value)}")
        return float(value) if action.type is float else typed(repr(float(value)))
    if action.type is None:
        if not isinstance(value, str):
            raise bad(f"expected a string, got {_kind(value)}")
        return value
    # An option with a checking type of its own (--interval, --cpu-budget, ...).
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise bad(f"expected a number or a string, got {_kind(value)}")
    return typed(str(value))


def load_config(path: Path, parser: Parser) -> dict[str, Any]:
    """The file's settings, keyed by option dest, each checked and converted."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SIZE + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}",
                          hint="give a readable file with --config") from None
    if len(raw) > MAX_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_SIZE} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    keys = config_keys(parser)
    out: dict[str, Any] = {}
    for key, value in doc.items():
        action = keys.get(key)
        if action is None:
            hint = f"did you mean {key.replace('-', '_')}?" if key.replace(
                "-", "_") in keys else f"see {contrib_path('kscan.toml.example')} for every key"
            raise ConfigError(f"{path}: unknown key {key!r}", hint=hint)
        out[key] = _convert(path, key, action, value)
    return out


def config_file(given: str | None) -> Path | None:
    """--config's file, or the default one if it exists (None: no file)."""
    if given is not None:
        return Path(given) if given else None  # --config '' reads none
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def parse_with_config(build_parser: Callable[[], Parser],
                      argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; for `run`, with the configuration file's settings as
    the defaults the command line overrides. `args.config_file` names the file read."""
    args = build_parser().parse_args(argv)
    if args.command != "run":
        return args
    path = config_file(args.config)
    if path is None:
        args.config_file = None
        return args
    ap = build_parser()
    run = subparser(ap, "run")
    settings = load_config(path, run)
    keys = config_keys(run)
    lists = {k: v for k, v in settings.items() if keys[k].kind == "append"}
    run.set_defaults(**{k: v for k, v in settings.items() if k not in lists})
    args = ap.parse_args(argv)
    for key, value in lists.items():
        if getattr(args, key) is None:  # not on the command line
            setattr(args, key, value)
    args.config_file = str(path)
    return args

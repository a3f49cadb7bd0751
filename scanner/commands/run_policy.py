"""`kscan run`'s policy: its options (command line and configuration file) as a
`RunConfig`, checked before anything is watched, and the command itself.

`run_config` refuses, in one line naming the option (and the configuration file it
came from), what would only fail later: nothing to watch, --min-interval above
--max-interval, a forensics directory that cannot be created, an exec hook that cannot
be run. `run --check-config` stops there and prints what would run. SIGHUP calls the
reloader: the command line parsed again with the file read again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from scanner.commands.options import EXIT_OK, UsageError
from scanner.terminal import printable

if TYPE_CHECKING:
    from scanner.run.engine import RunConfig

__all__ = ["cmd_run", "run_config"]


def _uid(user: str) -> int:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        if user.isdigit():
            return int(user)
        raise UsageError(f"--discover-user {user!r}: no such user") from None


async def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from scanner.run.engine import install_signal_handlers, run_engine, tune_malloc

    cfg = run_config(args)
    if args.check_config:
        return _check_config(args, cfg)
    try:  # checked in run_config without creating it; made now, so a bad one fails now
        os.makedirs(cfg.forensics_dir, mode=0o700, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--forensics-dir {cfg.forensics_dir}: cannot be created: "
                         f"{err.strerror or err}",
                         hint="choose a directory kscan can create and write") from None
    if args.libvirt:
        from scanner.qemu.libvirt_domain import binding

        binding()  # fail now, in one line, if the extra is not installed
    from scanner.run.journal import StderrFormatter, is_journal

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StderrFormatter(journal=is_journal(2)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING
                        if args.quiet else logging.INFO, handlers=[handler])
    tune_malloc()
    stop = asyncio.Event()
    install_signal_handlers(stop)
    if args.duration:
        asyncio.get_running_loop().call_later(args.duration, stop.set)
    await run_engine(cfg, args.db, stop, reloader=_reloader(args), metrics=args.metrics,
                     event_format=args.event_format)
    return EXIT_OK


def _check_config(args: argparse.Namespace, cfg: RunConfig) -> int:
    """`run --check-config`: what run_config accepted, plus what `run` would otherwise
    find out only at start (the metrics address, the libvirt binding), printed."""
    from store.paths import default_db_path

    if args.metrics:
        from scanner.run.metrics import MetricsError, parse_address

        if not args.metrics.startswith("unix:"):
            parse_address(args.metrics)
        elif not args.metrics[5:]:
            raise MetricsError("--metrics unix: needs a path, e.g. "
                               "unix:/run/kscan/metrics.sock")
    if args.libvirt:
        from scanner.qemu.libvirt_domain import binding

        binding()
    sources = [*(f"qmp {q}" for q in cfg.qmp), *(f"replay {r}" for r in cfg.replay)]
    if cfg.discover:
        sources.append("discover")
    if cfg.libvirt:
        sources.append(f"libvirt {cfg.libvirt}")
    print(printable(f"configuration OK ({args.config_file or 'command line only'}): "
                    f"database {args.db or default_db_path()}; {cfg.policy.describe()}; "
                    f"on tamper {cfg.action.describe()}; forensics {cfg.forensics_dir}; "
                    f"watching {', '.join(sources)}", limit=0))
    return EXIT_OK


def _reloader(args: argparse.Namespace) -> Callable[[], RunConfig]:
    """What SIGHUP calls: the command line parsed again with the configuration file
    read again (the command line still overrides it)."""
    argv = list(getattr(args, "argv", None) or ())

    def reload() -> RunConfig:
        import logging

        from scanner.commands.config import parse_with_config
        new = parse_with_config(args.build_parser, argv)
        for key in ("db", "metrics", "connect", "workers"):
            if getattr(new, key) != getattr(args, key):
                logging.getLogger("kscan").warning(
                    "reload: %s changed in the configuration; it takes a restart", key)
        if not new.forensics_dir:  # beside the database in use, not the one to come
            new.forensics_dir = str(_default_forensics(args.db))
        return run_config(new)

    return reload


def run_config(args: argparse.Namespace) -> RunConfig:
    """`kscan run`'s options (command line and configuration file) as a RunConfig."""
    from scanner.run.actions import ActionKind, parse_action
    from scanner.run.engine import RunConfig
    from scanner.run.scheduler import Policy

    if not (args.qmp or args.discover or args.replay or args.libvirt):
        raise UsageError("nothing to watch", hint="give --qmp SOCK (or a glob), --discover, "
                         "--libvirt, or --replay DIR" + (
                             f" (on the command line or in {args.config_file})"
                             if getattr(args, "config_file", None) else ""))
    def bad(option: str, what: str, hint: str = "") -> UsageError:
        where = f" (in {args.config_file})" if getattr(args, "config_file", None) else ""
        return UsageError(f"{option} {what}{where}", hint=hint)

    if args.min_interval > args.max_interval:
        raise bad("--min-interval", f"{args.min_interval:g} is above --max-interval "
                  f"{args.max_interval:g}", "the shortest interval cannot exceed the longest")
    auto = args.interval == "auto"
    policy = Policy(auto=auto, fixed=0.0 if auto else float(args.interval),
                    budget=args.cpu_budget / 100 if args.cpu_budget else None,
                    min_interval=args.min_interval, max_interval=args.max_interval,
                    startup_budget=args.startup_budget / 100,
                    keyed_every=args.keyed_every)
    forensics = Path(args.forensics_dir) if args.forensics_dir else \
        _default_forensics(args.db)
    why = _uncreatable(forensics)
    if why:
        raise bad("--forensics-dir" if args.forensics_dir else "--db",
                  f"{forensics}: forensic copies cannot be written there: {why}",
                  "choose a directory kscan can create and write")
    action = parse_action(args.on_tamper)
    if action.kind is ActionKind.EXEC:
        why = _not_runnable(action.argv[0])
        if why:
            raise bad("--on-tamper", f"exec:{action.argv[0]}: {why}",
                      "give the hook's full path; it must be an executable file")
    cfg = RunConfig(qmp=tuple(args.qmp or ()), discover=bool(args.discover),
                    replay=tuple(args.replay or ()), policy=policy,
                    action=action, forensics_dir=forensics,
                    workers=args.workers, stats_every=args.stats_every,
                    strict=bool(args.strict),
                    trusted_modules=frozenset(args.trust_module or ()),
                    libvirt=args.connect if args.libvirt else None,
                    discover_uids=frozenset(_uid(u) for u in args.discover_user or ()),
                    keep_days=args.keep_days, forensics_max_mb=args.forensics_max_mb,
                    db=args.db, metrics=args.metrics)
    return cfg


def _default_forensics(db: str | None) -> Path:
    """forensics/ beside the database."""
    from store.paths import default_db_path

    return (Path(db).parent if db else default_db_path().parent) / "forensics"


def _uncreatable(directory: Path) -> str:
    """Why `directory` could not be created or written by this process ('' if it can):
    checked without creating anything (`run --check-config` changes nothing)."""
    d = directory
    for _ in range(256):  # bounded: a path has no more components than that
        if d.exists():
            if not d.is_dir():
                return f"{d} is not a directory"
            if not os.access(d, os.W_OK | os.X_OK):
                return f"{d} is not writable"
            return ""
        if d.parent == d:
            break
        d = d.parent
    return f"no existing parent of {directory}"


def _not_runnable(program: str) -> str:
    """Why an exec hook's program cannot be run ('' if it can)."""
    import shutil

    if "/" not in program:
        return "" if shutil.which(program) else "not found on PATH"
    if not os.path.exists(program):
        return "no such file"
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        return "not an executable file"
    return ""

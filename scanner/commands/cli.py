"""The `kscan` command line's entry point (`kscan = scanner.commands.cli:main`).

Exit codes: 0 success (or clean), 1 tampering found, 2 error (bad input or option, VM
not usable), 130 interrupted. Errors are one line on stderr naming the input or the
option and what to do; no traceback unless KSCAN_DEBUG=1. The parser is
`commands.parser`, the one-shot commands `commands.handlers` (their text
`commands.render`), `run` and its options `commands.run_policy`; `status`, `events`,
`baseline list|rm` and `profile rm` live in modules of their own (`status`,
`events_cmd`, `stored`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from kscan.errors import KscanError
from scanner.commands.options import EXIT_ERROR
from scanner.commands.parser import build_parser
from scanner.terminal import printable

__all__ = ["build_parser", "main"]


def run_async(coro_fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
              args: argparse.Namespace) -> int:
    """`run` on uvloop (hundreds of VMs); one-shot commands on asyncio's own loop,
    which asks nothing of the process's standard streams."""
    if args.command != "run":
        import signal

        # asyncio.run's own SIGINT handler only cancels the main task, which a task
        # blocked in a system call (open() of a FIFO: `kscan import <(...)`) never sees;
        # a handler of ours (asyncio then installs none) raises where the main thread is.
        signal.signal(signal.SIGINT, _interrupt)
        return asyncio.run(coro_fn(args))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without
        return asyncio.run(coro_fn(args))
    return uvloop.run(coro_fn(args))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _input_of(args: argparse.Namespace) -> str:
    """The input a command was given, to name it in an error line."""
    for attr, flag in (("qmp", "--qmp"), ("replay", "--replay"), ("core", "--core"),
                       ("path", "")):
        value = getattr(args, attr, None)
        if value:
            value = ", ".join(value) if isinstance(value, list) else value
            return f"{flag} {value}".strip()
    return ""


def _one_shot_output(args: argparse.Namespace) -> None:
    """-v: debug lines on stderr; -q: nothing on stdout, only errors on stderr. Log lines
    carry their time (or their priority, to the journal: scanner.run.journal)."""
    import io
    import logging

    from scanner.run.journal import StderrFormatter, is_journal

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StderrFormatter(journal=is_journal(2)))
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING,
                        handlers=[handler])
    if verbose:  # kscan's own debug lines, not every library's
        logging.getLogger("kscan").setLevel(logging.DEBUG)
    if quiet:
        sys.stdout = io.TextIOWrapper(open(os.devnull, "wb"), write_through=True)  # noqa: SIM115


def main(argv: Sequence[str] | None = None) -> int:
    from scanner.commands.config import parse_with_config
    from scanner.commands.streams import reopen_closed

    reopen_closed()  # before anything opens a file: see scanner.commands.streams
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_with_config(build_parser, argv)
    except KscanError as err:  # the configuration file: one line, exit 2
        print(f"kscan: {printable(' '.join(str(err).split()))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C while a FIFO configuration file is awaited
        return 130
    args.argv = argv
    if args.command != "run":  # run sets up its own stderr lines (cmd_run)
        _one_shot_output(args)
    try:
        return run_async(args.func, args)
    except KscanError as err:
        if os.environ.get("KSCAN_DEBUG") == "1":
            raise
        one_line = " ".join(str(err).split())  # third-party text may hold newlines
        print(f"kscan: {printable(one_line)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except (Exception, MemoryError, RecursionError) as err:
        # Not one of ours: a hostile input kscan did not foresee, or a bug. Exit 1 must
        # only ever mean tampering, and no traceback reaches the user.
        if os.environ.get("KSCAN_DEBUG") == "1":
            raise
        what = " ".join(f"{type(err).__name__}: {err}".split())
        where = " ".join(filter(None, [args.command, getattr(args, "profile_command", None),
                                       _input_of(args)]))
        print(f"kscan: {printable(where)}: unexpected error: {printable(what, limit=300)} "
              "(the input is malformed or this is a bug; KSCAN_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

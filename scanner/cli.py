"""The `kscan` command line: argument parsing, output formatting, exit codes.

Exit codes: 0 success (or clean), 1 tampering found, 2 error (bad input, VM not
usable). Errors are one line on stderr naming the input and what to do; no traceback
unless KSCAN_DEBUG=1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import orjson

from kscan import __version__
from kscan.errors import KscanError

EXIT_OK, EXIT_TAMPERED, EXIT_ERROR = 0, 1, 2

EPILOG = """\
examples:
  kscan inspect --qmp /run/vm1/qmp.sock            memory layout, vCPU registers, IDT page
  kscan inspect --qmp /run/vm1/qmp.sock --json     the same as one JSON object
"""


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _print_json(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- inspect


async def cmd_inspect(args: argparse.Namespace) -> int:
    from scanner.inspect import inspect_vm

    report = await inspect_vm(args.qmp, db=getattr(args, "db", None))
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.to_text())
    return EXIT_OK


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kscan",
        description="Agentless runtime integrity monitor for the Linux kernels of QEMU/KVM VMs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"kscan {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect", help="show a VM's memory layout, vCPU registers and IDT translation",
        epilog="example:\n  kscan inspect --qmp /tmp/kscan-guests-0/demo0/qmp.sock --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--qmp", required=True, metavar="SOCK", help="the VM's QMP unix socket")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)
    return ap


def run_async(coro_fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
              args: argparse.Namespace) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without
        return asyncio.run(coro_fn(args))
    return uvloop.run(coro_fn(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_async(args.func, args)
    except KscanError as err:
        if os.environ.get("KSCAN_DEBUG") == "1":
            raise
        one_line = " ".join(str(err).split())  # third-party text may hold newlines
        print(f"kscan: {one_line}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

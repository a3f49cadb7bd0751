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
  kscan profile add /boot/vmlinuz-6.1.0-56-cloud-amd64    store a kernel's profile
  kscan profile list
  kscan inspect --qmp /run/vm1/qmp.sock            layout, registers, kernel, regions
  kscan inspect --qmp /run/vm1/qmp.sock --json     the same as one JSON object

The database defaults to $XDG_STATE_HOME/kscan/kscan.db (~/.local/state/kscan/kscan.db);
--db PATH chooses another.
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
    from store.paths import default_db_path

    db = args.db
    if db is None and default_db_path().exists():
        db = str(default_db_path())
    report = await inspect_vm(args.qmp, db=db)
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.to_text())
    return EXIT_OK


# --------------------------------------------------------------------------- profiles


async def cmd_profile_add(args: argparse.Namespace) -> int:
    from scanner.profile import profile_from_path
    from store import Store

    prof = profile_from_path(args.path, system_map=args.system_map)
    async with Store.open(args.db) as st:
        added = await st.add_profile(prof.build_id, prof.release, prof.version,
                                     prof.to_bytes())
    relocs = sum(r.count for r in prof.relocs.values())
    if added:
        print(f"added profile {prof.build_id} ({prof.release}): "
              + ", ".join(f"{s.name} {s.size} B" for s in prof.protected())
              + f", {relocs} relocation sites in them"
              + (f", {len(prof.symbols)} symbols" if prof.symbols else ", no symbols"))
    else:
        print(f"profile {prof.build_id} ({prof.release}) is already stored; nothing to do")
    return EXIT_OK


async def cmd_profile_list(args: argparse.Namespace) -> int:
    from store import Store

    async with Store.open(args.db) as st:
        rows = await st.list_profiles()
    if args.json:
        _print_json([{"build_id": r.build_id, "release": r.release, "version": r.version,
                      "added_at": r.added_at, "size": r.size} for r in rows])
        return EXIT_OK
    if not rows:
        print("no profiles stored; add one with: kscan profile add /path/to/vmlinuz")
    for r in rows:
        print(f"{r.build_id}  {r.release}  ({r.size} B)")
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
    _db_arg(p)
    p.set_defaults(func=cmd_inspect)

    prof = sub.add_parser("profile", help="kernel profiles: add a kernel image, list them")
    psub = prof.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    p = psub.add_parser(
        "add", help="read a vmlinuz/bzImage or vmlinux and store its profile",
        epilog="examples:\n  kscan profile add /boot/vmlinuz-6.1.0-56-cloud-amd64\n"
               "  kscan profile add vmlinux --system-map System.map-6.1.0-56-cloud-amd64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="kernel image: bzImage/vmlinuz or vmlinux")
    p.add_argument("--system-map", metavar="FILE",
                   help="a real System.map, to name symbols in reports (optional)")
    _db_arg(p)
    p.set_defaults(func=cmd_profile_add)
    p = psub.add_parser("list", help="list stored profiles")
    p.add_argument("--json", action="store_true")
    _db_arg(p)
    p.set_defaults(func=cmd_profile_list)
    return ap


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH", default=None,
                   help="database file (default $XDG_STATE_HOME/kscan/kscan.db)")


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

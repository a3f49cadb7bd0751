"""The one-shot commands of `kscan`: parsed options in, an exit code out.

`inspect`, `key show|rotate`, `profile add|list`, `baseline`, `check`, `accept`,
`export` and `import`: each turns its options into a call of the module doing the work
(`inspection`, `examine.keying`, `oneshot`, `offline`, `bundles`, `store`) and prints
the result with `commands.render` (text) or as JSON. `status`, `events`,
`baseline list|rm` and `profile rm` have modules of their own; `run` is
`commands.run_policy`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import orjson

from scanner.commands.options import EXIT_OK, EXIT_TAMPERED, UsageError
from scanner.commands.render import (
    baseline_lines,
    export_lines,
    import_warnings,
    imported_line,
    key_rotated_line,
    print_json,
    print_lines,
    profile_added_line,
    report_lines,
)
from scanner.terminal import printable

if TYPE_CHECKING:
    from scanner.image.kernel_profile import KernelProfile
    from scanner.vm import VmSource

__all__ = ["cmd_accept", "cmd_baseline", "cmd_check", "cmd_export", "cmd_import",
           "cmd_inspect", "cmd_key_rotate", "cmd_key_show", "cmd_profile_add",
           "cmd_profile_list", "knows_less", "libvirt_source"]


def libvirt_source(args: argparse.Namespace) -> VmSource | None:
    """The --libvirt DOMAIN of a one-VM command, as a source (None without it)."""
    from scanner.vm import SourceKind, VmSource

    name = getattr(args, "libvirt", None)
    if not name:
        return None
    from scanner.qemu.libvirt_domain import binding

    binding()  # fail now, in one line, if the extra is not installed
    return VmSource(SourceKind.LIBVIRT, name, args.connect)


async def cmd_inspect(args: argparse.Namespace) -> int:
    from scanner.commands.inspection import inspect_vm
    from scanner.vm import SourceKind, VmSource
    from store.paths import default_db_path

    db = args.db
    if db is None and default_db_path().exists():
        db = str(default_db_path())
    report = await inspect_vm(libvirt_source(args) or (
        VmSource(SourceKind.CORE, args.core) if args.core else args.qmp), db=db)
    if args.json:
        print_json(report.to_json())
    else:
        print(printable(report.to_text(), keep_newlines=True, limit=0))
    return EXIT_OK


async def cmd_key_show(args: argparse.Namespace) -> int:
    from scanner.examine.keying import keyed_store
    from store.keyfile import key_path

    async with keyed_store(args.db) as st:
        print(f"hash key: {key_path(st.path)} (id {await st.get_key_id()}); "
              "`kscan key rotate` replaces it and re-hashes the baselines")
    return EXIT_OK


async def cmd_key_rotate(args: argparse.Namespace) -> int:
    from scanner.examine.keying import rotate_key

    path, out = await rotate_key(args.db)
    print(key_rotated_line(path, out))
    return EXIT_OK


async def cmd_profile_add(args: argparse.Namespace) -> int:
    from scanner.image.kernel_profile import KernelProfile, profile_from_path
    from store import Store

    prof = profile_from_path(args.path, system_map=args.system_map)
    upgraded = False
    async with Store.open(args.db) as st:
        added = await st.add_profile(prof.build_id, prof.release, prof.version,
                                     prof.to_bytes())
        if not added:
            row = await st.get_profile(prof.build_id)
            old = KernelProfile.from_bytes(row.data) if row is not None else None
            if old is not None and knows_less(old, prof):
                upgraded = await st.add_profile(prof.build_id, prof.release, prof.version,
                                                prof.to_bytes(), replace=True)
    if added or upgraded:
        print(profile_added_line(prof, added))
        if prof.layouts_off:
            print(f"note: {prof.layouts_off}")
    else:
        print(f"profile {prof.build_id} ({prof.release}) is already stored; nothing to do")
    return EXIT_OK


def knows_less(old: KernelProfile, new: KernelProfile) -> bool:
    """A profile stored by an older kscan, missing what this one reads from the image."""
    return ((old.kallsyms is None and new.kallsyms is not None)
            or (old.patch_sites is None and new.patch_sites is not None)
            or (old.early_idt is None and new.early_idt is not None)
            or (not old.alt_relocs and bool(new.alt_relocs))
            or (old.layouts is None and new.layouts is not None)
            or (not old.data_symbols and bool(new.data_symbols)))


async def cmd_profile_list(args: argparse.Namespace) -> int:
    from store import Store

    async with Store.open(args.db) as st:
        rows = await st.list_profiles()
    if args.json:
        print_json([{"build_id": r.build_id, "release": r.release, "version": r.version,
                     "added_at": r.added_at, "size": r.size} for r in rows])
        return EXIT_OK
    if not rows:
        print("no profiles stored; add one with: kscan profile add /path/to/vmlinuz")
    for r in rows:
        print(f"{r.build_id}  {r.release}  ({r.size} B)")
    return EXIT_OK


async def cmd_baseline(args: argparse.Namespace) -> int:
    from scanner.commands.oneshot import baseline_vms
    from scanner.vm import SourceKind, VmSource

    sources = [VmSource(SourceKind.QMP, s) for s in args.qmp or []] + [
        VmSource(SourceKind.REPLAY, d) for d in args.replay or []] + [
        VmSource(SourceKind.LIBVIRT, d, args.connect) for d in args.libvirt or []]
    if not sources:
        raise UsageError("no VM given", hint="pass --qmp SOCK or --libvirt DOMAIN of a "
                         "verified VM")
    for res in await baseline_vms(sources, args.db):
        print_lines(baseline_lines(res), limit=0)
    return EXIT_OK


async def cmd_check(args: argparse.Namespace) -> int:
    from scanner.commands.oneshot import check_vm
    from scanner.vm import SourceKind, VmSource

    if args.core:
        from scanner.commands.offline import check_core

        rep = await check_core(args.core, args.db, vm=args.vm, boot_profile=args.boot_profile,
                               strict=args.strict,
                               trusted_modules=frozenset(args.trust_module or ()))
    else:
        if args.vm or args.boot_profile:
            raise UsageError("--vm and --boot-profile are for --core only")
        rep = await check_vm(libvirt_source(args) or (
            VmSource(SourceKind.QMP, args.qmp) if args.qmp
            else VmSource(SourceKind.REPLAY, args.replay)), args.db, strict=args.strict,
            trusted_modules=frozenset(args.trust_module or ()))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(rep.to_json()) + b"\n")
    else:
        print_lines(report_lines(rep))
    return EXIT_TAMPERED if rep.tampered else EXIT_OK


async def cmd_accept(args: argparse.Namespace) -> int:
    from scanner.commands.oneshot import accept_vm

    res = await accept_vm(libvirt_source(args) or args.qmp, args.db, args.note or "")
    rep, n = res.report, res.accepted_pages
    print(f"{printable(rep.vm)}: accepted {n} changed page(s) as this VM's new baseline"
          + ("" if n else " (nothing differed)") + "; recorded in the event log")
    return EXIT_OK


async def cmd_export(args: argparse.Namespace) -> int:
    from scanner.commands.bundles import export_bundle

    res = await export_bundle(args.out, args.key, args.db, args.build_id or ())
    print_lines(export_lines(res), limit=0)
    return EXIT_OK


async def cmd_import(args: argparse.Namespace) -> int:
    from scanner.commands.bundles import import_bundle

    res = await import_bundle(args.bundle, args.trust, args.db, replace=args.replace,
                              richer=knows_less, allow_older=args.allow_older)
    print_lines([imported_line(res)], limit=0)
    print_lines(import_warnings(res), sys.stderr, limit=0)
    return EXIT_OK

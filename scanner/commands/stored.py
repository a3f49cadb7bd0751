"""`kscan baseline list|rm` and `kscan profile rm`: what the database holds, and removing it.

`baseline list` shows each golden baseline (kernel build, boot profile, verified boots,
regions, the VM it was taken from, when) and the VMs whose last verdict (event log) was
against it.
`baseline rm BUILD_ID [--boot-profile KEY]` removes the golden baselines of a kernel;
one that VMs are checked against is refused unless `--force` (they would report
`baseline_missing` from then on). `profile rm BUILD_ID` removes a kernel profile; one
that golden baselines still need is refused unless `--force`, which removes them with
it. A build id may be given by a unique prefix of 8 characters or more. Each removal
is one transaction with its event (`baseline_removed`, `profile_removed`) in the log.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson

from kscan.errors import KscanError
from scanner.commands.status import checked_against, vm_statuses
from scanner.terminal import printable
from store import Store
from store.reader import Reader

__all__ = ["add_baseline_actions", "add_profile_rm"]

MIN_PREFIX = 8


class NotStored(KscanError):
    """A build id or baseline named on the command line is not in the database."""


def _resolve(build_id: str, known: set[str], what: str = "stored kernel") -> str:
    if build_id in known:
        return build_id
    hits = sorted(b for b in known if b.startswith(build_id)) if len(
        build_id) >= MIN_PREFIX else []
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise NotStored(f"build id {build_id!r} is ambiguous: {', '.join(hits[:4])}",
                        hint="give more of it")
    raise NotStored(f"no {what} with build id {printable(build_id)!r}",
                    hint="kscan profile list and kscan baseline list show them")


async def cmd_baseline_list(args: argparse.Namespace) -> int:
    with Reader.open(args.db) as r, r.snapshot():
        goldens = r.goldens()
        boots = r.golden_boots()
        releases = {p.build_id: p.release for p in r.profiles()}
        users = checked_against(vm_statuses(r))
    rows: list[dict[str, Any]] = [{"build_id": g.build_id, "release": releases.get(g.build_id),
             "boot_profile": g.boot_profile, "boots": boots.get((g.build_id,
                                                                  g.boot_profile)),
             "regions": list(g.regions), "source_vm": g.source_vm,
             "created_at": g.created_at,
             "vms": sorted(users.get((g.build_id, g.boot_profile), []))} for g in goldens]
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    if not rows:
        print("no golden baselines stored; take one with: kscan baseline --qmp SOCK")
        return 0
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["created_at"]))
        print(printable(f"{row['build_id']}  {row['release'] or '?'}  boot profile "
                        f"{row['boot_profile']}: {row['boots']} verified boot(s), from "
                        f"{row['source_vm'] or '?'} at {when} UTC, "
                        f"{len(row['vms'])} VM(s) checked against it", limit=500))
    return 0


async def cmd_baseline_rm(args: argparse.Namespace) -> int:
    with Reader.open(args.db) as r, r.snapshot():
        stored = {(g.build_id, g.boot_profile) for g in r.goldens()}
        build_id = _resolve(args.build_id, {b for b, _ in stored}, "golden baseline")
        keys = sorted(k for b, k in stored if b == build_id
                      and (args.boot_profile is None or k == args.boot_profile))
        if not keys:
            raise NotStored(f"no golden baseline of {build_id} with boot profile "
                            f"{printable(args.boot_profile)!r}",
                            hint="kscan baseline list shows them")
        users = sorted({vm for (b, k), vms in checked_against(vm_statuses(r)).items()
                        if b == build_id and k in keys for vm in vms})
    if users and not args.force:
        shown = ", ".join(printable(u, limit=64) for u in users[:5]) + (
            ", ..." if len(users) > 5 else "")
        raise KscanError(f"{len(users)} VM(s) are checked against the baseline of "
                         f"{build_id} ({shown})",
                         hint="they would report baseline_missing; --force removes it "
                              "anyway")
    async with Store.open(args.db) as st:
        removed = await st.delete_golden(
            build_id, args.boot_profile,
            {"ts": time.time(), "event": "baseline_removed", "vm": "",
             "build_id": build_id, "forced": bool(users)})
    for key in removed:
        print(f"removed the golden baseline of {build_id} boot profile {key}")
    return 0


async def cmd_profile_rm(args: argparse.Namespace) -> int:
    with Reader.open(args.db) as r:
        build_id = _resolve(args.build_id, {p.build_id for p in r.profiles()})
    async with Store.open(args.db) as st:
        removed = await st.delete_profile(
            build_id, {"ts": time.time(), "event": "profile_removed", "vm": "",
                       "build_id": build_id, "forced": args.force},
            with_golden=args.force)
    if removed is None:  # removed by someone else meanwhile
        raise NotStored(f"no stored profile with build id {build_id}")
    print(f"removed profile {build_id}" + (
        f" and its golden baseline(s) {', '.join(removed)}" if removed else ""))
    return 0


def add_baseline_actions(baseline: argparse.ArgumentParser, db_arg: Any) -> None:
    """`list` and `rm` under `kscan baseline` (which without them takes a baseline)."""
    sub = baseline.add_subparsers(dest="baseline_command", metavar="[list|rm]")
    p = sub.add_parser("list", help="list the stored golden baselines")
    p.add_argument("--json", action="store_true")
    db_arg(p)
    p.set_defaults(func=cmd_baseline_list)
    p = sub.add_parser(
        "rm", help="remove the golden baselines of a kernel build",
        epilog="examples:\n  kscan baseline rm 0123abcd4567ef89\n"
               "  kscan baseline rm 0123abcd4567ef89 --boot-profile KEY --force",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build_id", metavar="BUILD_ID", help="the kernel's build id (or a "
                   f"unique prefix of {MIN_PREFIX}+ characters)")
    p.add_argument("--boot-profile", metavar="KEY",
                   help="only this boot profile (default: every one of the build)")
    p.add_argument("--force", action="store_true",
                   help="remove it even though VMs are checked against it")
    db_arg(p)
    p.set_defaults(func=cmd_baseline_rm)


def add_profile_rm(psub: Any, db_arg: Any) -> None:
    p = psub.add_parser(
        "rm", help="remove a stored kernel profile",
        description="Remove a kernel profile. Refused while golden baselines of that "
        "kernel are stored, unless --force (which removes them too).")
    p.add_argument("build_id", metavar="BUILD_ID", help="the kernel's build id (or a "
                   f"unique prefix of {MIN_PREFIX}+ characters)")
    p.add_argument("--force", action="store_true",
                   help="also remove the golden baselines that need it")
    db_arg(p)
    p.set_defaults(func=cmd_profile_rm)

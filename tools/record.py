"""Record running guests as replayable VMs, and clone recordings.

A recording is a directory that `kscan run --replay DIR` (and `baseline`/`check
--replay`) reads exactly like a live VM, without QEMU: `vm.json` (name, RAM layout,
vCPU registers, boot profile) and `mem`, a sparse copy of guest RAM at the same file
offsets. `--minimal` copies only the pages kscan reads — the protected regions, the
page tables their translations go through, each vCPU's top-level tables, `.notes` —
about 20 MB of a 512 MB guest, so hundreds of replayed VMs fit on one host for the
scale benchmark.

    python -m tools.record save --qmp SOCK --out DIR [--minimal --db DB]
    python -m tools.record clone SRC DST_PREFIX --count N     # DST_PREFIX0 .. N-1

The guest is paused while it is copied, so the copy is consistent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from pathlib import Path

import orjson

from scanner.check.locate import locate_kernel
from scanner.vm import AttachedVm
from scanner.vm.replay import write_replay
from translate import TranslationError, kernel_pgd_candidates

PAGE = 4096
CHUNK = 4 << 20


def _copy_ranges(src: str, dst: Path, size: int, ranges: list[tuple[int, int]]) -> int:
    """Copy [offset, offset+n) ranges of src into a sparse dst of `size` bytes."""
    copied = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        for off, n in _merge(ranges):
            fi.seek(off)
            fo.seek(off)
            left = n
            while left:
                buf = fi.read(min(CHUNK, left))
                if not buf:
                    break
                fo.write(buf)
                left -= len(buf)
                copied += len(buf)
    return copied


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        start, end = off & ~(PAGE - 1), (off + n + PAGE - 1) & ~(PAGE - 1)
        if out and start <= out[-1][0] + out[-1][1]:
            s0, n0 = out[-1]
            out[-1] = (s0, max(s0 + n0, end) - s0)
        else:
            out.append((start, end - start))
    return out


async def save(qmp: str, out: Path, minimal: bool, db: str | None, name: str | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    async with await AttachedVm.attach(qmp) as vm:
        await vm.qmp.stop()
        try:
            await vm.refresh_vcpus()
            boot = await vm.boot_profile()
            files = {r.path for r in vm.layout}
            if len(files) != 1:
                raise SystemExit("recording supports one memory-backend file per VM")
            src = files.pop()
            size = os.stat(src).st_size
            if minimal:
                from scanner.examine import load_profiles
                from store import Store

                async with Store.open(db) as st:
                    profiles = await load_profiles(st)
                lk = locate_kernel(vm.mem, vm.walker(), vm.vcpus, profiles, vm=vm.name)
                gpas: list[tuple[int, int]] = []
                for r in lk.regions.values():
                    gpas.extend(r.runs)
                    gpas.extend((t, PAGE) for t in r.translation.tables)
                notes = lk.profile.sections.get(".notes")
                if notes is not None:
                    t = vm.walker().translate_range(notes.addr + lk.slide, notes.size)
                    gpas.extend(t.gpa_runs())
                    gpas.extend((x, PAGE) for x in t.tables)
                for v in vm.vcpus:
                    for pgd in kernel_pgd_candidates(v.cr3):
                        gpas.append((pgd, PAGE))
                ranges = []
                for gpa, n in gpas:
                    try:
                        ranges.append((vm.mem.host_range(gpa, n)[1], n))
                    except TranslationError:
                        continue
                copied = _copy_ranges(src, out / "mem", size, ranges)
            else:
                shutil.copyfile(src, out / "mem")
                copied = size
            layout = [{"gpa": r.gpa, "size": r.size, "file": "mem", "offset": r.offset}
                      for r in vm.layout]
            write_replay(out, name or vm.name, layout, vm.vcpus, boot)
        finally:
            await vm.qmp.cont()
    return {"dir": str(out), "copied": copied}


def clone(src: Path, prefix: str, count: int, start: int = 0) -> list[Path]:
    """Copies of a recording (distinct files, so distinct memory), renamed."""
    doc = orjson.loads((src / "vm.json").read_bytes())
    out = []
    for i in range(start, start + count):
        d = Path(f"{prefix}{i}")
        d.mkdir(parents=True, exist_ok=True)
        _sparse_copy(src / "mem", d / "mem")
        doc["name"] = d.name
        (d / "vm.json").write_bytes(orjson.dumps(doc))
        out.append(d)
    return out


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy only the data extents (SEEK_DATA/SEEK_HOLE); holes stay holes."""
    size = src.stat().st_size
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        fd = fi.fileno()
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            fi.seek(data)
            fo.seek(data)
            left = hole - data
            while left:
                buf = fi.read(min(CHUNK, left))
                fo.write(buf)
                left -= len(buf)
            pos = hole


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.record", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="record a running guest")
    s.add_argument("--qmp", required=True)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--name")
    s.add_argument("--minimal", action="store_true",
                   help="copy only what kscan reads (needs --db with the kernel's profile)")
    s.add_argument("--db")
    c = sub.add_parser("clone", help="copy a recording N times")
    c.add_argument("src", type=Path)
    c.add_argument("prefix")
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--start", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "save":
        print(orjson.dumps(asyncio.run(save(args.qmp, args.out, args.minimal, args.db,
                                            args.name))).decode())
    else:
        for d in clone(args.src, args.prefix, args.count, args.start):
            print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())

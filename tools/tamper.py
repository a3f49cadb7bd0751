"""tools/tamper: write bytes into a running guest's kernel, as a rootkit would.

The test double for kernel tampering, and the demo's attacker. It finds the target
through the same reading path kscan uses (QMP layout + page walk), then writes through
the guest's memory-backend file on the host — the guest sees the change at once. A
libvirt domain (`--libvirt NAME`) is written wherever its RAM lives: its file, its
unlinked hugepage/memfd file (/proc/PID/fd/N), or its anonymous memory (/proc/PID/mem).

    python -m tools.tamper --qmp SOCK --region .text --offset 0x123456 --bytes cc
    python -m tools.tamper --qmp SOCK --va 0xffffffff9a000000 --bytes 90909090
    python -m tools.tamper --qmp SOCK --idt-gate 20 --handler 0xffff888012345678

Region offsets need the kernel's profile (`--db` with a `kscan profile add`-ed kernel,
or `--kernel PATH` to read the image directly) to find the KASLR slide. Prints one JSON
line describing the write, including the old bytes (so a test can restore them).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import mmap
import os
import struct
import sys
from typing import Any

import orjson

from kscan.errors import KscanError
from scanner.check.locate import LiveKernel, locate_kernel
from scanner.image.kernel_profile import KernelProfile, profile_from_path
from scanner.vm import AttachedVm


async def _profiles(args: argparse.Namespace) -> list[KernelProfile]:
    if args.kernel:
        return [profile_from_path(args.kernel)]
    from scanner.examine import load_profiles
    from store import Store

    async with Store.open(args.db) as st:
        return await load_profiles(st)


def write_guest(vm: AttachedVm, va: int, data: bytes) -> dict[str, Any]:
    """Write `data` at guest-virtual `va` through the backend file(s); return a record."""
    t = vm.walker(0).translate_range(va, len(data))
    old = b""
    pieces = []
    done = 0
    for gpa, n in t.gpa_runs():
        path, off = vm.mem.host_range(gpa, n)
        old += bytes(vm.mem.view(gpa, n))
        _write_host(path, off, data[done:done + n])
        pieces.append({"gpa": gpa, "size": n, "file": path, "offset": off})
        done += n
    return {"va": va, "old": old.hex(), "new": data.hex(), "writes": pieces}


def _write_host(path: str, off: int, data: bytes) -> None:
    """Write where guest RAM lives: a backend file, an unlinked one (/proc/PID/fd/N) or
    the QEMU process's memory (/proc/PID/mem at the host address). hugetlbfs files take
    no write(2): those are written through a shared mapping."""
    fd = os.open(path, os.O_RDWR if not path.endswith("/mem") else os.O_WRONLY)
    try:
        try:
            os.pwrite(fd, data, off)
            return
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
        align = 2 << 20  # a hugetlbfs mapping starts on a huge page
        base = off - off % align
        length = off - base + len(data)
        with mmap.mmap(fd, length, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base) as mm:
            mm[off - base:off - base + len(data)] = data
    finally:
        os.close(fd)


async def attach(args: argparse.Namespace) -> AttachedVm:
    if getattr(args, "libvirt", None):
        from scanner.vm.domain import attach_domain

        return await attach_domain(args.libvirt, args.connect)
    return await AttachedVm.attach(args.qmp)


async def tamper(args: argparse.Namespace) -> dict[str, Any]:
    async with await attach(args) as vm:
        lk: LiveKernel | None = None
        if args.region or args.idt_gate is not None:
            lk = locate_kernel(vm.mem, vm.walker(0), vm.vcpus, await _profiles(args),
                               vm=vm.name)
        if args.idt_gate is not None:
            assert lk is not None
            if not 0 <= args.idt_gate < 256:
                raise SystemExit("--idt-gate must be 0..255")
            h = args.handler & (2**64 - 1)
            gate_va = lk.regions["idt"].va + 16 * args.idt_gate
            data = struct.pack("<H", h & 0xFFFF)
            rec = write_guest(vm, gate_va, data)
            rec |= write_guest(vm, gate_va + 6, struct.pack("<HI", (h >> 16) & 0xFFFF,
                                                               h >> 32))
            rec["va"] = gate_va
            rec["region"], rec["offset"] = "idt", 16 * args.idt_gate
        elif args.region:
            assert lk is not None
            region = lk.regions.get(args.region)
            if region is None:
                raise SystemExit(f"unknown region {args.region}: one of {list(lk.regions)}")
            if not 0 <= args.offset < region.size:
                raise SystemExit(f"offset {args.offset:#x} outside {args.region} "
                                 f"(size {region.size:#x})")
            rec = write_guest(vm, region.va + args.offset, args.bytes)
            rec["region"], rec["offset"] = args.region, args.offset
        else:
            rec = write_guest(vm, args.va, args.bytes)
        rec["vm"] = vm.name
        if lk is not None:
            rec["slide"] = lk.slide
        return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.tamper", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--qmp", metavar="SOCK")
    target.add_argument("--libvirt", metavar="DOMAIN", help="a libvirt domain")
    ap.add_argument("--connect", default="qemu:///system", help="libvirt URI")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--region", choices=[".text", ".rodata", "__ex_table", "idt"])
    where.add_argument("--va", type=lambda s: int(s, 0))
    where.add_argument("--idt-gate", type=int, metavar="VECTOR",
                       help="rewrite this gate's handler (with --handler)")
    ap.add_argument("--offset", type=lambda s: int(s, 0), default=0,
                    help="byte offset within --region")
    ap.add_argument("--bytes", type=bytes.fromhex, help="hex bytes to write")
    ap.add_argument("--handler", type=lambda s: int(s, 0), help="new handler for --idt-gate")
    ap.add_argument("--db", default=None, help="kscan database with the kernel's profile")
    ap.add_argument("--kernel", default=None, help="or: the kernel image itself")
    args = ap.parse_args(argv)
    if args.idt_gate is not None and args.handler is None:
        ap.error("--idt-gate needs --handler")
    if args.idt_gate is None and not args.bytes:
        ap.error("--bytes is required")
    try:
        rec = asyncio.run(tamper(args))
    except KscanError as err:
        print(f"tamper: {err}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(orjson.dumps(rec) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Diff two (or more) VMs' normalized protected regions page by page, whatever their
boot profiles — a measuring tool, not a verifier.

`kscan check` refuses to compare VMs of different boot profiles (vCPU count, CPU model):
this tool forces the comparison, to measure what such a difference changes. Each VM is
read exactly as `kscan check` reads it (`scanner.commands.oneshot.examine`: KASLR undone, IDT
handlers moved back by the slide); every differing byte range of each later VM against
the first is listed, named from the kernel image:

* `smp_lock`        — a `.smp_locks` site (lock prefix 0xf0 vs 0x3e `ds`),
* `runtime_const:N` — inside the immediate of a `runtime_ptr_N`/`runtime_shift_N` site,
* `other`           — anything else,

with the instruction around it (capstone, when installed) and the symbol (when a
System.map with symbols is given).

    python -m tools.regiondiff --db DB --image VMLINUZ [--system-map MAP] [--json] \\
        SOCK_BASE SOCK_OTHER [SOCK_OTHER...]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from scanner.check.locate import REGIONS
from scanner.examine import Examined, examine, load_profiles
from scanner.image.vmlinux import KernelImage, load_kernel_image
from scanner.vm import open_vm
from store import Store

PAGE = 4096


@dataclass
class ImageSites:
    """Self-patching sites read from the kernel image (link-time addresses)."""

    smp_locks: set[int] = field(default_factory=set)
    #: (immediate address, width, name)
    runtime_const: list[tuple[int, int, str]] = field(default_factory=list)
    symbols: list[tuple[int, str]] = field(default_factory=list)

    def symbolize(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.symbols, (addr, "\U0010ffff")) - 1
        if i < 0:
            return None
        a, name = self.symbols[i]
        return f"{name}+{addr - a:#x}"

    def symbol_start(self, addr: int) -> int | None:
        i = bisect.bisect_right(self.symbols, (addr, "\U0010ffff")) - 1
        return self.symbols[i][0] if i >= 0 else None


def _rel32_table(image: KernelImage, name: str) -> list[int]:
    """A table of s32 entries, each relative to its own address (`.smp_locks`,
    `runtime_*`): the absolute link-time addresses they point at."""
    sec = image.sections[name]
    data = image.section_bytes(name)
    return [sec.addr + 4 * i + v for i, (v,) in enumerate(struct.iter_unpack("<i", data))]


def image_sites(image: KernelImage) -> ImageSites:
    out = ImageSites()
    if ".smp_locks" in image.sections:
        out.smp_locks = set(_rel32_table(image, ".smp_locks"))
    for name in image.sections:
        # runtime-const.h: `.long 1b - 8 - .` (ptr: imm64) / `.long 1b - 1 - .` (shift: imm8)
        for prefix, width in (("runtime_ptr_", 8), ("runtime_shift_", 1)):
            if name.startswith(prefix):
                out.runtime_const += [(a, width, name) for a in _rel32_table(image, name)]
    if image.symbols:
        out.symbols = sorted((a, n) for n, a in image.symbols.items())
    return out


def byte_ranges(a: bytes | bytearray, b: bytes | bytearray) -> list[tuple[int, int]]:
    """[start, end) runs of differing bytes."""
    out: list[tuple[int, int]] = []
    n = min(len(a), len(b))
    i = 0
    while i < n:
        if a[i] != b[i]:
            j = i
            while j < n and a[j] != b[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    if len(a) != len(b):
        out.append((n, max(len(a), len(b))))
    return out


def classify(link: int, end: int, before: bytes, after: bytes, sites: ImageSites) -> str:
    if end - link == 1 and link in sites.smp_locks and {before, after} == {b"\xf0", b"\x3e"}:
        return "smp_lock"
    for addr, width, name in sites.runtime_const:
        if addr <= link and end <= addr + width:
            return f"runtime_const:{name}"
    if any(link <= s < end for s in sites.smp_locks):
        return "overlaps smp_lock site"
    nops = {b"\x66\x90", b"\x0f\x1f\x44\x00\x00"}
    if (before in nops and after[:1] in (b"\xeb", b"\xe9")) or \
            (after in nops and before[:1] in (b"\xeb", b"\xe9")):
        return "jump_label-like (nop <-> jmp)"
    return "other"


def disassemble(buf: bytes | bytearray, off: int, end: int, link_base: int,
                start_hint: int | None) -> list[str]:
    """The instructions covering buf[off:end] (offsets in a region linked at link_base),
    decoded from the enclosing symbol's start when known, else by a linear sweep from 64
    bytes before (usually self-synchronizing; marked approximate)."""
    try:
        import capstone  # type: ignore[import-untyped]
    except ImportError:
        return ["(capstone not installed)"]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    approx = start_hint is None or not (0 <= start_hint - link_base <= off) \
        or off - (start_hint - link_base) > 1 << 16
    start = max(0, off - 64) if approx else start_hint - link_base  # type: ignore[operator]
    out = []
    for ins in md.disasm(bytes(buf[start:end + 16]), link_base + start):
        o = ins.address - link_base
        if o + ins.size <= off:
            continue
        if o >= end:
            break
        out.append(f"{ins.address:#x}: {ins.bytes.hex()}  {ins.mnemonic} {ins.op_str}"
                   + ("  (approx)" if approx else ""))
    return out


def diff_examined(base: Examined, other: Examined, sites: ImageSites,
                  disasm: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"vm": other.vm, "base": base.vm, "boot_profile": other.boot.key,
                           "base_boot_profile": base.boot.key, "regions": {}}
    for region in REGIONS:
        a, b = base.normalized[region], other.normalized[region]
        link0 = base.lk.profile.section(region).addr if region != "idt" else 0
        pages: dict[int, list[dict[str, Any]]] = {}
        for s, e in byte_ranges(a, b):
            before, after = bytes(a[s:e]), bytes(b[s:e])
            rec: dict[str, Any] = {"start": s % PAGE, "end": s % PAGE + (e - s),
                                   "before": before.hex(), "after": after.hex()}
            if region != "idt":
                rec["link"] = link0 + s
                rec["kind"] = classify(link0 + s, link0 + e, before, after, sites)
                rec["symbol"] = sites.symbolize(link0 + s)
                if disasm and region == ".text":
                    rec["insn_base"] = disassemble(a, s, e, link0,
                                                   sites.symbol_start(link0 + s))
                    rec["insn_other"] = disassemble(b, s, e, link0,
                                                    sites.symbol_start(link0 + s))
            else:
                rec["kind"] = f"idt gate {s // 16}"
            pages.setdefault(s // PAGE, []).append(rec)
        kinds: dict[str, int] = {}
        for recs in pages.values():
            for r in recs:
                kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        out["regions"][region] = {
            "pages": len(pages), "bytes": sum(r["end"] - r["start"] for v in pages.values()
                                              for r in v),
            "kinds": kinds, "diffs": {str(p): v for p, v in sorted(pages.items())}}
    return out


async def _examine_all(db: str | None, sockets: Sequence[str]) -> list[Examined]:
    async with Store.open(db) as st:
        profiles = await load_profiles(st)
    out = []
    for sock in sockets:
        async with await open_vm(sock) as vm:
            out.append(await examine(vm, profiles))
    return out


def print_text(d: dict[str, Any], per_boot: set[int] | None = None) -> None:
    print(f"== {d['vm']} ({d['boot_profile']}) vs {d['base']} ({d['base_boot_profile']})")
    for region, r in d["regions"].items():
        print(f"  {region:11s} {r['pages']:5d} pages differ, {r['bytes']:7d} bytes  "
              f"{r['kinds']}")
        if region == ".rodata" and r["pages"] > 20:
            print(f"    pages: {sorted(int(p) for p in r['diffs'])}")
            continue
        for p, recs in r["diffs"].items():
            for x in recs[:40]:
                print(f"    page {p:>5} +{x['start']:#05x}..{x['end']:#05x} "
                      f"{x['before'][:32]} -> {x['after'][:32]}  {x['kind']}"
                      + (f"  link {x['link']:#x}" if "link" in x else "")
                      + (f"  <{x['symbol']}>" if x.get("symbol") else ""))
                for ins in x.get("insn_base", []):
                    print(f"        base : {ins}")
                for ins in x.get("insn_other", []):
                    print(f"        other: {ins}")
            if len(recs) > 40:
                print(f"    page {p:>5} ... {len(recs) - 40} more ranges")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.regiondiff", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", help="kscan database with the kernel's profile")
    ap.add_argument("--image", required=True, help="the guests' vmlinuz (or vmlinux)")
    ap.add_argument("--system-map", help="a System.map with symbols, to name sites")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-disasm", action="store_true")
    ap.add_argument("sockets", nargs="+", help="QMP sockets: the base VM first")
    args = ap.parse_args(argv)
    if len(args.sockets) < 2:
        ap.error("need a base VM and at least one other")
    image = load_kernel_image(args.image, system_map=args.system_map)
    sites = image_sites(image)
    exs = asyncio.run(_examine_all(args.db, args.sockets))
    results = [diff_examined(exs[0], ex, sites, not args.no_disasm) for ex in exs[1:]]
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        for d in results:
            print_text(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())

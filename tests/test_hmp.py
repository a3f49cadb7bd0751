"""Parsers for HMP text: `info registers -a` and `info mtree -f`, in their variants."""

from __future__ import annotations

import re

import pytest

from scanner.qemu.hmp import ParseError, parse_flatview, parse_registers
from scanner.qemu.qmp import Memdev, layout_from_flatview

CPU = """CPU#{n}
RAX=000000000001ad40 RBX=0000000000000000 RCX=0000000000000000 RDX=4000000000000000
RIP=ffffffffafe17a0b RFL=00000246 [---Z-P-] CPL={cpl} II=0 A20=1 SMM=0 HLT=1
GDT=     fffffe0000001000 0000007f
IDT=     {idt:016x} 00000fff
CR0=80050033 CR2=00000000005794a9 CR3={cr3:016x} CR4=000006b0
EFER=0000000000000d01
"""


def test_registers_all_cpus() -> None:
    text = "".join(CPU.format(n=i, cpl=i % 4 and 3, idt=0xFFFFFE0000000000 + i, cr3=0x26C6000
                              + 0x2000 * i) for i in range(3))
    cpus = parse_registers(text)
    assert [c.index for c in cpus] == [0, 1, 2]
    assert cpus[1].cr3 == 0x26C8000 and cpus[2].idtr_base == 0xFFFFFE0000000002
    assert cpus[0].idtr_limit == 0xFFF and cpus[0].gdtr_limit == 0x7F
    assert cpus[0].cr0 == 0x80050033 and cpus[0].efer == 0xD01 and cpus[0].halted
    assert cpus[1].cpl == 3 and cpus[0].cpl == 0


def test_registers_in_real_mode() -> None:
    text = CPU.format(n=0, cpl=0, idt=0, cr3=0).replace("RIP=ffffffffafe17a0b", "EIP=0000fff0")
    text = text.replace("CR0=80050033", "CR0=60000010").replace("EFER=0000000000000d01\n", "")
    cpu = parse_registers(text)[0]
    assert (cpu.rip, cpu.cr0, cpu.efer) == (0xFFF0, 0x60000010, 0)


def test_registers_single_cpu_without_header() -> None:
    one = CPU.format(n=0, cpl=0, idt=0xFFFFFE0000000000, cr3=0x1000).split("\n", 1)[1]
    assert parse_registers(one)[0].cr3 == 0x1000


@pytest.mark.parametrize("drop", ["CR3=", "IDT=", "RIP="])
def test_registers_missing_field(drop: str) -> None:
    text = re.sub(drop + r"\s*[0-9a-f]+", "", CPU.format(n=0, cpl=0, idt=0, cr3=0))
    with pytest.raises(ParseError, match=drop.rstrip("=")):
        parse_registers(text)


FLAT = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #3
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): ram0
  00000000000c3000-00000000000e7fff (prio 0, rom): ram0 @00000000000c3000
  00000000000e8000-000000007fffffff (prio 0, ram): ram0 @00000000000e8000 KVM
  00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio
  0000000100000000-000000017fffffff (ram): ram0 @0000000080000000
"""


def test_flatview_variants_and_layout() -> None:
    ranges = parse_flatview(FLAT)
    assert [r.name for r in ranges] == ["ram0", "ram0", "ram0", "pcie-mmcfg-mmio", "ram0"]
    assert ranges[4].offset == 0x80000000 and ranges[4].kind == "ram"
    dev = Memdev("ram0", 4 << 30, "/dev/shm/x", True, 0)
    layout = layout_from_flatview(ranges, {"ram0": dev})
    # The three low pieces continue each other in GPA and file offset: one range.
    assert [(r.gpa, r.size, r.offset) for r in layout] == [
        (0, 0x80000000, 0), (0x100000000, 0x80000000, 0x80000000)]


def test_flatview_errors() -> None:
    with pytest.raises(ParseError, match="FlatView"):
        parse_flatview("garbage")
    with pytest.raises(ParseError, match="address space"):
        parse_flatview(FLAT.replace('AS "memory"', 'AS "other"'))

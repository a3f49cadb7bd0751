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


# -- the fast parser against the regex grammar it replaced -------------------------------
# `parse_registers` finds each key with str.find (it runs at every fast pass of a live
# VM); the regex form below is the grammar it must keep: same values, same refusals.
_O_HDR = re.compile(r"^CPU#(\d{1,5})\s*$", re.M)
_O_HEX = r"([0-9a-fA-F]{1,16})\b"
_O_REG = {k: re.compile(r"\b" + k.upper() + "=" + _O_HEX) for k in ("cr0", "cr3", "cr4")}
_O_EFER = re.compile(r"\bEFER=" + _O_HEX)
_O_IP = re.compile(r"\b[RE]IP=" + _O_HEX)
_O_TABLE = {k: re.compile(r"^" + k.upper() + r"=\s*" + _O_HEX + r"\s+" + _O_HEX, re.M)
            for k in ("idt", "gdt")}
_O_CPL = re.compile(r"\bCPL=(\d)")
_O_HLT = re.compile(r"\bHLT=(\d)")


def _oracle(text: str) -> list[tuple[int, ...]] | None:
    """The regex parser's result as tuples (None: it refused the text)."""
    heads = list(_O_HDR.finditer(text))
    blocks = ([(int(h.group(1)), text[h.end(): heads[i + 1].start() if i + 1 < len(heads)
                                        else None]) for i, h in enumerate(heads)]
              if heads else [(0, text)])
    out = []
    for idx, block in blocks:
        ms = [rx.search(block) for rx in (*_O_REG.values(), _O_IP, *_O_TABLE.values())]
        if not all(ms):
            return None
        cr0, cr3, cr4, ip, idt, gdt = ms
        efer, cpl, hlt = _O_EFER.search(block), _O_CPL.search(block), _O_HLT.search(block)
        out.append((idx, *(int(m.group(1), 16) for m in (cr0, cr3, cr4, ip) if m),
                    int(efer.group(1), 16) if efer else 0,
                    *(int(g, 16) for m in (idt, gdt) if m for g in m.groups()),
                    int(cpl.group(1)) if cpl else 0, bool(hlt and hlt.group(1) == "1")))
    return out


def _fast(text: str) -> list[tuple[int, ...]] | None:
    try:
        cpus = parse_registers(text)
    except ParseError:
        return None
    return [(c.index, c.cr0, c.cr3, c.cr4, c.rip, c.efer, c.idtr_base, c.idtr_limit,
             c.gdtr_base, c.gdtr_limit, c.cpl, c.halted) for c in cpus]


REAL_TAIL = """ES =0000 0000000000000000 00000000 00000000
TR =0040 fffffe0000003000 00004087 00008900 DPL=0 TSS64-avl
DR6=00000000ffff0ff0 DR7=0000000000000400
FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80
XMM00=0000000000000000 0000000000000000 XMM01=0000000000000000 4014000000000000
"""
# What a mutation inserts: the keys, their look-alikes, separators, digits, word
# characters beyond ASCII (both grammars use Unicode word boundaries).
PIECES = ["CR0=", "XCR0=", "CR3=", "CR4=", "EFER=", "RIP=", "EIP=", "xRIP=", "IDT=", "GDT=",
          "CPL=", "HLT=", "CPU#", "CPU#1", "\n", " ", "\t", "=", "0", "1", "f", "F", "g",
          "_", "é", "٣", "0123456789abcdef0", "ffffffff81000000", "\nIDT= 1 2",
          "\nCPU#7\n", "CPU#123456\n"]


@pytest.mark.parametrize("text", [
    CPU.format(n=0, cpl=0, idt=0xFFFFFE0000000000, cr3=0x1000) + REAL_TAIL,
    "".join(CPU.format(n=i, cpl=3, idt=i, cr3=i) + REAL_TAIL for i in range(4)),
])
def test_registers_fast_parser_matches_the_regex_grammar(text: str) -> None:
    assert _fast(text) == _oracle(text) is not None


def test_registers_fast_parser_matches_under_mutation() -> None:
    """Hostile shapes: keys without values, values too long, look-alike keys before the
    real ones, keys glued to words, headers that are not headers — the fast parser takes
    the same value or refuses the same text as the regex grammar."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = "".join(CPU.format(n=i, cpl=i, idt=0xFFFFFE0000000000 + i, cr3=0x2000 * i)
                   + REAL_TAIL for i in range(2))
    edits = st.lists(st.tuples(st.integers(0, len(base)), st.integers(0, 12),
                               st.lists(st.sampled_from(PIECES), max_size=4)), max_size=6)

    @settings(max_examples=600, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(edits)
    def check(ops: list[tuple[int, int, list[str]]]) -> None:
        text = base
        for at, cut, ins in ops:
            at = min(at, len(text))
            text = text[:at] + "".join(ins) + text[at + cut:]
        assert _fast(text) == _oracle(text)

    check()

"""Parsers for the HMP text QEMU returns through QMP's `human-monitor-command`.

Two commands carry what QMP has no structured command for:

* `info registers -a`: per vCPU CR0/CR3/CR4/EFER, IDTR and GDTR (base, limit);
* `info mtree -f`: the flat view of the guest-physical address space, which tells at
  which offset of which memory backend each GPA range of RAM lives.

The text is QEMU's (host side) but the register values in it are the guest's: parse
tolerantly (formats vary across QEMU versions), bound the work, and never trust a
value beyond its type. Line format of the flat view (system/memory.c,
mtree_print_flatview): `  START-END (prio P, TYPE): NAME [@OFFSET] [...]` where
`@OFFSET` is omitted when 0, `prio P, ` may be absent in newer QEMU and a KVM build
may append the accelerator name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from translate.vcpu import VcpuState  # re-exported: its home is hypervisor-neutral

__all__ = ["FlatRange", "VcpuState", "parse_flatview", "parse_registers"]

#: More vCPUs than QEMU supports on x86 (4096 with x2APIC) means the text is garbage.
MAX_VCPUS = 4096
MAX_LINES = 200_000

# Every number is bounded in digits (a 64-bit register is 16 hex digits, a vCPU index at
# most 4 decimal ones): a peer sending thousands of digits must not reach int(), whose
# cost grows with them (and which refuses more than 4300 decimal digits). A longer
# number does not match, so its line reads as missing.
#
# `info registers -a` is parsed at every fast pass of a live VM, once per vCPU block of
# ~2 KB. Nine regex searches over each block cost ~115 us per vCPU (as much as a sixth of
# the hashing a pass does); each key is instead found with `str.find` and its value
# matched right there, ~12 us per vCPU. The grammar is unchanged: `KEY=` must start a
# word (`\bKEY=`), `IDT=`/`GDT=` a line, and the value is what the regex took
# (tests/test_hmp.py holds the regex form as the oracle both must agree with).
_HDR_TAIL = re.compile(r"(\d{1,5})\s*$", re.M)  # after `CPU#` at the start of a line
_HEX_AT = re.compile(r"[0-9a-fA-F]{1,16}\b")
_TABLE_AT = re.compile(r"\s*([0-9a-fA-F]{1,16})\b\s+([0-9a-fA-F]{1,16})\b")
_DIGIT_AT = re.compile(r"\d")


class ParseError(ValueError):
    """The HMP text does not have the expected shape (QmpError wraps it)."""


def _starts_word(text: str, i: int) -> bool:
    """Whether `\\b` holds before text[i] (a word character there)."""
    if i == 0:
        return True
    c = text[i - 1]
    return not (c.isalnum() or c == "_")


def _find(block: str, key: str, value: re.Pattern[str], line: bool = False
          ) -> tuple[int, re.Match[str] | None]:
    """(position, match of `value` right after `key`) at the first `key` that starts a
    word (`line`: a line) and is followed by a `value`; (-1, None) if there is none."""
    i = block.find(key)
    while i >= 0:
        starts = (i == 0 or block[i - 1] == "\n") if line else _starts_word(block, i)
        if starts:
            m = value.match(block, i + len(key))
            if m:
                return i, m
        i = block.find(key, i + 1)
    return -1, None


def _hex(block: str, key: str, cpu: int, required: bool = True) -> int:
    m = _find(block, key + "=", _HEX_AT)[1]
    if m is None:
        if required:
            raise ParseError(f"vCPU {cpu}: no {key} in 'info registers' output")
        return 0
    return int(m.group(), 16) & 0xFFFF_FFFF_FFFF_FFFF


def _ip(block: str, cpu: int) -> int:
    """RIP in long mode; EIP when the vCPU is in 16/32-bit mode (firmware, early boot):
    whichever comes first."""
    found = [f for f in (_find(block, "RIP=", _HEX_AT), _find(block, "EIP=", _HEX_AT))
             if f[1] is not None]
    if not found:
        raise ParseError(f"vCPU {cpu}: no RIP/EIP in 'info registers' output")
    m = min(found, key=lambda f: f[0])[1]
    assert m is not None
    return int(m.group(), 16) & 0xFFFF_FFFF_FFFF_FFFF


def _table(block: str, key: str, cpu: int) -> tuple[int, int]:
    m = _find(block, key + "=", _TABLE_AT, line=True)[1]
    if m is None:
        raise ParseError(f"vCPU {cpu}: no {key}R in 'info registers' output")
    return int(m.group(1), 16) & 0xFFFF_FFFF_FFFF_FFFF, int(m.group(2), 16) & 0xFFFF_FFFF


def _digit(block: str, key: str) -> str | None:
    m = _find(block, key + "=", _DIGIT_AT)[1]
    return m.group() if m else None


def _blocks(text: str) -> list[tuple[int, str]]:
    """(vCPU index, its text) per `CPU#N` header line; the whole text as vCPU 0 if there
    is none (a single CPU's `info registers`)."""
    heads: list[tuple[int, int, int]] = []  # (index, header start, block start)
    i = text.find("CPU#")
    while i >= 0:
        m = _HDR_TAIL.match(text, i + 4) if i == 0 or text[i - 1] == "\n" else None
        if m is None:
            i = text.find("CPU#", i + 1)
            continue
        heads.append((int(m.group(1)), i, m.end()))
        if len(heads) > MAX_VCPUS:
            raise ParseError(f"more than {MAX_VCPUS} vCPUs is more than QEMU supports")
        i = text.find("CPU#", m.end())
    if not heads:
        return [(0, text)]
    return [(idx, text[begin: heads[n + 1][1] if n + 1 < len(heads) else None])
            for n, (idx, _, begin) in enumerate(heads)]


def parse_registers(text: str) -> list[VcpuState]:
    """Parse `info registers -a` (or a single CPU's `info registers`)."""
    if text.count("\n") > MAX_LINES:
        raise ParseError("'info registers' output is implausibly long")
    out = []
    for idx, block in _blocks(text):
        cr0, cr3, cr4 = (_hex(block, key, idx) for key in ("CR0", "CR3", "CR4"))
        # Before long mode some QEMU versions print no EFER; it is 0 then.
        efer = _hex(block, "EFER", idx, required=False)
        rip = _ip(block, idx)
        idt, gdt = _table(block, "IDT", idx), _table(block, "GDT", idx)
        cpl = _digit(block, "CPL")
        out.append(VcpuState(
            index=idx, cr0=cr0, cr3=cr3, cr4=cr4, efer=efer,
            idtr_base=idt[0], idtr_limit=idt[1], gdtr_base=gdt[0], gdtr_limit=gdt[1],
            rip=rip, cpl=int(cpl) if cpl else 0, halted=_digit(block, "HLT") == "1",
        ))
    return out


@dataclass(frozen=True)
class FlatRange:
    """One line of a flat view: [start, end] (inclusive, as printed) of region `name`,
    starting at `offset` within that region."""

    start: int
    end: int
    kind: str
    name: str
    offset: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1


_FLAT_LINE = re.compile(
    r"^\s*([0-9a-fA-F]{1,16})-([0-9a-fA-F]{1,16})\s+\((?:prio\s+-?\d{1,10},\s*)?"
    r"([^)]{0,200})\):\s+(\S{1,200})(?:\s+@([0-9a-fA-F]{1,16})\b)?"
)
_FLATVIEW = re.compile(r"^FlatView #\d+", re.M)


def parse_flatview(text: str, address_space: str = "memory") -> list[FlatRange]:
    """The ranges of the flat view that serves `address_space` (the CPU's system memory)."""
    if text.count("\n") > MAX_LINES:
        raise ParseError("'info mtree -f' output is implausibly long")
    starts = [m.start() for m in _FLATVIEW.finditer(text)]
    if not starts:
        raise ParseError("no 'FlatView' in 'info mtree -f' output")
    want = f'AS "{address_space}"'
    for i, s in enumerate(starts):
        block = text[s: starts[i + 1] if i + 1 < len(starts) else None]
        if want not in block:
            continue
        out = []
        for line in block.splitlines():
            m = _FLAT_LINE.match(line)
            if not m:
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if end < start or (m.group(5) and int(m.group(5), 16) + end - start >= 1 << 64):
                raise ParseError(f"flat view range {start:#x}-{end:#x} ends before it starts "
                                 "or its offset wraps past 2^64")
            out.append(FlatRange(start, end, m.group(3).strip(), m.group(4),
                                 int(m.group(5), 16) if m.group(5) else 0))
        return out
    raise ParseError(f"no flat view for address space {address_space!r}")

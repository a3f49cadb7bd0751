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
_CPU_HDR = re.compile(r"^CPU#(\d{1,5})\s*$", re.M)
_HEX = r"([0-9a-fA-F]{1,16})\b"
_REG = {
    "cr0": re.compile(r"\bCR0=" + _HEX),
    "cr2": re.compile(r"\bCR2=" + _HEX),
    "cr3": re.compile(r"\bCR3=" + _HEX),
    "cr4": re.compile(r"\bCR4=" + _HEX),
    "efer": re.compile(r"\bEFER=" + _HEX),
}
#: RIP in long mode; EIP when the vCPU is in 16/32-bit mode (firmware, early boot).
_IP = re.compile(r"\b[RE]IP=" + _HEX)
_TABLE = {
    "idt": re.compile(r"^IDT=\s*" + _HEX + r"\s+" + _HEX, re.M),
    "gdt": re.compile(r"^GDT=\s*" + _HEX + r"\s+" + _HEX, re.M),
}
_CPL = re.compile(r"\bCPL=(\d)")
_HLT = re.compile(r"\bHLT=(\d)")


class ParseError(ValueError):
    """The HMP text does not have the expected shape (QmpError wraps it)."""


def _hex(rx: re.Pattern[str], text: str, what: str, cpu: int) -> int:
    m = rx.search(text)
    if not m:
        raise ParseError(f"vCPU {cpu}: no {what} in 'info registers' output")
    return int(m.group(1), 16) & 0xFFFF_FFFF_FFFF_FFFF


def parse_registers(text: str) -> list[VcpuState]:
    """Parse `info registers -a` (or a single CPU's `info registers`)."""
    if text.count("\n") > MAX_LINES:
        raise ParseError("'info registers' output is implausibly long")
    heads = list(_CPU_HDR.finditer(text))
    if len(heads) > MAX_VCPUS:
        raise ParseError(f"{len(heads)} vCPUs is more than QEMU supports")
    if heads:
        blocks = [
            (int(h.group(1)), text[h.end(): heads[i + 1].start() if i + 1 < len(heads) else None])
            for i, h in enumerate(heads)
        ]
    else:
        blocks = [(0, text)]
    out = []
    for idx, block in blocks:
        regs = {name: _hex(rx, block, name.upper(), idx) for name, rx in _REG.items()
                if name not in ("cr2", "efer")}
        # Before long mode some QEMU versions print no EFER; it is 0 then.
        efer = _REG["efer"].search(block)
        regs["efer"] = int(efer.group(1), 16) if efer else 0
        regs["rip"] = _hex(_IP, block, "RIP/EIP", idx)
        tables = {}
        for name, rx in _TABLE.items():
            m = rx.search(block)
            if not m:
                raise ParseError(f"vCPU {idx}: no {name.upper()}R in 'info registers' output")
            tables[name] = (int(m.group(1), 16) & 0xFFFF_FFFF_FFFF_FFFF,
                            int(m.group(2), 16) & 0xFFFF_FFFF)
        cpl = _CPL.search(block)
        hlt = _HLT.search(block)
        out.append(VcpuState(
            index=idx, cr0=regs["cr0"], cr3=regs["cr3"], cr4=regs["cr4"], efer=regs["efer"],
            idtr_base=tables["idt"][0], idtr_limit=tables["idt"][1],
            gdtr_base=tables["gdt"][0], gdtr_limit=tables["gdt"][1],
            rip=regs["rip"], cpl=int(cpl.group(1)) if cpl else 0,
            halted=bool(hlt and hlt.group(1) == "1"),
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

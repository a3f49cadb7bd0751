"""Changed pointer-table words, named by table and index, their new value by owner (pure).

A changed `.rodata` word is named by the kernel data symbol that contains it (kallsyms
with CONFIG_KALLSYMS_ALL: `sys_call_table`, `ia32_sys_call_table`, ops tables...) as
`table[index]` (8-byte words from the symbol's start); a changed IDT gate as
`idt[0xNN]`. Its old value (the baseline's, link-time: baselines are KASLR-normalized)
is symbolized in the kernel image; its new value (read from guest memory now) is named
by owner through `scanner.check.owners.OwnerLookup`: a kernel function, a listed
module, a BPF program, or "unowned memory".

On 6.1 and 6.12 `sys_call_table` is still in `.rodata` (6.1.90+ and 6.9+ dispatch
through the `x64_sys_call` switch instead, so an entry written there no longer takes
effect — it is still a change to read-only data, and still named).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kscan.addresses import hex_addr, hex_or_none
from scanner.check.classify import ByteRange
from scanner.check.owners import OwnerLookup
from scanner.check.patching import ReadVA

__all__ = ["MAX_WORDS", "PointerChange", "idt_changes", "rodata_changes"]

#: Words named per page (a rewritten page is not a list of pointers).
MAX_WORDS = 16
GATE = 16


@dataclass(frozen=True)
class PointerChange:
    label: str           # sys_call_table[110], idt[0x80], or the symbol+offset
    old: int | None      # link-time (baseline) value
    new: int             # run-time value now
    old_owner: str
    new_owner: str

    @property
    def message(self) -> str:
        return f"{self.label} = {self.old_owner} now points into {self.new_owner}"

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "old": hex_or_none(self.old), "new": hex_addr(self.new),
                "old_owner": self.old_owner, "new_owner": self.new_owner,
                "message": self.message}


def _word(buf: bytes, off: int) -> int | None:
    if off >= 0 and off + 8 <= len(buf):
        return int(struct.unpack_from("<Q", buf, off)[0])
    return None


def rodata_changes(owners: OwnerLookup, page_va: int, page_link: int,
                   before: bytes, ranges: Sequence[ByteRange], read_va: ReadVA
                   ) -> tuple[PointerChange, ...]:
    """Name the 8-byte words a `.rodata` page's changed ranges touch. `before` is the
    baseline page (link-time values), `page_va`/`page_link` its run-time/link-time
    address."""
    ks = owners.profile.kallsyms
    ro_start = owners.profile.section(".rodata").addr
    out: list[PointerChange] = []
    seen: set[int] = set()
    for r in ranges:
        for off in range(r.start & ~7, r.end, 8):
            if off in seen or len(out) >= MAX_WORDS:
                continue
            seen.add(off)
            raw = read_va(page_va + off, 8)
            if raw is None:
                continue
            new = int(struct.unpack("<Q", raw)[0])
            link = page_link + off
            label = f".rodata+{link - ro_start:#x}"
            if ks is not None:
                span = ks.size_of(link)
                # Only a symbol inside .rodata names the table (a profile stored by an
                # older kscan keeps text symbols only).
                if span is not None and span[0] >= ro_start:
                    i = ks.index_at_or_below(link)
                    label = f"{ks.names[i]}[{(link - span[0]) // 8}]"
            old = _word(before, off)
            old_owner = "?" if old is None else (
                owners.profile.symbolize(old) or (ks.symbolize(old) if ks else f"{old:#x}"))
            out.append(PointerChange(label, old, new, old_owner, owners.describe(new)))
    return tuple(out)


def gate_handler(gate: bytes) -> int:
    """The handler offset of a 16-byte x86-64 interrupt gate."""
    lo, _sel, _ist, _attr, mid, hi = struct.unpack_from("<HHBBHI", gate)
    return int(lo | mid << 16 | hi << 32)


def idt_changes(owners: OwnerLookup, idt_va: int, page: int, before: bytes,
                ranges: Sequence[ByteRange], read_va: ReadVA,
                slide: int) -> tuple[PointerChange, ...]:
    """Name the IDT gates a page's changed ranges touch, `idt[0xNN]`. The baseline IDT
    is normalized (slide subtracted from handlers), so its handlers are link-time."""
    out: list[PointerChange] = []
    vectors = sorted({(page * 4096 + off) // GATE for r in ranges
                      for off in range(r.start, r.end)})
    for vec in vectors[:MAX_WORDS]:
        if vec > 255:
            continue
        raw = read_va(idt_va + vec * GATE, GATE)
        if raw is None:
            continue
        new = gate_handler(raw)
        at = (vec * GATE) - page * 4096
        old = gate_handler(before[at:at + GATE]) if at >= 0 and at + GATE <= len(
            before) else None
        old_owner = "?" if old is None else (owners.profile.symbolize(old)
                                             or f"{old + slide:#x}")
        out.append(PointerChange(f"idt[{vec:#04x}]", old, new, old_owner,
                                 owners.describe(new)))
    return tuple(out)

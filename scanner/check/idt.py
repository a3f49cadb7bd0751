"""The Interrupt Descriptor Table: decode gates, check handlers, normalize for KASLR.

A 64-bit IDT gate is 16 bytes (Intel SDM vol. 3, 6.14.1):

    0-1 offset 15:0 | 2-3 selector | 4 IST (bits 0-2) | 5 type (0-3), DPL (5-6), P (7)
    6-7 offset 31:16 | 8-11 offset 63:32 | 12-15 reserved

The IDTR limit comes from the guest and can be anything: at most 256 gates are decoded,
and only those wholly inside the limit.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from scanner.image.early_idt import NUM_EXCEPTION_VECTORS, EarlyStubs

__all__ = ["Gate", "IdtCheck", "check_gates", "decode_idt", "normalize_idt"]

GATE_SIZE = 16
MAX_GATES = 256
INTERRUPT_GATE, TRAP_GATE = 0xE, 0xF
#: arch/x86/include/asm/segment.h: EARLY_IDT_HANDLER_SIZE is (9 + ENDBR_INSN_SIZE), so
#: 9 without CONFIG_X86_KERNEL_IBT (Debian 6.1) and 13 with it (Debian 6.12). Only
#: used when a profile predates `early_idt` (see `check_gates`); the exact stride and
#: array address of a build are read from its image by `find_early_stubs`.
EARLY_IDT_HANDLER_SIZES = (9, 13)
_GATE = struct.Struct("<HHBBHII")


@dataclass(frozen=True)
class Gate:
    vector: int
    handler: int
    selector: int
    ist: int
    type: int
    dpl: int
    present: bool


def gate_count(limit: int) -> int:
    return min(MAX_GATES, (limit + 1) // GATE_SIZE)


def decode_idt(data: bytes | bytearray | memoryview, limit: int) -> list[Gate]:
    """Decode the gates of an IDT whose bytes start at `data` (limit from the IDTR)."""
    n = min(gate_count(limit), len(data) // GATE_SIZE)
    gates = []
    for v in range(n):
        lo, sel, ist, attr, mid, hi, _ = _GATE.unpack_from(data, v * GATE_SIZE)
        gates.append(Gate(v, lo | (mid << 16) | (hi << 32), sel, ist & 7, attr & 0xF,
                          (attr >> 5) & 3, bool(attr & 0x80)))
    return gates


@dataclass(frozen=True)
class IdtCheck:
    """Result of checking gates against the kernel text."""

    gates: int
    present: int
    outside_text: tuple[Gate, ...]
    bad_type: tuple[Gate, ...]
    #: Exception vectors still on the boot-time early handlers (see `check_gates`).
    early_handlers: tuple[Gate, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.outside_text and not self.bad_type


def check_gates(gates: Sequence[Gate], text: tuple[int, int],
                init_text: tuple[int, int] | None = None,
                early_stubs: EarlyStubs | None = None) -> IdtCheck:
    """Every present gate must be an interrupt/trap gate whose handler is in `.text`.

    One known exception, seen on every 6.1 and 6.12 guest: exception vectors the kernel
    never installs a handler for (e.g. #MC without MCE, reserved 20-31) keep pointing
    at `early_idt_handler_array` in `.init.text` — freed after boot. Those are accepted
    only in that exact shape: vectors below 32, each handler exactly at
    `base + stride * vector` inside the slid `.init.text`, where `early_stubs` (the
    slid array, read from the kernel image by `find_early_stubs`) gives base and
    stride (9 on Debian 6.1, 13 with ENDBR64 on 6.12).

    Without `early_stubs` (a profile stored before kscan read them) the shape is
    derived from the gates themselves: one common base, and a stride — measured from
    the gates when two or more are there — that is one of EARLY_IDT_HANDLER_SIZES.
    """
    present = [g for g in gates if g.present]
    outside = [g for g in present if not text[0] <= g.handler < text[1]]
    early: list[Gate] = []
    if init_text is not None:
        cand = [g for g in outside if g.vector < NUM_EXCEPTION_VECTORS
                and init_text[0] <= g.handler < init_text[1]]
        if early_stubs is not None:
            lo, hi = early_stubs.base, early_stubs.handler(NUM_EXCEPTION_VECTORS)
            if init_text[0] <= lo and hi <= init_text[1]:
                early = [g for g in cand if g.handler == early_stubs.handler(g.vector)]
        elif cand:
            for stride in EARLY_IDT_HANDLER_SIZES:
                if len({g.handler - stride * g.vector for g in cand}) == 1:
                    early = cand
                    break
        outside = [g for g in outside if g not in early]
    bad = tuple(g for g in present if g.type not in (INTERRUPT_GATE, TRAP_GATE))
    return IdtCheck(len(gates), len(present), tuple(outside), bad, tuple(early))


def normalize_idt(data: bytes | bytearray | memoryview, limit: int, slide: int) -> bytearray:
    """A copy of the IDT with every present gate's handler moved back by the slide (the
    IDT is built at run time, so it is not in the relocation table)."""
    out = bytearray(data)
    mask = (1 << 64) - 1
    for g in decode_idt(data, limit):
        if not g.present:
            continue
        h = (g.handler - slide) & mask
        off = g.vector * GATE_SIZE
        struct.pack_into("<H", out, off, h & 0xFFFF)
        struct.pack_into("<H", out, off + 6, (h >> 16) & 0xFFFF)
        struct.pack_into("<I", out, off + 8, h >> 32)
    return out

"""The early IDT stubs of a build, read from its image without symbols.

Until its IDT is set up, the kernel points exception vectors at
`early_idt_handler_array` (arch/x86/kernel/head_64.S): 32 stubs of
EARLY_IDT_HANDLER_SIZE bytes each — 9 without IBT (Debian 6.1), 13 with ENDBR64
(Debian 6.12). Some vectors keep them for good, so a check must accept gates at exactly
those stubs; `find_early_stubs` measures the array's address and stride at
`profile add` time, and `scanner.check.idt` checks gates against it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["NUM_EXCEPTION_VECTORS", "EarlyStubs", "find_early_stubs"]

NUM_EXCEPTION_VECTORS = 32
_ENDBR64 = b"\xf3\x0f\x1e\xfa"
_ENDBR_POISON = b"\x66\x0f\x1f\x00"  # what objtool/apply_seal_endbr seal an ENDBR with


@dataclass(frozen=True)
class EarlyStubs:
    """`early_idt_handler_array` of one build: its address and stride (the build's
    EARLY_IDT_HANDLER_SIZE). Link-time in a profile; `slid` for a running VM."""

    base: int
    stride: int

    def handler(self, vector: int) -> int:
        return self.base + self.stride * vector

    def slid(self, slide: int) -> EarlyStubs:
        return EarlyStubs(self.base + slide, self.stride)


def _decode_stub(code: bytes | memoryview, pos: int, vector: int,
                 prefix: bytes) -> tuple[int, int] | None:
    """Decode one early stub of arch/x86/kernel/head_64.S at `pos`: `prefix` (ENDBR64,
    its seal, or nothing), an optional `push $0` (vectors without an error code),
    `push $vector`, `jmp rel32|rel8`. Returns (jump target offset, stub length)."""
    p = pos
    if bytes(code[p:p + len(prefix)]) != prefix:
        return None
    p += len(prefix)
    if bytes(code[p:p + 4]) == bytes((0x6A, 0, 0x6A, vector)):
        p += 4
    elif bytes(code[p:p + 2]) == bytes((0x6A, vector)):
        p += 2
    else:
        return None
    if p < len(code) and code[p] == 0xE9 and p + 5 <= len(code):
        (rel,) = struct.unpack_from("<i", code, p + 1)
        return p + 5 + rel, p + 5 - pos
    if p < len(code) and code[p] == 0xEB and p + 2 <= len(code):
        rel = code[p + 1] - 256 if code[p + 1] >= 0x80 else code[p + 1]
        return p + 2 + rel, p + 2 - pos
    return None


def find_early_stubs(code: bytes | memoryview, addr: int) -> EarlyStubs | None:
    """Find `early_idt_handler_array` in a build's `.init.text` (bytes `code` linked at
    `addr`) without symbols: 32 stubs, stub i at base + stride * i pushing vector i (and
    a dummy error code where the CPU pushes none) and jumping to one common target,
    each padded with int3 (0xcc) to the stride. The stride is measured, not assumed.
    None unless exactly one such array is found."""
    data = bytes(code)
    mv = memoryview(data)
    found: set[EarlyStubs] = set()
    pos = data.find(b"\x6a\x00\x6a\x00")  # stub 0: push $0; push $0 (#DE)
    while pos >= 0:
        for prefix in (_ENDBR64, _ENDBR_POISON, b""):
            start = pos - len(prefix)
            if start < 0:
                continue
            first = _decode_stub(mv, start, 0, prefix)
            if first is None:
                continue
            target, length = first
            stride = length
            while start + stride < len(mv) and mv[start + stride] == 0xCC:
                stride += 1
            if not 5 <= stride <= 32:
                continue
            if all(_stub_ok(mv, start + stride * v, v, prefix, target, stride)
                   for v in range(NUM_EXCEPTION_VECTORS)):
                found.add(EarlyStubs(addr + start, stride))
            break
        pos = data.find(b"\x6a\x00\x6a\x00", pos + 1)
    return found.pop() if len(found) == 1 else None


def _stub_ok(mv: memoryview, pos: int, vector: int, prefix: bytes, target: int,
             stride: int) -> bool:
    got = _decode_stub(mv, pos, vector, prefix)
    if got is None or got[0] != target or got[1] > stride:
        return False
    return all(b == 0xCC for b in mv[pos + got[1]:pos + stride])

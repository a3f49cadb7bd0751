"""The early exception stubs (`early_idt_handler_array`): found in `.init.text` without
symbols, whatever the build's stride (9 bytes on Debian 6.1, 13 with ENDBR64 on 6.12),
and IDT gates accepted only in exactly that shape."""

from __future__ import annotations

import struct

import pytest

from scanner.check.idt import check_gates, decode_idt
from scanner.image.early_idt import EarlyStubs, find_early_stubs
from scanner.image.kernel_profile import KernelProfile, SectionInfo

BASE = 0xFFFF_FFFF_8100_0000
ERRCODE = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}  # vectors the CPU pushes an error code for
ENDBR64 = bytes.fromhex("f30f1efa")


def stub_array(endbr: bool, size: int, common_off: int = 0x200, start: int = 0) -> bytes:
    """What head_64.S assembles: per vector [ENDBR] [push $0] push $i; jmp common;
    int3 padding to EARLY_IDT_HANDLER_SIZE. `start` is the array's offset in the buffer
    and `common_off` early_idt_handler_common's offset from the array."""
    out = bytearray()
    for v in range(32):
        s = bytearray(ENDBR64 if endbr else b"")
        if v not in ERRCODE:
            s += b"\x6a\x00"
        s += bytes((0x6A, v))
        here = start + v * size + len(s)
        rel8 = start + common_off - (here + 2)
        if -128 <= rel8 < 128:
            s += bytes((0xEB, rel8 & 0xFF))
        else:
            s += b"\xe9" + struct.pack("<i", start + common_off - (here + 5))
        assert len(s) <= size
        out += s + b"\xcc" * (size - len(s))
    return bytes(out)


def init_text(array: bytes, before: int = 0x40) -> bytes:
    """A fake .init.text: some code, the array, the common handler, more code."""
    body = b"\x90" * before + array
    return body + b"\xcc" * (0x400 - len(body)) + b"\x55\x48\x89\xe5" * 64


@pytest.mark.parametrize(("endbr", "size"), [(False, 9), (True, 13)])
def test_find_early_stubs_measures_the_stride(endbr: bool, size: int) -> None:
    code = init_text(stub_array(endbr, size, common_off=0x400 - 0x40, start=0x40))
    assert find_early_stubs(code, BASE) == EarlyStubs(BASE + 0x40, size)


def test_find_early_stubs_rejects_a_broken_array() -> None:
    array = bytearray(stub_array(True, 13, common_off=0x3C0, start=0x40))
    array[13 * 20 + 7] ^= 1                       # vector 20 pushes the wrong number
    assert find_early_stubs(init_text(bytes(array)), BASE) is None
    array = bytearray(stub_array(True, 13, common_off=0x3C0, start=0x40))
    array[13 * 5 + 12] = 0x90                      # padding that is not int3
    assert find_early_stubs(init_text(bytes(array)), BASE) is None
    assert find_early_stubs(b"\x6a\x00\x6a\x00\xe9" + b"\0" * 64, BASE) is None


def gate(handler: int) -> bytes:
    return struct.pack("<HHBBHII", handler & 0xFFFF, 0x10, 0, 0x8E,
                       (handler >> 16) & 0xFFFF, handler >> 32, 0)


def idt(text: tuple[int, int], early: dict[int, int]) -> bytes:
    return b"".join(gate(early[v]) if v in early else gate(text[0] + 0x1000 + 16 * v)
                    for v in range(256))


SLIDE = 0x1220_0000
TEXT = (BASE + SLIDE, BASE + SLIDE + 0x100_0000)
INIT = (BASE + SLIDE + 0x231_6000, BASE + SLIDE + 0x23A_B624)
UNUSED = (22, 23, 24, 25, 26, 27, 28, 30, 31)   # what 6.12 guests leave on early stubs


@pytest.mark.parametrize("stride", [9, 13])
def test_early_gates_accepted_in_their_exact_shape(stride: int) -> None:
    stubs = EarlyStubs(INIT[0] + 0x133B0, stride)
    gates = decode_idt(idt(TEXT, {v: stubs.handler(v) for v in UNUSED}), 0xFFF)
    c = check_gates(gates, TEXT, INIT, stubs)
    assert c.ok and [g.vector for g in c.early_handlers] == list(UNUSED)
    # Also accepted with the shape derived from the gates (profiles without early_idt).
    c = check_gates(gates, TEXT, INIT)
    assert c.ok and [g.vector for g in c.early_handlers] == list(UNUSED)


def test_look_alikes_are_flagged() -> None:
    stubs = EarlyStubs(INIT[0] + 0x133B0, 13)
    # The 6.1 stride on a 13-byte build: common base, wrong stride.
    wrong = {v: stubs.base + 9 * v for v in UNUSED}
    c = check_gates(decode_idt(idt(TEXT, wrong), 0xFFF), TEXT, INIT, stubs)
    assert [g.vector for g in c.outside_text] == list(UNUSED) and not c.early_handlers
    # A stride no kernel has, with no stubs known: the derived shape rejects it too.
    odd = {v: stubs.base + 11 * v for v in UNUSED}
    c = check_gates(decode_idt(idt(TEXT, odd), 0xFFF), TEXT, INIT)
    assert [g.vector for g in c.outside_text] == list(UNUSED) and not c.early_handlers
    # The right stride and base, but the array is not inside the slid .init.text.
    out = EarlyStubs(INIT[1] + 0x1000, 13)
    gates = decode_idt(idt(TEXT, {v: out.handler(v) for v in UNUSED}), 0xFFF)
    assert [g.vector for g in check_gates(gates, TEXT, INIT, out).outside_text] == \
        list(UNUSED)
    assert [g.vector for g in check_gates(gates, TEXT, INIT).outside_text] == list(UNUSED)
    # One gate of the array moved to another stub of it: vector 25 → stub 26.
    moved = {v: stubs.handler(v) for v in UNUSED} | {25: stubs.handler(26)}
    c = check_gates(decode_idt(idt(TEXT, moved), 0xFFF), TEXT, INIT, stubs)
    assert [g.vector for g in c.outside_text] == [25]
    # Vectors 32 and up never use early stubs, even at the right address.
    hi = {v: stubs.handler(v) for v in UNUSED} | {40: stubs.handler(40)}
    c = check_gates(decode_idt(idt(TEXT, hi), 0xFFF), TEXT, INIT, stubs)
    assert [g.vector for g in c.outside_text] == [40]


def test_profile_keeps_early_idt() -> None:
    p = KernelProfile(
        build_id="cd" * 20, release="6.12-test", version="Linux version 6.12-test",
        sections={".text": SectionInfo(".text", BASE, 0x1000)}, relocs={},
        text_head=b"", ex_table=b"", early_idt=(BASE + 0x2329_3B0, 13))
    assert KernelProfile.from_bytes(p.to_bytes()).early_idt == (BASE + 0x2329_3B0, 13)
    old = KernelProfile(build_id="cd" * 20, release="x", version="x", sections={},
                        relocs={}, text_head=b"", ex_table=b"")
    assert KernelProfile.from_bytes(old.to_bytes()).early_idt is None

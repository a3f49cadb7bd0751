"""KASLR normalization, IDT decoding and profile serialization on synthetic data."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner.check.idt import check_gates, decode_idt, normalize_idt
from scanner.check.normalize import RegionRelocs, normalize
from scanner.image.kernel_profile import KernelProfile, SectionInfo

BASE = 0xFFFF_FFFF_8100_0000


def relocate(data: bytearray, r: RegionRelocs, slide: int) -> None:
    """What the kernel's handle_relocations does, written plainly (the oracle)."""
    for off in r.r64.tolist():
        v = struct.unpack_from("<Q", data, off)[0]
        struct.pack_into("<Q", data, off, (v + slide) & (2**64 - 1))
    for off in r.r32.tolist():
        v = struct.unpack_from("<I", data, off)[0]
        struct.pack_into("<I", data, off, (v + slide) & (2**32 - 1))
    for off in r.r32_inv.tolist():
        v = struct.unpack_from("<I", data, off)[0]
        struct.pack_into("<I", data, off, (v - slide) & (2**32 - 1))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), slide_units=st.integers(1, 500))
def test_normalize_undoes_relocation(seed: int, slide_units: int) -> None:
    rnd = random.Random(seed)
    size = 64 * 1024
    original = bytearray(rnd.randbytes(size))
    # Non-overlapping sites of each kind.
    slots = rnd.sample(range(0, size - 8, 8), 300)
    r = RegionRelocs(np.array(sorted(slots[:100]), dtype=np.int64),
                     np.array(sorted(slots[100:200]), dtype=np.int64),
                     np.array(sorted(s + 4 for s in slots[200:])), )
    slide = slide_units * (2 << 20)
    live = bytearray(original)
    relocate(live, r, slide)
    assert live != original
    assert normalize(live, r, slide) == original
    assert normalize(memoryview(bytes(live)), r, slide) == original


def test_region_relocs_keep_only_sites_inside() -> None:
    start, size = BASE, 0x1000
    r = RegionRelocs.from_addresses(
        start, size,
        r64=[BASE - 8, BASE, BASE + 0xFF8, BASE + 0xFFC],   # last one crosses the end
        r32=[BASE + 0x10, BASE + 0xFFC, BASE + 0x1000],
        r32_inv=[BASE + 0x20, BASE + 0x20],                  # duplicates collapse
    )
    assert r.r64.tolist() == [0, 0xFF8]
    assert r.r32.tolist() == [0x10, 0xFFC]
    assert r.r32_inv.tolist() == [0x20]
    assert r.pages() == {0}


def gate(handler: int, present: bool = True, typ: int = 0xE, ist: int = 0) -> bytes:
    attr = typ | (0x80 if present else 0)
    return struct.pack("<HHBBHII", handler & 0xFFFF, 0x10, ist, attr,
                       (handler >> 16) & 0xFFFF, handler >> 32, 0)


def test_idt_decode_check_and_normalize() -> None:
    slide = 0x1180_0000
    text = (BASE + slide, BASE + slide + 0xE0_0000)
    init = (BASE + slide + 0x200_0000, BASE + slide + 0x210_0000)
    early = init[0] + 0x1000
    data = bytearray()
    for v in range(256):
        if v in (18, 20, 21):
            data += gate(early + 9 * v)                 # boot-time early handlers
        elif v == 0x80:
            data += gate(0xFFFF_8880_1234_5678)        # hooked: points into the heap
        elif v == 0x81:
            data += gate(text[0] + 0x100, present=False)
        else:
            data += gate(text[0] + 0x1000 + 16 * v, typ=0xF if v == 3 else 0xE, ist=v % 8)
    gates = decode_idt(data, 0xFFF)
    assert len(gates) == 256 and gates[3].type == 0xF and gates[5].ist == 5
    c = check_gates(gates, text, init)
    assert [g.vector for g in c.outside_text] == [0x80]
    assert [g.vector for g in c.early_handlers] == [18, 20, 21]
    assert c.present == 255 and not c.ok
    # Early handlers with inconsistent spacing are not excused.
    data2 = bytearray(data)
    data2[20 * 16:21 * 16] = gate(early + 9 * 20 + 1)
    assert {g.vector for g in check_gates(decode_idt(data2, 0xFFF), text, init).outside_text} \
        >= {18, 20, 21}
    # Normalization moves handlers back by the slide; non-present gates are untouched.
    n = decode_idt(normalize_idt(data, 0xFFF, slide), 0xFFF)
    assert n[0].handler == gates[0].handler - slide and n[0].ist == gates[0].ist
    assert n[0x81].handler == gates[0x81].handler


@pytest.mark.parametrize("limit", [0, 15, 16 * 10 - 1, 0xFFFF, 0xFFFFFFFF])
def test_idt_limit_is_bounded(limit: int) -> None:
    gates = decode_idt(bytes(4096), limit)
    assert len(gates) == min(256, (limit + 1) // 16)


def test_profile_round_trip() -> None:
    r = RegionRelocs(np.array([0, 8], dtype=np.int64), np.array([16], dtype=np.int64),
                     np.array([], dtype=np.int64))
    p = KernelProfile(
        build_id="ab" * 20, release="6.1.0-test", version="Linux version 6.1.0-test",
        sections={".text": SectionInfo(".text", BASE, 0x2000),
                  ".rodata": SectionInfo(".rodata", BASE + 0x10_0000, 0x1000),
                  "__ex_table": SectionInfo("__ex_table", BASE + 0x20_0000, 0x10)},
        relocs={".text": r, ".rodata": RegionRelocs.empty(), "__ex_table": RegionRelocs.empty()},
        text_head=b"\x90" * 4096, ex_table=b"\x01" * 16, ro_after_init=(0x800, 0x1000),
        symbols=((BASE, "_text"), (BASE + 0x100, "do_one_initcall")),
    )
    q = KernelProfile.from_bytes(p.to_bytes())
    assert q.sections == p.sections and q.ro_after_init == (0x800, 0x1000)
    assert q.relocs[".text"].r64.tolist() == [0, 8] and q.relocs[".text"].r32.tolist() == [16]
    assert q.symbolize(BASE + 0x108) == "do_one_initcall+0x8" and q.symbolize(BASE) == "_text"
    assert q.text_head == p.text_head and q.ex_table == p.ex_table

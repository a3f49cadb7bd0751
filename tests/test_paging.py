"""Page-table walker on synthetic tables: page sizes, 5-level, permissions, PTI CR3,
and hostile tables (loops, entries past RAM, reserved bits, huge ranges)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.synthetic import NX, PAGE, RW, US, P, SyntheticRam
from translate import (
    FIVE_LEVEL,
    FOUR_LEVEL,
    PageFaultError,
    PageWalker,
    TranslationError,
    kernel_pgd_candidates,
    kernel_space,
)
from translate.vcpu import VcpuState

KTEXT = 0xFFFF_FFFF_8100_0000
MB2, GB1 = 1 << 21, 1 << 30


def walker(tmp_path: Path, ram: SyntheticRam, **kw: bool) -> PageWalker:
    mode = FIVE_LEVEL if ram.levels == 5 else FOUR_LEVEL
    return PageWalker(ram.save(tmp_path / "ram"), ram.pgd, mode, **kw)


def test_page_sizes_and_offsets(tmp_path: Path) -> None:
    ram = SyntheticRam(8 << 20)
    ram.map(KTEXT, 0x200000, MB2, P)  # 2 MiB, read-only, executable
    ram.map(0xFFFF_8880_0000_0000, 0, GB1, P | RW | NX)  # 1 GiB direct map (RAM is smaller)
    ram.map(0x0000_7000_0000_1000, 0x5000, PAGE, P | RW | US, table_flags=P | RW | US)
    w = walker(tmp_path, ram)
    m = w.translate(KTEXT + 0x12345)
    assert (m.gpa, m.page_size, m.writable, m.nx, m.user) == (0x212345, MB2, False, False, False)
    m = w.translate(0xFFFF_8880_0000_0000 + 0x6789)
    assert (m.gpa, m.page_size, m.writable, m.nx) == (0x6789, GB1, True, True)
    m = w.translate(0x7000_0000_1ABC)
    assert (m.gpa, m.page_size, m.user) == (0x5ABC, PAGE, True)


def test_permissions_combine_over_levels(tmp_path: Path) -> None:
    ram = SyntheticRam(1 << 20)
    # Leaf says writable+user, but a table entry above is read-only, kernel-only, NX.
    ram.map(KTEXT, 0x8000, PAGE, P | RW | US, table_flags=P | US)
    w = walker(tmp_path, ram)
    m = w.translate(KTEXT)
    assert not m.writable and m.user and not m.nx
    ram2 = SyntheticRam(1 << 20)
    ram2.map(KTEXT, 0x8000, PAGE, P | RW, table_flags=P | RW | NX)
    m2 = walker(tmp_path, ram2).translate(KTEXT)
    assert m2.writable and m2.nx and not m2.user
    # Without EFER.NXE the NX bit means nothing.
    assert not walker(tmp_path, ram2, nxe=False).translate(KTEXT).nx


def test_range_runs_split_on_permissions_and_merge_contiguous(tmp_path: Path) -> None:
    ram = SyntheticRam(16 << 20)
    ram.map(KTEXT, 0x400000, MB2, P)               # 2 MiB text, RX
    for i in range(4):                             # 4 KiB text tail, RX, contiguous
        ram.map(KTEXT + MB2 + i * PAGE, 0x600000 + i * PAGE, PAGE, P)
    for i in range(2):                             # then rodata-like RO+NX
        ram.map(KTEXT + MB2 + (4 + i) * PAGE, 0x604000 + i * PAGE, PAGE, P | NX)
    ram.map(KTEXT + MB2 + 6 * PAGE, 0x100000, PAGE, P | NX)  # physically elsewhere
    w = walker(tmp_path, ram)
    t = w.translate_range(KTEXT + 0x1000, MB2 + 7 * PAGE - 0x1000)
    got = [(r.va - KTEXT, r.gpa, r.size, r.page_size, r.perms) for r in t.runs]
    assert got == [
        (0x1000, 0x401000, MB2 - 0x1000, MB2, "r-xk"),
        (MB2, 0x600000, 4 * PAGE, PAGE, "r-xk"),
        (MB2 + 4 * PAGE, 0x604000, 2 * PAGE, PAGE, "r--k"),
        (MB2 + 6 * PAGE, 0x100000, PAGE, PAGE, "r--k"),
    ]
    # For hashing, physically contiguous runs merge whatever their permissions.
    assert t.gpa_runs() == ((0x401000, MB2 - 0x1000 + 6 * PAGE), (0x100000, PAGE))
    assert ram.pgd in t.tables and len(t.tables) >= 4


def test_five_level(tmp_path: Path) -> None:
    ram = SyntheticRam(2 << 20, levels=5)
    va = 0xFF11_2233_4455_6000  # canonical for 57 bits, not for 48
    ram.map(va, 0x9000, PAGE, P | RW)
    ram.map(KTEXT, 0x1A000, PAGE, P)
    w = walker(tmp_path, ram)
    assert w.translate(va + 0x10).gpa == 0x9010
    assert w.translate(KTEXT).gpa == 0x1A000
    with pytest.raises(PageFaultError, match="not canonical"):
        PageWalker(w.mem, ram.pgd, FOUR_LEVEL).translate(va)


def test_pti_and_pcid_bits_of_cr3() -> None:
    kernel = 0x26C6000
    user_cr3 = kernel | 0x1000 | 0x5 | (1 << 63)  # user half, PCID 5, no-flush
    assert kernel_pgd_candidates(user_cr3)[0] == kernel
    assert kernel_pgd_candidates(kernel | 0x3) == (kernel,)


def test_kernel_space_picks_pgd_with_kernel_mappings(tmp_path: Path) -> None:
    ram = SyntheticRam(1 << 20)
    ram.next_free = 0x4000  # PGD at 0x1000 would be odd; rebuild it 8 KiB-aligned
    ram.pgd = ram.alloc()
    ram.alloc()  # the PTI user half, right after the kernel PGD
    ram.map(KTEXT, 0x20000, PAGE, P)
    ram.map(0xFFFF_8880_0000_0000, 0, MB2, P | RW | NX)
    # A user PGD that maps only one kernel slot (the entry trampoline).
    kernel_pgd = ram.pgd
    ram.put(kernel_pgd + 0x1000 + 511 * 8, ram.get(kernel_pgd + 511 * 8))
    mem = ram.save(tmp_path / "ram")
    vcpu = VcpuState(0, cr0=0x80050033, cr3=kernel_pgd | 0x1000 | 7, cr4=0x6B0, efer=0xD01,
                     idtr_base=0, idtr_limit=0xFFF, gdtr_base=0, gdtr_limit=0x7F,
                     rip=0, cpl=3, halted=False)
    ks = kernel_space(mem, vcpu)
    assert ks.pgd == kernel_pgd and ks.mode is FOUR_LEVEL and ks.nxe


def test_self_referencing_table_ends(tmp_path: Path) -> None:
    ram = SyntheticRam(1 << 20)
    ram.put(ram.pgd + 511 * 8, ram.pgd | P | RW)  # PML4[511] → PML4 itself, at every level
    w = walker(tmp_path, ram)
    t0 = time.monotonic()
    # Through the recursive entry at every level, the last page maps the PML4 itself.
    m = w.translate(0xFFFF_FFFF_FFFF_F000)
    assert m.gpa == ram.pgd and m.page_size == PAGE
    with pytest.raises(PageFaultError, match="not present"):
        w.translate(KTEXT)
    with pytest.raises(PageFaultError, match="not present"):
        w.translate_range(0xFFFF_FF80_0000_0000, 64 << 20)
    assert time.monotonic() - t0 < 5


def test_entry_pointing_past_ram(tmp_path: Path) -> None:
    ram = SyntheticRam(1 << 20)
    ram.put(ram.pgd + 511 * 8, (1 << 40) | P)  # next table 1 TiB away
    w = walker(tmp_path, ram)
    with pytest.raises(PageFaultError) as ei:
        w.translate(KTEXT)
    assert ei.value.level == "PDPT" and "outside RAM" in str(ei.value)
    assert f"{KTEXT:#x}" in str(ei.value)


def test_leaf_past_ram_is_refused_for_ranges(tmp_path: Path) -> None:
    ram = SyntheticRam(1 << 20)
    ram.map(KTEXT, 0x4000_0000, PAGE, P)
    w = walker(tmp_path, ram)
    assert w.translate(KTEXT).gpa == 0x4000_0000  # a single translation may name MMIO
    with pytest.raises(PageFaultError, match="not guest RAM"):
        w.translate_range(KTEXT, PAGE)


def test_reserved_large_bit_at_top_level(tmp_path: Path) -> None:
    ram = SyntheticRam(1 << 20)
    ram.put(ram.pgd + 511 * 8, 0x1000 | P | 0x80)
    with pytest.raises(PageFaultError, match="large-page bit"):
        walker(tmp_path, ram).translate(KTEXT)


def test_absurd_range_sizes(tmp_path: Path) -> None:
    ram = SyntheticRam(1 << 20)
    w = walker(tmp_path, ram)
    for size in (0, -1, 1 << 40):
        with pytest.raises(TranslationError):
            w.translate_range(KTEXT, size)
    with pytest.raises(PageFaultError, match="not canonical"):
        w.translate_range(0x0000_7FFF_FFFF_F000, 2 * PAGE)  # runs off the lower half


def test_cr3_outside_ram(tmp_path: Path) -> None:
    ram = SyntheticRam(1 << 20)
    mem = ram.save(tmp_path / "ram")
    with pytest.raises(PageFaultError, match="outside RAM"):
        PageWalker(mem, 0x7FFF_0000_0000, FOUR_LEVEL).translate(KTEXT)


# ----------------------------------------------------------------------- property tests

_page_sizes = st.sampled_from([PAGE, MB2])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_walker_agrees_with_builder(tmp_path: Path, data: st.DataObject) -> None:
    levels = data.draw(st.sampled_from([4, 5]))
    ram = SyntheticRam(16 << 20, levels=levels)
    n = data.draw(st.integers(1, 12))
    expected: dict[int, tuple[int, int]] = {}
    for _ in range(n):
        size = data.draw(_page_sizes)
        slot = data.draw(st.integers(0, 63))
        va = KTEXT + slot * MB2 + (0 if size == MB2 else data.draw(st.integers(0, 511)) * PAGE)
        if any(v <= va < v + s or va <= v < va + size for v, (_, s) in expected.items()):
            continue
        pa = data.draw(st.integers(1, 6)) * MB2 + (0 if size == MB2 else
                                                   data.draw(st.integers(0, 511)) * PAGE)
        ram.map(va, pa, size, P)
        expected[va] = (pa, size)
    w = walker(tmp_path, ram)
    for va, (pa, size) in expected.items():
        off = data.draw(st.integers(0, size - 1))
        m = w.translate(va + off)
        assert (m.gpa, m.page_size) == (pa + off, size)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.integers(0, (1 << 64) - 1), min_size=64, max_size=64),
       vas=st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=8),
       levels=st.sampled_from([4, 5]))
def test_garbage_tables_never_crash(tmp_path: Path, words: list[int], vas: list[int],
                                    levels: int) -> None:
    """Tables full of random entries (some pointing back into the tables): every walk
    ends in a mapping or a TranslationError, never another exception."""
    ram = SyntheticRam(64 * PAGE, levels=levels)
    for page in range(1, 8):  # spray the first table pages with entries
        for i in range(512):
            w = words[(page * 7 + i) % len(words)]
            if i % 3 == 0:  # keep some entries pointing at our own table pages
                w = (w & ~0x000F_FFFF_FFFF_F000) | ((w % 8) * PAGE)
            ram.put(page * PAGE + i * 8, w)
    w = PageWalker(ram.save(tmp_path / "ram"), PAGE, FIVE_LEVEL if levels == 5 else FOUR_LEVEL)
    for va in vas:
        try:
            m = w.translate(va)
        except TranslationError:
            continue
        assert 0 <= m.gpa < 1 << 52 and m.page_size in (PAGE, MB2, GB1)
        with contextlib.suppress(TranslationError):
            w.translate_range(va & ~0xFFF, 16 * PAGE)

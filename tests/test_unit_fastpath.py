"""scanner.check.fastpath on synthetic guest memory: the reference after a full check, and
fast_scan catching changed region bytes, page-table entries, vCPU control state and a
CR3 whose kernel half differs. The RAM file is changed on disk; the read-only
MAP_SHARED mapping sees the change as it sees a guest's writes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from scanner.check.fastpath import (
    FastOutcome,
    FastResult,
    Reference,
    TableFingerprint,
    check_memory,
    check_registers,
    control_state,
    fast_scan,
    make_reference,
)
from scanner.check.locate import Region
from scanner.hashing import raw_digests
from tests.synthetic import NX, PAGE, RW, P, SyntheticRam
from translate import FOUR_LEVEL, GuestMemory, PageWalker
from translate.vcpu import VcpuState

KTEXT = 0xFFFF_FFFF_8100_0000
KRODATA = KTEXT + 0x0080_0000
KEXTAB = KTEXT + 0x00A0_0010     # not page aligned, like __ex_table
IDT_VA = 0xFFFF_FE00_0000_0000   # cpu_entry_area: another top-level slot
CR0 = 0x8005_0033                # PG | AM | WP | NE | ET | MP | PE
CR0_WP = 1 << 16
CR4 = 0x0034_06F0                # ... | SMEP | SMAP
SMEP = 1 << 20
EFER = 0xD01


@dataclass
class World:
    ram: SyntheticRam
    path: Path
    mem: GuestMemory
    lk: Any
    vcpus: list[VcpuState]
    ref: Reference
    pgd_same: int     # another PGD whose kernel half equals the kernel's
    pgd_copy: int     # another PGD whose kernel entry points at a private copy
    pti_user: int     # user half of an 8 KiB PTI pair whose kernel half is pgd_same-like
    data: dict[str, bytes]  # the regions' bytes as the builder wrote them (oracle)

    def poke(self, gpa: int, data: bytes) -> None:
        with self.path.open("r+b") as f:
            f.seek(gpa)
            f.write(data)

    def peek(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram.data[gpa:gpa + n])


def vcpu(index: int, cr3: int, **kw: int) -> VcpuState:
    base = dict(index=index, cr0=CR0, cr3=cr3, cr4=CR4, efer=EFER, idtr_base=IDT_VA,
                idtr_limit=0xFFF, gdtr_base=0xFFFF_FE00_0000_1000, gdtr_limit=0x7F,
                rip=KTEXT + 0x1234, cpl=0, halted=False)
    base.update(kw)
    return VcpuState(**base)  # type: ignore[arg-type]


def copy_kernel_half(ram: SyntheticRam, src: int, dst: int) -> None:
    for i in range(256, 512):
        ram.put(dst + i * 8, ram.get(src + i * 8))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    rnd = random.Random(7)
    ram = SyntheticRam(4 << 20)
    # .text: 3 pages, physically contiguous, RX
    for i in range(3):
        ram.map(KTEXT + i * PAGE, 0x100000 + i * PAGE, PAGE, P)
    # .rodata: 2 pages, physically apart (two runs), RO+NX
    ram.map(KRODATA, 0x200000, PAGE, P | NX)
    ram.map(KRODATA + PAGE, 0x180000, PAGE, P | NX)
    # __ex_table: 0x800 bytes inside one page; idt: one page
    ram.map(KEXTAB & ~0xFFF, 0x220000, PAGE, P | NX)
    ram.map(IDT_VA, 0x230000, PAGE, P | NX)
    for gpa in (0x100000, 0x101000, 0x102000, 0x200000, 0x180000, 0x220000, 0x230000):
        ram.data[gpa:gpa + PAGE] = rnd.randbytes(PAGE)
    # Other address spaces.
    pgd_same = ram.alloc()
    copy_kernel_half(ram, ram.pgd, pgd_same)
    user_half = ram.alloc()
    ram.put(pgd_same + 5 * 8, user_half | P | RW)  # a user mapping of its own: irrelevant
    pgd_copy = ram.alloc()
    copy_kernel_half(ram, ram.pgd, pgd_copy)
    top_slot = (KTEXT >> 39) & 0x1FF
    pdpt = ram.get(ram.pgd + top_slot * 8) & 0x000F_FFFF_FFFF_F000
    private = ram.alloc()
    ram.data[private:private + PAGE] = ram.data[pdpt:pdpt + PAGE]
    ram.put(pgd_copy + top_slot * 8, private | P | RW)
    if ram.next_free % 0x2000:
        ram.alloc()
    pti_kernel = ram.alloc()
    pti_user = ram.alloc()
    copy_kernel_half(ram, ram.pgd, pti_kernel)
    path = tmp_path / "ram"
    mem = ram.save(path)
    walker = PageWalker(mem, ram.pgd, FOUR_LEVEL)
    sizes = {".text": 3 * PAGE, ".rodata": 2 * PAGE, "__ex_table": 0x800, "idt": PAGE}
    vas = {".text": KTEXT, ".rodata": KRODATA, "__ex_table": KEXTAB, "idt": IDT_VA}
    regions = {n: Region(n, vas[n], sizes[n], walker.translate_range(vas[n], sizes[n]))
               for n in sizes}
    assert len(regions[".rodata"].runs) == 2  # two physical runs, as intended
    lk = SimpleNamespace(regions=regions)
    vcpus = [vcpu(0, ram.pgd), vcpu(1, pgd_same | 0x8000_0000_0000_0000 | 0x5)]
    # Oracle: the regions' bytes, read back through the builder's own record.
    data = {".text": bytes(ram.data[0x100000:0x103000]),
            ".rodata": bytes(ram.data[0x200000:0x201000] + ram.data[0x180000:0x181000]),
            "__ex_table": bytes(ram.data[0x220010:0x220810]),
            "idt": bytes(ram.data[0x230000:0x231000])}
    digests = {n: raw_digests([d]) for n, d in data.items()}
    ref = make_reference(mem, lk, vcpus, ram.pgd, 39, digests)  # type: ignore[arg-type]
    w = World(ram, path, mem, lk, vcpus, ref, pgd_same, pgd_copy, pti_user, data)
    try:
        yield w
    finally:
        ref.release()
        mem.close()


def scan(w: World, vcpus: list[VcpuState] | None = None, *, none: bool = False) -> FastResult:
    return fast_scan(w.ref, w.mem, None if none else (vcpus or w.vcpus))


def test_reference_contents(world: World) -> None:
    ref = world.ref
    assert ref.top_index == (508, 511)  # IDT_VA's and KTEXT's top-level slots
    assert ref.top_values == tuple(world.ram.get(world.ram.pgd + i * 8) for i in (508, 511))
    assert ref.control == ((CR0_WP, 0x30_0000, IDT_VA, 0xFFF),) * 2
    assert set(ref.views) == set(world.data)
    for name, data in world.data.items():
        assert b"".join(bytes(v) for v in ref.views[name]) == data
    # Every entry each region's walk read is fingerprinted (shared upper-level entries
    # may be counted once per region).
    per_region = [r.translation.entries for r in world.lk.regions.values()]
    unique = {e for es in per_region for e in es}
    assert len(unique) <= len(ref.fingerprint) <= sum(len(es) for es in per_region)
    # By hand: PGD 2 (slots 511, 508) + PDPT 2 + PD 4 (text, rodata, ex_table, idt)
    # + PT 7 (3 + 2 + 1 + 1 pages)
    assert len(unique) == 15


def test_unchanged_memory_is_ok(world: World) -> None:
    assert scan(world) == FastResult(FastOutcome.UNCHANGED)
    assert scan(world, none=True) == FastResult(FastOutcome.UNCHANGED)
    # Bytes next to a region but outside it do not matter.
    world.poke(0x220000, b"\xff" * 0x10)      # before __ex_table in its page
    world.poke(0x220810, b"\xff" * 0x10)      # after it
    world.poke(0x103000, b"\xff" * 0x10)      # after .text
    assert scan(world).ok


@pytest.mark.parametrize(("region", "gpa"), [
    (".text", 0x100000), (".text", 0x102FFF), (".rodata", 0x200800), (".rodata", 0x180FFF),
    ("__ex_table", 0x220010), ("__ex_table", 0x22080F), ("idt", 0x230000 + 14 * 16)])
def test_changed_byte_names_the_region(world: World, region: str, gpa: int) -> None:
    old = world.peek(gpa, 1)
    world.poke(gpa, bytes([old[0] ^ 0x01]))
    r = scan(world)
    assert not r.ok
    assert r.changed == (region,)
    assert r.reason == "region bytes changed"
    # Without fresh registers the bytes are still checked.
    assert scan(world, none=True).changed == (region,)
    world.poke(gpa, old)  # put back: clean again
    assert scan(world).ok


def test_changes_in_two_regions(world: World) -> None:
    world.poke(0x101000, b"\xcc")
    world.poke(0x230008, b"\x00\x00")
    assert set(scan(world).changed) == {".text", "idt"}


def leaf_entry(w: World, va: int) -> tuple[int, int]:
    """(entry gpa, value) of the last-level entry the walk of `va` read."""
    ram = w.ram
    table = ram.pgd
    for shift in (39, 30, 21, 12):
        egpa = table + ((va >> shift) & 0x1FF) * 8
        e = ram.get(egpa)
        table = e & 0x000F_FFFF_FFFF_F000
    return egpa, e


def test_page_table_entry_changes(world: World) -> None:
    egpa, e = leaf_entry(world, KTEXT + PAGE)
    assert e & 0x000F_FFFF_FFFF_F000 == 0x101000
    # Remapped to a copy with the same bytes: the digest would not see it, the tables do.
    world.poke(0x300000, world.peek(0x101000, PAGE))
    world.poke(egpa, ((e & ~0x000F_FFFF_FFFF_F000) | 0x300000).to_bytes(8, "little"))
    r = scan(world)
    assert not r.ok and "page tables" in r.reason and r.changed == ()
    assert "page tables" in scan(world, none=True).reason
    # Only a permission bit: text made writable.
    world.poke(egpa, (e | RW).to_bytes(8, "little"))
    assert "page tables" in scan(world).reason
    world.poke(egpa, e.to_bytes(8, "little"))
    assert scan(world).ok
    # An entry in the same table page that no region's walk read: not watched.
    world.poke(egpa + 100 * 8, (0x5000 | P).to_bytes(8, "little"))
    assert scan(world).ok


def test_upper_level_entry_change(world: World) -> None:
    ram = world.ram
    pdpt = ram.get(ram.pgd + 511 * 8) & 0x000F_FFFF_FFFF_F000
    egpa = pdpt + ((KRODATA >> 30) & 0x1FF) * 8
    e = ram.get(egpa)
    world.poke(egpa, (e | NX).to_bytes(8, "little"))
    assert "page tables" in scan(world).reason


def test_reference_pgd_top_entry_change(world: World) -> None:
    ram = world.ram
    e = ram.get(ram.pgd + 511 * 8)
    world.poke(ram.pgd + 511 * 8, (e ^ 0x20).to_bytes(8, "little"))  # accessed bit
    r = scan(world)
    assert not r.ok and "vCPU 0" in r.reason and "maps the kernel differently" in r.reason
    assert "page tables" in scan(world, none=True).reason


@pytest.mark.parametrize("change", [
    {"cr0": CR0 & ~CR0_WP}, {"cr4": CR4 & ~SMEP}, {"cr4": CR4 & ~(1 << 21)},
    {"idtr_base": IDT_VA + PAGE}, {"idtr_limit": 0x7FF}])
def test_vcpu_control_state_changes(world: World, change: dict[str, int]) -> None:
    for i in range(2):
        vcpus = list(world.vcpus)
        vcpus[i] = replace(vcpus[i], **change)
        r = scan(world, vcpus)
        assert r == FastResult(FastOutcome.CONTROL_CHANGED)


def test_irrelevant_vcpu_changes_are_ok(world: World) -> None:
    vcpus = [replace(v, cr0=v.cr0 | 0x8, rip=v.rip + 100, cr4=v.cr4 | 0x80, halted=True,
                     gdtr_base=0x1000) for v in world.vcpus]
    assert scan(world, vcpus).ok


def test_vcpu_count_change(world: World) -> None:
    assert not scan(world, world.vcpus[:1]).ok
    three = [*world.vcpus, vcpu(2, world.pgd_same)]
    assert scan(world, three).reason == "vCPU control state changed"


def test_other_cr3_same_kernel_half_ok(world: World) -> None:
    vcpus = [world.vcpus[0], vcpu(1, world.pgd_same | 0x7)]
    assert scan(world, vcpus).ok
    # PTI: a vCPU in user mode on the odd page of the pair; its kernel half is the even one.
    vcpus = [world.vcpus[0], vcpu(1, world.pti_user | 0x8000_0000_0000_0801)]
    assert world.pti_user & 0x1FFF == 0x1000
    assert scan(world, vcpus).ok


def test_other_cr3_with_private_kernel_mapping(world: World) -> None:
    vcpus = [world.vcpus[0], vcpu(1, world.pgd_copy)]
    r = scan(world, vcpus)
    assert not r.ok
    assert r.reason == (f"vCPU 1 (CR3 {world.pgd_copy:#x}) maps the kernel differently")
    # Even though it maps the same bytes: the walker through the copy would find them.
    copy = PageWalker(world.mem, world.pgd_copy).translate_range(KTEXT, 3 * PAGE)
    assert copy.gpa_runs() == world.lk.regions[".text"].runs


@pytest.mark.parametrize("cr3", [0x4000_0000, 0xFFFF_F000, (4 << 20) - 0x800])
def test_cr3_outside_ram_is_not_ok(world: World, cr3: int) -> None:
    vcpus = [world.vcpus[0], vcpu(1, cr3)]
    r = scan(world, vcpus)
    assert not r.ok and "vCPU 1" in r.reason


def test_register_and_memory_checks_are_separate(world: World) -> None:
    no_wp = [replace(v, cr0=CR0 & ~CR0_WP) for v in world.vcpus]
    world.poke(0x200000, b"\x00\x01\x02")
    assert check_registers(world.ref, world.mem, world.vcpus).ok
    assert not check_registers(world.ref, world.mem, no_wp).ok
    assert check_memory(world.ref, world.mem).changed == (".rodata",)
    # fast_scan reports the register finding first.
    assert scan(world, no_wp).reason == "vCPU control state changed"


def test_control_state_oracle() -> None:
    v = vcpu(3, 0x1000, cr0=0xFFFF_FFFF, cr4=0xFFFF_FFFF, idtr_base=5, idtr_limit=6)
    assert control_state([v]) == ((1 << 16, (1 << 20) | (1 << 21), 5, 6),)
    assert control_state([]) == ()


def test_table_fingerprint_grouping_and_outside_ram(tmp_path: Path) -> None:
    ram = SyntheticRam(64 * PAGE)
    ram.put(0x3008, 0x1111)
    ram.put(0x3FF8, 0x2222)
    ram.put(0x5000, 0x3333)
    mem = ram.save(tmp_path / "ram")
    try:
        fp = TableFingerprint([(0x5000, 0x3333), (0x3FF8, 0x2222), (0x3008, 0x1111)])
        assert len(fp) == 3
        assert fp.unchanged(mem)
        # Each entry is compared at its own slot of its own table page.
        assert not TableFingerprint([(0x3008, 0x2222), (0x3FF8, 0x1111)]).unchanged(mem)
        assert not TableFingerprint([(0x5008, 0x3333)]).unchanged(mem)
        assert not TableFingerprint([(0x3000, 0x1111)]).unchanged(mem)
        assert not TableFingerprint([(0x3008, 0x1112)]).unchanged(mem)
        assert not TableFingerprint([(0x3008, 0x1111), (64 * PAGE + 8, 0)]).unchanged(mem)
        assert TableFingerprint([]).unchanged(mem) and len(TableFingerprint([])) == 0
        # As persisted and read back (resume): the same checks, entry by entry.
        assert TableFingerprint.from_pages(fp.pages).unchanged(mem)
        assert not TableFingerprint.from_pages(
            [(0x3000, ((1, 0x1111), (511, 0x2223)))]).unchanged(mem)
        assert not TableFingerprint.from_pages([(0x5000, ((0, 0x3334),))]).unchanged(mem)
        assert TableFingerprint.from_pages([(0x5000, ())]).unchanged(mem)
        assert not TableFingerprint.from_pages([(64 * PAGE, ())]).unchanged(mem)
        # Full 64-bit values (NX set) compare exactly.
        big = (1 << 63) | 0x1234_5000 | 1
        ram.put(0x3010, big)
        mem2 = ram.save(tmp_path / "ram2")
        try:
            assert TableFingerprint([(0x3010, big)]).unchanged(mem2)
            assert not TableFingerprint([(0x3010, big ^ (1 << 63))]).unchanged(mem2)
        finally:
            mem2.close()
    finally:
        mem.close()


def test_pti_is_read_from_the_pgd_pair(tmp_path: Path) -> None:
    from scanner.vm.bootprofile import pti_active

    ram = SyntheticRam(1 << 20)
    ram.next_free = 0x4000
    ram.pgd = ram.alloc()
    ram.alloc()  # the user half of the 8 KiB pair
    cea = 0xFFFF_FE00_0000_0000
    ram.map(cea, 0x20000, PAGE, P)
    idx = (cea >> 39) & 0x1FF
    mem = ram.save(tmp_path / "off")
    assert not pti_active(mem, ram.pgd, 39)  # user half empty: PTI off
    mem.close()
    ram.put(ram.pgd + 0x1000 + idx * 8, ram.get(ram.pgd + idx * 8))
    mem = ram.save(tmp_path / "on")
    assert pti_active(mem, ram.pgd, 39)
    assert not pti_active(mem, ram.pgd + 0x1000, 39)  # not an 8 KiB-aligned pair
    mem.close()


def test_reference_digests_change_only_through_set_digests(world: World) -> None:
    """A pass compares against digests it prepared once per reference: so they are
    read-only, and `set_digests` (a partial re-check) is seen by the very next pass."""
    ref = world.ref
    assert scan(world).ok  # the comparison list is made
    with pytest.raises(TypeError):
        ref.digests[".text"] = bytes(32)  # type: ignore[index]
    old = ref.digests[".rodata"]
    ref.set_digests({".rodata": bytes(16) + old[16:]})
    r = scan(world)
    assert r.outcome is FastOutcome.BYTES_CHANGED and r.changed == (".rodata",)
    ref.set_digests({".rodata": old})
    assert scan(world).ok

"""Executable kernel memory on synthetic data: the enumerating walk over page tables
built by the test (4/5 levels, large pages, NX at upper levels, hostile tables), the
owners read from synthetic kernel lists laid out with the real 6.1 BTF, the page
accounting (forged owners, BPF packs), and pointer-table naming."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from scanner.check.classify import ByteRange
from scanner.check.exec_fastpath import ExecTables
from scanner.check.execmem import ExecScan, account_exec, exec_findings
from scanner.check.fastpath import (
    FastOutcome,
    Reference,
    TableFingerprint,
    check_memory,
    check_registers,
    control_state,
)
from scanner.check.kernel_lists import KernelReader, ModuleList, ModuleMemory
from scanner.check.kernel_lists.exec_owners import (
    BPF_PACK_SIZE,
    ExecOwner,
    ExecOwners,
    read_exec_owners,
)
from scanner.check.kernel_lists.modules import ModuleInfo
from scanner.check.owners import OwnerLookup
from scanner.check.pointers import gate_handler, idt_changes, rodata_changes
from scanner.image.kernel_profile import KernelProfile
from scanner.run.events import human
from tests.synthetic import NX, PAGE, PS, RW, US, P, SyntheticRam
from tests.test_kernel_lists import FakeKernel, layouts
from translate import FIVE_LEVEL, FOUR_LEVEL, GuestMemory
from translate.exec_map import ExecMap, ExecRange, exec_map
from translate.vcpu import VcpuState

KTEXT = 0xFFFF_FFFF_8100_0000
MODS = 0xFFFF_FFFF_C000_0000
VMALLOC = 0xFFFF_C900_0000_0000
DIRECT = 0xFFFF_8880_0000_0000
MB2, GB1 = 1 << 21, 1 << 30


def emap(tmp_path: Path, ram: SyntheticRam, **kw: object):  # type: ignore[no-untyped-def]
    mode = FIVE_LEVEL if ram.levels == 5 else FOUR_LEVEL
    return exec_map(ram.save(tmp_path / "ram"), ram.pgd, mode, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- the walk


def test_walk_finds_executable_leaves_only(tmp_path: Path) -> None:
    ram = SyntheticRam(32 << 20)
    ram.map(KTEXT, 0x400000, MB2, P)                       # text: 2 MiB RX
    ram.map(KTEXT + MB2, 0x600000, PAGE, P)                # text tail, contiguous
    ram.map(KTEXT + MB2 + PAGE, 0x601000, PAGE, P | NX)    # rodata
    ram.map(MODS + 0x5000, 0x9000, PAGE, P | RW)           # a W+X page (set_memory_x)
    ram.map(DIRECT, 0, GB1, P | RW | NX)                   # direct map, NX leaf
    ram.map(VMALLOC, 0xA000, PAGE, P, table_flags=P | RW | NX)  # RX leaf under NX table
    ram.map(0x7000_0000_0000, 0xB000, PAGE, P | US, table_flags=P | RW | US)  # user half
    m = emap(tmp_path, ram)
    assert m.complete and m.problems == ()
    assert [(r.va, r.gpa, r.size, r.writable) for r in m.ranges] == [
        (KTEXT, 0x400000, MB2 + PAGE, False),        # 2 MiB + 4 KiB merged: contiguous
        (MODS + 0x5000, 0x9000, PAGE, True),
    ]
    assert m.pages == 512 + 2
    assert ram.pgd in m.tables
    # The NX sub-tree under VMALLOC was not read: its tables are not fingerprinted.
    vm_pud = ram.get(ram.pgd + ((VMALLOC >> 39) & 0x1FF) * 8) & 0x000F_FFFF_FFFF_F000
    assert vm_pud not in m.tables


def test_walk_in_va_order_and_without_nxe_everything_runs(tmp_path: Path) -> None:
    ram = SyntheticRam(8 << 20)
    ram.map(MODS, 0x9000, PAGE, P)
    ram.map(KTEXT, 0x200000, MB2, P)
    ram.map(DIRECT, 0xC000, PAGE, P | RW | NX)
    m = emap(tmp_path, ram)
    assert [r.va for r in m.ranges] == [KTEXT, MODS]
    m2 = emap(tmp_path, ram, nxe=False)
    assert [r.va for r in m2.ranges] == [DIRECT, KTEXT, MODS]


def test_five_level_walk(tmp_path: Path) -> None:
    ram = SyntheticRam(4 << 20, levels=5)
    va = 0xFF11_2233_4455_6000
    ram.map(va, 0x9000, PAGE, P)
    ram.map(KTEXT, 0x1A000, PAGE, P)
    m = emap(tmp_path, ram)
    assert [(r.va, r.gpa) for r in m.ranges] == [(va, 0x9000), (KTEXT, 0x1A000)]


def test_aliased_tables_are_bounded(tmp_path: Path) -> None:
    """One PT referenced from every PD entry, that PD from every PDPT entry: three
    tables, 512^2 descents — the walk stops at its bound and says so."""
    ram = SyntheticRam(1 << 20)
    ram.map(MODS, 0x9000, PAGE, P)
    pud = ram.get(ram.pgd + 511 * 8) & 0x000F_FFFF_FFFF_F000
    pmd = ram.get(pud + ((MODS >> 30) & 0x1FF) * 8) & 0x000F_FFFF_FFFF_F000
    pte = ram.get(pmd + ((MODS >> 21) & 0x1FF) * 8) & 0x000F_FFFF_FFFF_F000
    for i in range(512):
        ram.put(pud + i * 8, pmd | P | RW)
        ram.put(pmd + i * 8, pte | P | RW)
    m = emap(tmp_path, ram, max_tables=1000)
    assert not m.complete and "walk stopped" in m.problems[-1]
    assert len(m.tables) == 4


def test_self_reference_and_bad_entries(tmp_path: Path) -> None:
    ram = SyntheticRam(1 << 20)
    ram.map(KTEXT, 0x9000, PAGE, P)
    ram.put(ram.pgd + 300 * 8, ram.pgd | P | RW)           # the PGD as its own PDPT
    ram.put(ram.pgd + 301 * 8, (64 << 30) | P | RW)        # a table far outside RAM
    ram.put(ram.pgd + 302 * 8, 0x5000 | P | RW | PS)       # large page at the top level
    m = emap(tmp_path, ram, max_tables=2000)
    assert not m.complete
    text = " / ".join(m.problems)
    assert "outside RAM" in text and "large-page bit" in text
    assert any(r.va == KTEXT for r in m.ranges)


def test_range_cap(tmp_path: Path) -> None:
    ram = SyntheticRam(4 << 20)
    for i in range(40):                                     # 40 separate pages
        ram.map(MODS + 2 * i * PAGE, 0x100000 + 2 * i * PAGE, PAGE, P)
    m = emap(tmp_path, ram, max_ranges=16)
    assert not m.complete and len(m.ranges) == 16


# ------------------------------------------------------------------ owners from lists

SLIDE = 0


def _sym(profile: KernelProfile, name: str) -> int:
    at = profile.data_symbol(name)
    assert at is not None, name
    return at + SLIDE


def _list(k: FakeKernel, head: int, nodes: list[int]) -> None:
    ring = [head, *nodes]
    for i, n in enumerate(ring):
        k.u64(n, ring[(i + 1) % len(ring)])
        k.u64(n + 8, ring[i - 1])


def _kernel_with_lists(profile: KernelProfile) -> tuple[FakeKernel, dict[str, int]]:
    """Synthetic kernel memory holding every list the owner readers walk."""
    lay = layouts("6.1")
    k = FakeKernel()
    syms = {n: _sym(profile, n) for n in (
        "ftrace_ops_list", "ftrace_list_end", "ftrace_ops_trampoline_list",
        "kprobe_insn_slots", "kprobe_optinsn_slots", "bpf_kallsyms", "pack_list",
        "real_mode_header", "page_offset_base")}
    for _n, at in syms.items():
        k.alloc(at, 0x200)
    heap = 0xFFFF_8880_0100_0000
    k.alloc(heap, 0x10000)
    ops, ops_l = heap, lay["ftrace_ops"]
    k.u64(syms["ftrace_ops_list"], ops)
    k.u64(ops + ops_l["next"].offset, syms["ftrace_list_end"])
    k.u64(ops + ops_l["trampoline"].offset, MODS + 0x10000)
    k.u64(ops + ops_l["trampoline_size"].offset, 0x154)
    _list(k, syms["ftrace_ops_trampoline_list"], [ops + ops_l["list"].offset])
    cache_l, page_l = lay["kprobe_insn_cache"], lay["kprobe_insn_page"]
    kip, forged = heap + 0x1000, heap + 0x1800
    _list(k, syms["kprobe_insn_slots"] + cache_l["pages"].offset,
          [kip + page_l["list"].offset, forged + page_l["list"].offset])
    k.u64(kip + page_l["insns"].offset, MODS + 0x20000)
    k.u64(kip + page_l["cache"].offset, syms["kprobe_insn_slots"])
    k.u64(forged + page_l["insns"].offset, MODS + 0x30000)
    k.u64(forged + page_l["cache"].offset, syms["kprobe_optinsn_slots"])  # wrong cache
    _list(k, syms["kprobe_optinsn_slots"] + cache_l["pages"].offset, [])
    ks_l = lay["bpf_ksym"]
    ksym = heap + 0x2000
    _list(k, syms["bpf_kallsyms"], [ksym + ks_l["lnode"].offset])
    k.u64(ksym + ks_l["start"].offset, MODS + 0x200000 + 0x40)
    k.u64(ksym + ks_l["end"].offset, MODS + 0x200000 + 0x400)
    k.write(ksym + ks_l["name"].offset, b"bpf_prog_6deef7357e7b4530_sd_fw\0")
    pack_l = lay["bpf_prog_pack"]
    pack = heap + 0x4000
    _list(k, syms["pack_list"], [pack + pack_l["list"].offset])
    k.u64(pack + pack_l["ptr"].offset, MODS + 0x200000)
    k.write(pack + pack_l["bitmap"].offset, b"\xff" * 2)   # chunks 0-15: 1 KiB used
    rm_l = lay["real_mode_header"]
    hdr = DIRECT + 0x98000
    k.alloc(hdr, 0x100)
    k.u64(syms["real_mode_header"], hdr)
    k.u64(syms["page_offset_base"], DIRECT)
    k.write(hdr + rm_l["text_start"].offset, struct.pack("<I", 0x99000))
    k.write(hdr + rm_l["ro_end"].offset, struct.pack("<I", 0x9A800))
    return k, syms


@pytest.fixture(scope="module")
def profile61(kernel_profile: KernelProfile) -> KernelProfile:
    return kernel_profile


def test_owners_read_from_the_kernel_lists(profile61: KernelProfile) -> None:
    k, _syms = _kernel_with_lists(profile61)
    owners = read_exec_owners(profile61, SLIDE, KernelReader(k.read))
    got = {(o.kind, o.base, o.size) for o in owners.owners}
    assert ("ftrace_trampoline", MODS + 0x10000, 0x154) in got
    assert ("kprobe_insn_page", MODS + 0x20000, PAGE) in got
    assert ("bpf", MODS + 0x200040, 0x3C0) in got
    assert ("bpf_pack", MODS + 0x200000, BPF_PACK_SIZE) in got
    assert ("realmode_trampoline", DIRECT + 0x99000, 0x2000) in got
    # The insn page that claims another cache is refused.
    assert not any(o.base == MODS + 0x30000 for o in owners.owners)
    assert any("is not one of its pages" in p for p in owners.problems)
    bpf = next(o for o in owners.owners if o.kind == "bpf")
    assert bpf.name == "bpf_prog_6deef7357e7b4530_sd_fw"


def test_forged_real_mode_header_is_refused(profile61: KernelProfile) -> None:
    """An attacker points the header's text at shellcode above 1 MiB, or stretches it
    past the blob: no real-mode trampoline is claimed."""
    lay = layouts("6.1")
    for text, ro_end in ((0x2000000, 0x2001000), (0x99000, 0xF0000)):
        k, _syms = _kernel_with_lists(profile61)
        hdr = DIRECT + 0x98000
        k.write(hdr + lay["real_mode_header"]["text_start"].offset, struct.pack("<I", text))
        k.write(hdr + lay["real_mode_header"]["ro_end"].offset, struct.pack("<I", ro_end))
        owners = read_exec_owners(profile61, SLIDE, KernelReader(k.read))
        assert not owners.of_kind("realmode_trampoline")
        assert any("real-mode header" in p for p in owners.problems)


def test_ftrace_ops_cycle_is_bounded(profile61: KernelProfile) -> None:
    k, _syms = _kernel_with_lists(profile61)
    ops_l = layouts("6.1")["ftrace_ops"]
    ops = 0xFFFF_8880_0100_0000                             # the one ops (heap start)
    k.u64(ops + ops_l["next"].offset, ops)                  # ops → itself, never the end
    owners = read_exec_owners(profile61, SLIDE, KernelReader(k.read))
    assert not owners.complete and any("cycle" in p for p in owners.problems)
    assert len(owners.of_kind("ftrace_trampoline")) == 1


# ------------------------------------------------------------------------ accounting

CALLER = bytes(range(0x40, 0x60))


class Memory:
    """Code pages for the accounting's reads (ReadVA), everything else unreadable."""

    def __init__(self, pages: dict[int, bytes]) -> None:
        self.pages = pages

    def read(self, va: int, size: int) -> bytes | None:
        base = va & ~(PAGE - 1)
        page = self.pages.get(base)
        if page is None or va + size > base + PAGE:
            return None
        return page[va - base:va - base + size]


def _owners(profile: KernelProfile, mem: Memory, extra: list[ExecOwner],
            modules: ModuleList | None = None) -> OwnerLookup:
    return OwnerLookup.build(profile, SLIDE, (KTEXT, KTEXT + MB2 + 0x800), modules,
                               ExecOwners(tuple(extra), True), mem.read)


def _caller_pages(profile: KernelProfile) -> dict[int, bytes]:
    out = {}
    for name in ("ftrace_regs_caller", "ftrace_caller"):
        at = profile.data_symbol(name)
        assert at is not None
        base = (at + SLIDE) & ~(PAGE - 1)
        page = bytearray(out.get(base, bytes(PAGE)))
        off = at + SLIDE - base
        page[off:off + len(CALLER)] = CALLER
        out[base] = bytes(page)
    return out


def test_accounting_owned_and_unowned(profile61: KernelProfile) -> None:
    int3 = b"\xcc" * PAGE
    used = bytearray(int3)
    used[:0x400] = b"\x90" * 0x400                          # the allocated chunks
    dirty = bytearray(int3)
    dirty[0x800:0x810] = b"\x48\x31\xc0\xc3" * 4            # code in free chunks
    pack = MODS + 0x200000
    pages = {**_caller_pages(profile61), MODS + 0x10000: CALLER + bytes(PAGE - len(CALLER)),
             MODS + 0x11000: bytes(PAGE), pack: bytes(used), pack + PAGE: int3,
             pack + 2 * PAGE: bytes(dirty)}
    mem = Memory(pages)
    bitmap = b"\xff\xff" + bytes(BPF_PACK_SIZE // 64 // 8 - 2)
    mods = ModuleList((ModuleInfo("ext4", MODS, "live", (
        ModuleMemory("text", MODS + 0x1000, 0x3000), ModuleMemory("data", MODS + 0x4000,
                                                                   0x1000)), True, 0),), True)
    owners = _owners(profile61, mem, [
        ExecOwner("ftrace_trampoline", "ops a", MODS + 0x10000, 0x154),
        ExecOwner("ftrace_trampoline", "forged", MODS + 0x11000, 0x100),
        ExecOwner("kprobe_insn_page", "kprobe_insn_slots", MODS + 0x20000, PAGE),
        ExecOwner("bpf_pack", "bpf_prog_pack", pack, BPF_PACK_SIZE, 0, bitmap),
    ], mods)
    ranges = [
        ExecRange(KTEXT, 0x1000000, MB2 + PAGE, False),
        ExecRange(MODS + 0x1000, 0x2000000, 0x3000, False),       # ext4 text
        ExecRange(MODS + 0x4000, 0x2003000, PAGE, True),          # ext4 data made X
        ExecRange(MODS + 0x10000, 0x3000000, 2 * PAGE, False),    # trampoline + forged
        ExecRange(MODS + 0x20000, 0x4000000, PAGE, False),
        ExecRange(pack, 0x5000000, 3 * PAGE, False),
        ExecRange(VMALLOC, 0x6000000, GB1, True),                 # a 1 GiB W+X page
    ]
    acc = account_exec(ranges, owners, mem.read)
    assert acc.by_kind == {"kernel_text": 513, "module": 3, "ftrace_trampoline": 1,
                           "kprobe_insn_page": 1, "bpf_pack": 1, "bpf_pack_fill": 1}
    got = [(u.va, u.pages, u.writable) for u in acc.unowned]
    assert got == [(MODS + 0x4000, 1, True), (MODS + 0x11000, 1, False),
                   (pack + 2 * PAGE, 1, False), (VMALLOC, GB1 // PAGE, True)]
    assert "in a BPF prog pack" in acc.unowned[2].message
    assert acc.unowned[0].message == (f"unowned executable kernel memory at "
                                      f"{MODS + 0x4000:#x} (1 page, writable)")
    assert acc.pages == sum(acc.by_kind.values()) + acc.unowned_pages
    assert any("forged" in p for p in acc.problems)
    # Naming addresses by owner.
    assert owners.describe(MODS + 0x1234) == "module ext4"
    assert owners.describe(MODS + 0x4010) == "module ext4 (data)"
    assert owners.describe(VMALLOC + 8) == "unowned memory"
    assert owners.describe(MODS + 0x20010).startswith("kprobe insn page")
    # Kernel data is the image's, up to `_end`: a hidden module's code a few MB above
    # it (KASLR can put modules there) is not "kernel data __init_scratch_end+0x19e7000".
    assert profile61.kallsyms is not None
    end = profile61.kallsyms.lookup("_end")
    assert end is not None
    assert owners.describe(end - 8).startswith("kernel data ")
    assert owners.describe(end + 0x10_0000) == "unowned memory"


class LoadingMemory(Memory):
    """Guest memory in which a program is loaded into the pack while the accounting
    runs: its code is in the pack page when that is read, after the owners (and the
    pack's bitmap) were, and its bitmap bits were set before its code (as
    bpf_prog_pack_alloc() does)."""

    def __init__(self, pages: dict[int, bytes], bitmap_va: int, page: int,
                 loaded: dict[int, bytes]) -> None:
        super().__init__(pages)
        self.bitmap_va, self.page, self.loaded = bitmap_va, page, loaded

    def read(self, va: int, size: int) -> bytes | None:
        got = super().read(va, size)
        if va == self.page:   # the accounting reads the page: the bitmap moves on
            self.pages.update(self.loaded)
        return got


@pytest.mark.parametrize("bits_now, owned", [
    (b"\x00\x00\x01", True),    # chunk 16 of the page: allocated since the bitmap was read
    (b"\x00\x00\x00", False),   # still free by both readings: code no program holds
    (None, False),                 # the bitmap cannot be read again: unowned, as before
])
def test_a_program_loaded_while_the_pack_is_accounted_is_not_unowned_code(
        profile61: KernelProfile, bits_now: bytes | None, owned: bool) -> None:
    """The pack's bitmap is read with the owners, its pages later. A program loaded in
    between (a seccomp filter at a process start, on a guest starting services) is code
    in chunks the first reading says are free: the bitmap is read once more after the
    page, and a chunk set in either reading is allocated. Code in chunks free by both
    readings is still unowned, and a bitmap that cannot be read again changes nothing."""
    pack = MODS + 0x200000
    bitmap_va = MODS + 0x900000                        # the pack struct's bitmap (kmalloc)
    code = bytearray(b"\xcc" * PAGE)
    code[0x400:0x410] = b"\x48\x31\xc0\xc3" * 4        # chunk 16 of the page
    pages = {pack: bytes(code)}
    loaded = {} if bits_now is None else {bitmap_va: bits_now + bytes(PAGE - 3)}
    if bits_now is not None:
        pages[bitmap_va] = bytes(PAGE)                 # the bitmap as first read: all free
    mem = LoadingMemory(pages, bitmap_va, pack, loaded)
    owners = _owners(profile61, mem, [
        ExecOwner("bpf_pack", "bpf_prog_pack", pack, BPF_PACK_SIZE, 0,
                  bytes(BPF_PACK_SIZE // 64 // 8), bitmap_va)])
    acc = account_exec([ExecRange(pack, 0x5000000, PAGE, False)], owners, mem.read)
    if owned:
        assert acc.by_kind == {"bpf_pack": 1} and acc.unowned == ()
    else:
        assert acc.by_kind == {} and [(u.va, u.pages) for u in acc.unowned] == [(pack, 1)]
        assert "in a BPF prog pack" in acc.unowned[0].message


def test_a_program_loaded_and_freed_between_two_readings_is_read_again(
        profile61: KernelProfile) -> None:
    """A short-lived program: loaded after the bitmap was read, its code in the page when
    that is read, freed (int3 again, then its bits cleared) before the bits are read
    again. The page is read once more, then its bits: int3 now, so fill, not tampering.
    The readings are bounded: code that stays, in chunks that stay free, is unowned
    after 1 + PACK_REREADS readings."""
    import scanner.check.execmem as execmem_mod

    pack = MODS + 0x200000
    bitmap_va = MODS + 0x900000
    code = bytearray(b"\xcc" * PAGE)
    code[0x400:0x410] = b"\x48\x31\xc0\xc3" * 4
    page_reads: list[int] = []

    class Freeing(Memory):
        def read(self, va: int, size: int) -> bytes | None:
            if va == pack:
                page_reads.append(va)
                return bytes(code) if len(page_reads) == 1 or stays else b"\xcc" * PAGE
            return super().read(va, size)

    for stays in (False, True):
        page_reads.clear()
        mem = Freeing({bitmap_va: bytes(PAGE)})
        owners = _owners(profile61, mem, [
            ExecOwner("bpf_pack", "bpf_prog_pack", pack, BPF_PACK_SIZE, 0,
                      bytes(BPF_PACK_SIZE // 64 // 8), bitmap_va)])
        acc = account_exec([ExecRange(pack, 0x5000000, PAGE, False)], owners, mem.read)
        if stays:
            assert [u.va for u in acc.unowned] == [pack]
            assert len(page_reads) == 1 + execmem_mod.PACK_REREADS
        else:
            assert acc.by_kind == {"bpf_pack_fill": 1} and acc.unowned == ()
            assert len(page_reads) == 2


def test_unowned_ranges_are_capped(profile61: KernelProfile) -> None:
    owners = _owners(profile61, Memory({}), [])
    ranges = [ExecRange(VMALLOC + 2 * i * PAGE, 0x100000 + 2 * i * PAGE, PAGE, False)
              for i in range(500)]
    acc = account_exec(ranges, owners, None)
    assert len(acc.unowned) == 64 and acc.unowned_pages == 500
    assert acc.unowned[-1].why == "and more ranges"


# ----------------------------------------------------------------------- pointer tables


def test_sys_call_table_word_named(profile61: KernelProfile) -> None:
    table = profile61.data_symbol("sys_call_table")
    ro = profile61.section(".rodata")
    assert table is not None and ro.addr <= table < ro.end
    ks = profile61.kallsyms
    assert ks is not None
    getdents = ks.lookup("__x64_sys_getdents64")
    assert getdents is not None
    entry = table + 217 * 8
    page_link = entry & ~(PAGE - 1)
    off = entry - page_link
    before = bytearray(PAGE)
    before[off:off + 8] = struct.pack("<Q", getdents)
    hook = MODS + 0x1010
    mods = ModuleList((ModuleInfo("rootkit", MODS, "live", (
        ModuleMemory("text", MODS + 0x1000, 0x1000),), False, 0),), True)
    now = {page_link: bytes(before[:off]) + struct.pack("<Q", hook) + bytes(before[off + 8:])}
    owners = _owners(profile61, Memory(now), [], mods)
    changes = rodata_changes(owners, page_link, page_link, bytes(before),
                             [ByteRange(off, off + 3, "", "", "read-only data changed")],
                             Memory(now).read)
    assert [(c.label, c.new_owner) for c in changes] == [("sys_call_table[217]",
                                                           "module rootkit")]
    assert changes[0].message == ("sys_call_table[217] = __x64_sys_getdents64 now points "
                                  "into module rootkit")
    # Unlinked from the module list: the same value is unowned memory.
    owners2 = _owners(profile61, Memory(now), [])
    c2 = rodata_changes(owners2, page_link, page_link, bytes(before),
                        [ByteRange(off + 4, off + 8, "", "", "")], Memory(now).read)
    assert c2[0].message.endswith("now points into unowned memory")


def test_idt_gate_named_by_vector(profile61: KernelProfile) -> None:
    def gate(handler: int) -> bytes:
        return struct.pack("<HHBBHII", handler & 0xFFFF, 0x10, 0, 0xEE,
                           handler >> 16 & 0xFFFF, handler >> 32, 0)

    ks = profile61.kallsyms
    assert ks is not None
    old = ks.lookup("asm_exc_int3")
    assert old is not None and gate_handler(gate(old)) == old
    idt = 0xFFFF_FE00_0000_0000
    before = bytearray(PAGE)
    before[0x80 * 16:0x81 * 16] = gate(old)
    now = bytearray(before)
    now[0x80 * 16:0x81 * 16] = gate(VMALLOC + 0x40)
    owners = _owners(profile61, Memory({idt: bytes(now)}), [])
    changes = idt_changes(owners, idt, 0, bytes(before),
                          [ByteRange(0x800, 0x808, "", "", "")], Memory({idt: bytes(now)}).read,
                          SLIDE)
    assert [c.message for c in changes] == ["idt[0x80] = asm_exc_int3 now points into "
                                            "unowned memory"]


# ------------------------------------------------------------------------- fast path


def _vcpu(cr3: int, index: int = 0) -> VcpuState:
    return VcpuState(index, cr0=0x80050033, cr3=cr3, cr4=0x6B0, efer=0xD01, idtr_base=0,
                     idtr_limit=0xFFF, gdtr_base=0, gdtr_limit=0x7F, rip=0, cpl=0,
                     halted=False)


def test_exec_tables_fingerprint(tmp_path: Path) -> None:
    """NX churn (a new vmalloc page, a new user mapping) leaves it alone; a new
    executable page, an NX bit cleared above a table, or a vCPU on a root with a
    different kernel half does not."""
    ram = SyntheticRam(8 << 20)
    ram.map(KTEXT, 0x200000, MB2, P)
    ram.map(MODS, 0x9000, PAGE, P)
    ram.map(MODS + PAGE, 0xA000, PAGE, P | RW | NX)
    ram.map(VMALLOC, 0xB000, PAGE, P | RW | NX, table_flags=P | RW | NX)
    ram.map(0x7000_0000_0000, 0xC000, PAGE, P | RW | US, table_flags=P | RW | US)

    def fp_now() -> tuple[ExecTables, GuestMemory]:
        mem = ram.save(tmp_path / "ram")
        m = exec_map(mem, ram.pgd, FOUR_LEVEL)
        return ExecTables.from_snapshots({ram.pgd: m.snapshot}), mem

    fp, _ = fp_now()
    assert fp.tables and ram.pgd not in fp.tables

    def still(after: GuestMemory) -> bool:
        return fp.tables_unchanged(after) and fp.roots_match(after, [_vcpu(ram.pgd)]) is None

    ram.map(MODS + 2 * PAGE, 0xD000, PAGE, P | RW | NX)      # NX churn in a watched table
    ram.map(VMALLOC + PAGE, 0xE000, PAGE, P | RW | NX, table_flags=P | RW | NX)
    ram.map(0x7000_0000_1000, 0xF000, PAGE, P | RW | US, table_flags=P | RW | US)
    assert still(ram.save(tmp_path / "ram"))
    # Accessed/dirty bits set by the CPU are not changes.
    pte = MODS & ~0xFFF
    ram.map(pte, 0x9000, PAGE, P | 0x60)
    assert still(ram.save(tmp_path / "ram"))
    ram.map(MODS + 3 * PAGE, 0x10000, PAGE, P)               # a new executable page
    assert not fp.tables_unchanged(ram.save(tmp_path / "ram"))
    fp, _ = fp_now()
    # The NX top entry above vmalloc cleared: the root's kernel half changes (the walk
    # never read below it, so only the root can tell).
    i = (VMALLOC >> 39) & 0x1FF
    ram.put(ram.pgd + i * 8, ram.get(ram.pgd + i * 8) & ~NX)
    mem = ram.save(tmp_path / "ram")
    assert fp.tables_unchanged(mem)
    assert fp.roots_match(mem, [_vcpu(ram.pgd)]) == 0
    fp, mem = fp_now()
    # A second vCPU on a private root: same user half, its own kernel half.
    other = ram.alloc()
    for k in range(512):
        ram.put(other + k * 8, ram.get(ram.pgd + k * 8))
    mem = ram.save(tmp_path / "ram")
    assert fp.roots_match(mem, [_vcpu(ram.pgd), _vcpu(other, 1)]) is None
    ram.put(other + 400 * 8, 0x11000 | P | RW)                # a new kernel-half entry
    mem = ram.save(tmp_path / "ram")
    assert fp.roots_match(mem, [_vcpu(ram.pgd), _vcpu(other, 1)]) == 1


def test_exec_fast_path_remembers_no_stale_verdict(tmp_path: Path) -> None:
    """The fast path keeps the tables' views between passes and remembers raw bytes it
    found fine (tables, roots' kernel halves): an executable mapping added afterwards,
    in place, through the very mapping those views are of, is still seen — on every
    pass, not once — and a root's kernel half changed from a remembered one is not
    accepted for having been fine before."""
    ram = SyntheticRam(8 << 20)
    ram.map(KTEXT, 0x200000, MB2, P)
    ram.map(MODS, 0x9000, PAGE, P)
    path = tmp_path / "ram"
    mem = ram.save(path)
    fp = ExecTables.from_snapshots({ram.pgd: exec_map(mem, ram.pgd, FOUR_LEVEL).snapshot})
    vcpus = [_vcpu(ram.pgd)]
    ref = Reference(views={}, digests={}, fingerprint=TableFingerprint(()), top_index=(),
                    top_values=(), control=control_state(vcpus), exec_tables=fp)
    for _ in range(3):  # the later passes from the remembered raw bytes and kept views
        assert check_registers(ref, mem, vcpus).ok and check_memory(ref, mem).ok
    assert fp._raw and fp._raw_tops and ref.exec_views is not None
    views = ref.exec_views[1]
    ram.map(MODS + PAGE, 0xA000, PAGE, P | RW | NX)            # NX churn: still fine
    ram.save(path)                                             # same file, same mapping
    assert check_memory(ref, mem).ok and ref.exec_views[1] is views
    ram.map(MODS + 2 * PAGE, 0x10000, PAGE, P)                 # a new executable page
    ram.save(path)
    for _ in range(2):
        assert check_memory(ref, mem).outcome is FastOutcome.EXEC_CHANGED
    ram.put(ram.pgd + 300 * 8, 0x11000 | P | RW)               # a new kernel-half entry
    ram.save(path)
    for _ in range(2):
        assert check_registers(ref, mem, vcpus).outcome is FastOutcome.EXEC_CHANGED
    # A new fingerprint (the next full check's) gets views of its own; release drops them.
    ref.exec_tables = ExecTables.from_snapshots(
        {ram.pgd: exec_map(mem, ram.pgd, FOUR_LEVEL).snapshot})
    assert check_memory(ref, mem).ok and ref.exec_views[1] is not views
    ref.release()
    assert ref.exec_views is None
    mem.close()


def test_findings_of_a_scan(profile61: KernelProfile) -> None:
    """Every unowned range is a finding, and so is a walk the guest's tables cut short."""
    owners = _owners(profile61, Memory({}), [])
    acc = account_exec([ExecRange(VMALLOC, 0x100000, 2 * PAGE, True)], owners, None)
    cut = ExecMap((), (0x1000,), False, ("more than 8192 page-table descents toward "
                                         "executable kernel memory: walk stopped",), 0x1000)
    found = exec_findings(ExecScan(acc, ((0x1000, cut),), owners))
    assert [(k, m) for k, m, _ in found] == [
        ("unowned_exec", f"unowned executable kernel memory at {VMALLOC:#x} (2 pages, "
                         "writable)"),
        ("exec_walk_incomplete", "the kernel page table at gpa 0x1000 cannot be walked "
                                 "for executable memory: more than 8192 page-table "
                                 "descents toward executable kernel memory: walk stopped"),
    ]
    assert found[0][2] == {"va": hex(VMALLOC), "pages": 2, "gpa": "0x100000", "writable": True,
                           "why": ""}


def test_tamper_line_names_the_pointer() -> None:
    ev = {"vm": "vm7", "event": "tamper", "action": "pause", "forensics": None,
          "mismatches": [{"region": ".rodata", "page": 0, "basis": "golden", "ranges": [],
                          "pointers": [{"message": "sys_call_table[217] = "
                                        "__x64_sys_getdents64 now points into module x"}]}],
          "findings": [{"kind": "unowned_exec",
                        "message": "unowned executable kernel memory at 0x1000 (1 page)"}]}
    line = human(ev)
    assert "sys_call_table[217] = __x64_sys_getdents64 now points into module x" in line
    assert "unowned executable kernel memory at 0x1000 (1 page)" in line


def test_exec_tables_bound_rests_on_the_keyed_hash(tmp_path: Path) -> None:
    """The tables' executable projection is compared keyed: not with public xxh3 (the
    guest writes the tables and knows their projection, so it could collide one), and
    on the fast path's keyed pass not through the seeded raw-bytes shortcut either — a
    shortcut fooled (here: told the changed bytes are fine, as a seeded collision
    would) still sends a keyed pass to the slow path."""
    import xxhash

    from scanner.check.exec_fastpath import projection
    from scanner.hashing import fast_digest, keyed_digest

    ram = SyntheticRam(8 << 20)
    ram.map(KTEXT, 0x200000, MB2, P)
    ram.map(MODS, 0x9000, PAGE, P)
    mem = ram.save(tmp_path / "ram")
    snap = exec_map(mem, ram.pgd, FOUR_LEVEL).snapshot
    fp = ExecTables.from_snapshots({ram.pgd: snap})
    blob = b"".join(snap[g] for g in fp.tables)
    proj = projection(np.frombuffer(blob, dtype="<u8")).tobytes()
    assert fp.digest == keyed_digest([proj]) != xxhash.xxh3_128_digest(proj)
    assert fp.tables_unchanged(mem)
    ram.map(MODS + PAGE, 0x10000, PAGE, P)                      # a new executable page
    mem = ram.save(tmp_path / "ram")
    fp._raw[:] = [fast_digest(fp.table_views(mem))]            # the shortcut fooled
    assert fp.tables_unchanged(mem)                             # seeded passes: fooled
    assert not fp.tables_unchanged(mem, keyed=True)             # the keyed pass: not

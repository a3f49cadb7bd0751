"""Code outside `.text` that verified patching reached (scanner.check.reached) in the
fast path and in resume records, on synthetic guest memory.

The attack (issue 15 §3): after a check verified `.text`'s calls into an allocated
ftrace trampoline by reading it, overwrite a byte of the trampoline, or remap its page
to a copy — before, the fast path hashed only the four regions and nothing was
reported until a `.text` byte changed again. Here the reader the verifiers use
(`scanner.examine.guest_reader`'s `Recorder`) records what it read; the reference and
the resume record built from it must catch both changes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from scanner.check.fastpath import (
    REACHED_BYTES,
    REACHED_TABLES,
    FastOutcome,
    Reference,
    check_memory,
    check_registers,
    make_reference,
)
from scanner.check.locate import Region
from scanner.check.reached import ReachedRange, Recorder, reached_digest
from scanner.check.resume import Saved, resume_check
from scanner.hashing import DIGEST_SIZE, raw_digests
from tests.synthetic import NX, PAGE, P, SyntheticRam
from tests.test_unit_fastpath import IDT_VA, KEXTAB, KRODATA, KTEXT, vcpu
from translate import FOUR_LEVEL, GuestMemory, PageWalker, TranslationError
from translate.vcpu import VcpuState

TRAMP = 0xFFFF_FFFF_C000_2000  # module area (where create_trampoline allocates)
TRAMP_GPA = 0x260000
TRAMP_SIZE = 0x180  # the bytes the verifier reads: ftrace_caller's copy + ret + ops
FAR = 0xFFFF_FF00_0000_3000  # code in another top-level slot than the regions' (510)
FAR_GPA = 0x270000


@dataclass
class World:
    ram: SyntheticRam
    path: Path
    mem: GuestMemory
    walker: PageWalker
    lk: Any
    vcpus: list[VcpuState]

    def poke(self, gpa: int, data: bytes) -> None:
        with self.path.open("r+b") as f:
            f.seek(gpa)
            f.write(data)

    def recorder(self) -> Recorder:
        """What `scanner.examine.guest_reader` gives the verifiers, over this world."""
        def walk(va: int, size: int) -> tuple[bytes, tuple[tuple[int, int], ...],
                                              tuple[tuple[int, int], ...]] | None:
            try:
                t = self.walker.translate_range(va, size)
            except TranslationError:
                return None
            runs = t.gpa_runs()
            return b"".join(bytes(self.mem.view(g, n)) for g, n in runs), runs, t.entries
        return Recorder(walk)

    def reference(self, reached: tuple[ReachedRange, ...]) -> Reference:
        digests = {n: raw_digests([self.mem.view(g, k) for g, k in r.runs])
                   for n, r in self.lk.regions.items()}
        return make_reference(self.mem, self.lk, self.vcpus, self.ram.pgd, 39, digests,
                              reached)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    rnd = random.Random(15)
    ram = SyntheticRam(4 << 20)
    ram.map(KTEXT, 0x100000, PAGE, P)
    ram.map(KRODATA, 0x200000, PAGE, P | NX)
    ram.map(KEXTAB & ~0xFFF, 0x220000, PAGE, P | NX)
    ram.map(IDT_VA, 0x230000, PAGE, P | NX)
    ram.map(TRAMP, TRAMP_GPA, PAGE, P)  # a module-area page, RO+X as set_memory_rox
    ram.map(FAR, FAR_GPA, PAGE, P)
    for gpa in (0x100000, 0x200000, 0x220000, 0x230000, TRAMP_GPA, FAR_GPA):
        ram.data[gpa:gpa + PAGE] = rnd.randbytes(PAGE)
    path = tmp_path / "ram"
    mem = ram.save(path)
    walker = PageWalker(mem, ram.pgd, FOUR_LEVEL)
    sizes = {".text": PAGE, ".rodata": PAGE, "__ex_table": 0x800, "idt": PAGE}
    vas = {".text": KTEXT, ".rodata": KRODATA, "__ex_table": KEXTAB, "idt": IDT_VA}
    regions = {n: Region(n, vas[n], sizes[n], walker.translate_range(vas[n], sizes[n]))
               for n in sizes}
    w = World(ram, path, mem, walker, SimpleNamespace(regions=regions), [vcpu(0, ram.pgd)])
    try:
        yield w
    finally:
        mem.close()


def leaf_entry(ram: SyntheticRam, va: int) -> tuple[int, int]:
    table = ram.pgd
    for shift in (39, 30, 21, 12):
        egpa = table + ((va >> shift) & 0x1FF) * 8
        e = ram.get(egpa)
        table = e & 0x000F_FFFF_FFFF_F000
    return egpa, e


def verified_trampoline(w: World) -> tuple[ReachedRange, ...]:
    """The reads a trampoline verification makes: a head, then the whole."""
    rec = w.recorder()
    assert rec(TRAMP, 0x40) is not None
    assert rec(TRAMP, TRAMP_SIZE) is not None
    (r,) = rec.ranges()  # one range per address: the longer read
    assert (r.va, len(r.data), r.runs) == (TRAMP, TRAMP_SIZE, ((TRAMP_GPA, TRAMP_SIZE),))
    return rec.ranges()


def test_an_overwritten_trampoline_sends_the_fast_path_to_text(world: World) -> None:
    ref = world.reference(verified_trampoline(world))
    try:
        assert check_memory(ref, world.mem).ok
        world.poke(TRAMP_GPA + 0x10, b"\xcc")
        res = check_memory(ref, world.mem)
        # .text is re-verified (which reads the trampoline again), though no .text
        # byte changed.
        assert res.outcome is FastOutcome.BYTES_CHANGED and res.changed == (".text",)
        assert res.reason == REACHED_BYTES
        # A byte of the page the verifier did not read: not part of the verdict.
        world.poke(TRAMP_GPA + 0x10, bytes([world.ram.data[TRAMP_GPA + 0x10]]))
        world.poke(TRAMP_GPA + TRAMP_SIZE + 8, b"\xcc")
        assert check_memory(ref, world.mem).ok
    finally:
        ref.release()


def test_a_remapped_trampoline_changes_the_tables(world: World) -> None:
    ref = world.reference(verified_trampoline(world))
    try:
        egpa, e = leaf_entry(world.ram, TRAMP)
        assert e & 0x000F_FFFF_FFFF_F000 == TRAMP_GPA
        # A copy with the very same bytes: only the page-table entry tells.
        world.poke(0x300000, bytes(world.ram.data[TRAMP_GPA:TRAMP_GPA + PAGE]))
        world.poke(egpa, ((e & ~0x000F_FFFF_FFFF_F000) | 0x300000).to_bytes(8, "little"))
        res = check_memory(ref, world.mem)
        assert res.outcome is FastOutcome.TABLES_CHANGED and res.reason == REACHED_TABLES
        world.poke(egpa, e.to_bytes(8, "little"))
        assert check_memory(ref, world.mem).ok
    finally:
        ref.release()


def test_without_reached_code_the_reference_is_the_regions_only(world: World) -> None:
    ref = world.reference(())
    try:
        world.poke(TRAMP_GPA + 0x10, b"\xcc")
        assert check_memory(ref, world.mem).ok and ref.reached_runs == []
    finally:
        ref.release()


def test_a_partial_recheck_replaces_the_reached_code(world: World) -> None:
    ref = world.reference(verified_trampoline(world))
    try:
        world.poke(TRAMP_GPA + 0x10, b"\x90")
        assert not check_memory(ref, world.mem).ok
        # .text re-verified: the trampoline as it is now was read and verified.
        ref.set_reached(world.mem, verified_trampoline(world))
        assert check_memory(ref, world.mem).ok
    finally:
        ref.release()


def test_the_digest_is_over_the_bytes_verified_not_a_later_reading(world: World) -> None:
    reached = verified_trampoline(world)
    world.poke(TRAMP_GPA + 0x20, b"\xcc")  # changed after the verifier read it
    ref = world.reference(reached)
    try:
        assert check_memory(ref, world.mem).reason == REACHED_BYTES
    finally:
        ref.release()


def test_a_range_read_twice_with_different_bytes_is_never_unchanged(world: World) -> None:
    """The verifier's head and whole reads straddling a change: verified from a mix of
    two states. The reference can never be 'unchanged': the next pass re-checks."""
    rec = world.recorder()
    assert rec(TRAMP, 0x40) is not None
    world.poke(TRAMP_GPA + 0x8, b"\xcc")  # inside the head
    assert rec(TRAMP, TRAMP_SIZE) is not None
    (r,) = rec.ranges()
    assert r.torn and reached_digest(rec.ranges()) == bytes(DIGEST_SIZE)
    ref = world.reference(rec.ranges())
    try:
        assert check_memory(ref, world.mem).reason == REACHED_BYTES
    finally:
        ref.release()


def test_the_recorder_is_bounded(world: World) -> None:
    rec = Recorder(world.recorder()._walk, max_ranges=2, max_bytes=0x100)
    assert rec(TRAMP, 0x40) is not None and rec(TRAMP + 0x40, 0x40) is not None
    # A third address: over the range bound — unreadable, so it stays unverified.
    assert rec(TRAMP + 0x80, 0x10) is None
    # Growing one range past the byte bound: refused too.
    assert rec(TRAMP, 0x100) is None
    assert [len(r.data) for r in rec.ranges()] == [0x40, 0x40]
    # Unmapped: None, and nothing recorded.
    assert rec(0xFFFF_FFFF_C100_0000, 8) is None and len(rec.ranges()) == 2


def test_resume_records_keep_the_reached_code(world: World) -> None:
    ref = world.reference(verified_trampoline(world))
    saved = Saved.of(ref, "ab" * 20, 0x1E00_0000, "boot", bytes(32), bytes(32), 1, {})
    ref.release()
    back = Saved.from_bytes(saved.to_bytes())
    assert back == saved and back.reached_runs == ((TRAMP_GPA, TRAMP_SIZE),)
    again, why = resume_check(back, world.mem, world.vcpus, "boot")
    assert again is not None, why
    again.release()
    # The trampoline overwritten while kscan was down: no resume, the full path.
    world.poke(TRAMP_GPA + 0x10, b"\xcc")
    again, why = resume_check(back, world.mem, world.vcpus, "boot")
    assert again is None and REACHED_BYTES in why
    # A record whose reached digest does not fit its runs is not one kscan wrote.
    import orjson
    doc = orjson.loads(saved.to_bytes())
    doc["reached_digest"] = ""
    assert Saved.from_bytes(orjson.dumps(doc)) is None
    doc["reached_digest"] = "00" * 16
    doc["reached_tables"] = [[0x1001, [[0, 1]]]]  # not a table page
    assert Saved.from_bytes(orjson.dumps(doc)) is None


def test_every_vcpu_must_map_the_reached_code_as_the_kernel_does(world: World) -> None:
    """Reached code in a top-level slot no region uses: a vCPU whose page table maps
    that slot privately (its own copy of the trampoline) is caught like one that maps
    the kernel privately — at the first reference, and after a partial re-check."""
    ram = world.ram
    slot = (FAR >> 39) & 0x1FF
    other = ram.alloc()
    for i in range(256, 512):
        ram.put(other + i * 8, ram.get(ram.pgd + i * 8))
    private = ram.alloc()  # a private upper table for that slot
    ram.put(other + slot * 8, private | P)
    world.poke(0, bytes(ram.data))  # in place: the file is mapped
    rec = world.recorder()
    assert rec(FAR, 0x40) is not None
    vcpus = [world.vcpus[0], vcpu(1, other)]
    same = [world.vcpus[0], vcpu(1, ram.pgd)]
    world.vcpus = same  # the reference's control state: two vCPUs
    for partial in (False, True):
        ref = world.reference(() if partial else rec.ranges())
        try:
            if partial:
                assert slot not in ref.top_index
                assert check_registers(ref, world.mem, vcpus).ok  # not watched yet
                ref.set_reached(world.mem, rec.ranges(), ram.pgd, 39)
            assert slot in ref.top_index
            res = check_registers(ref, world.mem, vcpus)
            assert res.outcome is FastOutcome.MAPPING_CHANGED and "vCPU 1" in res.reason
            assert check_registers(ref, world.mem, same).ok
        finally:
            ref.release()

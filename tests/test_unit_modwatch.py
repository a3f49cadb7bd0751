"""What `kscan run` says as a guest's module list changes (scanner.run.modwatch), on
synthetic module lists; the real thing is in test_modules_live.py."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

from scanner.check.kernel_lists import ModuleInfo, ModuleList, ModuleMemory
from scanner.image.kernel_profile import KernelProfile
from scanner.image.layouts import DataSymbol
from scanner.run.modwatch import ModuleWatch
from tests.synthetic import NX, RW, P, SyntheticRam
from translate import PageWalker

BASE = 0xFFFF_FFFF_C000_0000


def mod(name: str, i: int, sig_ok: bool | None = True) -> ModuleInfo:
    return ModuleInfo(name, BASE + i * 0x10000 + 0x2000, "live",
                      (ModuleMemory("text", BASE + i * 0x10000, 0x1000),), sig_ok,
                      0 if sig_ok else 0x3000)


def events(w: ModuleWatch, *mods: ModuleInfo, complete: bool = True) -> list[tuple[str, str]]:
    return [(e.event, str(e.fields["name"])) for e in w.update(ModuleList(mods, complete))]


def test_first_read_reports_only_unsigned_modules_then_changes() -> None:
    w = ModuleWatch()
    a, b, evil = mod("virtio_blk", 0), mod("ext4", 1), mod("evil", 2, sig_ok=False)
    first = w.update(ModuleList((a, b, evil), True))
    assert [(e.event, e.fields["name"], e.fields["initial"]) for e in first] == [
        ("module_loaded", "evil", True)]
    assert first[0].fields["text"] == [{"kind": "text", "base": BASE + 0x20000,
                                        "size": 0x1000}]
    assert events(w, a, b, evil) == []                     # nothing changed
    new = mod("new", 3)
    got = w.update(ModuleList((new, a, b, evil), True))
    assert [(e.event, e.fields["name"], e.fields["initial"]) for e in got] == [
        ("module_loaded", "new", False)]
    assert events(w, new, evil) == [("module_unloaded", "virtio_blk"),
                                    ("module_unloaded", "ext4")]


def test_a_module_reloaded_at_another_address_is_both() -> None:
    w = ModuleWatch()
    events(w, mod("m", 0))
    again = mod("m", 5)
    assert sorted(events(w, again)) == [("module_loaded", "m"), ("module_unloaded", "m")]


def test_an_incomplete_read_is_not_compared() -> None:
    """A list cut short (a module being loaded while kscan reads, or a hostile list)
    says nothing about what went: the reference stays until a complete read."""
    w = ModuleWatch()
    a, b = mod("a", 0), mod("b", 1)
    events(w, a, b)
    assert events(w, a, complete=False) == []
    assert events(w, a, b) == []
    assert events(ModuleWatch(), mod("x", 0, sig_ok=False), complete=False) == []


def test_reset_starts_a_new_reference() -> None:
    w = ModuleWatch()
    events(w, mod("a", 0))
    w.reset()
    assert events(w, mod("b", 1)) == []                  # a new boot: no diff with the old
    assert w.known is not None and set(w.known) == {("b", BASE + 0x12000)}


def test_a_list_that_never_closes_is_said_once() -> None:
    """A guest that breaks its module list to silence module events is told on."""
    w = ModuleWatch()
    events(w, mod("a", 0))
    got = [w.update(ModuleList((mod("a", 0),), False, ("cycle",))) for _ in range(6)]
    said = [e for evs in got for e in evs]
    assert [(e.event, e.fields["reads"]) for e in said] == [("module_list_broken", 3)]
    assert said[0].fields["problems"] == ["cycle"]
    assert events(w, mod("a", 0)) == []          # closes again: compared as before


# -- through guest memory: a synthetic RAM file with page tables --------------------


def test_reads_through_page_tables_and_rereads_when_the_head_moves(tmp_path: Path) -> None:
    """The watch reads the list through a real PageWalker over a mapped RAM file, keeps
    the head's 16 bytes, and is due again as soon as a load changes them."""
    from tests.test_kernel_lists import HEAP, MODULES, build

    k, lay = build("6.1", [{"name": "benign", "sig_ok": False, "taints": 0x3000},
                           {"name": "virtio_blk", "sig_ok": True}])
    k.alloc(HEAP + 0x5000, 0x1000)                   # where a module will appear later
    ram = SyntheticRam(4 << 20)
    gpa_of: dict[int, int] = {}
    for va, buf in k.chunks.items():
        page = va & ~0xFFF
        if page not in gpa_of:
            gpa_of[page] = ram.alloc()
            ram.map(page, gpa_of[page], flags=P | RW | NX)
        at = gpa_of[page] + (va - page)
        ram.data[at:at + len(buf)] = buf
    path = tmp_path / "ram"
    mem = ram.save(path)
    walker = PageWalker(mem, ram.pgd)
    profile = KernelProfile(build_id="b", release="r", version="v", sections={}, relocs={},
                            text_head=b"", ex_table=b"", layouts=lay,
                            data_symbols={"modules": DataSymbol(MODULES - 0x1000_0000, "D")})

    def poke(va: int, data: bytes) -> None:
        with open(path, "r+b") as f:
            f.seek(gpa_of[va & ~0xFFF] + (va & 0xFFF))
            f.write(data)

    w = ModuleWatch(every=5)
    assert w.due(mem)                                # never read
    first = w.read(profile, 0x1000_0000, walker)
    assert [(e.event, e.fields["name"]) for e in first] == [("module_loaded", "benign")]
    assert w.last is not None and w.last.complete and len(w.last) == 2
    assert [w.due(mem) for _ in range(3)] == [False] * 3
    # A module is loaded: written, then linked at the head (as list_add_rcu does).
    mod_off = lay["module"]["list"].offset
    new = HEAP + 0x5000
    poke(new + lay["module"]["name"].offset, b"rootkit\0")
    first_node = HEAP + mod_off
    poke(new + mod_off, struct.pack("<QQ", first_node, MODULES))
    poke(first_node + 8, struct.pack("<Q", new + mod_off))
    poke(MODULES, struct.pack("<Q", new + mod_off))
    assert w.due(mem)
    got = w.read(profile, 0x1000_0000, walker)
    assert [(e.event, e.fields["name"], e.fields["sig_ok"]) for e in got] == [
        ("module_loaded", "rootkit", False)]
    # Unchanged head: due again only after `every` passes.
    assert [w.due(mem) for _ in range(5)] == [False] * 4 + [True]
    # The guest loops its list past the head (to silence these events): three reads,
    # then said once.
    poke(first_node, struct.pack("<Q", new + mod_off))
    broken = [w.read(profile, 0x1000_0000, walker) for _ in range(4)]
    assert [[e.event for e in evs] for evs in broken] == [[], [], ["module_list_broken"], []]
    assert "cycle" in broken[2][0].fields["problems"][0]
    # A kernel with no layouts: off, said by `off`, never due.
    bare = dataclasses.replace(profile, layouts=None, btf_note="no BTF here")
    w2 = ModuleWatch()
    assert w2.read(bare, 0, walker) == [] and w2.off == "no BTF here"
    assert not w2.due(mem)

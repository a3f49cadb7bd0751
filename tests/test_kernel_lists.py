"""The module list reader on synthetic kernel memory, laid out with the real kernels'
BTF layouts (6.1: core_layout/init_layout; 6.12: mem[]), and hostile lists."""

from __future__ import annotations

import dataclasses
import functools
import struct

import pytest

from scanner.check.kernel_lists import (
    KernelReader,
    ModuleList,
    read_modules,
    taint_letters,
    walk_list,
)
from scanner.image.btf import parse_btf
from scanner.image.layouts import DataSymbol, Layouts, layouts_from_btf
from tests.realkernels import real_image

MODULES = 0xFFFF_FFFF_82B2_7160      # `modules` (the list head)
HEAP = 0xFFFF_FFFF_C000_0000          # where the synthetic struct modules live
E, OOT = 1 << 13, 1 << 12


@functools.cache
def layouts(which: str) -> Layouts:
    return layouts_from_btf(parse_btf(real_image(which).section_bytes(".BTF")))


class FakeKernel:
    """Sparse kernel memory: `write` anywhere, `read` (a ReadVA) returns None off it."""

    def __init__(self) -> None:
        self.chunks: dict[int, bytearray] = {}
        self.reads = 0

    def alloc(self, va: int, size: int) -> None:
        self.chunks[va] = bytearray(size)

    def write(self, va: int, data: bytes) -> None:
        for base, buf in self.chunks.items():
            if base <= va and va + len(data) <= base + len(buf):
                buf[va - base:va - base + len(data)] = data
                return
        raise AssertionError(f"write outside memory at {va:#x}")

    def u64(self, va: int, v: int) -> None:
        self.write(va, struct.pack("<Q", v))

    def read(self, va: int, size: int) -> bytes | None:
        self.reads += 1
        for base, buf in self.chunks.items():
            if base <= va and va + size <= base + len(buf):
                return bytes(buf[va - base:va - base + size])
        return None


def put(buf: bytearray, lay: Layouts, path: str, value: int) -> None:
    f = lay["module"][path]
    if f.bit_size:
        raise AssertionError("no bitfields in what the test writes")
    buf[f.offset:f.offset + f.size] = value.to_bytes(f.size, "little")


def build(which: str, mods: list[dict[str, object]]) -> tuple[FakeKernel, Layouts]:
    """A `modules` list of struct modules described by `mods` (name, state, sig_ok,
    taints, text/data areas)."""
    lay = layouts(which)
    mod = lay["module"]
    k = FakeKernel()
    k.alloc(MODULES, 16)
    addrs = [HEAP + i * 0x1000 for i in range(len(mods))]
    nodes = [a + mod["list"].offset for a in addrs]
    ring = [MODULES, *nodes]
    for i, d in enumerate(mods):
        buf = bytearray(lay["module"].size)
        put(buf, lay, "state", int(d.get("state", 0)))  # type: ignore[call-overload]
        name = str(d["name"]).encode()
        nf = mod["name"]
        buf[nf.offset:nf.offset + len(name)] = name
        put(buf, lay, "sig_ok", int(bool(d.get("sig_ok", False))))
        put(buf, lay, "taints", int(d.get("taints", 0)))  # type: ignore[call-overload]
        text, size = int(d.get("text", 0x2000)), int(d.get("size", 0x5000))  # type: ignore[call-overload]
        base = int(d.get("base", 0xFFFF_FFFF_C100_0000 + i * 0x10_0000))  # type: ignore[call-overload]
        if "mem" in mod:
            mm = lay["module_memory"]
            kinds = {v: k_ for k_, v in lay.enums.items() if k_.startswith("MOD_")}
            for j in range(mod["mem"].count):
                at = mod["mem"].offset + j * mm.size
                area = {"MOD_TEXT": (base, text), "MOD_DATA": (base + 0x8000, size - text)
                        }.get(kinds.get(j, ""), (0, 0))
                buf[at + mm["base"].offset:at + mm["base"].offset + 8] = \
                    area[0].to_bytes(8, "little")
                buf[at + mm["size"].offset:at + mm["size"].offset + 4] = \
                    area[1].to_bytes(4, "little")
        else:
            put(buf, lay, "core_layout.base", base)
            put(buf, lay, "core_layout.size", size)
            put(buf, lay, "core_layout.text_size", text)
            put(buf, lay, "core_layout.ro_size", text + 0x1000)
            put(buf, lay, "core_layout.ro_after_init_size", text + 0x1000)
        k.alloc(addrs[i], 0x1000)
        k.write(addrs[i], bytes(buf))
    for i, node in enumerate(ring):
        k.u64(node, ring[(i + 1) % len(ring)])
        k.u64(node + 8, ring[i - 1])
    return k, lay


THREE = [{"name": "benign", "sig_ok": False, "taints": E | OOT},
         {"name": "virtio_blk", "sig_ok": True, "taints": 0},
         {"name": "coming_one", "state": 1, "sig_ok": True}]


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_reads_the_module_list(which: str) -> None:
    k, lay = build(which, THREE)
    ml = read_modules(KernelReader(k.read), lay, MODULES)
    assert ml.complete and ml.problems == ()
    assert [m.name for m in ml] == ["benign", "virtio_blk", "coming_one"]
    assert [m.state for m in ml] == ["live", "live", "coming"]
    assert [m.sig_ok for m in ml] == [False, True, True]
    assert ml.modules[0].taint == "OE" and ml.modules[1].taint == ""
    first = ml.modules[0]
    assert first.address == HEAP
    text = first.text
    assert len(text) == 1 and (text[0].base, text[0].size) == (0xFFFF_FFFF_C100_0000, 0x2000)
    if which == "6.1":
        kinds = [(m.kind, m.size) for m in first.memory]
        assert kinds == [("text", 0x2000), ("rodata", 0x1000), ("data", 0x2000)]
    else:
        assert {m.kind for m in first.memory} == {"text", "data"}
    # Owner lookups: by address, in text and data, and not in any module.
    hit = ml.owner(0xFFFF_FFFF_C100_0000 + 0x1FFF)
    assert hit is not None and hit[0].name == "benign" and hit[1].kind == "text"
    hit = ml.owner(0xFFFF_FFFF_C110_0000)
    assert hit is not None and hit[0].name == "virtio_blk"
    assert ml.owner(0xFFFF_FFFF_C100_0000 + 0x5000) is None     # past 6.1's, a gap in 6.12
    assert ml.owner(0xFFFF_FFFF_8100_0000) is None
    assert ml.to_json()["modules"][0]["taint"] == "OE"   # type: ignore[index]


def test_empty_list() -> None:
    k, lay = build("6.1", [])
    ml = read_modules(KernelReader(k.read), lay, MODULES)
    assert ml.complete and len(ml) == 0 and ml.owner(HEAP) is None


def test_a_cycle_that_skips_the_head_is_incomplete_not_endless() -> None:
    k, lay = build("6.1", THREE)
    node = HEAP + 0x2000 + lay["module"]["list"].offset
    k.u64(node, HEAP + lay["module"]["list"].offset)    # third → first, never the head
    ml = read_modules(KernelReader(k.read), lay, MODULES)
    assert not ml.complete and "cycle" in ml.problems[0]
    assert [m.name for m in ml] == ["benign", "virtio_blk", "coming_one"]


@pytest.mark.parametrize("bad", [0x1000, 0xFFFF_FFFF_C000_0003, 0xFFFF_FFFF_DEAD_0000])
def test_bad_next_pointers_stop_the_walk(bad: int) -> None:
    k, lay = build("6.1", THREE)
    k.u64(HEAP + 0x1000 + lay["module"]["list"].offset, bad)
    ml = read_modules(KernelReader(k.read), lay, MODULES)
    assert not ml.complete and [m.name for m in ml] == ["benign", "virtio_blk"]


def test_a_long_list_is_bounded() -> None:
    k, lay = build("6.1", [{"name": f"m{i}"} for i in range(40)])
    ml = read_modules(KernelReader(k.read), lay, MODULES, limit=10)
    assert not ml.complete and len(ml) == 10 and "more than 10" in ml.problems[0]
    # A budget too small for the list: stops, says so, no exception.
    ml = read_modules(KernelReader(k.read, budget=4096), lay, MODULES)
    assert not ml.complete and len(ml) < 40


def test_a_node_unlinked_one_way_is_noted() -> None:
    """A module that removed itself by hand but left a neighbour's prev pointing at it."""
    k, lay = build("6.1", THREE)
    off = lay["module"]["list"].offset
    k.u64(HEAP + off, HEAP + 0x2000 + off)               # benign.next skips virtio_blk
    walk = walk_list(KernelReader(k.read), MODULES)
    assert walk.complete and walk.broken_links == (HEAP + off,)
    ml = read_modules(KernelReader(k.read), lay, MODULES)
    assert [m.name for m in ml] == ["benign", "coming_one"] and ml.problems


def test_hostile_names_and_areas() -> None:
    k, lay = build("6.1", [{"name": "x", "base": 0x7FFF_0000_0000},
                           {"name": "y", "size": 0x1000, "text": 0x2000}])
    nf = lay["module"]["name"]
    k.write(HEAP + nf.offset, b"\x1b[31mevil\\" + b"A" * (nf.size - 9))   # no NUL
    ml = read_modules(KernelReader(k.read), lay, MODULES)
    name = ml.modules[0].name
    assert name.startswith("\\x1b[31mevil\\x5c") and len(name) < 4 * nf.size
    assert ml.modules[0].memory == ()                       # user-space base: dropped
    assert any("not in kernel memory" in p for p in ml.problems)
    assert any("out of order" in p for p in ml.problems)   # y: text beyond size
    for m in ml.modules[1].memory:
        assert m.size <= 0x1000


def test_taint_letters() -> None:
    assert taint_letters(0) == ""
    assert taint_letters(E) == "E" and taint_letters(1 | E | OOT) == "POE"
    assert taint_letters(1 << 40).endswith("?")


def test_owner_with_overlapping_hostile_areas() -> None:
    from scanner.check.kernel_lists import ModuleInfo, ModuleMemory
    a = ModuleInfo("a", HEAP, "live", (ModuleMemory("text", 0xFFFF_FFFF_C000_0000, 0x10_0000),),
                   True, 0)
    b = ModuleInfo("b", HEAP, "live", (ModuleMemory("text", 0xFFFF_FFFF_C000_1000, 0x1000),),
                   True, 0)
    ml = ModuleList((a, b), True)
    assert ml.owner(0xFFFF_FFFF_C000_1800)[0].name == "b"  # type: ignore[index]
    assert ml.owner(0xFFFF_FFFF_C000_3000)[0].name == "a"  # type: ignore[index]


def test_kernel_taint_not_explained_by_listed_modules() -> None:
    """A module that unlinked itself (or rewrote its own record) leaves its taint on the
    kernel's `tainted_mask`: kscan says which taint no listed module accounts for."""
    from scanner.check.kernel_lists import read_guest_modules
    from scanner.image.kernel_profile import KernelProfile

    k, lay = build("6.1", [{"name": "signed_one", "sig_ok": True, "taints": 0}])
    taint_va = MODULES + 0x100
    k.alloc(taint_va, 8)
    W = 1 << 9                                   # a WARN: not a module taint
    k.u64(taint_va, E | OOT | W)
    prof = KernelProfile(build_id="b", release="r", version="v", sections={}, relocs={},
                         text_head=b"", ex_table=b"", layouts=lay,
                         data_symbols={"modules": DataSymbol(MODULES, "D"),
                                       "tainted_mask": DataSymbol(taint_va, "D")})
    ml = read_guest_modules(prof, 0, k.read)
    assert ml.kernel_taints == E | OOT | W
    assert taint_letters(ml.unexplained_taints) == "OE"
    assert ml.to_json()["unexplained_taint"] == "OE" and ml.to_json()["kernel_taint"] == "WOE"
    # A listed unsigned out-of-tree module accounts for both.
    unsigned = dataclasses.replace(ml.modules[0], name="x", taints=E | OOT)
    ml2 = ModuleList((*ml.modules, unsigned), True, kernel_taints=E | OOT | W)
    assert ml2.unexplained_taints == 0
    # No symbol: unknown, nothing claimed.
    bare = dataclasses.replace(prof, data_symbols={"modules": DataSymbol(MODULES, "D")})
    assert read_guest_modules(bare, 0, k.read).to_json()["kernel_taint"] is None


def _with_symbols(which: str, syms: list[tuple[str, int, int]], n: int | None = None
                  ) -> tuple[FakeKernel, Layouts]:
    """One module whose `kallsyms` points at a mod_kallsyms with `syms` (name, value,
    size); `n` overrides num_symtab."""
    k, lay = build(which, [{"name": "withsyms"}])
    mk = lay["mod_kallsyms"]
    mkva, symtab, strtab = HEAP + 0x10000, HEAP + 0x11000, HEAP + 0x12000
    k.alloc(mkva, 0x1000)
    k.alloc(symtab, 0x1000)
    k.alloc(strtab, 0x1000)
    strs = b"\0"
    table = bytes(24)                                   # symbol 0: the null symbol
    for name, value, size in syms:
        table += struct.pack("<IBBHQQ", len(strs), 0x12, 0, 1, value, size)
        strs += name.encode() + b"\0"
    k.write(symtab, table)
    k.write(strtab, strs)
    rec = bytearray(mk.size)
    for f, v in (("symtab", symtab), ("num_symtab", n if n is not None else len(syms) + 1),
                 ("strtab", strtab)):
        rec[mk[f].offset:mk[f].offset + mk[f].size] = v.to_bytes(mk[f].size, "little")
    k.write(mkva, bytes(rec))
    k.u64(HEAP + lay["module"]["kallsyms"].offset, mkva)
    return k, lay


@pytest.mark.parametrize("which", ["6.1", "6.12"])
def test_module_symbols_name_addresses_inside_a_module(which: str) -> None:
    from scanner.check.kernel_lists import read_module_symbols

    text = 0xFFFF_FFFF_C100_0000
    k, lay = _with_symbols(which, [("kscan_hook_cb", text + 0x60, 0x58),
                                   ("init_module", text, 0x40),
                                   ("\x1b[2Jevil", text + 0x200, 0)])
    ml = read_modules(KernelReader(k.read), lay, MODULES)
    syms = read_module_symbols(KernelReader(k.read), lay, ml.modules[0])
    assert syms is not None and len(syms) == 3
    assert syms.symbolize(text + 0x64) == "kscan_hook_cb+0x4 [withsyms]"
    assert syms.symbolize(text) == "init_module [withsyms]"
    assert syms.symbolize(text + 0x50) is None                  # between two symbols
    assert syms.symbolize(text + 0x200) == "\\x1b[2Jevil [withsyms]"
    assert syms.lookup("kscan_hook_cb") == text + 0x60


def test_module_symbols_hostile_counts_and_pointers() -> None:
    from scanner.check.kernel_lists import read_module_symbols

    k, lay = _with_symbols("6.1", [("f", 0xFFFF_FFFF_C100_0000, 8)], n=1 << 30)
    ml = read_modules(KernelReader(k.read), lay, MODULES)
    assert read_module_symbols(KernelReader(k.read), lay, ml.modules[0]) is None
    # A num_symtab past the readable table: nothing is misnamed.
    k, lay = _with_symbols("6.1", [("f", 0xFFFF_FFFF_C100_0000, 8)], n=4000)
    syms = read_module_symbols(KernelReader(k.read), lay, read_modules(
        KernelReader(k.read), lay, MODULES).modules[0])
    assert syms is None or syms.names == ("f",)
    # A kallsyms pointer to user space: falls back to core_kallsyms (empty here).
    k, lay = _with_symbols("6.1", [("f", 0xFFFF_FFFF_C100_0000, 8)])
    k.u64(HEAP + lay["module"]["kallsyms"].offset, 0x4000)
    ml = read_modules(KernelReader(k.read), lay, MODULES)
    assert read_module_symbols(KernelReader(k.read), lay, ml.modules[0]) is None


def test_inspect_text_of_the_module_list() -> None:
    from scanner.commands.inspection import modules_text

    assert modules_text({"off": "kernel image has no .BTF section"}) == [
        "modules: off: kernel image has no .BTF section"]
    k, lay = build("6.1", THREE)
    ml = dataclasses.replace(read_modules(KernelReader(k.read), lay, MODULES),
                             kernel_taints=E | OOT)
    text = modules_text(ml.to_json())
    assert text[0] == "modules: 3 in the kernel's module list"
    assert text[1].split() == ["benign", "live", "UNSIGNED", "taint", "OE", "text",
                               "0xffffffffc1000000+0x2000"]
    assert text[2].split()[2:5] == ["signed", "taint", "-"]
    assert len(text) == 4                                 # OE is explained by benign
    cut = ModuleList(ml.modules[1:], False, ("cycle: node 0x10 seen twice",), E | OOT)
    text = modules_text(cut.to_json())
    assert "INCOMPLETE: cycle" in text[0]
    assert "OE is carried by no listed module" in text[-1]


def test_walk_chain_bounds() -> None:
    """A singly linked chain to a sentinel (ftrace_ops_list): whole, cycled, cut, long."""
    from scanner.check.kernel_lists.lists import walk_chain

    k = FakeKernel()
    var, end, base = 0xFFFF_FFFF_8200_0000, 0xFFFF_FFFF_8200_0100, 0xFFFF_8880_0000_0000
    k.alloc(var, 8)
    k.alloc(base, 0x1000)
    nodes = [base + 0x40 * i for i in range(4)]
    k.u64(var, nodes[0])
    for a, b in zip(nodes, [*nodes[1:], end], strict=True):
        k.u64(a + 8, b)
    mem = KernelReader(k.read)
    got = walk_chain(mem, var, end, next_off=8)
    assert got.complete and got.nodes == tuple(nodes)
    k.u64(nodes[3] + 8, nodes[1])                              # a cycle
    got = walk_chain(mem, var, end, next_off=8, name="x")
    assert not got.complete and got.problem.startswith("x: cycle")
    assert len(walk_chain(mem, var, end, next_off=8, limit=2).nodes) == 2
    k.u64(nodes[3] + 8, 0x1234)                                # out of the kernel half
    assert "not a kernel address" in walk_chain(mem, var, end, next_off=8).problem
    k.u64(nodes[3] + 8, base + 0x2000)                         # unreadable
    assert "unreadable" in walk_chain(mem, var, end, next_off=8).problem

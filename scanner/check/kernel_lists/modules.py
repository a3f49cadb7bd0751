"""The guest's loaded modules, from its own module list (`modules` → `struct module`).

For each module: its name, state (`enum module_state`), the memory it occupies (6.1-6.3:
`core_layout` and `init_layout`, split into text / rodata / ro_after_init / data by their
`*_size` fields; 6.4+: `mem[MOD_MEM_NUM_TYPES]`, typed by `enum mod_mem_type`), whether
the kernel accepted its signature (`sig_ok`, CONFIG_MODULE_SIG) and its taint mask.

What this list can and cannot say: a module that unlinked itself from `modules` is not in
it — that is the point of attribution by memory ranges (an address in no listed module is
the finding). What is listed is read as hostile data: names bounded and escaped, ranges
checked (kernel half, size below 1 GiB, no wrap), at most `MAX_MODULES` entries.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from scanner.check.kernel_lists.lists import walk_list
from scanner.check.kernel_lists.memory import (
    KernelReader,
    field_cstr,
    field_int,
    is_kernel_pointer,
)
from scanner.check.patching import ReadVA
from scanner.image.kernel_profile import KernelProfile
from scanner.image.layouts import Layouts

__all__ = ["MAX_MODULES", "ModuleInfo", "ModuleList", "ModuleMemory", "modules_off",
           "read_guest_modules", "read_modules", "taint_letters"]

MAX_MODULES = 4096
#: A module memory area larger than this is garbage (x86-64's whole module area,
#: MODULES_LEN, is about 1 GiB).
MAX_AREA = 1 << 30

#: Taint bits (include/linux/panic.h; letters as kernel/panic.c's taint_flags print them).
#: A stable ABI (Documentation/admin-guide/tainted-kernels.rst), not a struct layout.
TAINT_LETTERS = "PFSRMBUDAWCIOELKXTN"
TAINT_UNSIGNED = 13   # 'E': a module without a valid signature was loaded
TAINT_OOT = 12        # 'O': an out-of-tree module
#: Taints a module load sets both on the kernel and on that module (add_taint_module):
#: P proprietary, F forced, C staging, O out-of-tree, E unsigned, K livepatch, X aux.
MODULE_TAINTS = sum(1 << TAINT_LETTERS.index(c) for c in "PFCOEKX")


def taint_letters(mask: int) -> str:
    """`mask` as the kernel prints it, one letter per set bit ('' when clean)."""
    return "".join(c for i, c in enumerate(TAINT_LETTERS) if mask >> i & 1) + (
        "?" if mask >> len(TAINT_LETTERS) else "")


@dataclass(frozen=True)
class ModuleMemory:
    """One area of a module: `kind` is text, rodata, ro_after_init, data, init_text,
    init_data, init_rodata (6.4+ names from `mod_mem_type`, lower-cased)."""

    kind: str
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def executable(self) -> bool:
        return self.kind in ("text", "init_text")

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "base": self.base, "size": self.size}


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    address: int             # of its struct module
    state: str               # live, coming, going, unformed, or the number
    memory: tuple[ModuleMemory, ...]
    sig_ok: bool | None      # None: the kernel has no CONFIG_MODULE_SIG
    taints: int

    @property
    def taint(self) -> str:
        return taint_letters(self.taints)

    @property
    def text(self) -> tuple[ModuleMemory, ...]:
        return tuple(m for m in self.memory if m.executable)

    @property
    def signed(self) -> bool | None:
        return self.sig_ok

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "address": self.address, "state": self.state,
                "sig_ok": self.sig_ok, "taints": self.taints, "taint": self.taint,
                "memory": [m.to_json() for m in self.memory]}


@dataclass(frozen=True)
class ModuleList:
    modules: tuple[ModuleInfo, ...]
    #: The whole list was read (came back to `modules`); a diff of an incomplete list
    #: says nothing about what was unloaded.
    complete: bool
    problems: tuple[str, ...] = ()
    #: The kernel-wide taint mask (`tainted_mask`), when the kernel has the symbol.
    kernel_taints: int | None = None
    _index: list[tuple[int, int, int]] = field(default_factory=list, init=False,
                                                repr=False, compare=False)

    def __post_init__(self) -> None:
        for i, mod in enumerate(self.modules):
            for j, m in enumerate(mod.memory):
                if m.size:
                    self._index.append((m.base, i, j))
        self._index.sort()

    def __iter__(self) -> Iterator[ModuleInfo]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def names(self) -> frozenset[str]:
        return frozenset(m.name for m in self.modules)

    def owner(self, addr: int) -> tuple[ModuleInfo, ModuleMemory] | None:
        """The listed module (and its area) whose memory holds `addr`, if any."""
        k = bisect.bisect_right(self._index, (addr, MAX_MODULES, 1 << 16)) - 1
        # Areas of different modules do not overlap in a sane kernel; a hostile one
        # may make them: look back over the few areas that could still cover addr.
        for base, i, j in reversed(self._index[max(0, k - 16):k + 1]):
            m = self.modules[i].memory[j]
            if base <= addr < m.end:
                return self.modules[i], m
        return None

    @property
    def unexplained_taints(self) -> int:
        """Module taints the kernel carries that no listed module does: a module that
        left the list (unloaded, or unlinked itself) or rewrote its own record. Only
        meaningful over a complete list; 0 when the kernel's mask is unknown."""
        if self.kernel_taints is None:
            return 0
        listed = 0
        for m in self.modules:
            listed |= m.taints
        return self.kernel_taints & MODULE_TAINTS & ~listed

    def to_json(self) -> dict[str, object]:
        return {"complete": self.complete, "problems": list(self.problems),
                "kernel_taint": (taint_letters(self.kernel_taints)
                                 if self.kernel_taints is not None else None),
                "unexplained_taint": taint_letters(self.unexplained_taints),
                "modules": [m.to_json() for m in self.modules]}


def _states(layouts: Layouts) -> dict[int, str]:
    return {v: k.removeprefix("MODULE_STATE_").lower() for k, v in layouts.enums.items()
            if k.startswith("MODULE_STATE_")}


def _mem_kinds(layouts: Layouts) -> dict[int, str]:
    return {v: k.removeprefix("MOD_").lower() for k, v in layouts.enums.items()
            if k.startswith("MOD_") and k not in ("MOD_MEM_NUM_TYPES", "MOD_INVALID")}


def _areas(buf: bytes, layouts: Layouts, problems: list[str], name: str
           ) -> tuple[ModuleMemory, ...]:
    mod = layouts["module"]
    out: list[ModuleMemory] = []
    mem = mod.get("mem")
    mm = layouts.get("module_memory")
    if mem is not None and mm is not None and "base" in mm and "size" in mm:
        kinds = _mem_kinds(layouts)
        stride = mm.size
        for i in range(min(mem.count, 16)):
            at = mem.offset + i * stride
            sub = buf[at:at + stride]
            out.append(ModuleMemory(kinds.get(i, str(i)), field_int(sub, mm["base"]),
                                    field_int(sub, mm["size"])))
    else:
        for which, prefix in (("core_layout", ""), ("init_layout", "init_")):
            need = [f"{which}.{k}" for k in ("base", "size", "text_size", "ro_size")]
            if not all(p in mod for p in need):
                continue
            base, size, text, ro = (field_int(buf, mod[p]) for p in need)
            rai_f = mod.get(f"{which}.ro_after_init_size")
            rai = field_int(buf, rai_f) if rai_f is not None else ro
            if not text <= ro <= rai <= size:
                problems.append(f"module {name}: {which} sizes out of order "
                                f"(text {text:#x}, ro {ro:#x}, ro_after_init {rai:#x}, "
                                f"size {size:#x})")
                text, ro, rai = min(text, size), min(ro, size), min(rai, size)
                ro, rai = max(ro, text), max(rai, max(ro, text))
            out += [ModuleMemory(prefix + "text", base, text),
                    ModuleMemory(prefix + "rodata", base + text, ro - text)]
            if not prefix:
                out.append(ModuleMemory("ro_after_init", base + ro, rai - ro))
            out.append(ModuleMemory(prefix + "data", base + rai, size - rai))
    sane = []
    for m in out:
        if m.size == 0:
            continue
        if not is_kernel_pointer(m.base) or m.size > MAX_AREA or m.end > 1 << 64:
            problems.append(f"module {name}: {m.kind} area {m.base:#x}+{m.size:#x} is "
                            "not in kernel memory")
            continue
        sane.append(m)
    return tuple(sane)


def read_modules(mem: KernelReader, layouts: Layouts, modules_va: int, *,
                 limit: int = MAX_MODULES) -> ModuleList:
    """Read the list whose head is the kernel variable `modules` (run-time address)."""
    mod = layouts["module"]
    head = layouts["list_head"]
    walk = walk_list(mem, modules_va, limit=limit, next_off=head["next"].offset,
                     prev_off=head["prev"].offset)
    problems = [walk.problem] if walk.problem else []
    states = _states(layouts)
    list_off = mod["list"].offset
    out: list[ModuleInfo] = []
    complete = walk.complete
    for node in walk.nodes:
        at = node - list_off
        buf = mem.struct(at, mod)
        if buf is None:
            problems.append(f"struct module at {at:#x} cannot be read")
            complete = False
            continue
        name = field_cstr(buf, mod["name"])
        state_v = field_int(buf, mod["state"])
        sig = mod.get("sig_ok")
        taints = mod.get("taints")
        out.append(ModuleInfo(
            name=name, address=at, state=states.get(state_v, str(state_v)),
            memory=_areas(buf, layouts, problems, name),
            sig_ok=bool(field_int(buf, sig)) if sig is not None else None,
            taints=field_int(buf, taints) if taints is not None else 0))
    return ModuleList(tuple(out), complete, tuple(problems[:32]))


def modules_off(profile: KernelProfile) -> str | None:
    """Why the module list of this kernel cannot be read (one line), or None."""
    if profile.layouts_off:
        return profile.layouts_off
    assert profile.layouts is not None
    if "module" not in profile.layouts or "list_head" not in profile.layouts:
        return "the kernel's BTF has no struct module: module list is off"
    need = ("list", "name", "state")
    if not all(n in profile.layouts["module"] for n in need):
        return "the kernel's struct module lacks list/name/state: module list is off"
    if profile.data_symbol("modules") is None:
        return ("no `modules` symbol in the kernel's kallsyms (CONFIG_KALLSYMS_ALL off?): "
                "module list is off")
    return None


def read_guest_modules(profile: KernelProfile, slide: int, read_va: ReadVA, *,
                       limit: int = MAX_MODULES) -> ModuleList:
    """The module list of a located kernel (`modules_off(profile)` must be None)."""
    why = modules_off(profile)
    if why is not None:
        raise ValueError(why)
    assert profile.layouts is not None
    head = profile.data_symbol("modules")
    assert head is not None
    reader = KernelReader(read_va)
    ml = read_modules(reader, profile.layouts, head + slide, limit=limit)
    taint_at = profile.data_symbol("tainted_mask")
    if taint_at is None:
        return ml
    mask = reader.u64(taint_at + slide)
    return dataclasses.replace(ml, kernel_taints=mask) if mask is not None else ml

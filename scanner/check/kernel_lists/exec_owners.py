"""Who may own executable kernel memory, from the kernel's own bookkeeping (pure).

Besides the kernel image's text and listed modules' text (`modules`), the kernel makes
memory executable at run time for:

* ftrace trampolines — `create_trampoline()` (arch/x86/kernel/ftrace.c) copies
  `ftrace_regs_caller`/`ftrace_caller` into memory from `module_alloc`/`execmem_alloc`
  and stores it in `ops->trampoline`/`ops->trampoline_size`; registered ops are on
  `ftrace_ops_list` (singly linked through `next`, ended by `&ftrace_list_end`), and
  ops with an allocated trampoline also on `ftrace_ops_trampoline_list` (`ops->list`);
* kprobe instruction slots — `kprobe_insn_slots`/`kprobe_optinsn_slots` are
  `struct kprobe_insn_cache`s whose `pages` list holds `struct kprobe_insn_page`s, each
  owning the one executable page at `insns`;
* BPF JIT images — every JITed program, BPF trampoline and dispatcher is a
  `struct bpf_ksym` {start, end, name} on `bpf_kallsyms` (`lnode`); since 5.18 small
  images share 2 MiB "packs" (`pack_list` of `struct bpf_prog_pack` {list, ptr,
  bitmap}) that are executable as a whole and filled with int3 where no image is; the
  bitmap is the only record of classic-BPF images (`bpf_prog_create()`, e.g. the PTP
  classifier every kernel JITs at boot), which are never on `bpf_kallsyms`;
* the real-mode trampoline — `set_real_mode_permissions()` (arch/x86/realmode/init.c)
  makes [__va(text_start), __va(PAGE_ALIGN(ro_end))) of the `real_mode_header` blob
  executable in the direct map; it lies below 1 MiB and is smaller than the blob
  (`real_mode_blob_end - real_mode_blob`, link-time symbols).

Each reader is bounded (walks with cycle detection and limits, sizes capped) and says
what it could not read. A guest can forge entries on these lists; callers must hold
what an entry claims to a rule an attacker cannot meet with arbitrary code (content,
size, place), which `scanner.check.execmem` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from scanner.check.kernel_lists.bpf import read_bpf_programs
from scanner.check.kernel_lists.lists import walk_chain, walk_list
from scanner.check.kernel_lists.memory import (
    KernelReader,
    field_int,
    is_kernel_pointer,
)
from scanner.image.kernel_profile import KernelProfile
from scanner.image.layouts import Layouts

__all__ = [
    "BPF_PACK_SIZE",
    "MAX_TRAMPOLINE",
    "ExecOwner",
    "ExecOwners",
    "read_exec_owners",
]

PAGE = 4096
#: A BPF prog pack: `BPF_PROG_PACK_SIZE` is PMD_SIZE per possible NUMA node (one here),
#: handed out in chunks of `BPF_PROG_CHUNK_SIZE` (64) bytes, one bitmap bit each.
BPF_PACK_SIZE = 2 << 20
BPF_CHUNK = 64
#: An ftrace trampoline is the `ftrace_regs_caller` copy plus a return and a pointer:
#: well under a page on every kernel.
MAX_TRAMPOLINE = PAGE
#: Bounds on list lengths (far above a real kernel's).
MAX_OPS = 1024
MAX_KPROBE_PAGES = 4096
MAX_BPF_KSYMS = 65536
MAX_PACKS = 256
#: The real-mode trampoline must sit below 1 MiB (it is entered in real mode).
REALMODE_LIMIT = 1 << 20


@dataclass(frozen=True)
class ExecOwner:
    """An owner the kernel's lists claim for [base, base+size): `kind` is
    ftrace_trampoline, kprobe_insn_page, bpf, bpf_pack or realmode_trampoline."""

    kind: str
    name: str
    base: int
    size: int
    #: Where the claim comes from (the ops, the insn page struct, the ksym...).
    source: int = 0
    #: A BPF pack's allocation bitmap (one bit per `BPF_CHUNK` bytes; empty: unread).
    bitmap: bytes = b""
    #: Where that bitmap lives (kernel VA; 0: unknown), to read it again: see
    #: `scanner.check.execmem` (a chunk allocated after `bitmap` was read).
    bitmap_va: int = 0

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class ExecOwners:
    owners: tuple[ExecOwner, ...]
    #: Every list was read to its end.
    complete: bool
    problems: tuple[str, ...] = ()

    def of_kind(self, kind: str) -> tuple[ExecOwner, ...]:
        return tuple(o for o in self.owners if o.kind == kind)


def _sane(base: int, size: int, limit: int) -> bool:
    return is_kernel_pointer(base) and 0 < size <= limit and base + size <= 1 << 64


def _ftrace(mem: KernelReader, lay: Layouts, sym: dict[str, int], out: list[ExecOwner],
            problems: list[str]) -> bool:
    ops = lay.get("ftrace_ops")
    if ops is None or not all(f in ops for f in ("next", "trampoline", "trampoline_size")):
        problems.append("no ftrace_ops layout: ftrace trampolines not read")
        return False
    complete = True
    claimed: set[tuple[int, int]] = set()

    def claim(at: int) -> None:
        buf = mem.struct(at, ops)
        if buf is None:
            problems.append(f"ftrace_ops at {at:#x} cannot be read")
            return
        tramp = field_int(buf, ops["trampoline"])
        size = field_int(buf, ops["trampoline_size"])
        if tramp and (tramp, at) not in claimed:
            claimed.add((tramp, at))
            if _sane(tramp, size, MAX_TRAMPOLINE):
                out.append(ExecOwner("ftrace_trampoline", f"ftrace_ops {at:#x}", tramp, size,
                                     at))
            else:
                problems.append(f"ftrace_ops {at:#x}: trampoline {tramp:#x}+{size:#x} is "
                                "not a plausible trampoline")

    head, end = sym.get("ftrace_ops_list"), sym.get("ftrace_list_end")
    if head is not None and end is not None:
        chain = walk_chain(mem, head, end, next_off=ops["next"].offset, limit=MAX_OPS,
                           name="ftrace_ops_list")
        if chain.problem:
            problems.append(chain.problem)
        complete &= chain.complete
        for at in chain.nodes:
            claim(at)
    else:
        complete = False
    tl = sym.get("ftrace_ops_trampoline_list")
    lh = lay.get("list_head")
    if tl is not None and "list" in ops and lh is not None:
        walk = walk_list(mem, tl, limit=MAX_OPS, next_off=lh["next"].offset,
                         prev_off=lh["prev"].offset)
        if walk.problem:
            problems.append(f"ftrace_ops_trampoline_list: {walk.problem}")
        complete &= walk.complete
        for node in walk.nodes:
            claim(node - ops["list"].offset)
    return complete


def _kprobes(mem: KernelReader, lay: Layouts, sym: dict[str, int], out: list[ExecOwner],
             problems: list[str]) -> bool:
    cache, page, lh = (lay.get("kprobe_insn_cache"), lay.get("kprobe_insn_page"),
                       lay.get("list_head"))
    if cache is None or page is None or lh is None or "pages" not in cache or not all(
            f in page for f in ("list", "insns")):
        problems.append("no kprobe_insn_cache layout: kprobe slot pages not read")
        return False
    complete = True
    for name in ("kprobe_insn_slots", "kprobe_optinsn_slots"):
        at = sym.get(name)
        if at is None:
            continue
        walk = walk_list(mem, at + cache["pages"].offset, limit=MAX_KPROBE_PAGES,
                         next_off=lh["next"].offset, prev_off=lh["prev"].offset)
        if walk.problem:
            problems.append(f"{name}: {walk.problem}")
        complete &= walk.complete
        for node in walk.nodes:
            kip = node - page["list"].offset
            buf = mem.struct(kip, page)
            if buf is None:
                problems.append(f"{name}: kprobe_insn_page {kip:#x} cannot be read")
                complete = False
                continue
            insns = field_int(buf, page["insns"])
            back = field_int(buf, page["cache"]) if "cache" in page else at
            if back != at or insns % PAGE or not _sane(insns, PAGE, PAGE):
                problems.append(f"{name}: kprobe_insn_page {kip:#x} (insns {insns:#x}, "
                                f"cache {back:#x}) is not one of its pages")
                continue
            out.append(ExecOwner("kprobe_insn_page", name, insns, PAGE, kip))
    return complete


def _bpf(mem: KernelReader, lay: Layouts, sym: dict[str, int], out: list[ExecOwner],
         problems: list[str]) -> bool:
    lh = lay.get("list_head")
    complete = True
    head = sym.get("bpf_kallsyms")
    if head is not None:
        progs, whole = read_bpf_programs(mem, lay, head, limit=MAX_BPF_KSYMS,
                                         problems=problems)
        complete &= whole
        out.extend(ExecOwner("bpf", p.name, p.start, p.end - p.start, p.ksym)
                   for p in progs)
    pack, packs = lay.get("bpf_prog_pack"), sym.get("pack_list")
    if pack is not None and lh is not None and packs is not None and all(
            f in pack for f in ("list", "ptr")):
        walk = walk_list(mem, packs, limit=MAX_PACKS, next_off=lh["next"].offset,
                         prev_off=lh["prev"].offset)
        if walk.problem:
            problems.append(f"pack_list: {walk.problem}")
        complete &= walk.complete
        for node in walk.nodes:
            at = node - pack["list"].offset
            ptr = mem.u64(at + pack["ptr"].offset)
            if ptr is None or ptr % PAGE or not _sane(ptr, BPF_PACK_SIZE, BPF_PACK_SIZE):
                problems.append(f"bpf_prog_pack {at:#x}: ptr is not a pack")
                continue
            bitmap_va = at + pack["bitmap"].offset if "bitmap" in pack else 0
            bitmap = (mem.read(bitmap_va, BPF_PACK_SIZE // BPF_CHUNK // 8)
                      if bitmap_va else None)
            if bitmap is None:
                problems.append(f"bpf_prog_pack {at:#x}: bitmap cannot be read")
                bitmap = b""
            out.append(ExecOwner("bpf_pack", "bpf_prog_pack", ptr, BPF_PACK_SIZE, at,
                                 bitmap, bitmap_va))
    return complete


def _realmode(mem: KernelReader, lay: Layouts, sym: dict[str, int], out: list[ExecOwner],
              problems: list[str]) -> bool:
    hdr_l = lay.get("real_mode_header")
    need = ("real_mode_header", "page_offset_base", "real_mode_blob", "real_mode_blob_end")
    if hdr_l is None or not all(n in sym for n in need) or not all(
            f in hdr_l for f in ("text_start", "ro_end")):
        problems.append("real-mode trampoline not located (no symbols or layout)")
        return False
    blob = sym["real_mode_blob_end"] - sym["real_mode_blob"]
    hdr, pob = mem.u64(sym["real_mode_header"]), mem.u64(sym["page_offset_base"])
    buf = mem.struct(hdr, hdr_l) if hdr is not None and is_kernel_pointer(hdr) else None
    if buf is None or hdr is None or pob is None or not 0 < blob <= REALMODE_LIMIT:
        problems.append("real-mode header cannot be read")
        return False
    text, ro_end = field_int(buf, hdr_l["text_start"]), field_int(buf, hdr_l["ro_end"])
    hdr_pa = hdr - pob
    top = (ro_end + PAGE - 1) & ~(PAGE - 1)
    # The header is the blob's first byte; the executable part lies inside the blob.
    if not (0 <= hdr_pa <= text < top <= min(hdr_pa + blob + PAGE, REALMODE_LIMIT)):
        problems.append(f"real-mode header {hdr:#x}: text {text:#x}..{ro_end:#x} is not "
                        f"inside the {blob:#x}-byte blob below 1 MiB")
        return False
    base = pob + (text & ~(PAGE - 1))
    out.append(ExecOwner("realmode_trampoline", "real-mode trampoline", base,
                         pob + top - base, hdr))
    return True


def read_exec_owners(profile: KernelProfile, slide: int, mem: KernelReader) -> ExecOwners:
    """The run-time owners of executable kernel memory the guest's lists name."""
    lay = profile.layouts
    if lay is None:
        return ExecOwners((), False, (profile.layouts_off or "no struct layouts",))
    sym = {n: d.addr + slide for n, d in profile.data_symbols.items()}
    out: list[ExecOwner] = []
    problems: list[str] = []
    complete = True
    for reader in (_ftrace, _kprobes, _bpf, _realmode):
        complete &= reader(mem, lay, sym, out, problems)
    return ExecOwners(tuple(out), complete, tuple(problems[:32]))

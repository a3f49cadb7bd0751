"""Executable kernel memory, accounted for page by page (pure).

Every executable page of the kernel half (`translate.exec_map`, all vCPUs' kernel roots)
must belong to one of:

* the kernel image's text — [_text, PAGE_ALIGN(_etext)) after the slide (measured on
  Debian's 6.1 and 6.12: the only executable part of the image once `mark_rodata_ro()`
  and `free_initmem()` have run; the direct-map alias of the text is NX);
* a listed module's text (`core_layout`/`init_layout` text, or `mem[MOD_TEXT]`,
  `mem[MOD_INIT_TEXT]`);
* an ftrace trampoline whose first bytes are the kernel's own `ftrace_regs_caller` or
  `ftrace_caller` (what `create_trampoline()` copies): a forged `ftrace_ops` cannot
  claim a page of arbitrary code;
* a kprobe instruction-slot page of `kprobe_insn_slots`/`kprobe_optinsn_slots`;
* a BPF image on `bpf_kallsyms`; a page of a BPF prog pack that holds no image must be
  int3 fill (`bpf_jit_fill_hole()` at allocation, `bpf_arch_text_invalidate()` at
  free), so a pack cannot host code no program claims;
* the real-mode trampoline in the direct map (below 1 MiB, inside the blob's size).

Anything else is tampering: "unowned executable kernel memory at VA (N pages)" — the
text of a module that unlinked itself, a page made executable by hand, shellcode.
Intervals are subtracted, never iterated page by page, so a guest mapping millions of
executable pages costs one pass over its ranges.

Who owns what is `scanner.check.owners.OwnerLookup` (one lookup for this, patch
attribution and pointer tables); `address_owners` reads its lists from the guest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kscan.addresses import hex_addr
from scanner.check.exec_fastpath import ExecTables
from scanner.check.kernel_lists.exec_owners import (
    BPF_CHUNK,
    ExecOwner,
    read_exec_owners,
)
from scanner.check.kernel_lists.memory import KernelReader
from scanner.check.kernel_lists.modules import modules_off, read_guest_modules
from scanner.check.locate import LiveKernel
from scanner.check.owners import OwnerLookup
from scanner.check.patching import ReadVA
from translate import GuestMemory, TranslationError, kernel_space
from translate.exec_map import ExecMap, ExecRange, exec_map
from translate.vcpu import VcpuState

__all__ = ["ExecAccount", "ExecScan", "Unowned", "account_exec",
           "address_owners", "describe_owner", "exec_findings", "scan_exec"]

PAGE = 4096
#: Reported unowned ranges are capped (a guest can make millions).
MAX_REPORTED = 64
#: BPF pack pages one accounting may read to check their int3 fill (a 2 MiB pack is
#: 512 pages; past this budget unclaimed pack pages count as unowned, unchecked).
MAX_FILL_CHECKS = 8192
#: More readings of a pack page whose free chunks hold code, past the first re-read of
#: its bits (`_pack_page_again`): each a race with the guest's BPF loads to lose again.
PACK_REREADS = 2
INT3_PAGE = b"\xcc" * PAGE
INT3_CHUNK = b"\xcc" * BPF_CHUNK



@dataclass(frozen=True)
class Unowned:
    """An executable kernel range nothing owns."""

    va: int
    size: int
    gpa: int
    writable: bool
    why: str = ""

    @property
    def pages(self) -> int:
        return (self.size + PAGE - 1) // PAGE

    @property
    def message(self) -> str:
        extra = f"; {self.why}" if self.why else ""
        return (f"unowned executable kernel memory at {self.va:#x} ({self.pages} page"
                f"{'s' if self.pages != 1 else ''}{', writable' if self.writable else ''}"
                f"{extra})")

    def to_json(self) -> dict[str, object]:
        return {"va": hex_addr(self.va), "pages": self.pages, "gpa": hex_addr(self.gpa),
                "writable": self.writable, "why": self.why}


@dataclass(frozen=True)
class ExecAccount:
    """Executable kernel pages by owner kind, and what no owner claims."""

    pages: int
    by_kind: dict[str, int]
    unowned: tuple[Unowned, ...]
    #: Owner claims rejected (forged or stale list entries), and read problems.
    problems: tuple[str, ...] = ()

    @property
    def unowned_pages(self) -> int:
        return sum(u.pages for u in self.unowned)

    def to_json(self) -> dict[str, object]:
        return {"pages": self.pages, "by_kind": dict(self.by_kind),
                "unowned": [u.to_json() for u in self.unowned],
                "problems": list(self.problems)}


def describe_owner(owners: OwnerLookup | None, addr: int) -> str:
    return owners.describe(addr) if owners is not None else f"{addr:#x}"


def _pack_page(pack: ExecOwner, page: int, data: bytes | None,
               later: bytes | None = None) -> str | None:
    """`bpf_pack` (the page holds allocated chunks and its free chunks are int3),
    `bpf_pack_fill` (all free, all int3), or None (free chunks hold something else, or
    the page or bitmap cannot be read). `later`: the page's bytes of the bitmap read
    again after `data` (a chunk set in either reading is allocated)."""
    if data is None or len(data) != PAGE:
        return None
    per_page = PAGE // BPF_CHUNK
    first = (page - pack.base) // BPF_CHUNK
    if not pack.bitmap and not later:
        return "bpf_pack_fill" if data == INT3_PAGE else None
    used = False
    for k in range(per_page):
        if _bit(pack.bitmap, first + k) or (later is not None and _bit(later, k)):
            used = True
        elif data[k * BPF_CHUNK:(k + 1) * BPF_CHUNK] != INT3_CHUNK:
            return None
    return "bpf_pack" if used else "bpf_pack_fill"


def _pack_page_again(pack: ExecOwner, page: int, data: bytes, read_va: ReadVA | None
                     ) -> str | None:
    """`_pack_page` for a pack page whose free chunks (by the bitmap read with the
    owners) held code, with the page's bits read again after its bytes.

    The bitmap was read before the page: a program loaded since (a seccomp filter at a
    process start, say) is code in chunks that reading calls free. The kernel sets a
    program's bits before it copies its code in, and fills a freed program with int3
    before it clears its bits (bpf_prog_pack_alloc/_free), so code seen in a chunk had
    its bit set then, and still has unless freed since: bits read after the bytes say
    whether it is a program's. A program loaded and freed between the two reads looks
    like code no program holds, so up to `PACK_REREADS` more (bytes, then bits) pairs
    are read before the page is unowned. None of this helps an attacker: the bitmap is
    kernel data it can set bits in anyway (design.md, *Not covered*)."""
    for attempt in range(1 + PACK_REREADS):
        if attempt:
            got = _read(read_va, page, PAGE)
            if got is None:
                return None
            data = got
        later = _bits_again(pack, page, read_va)
        if later is None:
            return None
        kind = _pack_page(pack, page, data, later)
        if kind is not None:
            return kind
    return None


def _bit(bits: bytes, i: int) -> bool:
    return i // 8 < len(bits) and bool(bits[i // 8] >> (i % 8) & 1)


def _bits_again(pack: ExecOwner, page: int, read_va: ReadVA | None) -> bytes | None:
    """The bitmap bytes of a pack page, read again now (None: cannot)."""
    if not pack.bitmap_va:
        return None
    per_page = PAGE // BPF_CHUNK
    return _read(read_va, pack.bitmap_va + (page - pack.base) // BPF_CHUNK // 8,
                 per_page // 8)


def _read(read_va: ReadVA | None, va: int, size: int) -> bytes | None:
    """`size` bytes at `va`, or None: no reader, a failed or short read."""
    if read_va is None:
        return None
    try:
        got = read_va(va, size)
    except Exception:   # a reader failing on hostile addresses is "unreadable"
        return None
    return got if got is not None and len(got) == size else None


def account_exec(ranges: Sequence[ExecRange], owners: OwnerLookup,
                 read_va: ReadVA | None) -> ExecAccount:
    """Split every executable range into owned and unowned pieces (see the module doc)."""
    by_kind: dict[str, int] = {}
    unowned: list[Unowned] = []
    total = 0
    fill_checks = 0

    def add_unowned(va: int, end: int, r: ExecRange, why: str = "") -> None:
        gpa = r.gpa + (va - r.va)
        last = unowned[-1] if unowned else None
        if (last is not None and last.va + last.size == va and last.why == why
                and last.writable == r.writable):
            unowned[-1] = Unowned(last.va, last.size + end - va, last.gpa, r.writable, why)
        elif len(unowned) < MAX_REPORTED:
            unowned.append(Unowned(va, end - va, gpa, r.writable, why))
        else:
            # Counted, not listed: the last entry stands for the rest.
            tail = unowned[-1]
            unowned[-1] = Unowned(tail.va, tail.size + (end - va), tail.gpa, tail.writable,
                                  "and more ranges")

    for r in ranges:
        total += r.pages
        cur, end = r.va, r.end
        while cur < end:
            c = owners.claim_at(cur)
            if c is not None:
                stop = min(end, c.end)
                by_kind[c.kind] = by_kind.get(c.kind, 0) + (stop - cur) // PAGE
                cur = stop
                continue
            nxt = owners.next_claim_base(cur)
            stop = min(end, nxt) if nxt is not None and nxt > cur else end
            # Unclaimed: pages of a BPF pack are the pack's when every chunk its bitmap
            # says is free is int3 fill; anything else there is no program's code.
            pack = owners.pack_at(cur)
            if pack is not None:
                stop = min(stop, pack.end)
                p = cur
                while p < stop:
                    fill_checks += 1
                    data = (read_va(p, PAGE) if read_va is not None
                            and fill_checks <= MAX_FILL_CHECKS else None)
                    kind = _pack_page(pack, p, data)
                    if kind is None and data is not None:
                        kind = _pack_page_again(pack, p, data, read_va)
                    if kind is not None:
                        by_kind[kind] = by_kind.get(kind, 0) + 1
                    else:
                        add_unowned(p, p + PAGE, r, "in a BPF prog pack, in chunks no "
                                    "program holds")
                    p += PAGE
            else:
                add_unowned(cur, stop, r)
            cur = stop
    return ExecAccount(total, by_kind, tuple(unowned),
                       tuple(owners.rejected + list(owners.exec_owners.problems
                                                    if owners.exec_owners else ()))[:32])


@dataclass(frozen=True)
class ExecScan:
    """One slow-path look at executable kernel memory, over every vCPU's kernel root."""

    account: ExecAccount
    #: (root gpa, its walk) for each distinct kernel root (without table snapshots).
    maps: tuple[tuple[int, ExecMap], ...]
    owners: OwnerLookup | None = None
    #: What the fast path compares to prove this accounting still holds.
    fingerprint: ExecTables | None = None

    @property
    def complete(self) -> bool:
        return all(m.complete for _, m in self.maps)

    @property
    def tables(self) -> tuple[int, ...]:
        """Every table page the walks read (the fast path fingerprints them)."""
        return tuple(sorted({t for _, m in self.maps for t in m.tables}))

    def to_json(self) -> dict[str, Any]:
        return {**self.account.to_json(), "roots": [hex_addr(r) for r, _ in self.maps],
                "tables": len(self.tables), "complete": self.complete}


def address_owners(mem_read: ReadVA, lk: LiveKernel) -> OwnerLookup:
    """Everything that owns kernel code, read from the guest through `mem_read`."""
    prof = lk.profile
    modules = None
    if modules_off(prof) is None:
        modules = read_guest_modules(prof, lk.slide, mem_read)
    owners = read_exec_owners(prof, lk.slide, KernelReader(mem_read))
    text = lk.regions[".text"]
    return OwnerLookup.build(prof, lk.slide, (text.va, text.va + text.size), modules,
                             owners, mem_read)


def scan_exec(mem: GuestMemory, vcpus: Sequence[VcpuState], lk: LiveKernel,
              read_va: ReadVA) -> ExecScan:
    """Walk each vCPU's kernel root for executable pages and account for them."""
    maps: dict[int, ExecMap] = {}
    problems: list[str] = []
    nxe = True
    for v in vcpus:
        try:
            sp = kernel_space(mem, v)
        except TranslationError as err:
            problems.append(f"vCPU {v.index}: {err}")
            continue
        nxe &= sp.nxe
        if sp.pgd not in maps:
            maps[sp.pgd] = exec_map(mem, sp.pgd, sp.mode, nxe=sp.nxe)
    fingerprint = ExecTables.from_snapshots({r: m.snapshot for r, m in maps.items()}, nxe)
    maps = {r: dataclasses.replace(m, snapshot={}) for r, m in maps.items()}
    seen: set[ExecRange] = set()
    ranges: list[ExecRange] = []
    for m in maps.values():
        for r in m.ranges:
            if r not in seen:
                seen.add(r)
                ranges.append(r)
    ranges.sort(key=lambda r: (r.va, r.size))
    owners = address_owners(read_va, lk)
    acc = account_exec(ranges, owners, read_va)
    if problems:
        acc = ExecAccount(acc.pages, acc.by_kind, acc.unowned,
                          (tuple(problems) + acc.problems)[:32])
    # The scan outlives the guest memory it read (a report keeps it): no lazy reads.
    owners.reader = None
    return ExecScan(acc, tuple(maps.items()), owners, fingerprint)


def exec_findings(scan: ExecScan) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, message, detail) of each problem the scan found: every unowned range, and
    a walk the guest's tables made incomplete."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for u in scan.account.unowned:
        out.append(("unowned_exec", u.message, u.to_json()))
    for root, m in scan.maps:
        if not m.complete:
            out.append(("exec_walk_incomplete",
                        f"the kernel page table at gpa {root:#x} cannot be walked for "
                        f"executable memory: {'; '.join(m.problems[:2])}",
                        {"root": hex_addr(root), "problems": list(m.problems)}))
    return out

"""The executable part of the kernel half of an address space, enumerated.

`exec_map` walks the upper half of one top-level table (entries 256..511, the kernel's)
and collects every present leaf whose effective permission is executable (NX clear at
every level, EFER.NXE set): a sub-tree under an entry with NX set is skipped without
reading it, which is what keeps the walk of a normal kernel small (the direct map,
vmalloc data and the fixmap are NX at their upper levels or at their leaves).

It returns the executable ranges (virtually and physically contiguous pieces merged) and
the table pages it read on the way to them: those pages, and nothing else, decide which
kernel memory is executable, so a fingerprint of them proves the set unchanged.

The tables are hostile: an entry may point outside RAM (noted, skipped), a table may
point at itself or at a table above it (depth is bounded by the paging mode, so this
only multiplies the work), or the tables may map the same frames at millions of
addresses. The walk reads at most `max_tables` table pages and keeps at most
`max_ranges` ranges; past either bound it stops and says it is incomplete (a guest that
makes the walk incomplete is itself a finding for the caller).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

from translate.errors import TranslationError
from translate.paging import ADDR_MASK, NX, PS, RW, P, PagingMode
from translate.physmem import GuestMemory
from translate.x86 import PAGE

__all__ = ["MAX_RANGES", "MAX_TABLES", "ExecMap", "ExecRange", "exec_map"]

#: Table pages one walk may read. A 6.1 guest reads a few dozen (kernel text in 2 MiB
#: pages, modules and BPF in 4 KiB pages under one or two PMD tables).
MAX_TABLES = 8192
#: Executable ranges one walk may keep.
MAX_RANGES = 65536
_CANON_HIGH = {48: 0xFFFF_0000_0000_0000, 57: 0xFE00_0000_0000_0000}
#: Byte maps for `_candidates`: the present bit of an entry's low byte, and NX clear
#: in its high byte.
_PRESENT = bytes(b & 1 for b in range(256))
_EXEC = bytes(int(b < 0x80) for b in range(256))


def _candidates(raw: bytes, nxe: bool) -> list[int]:
    """Indices of the entries of a table page that are present with NX clear, found
    with byte-string operations (a page of NX or empty entries — most of the direct
    map and vmalloc — costs a few microseconds, not 512 Python steps)."""
    present = int.from_bytes(raw[0::8].translate(_PRESENT), "little")
    mask = present & int.from_bytes(raw[7::8].translate(_EXEC), "little") if nxe else present
    out = []
    while mask:
        low = mask & -mask
        out.append((low.bit_length() - 1) >> 3)
        mask ^= low
    return out


@dataclass(frozen=True)
class ExecRange:
    """A virtually and physically contiguous executable range, uniform in writability."""

    va: int
    gpa: int
    size: int
    writable: bool

    @property
    def end(self) -> int:
        return self.va + self.size

    @property
    def pages(self) -> int:
        return (self.size + PAGE - 1) // PAGE


@dataclass(frozen=True)
class ExecMap:
    ranges: tuple[ExecRange, ...]
    #: GPAs of the table pages read on the way to executable leaves (the top table too).
    tables: tuple[int, ...]
    #: The whole kernel half was walked.
    complete: bool
    #: What was skipped or why the walk stopped (bounded list of lines).
    problems: tuple[str, ...] = ()
    #: The top-level table's gpa, and each table page as the walk read it (gpa → bytes;
    #: for a fingerprint taken from exactly what was walked — dropped after).
    root: int = 0
    snapshot: Mapping[int, bytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def pages(self) -> int:
        return sum(r.pages for r in self.ranges)


def exec_map(mem: GuestMemory, pgd: int, mode: PagingMode, *, nxe: bool = True,
             max_tables: int = MAX_TABLES, max_ranges: int = MAX_RANGES) -> ExecMap:
    """Executable leaves of the kernel half of the table at `pgd`, in VA order."""
    levels = mode.levels
    canon = _CANON_HIGH[mode.va_bits]
    nx_mask = NX if nxe else 0
    problems: list[str] = []
    tables: list[int] = []
    ranges: list[ExecRange] = []
    # Depth-first with an explicit stack of (depth, table gpa, va base, next index,
    # cumulative rw): VA order out, no recursion.
    stack: list[tuple[int, int, int, int, int]] = [(0, pgd & ADDR_MASK, canon, 256, RW)]
    complete = True
    visits = 0

    def note(msg: str) -> None:
        if len(problems) < 32:
            problems.append(msg)

    def read_table(gpa: int) -> memoryview | None:
        # A copy: the walk and the snapshot a fingerprint is taken from see the same
        # entries, whatever the guest writes meanwhile.
        try:
            raw = bytes(mem.view(gpa, PAGE))
        except (TranslationError, ValueError):
            return None
        cands[gpa] = _candidates(raw, nxe)
        return memoryview(raw).cast("Q")

    root = pgd & ADDR_MASK
    cands: dict[int, list[int]] = {}

    def snap() -> dict[int, bytes]:
        return {g: v.tobytes() for g, v in views.items()}

    top = read_table(root)
    if top is None:
        return ExecMap((), (), False, (f"top-level table at gpa {pgd:#x} is outside RAM",))
    tables.append(pgd & ADDR_MASK)
    views: dict[int, memoryview] = {pgd & ADDR_MASK: top}
    while stack:
        depth, table, base, start, rw = stack.pop()
        lvl = levels[depth]
        entries = views[table]
        todo = cands[table]
        for i in todo[bisect.bisect_left(todo, start):]:
            e = int(entries[i])
            if not e & P or e & nx_mask:
                continue
            va = base | (i << lvl.shift)
            erw = rw & e
            if lvl.shift == 12 or e & PS:
                if not lvl.large_ok:
                    note(f"{lvl.name} entry {i} of table {table:#x} sets the large-page bit")
                    continue
                size = 1 << lvl.shift
                frame = e & ADDR_MASK & ~(size - 1)
                w = bool(erw)
                last = ranges[-1] if ranges else None
                if (last is not None and last.end == va and last.gpa + last.size == frame
                        and last.writable == w):
                    ranges[-1] = ExecRange(last.va, last.gpa, last.size + size, w)
                elif len(ranges) >= max_ranges:
                    note(f"more than {max_ranges} executable ranges: walk stopped")
                    return ExecMap(tuple(ranges), tuple(sorted(set(tables))), False,
                                   tuple(problems), root, snap())
                else:
                    ranges.append(ExecRange(va, frame, size, w))
                continue
            child = e & ADDR_MASK
            # Bound descents, not just distinct tables: one table referenced from every
            # entry of every level above it is few tables but 512^n descents.
            visits += 1
            if visits > max_tables:
                note(f"more than {max_tables} page-table descents toward executable "
                     "kernel memory: walk stopped")
                return ExecMap(tuple(ranges), tuple(sorted(set(tables))), False,
                               tuple(problems), root, snap())
            view = views.get(child)
            if view is None:
                view = read_table(child)
                if view is None:
                    note(f"{lvl.name} entry {i} of table {table:#x} points at gpa "
                         f"{child:#x}, outside RAM")
                    complete = False
                    continue
                views[child] = view
                tables.append(child)
            # Resume this table after entry i once the child is done (DFS, VA order).
            stack.append((depth, table, base, i + 1, rw))
            stack.append((depth + 1, child, va, 0, erw))
            break
    return ExecMap(tuple(ranges), tuple(sorted(set(tables))), complete, tuple(problems),
                   root, snap())

"""The fast path's proof that executable kernel memory is as accounted for (pure).

Which kernel memory is executable is decided by the page-table pages the slow path's
walk (`translate.exec_map`) read: the kernel half of each vCPU's root and the tables
below it that are not under an NX entry. `ExecTables` keeps, from exactly the bytes
that walk read, the *executable projection* of those pages — every entry that is
present with NX clear, accessed/dirty bits masked; zero for the rest — so a new or
changed executable mapping anywhere changes it, while the constant churn of NX
mappings (vmalloc'd stacks and buffers, the direct map) does not. Roots are compared
by their kernel half only (the user half changes with every mmap), and every vCPU's
current root must have a kernel half equal to one seen at the slow path (processes
share the kernel half; a private one is exactly what an attacker would use).

A change sends the VM down the slow path, which walks and accounts again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from scanner.hashing import fast_digest, keyed_digest
from translate import GuestMemory, TranslationError, kernel_pgd_candidates
from translate.vcpu import VcpuState

__all__ = ["ExecTables", "projection"]

PAGE = 4096
_HALF = PAGE // 2
#: Raw kernel halves of roots remembered as accounted for (beyond this, forgotten).
_RAW_TOPS_MAX = 64
_P = np.uint64(1)
_NX_SHIFT = np.uint64(63)
#: Accessed and dirty: the CPU sets them in place, they grant nothing.
_AD = np.uint64(0x60)


def projection(words: np.ndarray, nxe: bool = True) -> np.ndarray:
    """Entries present (and with NX clear, under EFER.NXE) with A/D masked; 0 else."""
    keep = (words & _P) == _P
    if nxe:
        keep &= (words >> _NX_SHIFT) == 0
    return np.where(keep, words & ~_AD, np.uint64(0))


def _top_half(page: bytes | memoryview, nxe: bool) -> bytes:
    w = np.frombuffer(page, dtype="<u8", count=512)
    return bytes(projection(w[256:], nxe).tobytes())


def _digest(pages: Iterable[bytes | memoryview], nxe: bool) -> bytes:
    blob = b"".join(pages)
    if not blob:
        return b""
    # Keyed (the host key's construction, `scanner.hashing`): the guest writes these
    # tables and knows the projection, so an unkeyed hash could be collided to hide a
    # new executable mapping. Computed only at the slow path, on NX churn and on keyed
    # passes (~100 KB: tens of µs).
    return keyed_digest([projection(np.frombuffer(blob, dtype="<u8"), nxe).tobytes()])


@dataclass(frozen=True)
class ExecTables:
    """Executable projection of the kernel half of each root, and of the tables below."""

    tops: frozenset[bytes]
    tables: tuple[int, ...]
    digest: bytes
    nxe: bool = True
    #: The seeded xxh3 (`scanner.hashing.fast_digest`) of the tables' raw bytes when
    #: their projection was last found unchanged: equal raw bytes need no projection
    #: (the common pass, ~20 µs instead of ~300).
    _raw: list[bytes] = field(default_factory=list, compare=False, repr=False)
    #: Raw kernel halves of roots whose projection is in `tops`: a root whose raw half
    #: is one of them needs no projection either (equal bytes, equal projection).
    _raw_tops: set[bytes] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def from_snapshots(cls, roots: Mapping[int, Mapping[int, bytes]], nxe: bool = True
                       ) -> ExecTables:
        """From the walks' snapshots: root gpa → (table gpa → the bytes the walk read)."""
        tops = frozenset(_top_half(snap[root], nxe) for root, snap in roots.items()
                         if root in snap)
        below: dict[int, bytes] = {}
        for snap in roots.values():
            for gpa, page in snap.items():
                if gpa not in roots:
                    below.setdefault(gpa, page)
        order = tuple(sorted(below))
        return cls(tops, order, _digest((below[g] for g in order), nxe), nxe)

    def roots_match(self, mem: GuestMemory, vcpus: Sequence[VcpuState]) -> int | None:
        """None if every vCPU's kernel root has a known kernel half; else the index of
        the first vCPU whose does not."""
        known = self._raw_tops
        for v in vcpus:
            ok = False
            for pgd in kernel_pgd_candidates(v.cr3):
                try:
                    page = mem.view(pgd, PAGE)
                except TranslationError:
                    continue
                raw = bytes(page[_HALF:])
                if raw in known or _top_half(page, self.nxe) in self.tops:
                    if raw not in known:
                        if len(known) >= _RAW_TOPS_MAX:
                            known.clear()
                        known.add(raw)
                    ok = True
                    break
            if not ok:
                return v.index
        return None

    def table_views(self, mem: GuestMemory) -> list[memoryview]:
        """Views of the tables in order (TranslationError if one is not in RAM). Over
        zero-copy memory they stay current: the fast path keeps them between passes."""
        return [mem.view(g, PAGE) for g in self.tables]

    def tables_unchanged(self, mem: GuestMemory,
                         views: Sequence[memoryview] | None = None,
                         keyed: bool = False) -> bool:
        """Whether the tables' executable projection is the one accounted for. `views`:
        `table_views(mem)` kept from an earlier pass (zero-copy memory only). `keyed`:
        compare the keyed projection digest even if the raw bytes' seeded digest is one
        already found fine (the fast path's keyed pass: the bound does not rest on the
        seeded hash)."""
        if views is None:
            try:
                views = self.table_views(mem)
            except TranslationError:
                return False
        if not keyed and self._raw and self._raw[0] == fast_digest(views):  # no copy
            return True
        blob = b"".join(views)     # one copy: the raw digest and the projection agree
        if _digest((blob,), self.nxe) != self.digest:
            return False
        self._raw[:] = [fast_digest([blob])]  # NX churn only: remember these bytes as fine
        return True

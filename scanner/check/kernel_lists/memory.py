"""Bounded typed reads of guest-virtual kernel memory for the list readers.

A `KernelReader` wraps a `ReadVA` (None for anything unmapped) and counts what it reads:
a reader that hits its byte budget stops answering, so a hostile list cannot make one
pass read without end. Reads outside the kernel half of the address space are refused
(a kernel pointer into user space is as good as garbage here).
"""

from __future__ import annotations

import struct

from scanner.check.patching import ReadVA
from scanner.image.layouts import Field, StructLayout
from translate import PageWalker, TranslationError

__all__ = ["KERNEL_HALF", "KernelReader", "is_kernel_pointer", "walker_reader"]

#: Lowest kernel address (4-level paging; 5-level kernels start lower still but their
#: allocations used here — modules, vmalloc, direct map — lie above it too).
KERNEL_HALF = 0xFF00_0000_0000_0000
#: Default bytes one reader may read (a module list of 4096 entries reads ~4 MB).
DEFAULT_BUDGET = 8 << 20
MAX_STRING = 256
#: The largest single read a walker reader serves.
MAX_READ = 1 << 16
PAGE = 4096
_MAX_CACHED = 4096


def is_kernel_pointer(va: int) -> bool:
    return KERNEL_HALF <= va <= 0xFFFF_FFFF_FFFF_FFFF


def walker_reader(walker: PageWalker) -> ReadVA:
    """A `ReadVA` through one kernel page table: None for anything unmapped, outside
    RAM, or larger than MAX_READ. (Copies: these reads are small.)

    The translation of each 4 KiB page is kept for the life of the reader (one pass:
    make a new reader for each), at most `_MAX_CACHED` pages: a list walk reads a
    node's `next` and its neighbour's `prev` from the same pages, and walking the
    tables again for each would be most of its cost."""
    mem = walker.mem
    pages: dict[int, int | None] = {}

    def page_gpa(page: int) -> int | None:
        if page in pages:
            return pages[page]
        try:
            m = walker.translate(page)
            gpa: int | None = m.gpa if mem.contains(m.gpa, PAGE) else None
        except (TranslationError, OverflowError, ValueError):
            gpa = None
        if len(pages) < _MAX_CACHED:
            pages[page] = gpa
        return gpa

    def read(va: int, size: int) -> bytes | None:
        if not 0 < size <= MAX_READ:
            return None
        off = va & (PAGE - 1)
        if off + size <= PAGE:
            gpa = page_gpa(va - off)
            return None if gpa is None else bytes(mem.view(gpa + off, size))
        try:
            t = walker.translate_range(va, size)
            return b"".join(bytes(mem.view(g, n)) for g, n in t.gpa_runs())
        except (TranslationError, OverflowError, ValueError):
            return None

    return read


class KernelReader:
    """Typed, budgeted reads; every method returns None when memory cannot be read."""

    def __init__(self, read_va: ReadVA, budget: int = DEFAULT_BUDGET) -> None:
        self._read = read_va
        self.budget = budget
        self.used = 0

    @property
    def exhausted(self) -> bool:
        return self.used >= self.budget

    def read(self, va: int, size: int) -> bytes | None:
        if size <= 0 or not is_kernel_pointer(va) or va + size > 1 << 64:
            return None
        if self.used + size > self.budget:
            self.used = self.budget
            return None
        self.used += size
        data = self._read(va, size)
        if data is None or len(data) != size:
            return None
        return data

    def u64(self, va: int) -> int | None:
        b = self.read(va, 8)
        return None if b is None else int(struct.unpack("<Q", b)[0])

    def struct(self, va: int, layout: StructLayout) -> bytes | None:
        """The bytes of one whole struct at `va` (one read: fields then agree)."""
        return self.read(va, layout.size)


def field_int(buf: bytes, f: Field) -> int:
    """The unsigned value of a field (bitfields included) in a struct's bytes."""
    if f.bit_size:
        nbytes = (f.bit_shift + f.bit_size + 7) // 8
        raw = int.from_bytes(buf[f.offset:f.offset + nbytes], "little")
        return (raw >> f.bit_shift) & ((1 << f.bit_size) - 1)
    return int.from_bytes(buf[f.offset:f.offset + min(f.size, 8)], "little")


def field_cstr(buf: bytes, f: Field, limit: int = MAX_STRING) -> str:
    """A NUL-terminated char array field, bounded, non-printables escaped."""
    raw = buf[f.offset:f.offset + min(f.size, limit)]
    raw = raw.split(b"\0", 1)[0]
    return "".join(c if c.isprintable() and c != "\\" else f"\\x{ord(c):02x}"
                   for c in raw.decode("latin-1"))

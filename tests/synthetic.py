"""Builders for synthetic guest memory: page tables written into a RAM file by tests.

`SyntheticRam` is a bytearray-backed guest RAM that tests fill with page tables and
data, then save to a file so the real `GuestMemory` maps it exactly like a QEMU
memory-backend file. The builder is the independent oracle: it records what it mapped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from translate import GuestMemory, RamRange

PAGE = 4096
P, RW, US, PS = 1, 2, 4, 0x80
NX = 1 << 63


@dataclass
class SyntheticRam:
    size: int
    levels: int = 4
    data: bytearray = field(init=False)
    next_free: int = field(init=False)
    pgd: int = field(init=False)
    mapped: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # va → (pa, size, flags)

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)
        self.next_free = 0x1000  # page 0 stays empty: a null table is a bug
        self.pgd = self.alloc()

    def alloc(self) -> int:
        gpa = self.next_free
        if gpa + PAGE > self.size:
            raise MemoryError("synthetic RAM is full")
        self.next_free += PAGE
        return gpa

    def put(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.data, gpa, value & 0xFFFF_FFFF_FFFF_FFFF)

    def get(self, gpa: int) -> int:
        return int(struct.unpack_from("<Q", self.data, gpa)[0])

    def shifts(self) -> list[int]:
        return [48, 39, 30, 21, 12][5 - self.levels:]

    def map(self, va: int, pa: int, size: int = PAGE, flags: int = P | RW,
            table_flags: int = P | RW) -> None:
        """Map one page of `size` (4 KiB, 2 MiB or 1 GiB) at va → pa."""
        leaf_shift = {PAGE: 12, 1 << 21: 21, 1 << 30: 30}[size]
        table = self.pgd
        for shift in self.shifts():
            idx = (va >> shift) & 0x1FF
            egpa = table + idx * 8
            if shift == leaf_shift:
                self.put(egpa, pa | flags | (PS if shift != 12 else 0))
                self.mapped[va] = (pa, size, flags)
                return
            e = self.get(egpa)
            if not e & P:
                nt = self.alloc()
                self.put(egpa, nt | table_flags)
                table = nt
            else:
                table = e & 0x000F_FFFF_FFFF_F000

    def save(self, path: Path) -> GuestMemory:
        path.write_bytes(self.data)
        return GuestMemory([RamRange(0, self.size, str(path), 0)], name="synthetic")

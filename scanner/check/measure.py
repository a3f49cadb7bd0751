"""Reading protected regions out of guest memory: zero-copy views for the fast path, a
normalized copy (KASLR undone) for the slow path and baselines. Hashes: `scanner.hashing`.
"""

from __future__ import annotations

import numpy as np

from scanner.check.idt import normalize_idt
from scanner.check.locate import LiveKernel, Region
from scanner.check.normalize import normalize_into
from scanner.hashing import raw_digests
from scanner.image.altreloc import normalize_alt
from translate import GuestMemory

__all__ = ["read_normalized", "region_views"]



def region_views(mem: GuestMemory, region: Region) -> list[memoryview]:
    """Zero-copy views of a region's physically contiguous runs."""
    return [mem.view(gpa, n) for gpa, n in region.runs]


def read_normalized(mem: GuestMemory, lk: LiveKernel, name: str,
                    idtr_limit: int = 0xFFF) -> tuple[bytearray, bytes]:
    """A copy of the region with KASLR undone (relocation sites; IDT gate handlers), and
    the raw digests (`scanner.hashing.raw_digests`: fast and keyed) of exactly the bytes
    that were copied — so a later fast-path digest equal to it proves the region still
    holds what was verified."""
    raw = bytearray().join(region_views(mem, lk.regions[name]))
    digest = raw_digests([raw])
    if name == "idt":
        return normalize_idt(raw, idtr_limit, lk.slide), digest
    normalize_alt(raw, lk.profile.alt_relocs.get(name), lk.slide)
    normalize_into(np.frombuffer(raw, dtype=np.uint8), lk.profile.relocs[name], lk.slide)
    return raw, digest

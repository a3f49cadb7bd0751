"""Reading and hashing protected regions: raw digests (fast path), normalized bytes and
per-page hashes (slow path and baselines).

Hashes are xxHash: xxh3_128 for whole regions, xxh3_64 per 4 KiB page. They detect
change, not collisions crafted by an adversary who can see kscan's baseline — the
baseline lives on the host, out of the guest's reach. python-xxhash ≥ 4 releases the
GIL on buffers over 64 KiB, so slow paths in worker threads hash without blocking the
event loop's own fast passes.

"Page" here means a 4 KiB chunk of a region counted from the region's start (a region
need not start on a page boundary: `__ex_table` does not).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

from scanner.altreloc import normalize_alt
from scanner.idt import normalize_idt
from scanner.kernel import LiveKernel, Region
from scanner.normalize import normalize_into
from translate import GuestMemory

__all__ = ["PAGE", "page_hashes", "raw_digest", "read_normalized", "region_views"]

PAGE = 4096


def region_views(mem: GuestMemory, region: Region) -> list[memoryview]:
    """Zero-copy views of a region's physically contiguous runs."""
    return [mem.view(gpa, n) for gpa, n in region.runs]


def raw_digest(views: Sequence[memoryview]) -> bytes:
    """xxh3_128 of a region's bytes as they are in guest memory (no copy)."""
    if len(views) == 1:
        return xxhash.xxh3_128_digest(views[0])
    h = xxhash.xxh3_128()
    for v in views:
        h.update(v)
    return h.digest()


def read_normalized(mem: GuestMemory, lk: LiveKernel, name: str,
                    idtr_limit: int = 0xFFF) -> tuple[bytearray, bytes]:
    """A copy of the region with KASLR undone (relocation sites; IDT gate handlers), and
    the raw digest of exactly the bytes that were copied — so a later fast-path digest
    equal to it proves the region still holds what was verified."""
    raw = bytearray().join(region_views(mem, lk.regions[name]))
    digest = xxhash.xxh3_128_digest(raw)
    if name == "idt":
        return normalize_idt(raw, idtr_limit, lk.slide), digest
    normalize_alt(raw, lk.profile.alt_relocs.get(name), lk.slide)
    normalize_into(np.frombuffer(raw, dtype=np.uint8), lk.profile.relocs[name], lk.slide)
    return raw, digest



def page_hashes(buf: bytes | bytearray | memoryview) -> list[int]:
    """xxh3_64 of each 4 KiB chunk (the last may be shorter)."""
    mv = memoryview(buf)
    h = xxhash.xxh3_64_intdigest
    return [h(mv[i:i + PAGE]) for i in range(0, len(mv), PAGE)]


def region_hash(buf: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(buf)

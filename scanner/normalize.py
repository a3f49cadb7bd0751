"""KASLR normalization: undo the boot-time relocations inside a protected region.

At boot the kernel adds its KASLR slide to every 32-bit and 64-bit relocation site and
subtracts it at inverse 32-bit sites (arch/x86/boot/compressed/misc.c,
handle_relocations). Undoing that — subtracting at 32/64-bit sites, adding at inverse
sites — turns the bytes of two VMs with the same kernel but different slides into
the same bytes, so one golden baseline serves every VM of that kernel.

Vectorised with numpy: one gather and one scatter per site kind. Normalization copies
the region (it must not write guest memory); that copy is the slow path's cost and is
taken only when the fast path saw a change, or at baseline time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["RegionRelocs", "normalize", "normalize_into"]

I64Array = npt.NDArray[np.int64]
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RegionRelocs:
    """Relocation sites of one region, as byte offsets from the region's start. Only
    sites wholly inside the region are kept."""

    r64: I64Array
    r32: I64Array
    r32_inv: I64Array

    @classmethod
    def empty(cls) -> RegionRelocs:
        return cls(_EMPTY, _EMPTY, _EMPTY)

    @classmethod
    def from_addresses(cls, start: int, size: int, r64: npt.ArrayLike, r32: npt.ArrayLike,
                       r32_inv: npt.ArrayLike) -> RegionRelocs:
        """Pick the sites of [start, start+size) out of link-time address lists."""

        def pick(addrs: npt.ArrayLike, width: int) -> I64Array:
            a = np.asarray(addrs, dtype=np.uint64)
            lo, hi = np.uint64(start), np.uint64(start + size - width)
            sel = a[(a >= lo) & (a <= hi)]
            return np.unique((sel - lo).astype(np.int64))

        return cls(pick(r64, 8), pick(r32, 4), pick(r32_inv, 4))

    @property
    def count(self) -> int:
        return int(self.r64.size + self.r32.size + self.r32_inv.size)

    def pages(self) -> set[int]:
        """4 KiB page indices that contain (part of) a relocation site."""
        out: set[int] = set()
        for arr, width in ((self.r64, 8), (self.r32, 4), (self.r32_inv, 4)):
            out.update((arr >> 12).tolist())
            out.update(((arr + width - 1) >> 12).tolist())
        return out


def _adjust(buf: npt.NDArray[np.uint8], offsets: I64Array, width: int, delta: int) -> None:
    if offsets.size == 0 or buf.size < width:
        return
    offsets = offsets[(offsets >= 0) & (offsets + width <= buf.size)]
    dtype = np.dtype("<u8") if width == 8 else np.dtype("<u4")
    # A byte-strided view: element i is the (unaligned) integer starting at byte i, so
    # one gather and one scatter handle every site. Sites never overlap.
    sites: npt.NDArray[Any] = np.ndarray(shape=(buf.size - width + 1,), dtype=dtype,
                                         buffer=buf.data, offset=0, strides=(1,))
    mask = (1 << (8 * width)) - 1
    # Wrapping arithmetic in the site's width, as the kernel's += does.
    sites[offsets] = sites[offsets] + dtype.type(delta & mask)


def normalize_into(buf: npt.NDArray[np.uint8], relocs: RegionRelocs, slide: int) -> None:
    """Undo `slide` at every site, in place, in a writable uint8 array."""
    if slide == 0:
        return
    _adjust(buf, relocs.r64, 8, -slide)
    _adjust(buf, relocs.r32, 4, -slide)
    _adjust(buf, relocs.r32_inv, 4, slide)


def normalize(data: bytes | bytearray | memoryview, relocs: RegionRelocs,
              slide: int) -> bytearray:
    """A normalized copy of a region's bytes."""
    out = bytearray(data)  # the one copy: guest memory is read-only to us
    normalize_into(np.frombuffer(out, dtype=np.uint8), relocs, slide)
    return out

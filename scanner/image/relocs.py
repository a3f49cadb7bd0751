"""KASLR relocation sites of one protected region, as stored in a kernel profile.

The image's relocation table lists link-time addresses; a profile keeps, per protected
region, the byte offsets of the sites wholly inside it, by kind (64-bit, 32-bit, inverse
32-bit). `scanner.check.normalize` undoes the slide at those offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["I64Array", "RegionRelocs"]

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

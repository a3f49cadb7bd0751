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

from typing import Any

import numpy as np
import numpy.typing as npt

from scanner.image.relocs import I64Array, RegionRelocs

__all__ = ["RegionRelocs", "normalize", "normalize_into"]


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

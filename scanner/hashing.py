"""The hashes kscan compares: one definition for profiles, baselines, checks and fast passes.

xxHash: xxh3_64 per 4 KiB page, xxh3_128 for whole regions. They detect change, not
collisions crafted by an adversary who can see kscan's baseline — the baseline lives on
the host, out of the guest's reach. python-xxhash ≥ 4 releases the GIL on buffers over
64 KiB, so slow paths in worker threads hash without blocking the event loop.

A page hash computed at `profile add` time (over the image file's bytes) is compared
with one computed at run time (over guest memory): both must come from `page_hashes`
here, or every `.rodata` page would silently look per-boot.

"Page" means a 4 KiB chunk counted from a region's start (a region need not start on a
page boundary: `__ex_table` does not); the last chunk may be shorter.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from translate.x86 import PAGE

__all__ = ["page_hash", "page_hashes", "raw_digest", "region_hash"]

Buffer = bytes | bytearray | memoryview


def page_hash(page: Buffer) -> int:
    """xxh3_64 of one page (or last, shorter chunk)."""
    return xxhash.xxh3_64_intdigest(page)


def page_hashes(buf: Buffer) -> list[int]:
    """`page_hash` of each 4 KiB chunk of a region (the last may be shorter)."""
    mv = memoryview(buf)
    h = xxhash.xxh3_64_intdigest
    return [h(mv[i:i + PAGE]) for i in range(0, len(mv), PAGE)]


def region_hash(buf: Buffer) -> bytes:
    """xxh3_128 of a whole region."""
    return xxhash.xxh3_128_digest(buf)


def raw_digest(views: Sequence[memoryview]) -> bytes:
    """xxh3_128 of a region's bytes as they are in guest memory, over its physically
    contiguous runs, without copying; equal to `region_hash` of the runs joined."""
    if len(views) == 1:
        return xxhash.xxh3_128_digest(views[0])
    h = xxhash.xxh3_128()
    for v in views:
        h.update(v)
    return h.digest()

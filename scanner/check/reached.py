"""Code outside `.text` that a verified patch reaches: what the check read, kept checked.

The patch verifiers (`scanner.check.patching`) follow some `.text` changes out of
`.text` — a `call` to an ftrace trampoline the kernel allocated, a `jmp` to an optprobe
slot — and verify the target by reading it through the kernel page table. A verdict
"verified patching" then rests on those bytes and on the page-table entries that map
them as much as on `.text` itself, so they join the VM's checked state: the fast path
hashes them and fingerprints their page-table entries like the four regions'
(`scanner.check.fastpath`), and resume records keep them (`scanner.check.resume`).

`Recorder` wraps the guest reader the verifiers use and keeps, per virtual address
read, the bytes it returned (the very bytes verified: the reference digest is taken
over them, not over a fresh reading), their physical runs and the page-table entries
the walk went through. It is bounded: past `MAX_RANGES` ranges or `MAX_BYTES` bytes a
read returns None, so what a hostile guest makes the verifiers follow beyond that stays
unverified (reported) rather than verified and unwatched.

Pure: a page walk and guest memory in, records out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scanner.hashing import DIGEST_SIZE, raw_digests

__all__ = ["MAX_BYTES", "MAX_RANGES", "ReachedRange", "Recorder", "reached_digest"]

#: Bounds on what one check may add to a VM's checked state (a trampoline is ~0.3 KiB,
#: an optprobe slot ~0.1 KiB; the verifiers follow at most 512 distinct targets).
MAX_RANGES = 1024
MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class ReachedRange:
    """One range of guest-virtual memory a verifier read, as it was when verified."""

    va: int
    data: bytes
    #: (gpa, size) physically contiguous pieces, in order.
    runs: tuple[tuple[int, int], ...]
    #: (entry gpa, value) of every page-table entry the walk read.
    entries: tuple[tuple[int, int], ...]
    #: Read twice with different bytes in the overlap: verified from a mix of two
    #: states, so no fast pass may take it as unchanged (the next one re-checks).
    torn: bool = False


def reached_digest(ranges: Sequence[ReachedRange]) -> bytes:
    """The digest the fast path compares: over the ranges' bytes, in order — equal to
    `raw_digests` (the fast and the keyed digest) over views of their runs while the
    bytes are unchanged. A torn range
    gives a digest no reading is expected to match (all zero), so the next fast pass
    sends the VM down the slow path again."""
    if any(r.torn for r in ranges):
        return bytes(DIGEST_SIZE)
    return raw_digests([memoryview(r.data) for r in ranges])


#: Reads `size` bytes at guest-virtual `va`: (bytes, gpa runs, page-table entries), or
#: None when unmapped / not RAM.
Walk = Callable[[int, int], tuple[bytes, tuple[tuple[int, int], ...],
                                  tuple[tuple[int, int], ...]] | None]


class Recorder:
    """A `ReadVA` for the verifiers that remembers what it returned (bounded)."""

    def __init__(self, walk: Walk, max_ranges: int = MAX_RANGES,
                 max_bytes: int = MAX_BYTES) -> None:
        self._walk = walk
        self._max_ranges = max_ranges
        self._max_bytes = max_bytes
        self._by_va: dict[int, ReachedRange] = {}
        self._bytes = 0
        self._lock = threading.Lock()  # verifiers run in worker threads

    def __call__(self, va: int, size: int) -> bytes | None:
        with self._lock:
            prev = self._by_va.get(va)
            grow = size - (len(prev.data) if prev is not None else 0)
            new = prev is None
            if (new and len(self._by_va) >= self._max_ranges) or (
                    grow > 0 and self._bytes + grow > self._max_bytes):
                return None  # over the bound: unreadable, so unverified
        got = self._walk(va, size)
        if got is None:
            return None
        data, runs, entries = got
        with self._lock:
            prev = self._by_va.get(va)
            n = min(len(data), len(prev.data)) if prev is not None else 0
            if prev is not None and not prev.torn and data[:n] != prev.data[:n]:
                self._by_va[va] = ReachedRange(va, prev.data, prev.runs, prev.entries, True)
                prev = self._by_va[va]
            # Per address, the longest read is kept: the verifiers read a head, then the
            # whole; the shorter one is a prefix of what is kept.
            if prev is None or len(data) > len(prev.data):
                if (prev is None and len(self._by_va) >= self._max_ranges) or (
                        self._bytes + len(data) - (len(prev.data) if prev else 0)
                        > self._max_bytes):
                    return None
                self._bytes += len(data) - (len(prev.data) if prev else 0)
                self._by_va[va] = ReachedRange(va, data, runs, entries,
                                               prev is not None and prev.torn)
        return data

    def ranges(self) -> tuple[ReachedRange, ...]:
        """What was read, by address."""
        with self._lock:
            return tuple(self._by_va[va] for va in sorted(self._by_va))

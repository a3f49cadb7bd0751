"""Golden region bytes, decompressed once and kept a moment for the checks that follow.

A `.text` check that finds changed pages verifies them against the golden `.text` as a
whole (14.7 MB on Debian 6.1; zstd takes 11-17 ms to give it back, much of it faulting
in the fresh output). The checks right after need the same bytes again: the confirming
second look at the same change (it follows the first by ~0.3-0.5 s), and the other VMs of
a fleet-wide patching wave, whose checks come back to back. So the last few are kept,
each until `KEEP_S` after its last use, then dropped. The hold is short on purpose: kscan's
memory between changes is what it was (`perf/soak.py` holds it flat), and a burst of
changes adds at most `MAX_KEPT` copies, for as long as the burst lasts.

Entries are found by a digest of the compressed bytes, so a new golden baseline of the
same kernel never hands back the old one's bytes. The compressed bytes come from kscan's
own database, never from a guest. Worker threads share one `GoldenBytes`; the first
thread to miss decompresses while the others wait for its result instead of repeating it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import xxhash
import zstandard

__all__ = ["GOLDEN_BYTES", "KEEP_S", "MAX_KEPT", "GoldenBytes"]

#: Seconds an entry is kept after its last use: past a second look's delay (0.3 s and
#: the guest's progress), short against the soak's 15 s between memory samples.
KEEP_S = 2.0
#: At most this many entries (kernel builds whose golden bytes are in use at once).
MAX_KEPT = 2


@dataclass
class _Entry:
    data: bytes
    used: float


class GoldenBytes:
    """Decompressed golden region bytes by digest of their compressed form, bounded in
    count and in time (`keep_s` after the last use)."""

    def __init__(self, keep_s: float = KEEP_S, max_kept: int = MAX_KEPT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keep_s = keep_s
        self.max_kept = max_kept
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: dict[bytes, _Entry] = {}
        self.hits = 0
        self.misses = 0

    def get(self, blob: bytes, max_size: int) -> bytes:
        """The zstd frame `blob` decompressed (at most `max_size` bytes: ZstdError
        beyond), from the kept entries when it was asked for lately."""
        key = xxhash.xxh3_128_digest(blob)
        with self._lock:   # held while decompressing: a second asker waits, not repeats
            now = self._clock()
            self._drop_idle(now)
            hit = self._kept.get(key)
            if hit is not None:
                hit.used = now
                self.hits += 1
                return hit.data
            size = zstandard.frame_content_size(blob)   # -1: not in the header
            if size > max_size:   # zstandard sizes its output by the header, cap or not
                raise zstandard.ZstdError(f"golden content decompresses to {size} bytes, "
                                          f"more than the {max_size} a region may have")
            data = zstandard.ZstdDecompressor().decompress(blob, max_output_size=max_size)
            self.misses += 1
            if self.max_kept > 0 and self.keep_s > 0:
                while len(self._kept) >= self.max_kept:   # least lately used goes
                    del self._kept[min(self._kept, key=lambda k: self._kept[k].used)]
                self._kept[key] = _Entry(data, self._clock())
            return data

    def prune(self) -> int:
        """Drop the entries idle for `keep_s` (a long-running watcher calls this about
        once a second, so nothing outlives its use by much). Returns how many went."""
        with self._lock:
            return self._drop_idle(self._clock())

    def kept_bytes(self) -> int:
        """Bytes held now."""
        with self._lock:
            return sum(len(e.data) for e in self._kept.values())

    def _drop_idle(self, now: float) -> int:
        idle = [k for k, e in self._kept.items() if now - e.used >= self.keep_s]
        for k in idle:
            del self._kept[k]
        return len(idle)


#: The process's golden bytes (what `scanner.check.verify` decompresses through).
GOLDEN_BYTES = GoldenBytes()

"""Golden region bytes decompressed once and kept for the checks that follow
(`scanner.check.golden_bytes`), the per-build site tables a `.text` verification derives
once (`scanner.check.patching.common.site_tables`), and the changed-offset scan that
replaced a whole-`.text` temporary."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import zstandard

from scanner.check.golden_bytes import GoldenBytes
from scanner.check.patching.common import _CMP_STEP, _changed_offsets, site_tables
from scanner.image.patchsites import PatchSites


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _blob(seed: int, size: int = 200_000) -> tuple[bytes, bytes]:
    raw = random.Random(seed).randbytes(size // 4) * 4   # compressible, distinct per seed
    return raw, zstandard.ZstdCompressor(level=3).compress(raw)


def test_kept_for_the_checks_that_follow_then_dropped_once_idle() -> None:
    clock = Clock()
    gb = GoldenBytes(keep_s=10.0, max_kept=2, clock=clock)
    raw, blob = _blob(1)
    assert gb.get(blob, 1 << 20) == raw and (gb.hits, gb.misses) == (1 - 1, 1)
    clock.t += 9.0
    assert gb.get(bytes(blob), 1 << 20) is gb.get(blob, 1 << 20)  # by content, not object
    assert (gb.hits, gb.misses) == (2, 1)
    clock.t += 9.9          # idle 9.9 s since its last use: still kept
    assert gb.prune() == 0 and gb.kept_bytes() == len(raw)
    clock.t += 0.1          # idle 10 s: dropped, memory given back
    assert gb.prune() == 1 and gb.kept_bytes() == 0
    assert gb.get(blob, 1 << 20) == raw and gb.misses == 2


def test_each_golden_gets_its_own_bytes_and_at_most_max_kept_are_held() -> None:
    clock = Clock()
    gb = GoldenBytes(keep_s=10.0, max_kept=2, clock=clock)
    (r1, b1), (r2, b2), (r3, b3) = _blob(1), _blob(2), _blob(3)
    assert gb.get(b1, 1 << 20) == r1
    clock.t += 1
    assert gb.get(b2, 1 << 20) == r2
    clock.t += 1
    assert gb.get(b1, 1 << 20) == r1      # b1 now used more lately than b2
    clock.t += 1
    assert gb.get(b3, 1 << 20) == r3      # a third: the least lately used (b2) goes
    assert gb.kept_bytes() == len(r1) + len(r3)
    misses = gb.misses
    assert gb.get(b1, 1 << 20) == r1 and gb.misses == misses
    assert gb.get(b2, 1 << 20) == r2 and gb.misses == misses + 1


def test_nothing_is_kept_when_keeping_is_off_and_the_size_cap_holds() -> None:
    raw, blob = _blob(4)
    gb = GoldenBytes(keep_s=0.0)
    assert gb.get(blob, 1 << 20) == raw and gb.kept_bytes() == 0
    with pytest.raises(zstandard.ZstdError, match="more than"):   # size in the header
        GoldenBytes().get(blob, len(raw) - 1)
    sizeless = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(zstandard.ZstdError):                      # found while decoding
        GoldenBytes().get(sizeless, len(raw) - 1)
    assert GoldenBytes().get(sizeless, len(raw)) == raw


def test_threads_missing_together_decompress_once() -> None:
    raw, blob = _blob(5, 4_000_000)
    gb = GoldenBytes()
    got: list[bytes] = []
    start = threading.Barrier(4)

    def ask() -> None:
        start.wait()
        got.append(gb.get(blob, 1 << 23))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 4 and all(g == raw for g in got)
    assert (gb.misses, gb.hits) == (1, 3)


def test_real_clock_expiry() -> None:
    raw, blob = _blob(6)
    gb = GoldenBytes(keep_s=0.2)
    gb.get(blob, 1 << 20)
    assert gb.kept_bytes() == len(raw)
    time.sleep(0.25)
    assert gb.prune() == 1 and gb.kept_bytes() == 0


@pytest.mark.parametrize("size", [0, 1, _CMP_STEP - 1, _CMP_STEP, _CMP_STEP + 1,
                                  3 * _CMP_STEP + 17])
def test_changed_offsets_equal_the_whole_buffer_comparison(size: int) -> None:
    rnd = random.Random(size)
    base = np.frombuffer(rnd.randbytes(size), dtype=np.uint8)
    live = base.copy()
    # Changes at the step edges and at random places.
    spots = {o for o in (0, _CMP_STEP - 1, _CMP_STEP, 2 * _CMP_STEP, size - 1)
             if 0 <= o < size} | {rnd.randrange(size) for _ in range(5) if size}
    for o in spots:
        live[o] ^= 0x5A
    got = _changed_offsets(base, live)
    assert got.dtype == np.int64
    assert got.tolist() == np.flatnonzero(base != live).tolist() == sorted(spots)


def test_site_tables_are_made_once_per_build_and_cannot_be_changed() -> None:
    text = 0xFFFF_FFFF_8100_0000
    sites = PatchSites(function_starts=np.array([text + 0x40, text, text + 0x20],
                                                dtype=np.uint64),
                       kprobe_blacklist=((text + 0x30, text + 0x38), (text, text + 0x100)),
                       symbols={"__x86_return_thunk": text + 0x20})
    t = site_tables(sites)
    assert site_tables(sites) is t
    assert t.fs_list == tuple(sorted(t.fs_list)) and len(t.fs_list) == 3
    assert t.ct is t.fs                     # no call targets: function starts
    assert t.bl_maxend == (t.bl[0][1], t.bl[0][1])   # the nested range is inside the first
    assert t.thunks.tolist() == [t.named["__x86_return_thunk"]]
    # Every VM of the build shares them: nothing a check does can change them.
    with pytest.raises(ValueError):
        t.fs[0] = 0
    with pytest.raises(TypeError):
        t.named["__x86_return_thunk"] = 0   # type: ignore[index]
    other = PatchSites(function_starts=np.array([text], dtype=np.uint64))
    assert site_tables(other) is not t and len(site_tables(other).fs_list) == 1

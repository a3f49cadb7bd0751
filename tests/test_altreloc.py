"""Conditional KASLR normalization of relocated bytes copied into .text by alternatives
(scanner.image.altreloc), on synthetic data."""

from __future__ import annotations

import numpy as np

from scanner.image.altreloc import AltRelocs, normalize_alt
from scanner.image.kernel_profile import KernelProfile, SectionInfo

SLIDE = 0x1220_0000


def alt(*rows: tuple[int, int, int, int]) -> AltRelocs:
    cols = list(zip(*rows, strict=True))
    return AltRelocs(*(np.array(c, dtype=np.int64) for c in cols))


def test_applied_sites_are_normalized_others_left_alone() -> None:
    # An inverse (per-CPU, RIP-relative) site at 0x10 and an absolute 32-bit one at 0x20.
    a = alt((0x10, 4, 0x7F02C63A, -1), (0x20, 4, 0x81CA3680, 1))
    buf = bytearray(64)
    buf[0x10:0x14] = ((0x7F02C63A - SLIDE) & 0xFFFFFFFF).to_bytes(4, "little")
    buf[0x20:0x24] = ((0x81CA3680 + SLIDE) & 0xFFFFFFFF).to_bytes(4, "little")
    assert normalize_alt(buf, a, SLIDE) == 2
    assert buf[0x10:0x14] == (0x7F02C63A).to_bytes(4, "little")
    assert buf[0x20:0x24] == (0x81CA3680).to_bytes(4, "little")
    # Not what the kernel writes at this slide (alternative not applied, or tampered):
    # left exactly as it is, so verification sees it.
    other = bytearray(64)
    other[0x10:0x14] = ((0x7F02C63A - SLIDE + 0x20_0000) & 0xFFFFFFFF).to_bytes(4, "little")
    before = bytes(other)
    assert normalize_alt(other, a, SLIDE) == 0 and bytes(other) == before


def test_alternative_2_candidates_and_bounds() -> None:
    # ALTERNATIVE_2: two replacements may land at one offset; the matching one is used.
    a = alt((8, 4, 0x81CA3680, 1), (8, 4, 0x81F04104, 1), (62, 4, 1, 1))
    buf = bytearray(64)
    buf[8:12] = ((0x81F04104 + SLIDE) & 0xFFFFFFFF).to_bytes(4, "little")
    assert normalize_alt(buf, a, SLIDE) == 1
    assert buf[8:12] == (0x81F04104).to_bytes(4, "little")
    assert normalize_alt(bytearray(64), AltRelocs.empty(), SLIDE) == 0
    assert normalize_alt(bytearray(64), None, SLIDE) == 0


def test_profile_round_trip_keeps_alt_relocs() -> None:
    a = alt((0x89CE, 4, 0x7F02C63A, -1), (0x100, 8, -2, 1))
    p = KernelProfile(build_id="ef" * 20, release="r", version="v",
                      sections={".text": SectionInfo(".text", 0xFFFF_FFFF_8100_0000, 0x10000)},
                      relocs={}, text_head=b"", ex_table=b"", alt_relocs={".text": a})
    q = KernelProfile.from_bytes(p.to_bytes())
    got = q.alt_relocs[".text"]
    assert got.offsets.tolist() == [0x89CE, 0x100] and got.canon.tolist() == [0x7F02C63A, -2]
    assert got.sign.tolist() == [-1, 1] and got.widths.tolist() == [4, 8]
